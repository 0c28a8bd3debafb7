"""All-or-nothing output folders for the jobs: training runs, CNN runs, predictions.

A job never writes into its ``--out`` folder directly. :func:`staged_output` hands it a
temporary sibling, ``.<name>.staging-<id>``; when the job's block ends without an error,
``_SUCCESS`` is written last into that sibling and the sibling is renamed onto ``--out``
(one NameNode rename on HDFS, one ``rename(2)`` locally). A job that fails half-way leaves
``--out`` as it was and removes its own staging folder:

    >>> with staged_output("hdfs://nn:9000/runs/today", overwrite=False, tool="train_featurizer") as stage:
    ...     write_everything_under(stage)                                      # doctest: +SKIP

An existing ``--out`` that holds files is refused unless ``overwrite``; even then only a
folder this tool wrote (it has ``_SUCCESS``, or the files of an older run) is replaced: the
old folder is moved aside, the new one renamed into place, and only then the old one deleted.

Readers (batch prediction, serving, ``cxr-predict-image``, the notebooks) call
:func:`require_complete`, so a folder without ``_SUCCESS`` is never scored with.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from . import storage

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"
# Files by which an output folder of an older version of this tool (before _SUCCESS) is recognised.
LEGACY_MARKERS = ("config.yaml", "classifier.json", "cnn.json", "predictions.parquet")


class OutputExistsError(FileExistsError):
    """``--out`` already holds files and ``--overwrite`` was not given (or it is not ours to replace)."""


class IncompleteRunError(FileNotFoundError):
    """A run folder without ``_SUCCESS``: its job failed or is still running."""


def _child(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _sibling(uri: str, label: str) -> str:
    parent, name = uri.rstrip("/").rsplit("/", 1)
    return f"{parent}/.{name}.{label}-{uuid.uuid4().hex[:10]}"


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
    """Fail early (before hours of work) when ``out_uri`` could not be written at the end."""
    if "/" not in out_uri.rstrip("/"):
        raise ValueError(f"--out {out_uri!r} must be a folder inside another folder (a path or URI)")
    if not storage.exists(out_uri) or not _has_files(out_uri):
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


def _publish(stage: str, out_uri: str, overwrite: bool) -> None:
    """Rename the finished ``stage`` onto ``out_uri``; an old run there is removed only after the swap."""
    check_output(out_uri, overwrite)  # again: another job may have written there meanwhile
    aside = None
    if storage.exists(out_uri):
        if _has_files(out_uri):
            aside = _sibling(out_uri, "replaced")
            storage.rename(out_uri, aside)
        else:
            storage.delete(out_uri, recursive=False)  # an empty folder (refuses one with sub-folders)
    try:
        storage.rename(stage, out_uri)
    except BaseException:
        if aside is not None and not storage.exists(out_uri):
            storage.rename(aside, out_uri)
        raise
    if aside is not None:
        storage.delete(aside, recursive=True)


@contextmanager
def staged_output(out_uri: str, overwrite: bool = False, tool: str = "cxr-pipeline") -> Iterator[str]:
    """Yields a staging folder URI to write into; publishes it as ``out_uri`` when the block succeeds."""
    out_uri = str(out_uri).rstrip("/")
    check_output(out_uri, overwrite)
    stage = _sibling(out_uri, "staging")
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
    """Raise :class:`IncompleteRunError` unless ``run_uri`` ends with ``_SUCCESS``."""
    run_uri = str(run_uri).rstrip("/")
    if not storage.exists(run_uri):
        raise FileNotFoundError(f"{run_uri} does not exist: is it the --out of a training run?")
    if not is_complete(run_uri):
        raise IncompleteRunError(
            f"{run_uri} is not a complete {what}: it has no {SUCCESS_FILE} marker, so the job that wrote it "
            "failed or is still running (or an older version wrote it). Re-run the training job with "
            "--overwrite to replace it."
        )
