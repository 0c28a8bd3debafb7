"""The target folder on HDFS, through ``storage.HdfsFilesystem``: listing, staging, lock, manifest, marks."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .. import storage
from .checksum import HdfsChecksum
from .lock import Owner, break_refused_message, holder_alive, locked_message
from .scan import LocalFile
from .shared import (
    CLOCK_PROBE_PREFIX,
    LOCK_NAME,
    MANIFEST_NAME,
    MARK_XATTR,
    OWN_PREFIX,
    READ_CHUNK,
    STAGING_MARKER,
    STAGING_PREFIX,
    WRITTEN_BY,
    SourceError,
    TargetLocked,
)


@dataclass(frozen=True)
class HdfsAddress:
    """``hdfs://host:port/path`` split into the NameNode, its WebHDFS URL and the path."""

    namenode_uri: str
    webhdfs_url: str
    path: str

    def uri(self, *parts: str) -> str:
        return self.namenode_uri + posixpath.join(self.path, *parts)


def resolve_target(target: str, default_namenode: str | None = None, webhdfs_url: str | None = None) -> HdfsAddress:
    """Where ``target`` lives. An absolute path is on ``default_namenode`` (None: storage's ``hdfs.namenode_uri``);
    the WebHDFS URL, unless given, is the one ``storage`` would use."""
    parsed = urlsplit(target)
    if not parsed.scheme and target.startswith("/"):
        namenode = (default_namenode or storage.hdfs_settings().namenode_uri).rstrip("/")
        path = target
    elif parsed.scheme == "hdfs" and parsed.netloc:
        namenode = f"hdfs://{parsed.netloc}"
        path = parsed.path or "/"
    else:
        raise SourceError(f"target {target!r} must be an hdfs://host:port/path URI (or an absolute HDFS path)")
    path = posixpath.normpath(path)
    if path == "/":
        raise SourceError("refusing to load into the HDFS root: give a folder such as /data/chest_xray")
    return HdfsAddress(namenode, (webhdfs_url or storage.webhdfs_url_for(namenode)).rstrip("/"), path)


class _SentBytes:
    """The first ``length`` bytes of an open file as a request body (Content-Length, read in blocks),
    hashed as they are read: the MD5 of exactly what was sent. Seekable back to its start, so that storage
    can send it again to another DataNode (and the hash then covers the bytes of the attempt that landed)."""

    def __init__(self, handle, length: int, name: str):
        self.handle, self.length, self.name = handle, length, name
        self.origin = handle.tell()
        self.seek(0)

    def __len__(self) -> int:
        return self.length

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.length - self.remaining

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if (offset, whence) != (0, os.SEEK_SET):
            raise io.UnsupportedOperation("an upload body only seeks back to its start")
        self.handle.seek(self.origin)
        self.remaining, self.md5 = self.length, hashlib.md5(usedforsecurity=False)
        return 0

    def __iter__(self):
        return iter(lambda: self.read(READ_CHUNK), b"")

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        chunk = self.handle.read(self.remaining if size is None or size < 0 else min(size, self.remaining))
        if not chunk:  # the file shrank: end the request rather than leave HDFS waiting for the promised bytes
            raise SourceError(
                f"{self.name} got shorter while it was being uploaded; nothing partial is visible, "
                "run again to upload it"
            )
        self.remaining -= len(chunk)
        self.md5.update(chunk)
        return chunk


class _CountingMd5:
    def __init__(self):
        self.size, self.md5 = 0, hashlib.md5(usedforsecurity=False)

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.md5.update(chunk)


