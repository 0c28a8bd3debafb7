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

Creates and reads are WebHDFS's two steps: the NameNode redirects to a DataNode, which takes
or serves the bytes. When that DataNode refuses or drops the connection (it has just died and
the NameNode does not know yet), the NameNode is asked again for another one, up to
``hdfs.datanode_attempts`` times with a doubling pause from ``hdfs.datanode_backoff_s``; a
create's bytes are then sent again from the start (bytes, a local path reopened, a seekable file
sought back; a one-pass stream is never replayed), a read resumes at the offset it had reached.
A NameNode that does not answer is ``StorageUnavailable`` at once.

HDFS at the level of absolute paths (exclusive creates, rename without/with replace,
content summaries, the "is this the NameNode" check) is :class:`HdfsFilesystem`,
from :func:`hdfs_filesystem`; it is the one WebHDFS client of the project
(``hdfs_load`` builds on it), and :func:`hadoop_command_error` translates an
``hdfs dfs`` command's stderr into the same errors.
"""

from __future__ import annotations

import errno
import getpass
import io
import logging
import os
import posixpath
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlparse

from . import paths

_log = logging.getLogger(__name__)

DEFAULT_WEBHDFS_PORT = 9870
LOCAL_SCHEMES = ("", "file")
CHUNK = 4 * 1024 * 1024


class StorageError(OSError):
    """A storage operation failed for a reason other than not-found/exists/unavailable."""


class StorageUnavailable(StorageError):
    """The storage service (e.g. the HDFS NameNode's WebHDFS endpoint) cannot be reached, or cannot write now."""


class StoragePermissionError(StorageError, PermissionError):
    """The storage service refused the operation for this user (HDFS ``AccessControlException``)."""


# What a Hadoop client or daemon reports when it cannot reach another one, including a
# DataNode's WebHDFS that lost the NameNode mid-request
# ("Failed on local exception: java.net.SocketException: Connection reset").
_LOST_PEER_MARKERS = (
    "ConnectException",
    "UnknownHostException",
    "Connection refused",
    "Connection reset",
    "Failed on local exception",
    "EOFException",
    "NoRouteToHostException",
    "SocketTimeoutException",
)


def is_lost_connection(error: BaseException | str) -> bool:
    """True if an HdfsCLI ``HdfsError`` (or a Hadoop client's stderr) says a Hadoop daemon was unreachable."""
    text = error if isinstance(error, str) else f"{getattr(error, 'exception', '') or ''} {error}"
    return any(marker in text for marker in _LOST_PEER_MARKERS)


def _is_safe_mode(text: str) -> bool:
    return "SafeModeException" in text or "RetriableException" in text or "safe mode" in text.lower()


def _is_permission_denied(text: str) -> bool:
    return "AccessControlException" in text or "Permission denied" in text


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def hadoop_command_error(stderr: str, what: str, namenode_uri: str = "HDFS") -> StorageError:
    """The error a failed ``hdfs dfs`` command means, from its stderr (``what``: e.g. ``"hdfs dfs -put"``)."""
    lines = [line for line in stderr.splitlines() if line.strip() and " WARN " not in line]
    tail = "\n".join(lines[-5:])
    if is_lost_connection(stderr):
        return StorageUnavailable(f"{namenode_uri} is unreachable ({what}): {tail}")
    if _is_safe_mode(stderr):
        return StorageUnavailable(f"{namenode_uri} is not writable, it is in safe mode ({what}): {tail}")
    if _is_permission_denied(stderr):
        return StoragePermissionError(f"permission denied on {namenode_uri} ({what}): {tail}")
    return StorageError(f"{what} failed: {tail}")


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri.rstrip("/"))


@dataclass(frozen=True)
class FolderEntry:
    """One entry of a folder, file or folder, with its modification time (seconds since the epoch)."""

    uri: str
    is_dir: bool
    modified: float

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri.rstrip("/"))


