"""ImageNet backbones from ``keras.applications`` as feature extractors.

``build_backbone("InceptionV3", feature_layer="mixed5")`` returns a Keras model
that maps a *preprocessed* float32 batch ``[n, h, w, 3]`` to pooled features
``[n, d]``; ``preprocess`` is each backbone's own input scaling (done here in
numpy, identical to ``keras.applications.<module>.preprocess_input``) and
``featurize_arrays`` runs both on ``uint8`` batches in fixed-size chunks.

Weights: ``None`` = the provisioned file for the backbone (``make weights``,
:mod:`cxr_pipeline.models.weights`), a local ``.weights.h5`` path, ``"imagenet"``
(Keras' own download, needs internet) or ``"random"`` (seeded random init, for
tests and benchmarks where the values do not matter).

Runtimes: :func:`cxr_pipeline.models.runtimes.build_feature_model` runs the same backbone on Keras
(TensorFlow), or on ONNX Runtime or OpenVINO from an ONNX file converted from the same weights file;
every one has ``predict_on_batch`` for :func:`featurize_arrays`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

RANDOM_WEIGHTS = "random"
RANDOM_SEED = 1234
RUNTIMES = ("keras", "onnxruntime", "openvino")  # what runs the backbone (featurizer.runtime)
PRECISIONS = ("fp32", "bf16")  # its arithmetic (featurizer.precision); bf16 on OpenVINO only


@dataclass(frozen=True)
class BackboneSpec:
    constructor: str  # attribute of keras.applications
    input_size: tuple[int, int]  # (height, width)
    preprocessing: str  # "tf" ([-1, 1]), "caffe" (BGR, mean-subtracted), "torch" (ImageNet mean/std)


BACKBONES: dict[str, BackboneSpec] = {
    "InceptionV3": BackboneSpec("InceptionV3", (299, 299), "tf"),
    "Xception": BackboneSpec("Xception", (299, 299), "tf"),
    "ResNet50": BackboneSpec("ResNet50", (224, 224), "caffe"),
    "MobileNetV2": BackboneSpec("MobileNetV2", (224, 224), "tf"),
    "DenseNet121": BackboneSpec("DenseNet121", (224, 224), "torch"),
}

_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class BackboneError(ValueError):
    """Unknown backbone, unknown layer or unusable weights."""


class WeightsMismatchError(BackboneError):
    """A weights file is not the one the model was trained with (its sha256 differs)."""


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:  # size/mtime: a rewritten file is hashed anew
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    stat = os.stat(path)
    return _sha256_of(os.fspath(path), stat.st_size, stat.st_mtime_ns)


def weights_sha256(model_name: str, weights: str | None) -> str | None:
    """The sha256 of the weights file ``weights`` stands for (None = the provisioned one; an
    ``hdfs://`` URI is read through :mod:`cxr_pipeline.infra.storage`); None for ``"random"``/``"imagenet"``."""
    if weights in (RANDOM_WEIGHTS, "imagenet"):
        return None
    if weights is not None and "://" in str(weights) and not str(weights).startswith("file://"):
        from ..infra import storage

        return hashlib.sha256(storage.read_bytes(weights)).hexdigest()
    return file_sha256(resolve_weights_file(model_name, weights))


def check_weights_file(path: str | None, expected_sha256: str | None, model_name: str) -> None:
    """Refuse a weights file other than the recorded one (a silent swap would change every answer)."""
    if not expected_sha256 or path in (None, "imagenet"):
        return
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise WeightsMismatchError(
            f"the {model_name} weights file {path} has sha256 {actual[:16]}..., but this model was trained "
            f"with {expected_sha256[:16]}...: the file was replaced or re-provisioned. Put the original file "
            "back (the run's config.yaml names it) or re-train; refusing to score with other weights."
        )


def spec(model_name: str) -> BackboneSpec:
    try:
        return BACKBONES[model_name]
    except KeyError:
        raise BackboneError(f"unknown backbone {model_name!r}; choose one of {', '.join(BACKBONES)}") from None


def input_size(model_name: str) -> tuple[int, int]:
    """``(height, width)`` the backbone expects."""
    return spec(model_name).input_size


def resolve_image_size(model_name: str, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """``(height, width)``: ``image_size`` (an int means square) or the backbone's native size."""
    if not image_size:
        return input_size(model_name)
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))


