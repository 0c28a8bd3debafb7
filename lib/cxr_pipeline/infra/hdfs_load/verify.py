"""Verify: every source file against HDFS: size, and content by HDFS's file checksum (computed locally too)
or a re-read MD5."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .checksum import LocalChecksums
from .remote import RemoteTree
from .scan import LocalFile, md5_of
from .shared import parallel_map


def content_problem(remote: RemoteTree, f: LocalFile, verify_mode: str, checksums: LocalChecksums) -> str | None:
    """How the bytes of ``f`` on HDFS differ from the local file now (None: they do not), compared by
    ``verify_mode``: ``crc`` HDFS's file checksum against the same computed locally, ``checksum`` a re-read."""
    if verify_mode == "crc":
        theirs = remote.file_checksum(f.rel)
        mine = checksums.of(f.path, theirs)
        if mine == theirs.md5:
            return None
        return f"content differs: HDFS checksum ({theirs.algorithm}) {theirs.md5} on HDFS, {mine} local"
    remote_md5, local_md5 = remote.content_md5(f.rel)[1], md5_of(f.path)
    return None if remote_md5 == local_md5 else f"content differs: MD5 {remote_md5} on HDFS, {local_md5} local"


@dataclass
class Mismatch:
    rel: str
    problem: str  # "missing on HDFS" | "size 12 on HDFS, 34 local" | "content differs: ..."


def _check_one(
    f: LocalFile, remote_size: int | None, content: Callable[[LocalFile], str | None] | None
) -> Mismatch | None:
    if remote_size is None:
        return Mismatch(f.rel, "missing on HDFS")
    try:
        local_size = f.path.stat().st_size
    except OSError:
        return Mismatch(f.rel, "no longer in the source")
    if remote_size != local_size:
        return Mismatch(f.rel, f"size {remote_size} on HDFS, {local_size} local")
    problem = content(f) if content is not None else None
    return None if problem is None else Mismatch(f.rel, problem)


def verify(
    files: Iterable[LocalFile],
    remote_sizes: Mapping[str, int],
    content: Callable[[LocalFile], str | None] | None = None,
    workers: int = 4,
) -> list[Mismatch]:
    """Every source file against HDFS as they are now: sizes, and with ``content`` (``content_problem``) bytes."""
    files = list(files)
    checked = parallel_map(lambda f: _check_one(f, remote_sizes.get(f.rel), content), files, workers if content else 1)
    return [m for m in checked if m is not None]


def compare_content(
    remote: RemoteTree, files: Sequence[LocalFile], verify_mode: str, workers: int, checksums: LocalChecksums
) -> dict[str, bool]:
    """``{rel: same bytes on HDFS}`` for ``files`` (each with a same-size remote copy); {} for ``size``."""
    if verify_mode == "size":
        return {}
    same = parallel_map(lambda f: content_problem(remote, f, verify_mode, checksums) is None, files, workers)
    return {f.rel: equal for f, equal in zip(files, same)}
