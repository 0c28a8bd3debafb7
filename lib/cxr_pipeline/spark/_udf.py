"""Worker-side half of the featurizer: runs inside Spark's Python workers.

One Keras model per ``(model_name, feature_layer, weights)`` lives in the
module-level ``_MODELS`` dict of each Python worker, so with
``spark.python.worker.reuse=true`` the Keras model is built and its weights
loaded once per worker and reused by every batch of every later task.
TensorFlow's thread pools are sized to the task's cores before TensorFlow
starts, so two tasks on two cores do not each spawn a pool per machine core.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.accumulators import AccumulatorParam

from .. import backbones
from ..imaging import decode_batch, decode_image_structs

_MODELS: dict[tuple, object] = {}  # WorkerSettings.cache_key -> keras.Model
_LOCK = threading.Lock()
_TF_CONFIGURED = False


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs, pickled into the UDF closure (no SparkContext inside).

    Built by ``ImageFeaturizer.worker_settings`` from its Params; the defaults of those
    Params come from ``conf/defaults.yaml`` (``spark.featurizer.FeaturizerSettings``).
    """

    model_name: str
    feature_layer: str | None
    weights: str | None  # None | local path | "imagenet" | "random" | remote URI
    weights_spark_file: str | None  # name registered with SparkContext.addFile, if any
    weights_sha256: str | None  # checked on the worker before the weights are loaded
    batch_size: int
    max_pixels: int
    tf_threads: int = 0  # 0 = the task's cores (spark.task.cpus)
    image_size: tuple[int, int] | None = None  # None = the backbone's native input size

    @property
    def cache_key(self) -> tuple:
        return (self.model_name, self.feature_layer, self.weights, self.weights_sha256, self.image_size)


def configure_tensorflow_threads(threads: int = 0) -> int:
    """Size TensorFlow's pools (once per process, before TF starts); returns the intra-op size."""
    global _TF_CONFIGURED
    if threads <= 0:
        threads = _task_cpus()
    if _TF_CONFIGURED:
        return threads
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        pass  # TF already initialised in this process (e.g. the driver in tests): keep its pools
    _TF_CONFIGURED = True
    return threads


def _task_cpus() -> int:
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        if context is not None:
            return max(1, int(context.cpus()))
    except Exception:  # noqa: BLE001 - outside a task, or an old TaskContext
        pass
    return os.cpu_count() or 1


def local_weights(settings: WorkerSettings) -> str | None:
    """The weights argument for :func:`backbones.build_backbone`, fetched locally if remote."""
    weights = settings.weights
    if weights is None or weights in (backbones.RANDOM_WEIGHTS, "imagenet"):
        return weights
    from .. import storage

    if not storage.is_remote(weights):
        return weights
    if settings.weights_spark_file:
        from pyspark import SparkFiles

        try:
            shipped = SparkFiles.get(settings.weights_spark_file)
            if os.path.isfile(shipped):
                return shipped
        except Exception:  # noqa: BLE001 - no SparkFiles root here: download instead
            pass
    # Fetched once per worker host: a stable folder named after the URI.
    folder = os.path.join(tempfile.gettempdir(), "cxr-weights", hashlib.sha1(weights.encode()).hexdigest()[:16])
    target = os.path.join(folder, os.path.basename(weights.rstrip("/")))
    if not os.path.isfile(target):
        os.makedirs(folder, exist_ok=True)
        partial = f"{target}.part-{os.getpid()}"
        storage.download_file(weights, partial)
        os.replace(partial, target)
    return target


def cached_model(settings: WorkerSettings):
    """The backbone for ``settings``, built at most once per Python worker."""
    with _LOCK:
        model = _MODELS.get(settings.cache_key)
        if model is None:
            configure_tensorflow_threads(settings.tf_threads)
            model = backbones.build_backbone(
                settings.model_name, weights=local_weights(settings), feature_layer=settings.feature_layer,
                image_size=settings.image_size, weights_sha256=settings.weights_sha256,
            )
            _MODELS[settings.cache_key] = model
        return model


class WorkerFeaturizer:
    """The decode -> preprocess -> predict loop of one task, on the worker's cached model.

    Only ``batch_size`` images are decoded at a time, so memory stays bounded by
    the batch (plus the Arrow batch of encoded bytes), not by the partition.
    """

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.size = backbones.resolve_image_size(settings.model_name, settings.image_size)
        self.model = cached_model(settings)
        self.decode_seconds = 0.0
        self.predict_seconds = 0.0

    def featurize_contents(self, contents: pd.Series) -> pd.DataFrame:
        """``features`` (float32 arrays, None for failures) and ``error`` (reason or None)."""
        n = len(contents)
        features: list = [None] * n
        errors: list = [None] * n
        step = max(1, self.settings.batch_size)
        values = contents.tolist()
        for start in range(0, n, step):
            began = time.perf_counter()
            arrays, good, failed = self._decode(values[start:start + step])
            decoded = time.perf_counter()
            for index, reason in failed:
                errors[start + index] = reason
            if good:
                vectors = backbones.featurize_arrays(self.model, self.settings.model_name, arrays, step)
                for index, vector in zip(good, vectors):
                    features[start + index] = vector
            self.decode_seconds += decoded - began
            self.predict_seconds += time.perf_counter() - decoded
        return pd.DataFrame({"features": features, "error": errors})

    def _decode(self, chunk: list) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
        if chunk and isinstance(chunk[0], dict):  # Spark image source structs
            return decode_image_structs(chunk, self.size, self.settings.max_pixels)
        return decode_batch(chunk, self.size, self.settings.max_pixels)


class _MaxParam(AccumulatorParam):
    def zero(self, value):
        return 0.0

    def addInPlace(self, a, b):
        return max(a, b)


class FeaturizerStats:
    """Driver-side accumulators the workers report into (diagnostics and benchmarks).

    Values are complete once the job that featurized has finished.
    """

    def __init__(self, spark_context):
        self.decode_seconds = spark_context.accumulator(0.0)
        self.predict_seconds = spark_context.accumulator(0.0)
        self.setup_seconds = spark_context.accumulator(0.0)
        self.images = spark_context.accumulator(0)
        self.peak_worker_rss_mb = spark_context.accumulator(0.0, _MaxParam())

    def summary(self) -> dict:
        decode, predict = self.decode_seconds.value, self.predict_seconds.value
        return {
            "images": self.images.value,
            "decode_seconds": decode,
            "predict_seconds": predict,
            "setup_seconds": self.setup_seconds.value,
            "decode_share": decode / (decode + predict) if decode + predict else 0.0,
            "peak_worker_rss_mb": self.peak_worker_rss_mb.value,
        }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def featurize_batches(settings: WorkerSettings, batches: Iterator, stats: FeaturizerStats | None = None) -> Iterator[pd.DataFrame]:
    """Body of the scalar-iterator pandas UDF: set-up once, then one frame per Arrow batch."""
    began = time.perf_counter()
    runner = WorkerFeaturizer(settings)
    setup = time.perf_counter() - began
    images = 0
    try:
        for contents in batches:
            if isinstance(contents, pd.DataFrame):  # struct input (Spark image source) arrives as a frame
                contents = pd.Series(contents.to_dict("records"))
            images += len(contents)
            yield runner.featurize_contents(contents)
    finally:
        if stats is not None:
            stats.decode_seconds.add(runner.decode_seconds)
            stats.predict_seconds.add(runner.predict_seconds)
            stats.setup_seconds.add(setup)
            stats.images.add(images)
            stats.peak_worker_rss_mb.add(_peak_rss_mb())
