"""Files by Hadoop URI: the one place the project reads and writes storage outside Spark.

Schemes:

* plain paths and ``file://`` URIs: the local filesystem;
* ``hdfs://host:port/path``: HDFS through WebHDFS (HdfsCLI ``InsecureClient``).
  The WebHDFS URL of a NameNode is, first found wins: one registered with
  :func:`register_webhdfs` (the local HDFS instances register themselves),
  ``$CXR_WEBHDFS_URL``, ``hdfs.webhdfs_url`` of the config (when the URI's
  NameNode is the config's ``hdfs.namenode_uri``), else ``http://<host>:9870``.

Results keep the form they were asked in: listing ``/data`` gives plain paths,
listing ``file:///data`` gives ``file://`` URIs, ``hdfs://...`` gives ``hdfs://`` URIs.
Writes are atomic: the bytes go to a hidden temporary name in the same folder
(``.name.tmp-xxxxxxxx``, skipped by Spark/Hadoop readers) and are renamed into
place, so a reader never sees a half-written file.

Errors are ``OSError`` subclasses: ``FileNotFoundError``, ``FileExistsError``,
``StorageUnavailable`` (nothing answers, the NameNode went away, or it is in safe mode),
``StoragePermissionError`` (also a ``PermissionError``) and ``StorageError``.

How a create or read survives a DataNode that dies under it, and a NameNode that does not answer:
:mod:`.webhdfs` (its module docstring).

HDFS at the level of absolute paths (exclusive creates, rename without/with replace,
content summaries, the "is this the NameNode" check) is :class:`HdfsFilesystem`,
from :func:`hdfs_filesystem`; it is the one WebHDFS client of the project
(``hdfs_load`` builds on it), and :func:`hadoop_command_error` translates an
``hdfs dfs`` command's stderr into the same errors.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from pathlib import Path

from ... import paths
from .endpoints import (
    DEFAULT_WEBHDFS_PORT,
    DatanodeRetry,
    HdfsSettings,
    _authority,
    configure,
    hdfs_settings,
    register_webhdfs,
    webhdfs_url_for,
)
from .entries import CHUNK, FileInfo, FolderEntry
from .errors import StorageError, StoragePermissionError, StorageUnavailable, hadoop_command_error, is_lost_connection
from .local import _LocalBackend
from .uris import LOCAL_SCHEMES, _check_supported, _clean_path, _split, hadoop_uri, is_remote, join, to_local_path
from .webhdfs import HdfsFilesystem, hdfs_filesystem

__all__ = [
    "CHUNK",
    "DEFAULT_WEBHDFS_PORT",
    "LOCAL_SCHEMES",
    "DatanodeRetry",
    "FileInfo",
    "FolderEntry",
    "HdfsFilesystem",
    "HdfsSettings",
    "StorageError",
    "StoragePermissionError",
    "StorageUnavailable",
    "configure",
    "delete",
    "download_dir",
    "download_file",
    "exists",
    "find_hdfs_dfs_command",
    "hadoop_command_error",
    "hadoop_uri",
    "hdfs_dfs_command",
    "hdfs_filesystem",
    "hdfs_settings",
    "is_lost_connection",
    "is_remote",
    "join",
    "list_files",
    "list_folder",
    "makedirs",
    "read_bytes",
    "register_webhdfs",
    "rename",
    "to_local_path",
    "upload_dir",
    "upload_file",
    "webhdfs_url_for",
    "write_bytes",
]


def list_files(uri: str | os.PathLike, recursive: bool = True) -> list[FileInfo]:
    """The files (not folders) at ``uri``, sorted by URI; a file URI lists itself."""
    backend, path = _resolve(uri)
    return sorted(backend.list_files(path, recursive), key=lambda info: info.uri)


def list_folder(uri: str | os.PathLike) -> list[FolderEntry]:
    """The entries (files and folders) directly in the folder ``uri``, sorted by URI."""
    backend, path = _resolve(uri)
    return sorted(backend.list_folder(path), key=lambda entry: entry.uri)


def read_bytes(uri: str | os.PathLike) -> bytes:
    backend, path = _resolve(uri)
    return backend.read_bytes(path)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write (replacing) atomically; parent folders are created."""
    backend, path = _resolve(uri)
    backend.write_bytes(path, bytes(data))


