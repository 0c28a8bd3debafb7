"""The models the service can serve, behind one small interface.

A backend is loaded once at start-up. The service decodes each upload once and
hands the pixels to ``submit(pixels)``, which returns a future of the
:class:`Prediction` (concurrent images share model calls, see
:class:`MicroBatcher`); a backend that can explain itself also answers
``submit_heatmap(pixels, bytes)`` with a future of a :class:`HeatMap` (a
Grad-CAM overlay PNG over the image). Two kinds exist:

* ``spark-lr``: a run folder of ``jobs/train_featurizer.py``. Served without
  Spark from ``classifier.json`` (Keras backbone + the scaler and logistic
  regression exported from the ``PipelineModel``) by
  :class:`cxr_pipeline.spark.classifier.model_export.LocalClassifier`.
* ``cnn``: a run folder of ``jobs/train_cnn.py`` (or a ``.keras`` file), served
  by :class:`cxr_pipeline.cnn.predict.LocalCnnClassifier`.

Both score a uint8 batch decoded exactly as the batch jobs decode it
(``imaging.decode_image`` at the model's size and pixel guard), so the service
and ``predict_bytes`` give the same probabilities; the CNN one adds the heat map.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

SPARK_EXPORT_FILE = "classifier.json"
CNN_META_FILE = "cnn.json"
CNN_MODEL_FILE = "model.keras"


class ModelLoadError(RuntimeError):
    """The model folder is missing or is not a run folder of a training job."""


@dataclass(frozen=True)
class ModelInfo:
    model_id: str  # run name + short content hash: tells two versions of a run apart
    kind: str  # "spark-lr" | "cnn"
    name: str  # e.g. "InceptionV3 (mixed5) + logistic regression"
    run: str  # the run folder / file the service was started with: server-side only, never answered
    label_names: tuple[str, ...]
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        """What clients are told about the model: its id, not where it lives on the server."""
        data = asdict(self)
        del data["run"]
        data["label_names"] = list(self.label_names)
        return data


@dataclass(frozen=True)
class Prediction:
    label_name: str
    label_index: int
    probability: float  # of the positive class (label_names[1], PNEUMONIA)
    threshold: float


@dataclass(frozen=True)
class HeatMap:
    png: bytes  # the image with the map blended in, at the image's aspect ratio
    flat: bool  # all-zero map: no region raises the positive score (typical of a NORMAL call); png is the plain image


class PredictionError(ValueError):
    """The model could not score the image (its reason is the message)."""


@runtime_checkable
class ModelBackend(Protocol):
    info: ModelInfo

    @property
    def supports_heatmap(self) -> bool: ...

    @property
    def input_size(self) -> tuple[int, int]: ...

    @property
    def max_pixels(self) -> int | None: ...

    @property
    def intensity(self) -> str: ...

    def submit(self, pixels: np.ndarray) -> Future: ...

    def submit_heatmap(self, pixels: np.ndarray, image_bytes: bytes) -> Future: ...

    def predict(self, data: bytes) -> Prediction: ...


class MicroBatcher:
    """Scores images that arrive while the model is busy together, in one call.

    One thread owns the model calls: it takes the oldest waiting image plus
    whatever else is already queued (up to ``max_batch``) and scores them as a
    batch. A lone request waits for nothing; under concurrent load the model
    sees batches, which is what a backbone (and a GPU) is fast at. The queue
    itself is unbounded: the service admits a bounded number of requests
    (``serving.max_active`` + ``serving.max_queued``), so it never holds more.
    """

    def __init__(self, score_many: Callable[[np.ndarray], list[Prediction]], max_batch: int | None = None):
        if max_batch is None:  # serving.max_batch of the configuration
            from .. import config

            max_batch = int(config.configured("serving.max_batch"))
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._score_many, self.max_batch = score_many, max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Observability (GET /health): do concurrent requests share model calls?
        self.largest_batch = self.model_calls = self.images_scored = 0
        threading.Thread(target=self._serve_forever, name="cxr-model-batcher", daemon=True).start()

    def submit(self, pixels: np.ndarray) -> Future:
        """A future of the :class:`Prediction` for one decoded image ``[H, W, 3]`` uint8."""
        future: Future = Future()
        self._queue.put((pixels, future))
        return future

    def _serve_forever(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.largest_batch = max(self.largest_batch, len(batch))
            self.model_calls += 1
            self.images_scored += len(batch)
            try:
                results = self._score_many(np.stack([pixels for pixels, _ in batch]))
            except BaseException as err:  # noqa: BLE001 - handed to every waiting request
                for _, future in batch:
                    future.set_exception(err)
            else:
                for (_, future), result in zip(batch, results):
                    future.set_result(result)


class ClassifierBackend:
    """Adapter over a loaded classifier: decoded images in, :class:`Prediction` out.

    The service decodes each upload once (``serving.uploads``) and hands the pixels
    here; the subclasses say how a batch of pixels becomes probabilities.
    """

    def __init__(self, classifier: Any, info: ModelInfo, max_batch: int | None = None):
        self.classifier = classifier
        self.info = info
        self._batcher = MicroBatcher(self._score_many, max_batch)

    @property
    def supports_heatmap(self) -> bool:
        return False

    def batching_stats(self) -> dict[str, int]:
        b = self._batcher
        return {
            "max_batch": b.max_batch,
            "largest_batch": b.largest_batch,
            "model_calls": b.model_calls,
            "images_scored": b.images_scored,
        }

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """P(positive class) for a uint8 batch ``[n, H, W, 3]`` at ``input_size``."""
        raise NotImplementedError

    def _score_many(self, batch: np.ndarray) -> list[Prediction]:
        threshold = float(self.info.threshold)
        labels = self.info.label_names
        predictions = []
        for p in np.asarray(self.probabilities(batch), dtype=np.float64).ravel():
            label = int(p >= threshold)
            predictions.append(
                Prediction(label_name=str(labels[label]), label_index=label, probability=float(p), threshold=threshold)
            )
        return predictions

    def submit(self, pixels: np.ndarray) -> Future:
        """A future of the :class:`Prediction` for one image decoded by :meth:`decode`."""
        return self._batcher.submit(pixels)

    def submit_heatmap(self, pixels: np.ndarray, image_bytes: bytes) -> Future:
        raise PredictionError(f"{self.info.name} has no heat map")

    def decode(self, data: bytes) -> np.ndarray:
        """The pixels the model takes, as the batch jobs decode them (``PredictionError`` if unusable)."""
        from cxr_pipeline.images.decode import ImageDecodeError, decode_image

        try:
            return decode_image(
                data,
                size=self.input_size,
                intensity=self.intensity,
                **({"max_pixels": self.max_pixels} if self.max_pixels else {}),
            )
        except ImageDecodeError as err:
            raise PredictionError(str(err)) from err

    def predict(self, data: bytes) -> Prediction:
        """One image's bytes -> its prediction (for scripts and warm-up; the service decodes itself)."""
        return self.submit(self.decode(data)).result()

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the model decodes images to."""
        return size_pair(getattr(self.classifier, "image_size", None) or (299, 299))

    @property
    def intensity(self) -> str:
        """``imaging.normalize_intensity`` mode the model was trained with (saved with it; older models: none)."""
        return self.classifier.intensity

    @property
    def max_pixels(self) -> int | None:
        spec = getattr(self.classifier, "spec", None) or {}
        return spec.get("max_pixels") or getattr(self.classifier, "max_pixels", None)

    def warm_up(self) -> None:
        """One prediction on a blank image: builds the backbone and traces the graph before the first request."""
        from PIL import Image

        blank = io.BytesIO()
        Image.new("L", (max(self.input_size), max(self.input_size)), color=128).save(blank, format="PNG")
        self.predict(blank.getvalue())


def size_pair(size) -> tuple[int, int]:
    if isinstance(size, (int, float)):
        return int(size), int(size)
    return int(size[0]), int(size[1])


class SparkLrBackend(ClassifierBackend):
    """A Spark run's export: Keras backbone features, then the exported scaler + logistic regression."""

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        from cxr_pipeline.spark.classifier.model_export import score_features

        return score_features(self.classifier.spec, self.classifier.features(batch))