# --------------------------------------------------------------------------- URIs
def is_remote(uri: str | os.PathLike) -> bool:
    """True for anything that is not the local filesystem (hdfs://, s3a://, ...)."""
    return _scheme(uri) not in LOCAL_SCHEMES


def join(uri: str | os.PathLike, *parts: str) -> str:
    """``join("hdfs://nn:9000/data", "train", "x.jpeg")`` -> ``"hdfs://nn:9000/data/train/x.jpeg"``."""
    base = os.fspath(uri)
    cleaned = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if not cleaned:
        return base
    if not base:
        return "/".join(cleaned)
    return base.rstrip("/") + "/" + "/".join(cleaned)


def hadoop_uri(uri: str | os.PathLike) -> str:
    """The form Spark/Hadoop report paths in (e.g. binaryFile's ``path``): local -> ``file:/abs/path``.

    Use it to compare storage URIs with paths coming back from Spark.
    """
    text = os.fspath(uri)
    parts = _split(text)
    if parts.scheme in LOCAL_SCHEMES:
        return f"file:{to_local_path(text).resolve()}"
    return f"{parts.scheme}://{parts.netloc}{_clean_path(parts.path)}"


def to_local_path(uri: str | os.PathLike) -> Path:
    """The local path of a plain path or ``file://`` URI; ValueError for remote URIs."""
    text = os.fspath(uri)
    parts = _split(text)
    if parts.scheme == "":
        return Path(text)
    if parts.scheme != "file":
        raise ValueError(f"{text} is not a local path (scheme {parts.scheme}://)")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{text}: file:// URIs with a host are not supported")
    return Path(parts.path)


class _UriParts(NamedTuple):
    scheme: str
    netloc: str
    path: str


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?://([^/]*))?(.*)$", re.DOTALL)


def _split(text: str) -> _UriParts:
    """Hadoop-style URI split: ``scheme://authority/path`` or ``scheme:/path``; no query/fragment
    parsing, since ``?`` and ``#`` are legal in file names."""
    match = _URI.match(text)
    if not match:
        return _UriParts("", "", text)
    return _UriParts(match.group(1).lower(), match.group(2) or "", match.group(3) or "/")


def _clean_path(path: str) -> str:
    return posixpath.normpath("/" + path.lstrip("/"))


def _scheme(uri: str | os.PathLike) -> str:
    return _split(os.fspath(uri)).scheme


def _check_supported(uri: str) -> str:
    scheme = _scheme(uri)
    if scheme not in LOCAL_SCHEMES + ("hdfs",):
        raise ValueError(f"{uri}: storage handles plain paths, file:// and hdfs:// (Spark reads {scheme}:// directly)")
    return scheme


# ------------------------------------------------------------------- public API
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


# ----------------------------------------------------------- WebHDFS endpoints
_registered_webhdfs: dict[str, str] = {}
_active_config: dict[str, Any] | None = None


def register_webhdfs(namenode_uri: str, webhdfs_url: str) -> None:
    """Tell storage which WebHDFS URL serves ``namenode_uri`` (e.g. a second local HDFS on other ports)."""
    _registered_webhdfs[_authority(namenode_uri)] = webhdfs_url.rstrip("/")


def configure(config: Mapping[str, Any] | None) -> None:
    """Use a job's loaded config (its ``hdfs`` section, with --set overrides) instead of conf/ defaults."""
    global _active_config
    _active_config = dict(config.get("hdfs") or {}) if config is not None else None


def _hdfs_config() -> dict[str, Any]:
    if _active_config is not None:
        return _active_config
    return _default_hdfs_config()


@lru_cache(maxsize=1)
def _default_hdfs_config() -> dict[str, Any]:
    from .config import ConfigError, load_config

    try:
        return dict(load_config().get("hdfs") or {})
    except (ConfigError, OSError):
        return {}


