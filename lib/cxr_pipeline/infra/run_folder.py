"""All-or-nothing output folders for the jobs: training runs, CNN runs, predictions.

A job never writes into its ``--out`` folder directly. :func:`staged_output` hands it a
temporary sibling, ``.<name>.staging-<time>-<pid>-<host>-<id>``; when the job's block ends without
an error, ``_SUCCESS`` is written last into that sibling and the sibling is renamed onto ``--out``
(one NameNode rename on HDFS, one ``rename(2)`` locally). A job that fails half-way leaves
``--out`` as it was and removes its own staging folder:

    >>> with staged_output("hdfs://nn:9000/runs/today", overwrite=False, tool="train_featurizer") as stage:
    ...     write_everything_under(stage)                                      # doctest: +SKIP

An existing ``--out`` that holds files is refused unless ``overwrite``; even then only a
folder this tool wrote (it has ``_SUCCESS``, or the files of an older run) is replaced: the
old folder is moved aside (``.<name>.replaced-...``), the new one renamed into place, and only
then the old one deleted.

Neither HDFS nor POSIX can swap two non-empty folders in one step, so between those two renames
``--out`` is missing. A process killed there leaves the old run aside: the next reader
(:func:`require_complete`) or writer (:func:`check_output`) renames it back before anything says
"does not exist". A reader that does so while a live job is between its renames only makes that
job move the old run aside again.

Readers (batch prediction, serving, ``cxr-predict-image``, the notebooks) call
:func:`require_complete`, so a folder without ``_SUCCESS`` is never scored with.

Leftovers of killed jobs (staging folders, old runs moved aside) are removed by the next job
that writes the same ``--out``: only those two kinds of sibling of that ``--out``, only once older
than ``outputs.leftovers_age_hours``, and never while the process named in them runs on this host.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import config as cfg
from . import storage

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"
# Files by which an output folder of an older version of this tool (before _SUCCESS) is recognised.
LEGACY_MARKERS = ("config.yaml", "classifier.json", "cnn.json", "predictions.parquet")
STAGING, REPLACED = "staging", "replaced"  # the two kinds of sibling a job makes next to its --out
# Tries when --out changes between two looks (a reader restored the old run, another job published).
PUBLISH_ATTEMPTS = 5
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
# After ".<name>.<kind>-": <created, epoch s>-<pid>-<host>-<id>; versions before wrote only a 10-hex id.
_SIBLING_SUFFIX = re.compile(r"^(?P<created>\d+)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9._-]+)-[0-9a-f]{8}$")
_OLD_SIBLING_SUFFIX = re.compile(r"^[0-9a-f]{10}$")


class OutputExistsError(FileExistsError):
    """``--out`` already holds files and ``--overwrite`` was not given (or it is not ours to replace)."""


class IncompleteRunError(FileNotFoundError):
    """A run folder without ``_SUCCESS``: its job failed or is still running."""


@dataclass(frozen=True)
class OutputSettings:
    """The ``outputs`` section of the config."""

    leftovers_age_hours: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None) -> OutputSettings:
        """From a loaded config (``None``: the defaults)."""
        return cfg.section_settings(cls, cfg.load_config() if config is None else config, "outputs")

    def validate(self) -> None:
        if not float(self.leftovers_age_hours) >= 0:
            raise cfg.ConfigError(f"outputs.leftovers_age_hours must be >= 0, got {self.leftovers_age_hours!r}")


_active_settings: OutputSettings | None = None


def configure(config: Mapping[str, Any] | None) -> None:
    """Use a job's loaded config (its ``outputs`` section, with --set overrides) instead of conf/ defaults."""
    global _active_settings
    _active_settings = OutputSettings.from_config(config) if config is not None else None


@lru_cache(maxsize=1)
def _default_settings() -> OutputSettings:
    return OutputSettings.from_config()


def _settings() -> OutputSettings:
    return _active_settings or _default_settings()


