"""The feature cache: backbone features reused only when they are exactly what this run would compute.

A cache entry is named by a *fingerprint* of everything that decides a feature vector, other
than the image itself: the featurizer's Params (backbone, layer, image size, pixel guard, runtime,
precision, ...), the sha256 of the weights file, the image source, the DICOM decoding settings and
the versions of the decoding and model libraries (and the runtime's, for ONNX Runtime / OpenVINO).
Inside an entry every row also carries its image's *identity*: path + length + modification time
(``binaryFile``'s own metadata, read without the bytes), or the sha256 of the bytes for a packed
table. A row is reused only when both match, so other weights, another ``max_pixels``, another
source or an image replaced in place under the same name are featurized again, never served stale.
The reader gives every image its identity (``spark.reader``: the ``identity`` column), in the same
scan that reads its bytes.

Incremental: a re-run featurizes only the images that are new or changed, keeps the rows of the
unchanged ones and drops the rows of removed ones.

Layout under the cache root (``training.features_cache``; default ``_features_cache`` next to the run):

    <root>/<data key>/<fingerprint>/
        fingerprint.json          what the fingerprint stands for (human-readable)
        CURRENT                   the snapshot to read, replaced atomically
        snap-<time>-<id>/         Parquet [path, identity, features, featurize_error] + _SUCCESS
            _readers/<id>         a lease: a run is reading this snapshot, do not delete it
        .tmp-snap-<id>/           a snapshot being written (renamed to snap-... when complete)

Snapshots are immutable: a run writes a new one and moves ``CURRENT``; a superseded snapshot is
deleted only when no live lease is left in it (one younger than ``lease_hours``, or one whose
process still runs on this host), so two runs sharing a cache never delete what the other is
reading. The next run removes the expired leases (of killed runs) from the snapshots that stay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ..infra import storage
from ..infra.run_folder import process_runs
from .reader import ReadResult

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
CACHE_COLUMNS = ("path", "identity", "features", "featurize_error")
# Params that name columns or size batches: they never change a feature vector.
NEUTRAL_PARAMS = ("inputCol", "outputCol", "errorCol", "batchSize", "arrowBatchSize", "weights")
LIBRARIES = ("pillow", "keras", "pydicom")
# The featurizer before it had a runtime setting: Params at these values are left out of the fingerprint,
# so the cache entries written then (all Keras at fp32) stay valid.
RUNTIME_BEFORE_THE_SETTING = {"runtime": "keras", "precision": "fp32"}


def _library_versions(runtime: str) -> dict[str, str | None]:
    from ..models.runtimes import RUNTIME_PACKAGES

    versions = {}
    for name in (*LIBRARIES, *RUNTIME_PACKAGES[runtime]):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _without_secrets(section: Mapping[str, Any] | None) -> dict[str, Any]:
    from ..config import is_secret

    return {k: v for k, v in (section or {}).items() if not is_secret(k)}


def fingerprint(featurizer, source: str, dicom: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything besides the image that decides its feature vector (weights by sha256, not by path)."""
    params = {
        p.name: featurizer.getOrDefault(p)
        for p in featurizer.params
        if p.name not in NEUTRAL_PARAMS and featurizer.isDefined(p)
    }
    weights = featurizer.getOrDefault("weights")
    if weights in ("random", "imagenet"):
        params["weights"] = weights  # keywords, not files: the keyword is the identity
    runtime = featurizer.getOrDefault("runtime")
    for name, before in RUNTIME_BEFORE_THE_SETTING.items():
        if params.get(name) == before:
            del params[name]
    return {
        "format": FORMAT_VERSION,
        "featurizer": params,
        "source": source,
        "dicom": _without_secrets(dicom),
        "libraries": _library_versions(runtime),
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def data_key(data_uri: str) -> str:
    return hashlib.sha1(data_uri.rstrip("/").encode()).hexdigest()[:10]


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def _compare(cached: DataFrame, wanted: DataFrame) -> tuple[int, int, int]:
    """(cached rows, rows to keep, images to featurize) in one Spark job: a full outer join on (path, identity)."""
    both = (
        cached.withColumn("_c", F.lit(1))
        .join(wanted.withColumn("_w", F.lit(1)), ["path", "identity"], "full_outer")
        .agg(
            F.count("_c").alias("cached"),
            F.count(F.when(F.col("_c").isNotNull() & F.col("_w").isNotNull(), 1)).alias("kept"),
            F.count(F.when(F.col("_c").isNull(), 1)).alias("todo"),
        )
        .first()
    )
    return int(both["cached"]), int(both["kept"]), int(both["todo"])


@dataclass
class CacheOutcome:
    """What the cache did for one run; goes to ``metrics.json`` as ``featurizer.cache``."""

    uri: str
    fingerprint: str
    reused_rows: int = 0
    featurized_rows: int = 0
    dropped_rows: int = 0
    reason: str = ""
    snapshot: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "fingerprint": self.fingerprint,
            "snapshot": self.snapshot,
            "reused_rows": self.reused_rows,
            "featurized_rows": self.featurized_rows,
            "dropped_rows": self.dropped_rows,
            "reason": self.reason,
        }