def preprocess(model_name: str, batch_uint8: np.ndarray) -> np.ndarray:
    """The backbone's own input scaling of an RGB ``[n, h, w, 3]`` batch, as float32."""
    x = np.asarray(batch_uint8, dtype=np.float32)
    mode = spec(model_name).preprocessing
    if mode == "tf":
        return x / np.float32(127.5) - np.float32(1.0)
    if mode == "caffe":
        return x[..., ::-1] - _CAFFE_MEAN_BGR
    return (x / np.float32(255.0) - _TORCH_MEAN) / _TORCH_STD


def resolve_weights_file(model_name: str, weights: str | os.PathLike | None) -> str | None:
    """A local weights file path, ``"imagenet"`` or None (random init)."""
    if weights is None:
        from .weights import default_weights_path  # raises WeightsNotFound ("run `make weights`")

        return str(default_weights_path(model_name))
    weights = str(weights)
    if weights == RANDOM_WEIGHTS:
        return None
    if weights == "imagenet":
        return weights
    if "://" in weights and not weights.startswith("file://"):
        raise BackboneError(
            f"weights {weights!r} is a remote URI: fetch it first "
            "(cxr_pipeline.spark.featurizer does this on executors)"
        )
    path = weights[len("file://") :] if weights.startswith("file://") else weights
    if not os.path.isfile(path):
        raise BackboneError(
            f"weights file {path} for {model_name} does not exist; run `make weights` to provision "
            "the default InceptionV3/Xception files, or pass weights='imagenet' on a host with internet"
        )
    return path


def build_backbone(
    model_name: str,
    weights: str | os.PathLike | None = None,
    feature_layer: str | None = None,
    pooling: str | None = "avg",
    image_size: int | tuple[int, int] | None = None,
    weights_sha256: str | None = None,
) -> Any:
    """A Keras model: preprocessed batch ``[n, h, w, 3]`` -> features ``[n, d]``.

    ``image_size`` (a side or ``(height, width)``) runs the convolutional
    backbone at another input size than its native one (faster, coarser);
    None = :func:`input_size`.

    ``feature_layer`` names the layer whose output is pooled (default: the last
    layer of the no-top backbone, e.g. ``mixed10`` for InceptionV3), or several joined
    by ``+`` (``"mixed4+mixed5"``: each pooled, concatenated; see :func:`feature_layers`). ``pooling``
    is ``"avg"``, ``"max"`` or None (flatten). ``weights_sha256``: the file must have
    this hash (:class:`WeightsMismatchError` otherwise); None = unchecked.
    """
    import keras

    model_spec = spec(model_name)
    weights_file = resolve_weights_file(model_name, weights)
    check_weights_file(weights_file, weights_sha256, model_name)
    if weights_file is None:
        keras.utils.set_random_seed(RANDOM_SEED)  # same "random" model in every worker
    constructor = getattr(keras.applications, model_spec.constructor)
    base = constructor(
        include_top=False,
        weights="imagenet" if weights_file == "imagenet" else None,
        input_shape=(*resolve_image_size(model_name, image_size), 3),
    )
    if weights_file not in (None, "imagenet"):
        try:
            base.load_weights(weights_file)
        except Exception as exc:  # noqa: BLE001 - turn h5/shape errors into one clear message
            raise BackboneError(
                f"cannot load weights {weights_file} into {model_name} (no top): {exc}. "
                "Re-provision them with `make weights`."
            ) from exc
    layers = feature_layers(feature_layer)
    pooled = [
        _pool(keras, _layer_output(base, layer), pooling, "" if len(layers) == 1 else f"_{layer}") for layer in layers
    ]
    output = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="feature_concat")(pooled)
    name = f"{model_name}_{(feature_layer or 'last').replace(LAYER_SEPARATOR, '_')}_features"
    return keras.Model(base.inputs, output, name=name)


