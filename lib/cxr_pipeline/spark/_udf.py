"""Worker-side half of the featurizer: runs inside Spark's Python workers.

One model per ``(model_name, feature_layer, weights, runtime, ...)`` lives in the
module-level ``_MODELS`` dict of each Python worker, so with
``spark.python.worker.reuse=true`` the model is built and its weights
loaded once per worker and reused by every batch of every later task.
TensorFlow's thread pools (or ONNX Runtime's / OpenVINO's threads, ``featurizer.runtime``) are sized
to the task's cores, so two tasks on two cores do not each spawn a pool per machine core. A worker
on ONNX Runtime or OpenVINO never imports TensorFlow (the conversion runs in a child process).

GPUs: TensorFlow is pinned, before it starts, to exactly the GPU addresses
Spark's resource scheduling gave the task (``TaskContext.resources()["gpu"]``,
see :func:`choose_device`), or to the CPU when the task has none. A process is
pinned once, so every task a reused worker runs must get the same addresses:
true when ``spark.task.resource.gpu.amount`` equals
``spark.executor.resource.gpu.amount`` (``conf/gpu.yaml``); a worker asked for
other GPUs than it holds fails the task with that advice rather than share a GPU.

Optionally (``prefetch``, off by default) decoding overlaps inference: a thread decodes the next
``batch_size`` images, reading ahead into the next Arrow batch, while the model runs on the current ones.
It stays off until measured to help: its benefit is unmeasured here (no quiet machine), and a reader thread
still inside Spark's input stream when a task ends early (``limit``, ``take``) could read a reused
worker's next task.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.accumulators import AccumulatorParam

from ..images.decode import decode_batch, decode_image_structs
from ..models import backbones, runtimes
from ..models.tensorflow_runtime import import_tensorflow

log = logging.getLogger(__name__)

_MODELS: dict[tuple, object] = {}  # WorkerSettings.cache_key -> keras.Model or models.runtimes model
_LOCK = threading.Lock()
_TF_CONFIGURED = False
_PINNED: DeviceChoice | None = None  # what this process's TensorFlow was pinned to
_PLACED: str | None = None  # the device TensorFlow runs on after pinning ("GPU:0", "CPU")
GPU_RESOURCE = "gpu"  # Spark's resource name (spark.{executor,task}.resource.gpu.*)


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
    runtime: str  # backbones.RUNTIMES
    precision: str  # backbones.PRECISIONS
    intensity: str = "none"  # imaging.normalize_intensity
    tf_threads: int = 0  # 0 = the task's cores (spark.task.cpus)
    image_size: tuple[int, int] | None = None  # None = the backbone's native input size
    prefetch: bool = False  # decode the next batch while the model runs on this one (see the module docstring)

    @property
    def cache_key(self) -> tuple:
        return (
            self.model_name,
            self.feature_layer,
            self.weights,
            self.weights_sha256,
            self.image_size,
            self.runtime,
            self.precision,
        )


def configure_tensorflow_threads(threads: int = 0) -> int:
    """Size TensorFlow's pools (once per process, before TF starts); returns the intra-op size."""
    global _TF_CONFIGURED
    if threads <= 0:
        threads = _task_cpus()
    if _TF_CONFIGURED:
        return threads
    tf = import_tensorflow()

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


# ----------------------------------------------------------- devices
@dataclass(frozen=True)
class DeviceChoice:
    """The devices one task may use: its GPU addresses from Spark's scheduler, or none = the CPU."""

    gpu_addresses: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "GPU:" + ",".join(self.gpu_addresses) if self.gpu_addresses else "CPU"


def choose_device(task_resources: Mapping[str, Any] | None) -> DeviceChoice:
    """The device choice for a task's resources (pure; ``TaskContext.resources()`` or a plain dict).

    ``task_resources`` maps a resource name to a ``ResourceInformation`` (``.addresses``) or to a
    list of addresses. The task's ``gpu`` addresses, in numeric order, else the CPU.
    """
    info = (task_resources or {}).get(GPU_RESOURCE)
    addresses = getattr(info, "addresses", info) or ()
    return DeviceChoice(tuple(sorted({str(a).strip() for a in addresses if str(a).strip()}, key=_address_order)))


def _address_order(address: str) -> tuple[int, Any]:
    return (0, int(address)) if address.isdigit() else (1, address)


def task_resources() -> Mapping[str, Any]:
    """The running task's resources (empty outside a task)."""
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        return context.resources() if context is not None else {}
    except Exception:  # noqa: BLE001 - outside Spark, or an old TaskContext
        return {}


class DevicePinningError(RuntimeError):
    """A reused Python worker was given other GPUs than the ones its TensorFlow is pinned to."""


