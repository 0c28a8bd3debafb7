"""What every part of a load shares: the names it writes on HDFS, its option choices, its errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ... import config as cfg

MANIFEST_NAME = ".hdfs_load_manifest.json"
LOCK_NAME = ".hdfs_load.lock"
STAGING_PREFIX = ".staging-"
STAGING_MARKER = ".hdfs_load_staging.json"  # inside each staging folder: who made it
CLOCK_PROBE_PREFIX = ".hdfs_load.clock-"  # a short-lived empty file: the NameNode's time (lease ages)
OWN_PREFIX = ".hdfs_load"  # top-level names of the loader's own files (lock, manifest, clock probes)
MARK_XATTR = "user.cxr_pipeline.hdfs_load"  # on every file it placed: the size and MD5 it sent
WRITTEN_BY = "cxr_pipeline.hdfs_load"
TRANSPORTS = ("auto", "cli", "webhdfs")
VERIFY_MODES = ("size", "crc", "checksum")
HEAD_BYTES = 256  # enough for every signature dataset_layout sniffs (DICOM's sits at byte 128)
# A `hdfs dfs -put` JVM costs ~1.5 s to start; a small file ~0.2-0.4 s (Hadoop 2.7's completeFile back-off).
MIN_FILES_PER_CLI_BATCH = 25
# Fewer files than this go over WebHDFS under --via auto (see choose_transport).
AUTO_CLI_MIN_FILES = 200
READ_CHUNK = 1 << 20


# -- errors -------------------------------------------------------------------
# HDFS failures are storage's: StorageUnavailable (the CLI's exit 3), StoragePermissionError, StorageError.


class SourceError(Exception):
    """Missing/unreadable source tree (or one without a single usable image), a bad target or option."""


class TargetLocked(Exception):
    """Another load holds the target's lock (or held it and was killed: ``break_lock`` removes it)."""


@dataclass(frozen=True)
class HdfsLoadSettings:
    """The ``hdfs_load:`` section of ``conf/defaults.yaml`` (the one home of its defaults): every key required."""

    source: str | None  # None: the sample tree
    target: str | None  # None: data.uri
    via: str
    workers: int
    verify: str
    lock_lease_s: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HdfsLoadSettings:
        return cfg.section_settings(cls, config, "hdfs_load")

    @classmethod
    def configured(cls) -> HdfsLoadSettings:
        """From the process's config, for a caller that passes no value of its own."""
        return cls.from_config(cfg.default_config())

    def validate(self) -> None:
        cfg.require_choice(self.via, TRANSPORTS, "hdfs_load.via")
        cfg.require_choice(self.verify, VERIFY_MODES, "hdfs_load.verify")
        if int(self.workers) < 1:
            raise cfg.ConfigError(f"hdfs_load.workers must be at least 1, not {self.workers!r}")
        check_lease(self.lock_lease_s)


def check_lease(lease_s: float) -> float:
    if not float(lease_s) > 0:
        raise SourceError(f"hdfs_load.lock_lease_s must be a number of seconds above 0, not {float(lease_s):g}")
    return float(lease_s)


def parallel_map(func: Callable, items: Sequence, workers: int) -> list:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(func, items))