class FeatureCache:
    """One cache entry: ``<root>/<data key>/<fingerprint digest>``."""

    def __init__(self, root: str, data_uri: str, print_: Mapping[str, Any], lease_hours: float | None = None):
        self.print = dict(print_)
        self.digest = _digest(self.print)[:16]
        self.parent = f"{root.rstrip('/')}/{data_key(data_uri)}"
        self.uri = f"{self.parent}/{self.digest}"
        if lease_hours is None:  # training.features_cache_lease_hours of the configuration
            from .. import config

            lease_hours = config.configured("training.features_cache_lease_hours")
        self.lease_seconds = float(lease_hours) * 3600.0
        self.run_id = uuid.uuid4().hex[:12]

    # ------------------------------------------------------------- snapshots
    def _current(self) -> str | None:
        pointer = f"{self.uri}/CURRENT"
        if not storage.exists(pointer):
            return None
        name = storage.read_bytes(pointer).decode().strip()
        snapshot = f"{self.uri}/{name}"
        return snapshot if storage.exists(f"{snapshot}/_SUCCESS") else None

    def _why_not(self) -> str:
        """Why there is nothing to reuse: no cache yet, or which settings differ from the newest entry."""
        try:
            entries = [
                f.uri.rsplit("/", 2)[-2]
                for f in storage.list_files(self.parent, recursive=True)
                if f.uri.endswith("/fingerprint.json")
            ]
        except FileNotFoundError:
            return "no feature cache for this data yet"
        others = [e for e in entries if e != self.digest]
        if not others:
            return "no complete snapshot in this cache entry"
        newest = max(
            others,
            key=lambda e: storage.read_bytes(f"{self.parent}/{e}/CURRENT")
            if storage.exists(f"{self.parent}/{e}/CURRENT")
            else b"",
        )
        old = json.loads(storage.read_bytes(f"{self.parent}/{newest}/fingerprint.json"))
        return "cached features were made differently: " + "; ".join(_differences(old, self.print))

    @contextmanager
    def lease(self, snapshot: str) -> Iterator[None]:
        """Marks ``snapshot`` as being read by this run (removed at the end, or stale after lease_hours)."""
        lease = f"{snapshot}/_readers/{self.run_id}"
        storage.write_bytes(
            lease, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
        )
        try:
            yield
        finally:
            try:
                storage.delete(lease)
            except Exception as exc:  # noqa: BLE001 - a stale lease only delays a clean-up
                log.warning("could not remove the cache lease %s: %s", lease, exc)

    def _leases(self, snapshot: str) -> list[tuple[str, dict[str, Any]]]:
        """``[(uri, record)]`` of the leases on ``snapshot``: files in ``_readers/`` that hold a lease record."""
        try:
            files = storage.list_files(f"{snapshot}/_readers", recursive=False)
        except FileNotFoundError:
            return []
        leases = []
        for info in files:
            try:
                record = json.loads(storage.read_bytes(info.uri))
                lease = {"host": str(record["host"]), "pid": int(record["pid"]), "since": float(record["since"])}
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                continue  # released meanwhile, or not a lease: never counted, never removed
            leases.append((info.uri, lease))
        return leases

    def _expired(self, lease: Mapping[str, Any]) -> bool:
        """Older than lease_hours, and not held by a process still running on this host."""
        if time.time() - lease["since"] < self.lease_seconds:
            return False
        return not (lease["host"] == socket.gethostname() and process_runs(lease["pid"], lease["since"]))

    def _live_leases(self, snapshot: str) -> int:
        return sum(not self._expired(lease) for _uri, lease in self._leases(snapshot))

    def _remove_expired_leases(self, snapshot: str) -> None:
        """Expired leases (their runs were killed) go when their snapshot stays."""
        for uri, lease in self._leases(snapshot):
            if self._expired(lease):
                storage.delete(uri)
                log.info("removed the expired cache lease %s (%s pid %s)", uri, lease["host"], lease["pid"])

    def prune(self, keep: str | None) -> list[str]:
        """Delete superseded snapshots nobody reads, temporary ones older than lease_hours, and the expired
        leases on the snapshots that stay; returns the snapshots deleted."""
        removed = []
        try:
            names = {f.uri[len(self.uri) + 1 :].split("/", 1)[0] for f in storage.list_files(self.uri, recursive=True)}
        except FileNotFoundError:
            return removed
        for name in sorted(names):
            uri = f"{self.uri}/{name}"
            if name.startswith("snap-") and ((keep and uri == keep) or self._live_leases(uri)):
                self._remove_expired_leases(uri)
                continue
            if name.startswith("snap-") or (name.startswith(".tmp-snap-") and self._age(name) > self.lease_seconds):
                storage.delete(uri, recursive=True)
                removed.append(name)
        return removed

    @staticmethod
    def _age(name: str) -> float:
        try:
            return time.time() - int(name.split("-")[2])
        except (IndexError, ValueError):
            return 0.0

    def _write_snapshot(self, rows: DataFrame, partitions: int) -> str:
        stamp = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
        tmp, final = f"{self.uri}/.tmp-snap-{stamp}", f"{self.uri}/snap-{stamp}"
        # Hash-partitioned by path: a retried task re-sends exactly its own rows (a round-robin
        # repartition after the nondeterministic model UDF could duplicate or drop rows on retry).
        rows.select(*CACHE_COLUMNS).repartition(partitions, "path").write.parquet(tmp)
        storage.rename(tmp, final)
        storage.write_bytes(f"{self.uri}/fingerprint.json", json.dumps(self.print, indent=1, default=str).encode())
        storage.write_bytes(f"{self.uri}/CURRENT", final.rsplit("/", 1)[1].encode())
        return final

    # ------------------------------------------------------------- the one entry point
    def features_for(
        self, spark: SparkSession, read: ReadResult, featurizer
    ) -> tuple[DataFrame, CacheOutcome, str | None]:
        """Features of ``read.images`` as DataFrame[path, features, featurize_error].

        Returns (features, outcome, snapshot to hold a lease on while reading the features).
        """
        outcome = CacheOutcome(uri=self.uri, fingerprint=self.digest)
        previous = self._current()
        error_col = featurizer.getOrDefault("errorCol")
        parts = max(1, spark.sparkContext.defaultParallelism)
        if previous is None:
            outcome.reason = self._why_not()
            return self._extend(
                spark, featurizer, read.payload, read.images, read.count_images(), None, error_col, parts, outcome
            )
        with self.lease(previous):
            cached = spark.read.parquet(previous)
            keys = read.identities()
            kept = cached.join(keys, ["path", "identity"], "inner")
            # Broadcast the cached (path, identity) side: a sort-merge join would shuffle every image's bytes.
            todo = read.images.join(F.broadcast(cached.select("path", "identity")), ["path", "identity"], "left_anti")
            n_cached, n_kept, n_todo = _compare(cached.select("path", "identity"), keys)
            outcome.reused_rows, outcome.dropped_rows = n_kept, n_cached - n_kept
            if n_todo == 0 and n_kept == n_cached:
                outcome.reason = "every image and every setting matched"
                outcome.snapshot = previous
                return cached.select("path", "features", "featurize_error"), outcome, previous
            outcome.reason = (
                f"{n_todo} new or changed image(s) featurized, {n_kept} reused, "
                f"{n_cached - n_kept} removed or changed row(s) dropped"
            )
            return self._extend(spark, featurizer, read.payload, todo, n_todo, kept, error_col, parts, outcome)

    def _extend(self, spark, featurizer, payload, todo, n_todo, kept, error_col, parts, outcome):
        from ..infra.progress import images_bar

        stats = getattr(featurizer, "_stats", None) or featurizer.track_stats(spark)
        start = stats.images.value
        # The read's own pixel column (Spark's image source gives an image struct): the saved featurizer keeps
        # its inputCol, content, which is what prediction and serving give it.
        fresh = featurizer.transform(todo, {featurizer.inputCol: payload}).select(
            "path", "identity", featurizer.getOrDefault("outputCol"), F.col(error_col).alias("featurize_error")
        )
        rows = fresh if kept is None else fresh.unionByName(kept.select(*CACHE_COLUMNS))
        with images_bar(
            lambda: stats.images.value - start, n_todo, f"featurizing ({featurizer.getOrDefault('modelName')})"
        ):
            snapshot = self._write_snapshot(rows, parts)
        result = spark.read.parquet(snapshot)
        outcome.featurized_rows = n_todo
        outcome.snapshot = snapshot
        return result.select("path", "features", "featurize_error"), outcome, snapshot
