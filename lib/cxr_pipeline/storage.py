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

HDFS at the level of absolute paths (exclusive creates, rename without/with replace,
content summaries, the "is this the NameNode" check) is :class:`HdfsFilesystem`,
from :func:`hdfs_filesystem`; it is the one WebHDFS client of the project
(``hdfs_load`` builds on it), and :func:`hadoop_command_error` translates an
``hdfs dfs`` command's stderr into the same errors.
"""
from __future__ import annotations

import getpass
import os
import posixpath
import re
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping
from typing import NamedTuple
from urllib.parse import urlparse

from . import paths

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
_LOST_PEER_MARKERS = ("ConnectException", "UnknownHostException", "Connection refused", "Connection reset",
                      "Failed on local exception", "EOFException", "NoRouteToHostException",
                      "SocketTimeoutException")


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
    pairs = [(local, join(uri, *local.relative_to(root).parts))
             for local in sorted(p for p in root.rglob("*") if p.is_file())]
    _run_parallel(upload_file, pairs, workers if is_remote(uri) else 1)
    return [target for _local, target in pairs]


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike, workers: int = 8) -> list[Path]:
    """Copy every file under ``uri`` into ``local_dir`` (relative paths kept); returns the local paths, sorted."""
    root = Path(local_dir)
    root.mkdir(parents=True, exist_ok=True)
    pairs = [(info.uri, root.joinpath(*_relative(uri, info.uri).split("/"))) for info in list_files(uri, recursive=True)]
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
    """Move a file or folder within one filesystem; ``dst_uri`` must not exist (parents are created)."""
    src_backend, src = _resolve(src_uri)
    dst_backend, dst = _resolve(dst_uri)
    if src_backend.key != dst_backend.key:
        raise ValueError(f"cannot rename across filesystems: {src_uri} -> {dst_uri}")
    if not src_backend.exists(src):
        raise FileNotFoundError(f"{src_uri} does not exist")
    if dst_backend.exists(dst):
        raise FileExistsError(f"{dst_uri} already exists")
    src_backend.rename(src, dst)


def hdfs_dfs_command() -> list[str]:
    """The argv prefix of ``hdfs dfs`` (the project's scripts/hdfs, else a Hadoop install's)."""
    script = paths.REPO_ROOT / "scripts" / "hdfs"
    if script.exists():
        return [str(script), "dfs"]
    real = shutil.which("hdfs")
    if real:
        return [real, "dfs"]
    raise FileNotFoundError("no `hdfs` command: neither scripts/hdfs in the repo nor a Hadoop install on PATH")


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


def _check_answers(namenode_uri: str) -> None:
    """StorageUnavailable unless something accepts connections on the NameNode's RPC port."""
    parsed = urlparse(namenode_uri)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 8020
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise StorageUnavailable(
            f"the NameNode at {namenode_uri} does not answer ({exc.strerror or exc}): is HDFS running? "
            "(`make hdfs-up` starts the local one)") from exc


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
        os.rename(src, dst)


def hdfs_filesystem(uri: str, webhdfs_url: str | None = None, user: str | None = None) -> "HdfsFilesystem":
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
            return StorageUnavailable(f"HDFS became unreachable: {message}; is the NameNode up? "
                                      "(`make hdfs-status`)")
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

    def list_files(self, path: str, recursive: bool) -> list[FileInfo]:
        status = self.status(path)
        if status is None:
            raise FileNotFoundError(f"{self.uri(path)} does not exist")
        if status["type"] == "FILE":
            return [FileInfo(self.uri(path), int(status["length"]))]
        if not recursive:
            return [FileInfo(self.uri(posixpath.join(path, name)), int(st["length"]))
                    for name, st in self.list_status(path) if st["type"] == "FILE"]
        found = []
        walk = self._call("walk", path, lambda: list(self.client.walk(path, status=True)))
        for (folder, _status), _dirs, files in walk:
            found.extend(FileInfo(self.uri(posixpath.join(folder, name)), int(st["length"])) for name, st in files)
        return found

    def read_bytes(self, path: str) -> bytes:
        def read() -> bytes:
            with self.client.read(path) as reader:
                return reader.read()

        return self._call("read", path, read)

    def read_into(self, path: str, out) -> None:
        """Stream the file into ``out``: anything with ``write`` (a file) or ``update`` (a hashlib hash)."""
        def copy() -> None:
            write = out.write if hasattr(out, "write") else out.update
            with self.client.read(path, chunk_size=CHUNK) as chunks:
                for chunk in chunks:
                    write(chunk)

        self._call("read", path, copy)

    def create(self, path: str, data, overwrite: bool = False) -> None:
        """One WebHDFS CREATE (not atomic: use :meth:`write_bytes` for that). Without ``overwrite`` the
        NameNode refuses an existing file (FileExistsError), so the first of two creators wins."""
        self._call("create", path, self.client.write, path, data=data, overwrite=overwrite)

    def rename_to(self, src: str, dst: str, replace: bool = False) -> None:
        """One NameNode rename: FileExistsError when ``dst`` exists, unless ``replace`` (then readers see the
        old file or the new one, never neither). Unlike :meth:`rename`, never moves ``src`` into a folder."""
        self._call("rename", src, self.client._rename, src, destination=dst,
                   renameoptions="OVERWRITE" if replace else "NONE")

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
        with open(local, "rb") as stream:
            self._atomic(path, stream)

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
        self.makedirs(posixpath.dirname(dst) or "/")
        self._call("rename", src, self.client.rename, src, dst)
