"""Detached daemon processes tracked by pid files, and who holds a port.

Shared by the local HDFS and the standalone Spark cluster: each daemon is a
``java`` process started in its own session (so it outlives the caller and a
Ctrl-C in the caller does not reach it), with ``<name>.pid`` and
``logs/<name>.log`` in a state dir.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


class ProcessHandle:
    """A daemon identified by a pid file; ``marker`` must occur in its command line.

    The marker guards against a stale pid file whose pid the OS has since given
    to an unrelated process.
    """

    def __init__(self, name: str, marker: str, state_dir: Path):
        self.name = name
        self.marker = marker
        self.state_dir = Path(state_dir)
        self.pid_file = self.state_dir / f"{name}.pid"
        self.log_file = self.state_dir / "logs" / f"{name}.log"
        self.log_start_file = self.state_dir / f"{name}.logstart"

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        return pid is not None and process_matches(pid, self.marker)

    def clear_if_stale(self) -> bool:
        """Remove a pid file whose process is gone; True when one was removed."""
        if self.pid_file.exists() and not self.alive():
            self.pid_file.unlink(missing_ok=True)
            return True
        return False

    def start(self, command: list[str], env: Mapping[str, str] | None = None) -> int:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.log_start_file.write_text(f"{log.tell()}\n")
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                env=dict(env) if env is not None else None,
            )
        self.pid_file.write_text(f"{process.pid}\n")
        # Until exec() the child's command line is still ours: wait for the marker
        # so that alive() right after start() is not a false "exited".
        deadline = time.monotonic() + 10
        while process.poll() is None and not process_matches(process.pid, self.marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        return process.pid

    def log_contains_since_start(self, needle: bytes, chunk: int = 1 << 20) -> bool:
        """Whether the daemon wrote ``needle`` to its log since its latest start()."""
        try:
            offset = int(self.log_start_file.read_text())
        except (OSError, ValueError):
            offset = 0
        try:
            with open(self.log_file, "rb") as log:
                log.seek(offset)
                tail = b""
                while block := log.read(chunk):
                    if needle in tail + block:
                        return True
                    tail = block[-len(needle) :]
        except OSError:
            return False
        return False

    def stop(self, timeout: float = 20) -> bool:
        """SIGTERM, then SIGKILL after ``timeout`` s; removes the pid file. True if it was running."""
        pid = self.pid()
        was_running = pid is not None and process_matches(pid, self.marker)
        if was_running:
            _signal(pid, signal.SIGTERM)
            if not wait_for_exit(pid, timeout):
                _signal(pid, signal.SIGKILL)
                wait_for_exit(pid, 10)
        self.pid_file.unlink(missing_ok=True)
        self.log_start_file.unlink(missing_ok=True)
        return was_running


def command_line(pid: int | str) -> str | None:
    """``pid``'s arguments joined by spaces (empty while it exec's), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def process_matches(pid: int, marker: str) -> bool:
    # While a process exec's (spark-class is a shell script that ends in ``exec java``), the kernel has
    # swapped in the new program before it sets its arguments, and cmdline reads empty for that instant.
    # A live process with an empty command line is therefore read again, not called gone.
    for _ in range(50):
        cmdline = command_line(pid)
        if cmdline is None:
            return False
        if _is_zombie(pid):  # exited, not yet reaped by its parent: gone
            return False
        if cmdline:
            return marker in cmdline
        time.sleep(0.01)
    return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        except ChildProcessError:
            pass
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return True
        time.sleep(0.2)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


# Ports for private daemons are drawn below the kernel's ephemeral range: a port the OS hands out for
# ``bind(0)`` is also what it gives the next outgoing connection (Spark, HDFS clients and their JVMs open many),
# so a daemon started a moment later could find it taken ("datanode exited during start-up").
_PRIVATE_PORTS = (20000, 32000)
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, outside the ephemeral range and never returned twice by this
    process (another process may still take it later)."""
    import random

    low, high = _PRIVATE_PORTS[0], min(_PRIVATE_PORTS[1], _ephemeral_low())
    for _ in range(500):
        port = random.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {low}..{high}")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def port_owner(port: int) -> dict | None:
    """``{"pid": int|None, "name": str}`` of the process listening on TCP ``port``, or None if free."""
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out.strip():
        match = re.search(r'users:\(\("([^"]*)",pid=(\d+)', out)
        return {"pid": int(match.group(2)), "name": match.group(1)} if match else {"pid": None, "name": "unknown"}
    if port_in_use(port):
        return {"pid": None, "name": "unknown"}
    return None


def wait_for_port_free(port: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_in_use(port):
            return True
        time.sleep(0.2)
    return False


@contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Serialises up/down of one local service across processes (several test sessions may start it at once)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def describe_port_owner(owner: Mapping) -> str:
    """``"pid 123 (java)"`` for a :func:`port_owner` result, for error messages."""
    return f"pid {owner['pid']} ({owner['name']})" if owner.get("pid") else "another process"