def _child(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _sibling(uri: str, kind: str) -> str:
    parent, name = uri.rstrip("/").rsplit("/", 1)
    return f"{parent}/.{name}.{kind}-{int(time.time())}-{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}"


def process_runs(pid: int, since: float) -> bool:
    """Whether process ``pid`` of this host is running and was started by ``since`` (epoch s): a process
    started later only reuses a dead one's pid. Where that cannot be told, it counts as running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:5] == "btime")
    except (OSError, IndexError, StopIteration, ValueError):  # gone meanwhile, or no /proc here
        return Path(f"/proc/{pid}").exists() or not Path("/proc/stat").exists()
    if fields[0] == "Z":  # exited, not yet reaped by its parent
        return False
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return started <= since + 2  # btime is whole seconds


@dataclass(frozen=True)
class Leftover:
    """A sibling a job made next to its ``--out``: its staging folder, or an old run it moved aside."""

    uri: str
    kind: str  # STAGING | REPLACED
    created: float  # epoch s: from the name; an older version's name has none, then the folder's modification time
    pid: int | None = None
    host: str | None = None

    def owner_runs_here(self) -> bool:
        return self.host == _HOST and self.pid is not None and process_runs(self.pid, self.created)


def leftovers(out_uri: str, kind: str) -> list[Leftover]:
    """The ``kind`` siblings of ``out_uri`` (named as this module names them, folders only), oldest first."""
    parent, name = str(out_uri).rstrip("/").rsplit("/", 1)
    prefix = f".{name}.{kind}-"
    try:
        entries = storage.list_folder(parent)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if not entry.is_dir or not entry.name.startswith(prefix):
            continue
        suffix = entry.name[len(prefix) :]
        if match := _SIBLING_SUFFIX.match(suffix):
            created, pid, host = float(match["created"]), int(match["pid"]), match["host"]
            found.append(Leftover(entry.uri, kind, created, pid, host))
        elif _OLD_SIBLING_SUFFIX.match(suffix):
            found.append(Leftover(entry.uri, kind, entry.modified))
    return sorted(found, key=lambda leftover: (leftover.created, leftover.uri))


def _has_files(uri: str) -> bool:
    try:
        return bool(storage.list_files(uri, recursive=True))
    except FileNotFoundError:
        return False


def is_complete(uri: str) -> bool:
    return storage.exists(_child(uri, SUCCESS_FILE))


def _is_ours(uri: str) -> bool:
    return any(storage.exists(_child(uri, name)) for name in (SUCCESS_FILE, *LEGACY_MARKERS))


def check_output(out_uri: str, overwrite: bool = False) -> None:
    """Fail early (before hours of work) when ``out_uri`` could not be written at the end.

    A run that a job stopped while replacing it left aside is renamed back first, so it counts as there."""
    if "/" not in out_uri.rstrip("/"):
        raise ValueError(f"--out {out_uri!r} must be a folder inside another folder (a path or URI)")
    if not restore_replaced(out_uri) or not _has_files(out_uri):
        return
    if not overwrite:
        raise OutputExistsError(
            f"{out_uri} already holds files: choose another --out, or pass --overwrite to replace that run"
        )
    if not _is_ours(out_uri):
        raise OutputExistsError(
            f"{out_uri} holds files that this tool did not write (no {SUCCESS_FILE}, no run files): "
            "--overwrite replaces only a run folder; move that data away yourself or choose another --out"
        )


def _success_marker(tool: str) -> bytes:
    return json.dumps(
        {
            "tool": tool,
            "completed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
    ).encode()


def restore_replaced(out_uri: str) -> bool:
    """Whether ``out_uri`` is there, after renaming back the old run that a publish stopped between its two
    renames left aside (the newest complete one) when ``out_uri`` was missing."""
    out_uri = str(out_uri).rstrip("/")
    nothing_aside = 0
    for _ in range(PUBLISH_ATTEMPTS):
        if storage.exists(out_uri):
            return True
        runs = [aside for aside in leftovers(out_uri, REPLACED) if _is_ours(aside.uri)]
        if not runs:
            # Missing, or one publish ended and the next began between the two looks: look twice.
            nothing_aside += 1
            if nothing_aside == 2:
                break
            continue
        newest = max(runs, key=lambda aside: (is_complete(aside.uri), aside.created))
        try:
            storage.rename(newest.uri, out_uri)
        except (FileExistsError, FileNotFoundError):
            continue  # a publishing job or another reader got there first: look again
        except PermissionError as exc:
            raise storage.StoragePermissionError(
                f"{out_uri} is missing: a job was stopped while replacing it, and the run it replaced is in "
                f"{newest.uri}, which this user may not rename back ({exc}). Rename it to {out_uri}, or run the "
                "job that writes there again"
            ) from exc
        log.warning("%s was missing (a job was stopped while replacing it): restored %s", out_uri, newest.uri)
        return True
    return storage.exists(out_uri)


def remove_leftovers(out_uri: str) -> list[str]:
    """Delete the staging folders and old runs moved aside that stopped jobs left next to ``out_uri``, once
    older than ``outputs.leftovers_age_hours`` and unless their process still runs on this host; returns them."""
    max_age = float(_settings().leftovers_age_hours) * 3600.0
    removed = []
    for leftover in leftovers(out_uri, STAGING) + leftovers(out_uri, REPLACED):
        if time.time() - leftover.created < max_age or leftover.owner_runs_here():
            continue
        storage.delete(leftover.uri, recursive=True)
        removed.append(leftover.uri)
    if removed:
        log.info("removed %d folder(s) that stopped jobs left next to %s: %s", len(removed), out_uri, removed)
    return removed


def _discard(aside: str) -> None:
    """Delete a replaced run, ``_SUCCESS`` first: a local delete stopped half-way leaves no complete run."""
    storage.delete(_child(aside, SUCCESS_FILE))
    storage.delete(aside, recursive=True)


def _put_back(asides: list[str], out_uri: str) -> None:
    """After a failed publish: the newest old run moved aside goes back onto an empty ``out_uri``."""
    for aside in reversed(asides):
        try:
            storage.rename(aside, out_uri)
            return
        except FileNotFoundError:  # a reader restored it already
            continue
        except FileExistsError:
            return


def _publish(stage: str, out_uri: str, overwrite: bool) -> None:
    """Rename the finished ``stage`` onto ``out_uri``; an old run there is removed only after the swap."""
    asides: list[str] = []
    for _ in range(PUBLISH_ATTEMPTS):
        check_output(out_uri, overwrite)  # again: another job may have written there meanwhile
        if storage.exists(out_uri):
            if _has_files(out_uri):
                asides.append(_sibling(out_uri, REPLACED))
                storage.rename(out_uri, asides[-1])
            else:
                storage.delete(out_uri, recursive=False)  # an empty folder (refuses one with sub-folders)
        try:
            storage.rename(stage, out_uri)
            break
        except FileExistsError:
            continue  # a reader restored the old run between the renames, or another job published: again
        except BaseException:
            if not storage.exists(out_uri):
                _put_back(asides, out_uri)
            raise
    else:
        raise OutputExistsError(
            f"{out_uri} changed under this job {PUBLISH_ATTEMPTS} times while its run was being renamed into place: "
            "is another job writing to the same --out? Choose another --out"
        )
    for aside in asides:
        _discard(aside)


@contextmanager
def staged_output(out_uri: str, overwrite: bool = False, tool: str = "cxr-pipeline") -> Iterator[str]:
    """Yields a staging folder URI to write into; publishes it as ``out_uri`` when the block succeeds."""
    out_uri = str(out_uri).rstrip("/")
    check_output(out_uri, overwrite)
    remove_leftovers(out_uri)
    stage = _sibling(out_uri, STAGING)
    storage.makedirs(stage)
    try:
        yield stage
        storage.write_bytes(_child(stage, SUCCESS_FILE), _success_marker(tool))
        _publish(stage, out_uri, overwrite)
    except BaseException:
        try:
            if storage.exists(stage):
                storage.delete(stage, recursive=True)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            log.warning("could not remove the staging folder %s: %s", stage, exc)
        raise


def require_complete(run_uri: str, what: str = "run folder") -> None:
    """Raise :class:`IncompleteRunError` unless ``run_uri`` ends with ``_SUCCESS``.

    A run left aside by a job stopped while replacing it is renamed back first (:func:`restore_replaced`)."""
    run_uri = str(run_uri).rstrip("/")
    seen_incomplete = 0
    for _ in range(PUBLISH_ATTEMPTS):
        if not restore_replaced(run_uri):
            raise FileNotFoundError(f"{run_uri} does not exist: is it the --out of a training run?")
        if is_complete(run_uri):
            return
        # Without _SUCCESS, or replaced by a publishing job between the two looks: it must be seen twice.
        seen_incomplete += storage.exists(run_uri)
        if seen_incomplete == 2:
            raise IncompleteRunError(
                f"{run_uri} is not a complete {what}: it has no {SUCCESS_FILE} marker, so the job that wrote it "
                "failed or is still running (or an older version wrote it). Re-run the training job with "
                "--overwrite to replace it."
            )
    raise storage.StorageError(
        f"{run_uri} was replaced {PUBLISH_ATTEMPTS} times while it was being checked: "
        "is a job publishing there in a loop? Try again when it has finished"
    )