@dataclass(frozen=True)
class DatanodeRetry:
    """How often a WebHDFS create/read goes back to the NameNode when its DataNode fails: ``hdfs.datanode_*``."""

    attempts: int
    backoff_s: float

    @classmethod
    def from_config(cls, hdfs: Mapping[str, Any]) -> DatanodeRetry:
        defaults = _default_hdfs_config()
        try:
            found = {
                key: hdfs.get(f"datanode_{key}", defaults.get(f"datanode_{key}")) for key in ("attempts", "backoff_s")
            }
            retry = cls(int(found["attempts"]), float(found["backoff_s"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "hdfs.datanode_attempts and hdfs.datanode_backoff_s must be numbers "
                f"(conf/defaults.yaml sets them): {exc}"
            ) from exc
        if retry.attempts < 1 or retry.backoff_s < 0:
            raise ValueError(f"hdfs.datanode_attempts must be >= 1 and hdfs.datanode_backoff_s >= 0, not {retry}")
        return retry

    def pause(self, failed_attempt: int) -> float:
        return self.backoff_s * 2 ** (failed_attempt - 1)


def _authority(uri: str) -> str:
    netloc = _split(uri).netloc
    if netloc:
        return netloc.lower()
    default = _hdfs_config().get("namenode_uri") or "hdfs://127.0.0.1:9000"
    netloc = urlparse(default).netloc.lower()
    if not netloc:
        raise ValueError(f"{uri} has no NameNode host and the config's hdfs.namenode_uri ({default}) gives none")
    return netloc


def webhdfs_url_for(uri: str) -> str:
    authority = _authority(uri)
    if authority in _registered_webhdfs:
        return _registered_webhdfs[authority]
    if os.environ.get("CXR_WEBHDFS_URL"):
        return os.environ["CXR_WEBHDFS_URL"].rstrip("/")
    conf = _hdfs_config()
    conf_nn, conf_url = conf.get("namenode_uri"), conf.get("webhdfs_url")
    if conf_url and conf_nn and urlparse(conf_nn).netloc.lower() in (authority, ""):
        return str(conf_url).rstrip("/")
    host = authority.rsplit(":", 1)[0] if ":" in authority else authority
    return f"http://{host}:{DEFAULT_WEBHDFS_PORT}"


_thread_clients = threading.local()


def _client_for(webhdfs_url: str, user: str):
    """One HdfsCLI client per thread and (URL, user): a requests Session is not meant to be shared by threads."""
    clients = _thread_clients.__dict__.setdefault("by_key", {})
    client = clients.get((webhdfs_url, user))
    if client is None:
        from hdfs import InsecureClient

        # (connect, read) timeouts: a dead NameNode fails fast, a big read does not.
        client = clients[(webhdfs_url, user)] = InsecureClient(webhdfs_url, user=user, timeout=(5, 300))
    return client


def _hdfs_error(response):
    """HdfsCLI's error for a WebHDFS answer that is not a success (its RemoteException, when there is one)."""
    from hdfs.client import _to_error

    return _to_error(response)


def _check_answers(namenode_uri: str) -> None:
    """StorageUnavailable unless something accepts connections on the NameNode's RPC port."""
    parsed = urlparse(namenode_uri)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 8020
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise StorageUnavailable(
            f"the NameNode at {namenode_uri} does not answer ({exc.strerror or exc}): is HDFS running? "
            "(`make hdfs-up` starts the local one)"
        ) from exc


@lru_cache(maxsize=64)
def _check_serves(webhdfs_url: str, namenode_uri: str) -> None:
    """Refuse a WebHDFS URL whose NameNode listens on another RPC port than the URI names.

    Without this, ``hdfs://host:9001/x`` would silently use the NameNode of
    ``http://host:9870`` (the default guess), i.e. another filesystem. Skipped when
    the NameNode's /jmx cannot be read (then the real call reports the problem).
    """
    import json
    import urllib.request

    wanted_port = urlparse(namenode_uri).port
    if wanted_port is None:
        return
    try:
        url = f"{webhdfs_url}/jmx?qry=Hadoop:service=NameNode,name=NameNodeStatus"
        with urllib.request.urlopen(url, timeout=5) as response:
            beans = json.load(response).get("beans", [])
        served = beans[0]["HostAndPort"] if beans else None
    except (OSError, ValueError, KeyError):
        return
    if served and served.rsplit(":", 1)[-1] != str(wanted_port):
        _check_serves.cache_clear()  # do not remember the failure: the setup may get fixed
        raise StorageError(
            f"WebHDFS at {webhdfs_url} belongs to the NameNode at {served}, not {namenode_uri}: "
            "set hdfs.webhdfs_url (or CXR_WEBHDFS_URL) to that NameNode's HTTP address"
        )


class _DatanodeFailed(Exception):
    """The DataNode leg of a WebHDFS call failed in a way another DataNode may not: ``cause`` says how."""

    def __init__(self, cause: BaseException, before_sending: bool):
        super().__init__(str(cause))
        self.cause, self.before_sending = cause, before_sending


def _refused_before_sending(exc: BaseException) -> bool:
    """True when the connection itself failed (refused, unreachable, connect timeout): nothing reached the peer."""
    import requests
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))


