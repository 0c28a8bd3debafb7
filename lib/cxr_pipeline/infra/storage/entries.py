"""What listings return, for local and HDFS alike, and the copy chunk both backends use."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

CHUNK = 4 * 1024 * 1024  # bytes per read/write when a file is streamed


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
