"""Checks on the paths a user types, before any work: a run folder that is not on this machine."""

from __future__ import annotations

from typing import Any

from .. import config as cfg


def missing_on_this_machine(path: str, config: dict[str, Any]) -> str | None:
    """None when ``path`` is a URI (``hdfs://``, ``models:/``, ...) or exists here; else the sentence saying it does
    not, naming the same path on the default HDFS (``hdfs.namenode_uri``) when it is there: the demo and the
    notebooks write their runs to HDFS, and ``runs/demo`` reads like a local folder."""
    import os

    if "://" in path or path.startswith("models:/") or os.path.exists(path):
        return None
    message = f"{path} does not exist on this machine"
    twin = hdfs_twin(path, config)
    return f"{message}; {twin} does: pass that URI" if twin else message


def hdfs_twin(path: str, config: dict[str, Any]) -> str | None:
    """``<hdfs.namenode_uri>/<path>`` (relative paths taken from the root) when it exists; None when it does
    not or HDFS cannot be asked."""
    import posixpath

    from ..infra import storage

    namenode = str(cfg.get(config, "hdfs.namenode_uri") or "").rstrip("/")
    relative = posixpath.normpath(path).lstrip("/")
    if not namenode.startswith("hdfs://") or relative.startswith(".."):
        return None
    twin = f"{namenode}/{relative}"
    try:
        storage.configure(config)
        return twin if storage.exists(twin) else None
    except (OSError, ValueError):  # HDFS down or not configured: no hint, the plain message stands
        return None