def pin_tensorflow(choice: DeviceChoice) -> str:
    """Make only ``choice``'s GPUs visible to this process's TensorFlow (before it starts); the device used.

    Returns ``"GPU:<address>[,...]"``, or ``"CPU"`` when the task has no GPU or TensorFlow sees
    none of its addresses (e.g. a CPU-only build, or placeholder addresses): the CPU is then used.
    """
    global _PINNED, _PLACED
    if _PINNED is not None:
        if choice != _PINNED:
            raise DevicePinningError(
                f"this Python worker runs TensorFlow on {_PINNED.name} but the task was given {choice.name}: "
                "set spark.task.resource.gpu.amount equal to spark.executor.resource.gpu.amount (conf/gpu.yaml), "
                "or spark.python.worker.reuse=false"
            )
        return _PLACED or "CPU"
    tf = import_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    wanted = [gpu for gpu in gpus if gpu.name.rsplit(":", 1)[-1] in choice.gpu_addresses]
    try:
        tf.config.set_visible_devices(wanted, "GPU")  # [] hides every GPU: the CPU
        for gpu in wanted:
            tf.config.experimental.set_memory_growth(gpu, True)
        placed = "GPU:" + ",".join(g.name.rsplit(":", 1)[-1] for g in wanted) if wanted else "CPU"
    except RuntimeError:  # TF already started in this process (the driver in local tests): keep its devices
        placed = (
            "GPU:" + ",".join(g.name.rsplit(":", 1)[-1] for g in tf.config.get_visible_devices("GPU"))
            if tf.config.get_visible_devices("GPU")
            else "CPU"
        )
    if choice.gpu_addresses and not wanted:
        log.warning(
            "task was given %s but TensorFlow sees %d GPU(s) and none with those addresses: using the CPU",
            choice.name,
            len(gpus),
        )
    _PINNED, _PLACED = choice, placed
    return placed


def local_weights(settings: WorkerSettings) -> str | None:
    """The weights argument for :func:`backbones.build_backbone`, fetched locally if remote."""
    weights = settings.weights
    if weights is None or weights in (backbones.RANDOM_WEIGHTS, "imagenet"):
        return weights
    from ..infra import storage

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
    from ..models.weights import local_copy

    return local_copy(weights)


def cached_model(settings: WorkerSettings, device: DeviceChoice | None = None):
    """The backbone for ``settings``, built at most once per Python worker, on ``device`` (the task's)."""
    with _LOCK:
        if settings.runtime == "keras":
            pin_tensorflow(device or DeviceChoice())  # every task checks: a reused worker never switches devices
        else:
            require_cpu_task(settings.runtime, device or DeviceChoice())
        model = _MODELS.get(settings.cache_key)
        if model is None:
            threads = settings.tf_threads if settings.tf_threads > 0 else _task_cpus()
            if settings.runtime == "keras":
                configure_tensorflow_threads(threads)
            model = runtimes.build_feature_model(
                settings.model_name,
                weights=local_weights(settings),
                feature_layer=settings.feature_layer,
                image_size=settings.image_size,
                weights_sha256=settings.weights_sha256,
                runtime=settings.runtime,
                precision=settings.precision,
                threads=threads,
            )
            _MODELS[settings.cache_key] = model
            freeze_long_lived_objects()
        return model


def require_cpu_task(runtime: str, device: DeviceChoice) -> None:
    """ONNX Runtime and OpenVINO run on the CPU here: a task given GPUs would leave them idle, so it fails."""
    if device.gpu_addresses:
        raise DevicePinningError(
            f"the task was given {device.name} but featurizer.runtime={runtime} runs on the CPU only: "
            "set featurizer.runtime=keras on GPU executors (conf/gpu.yaml does)"
        )


def freeze_long_lived_objects() -> None:
    """Exempt every object alive now (chiefly the just-built model's) from the cyclic GC.

    pyspark's daemon runs ``gc.collect()`` after each task of a reused worker. With InceptionV3
    loaded that full collection walks about 465,000 objects and takes 0.4 s, some 6 % of two cores
    over the 33 tasks of bench_featurizer (bench/README.md). The model lives as long as the worker,
    so those walks are waste; frozen objects are skipped (``gc.freeze``, the idiom of pre-fork servers).
    """
    gc.collect()  # garbage made while building goes now, not into the permanent generation
    gc.freeze()


