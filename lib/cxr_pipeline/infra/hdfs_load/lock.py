"""Who is loading: the owner written into the target's lock and staging markers, and the lease that keeps
the lock renewed while a load runs."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .shared import LOCK_NAME, WRITTEN_BY, TargetLocked

if TYPE_CHECKING:  # remote.RemoteTree uses this module's lock messages
    from .remote import RemoteTree


ACTIVE_RUNS: set[str] = set()  # run ids of loads in progress in this process


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, from /proc): tells a reused pid from the
    process that had it. None where there is no /proc entry for it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Owner:
    """A load: written into the target's lock and into each staging folder's marker."""

    run_id: str
    host: str
    pid: int
    user: str
    started_at: str
    proc_start: int | None = None  # process_start(pid) when it was written; None: unknown

    @classmethod
    def this_process(cls, user: str) -> Owner:
        return cls(
            new_run_id(),
            socket.gethostname(),
            os.getpid(),
            user,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            process_start(os.getpid()),
        )

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "written_by": WRITTEN_BY}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Owner | None:
        try:
            data = json.loads(raw)
            proc_start = data.get("proc_start")  # absent from locks written before it was recorded
            return cls(
                str(data["run_id"]),
                str(data["host"]),
                int(data["pid"]),
                str(data["user"]),
                str(data["started_at"]),
                None if proc_start is None else int(proc_start),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def running(self) -> bool | None:
        """Whether its process still runs; None when it ran on another host (that cannot be told from here)."""
        if self.host != socket.gethostname():
            return None
        if self.pid == os.getpid():
            return self.run_id in ACTIVE_RUNS
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            pass
        started = process_start(self.pid)
        return self.proc_start is None or started is None or started == self.proc_start

    def describe(self) -> str:
        return f"{self.user}@{self.host} pid {self.pid} since {self.started_at} (run {self.run_id})"


def holder_alive(holder: Owner | None, lease_age_s: Callable[[], float], lease_s: float) -> tuple[bool, str]:
    """Whether the load holding a lock may still be running, and why. On this host its process tells; on
    another host (or for an unreadable lock) the lease does: a running load renews it every ``lease_s``/4
    seconds, so a lock not renewed for ``lease_s`` (``lease_age_s()``, by the NameNode's clock) is a dead one's."""
    running = holder.running() if holder is not None else None
    if running is not None:
        return running, f"that process is {'still' if running else 'no longer'} running on this host"
    age = lease_age_s()
    if age < lease_s:
        return True, (
            f"its lease was renewed {age:.0f} s ago: it is running elsewhere (a lease not renewed for "
            f"hdfs_load.lock_lease_s = {lease_s:g} s means its load is gone)"
        )
    return False, f"its lease was last renewed {age:.0f} s ago (hdfs_load.lock_lease_s = {lease_s:g} s)"


def locked_message(lock_uri: str, holder: Owner | None) -> str:
    if holder is None:
        return (
            f"{lock_uri} exists but cannot be read: another hdfs-load may be writing to this target. "
            "If none is, run again with --break-lock."
        )
    state = {
        False: " That process is no longer running on this host: the lock is stale.",
        True: " That process is still running.",
        None: "",
    }[holder.running()]
    return (
        f"another hdfs-load is writing to this target: {lock_uri} is held by {holder.describe()}.{state} "
        "Wait for it to finish; if it was killed, run again with --break-lock."
    )


def break_refused_message(lock_uri: str, holder: Owner | None, why: str) -> str:
    who = holder.describe() if holder is not None else "a load whose lock cannot be read"
    return (
        f"--break-lock refused: {lock_uri} is held by {who}, and {why}. Breaking it would let two loads write "
        "the same files. Wait for that load to finish, or stop it, then run again."
    )


class LockLease:
    """This load's hold on the target's lock, renewed in a thread: every ``lease_s``/4 seconds it checks that
    the lock still names this load and sets the lock's modification time to the NameNode's now (the holder's
    clock plus the offset measured when the NameNode stamped the lock). Once the lock names another load,
    ``check`` raises: a load whose lock was broken stops before it places another file."""

    def __init__(self, remote: RemoteTree, owner: Owner, lease_s: float, clock_offset_ms: int):
        self.remote, self.owner, self.lease_s, self.offset_ms = remote, owner, lease_s, clock_offset_ms
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_stopped, name="hdfs-load-lease", daemon=True)

    def __enter__(self) -> LockLease:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _renew_until_stopped(self) -> None:
        while self.lost is None and not self._stop.wait(self.lease_s / 4):
            self.renew()

    def renew(self) -> None:
        try:
            holder = self.remote.read_owner(LOCK_NAME)
            if holder is None or holder.run_id != self.owner.run_id:
                self.lost = f"it is now held by {holder.describe()}" if holder else "it was removed"
                return
            now_ms = time.time() * 1000 + self.offset_ms
            self.remote.fs.set_modification_time(self.remote.path(LOCK_NAME), int(now_ms))
        except OSError:
            pass  # HDFS unreachable for now: the next renewal tries again (a lease outlasts three missed ones)

    def check(self) -> None:
        if self.lost is not None:
            raise TargetLocked(
                f"this load lost its lock {self.remote.address.uri(LOCK_NAME)} ({self.lost}): stopped before "
                "placing another file. Files already in place are complete and recorded on themselves; run "
                "again once the other load is done."
            )
