"""The backbone (or a trained CNN) on ONNX Runtime or OpenVINO instead of TensorFlow: the same model,
converted once.

:func:`build_runtime_model` builds the Keras backbone of :func:`backbones.build_backbone` from the
same weights file (its sha256 checked as for Keras), converts it to ONNX with Keras' own exporter
(``model.export(format="onnx")``, tf2onnx underneath) and runs that file on ONNX Runtime, or on
OpenVINO, which reads the same ONNX file. At fp32 both give Keras' features to float noise
(``tests/test_backbone_runtimes.py`` holds them to ``tests/tolerances.py``).

The ONNX file is cached next to the weights file, in ``converted/``, named by a digest of what makes
it: the weights' sha256, the backbone spec (model, layer(s), pooling, input size) and the converter
(Keras, TensorFlow, tf2onnx, opset); ``<name>.json`` beside it says what the digest stands for. Where
that folder cannot be written (a read-only weights folder) the cache is in the temporary directory.

The conversion runs in a child Python process, so a Spark worker or a service that uses another
runtime never loads TensorFlow itself (its memory stays the runtime's). Two processes that need the
same file at once take turns on ``<name>.lock``: the second finds the file made by the first. The
file appears by rename of a complete temporary file, so no reader ever sees a partial one.

A trained CNN (``model.keras``, :func:`build_keras_file_model`) is converted the same way, keyed by the
file's sha256 and the converter, and cached in the temporary directory: a run folder stays as written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import backbones

log = logging.getLogger(__name__)

CONVERSION_FORMAT = 1  # raise when what a conversion writes changes (invalidates every cached file)
ONNX_OPSET = 17  # supported by ONNX Runtime >= 1.14 and every OpenVINO since 2023
POOLING = "avg"  # the featurizer's pooling (backbones.build_backbone's default)
CONVERTER_PACKAGES = ("keras", "tensorflow", "tensorflow-cpu", "tf2onnx", "onnx")
# Packages whose versions decide a feature vector, per runtime (the feature cache's fingerprint).
RUNTIME_PACKAGES = {
    "keras": (),
    "onnxruntime": ("onnxruntime", "tf2onnx"),
    "openvino": ("openvino", "tf2onnx"),
}
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}


class RuntimeUnavailableError(backbones.BackboneError):
    """The runtime's package is missing, or the CPU cannot compute at the precision asked for."""


def package_versions(names) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def conversion_key(model_name: str, weights_identity: str, feature_layer: str | None, image_size) -> dict[str, Any]:
    """What decides the converted file: weights (sha256, or the keyword 'random'/'imagenet'), spec, converter."""
    return {
        "format": CONVERSION_FORMAT,
        "model_name": model_name,
        "feature_layer": feature_layer or None,
        "pooling": POOLING,
        "image_size": list(backbones.resolve_image_size(model_name, image_size)),
        "weights": weights_identity,
        "opset": ONNX_OPSET,
        "converter": package_versions(CONVERTER_PACKAGES),
    }


def cache_folder(weights_file: str | None) -> Path:
    """``converted/`` beside the weights file; the temporary directory for keywords or a read-only folder."""
    fallback = Path(tempfile.gettempdir()) / "cxr-converted"
    if weights_file in (None, "imagenet"):
        return fallback
    folder = Path(weights_file).resolve().parent / "converted"
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        log.info("cannot write %s (%s): converted backbones are cached in %s", folder, exc, fallback)
        return fallback
    if not os.access(folder, os.W_OK):
        return fallback
    return folder


def converted_onnx(model_name: str, weights_file: str | None, feature_layer: str | None, image_size) -> Path:
    """The ONNX file of this backbone, converted now unless the cache has it (``weights_file`` already checked)."""
    identity = weights_file or backbones.RANDOM_WEIGHTS
    if weights_file not in (None, "imagenet"):
        identity = backbones.file_sha256(weights_file)
    key = conversion_key(model_name, identity, feature_layer, image_size)
    request = {
        "kind": "backbone",
        "model_name": model_name,
        "weights": weights_file if weights_file is not None else backbones.RANDOM_WEIGHTS,
        "weights_sha256": identity if weights_file not in (None, "imagenet") else None,
        "feature_layer": key["feature_layer"],
        "image_size": key["image_size"],
    }
    return _cached_conversion(key, request, cache_folder(weights_file), model_name)


def converted_keras_file(model_file: str | os.PathLike, sha256: str) -> Path:
    """The ONNX file of a saved Keras model (a trained CNN's ``model.keras``, whose sha256 is ``sha256``),
    cached in the temporary directory (a run folder stays as training wrote it)."""
    key = {
        "format": CONVERSION_FORMAT,
        "keras_file_sha256": sha256,
        "opset": ONNX_OPSET,
        "converter": package_versions(CONVERTER_PACKAGES),
    }
    request = {"kind": "keras_file", "path": str(model_file), "sha256": sha256}
    return _cached_conversion(key, request, cache_folder(None), "keras_model")


def _cached_conversion(key: dict[str, Any], request: dict[str, Any], folder: Path, prefix: str) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{prefix}_{digest}.onnx"
    if target.is_file():
        return target
    with _exclusive(target.with_suffix(".lock")):
        if target.is_file():  # another process converted it while this one waited
            return target
        _convert(key, request, target)
    return target


@contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(key: dict[str, Any], request: dict[str, Any], target: Path) -> None:
    partial = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part.onnx")
    log.info("converting %s to ONNX: %s", request.get("model_name") or request.get("path"), target)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),  # the package as this process sees it
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cxr_pipeline.models.runtimes", json.dumps(request), str(partial)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not partial.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
            raise backbones.BackboneError(
                f"converting {request.get('model_name') or request.get('path')} to ONNX for {target} failed "
                f"(exit {done.returncode}):\n{tail}\nUse runtime keras meanwhile; the requirements.txt versions "
                "of keras, tensorflow and tf2onnx convert it."
            )
        target.with_suffix(".json").write_text(json.dumps(key, indent=1, sort_keys=True))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _convert_in_this_process(request: dict[str, Any], out: str) -> None:
    """The child's work: build the Keras backbone, or load the saved model, (file hashes checked again) and
    export it to ``out`` for any batch size."""
    from .tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()
    if request["kind"] == "backbone":
        model = backbones.build_backbone(
            request["model_name"],
            weights=request["weights"],
            feature_layer=request["feature_layer"],
            image_size=tuple(request["image_size"]),
            weights_sha256=request["weights_sha256"],
        )
    else:
        import keras

        if backbones.file_sha256(request["path"]) != request["sha256"]:
            raise backbones.WeightsMismatchError(f"{request['path']} changed while it was being converted")
        model = keras.models.load_model(request["path"], compile=False)
    images = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="images")
    model.export(out, format="onnx", input_signature=[images], opset_version=ONNX_OPSET, verbose=False)


class OnnxRuntimeModel:
    """An ONNX file on ONNX Runtime's CPU provider, with Keras' ``predict_on_batch``."""

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailableError(
                "featurizer.runtime=onnxruntime needs the onnxruntime package: pip install -r requirements.txt"
            ) from None
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.feature_dim = int(self.session.get_outputs()[0].shape[-1])

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class OpenVinoModel:
    """An ONNX file compiled by OpenVINO for the CPU at ``precision``, with Keras' ``predict_on_batch``."""

    runtime = "openvino"

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", threads: int = 0):
        try:
            import openvino as ov
        except ImportError:
            raise RuntimeUnavailableError(
                "featurizer.runtime=openvino needs the openvino package: pip install -r requirements.txt"
            ) from None
        core = ov.Core()
        if precision == "bf16":
            require_bf16(core)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one stream: one batch at a time on all its threads
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.feature_dim = int(self.compiled.output(0).get_partial_shape()[-1].get_length())
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one batch at a time

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self._request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
            return np.array(self._request.get_output_tensor(0).data, copy=True)


def require_bf16(core) -> None:
    """Refuse bf16 on a CPU without it: OpenVINO would silently compute in fp32 under a bf16 label."""
    capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if "BF16" not in capabilities:
        cpu = core.get_property("CPU", "FULL_DEVICE_NAME")
        raise RuntimeUnavailableError(
            f"featurizer.precision=bf16 needs a CPU that computes in bf16 (Intel AMX or avx512_bf16); "
            f"OpenVINO finds only {', '.join(capabilities)} on this one ({cpu}). Use featurizer.precision=fp32 here."
        )


def build_feature_model(
    model_name: str = "InceptionV3",
    weights: str | os.PathLike | None = None,
    feature_layer: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    weights_sha256: str | None = None,
    runtime: str = "keras",
    precision: str = "fp32",
    threads: int = 0,
) -> Any:
    """The backbone of :func:`backbones.build_backbone` (average pooling) on ``runtime`` at ``precision``.

    ``keras`` is that Keras model itself; ``onnxruntime`` and ``openvino`` run the ONNX file converted
    from it, from the same weights file (its sha256 checked the same way), cached beside that file
    (the module doc). ``threads``: the runtime's intra-op threads (0 = its
    default, every core); the Keras model takes TensorFlow's process-wide pools as they are.
    """
    backbones.check_runtime(runtime, precision)
    if runtime == "keras":
        return backbones.build_backbone(
            model_name, weights, feature_layer, image_size=image_size, weights_sha256=weights_sha256
        )
    return build_runtime_model(
        runtime, precision, model_name, weights, feature_layer, image_size, weights_sha256, threads
    )


def build_runtime_model(
    runtime: str,
    precision: str,
    model_name: str,
    weights,
    feature_layer: str | None,
    image_size,
    weights_sha256: str | None,
    threads: int = 0,
):
    """:func:`build_feature_model` for ``onnxruntime`` / ``openvino`` (see the module doc)."""
    weights_file = backbones.resolve_weights_file(model_name, weights)
    backbones.check_weights_file(weights_file, weights_sha256, model_name)
    onnx_file = converted_onnx(model_name, weights_file, feature_layer, image_size)
    return load_runtime_model(runtime, precision, onnx_file, threads)


def build_keras_file_model(model_file: str | os.PathLike, runtime: str, precision: str, threads: int = 0):
    """A saved Keras model (a trained CNN) on ``onnxruntime`` / ``openvino``, converted once per file content."""
    backbones.check_runtime(runtime, precision)
    onnx_file = converted_keras_file(model_file, backbones.file_sha256(model_file))
    return load_runtime_model(runtime, precision, onnx_file, threads)


def load_runtime_model(runtime: str, precision: str, onnx_file: str | os.PathLike, threads: int = 0):
    if runtime == "onnxruntime":
        return OnnxRuntimeModel(onnx_file, threads)
    return OpenVinoModel(onnx_file, precision, threads)


if __name__ == "__main__":  # the conversion child: python -m cxr_pipeline.models.runtimes REQUEST_JSON OUT
    _convert_in_this_process(json.loads(sys.argv[1]), sys.argv[2])