class WorkerFeaturizer:
    """The decode -> preprocess -> predict loop of one task, on the worker's cached model.

    Only ``batch_size`` images are decoded at a time (one more while prefetching), so memory
    stays bounded by the batch (plus the Arrow batches of encoded bytes), not by the partition.
    """

    def __init__(self, settings: WorkerSettings, device: DeviceChoice | None = None):
        self.settings = settings
        self.device = device or DeviceChoice()
        self.size = backbones.resolve_image_size(settings.model_name, settings.image_size)
        self.model = cached_model(settings, self.device)
        self.placed = _PLACED or "CPU"
        self.decode_seconds = 0.0
        self.predict_seconds = 0.0
        self.wait_seconds = 0.0  # inference waiting for a decoded batch (prefetch only)

    def featurize_contents(self, contents: pd.Series) -> pd.DataFrame:
        """``features`` (float32 arrays, None for failures) and ``error`` (reason or None)."""
        return next(self.featurize_stream(iter([contents]), prefetch=False))

    def featurize_stream(self, batches: Iterator, prefetch: bool | None = None) -> Iterator[pd.DataFrame]:
        """One ``features``/``error`` frame per input batch (a Series of bytes or image-struct dicts)."""
        prefetch = self.settings.prefetch if prefetch is None else prefetch
        chunks = self._decoded_chunks(batches)
        if prefetch:
            chunks = _read_ahead(chunks)
        features: list = []
        errors: list = []
        waited = time.perf_counter()
        for kind, payload in chunks:
            if kind == "batch":  # a new input batch of ``payload`` rows starts
                features, errors = [None] * payload, [None] * payload
            elif kind == "chunk":
                start, (arrays, good, failed) = payload
                began = time.perf_counter()
                self.wait_seconds += began - waited
                for index, reason in failed:
                    errors[start + index] = reason
                if good:
                    vectors = backbones.featurize_arrays(
                        self.model, self.settings.model_name, arrays, self.settings.batch_size
                    )
                    for index, vector in zip(good, vectors):
                        features[start + index] = vector
                self.predict_seconds += time.perf_counter() - began
            else:  # the input batch is complete
                yield pd.DataFrame({"features": features, "error": errors})
            waited = time.perf_counter()

    def _decoded_chunks(self, batches: Iterator) -> Iterator[tuple[str, Any]]:
        step = max(1, self.settings.batch_size)
        for contents in batches:
            if isinstance(contents, pd.DataFrame):  # struct input (Spark image source) arrives as a frame
                values = contents.to_dict("records")
            else:
                values = contents.tolist()
            yield "batch", len(values)
            for start in range(0, len(values), step):
                began = time.perf_counter()
                decoded = self._decode(values[start : start + step])
                self.decode_seconds += time.perf_counter() - began
                yield "chunk", (start, decoded)
            yield "end", None

    def _decode(self, chunk: list) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
        if chunk and isinstance(chunk[0], dict):  # Spark image source structs
            return decode_image_structs(chunk, self.size, self.settings.max_pixels, self.settings.intensity)
        return decode_batch(chunk, self.size, self.settings.max_pixels, self.settings.intensity)


_DONE = object()


def _read_ahead(items: Iterator, depth: int = 1) -> Iterator:
    """``items``, produced by a thread that stays up to ``depth`` items (+ the one in hand) ahead.

    An exception in the producer (e.g. ``MemoryError``) is raised in the consumer; a consumer that
    stops early (task cancelled) stops the producer at its next item.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(("error", exc))
            return
        put(("done", _DONE))

    thread = threading.Thread(target=produce, name="cxr-decode-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


class _MaxParam(AccumulatorParam):
    def zero(self, value):
        return 0.0

    def addInPlace(self, a, b):
        return max(a, b)


class _MergeParam(AccumulatorParam):
    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        return {**a, **b}


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
        self.wait_seconds = spark_context.accumulator(0.0)
        self.tasks = spark_context.accumulator({}, _MergeParam())  # "stage.partition.attempt" -> device facts

    def summary(self) -> dict:
        decode, predict = self.decode_seconds.value, self.predict_seconds.value
        return {
            "images": self.images.value,
            "decode_seconds": decode,
            "predict_seconds": predict,
            "setup_seconds": self.setup_seconds.value,
            "decode_share": decode / (decode + predict) if decode + predict else 0.0,
            "wait_seconds": self.wait_seconds.value,
            "peak_worker_rss_mb": self.peak_worker_rss_mb.value,
            "tasks": dict(self.tasks.value),
        }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def featurize_batches(
    settings: WorkerSettings, batches: Iterator, stats: FeaturizerStats | None = None
) -> Iterator[pd.DataFrame]:
    """Body of the scalar-iterator pandas UDF: set-up once, then one frame per Arrow batch."""
    began = time.perf_counter()
    resources = task_resources()
    device = choose_device(resources)
    runner = WorkerFeaturizer(settings, device)
    setup = time.perf_counter() - began
    images = 0
    try:
        for frame in runner.featurize_stream(batches):
            images += len(frame)
            yield frame
    finally:
        if stats is not None:
            stats.decode_seconds.add(runner.decode_seconds)
            stats.predict_seconds.add(runner.predict_seconds)
            stats.wait_seconds.add(runner.wait_seconds)
            stats.setup_seconds.add(setup)
            stats.images.add(images)
            stats.peak_worker_rss_mb.add(_peak_rss_mb())
            stats.tasks.add(
                {
                    _task_name(): {
                        "gpu_addresses": list(getattr(resources.get(GPU_RESOURCE), "addresses", [])),
                        "chosen": device.name,
                        "placed": runner.placed,
                        "pid": os.getpid(),
                        "images": images,
                    }
                }
            )


def _task_name() -> str:
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        return f"pid{os.getpid()}"
    return f"{context.stageId()}.{context.partitionId()}.{context.attemptNumber()}"