class RemoteTree:
    """The target folder, through storage's HDFS layer; ``rel`` paths are relative to the target."""

    def __init__(self, address: HdfsAddress, user: str | None = None):
        self.address = address
        self.fs = storage.HdfsFilesystem(address.namenode_uri, address.webhdfs_url, user)
        self.user = self.fs.user

    def path(self, *parts: str) -> str:
        return posixpath.normpath(posixpath.join(self.address.path, *parts))

    def probe(self) -> bool:
        """True if the target exists (a folder). StorageUnavailable when the NameNode does not answer;
        StorageError when the WebHDFS URL belongs to another NameNode (it would load elsewhere)."""
        self.fs.check_namenode()
        status = self.fs.status(self.address.path)
        if status is not None and status["type"] != "DIRECTORY":
            raise SourceError(f"target {self.address.uri()} exists and is a file, not a folder")
        return status is not None

    def list_tree(self) -> tuple[dict[str, int], list[str], bool]:
        """``({rel: size} of files, [top-level staging folder names], manifest present)``; the loader's
        own top-level entries (staging folders, manifest, lock, clock probes) are not part of the tree."""
        sizes: dict[str, int] = {}
        staging: list[str] = []
        has_manifest = False

        def walk(rel_dir: str) -> None:
            nonlocal has_manifest
            for name, status in self.fs.list_status(self.path(rel_dir)):
                rel = posixpath.join(rel_dir, name) if rel_dir else name
                is_dir = status["type"] == "DIRECTORY"
                if not rel_dir and is_dir and name.startswith(STAGING_PREFIX):
                    staging.append(name)
                elif not rel_dir and name.startswith(OWN_PREFIX):
                    has_manifest = has_manifest or name == MANIFEST_NAME
                elif is_dir:
                    walk(rel)
                else:
                    sizes[rel] = int(status["length"])

        walk("")
        return sizes, staging, has_manifest

    def read_owner(self, rel: str) -> Owner | None:
        """The loader named in a lock or staging marker; None when absent or unreadable."""
        try:
            return Owner.from_json(self.fs.read_bytes(self.path(rel)))
        except FileNotFoundError:
            return None

    def acquire_lock(self, owner: Owner, break_lock: bool, lease_s: float) -> tuple[Owner | None, int]:
        """Create the target's lock without overwrite (the NameNode lets one creator win); TargetLocked when
        another load holds it, unless ``break_lock`` and its holder is gone (``holder_alive``). Returns the
        holder whose lock was broken, if any, and the NameNode's clock minus this host's (ms)."""
        lock, broken = self.path(LOCK_NAME), None
        lock_uri = self.address.uri(LOCK_NAME)
        self.fs.makedirs(self.address.path)
        for _attempt in range(3):
            try:
                self.fs.create(lock, owner.to_json(), overwrite=False)
                local_ms = time.time() * 1000
                return broken, int(self.fs.status(lock)["modificationTime"] - local_ms)
            except FileExistsError:
                status, holder = self.fs.status(lock), self.read_owner(LOCK_NAME)
                if status is None:
                    continue  # released meanwhile
                if not break_lock:
                    raise TargetLocked(locked_message(lock_uri, holder)) from None
                lease_age_s = functools.partial(self.seconds_since, status["modificationTime"])
                alive, why = holder_alive(holder, lease_age_s, lease_s)
                if alive:
                    raise TargetLocked(break_refused_message(lock_uri, holder, why)) from None
                current = self.fs.status(lock)
                if current is not None and current["fileId"] == status["fileId"]:  # still the lock judged
                    self.fs.delete(lock)
                    broken = holder or Owner("unreadable", "?", 0, "?", "?")
        raise TargetLocked(f"could not take {lock_uri}: other loads keep taking it")

    def seconds_since(self, epoch_ms: int) -> float:
        """Seconds from ``epoch_ms`` (a time the NameNode stamped) to now by the NameNode's clock."""
        return (self.namenode_now_ms() - epoch_ms) / 1000

    def namenode_now_ms(self) -> int:
        """The NameNode's clock, which stamps lock renewals: the modification time of an empty file made for it."""
        probe = self.path(CLOCK_PROBE_PREFIX + uuid.uuid4().hex[:8])
        try:
            self.fs.create(probe, b"", overwrite=False)
            return int(self.fs.status(probe)["modificationTime"])
        finally:
            self.fs.delete(probe)

    def release_lock(self, owner: Owner) -> None:
        """Remove the lock if it is still this load's; best effort (HDFS may be gone: --break-lock then)."""
        try:
            holder = self.read_owner(LOCK_NAME)
            if holder is not None and holder.run_id == owner.run_id:
                self.fs.delete(self.path(LOCK_NAME))
        except OSError:
            pass

    def open_staging(self, owner: Owner) -> str:
        """A new staging folder, born with its marker (so no unmarked staging folder of ours can exist)."""
        name = STAGING_PREFIX + owner.run_id
        self.fs.create(self.path(name, STAGING_MARKER), owner.to_json(), overwrite=False)
        return name

    def sort_staging(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """``(stale, left alone)``: a staging folder is stale when it carries this tool's marker and its
        loader is not running (on another host that cannot be told, and the lock held now says it is not
        loading). Folders without the marker are not this tool's and are never touched."""
        stale, alone = [], []
        for name in names:
            owner = self.read_owner(posixpath.join(name, STAGING_MARKER))
            (stale if owner is not None and owner.running() is not True else alone).append(name)
        return stale, alone

    def read_manifest(self) -> dict[str, dict[str, object]]:
        raw = self.fs.read_bytes(self.path(MANIFEST_NAME))
        try:
            files = json.loads(raw).get("files", {})
        except (ValueError, AttributeError):
            return {}  # unreadable manifest: fall back to size-only comparison
        return {rel: rec for rel, rec in files.items() if isinstance(rec, dict)}

    def write_manifest(self, records: Mapping[str, Mapping[str, object]], run_id: str) -> None:
        body = json.dumps(
            {
                "version": 1,
                "written_by": WRITTEN_BY,
                "run_id": run_id,
                "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": records,
            },
            indent=0,
            sort_keys=True,
        ).encode()
        self.fs.write_bytes(self.path(MANIFEST_NAME), body)  # atomic: temporary name, renamed over

    def makedirs(self, *rels: str) -> None:
        for rel in rels:
            self.fs.makedirs(self.path(rel))

    def delete(self, rel: str, recursive: bool = False) -> None:
        self.fs.delete(self.path(rel), recursive=recursive)

    def upload(self, local: Path, rel: str) -> tuple[int, str]:
        """Stream a local file to ``rel``; returns the size and MD5 of the bytes sent."""
        with open(local, "rb") as handle:
            body = _SentBytes(handle, os.fstat(handle.fileno()).st_size, str(local))
            self.fs.create(self.path(rel), body, overwrite=True)
        return body.length, body.md5.hexdigest()

    def content_md5(self, rel: str) -> tuple[int, str]:
        """Size and MD5 of a remote file, re-read."""
        digest = _CountingMd5()
        self.fs.read_into(self.path(rel), digest)
        return digest.size, digest.md5.hexdigest()

    def place(self, staged_rel: str, rel: str, replace: bool) -> bool:
        """Rename a staged file to its final name in one NameNode operation. Without ``replace`` an existing
        file is never overwritten: False (nothing moved) when one appeared since the plan."""
        try:
            self.fs.rename_to(self.path(staged_rel), self.path(rel), replace=replace)
            return True
        except FileExistsError:
            if replace:
                raise
            return False

    def mark(self, rel: str, sent: LocalFile, run_id: str) -> None:
        """Label a (staged) file as this tool's, with the size and MD5 it sent; a rename keeps the label, and
        anything that replaces the file drops it."""
        record = {"size": sent.size, "md5": sent.md5, "run_id": run_id, "written_by": WRITTEN_BY}
        self.fs.set_xattr(self.path(rel), MARK_XATTR, json.dumps(record, sort_keys=True).encode())

    def read_mark(self, rel: str) -> dict[str, object] | None:
        """The record ``mark`` left on a file, or None (no label: not placed by this tool, or replaced since)."""
        raw = self.fs.get_xattr(self.path(rel), MARK_XATTR)
        try:
            record = json.loads(raw) if raw else None
        except ValueError:
            return None
        ok = isinstance(record, dict) and isinstance(record.get("size"), int) and isinstance(record.get("md5"), str)
        return record if ok else None

    def file_checksum(self, rel: str) -> HdfsChecksum:
        return HdfsChecksum.from_webhdfs(self.fs.file_checksum(self.path(rel)), self.address.uri(rel))

    def staged_file_count(self, staging: str) -> int:
        summary = self.fs.content_summary(self.path(staging))
        return max(0, int(summary["fileCount"]) - 1) if summary else 0  # minus the marker