@contextmanager
def _datanode_errors() -> Iterator[None]:
    """Turn a DataNode that refuses, drops the connection or reports a lost Hadoop peer into _DatanodeFailed."""
    import requests
    from hdfs.util import HdfsError

    try:
        yield
    except (
        requests.exceptions.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.Timeout,
    ) as exc:
        raise _DatanodeFailed(exc, _refused_before_sending(exc)) from exc
    except HdfsError as exc:
        if not is_lost_connection(exc):
            raise
        raise _DatanodeFailed(exc, before_sending=False) from exc


def _guarded(leg: Callable[[str], None]) -> Callable[[str], None]:
    def run(location: str) -> None:
        with _datanode_errors():
            leg(location)

    return run


class _Body:
    """A create's bytes, which a retry must send again from the start: bytes are resent, a local path
    reopened, a seekable file sought back to where it started; a one-pass stream cannot be resent."""

    def __init__(self, data):
        self.data, self.start, self.sent = data, None, False
        if isinstance(data, (bytes, bytearray, memoryview, str, os.PathLike)) or data is None:
            self.rereadable = True
        else:
            try:
                self.rereadable = bool(data.seekable())
                self.start = data.tell() if self.rereadable else None
            except (AttributeError, OSError, ValueError):
                self.rereadable = False

    @contextmanager
    def attempt(self):
        if isinstance(self.data, os.PathLike):
            with open(self.data, "rb") as stream:
                yield stream
            return
        if self.sent and self.start is not None:
            self.data.seek(self.start)
        self.sent = True
        yield self.data


# ------------------------------------------------------------------- backends
def _resolve(uri: str | os.PathLike):
    text = os.fspath(uri)
    scheme = _check_supported(text)
    if scheme in LOCAL_SCHEMES:
        return _LocalBackend(text), to_local_path(text)
    return HdfsFilesystem(f"hdfs://{_authority(text)}"), _clean_path(_split(text).path)


