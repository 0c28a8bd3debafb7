"""HDFS through WebHDFS (HdfsCLI): :class:`HdfsFilesystem`, the project's one WebHDFS client.

Creates and reads are WebHDFS's two steps: the NameNode redirects to a DataNode, which takes
or serves the bytes. When that DataNode refuses or drops the connection (it has just died and
the NameNode does not know yet), the NameNode is asked again for another one, up to
``hdfs.datanode_attempts`` times with a doubling pause from ``hdfs.datanode_backoff_s``; a
create's bytes are then sent again from the start (bytes, a local path reopened, a seekable file
sought back; a one-pass stream is never replayed), a read resumes at the offset it had reached.
A NameNode that does not answer is ``StorageUnavailable`` at once.
"""

from __future__ import annotations

import getpass
import io
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from .endpoints import DatanodeRetry, _authority, hdfs_settings, webhdfs_url_for
from .entries import CHUNK, FileInfo, FolderEntry
from .errors import (
    StorageError,
    StoragePermissionError,
    StorageUnavailable,
    _is_permission_denied,
    _is_safe_mode,
    _short,
    is_lost_connection,
)
from .uris import _scheme

_log = logging.getLogger("cxr_pipeline.infra.storage")

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
        self.user = user or hdfs_settings().user or os.environ.get("HADOOP_USER_NAME") or getpass.getuser()
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
        retry = DatanodeRetry.from_settings(hdfs_settings())
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