def upload_file(local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy one local file to ``uri`` (atomically, replacing)."""
    local = Path(local_path)
    if not local.is_file():
        raise FileNotFoundError(f"{local} is not a file")
    backend, path = _resolve(uri)
    backend.upload_file(local, path)


def download_file(uri: str | os.PathLike, local_path: str | os.PathLike) -> None:
    """Copy one file at ``uri`` to a local path (atomically, replacing)."""
    backend, path = _resolve(uri)
    local = Path(local_path)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as out:
            backend.read_into(path, out)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike, workers: int = 8) -> list[str]:
    """Copy a local folder tree under ``uri`` (relative paths kept); returns the URIs written, sorted.

    HDFS uploads run ``workers`` at a time: each file costs a few round trips and
    Hadoop 2.7's close-wait (~0.4 s), which is latency, not bandwidth.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    makedirs(uri)
    pairs = [
        (local, join(uri, *local.relative_to(root).parts))
        for local in sorted(p for p in root.rglob("*") if p.is_file())
    ]
    _run_parallel(upload_file, pairs, workers if is_remote(uri) else 1)
    return [target for _local, target in pairs]


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike, workers: int = 8) -> list[Path]:
    """Copy every file under ``uri`` into ``local_dir`` (relative paths kept); returns the local paths, sorted."""
    root = Path(local_dir)
    root.mkdir(parents=True, exist_ok=True)
    pairs = [
        (info.uri, root.joinpath(*_relative(uri, info.uri).split("/"))) for info in list_files(uri, recursive=True)
    ]
    _run_parallel(download_file, pairs, workers if is_remote(uri) else 1)
    return [target for _uri, target in pairs]


def _relative(base: str | os.PathLike, uri: str) -> str:
    """``uri``'s path below ``base`` (its name when ``base`` is the file itself)."""
    if is_remote(base):
        base_path, path = _clean_path(_split(os.fspath(base)).path), _clean_path(_split(uri).path)
    else:
        base_path, path = str(to_local_path(base).resolve()), str(to_local_path(uri).resolve())
    relative = posixpath.relpath(path, base_path)
    return posixpath.basename(path) if relative == "." else relative


def _run_parallel(func, pairs: list[tuple], workers: int) -> None:
    if workers <= 1 or len(pairs) <= 1:
        for args in pairs:
            func(*args)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(func, *args) for args in pairs]:
            future.result()  # re-raises the first failure


def exists(uri: str | os.PathLike) -> bool:
    backend, path = _resolve(uri)
    return backend.exists(path)


def makedirs(uri: str | os.PathLike) -> None:
    backend, path = _resolve(uri)
    backend.makedirs(path)


def delete(uri: str | os.PathLike, recursive: bool = False) -> bool:
    """Remove a file, or a folder (non-empty only with ``recursive``); False when nothing was there."""
    backend, path = _resolve(uri)
    return backend.delete(path, recursive)


def rename(src_uri: str | os.PathLike, dst_uri: str | os.PathLike) -> None:
    """Move a file or folder within one filesystem; ``dst_uri`` must not exist (parents are created).

    FileExistsError when it does, also when it appears at the last moment (on HDFS one NameNode rename that
    refuses an existing destination; locally ``rename(2)``, which refuses a non-empty folder)."""
    src_backend, src = _resolve(src_uri)
    dst_backend, dst = _resolve(dst_uri)
    if src_backend.key != dst_backend.key:
        raise ValueError(f"cannot rename across filesystems: {src_uri} -> {dst_uri}")
    if not src_backend.exists(src):
        raise FileNotFoundError(f"{src_uri} does not exist")
    if dst_backend.exists(dst):
        raise FileExistsError(f"{dst_uri} already exists")
    src_backend.rename(src, dst)


def find_hdfs_dfs_command() -> list[str] | None:
    """The argv prefix of ``hdfs dfs``: the repo's ``scripts/hdfs`` (itself preferring a real Hadoop on PATH)
    when a Hadoop on PATH or the provisioned jars (``make hadoop``) can run it, else an ``hdfs`` on PATH;
    None when neither is usable."""
    on_path = shutil.which("hdfs")
    wrapper = paths.REPO_ROOT / "scripts" / "hdfs"
    if wrapper.exists() and (on_path or (paths.HADOOP_HOME / "classpath.txt").exists()):
        return [str(wrapper), "dfs"]
    return [on_path, "dfs"] if on_path else None


def hdfs_dfs_command() -> list[str]:
    """:func:`find_hdfs_dfs_command`, or FileNotFoundError saying what to install."""
    command = find_hdfs_dfs_command()
    if command is None:
        raise FileNotFoundError(
            "no usable `hdfs` command: no Hadoop install on PATH and scripts/hdfs has no "
            "provisioned Hadoop jars (`make hadoop`)"
        )
    return command


def _resolve(uri: str | os.PathLike):
    text = os.fspath(uri)
    scheme = _check_supported(text)
    if scheme in LOCAL_SCHEMES:
        return _LocalBackend(text), to_local_path(text)
    return HdfsFilesystem(f"hdfs://{_authority(text)}"), _clean_path(_split(text).path)
