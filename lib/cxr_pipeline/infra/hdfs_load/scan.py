"""Scan: the local ``chest_xray`` tree, each image's size, stamp and MD5; junk is skipped and reported."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ...images.layout import SPLITS, LayoutError, junk_reason, parse_image_path
from .shared import HEAD_BYTES, READ_CHUNK, SourceError


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes whenever a file's bytes do (ctime cannot be set back by a writer)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


@dataclass(frozen=True)
class LocalFile:
    rel: str  # "train/NORMAL/IM-1.jpeg"
    path: Path
    size: int
    md5: str
    stamp: tuple = ()  # file_stamp() taken before hashing; () when unknown

    @property
    def group(self) -> tuple[str, str]:
        split, label, _ = self.rel.split("/")
        return split, label


@dataclass(frozen=True)
class Skipped:
    rel: str
    reason: str


@dataclass
class LocalScan:
    root: Path
    files: list[LocalFile]
    skipped: list[Skipped]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def classify_relative_path(rel: str, splits: Sequence[str] = SPLITS) -> str | None:
    """Why ``rel`` (relative to the dataset root) is outside the ``split/CLASS/file`` layout, or None."""
    parts = rel.split("/")
    if parts[-1].startswith("."):
        return "hidden file"
    hidden = next((p for p in parts[:-1] if p.startswith(".")), None)
    if hidden:
        return f"inside hidden folder {hidden!r}"
    if len(parts) != 3:
        return f"not in the split/CLASS/file layout ({len(parts) - 1} folder levels)"
    try:
        parse_image_path(rel, splits)
    except LayoutError:
        return f"unknown split folder {parts[0]!r} (want one of {', '.join(splits)})"
    return None


def md5_of(path: Path) -> str:
    return _read_head_and_md5(path)[1]


def _read_head_and_md5(path: Path) -> tuple[bytes, str]:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        head = handle.read(READ_CHUNK)
        digest.update(head)
        for chunk in iter(lambda: handle.read(READ_CHUNK), b""):
            digest.update(chunk)
    return head[:HEAD_BYTES], digest.hexdigest()


def _scan_one(root: Path, path: Path, splits: Sequence[str]) -> LocalFile | Skipped | tuple[str, str]:
    rel = path.relative_to(root).as_posix()
    reason = classify_relative_path(rel, splits)
    if reason:
        return Skipped(rel, reason)
    try:
        st = path.stat()
        reason = junk_reason(rel, st.st_size)
        if reason:
            return Skipped(rel, reason)
        head, md5 = _read_head_and_md5(path)
    except OSError as exc:
        return rel, exc.strerror or str(exc)
    reason = junk_reason(rel, st.st_size, head)
    if reason:
        return Skipped(rel, reason)
    return LocalFile(rel, path, st.st_size, md5, file_stamp(st))


def scan_local_tree(source: str | os.PathLike, splits: Sequence[str] = SPLITS, workers: int = 4) -> LocalScan:
    """Every image under ``source`` in ``split/CLASS/file`` layout, plus what was skipped and why.

    Raises SourceError for a missing source, unreadable files, or no usable image.
    """
    root = Path(source).expanduser()
    if not root.exists():
        raise SourceError(
            f"source folder {root} does not exist (want a chest_xray tree: "
            f"{root}/train/NORMAL/x.jpeg ...; `make sample-data` makes the sample one)"
        )
    if not root.is_dir():
        raise SourceError(f"source {root} is a file, not a chest_xray folder")
    root = root.resolve()
    candidates: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        dirnames.sort()
        candidates.extend(Path(dirpath) / name for name in sorted(filenames))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda p: _scan_one(root, p, splits), candidates))
    files = [r for r in results if isinstance(r, LocalFile)]
    skipped = [r for r in results if isinstance(r, Skipped)]
    unreadable = [r for r in results if isinstance(r, tuple)]
    if unreadable:
        listing = "\n".join(f"  {rel}: {why}" for rel, why in unreadable[:20])
        more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        raise SourceError(f"cannot read {len(unreadable)} file(s) under {root}:\n{listing}{more}")
    if not files:
        raise SourceError(
            f"no images in split/CLASS/file layout under {root} "
            f"(splits: {', '.join(splits)}; {len(skipped)} file(s) skipped)"
        )
    return LocalScan(root, files, skipped)


def _raise_walk_error(exc: OSError) -> None:
    raise SourceError(f"cannot list {exc.filename}: {exc.strerror or exc}")
