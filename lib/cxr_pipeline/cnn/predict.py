"""Spark-free prediction with a trained CNN: ``LocalCnnClassifier``.

Loads a run folder written by ``jobs/train_cnn.py`` (``model.keras`` + ``cnn.json``)
or a bare ``.keras`` file, local or on HDFS, and classifies image bytes with
the same decoding as training (``cxr_pipeline.images.decode``). Scores on the runtime cnn.json names
(``cnn.runtime`` when it was trained: Keras, or ONNX Runtime / OpenVINO on the same model converted,
``cxr_pipeline.models.runtimes``); Grad-CAM always runs on the Keras model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_pipeline.evaluation import metrics as M
from cxr_pipeline.infra import storage

from . import data
from .run_outputs import CNN_JSON, MODEL_FILE

DEFAULT_LABEL_NAMES = ["NORMAL", "PNEUMONIA"]


def is_cnn_model(path: str) -> bool:
    """True for a ``.keras`` file or a run folder holding ``cnn.json`` (what this module loads)."""
    text = str(path).rstrip("/")
    if text.endswith(".keras"):
        return True
    return storage.exists(storage.join(text, CNN_JSON))


def _fetch(path: str, scratch: Path) -> tuple[Path, dict[str, Any]]:
    """Local (model file, cnn.json contents) for a run folder or .keras file, local or remote."""
    text = str(path).rstrip("/")
    folder, model_uri = (
        (text.rsplit("/", 1)[0] if "/" in text else ".", text)
        if text.endswith(".keras")
        else (text, storage.join(text, MODEL_FILE))
    )
    if not text.endswith(".keras"):
        from ..infra import run_folder

        run_folder.require_complete(text, "train_cnn run folder")
    meta_uri = storage.join(folder, CNN_JSON)
    meta = json.loads(storage.read_bytes(meta_uri)) if storage.exists(meta_uri) else {}
    if not text.endswith(".keras") and meta.get("model_file"):
        model_uri = storage.join(folder, meta["model_file"])
    if not storage.exists(model_uri):
        raise FileNotFoundError(f"no CNN model at {model_uri} (expected a train_cnn run folder or a .keras file)")
    if storage.is_remote(model_uri):
        local = scratch / Path(model_uri).name
        storage.download_file(model_uri, local)
        return local, meta
    return storage.to_local_path(model_uri), meta


@dataclass
class LocalCnnClassifier:
    model: Any
    image_size: int
    label_names: list[str] = field(default_factory=lambda: list(DEFAULT_LABEL_NAMES))
    threshold: float = 0.5
    max_pixels: int | None = None  # None: data.max_pixels of the configuration
    model_name: str = "cnn"
    intensity: str = "none"  # imaging.normalize_intensity, as trained (cnn.json; older runs: none)
    runtime: str = "keras"  # what scores (cnn.json; older runs: keras, all there was)
    precision: str = "fp32"
    scorer: Any = None  # the models.runtimes model when runtime is not keras

    @classmethod
    def load(cls, path: str, threshold: float | None = None) -> LocalCnnClassifier:
        """``path``: run folder (local or hdfs://) or ``.keras`` file. ``threshold``: override
        the validation-chosen one saved in cnn.json (0.5 when there is none)."""
        import keras

        scratch = Path(tempfile.mkdtemp(prefix="cxr_cnn_model_"))
        try:
            model_file, meta = _fetch(path, scratch)
            model = keras.models.load_model(model_file, compile=False)
            runtime, precision = meta.get("runtime") or "keras", meta.get("precision") or "fp32"
            scorer = None
            if runtime != "keras":
                from ..models.runtimes import build_keras_file_model

                scorer = build_keras_file_model(model_file, runtime, precision)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        size = int(meta.get("image_size") or model.input_shape[1])
        return cls(
            model=model,
            image_size=size,
            label_names=list(meta.get("label_names") or DEFAULT_LABEL_NAMES),
            threshold=float(threshold if threshold is not None else meta.get("threshold", 0.5)),
            max_pixels=meta.get("max_pixels"),
            model_name=str(meta.get("model_name") or model.name),
            intensity=str(meta.get("intensity") or "none"),
            runtime=runtime,
            precision=precision,
            scorer=scorer,
        )

    def predict_arrays(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """P(PNEUMONIA) for a uint8 batch [n, S, S, 3] already at ``image_size``."""
        if len(images) == 0:
            return np.zeros(0)
        pixels = np.asarray(images, np.float32)
        if self.scorer is not None:
            starts = range(0, len(pixels), batch_size)
            parts = [self.scorer.predict_on_batch(pixels[i : i + batch_size]) for i in starts]
            return np.asarray(np.concatenate(parts), np.float64).ravel()
        scores = self.model.predict(pixels, batch_size=batch_size, verbose=0)
        return np.asarray(scores, np.float64).ravel()

    def decode(self, blobs: Sequence[bytes]):
        return data.images_from_bytes(blobs, self.image_size, self.max_pixels, self.intensity)

    def predict_bytes(self, blobs: Sequence[bytes], threshold: float | None = None) -> list[dict[str, Any]]:
        """One dict per input, in order: probability, predicted_label, label_name, threshold, error
        (an undecodable image gets error=reason and None elsewhere). ``threshold`` overrides
        the saved one for this call."""
        threshold = self.threshold if threshold is None else float(threshold)
        batch, good_idx, bad = self.decode(blobs)
        scores = self.predict_arrays(batch)
        return M.decisions(len(blobs), list(zip(good_idx, scores)), bad, threshold, self.label_names)