class CnnBackend(ClassifierBackend):
    """The CNN adapter: predictions plus a Grad-CAM heat map over the image.

    Grad-CAM runs on its own thread (one map at a time) and shares no lock
    with the batching thread: a heat map never holds up plain predictions.
    TensorFlow runs the two threads' inference ops side by side; neither
    changes the model's weights.
    """

    def __init__(self, classifier: Any, info: ModelInfo, max_batch: int | None = None):
        super().__init__(classifier, info, max_batch)
        self._gradcam = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-gradcam")

    @property
    def supports_heatmap(self) -> bool:
        return True

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.classifier.predict_arrays(batch)

    def submit_heatmap(self, pixels: np.ndarray, image_bytes: bytes) -> Future:
        """A future of the :class:`HeatMap` for already decoded ``pixels`` of ``image_bytes``."""
        return self._gradcam.submit(self._heatmap, pixels, image_bytes)

    def _heatmap(self, pixels: np.ndarray, image_bytes: bytes) -> HeatMap:
        from cxr_pipeline.cnn import gradcam

        # The saved CNN rescales inside the model: it takes 0..255 pixels as they are.
        heat = gradcam.gradcam_heatmap(self.classifier.model, pixels[None, ...].astype("float32"))
        return overlay_heatmap(image_bytes, heat)


