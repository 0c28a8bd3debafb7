"""HDFS's file checksum (MD5 of block MD5s of chunk CRCs), read from HDFS and computed for a local file, so
content is compared without re-reading it from HDFS (hdfs_load.verify crc; bench/bench_hdfs_load.py)."""

from __future__ import annotations

import hashlib
import math
import re
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .scan import file_stamp
from .shared import READ_CHUNK, SourceError

_MD5_OF_CRCS = re.compile(r"MD5-of-(\d+)MD5-of-(\d+)(CRC32C?)")


@dataclass(frozen=True)
class HdfsChecksum:
    """HDFS's default file checksum (MD5MD5CRC): a CRC of every ``bytes_per_crc`` bytes, the MD5 of each
    block's CRCs, and the MD5 of those. A DataNode computes it from the CRCs it keeps beside every block."""

    algorithm: str  # as HDFS names it: MD5-of-<crc_per_block>MD5-of-<bytes_per_crc><crc>
    bytes_per_crc: int
    crc_per_block: int  # 0: the file has a single block
    crc: str  # CRC32C | CRC32
    md5: str

    @classmethod
    def from_webhdfs(cls, answer: Mapping[str, object], where: str) -> HdfsChecksum:
        algorithm = str(answer.get("algorithm"))
        match = _MD5_OF_CRCS.fullmatch(algorithm)
        if not match:
            raise SourceError(
                f"{where}: HDFS gives its checksum as {algorithm}, which hdfs-load cannot compute locally "
                "(dfs.checksum.combine.mode=COMPOSITE_CRC?): use --verify checksum (re-reads the files) instead"
            )
        # "bytes": bytes_per_crc (4 bytes), crc_per_block (8), then the MD5 (16), in hex
        return cls(algorithm, int(match[2]), int(match[1]), match[3], str(answer["bytes"])[24:56])

    def of_local_file(self, path: Path) -> str:
        """The MD5 part of this checksum for a local file with the same bytes."""
        if self.crc == "CRC32C":
            import google_crc32c

            crc_of = google_crc32c.value
        else:
            crc_of = zlib.crc32
        step = self.bytes_per_crc
        block_bytes = self.crc_per_block * step or math.inf
        read_size = step * max(1, READ_CHUNK // step)
        block_md5s: list[bytes] = []
        digest, in_block = hashlib.md5(usedforsecurity=False), 0
        with open(path, "rb") as handle:
            while chunk := handle.read(int(min(read_size, block_bytes - in_block))):
                digest.update(_chunk_crcs(chunk, step, crc_of))
                in_block += len(chunk)
                if in_block == block_bytes:
                    block_md5s.append(digest.digest())
                    digest, in_block = hashlib.md5(usedforsecurity=False), 0
        if in_block:
            block_md5s.append(digest.digest())
        # Hadoop digests the whole Java DataOutputBuffer the block MD5s were written to (FileChecksumHelper),
        # zero padding included: 32 bytes, doubled whenever it fills.
        joined, capacity = b"".join(block_md5s), 32
        while capacity < len(joined):
            capacity *= 2
        return hashlib.md5(joined.ljust(capacity, b"\0"), usedforsecurity=False).hexdigest()


def _chunk_crcs(data: bytes, step: int, crc_of: Callable[[bytes], int]) -> bytes:
    """The CRC of every ``step`` bytes of ``data``, 4 bytes big-endian each, as HDFS stores them."""
    return b"".join(crc_of(data[i : i + step]).to_bytes(4, "big") for i in range(0, len(data), step))


class LocalChecksums:
    """HDFS checksums of local files, computed once per file state and checksum scheme (plan and verify
    both ask)."""

    def __init__(self):
        self._known: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def of(self, path: Path, scheme: HdfsChecksum) -> str:
        key = (path, file_stamp(path.stat()), scheme.bytes_per_crc, scheme.crc_per_block, scheme.crc)
        with self._lock:
            known = self._known.get(key)
        if known is None:
            known = scheme.of_local_file(path)
            with self._lock:
                self._known[key] = known
        return known
