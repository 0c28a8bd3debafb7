"""Spark-free scoring of a trained run: ``classifier.json`` + the Keras backbone.

``export_classifier`` writes the numbers a fitted ``PipelineModel``
(ImageFeaturizer -> StandardScalerModel -> LogisticRegressionModel) needs at
scoring time: backbone name, layer, image size and weights file, the scaler's
mean/std, the LR coefficients/intercept, label names and thresholds.
``LocalClassifier`` rebuilds the same computation with the same backbone on the same runtime and
precision (``cxr_pipeline.models.backbones``) and the same decoding (``cxr_pipeline.images.decode``),
so its probabilities equal Spark's to float tolerance, with no JVM: a person at
a workstation or the web service uses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...evaluation import metrics as M

CLASSIFIER_FILE = "classifier.json"
FORMAT_VERSION = 1


def _stages(pipeline_model):
    from pyspark.ml.classification import LogisticRegressionModel
    from pyspark.ml.feature import StandardScalerModel

    featurizer = scaler = lr = None
    for stage in pipeline_model.stages:
        if isinstance(stage, StandardScalerModel):
            scaler = stage
        elif isinstance(stage, LogisticRegressionModel):
            lr = stage
        elif stage.hasParam("modelName"):
            featurizer = stage
    if featurizer is None or scaler is None or lr is None:
        raise ValueError("expected a PipelineModel of ImageFeaturizer, StandardScalerModel, LogisticRegressionModel")
    return featurizer, scaler, lr


def _param(stage, name: str, default: Any = None) -> Any:
    if stage.hasParam(name) and (stage.isSet(name) or stage.hasDefault(name)):
        return stage.getOrDefault(name)
    return default


def classifier_spec(
    pipeline_model, threshold: float, label_names: Sequence[str], image_size: int | Sequence[int] | None = None
) -> dict[str, Any]:
    featurizer, scaler, lr = _stages(pipeline_model)
    model_name = _param(featurizer, "modelName", "InceptionV3")
    if image_size is None:
        image_size = _param(featurizer, "imageSize")
    if image_size is None:
        from ...models.backbones import input_size

        size = list(input_size(model_name))
    elif isinstance(image_size, int):
        size = [int(image_size), int(image_size)]
    else:
        size = [int(v) for v in image_size]
    weights = _param(featurizer, "weights")
    return {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "feature_layer": _param(featurizer, "featureLayer"),
        "image_size": size,
        "weights": os.path.basename(str(weights)) if weights else None,
        "weights_uri": str(weights) if weights else None,
        "weights_sha256": _param(featurizer, "weightsSha256"),
        "max_pixels": _param(featurizer, "maxPixels"),
        "intensity": _param(featurizer, "intensity") or "none",
        "runtime": featurizer.getOrDefault("runtime"),
        "precision": featurizer.getOrDefault("precision"),
        "label_names": list(label_names),
        "positive_label": label_names[1],
        "scaler": {
            "with_mean": bool(scaler.getOrDefault("withMean")),
            "with_std": bool(scaler.getOrDefault("withStd")),
            "mean": scaler.mean.toArray().tolist(),
            "std": scaler.std.toArray().tolist(),
        },
        "coefficients": lr.coefficients.toArray().tolist(),
        "intercept": float(lr.intercept),
        "threshold": float(threshold),
        "default_threshold": 0.5,
    }


def export_classifier(
    pipeline_model,
    run_dir: str,
    threshold: float = 0.5,
    label_names: Sequence[str] = ("NORMAL", "PNEUMONIA"),
    image_size: int | Sequence[int] | None = None,
) -> str:
    """Writes ``RUN/classifier.json`` (local path or hdfs:// URI); returns its URI."""
    from ...infra import storage

    spec = classifier_spec(pipeline_model, threshold, label_names, image_size)
    uri = run_dir.rstrip("/") + "/" + CLASSIFIER_FILE
    storage.write_bytes(uri, json.dumps(spec, indent=1).encode())
    return uri


def score_features(spec: dict[str, Any], features: np.ndarray) -> np.ndarray:
    """P(positive) for backbone features [n, d], exactly as StandardScalerModel + LR compute it."""
    x = np.asarray(features, dtype=np.float64)
    scaler = spec["scaler"]
    if scaler["with_mean"]:
        x = x - np.asarray(scaler["mean"])
    if scaler["with_std"]:
        std = np.asarray(scaler["std"])
        # Spark writes 0.0 for a feature whose training std is 0.
        x = np.where(std > 0, x / np.where(std > 0, std, 1.0), 0.0)
    margin = x @ np.asarray(spec["coefficients"]) + spec["intercept"]
    return 1.0 / (1.0 + np.exp(-margin))


def _resolve_weights(spec: dict[str, Any], run_dir: str) -> str | None:
    """The weights of classifier.json -> a local path: where training read it, the run folder, then
    .local/weights. None = the provisioned default. A named file found nowhere is an error, never
    "use the default instead" (its sha256 is checked when the backbone is built)."""
    name = spec.get("weights")
    if not name:
        return None
    if name in ("imagenet", "random"):  # keywords build_backbone understands, not files
        return name
    from ... import paths
    from ...infra import storage
    from ...models.weights import local_copy

    original = spec.get("weights_uri") or ""
    candidates = [] if "://" in original and not original.startswith("file://") else [original.replace("file://", "")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    in_run = str(run_dir).rstrip("/") + "/" + name  # the run folder may be on HDFS: fetched once per host
    if storage.exists(in_run):
        return local_copy(in_run)
    candidates += [in_run, str(paths.WEIGHTS_DIR / name)]
    if os.path.isfile(candidates[-1]):
        return candidates[-1]
    raise FileNotFoundError(
        f"the backbone weights this model was trained with ({original or name}) are not on this machine: looked "
        f"in {', '.join(c for c in candidates if c)}. Copy that file into the run folder; "
        "scoring with other weights would give other answers."
    )


class LocalClassifier:
    """Scores image bytes with a trained run, without Spark.

    >>> clf = LocalClassifier.load("runs/demo")          # or hdfs://.../runs/demo
    >>> clf.predict_bytes([open("x.jpeg", "rb").read()])
    [{'probability': 0.97, 'predicted_label': 1, 'label_name': 'PNEUMONIA', 'threshold': 0.31, 'error': None}]
    """

    def __init__(self, spec: dict[str, Any], run_dir: str = "", batch_size: int | None = None):
        self.spec = spec
        self.run_dir = run_dir
        self.batch_size = batch_size  # None: featurizer.batch_size of the configuration (backbones.featurize_arrays)
        self.threshold = float(spec["threshold"])
        self.label_names = list(spec["label_names"])
        self._backbone = None

    @classmethod
    def load(cls, run_dir: str, batch_size: int | None = None) -> LocalClassifier:
        from ...infra import run_folder, storage

        run_folder.require_complete(str(run_dir))
        uri = str(run_dir).rstrip("/") + "/" + CLASSIFIER_FILE
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri} not found: is {run_dir} a run folder of jobs/train_featurizer.py?")
        spec = json.loads(storage.read_bytes(uri))
        classifier = cls(spec, str(run_dir), batch_size)
        classifier.check_weights()
        return classifier

    def check_weights(self) -> None:
        """Fail at load time, not at the first request, when the trained-with weights are missing or replaced."""
        from ...models.backbones import check_weights_file, resolve_weights_file

        local = resolve_weights_file(self.spec["model_name"], _resolve_weights(self.spec, self.run_dir))
        check_weights_file(local, self.spec.get("weights_sha256"), self.spec["model_name"])

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.spec["image_size"]
        return int(h), int(w)

    @property
    def intensity(self) -> str:
        """``imaging.normalize_intensity`` mode the model was trained with (older exports: none)."""
        return self.spec.get("intensity") or "none"

    @property
    def runtime(self) -> tuple[str, str]:
        """``(runtime, precision)`` the features were trained with (older exports: Keras at fp32, all there was)."""
        return self.spec.get("runtime") or "keras", self.spec.get("precision") or "fp32"

    def backbone(self):
        if self._backbone is None:
            from ...models.runtimes import build_feature_model

            runtime, precision = self.runtime
            self._backbone = build_feature_model(
                self.spec["model_name"],
                weights=_resolve_weights(self.spec, self.run_dir),
                feature_layer=self.spec.get("feature_layer"),
                image_size=self.image_size,
                weights_sha256=self.spec.get("weights_sha256"),
                runtime=runtime,
                precision=precision,
            )
        return self._backbone

    def features(self, images_uint8: np.ndarray) -> np.ndarray:
        from ...models.backbones import featurize_arrays

        return featurize_arrays(self.backbone(), self.spec["model_name"], images_uint8, self.batch_size)

    def predict_bytes(self, contents: Sequence[bytes], threshold: float | None = None) -> list[dict[str, Any]]:
        """One dict per input, in order; an undecodable input gets ``error`` and no probability."""
        from ...images.decode import decode_batch

        threshold = self.threshold if threshold is None else float(threshold)
        kwargs = {"max_pixels": self.spec["max_pixels"]} if self.spec.get("max_pixels") else {}
        batch, good_idx, bad = decode_batch(list(contents), self.image_size, intensity=self.intensity, **kwargs)
        probabilities = score_features(self.spec, self.features(batch)) if good_idx else []
        return M.decisions(len(contents), list(zip(good_idx, probabilities)), bad, threshold, self.label_names)