def overlay_heatmap(image_bytes: bytes, heat, alpha: float = 0.45, max_side: int = 640) -> HeatMap:
    """The uploaded image with ``heat`` (2-D, any size, >= 0) blended on top in 'jet' colours.

    Drawn at the image's own aspect ratio (at most ``max_side`` px), so the
    map lines up with what the reader sees. A flat map is not painted (a uniform
    colour wash would look like an explanation).
    """
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as img:
        img.draft("RGB", (max_side, max_side))  # JPEG: libjpeg decodes at 1/2..1/8 scale, not full size
        base = img.convert("RGB")
    base.thumbnail((max_side, max_side))
    heat = np.asarray(heat, dtype=np.float32).squeeze()
    if heat.ndim != 2:
        raise ValueError(f"heat map must be 2-D, got shape {heat.shape}")
    heat = np.nan_to_num(heat - heat.min())
    flat = not heat.max() > 1e-6
    out = io.BytesIO()
    if flat:
        base.save(out, format="PNG")
        return HeatMap(png=out.getvalue(), flat=True)
    heat = heat / heat.max()
    heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize(base.size, Image.BILINEAR)
    coloured = colormaps["jet"](np.asarray(heat_img) / 255.0)[..., :3]
    blended = (1 - alpha) * np.asarray(base, dtype=np.float32) + alpha * coloured * 255.0
    Image.fromarray(blended.clip(0, 255).astype(np.uint8)).save(out, format="PNG")
    return HeatMap(png=out.getvalue(), flat=False)


# ----------------------------------------------------------------------------
# Loading


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _read_small(path: str, name: str) -> bytes | None:
    """Bytes of ``path/name`` (local path, file:// or any storage URI), None if absent."""
    if _is_uri(path):
        from cxr_pipeline.infra import storage

        uri = storage.join(path, name)
        return storage.read_bytes(uri) if storage.exists(uri) else None
    local = Path(path.removeprefix("file://")) / name
    return local.read_bytes() if local.is_file() else None


def _run_name(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) or path


def _model_id(path: str, fingerprint: bytes) -> str:
    return f"{_run_name(path)}@{hashlib.sha256(fingerprint).hexdigest()[:8]}"


def detect_kind(model_path: str) -> str:
    """``"spark-lr"`` or ``"cnn"`` from what the run folder holds."""
    if model_path.endswith(".keras"):
        return "cnn"
    if _read_small(model_path, SPARK_EXPORT_FILE) is not None:
        return "spark-lr"
    if _read_small(model_path, CNN_META_FILE) is not None:
        return "cnn"
    raise ModelLoadError(
        f"{model_path}: not a run folder of a training job: expected {SPARK_EXPORT_FILE} "
        f"(jobs/train_featurizer.py) or {CNN_META_FILE} + {CNN_MODEL_FILE} (jobs/train_cnn.py)"
    )


def _spark_model_name(meta: dict[str, Any]) -> str:
    backbone = meta.get("model_name", "backbone")
    layer = meta.get("feature_layer")
    return f"{backbone}{f' ({layer})' if layer else ''} + logistic regression"


def load_backend(model_path: str | Path, max_batch: int | None = None) -> ModelBackend:
    """Load the model at ``model_path`` once; the returned backend is ready to predict.

    ``max_batch``: at most this many concurrent requests are scored in one model call.
    """
    model_path = str(model_path)
    kind = detect_kind(model_path)
    if kind == "spark-lr":
        from cxr_pipeline.spark.classifier.model_export import LocalClassifier

        meta_bytes = _read_small(model_path, SPARK_EXPORT_FILE) or b"{}"
        meta = json.loads(meta_bytes)
        classifier = LocalClassifier.load(model_path)
        name = _spark_model_name(meta)
        backend_cls: type[ClassifierBackend] = SparkLrBackend
    else:
        from cxr_pipeline.cnn.predict import LocalCnnClassifier

        meta_bytes = b"" if model_path.endswith(".keras") else (_read_small(model_path, CNN_META_FILE) or b"{}")
        meta = json.loads(meta_bytes) if meta_bytes else {}
        classifier = LocalCnnClassifier.load(model_path)
        name = f"{getattr(classifier, 'model_name', None) or meta.get('model_name') or 'CNN'} (Keras CNN)"
        backend_cls = CnnBackend
    label_names = tuple(getattr(classifier, "label_names", None) or meta.get("label_names") or ("NORMAL", "PNEUMONIA"))
    threshold = getattr(classifier, "threshold", None)
    threshold = float(meta.get("threshold", 0.5) if threshold is None else threshold)
    info = ModelInfo(
        model_id=_model_id(model_path, meta_bytes or model_path.encode()),
        kind=kind,
        name=name,
        run=model_path,
        label_names=label_names,
        threshold=threshold,
    )
    backend = backend_cls(classifier, info, max_batch=max_batch)
    backend.warm_up()
    return backend