LAYER_SEPARATOR = "+"


def feature_layers(feature_layer: str | None) -> list[str | None]:
    """``"mixed4+mixed5"`` -> ``["mixed4", "mixed5"]``: several layers, each pooled, concatenated in this order
    (one forward pass; the spec travels as the one ``featureLayer`` string through the featurizer,
    ``classifier.json`` and the Spark-free scorer). None / "" = the backbone's last layer."""
    if not feature_layer:
        return [None]
    layers = [layer.strip() for layer in str(feature_layer).split(LAYER_SEPARATOR)]
    if not all(layers) or len(set(layers)) != len(layers):
        raise BackboneError(f"feature layer {feature_layer!r}: name layers once each, joined by {LAYER_SEPARATOR!r}")
    return layers


def _pool(keras: Any, output: Any, pooling: str | None, suffix: str) -> Any:
    if len(output.shape) != 4:
        return output
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="feature_pool" + suffix)(output)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="feature_pool" + suffix)(output)
    if pooling is None:
        return keras.layers.Flatten(name="feature_flatten" + suffix)(output)
    raise BackboneError(f"pooling must be 'avg', 'max' or None, not {pooling!r}")


def _layer_output(base: Any, feature_layer: str | None) -> Any:
    if not feature_layer:
        return base.output
    try:
        return base.get_layer(feature_layer).output
    except ValueError:
        blocks = [
            layer.name for layer in base.layers if not layer.name.startswith(("conv2d", "batch_norm", "activation"))
        ]
        raise BackboneError(
            f"{base.name} has no layer {feature_layer!r}; some of its layers: {', '.join(blocks[-12:])}"
        ) from None


def check_runtime(runtime: str, precision: str) -> None:
    """Refuse an unknown runtime or precision, and bf16 anywhere but OpenVINO (the one runtime here that
    computes in bf16 on CPUs: AMX / avx512_bf16; ONNX Runtime's CPU kernels and Keras on CPU do not)."""
    if runtime not in RUNTIMES:
        raise BackboneError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise BackboneError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and runtime != "openvino":
        raise BackboneError(
            f"precision bf16 runs on OpenVINO only, not on {runtime}: set featurizer.runtime=openvino "
            "(on a CPU with AMX or avx512_bf16) or featurizer.precision=fp32"
        )


def feature_dim(model: Any) -> int:
    if hasattr(model, "feature_dim"):  # a models.runtimes model
        return int(model.feature_dim)
    return int(model.output.shape[-1])


def featurize_arrays(model: Any, model_name: str, batch_uint8: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Features ``[n, d]`` (float32) of a ``uint8`` batch, ``batch_size`` images per model call
    (None: ``featurizer.batch_size`` of the configuration).

    The last chunk is zero-padded to ``batch_size`` so the compiled predict
    function is traced once and reused for every call.
    """
    batch_uint8 = np.asarray(batch_uint8)
    n = len(batch_uint8)
    if n == 0:
        return np.zeros((0, feature_dim(model)), dtype=np.float32)
    if batch_size is None:
        from .. import config

        batch_size = config.configured("featurizer.batch_size")
    batch_size = max(1, min(int(batch_size), n))
    outputs = []
    for start in range(0, n, batch_size):
        chunk = preprocess(model_name, batch_uint8[start : start + batch_size])
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - real, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(np.asarray(model.predict_on_batch(chunk), dtype=np.float32)[:real])
    return np.concatenate(outputs)