class _LocalBackend:
    def __init__(self, example_uri: str):
        # Answer in the form asked: "file:///x" (RFC) or "file:/x" (Hadoop/Spark's own).
        text = os.fspath(example_uri)
        self.prefix = None if _scheme(text) != "file" else ("file://" if text.startswith("file://") else "file:")
        self.key = "local"

    def _uri(self, path: Path) -> str:
        return f"{self.prefix}{path.resolve()}" if self.prefix else str(path)

    def list_files(self, path: Path, recursive: bool) -> list[FileInfo]:
        if path.is_file():
            return [FileInfo(self._uri(path), path.stat().st_size)]
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist")
        found = path.rglob("*") if recursive else path.iterdir()
        return [FileInfo(self._uri(p), p.stat().st_size) for p in found if p.is_file()]

    def list_folder(self, path: Path) -> list[FolderEntry]:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder")
        entries = []
        for child in path.iterdir():
            try:
                stat = child.lstat()
            except FileNotFoundError:  # removed since the listing
                continue
            entries.append(FolderEntry(self._uri(child), child.is_dir() and not child.is_symlink(), stat.st_mtime))
        return entries

    def read_bytes(self, path: Path) -> bytes:
        return path.read_bytes()

    def read_into(self, path: Path, out) -> None:
        with open(path, "rb") as src:
            shutil.copyfileobj(src, out, CHUNK)

    def _atomic(self, path: Path, fill) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            fill(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, path: Path, data: bytes) -> None:
        self._atomic(path, lambda tmp: tmp.write_bytes(data))

    def upload_file(self, local: Path, path: Path) -> None:
        self._atomic(path, lambda tmp: shutil.copyfile(local, tmp))

    def exists(self, path: Path) -> bool:
        return path.exists()

    def makedirs(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def delete(self, path: Path, recursive: bool) -> bool:
        if not path.exists() and not path.is_symlink():
            return False
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path) if recursive else path.rmdir()
        else:
            path.unlink()
        return True

    def rename(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # a folder appeared at dst since the caller's check
                raise FileExistsError(f"{dst} already exists") from exc
            raise


def hdfs_filesystem(uri: str, webhdfs_url: str | None = None, user: str | None = None) -> HdfsFilesystem:
    """The HDFS that serves ``uri`` (``hdfs://host:port[/...]``), for work on absolute paths.

    ``webhdfs_url`` and ``user`` default to what the URI functions use (see the module docstring)."""
    if _scheme(uri) != "hdfs":
        raise ValueError(f"{uri} is not an hdfs:// URI")
    return HdfsFilesystem(f"hdfs://{_authority(uri)}", webhdfs_url, user)


class HdfsFilesystem:
    """One NameNode through WebHDFS; every call translates HdfsCLI/requests errors into OSError subclasses.

    Paths are absolute HDFS paths (``/data/x``); :meth:`uri` turns one into an ``hdfs://`` URI.
    """

    def __init__(self, namenode_uri: str, webhdfs_url: str | None = None, user: str | None = None):
        self.namenode_uri = namenode_uri
        self.key = namenode_uri
        self.webhdfs_url = (webhdfs_url or webhdfs_url_for(namenode_uri)).rstrip("/")
        self.user = user or _hdfs_config().get("user") or os.environ.get("HADOOP_USER_NAME") or getpass.getuser()
        _check_serves(self.webhdfs_url, namenode_uri)

    @property
    def client(self):
        return _client_for(self.webhdfs_url, self.user)

    def uri(self, path: str) -> str:
        return f"{self.namenode_uri}{path}"

    def check_namenode(self) -> None:
        """Is this the NameNode? StorageUnavailable when its RPC port does not answer; StorageError when
        the WebHDFS URL belongs to another NameNode (calls would reach another filesystem)."""
        _check_answers(self.namenode_uri)
        _check_serves(self.webhdfs_url, self.namenode_uri)

    def _call(self, what: str, path: str, func, *args, **kwargs):
        """Run one WebHDFS call, translating HdfsCLI/requests errors into OSError subclasses."""
        import requests
        from hdfs.util import HdfsError

        try:
            return func(*args, **kwargs)
        except requests.exceptions.RequestException as exc:  # refused, reset, timed out, or a reply cut short
            raise StorageUnavailable(
                f"HDFS is unreachable: no answer from WebHDFS at {self.webhdfs_url} ({what} {self.uri(path)}): "
                "is HDFS running? "
                f"try `make hdfs-up` (or set hdfs.webhdfs_url / CXR_WEBHDFS_URL); cause: {exc.__class__.__name__}"
            ) from exc
        except HdfsError as exc:
            raise self._translate(exc, f"{what} {self.uri(path)}") from exc

    @staticmethod
    def _translate(exc, message: str) -> OSError:
        kind = getattr(exc, "exception", None) or ""
        text = f"{kind} {exc}"
        message = f"{message}: {_short(str(exc))}"
        if kind == "FileNotFoundException" or "does not exist" in str(exc):
            return FileNotFoundError(message)
        if kind == "FileAlreadyExistsException":
            return FileExistsError(message)
        if _is_permission_denied(text):
            return StoragePermissionError(f"permission denied: {message}")
        if _is_safe_mode(text):
            return StorageUnavailable(f"HDFS is not writable now, the NameNode is in safe mode: {message}")
        if is_lost_connection(exc):
            return StorageUnavailable(
                f"HDFS became unreachable: {message}; is the NameNode up? " "(`make hdfs-status`)"
            )
        return StorageError(message)

    def status(self, path: str) -> dict | None:
        """WebHDFS FileStatus (``type``, ``length``, ...), or None when nothing is there."""
        return self._call("stat", path, self.client.status, path, strict=False)

    def list_status(self, path: str) -> list[tuple[str, dict]]:
        """``[(name, FileStatus)]`` of a folder's entries."""
        return self._call("list", path, self.client.list, path, status=True)

    def content_summary(self, path: str) -> dict | None:
        """WebHDFS ContentSummary (``fileCount``, ``length``, ...), or None when nothing is there."""
        return self._call("summarize", path, self.client.content, path, strict=False)

    def list_folder(self, path: str) -> list[FolderEntry]:
        return [
            FolderEntry(self.uri(posixpath.join(path, name)), st["type"] == "DIRECTORY", st["modificationTime"] / 1000)
            for name, st in self.list_status(path)
        ]

    def list_files(self, path: str, recursive: bool) -> list[FileInfo]:
        status = self.status(path)
        if status is None:
            raise FileNotFoundError(f"{self.uri(path)} does not exist")
        if status["type"] == "FILE":
            return [FileInfo(self.uri(path), int(status["length"]))]
        if not recursive:
            return [
                FileInfo(self.uri(posixpath.join(path, name)), int(st["length"]))
                for name, st in self.list_status(path)
                if st["type"] == "FILE"
            ]
        found = []
        walk = self._call("walk", path, lambda: list(self.client.walk(path, status=True)))
        for (folder, _status), _dirs, files in walk:
            found.extend(FileInfo(self.uri(posixpath.join(folder, name)), int(st["length"])) for name, st in files)
        return found

    def read_bytes(self, path: str) -> bytes:
        buffer = io.BytesIO()
        self.read_into(path, buffer)
        return buffer.getvalue()

    def read_into(self, path: str, out) -> None:
        """Stream the file into ``out``: anything with ``write`` (a file) or ``update`` (a hashlib hash).

        When the DataNode fails mid-file, the read goes on from the bytes already delivered (WebHDFS
        ``offset``) at the DataNode the NameNode names next: ``out`` gets every byte exactly once."""
        write = out.write if hasattr(out, "write") else out.update
        received = 0

        def copy(location: str) -> None:
            nonlocal received
            response = self.client._request("GET", url=location, stream=True)
            try:
                if not response:
                    raise _hdfs_error(response)
                for chunk in response.iter_content(chunk_size=CHUNK):
                    write(chunk)
                    received += len(chunk)
            finally:
                response.close()

        self._via_datanode(
            "read", path, "GET", "OPEN", lambda: {"offset": received}, copy, may_resend=lambda failure: True
        )

    def create(self, path: str, data, overwrite: bool = False) -> None:
        """One WebHDFS CREATE (not atomic: use :meth:`write_bytes` for that). Without ``overwrite`` the
        NameNode refuses an existing file (FileExistsError), so the first of two creators wins.

        ``data``: bytes, a local path (opened here), or a file. A DataNode that fails is retried (see the
        module docstring) when the bytes can be sent again from the start; with ``overwrite`` the retry
        replaces any partial file, without it only a DataNode that refused the connection (nothing
        created) is retried, since an exclusive create cannot tell its own partial file from another's."""
        body = _Body(data)

        def send(location: str) -> None:
            with body.attempt() as payload:
                response = self.client._request("PUT", url=location, data=payload)
            if not response:
                raise _hdfs_error(response)

        def may_resend(failure: _DatanodeFailed) -> bool:
            if not body.rereadable:
                raise StorageError(
                    f"create {self.uri(path)}: the DataNode failed ({_short(str(failure.cause), 200)}) and the data "
                    "was a one-pass stream, which cannot be sent again: pass bytes, a local path or a seekable file"
                ) from failure.cause
            return overwrite or failure.before_sending

        self._via_datanode(
            "create", path, "PUT", "CREATE", lambda: {"overwrite": str(overwrite).lower()}, send, may_resend
        )

    def _namenode_redirect(self, method: str, path: str, op: str, params: Mapping[str, Any]) -> str:
        """The NameNode's half of a two-step WebHDFS call: the DataNode URL it redirects ``op`` to."""
        url = f"{self.webhdfs_url}/webhdfs/v1{quote(self.client.resolve(path), '/= ')}"
        response = self.client._request(method, url=url, params={"op": op, **params}, allow_redirects=False)
        if not response.ok:
            raise _hdfs_error(response)
        location = response.headers.get("location")
        if not location:
            raise StorageError(
                f"WebHDFS at {self.webhdfs_url} answered {op} {self.uri(path)} with status "
                f"{response.status_code} and no redirect to a DataNode"
            )
        return location

    def _via_datanode(
        self,
        what: str,
        path: str,
        method: str,
        op: str,
        params: Callable[[], Mapping[str, Any]],
        leg: Callable[[str], None],
        may_resend: Callable[[_DatanodeFailed], bool],
    ) -> None:
        """Ask the NameNode where to go, run ``leg(location)`` there; when the DataNode fails (_datanode_errors)
        and ``may_resend(failure)``, ask the NameNode again (see DatanodeRetry). Errors are translated as in
        :meth:`_call`; a NameNode that does not answer fails at once."""
        retry = DatanodeRetry.from_config(_hdfs_config())
        tried: list[str] = []
        for attempt in range(1, retry.attempts + 1):
            location = self._call(what, path, self._namenode_redirect, method, path, op, params())
            tried.append(urlparse(location).netloc)
            try:
                return self._call(what, path, _guarded(leg), location)
            except _DatanodeFailed as failure:
                if not may_resend(failure):
                    raise StorageError(
                        f"{what} {self.uri(path)}: the DataNode at {tried[-1]} failed after it had taken part of an "
                        f"exclusive create ({_short(str(failure.cause), 200)}); not retried, since a partial file "
                        "may be there: delete it and run again"
                    ) from failure.cause
                if attempt == retry.attempts:
                    raise StorageUnavailable(
                        f"{what} {self.uri(path)}: the DataNodes the NameNode sent it to ({', '.join(tried)}) refused "
                        f"or dropped the connection {retry.attempts} times (hdfs.datanode_attempts): are DataNodes "
                        f"down (`make hdfs-status`)? last: {_short(str(failure.cause), 200)}"
                    ) from failure.cause
                _log.info(
                    "%s %s: the DataNode at %s failed (%s); asking the NameNode again in %.2f s " "(attempt %d of %d)",
                    what,
                    self.uri(path),
                    tried[-1],
                    type(failure.cause).__name__,
                    retry.pause(attempt),
                    attempt + 1,
                    retry.attempts,
                )
                time.sleep(retry.pause(attempt))

    def rename_to(self, src: str, dst: str, replace: bool = False) -> None:
        """One NameNode rename: FileExistsError when ``dst`` exists, unless ``replace`` (then readers see the
        old file or the new one, never neither). Unlike :meth:`rename`, never moves ``src`` into a folder."""
        self._call(
            "rename", src, self.client._rename, src, destination=dst, renameoptions="OVERWRITE" if replace else "NONE"
        )

    def _atomic(self, path: str, data) -> None:
        if path == "/":
            raise IsADirectoryError("cannot write to /")
        folder, name = posixpath.split(path)
        tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self.create(tmp, data, overwrite=True)
            self.rename_to(tmp, path, replace=True)
        except BaseException:
            self._call("cleanup", tmp, self.client.delete, tmp)
            raise

    def write_bytes(self, path: str, data: bytes) -> None:
        self._atomic(path, data)

    def upload_file(self, local: Path, path: str) -> None:
        self._atomic(path, Path(local))  # a path, not an open stream: a retry reopens it

    def exists(self, path: str) -> bool:
        return self.status(path) is not None

    def makedirs(self, path: str) -> None:
        status = self.status(path)
        if status is not None and status["type"] != "DIRECTORY":
            raise FileExistsError(f"{self.uri(path)} exists and is a file")
        self._call("mkdir", path, self.client.makedirs, path)

    def delete(self, path: str, recursive: bool = False) -> bool:
        if path == "/":
            raise PermissionError("refusing to delete the HDFS root")
        return bool(self._call("delete", path, self.client.delete, path, recursive=recursive))

    def rename(self, src: str, dst: str) -> None:
        """Like :meth:`rename_to` without replace (a folder at ``dst`` is refused, never moved into); parents are
        created."""
        self.makedirs(posixpath.dirname(dst) or "/")
        self.rename_to(src, dst)

    def file_checksum(self, path: str) -> dict:
        """HDFS's own checksum of a file (WebHDFS GETFILECHECKSUM: ``algorithm``, ``bytes`` in hex, ``length``).
        A DataNode computes it from the CRCs stored beside each block: the data itself is not read. A DataNode
        that fails is replaced by the next one the NameNode names, as for a read."""
        answer: dict = {}

        def ask(location: str) -> None:
            response = self.client._request("GET", url=location)
            if not response:
                raise _hdfs_error(response)
            answer.update(response.json()["FileChecksum"])

        self._via_datanode("checksum", path, "GET", "GETFILECHECKSUM", dict, ask, may_resend=lambda failure: True)
        return answer

    def set_modification_time(self, path: str, epoch_ms: int) -> None:
        self._call("set times of", path, self.client.set_times, path, modification_time=int(epoch_ms))

    def _namenode_call(self, method: str, path: str, params: Mapping[str, Any]):
        url = f"{self.webhdfs_url}/webhdfs/v1{quote(self.client.resolve(path), '/= ')}"
        response = self.client._request(method, url=url, params=params)
        if not response:
            raise _hdfs_error(response)
        return response

    def get_xattr(self, path: str, name: str) -> bytes | None:
        """The value of the extended attribute ``name`` (``user.x``), or None when the file has none."""
        answer = self._call(
            "read attributes of", path, self._namenode_call, "GET", path, {"op": "GETXATTRS", "encoding": "hex"}
        ).json()
        for xattr in answer.get("XAttrs", []):
            if xattr.get("name") == name:
                value = xattr.get("value") or "0x"
                return bytes.fromhex(value[2:] if value.startswith("0x") else value)
        return None

    def set_xattr(self, path: str, name: str, value: bytes) -> None:
        """Set an extended attribute; it stays with the file through renames and goes when the file is replaced."""
        params = {"op": "SETXATTR", "xattr.name": name, "xattr.value": "0x" + value.hex(), "flag": "CREATE,REPLACE"}
        self._call("set an attribute of", path, self._namenode_call, "PUT", path, params)
