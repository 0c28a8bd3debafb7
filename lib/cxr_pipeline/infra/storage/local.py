"""The local filesystem backend of storage: plain paths and ``file://`` URIs, writes atomic by rename."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from .entries import CHUNK, FileInfo, FolderEntry
from .uris import _scheme


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
