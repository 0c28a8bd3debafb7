"""Pretrained CNN weights provisioned offline from the package registries (``make weights``).

``keras.applications``' ``weights="imagenet"`` downloads from the internet, which
is not reachable here, so ``make weights`` (``python -m cxr_pipeline.models.weights
provision``) builds the no-top weight files from two pinned registry packages:

* **InceptionV3** from npm ``nsfwjs@4.3.0``: a Keras-2.2.4 InceptionV3 exported
  for TensorFlow.js (topology JS + uint8-quantized weight shards). Its layers are
  copied in creation order onto ``keras.applications.InceptionV3``. CAUTION: only
  the layers up to ``mixed5`` (the ones nsfwjs froze) are ImageNet; the later
  blocks were fine-tuned on the nsfwjs task. ``mixed5`` features are the safer
  choice for chest X-rays (they also scored better on PneumoniaMNIST). The
  dequantization (uint8 -> float) also makes them an approximation of the
  original ImageNet weights.
* **Xception** from PyPI ``pneumonia-model-package==0.3.0``: a Keras 3 model that
  wraps a frozen ``Xception(weights="imagenet", include_top=False)``; its backbone
  is copied onto ``keras.applications.Xception``.

Both models expect Keras' own ``preprocess_input`` (pixels scaled to [-1, 1]).

``.local/weights/manifest.json`` records, per model: the file's sha256, how many
layers/arrays were assigned, a feature checksum on a fixed seeded input, and the
largest difference to an independent reference (the tfjs topology rebuilt by
Keras' legacy loader, or the wheel's own Xception). ``verify`` recomputes them.

The jobs only need :mod:`cxr_pipeline.models.weights` (where the files are).
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
import re
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_pipeline import paths
from cxr_pipeline.infra import registry_assets
from cxr_pipeline.models.weights import WEIGHT_FILES, default_weights_path

MANIFEST_NAME = "manifest.json"
STAMP_NAME = ".provisioned"
TOLERANCE = 1e-4
CHECK_INPUT_SEED = 20240229
# The reference models have fixed input sizes: nsfwjs 299x299, the wheel's Xception 150x150.
CHECK_INPUT_SHAPES = {"InceptionV3": (2, 299, 299, 3), "Xception": (2, 150, 150, 3)}


NSFWJS_MODEL_DIR = "package/dist/models/inception_v3/"


class WeightsVerificationError(RuntimeError):
    """A provisioned weights file does not match its manifest."""


def _log(message: str) -> None:
    print(f"[weights] {message}", file=sys.stderr, flush=True)


def build_notop_model(model_name: str, input_shape=None):
    """An un-weighted ``keras.applications`` no-top model, the target of the conversion."""
    import keras

    builders = {"InceptionV3": keras.applications.InceptionV3, "Xception": keras.applications.Xception}
    return builders[model_name](weights=None, include_top=False, input_shape=input_shape)


# ----------------------------------------------------------- nsfwjs InceptionV3


def _js_literal_to_json(literal: str) -> object:
    """Parse the minified JS object literal of a tfjs ``model.min.js``.

    The minifier drops key quotes, leading zeros (``.5``) and writes booleans as
    ``!0``/``!1``; the topology holds no strings with those patterns.
    """
    text = re.sub(r"(?<=[{,])([A-Za-z_$][\w$]*):", r'"\1":', literal)
    text = re.sub(r"(?<=[:\[,])(-?)\.(\d)", r"\g<1>0.\2", text)
    text = re.sub(r"(?<=[:\[,])!0(?=[,}\]])", "true", text)
    text = re.sub(r"(?<=[:\[,])!1(?=[,}\]])", "false", text)
    return json.loads(text)


def _balanced_object(text: str, start: int) -> str:
    """The ``{...}`` starting at ``start``, skipping braces inside strings."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    raise ValueError("unbalanced object literal")


def read_tfjs_model_js(source: str) -> dict:
    """``{"modelTopology": ..., "weightsManifest": ...}`` from a browserified ``model.min.js``."""
    marker = source.find("exports={")
    if marker < 0:
        raise ValueError("model.min.js: no `exports={` found; unexpected wrapping")
    return _js_literal_to_json(_balanced_object(source, marker + len("exports=")))


def read_tfjs_shard_js(source: str) -> bytes:
    """The weight bytes of one ``group1-shardXofN.min.js``: its single long base64 string."""
    strings = re.findall(r'"([A-Za-z0-9+/]{64,}={0,2})"', source)
    if len(strings) != 1:
        raise ValueError(f"shard: expected one base64 string literal, found {len(strings)}")
    return base64.b64decode(strings[0], validate=True)


def dequantize_tfjs_weights(weights_manifest: list, shards: dict[str, bytes]) -> dict[str, np.ndarray]:
    """tfjs weight name -> float32 array; uint8 values map to ``byte * scale + min``."""
    arrays: dict[str, np.ndarray] = {}
    for group in weights_manifest:
        buffer = b"".join(shards[name] for name in group["paths"])
        offset = 0
        for spec in group["weights"]:
            quant = spec.get("quantization")
            if not quant or quant.get("dtype") != "uint8" or spec["dtype"] != "float32":
                raise ValueError(f"{spec['name']}: only uint8-quantized float32 weights are supported")
            count = math.prod(spec["shape"])
            raw = np.frombuffer(buffer, dtype=np.uint8, count=count, offset=offset)
            offset += count
            values = raw.astype(np.float64) * quant["scale"] + quant["min"]
            arrays[spec["name"]] = values.astype(np.float32).reshape(spec["shape"])
        if offset != len(buffer):
            raise ValueError(f"weight shards hold {len(buffer)} bytes, the manifest describes {offset}")
    return arrays


@dataclass
class TfjsModel:
    topology: dict
    weights: dict[str, np.ndarray]

    @property
    def layers(self) -> list[dict]:
        return self.topology["model_config"]["config"]["layers"]

    def layer_names(self, class_name: str) -> list[str]:
        """Names of one layer class in creation order (Keras 2 numbered them conv2d_1, conv2d_2, ...)."""
        names = [layer["name"] for layer in self.layers if layer["class_name"] == class_name]
        return sorted(names, key=_name_counter)

    def imagenet_through(self) -> str:
        """The last ``mixed*`` block before the first trainable (fine-tuned) weighted layer."""
        last_frozen_block = None
        for layer in self.layers:
            if layer["class_name"] in ("Conv2D", "BatchNormalization", "Dense") and layer["config"].get("trainable"):
                break
            if layer["name"].startswith("mixed"):
                last_frozen_block = layer["name"]
        return last_frozen_block or "none"


def load_nsfwjs_inception(tarball: Path) -> TfjsModel:
    with tarfile.open(tarball) as archive:

        def read(name: str) -> str:
            member = archive.extractfile(NSFWJS_MODEL_DIR + name)
            if member is None:
                raise ValueError(f"{tarball}: {NSFWJS_MODEL_DIR + name} missing")
            return member.read().decode("utf-8")

        model_js = read_tfjs_model_js(read("model.min.js"))
        shard_names = [p for group in model_js["weightsManifest"] for p in group["paths"]]
        shards = {name: read_tfjs_shard_js(read(name + ".min.js")) for name in shard_names}
    return TfjsModel(model_js["modelTopology"], dequantize_tfjs_weights(model_js["weightsManifest"], shards))


def _name_counter(name: str) -> int:
    match = re.search(r"_(\d+)$", name)
    return int(match.group(1)) if match else 0


def _creation_order(layers, class_name: str) -> list:
    """Layers of one class sorted by their auto-name counter (``conv2d``, ``conv2d_1``, ...).

    ``model.layers`` (and the tfjs topology) is topologically sorted, which is
    not the order in which the layers were created; the auto-name counter is.
    """
    return sorted(
        (layer for layer in layers if type(layer).__name__ == class_name), key=lambda layer: _name_counter(layer.name)
    )


def _assign(layer, arrays_by_var: dict[str, np.ndarray], source: str) -> int:
    """Set every variable of ``layer`` from ``arrays_by_var`` (keyed by variable name)."""
    if set(arrays_by_var) != {v.name for v in layer.weights}:
        raise ValueError(
            f"{source} -> {layer.name}: variables {sorted(arrays_by_var)} "
            f"vs {sorted(v.name for v in layer.weights)}"
        )
    for variable in layer.weights:
        value = arrays_by_var[variable.name]
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"{source} -> {layer.name}/{variable.name}: shape {value.shape} vs {tuple(variable.shape)}"
            )
        variable.assign(value)
    return len(arrays_by_var)


def _tfjs_layer_arrays(tfjs: TfjsModel, layer_name: str) -> dict[str, np.ndarray]:
    prefix = layer_name + "/"
    return {name[len(prefix) :]: value for name, value in tfjs.weights.items() if name.startswith(prefix)}


def convert_inception_v3(tfjs: TfjsModel):
    """``keras.applications.InceptionV3`` (no top) carrying the nsfwjs weights, and assignment counts."""
    model = build_notop_model("InceptionV3")
    assigned_layers = assigned_arrays = 0
    for class_name in ("Conv2D", "BatchNormalization"):
        source_names = tfjs.layer_names(class_name)
        targets = _creation_order(model.layers, class_name)
        if len(source_names) != len(targets):
            raise ValueError(f"{class_name}: nsfwjs has {len(source_names)} layers, Keras {len(targets)}")
        for source_name, target in zip(source_names, targets):
            assigned_arrays += _assign(target, _tfjs_layer_arrays(tfjs, source_name), source_name)
            assigned_layers += 1
    return model, {"layers_assigned": assigned_layers, "arrays_assigned": assigned_arrays}


def tfjs_reference_model(tfjs: TfjsModel):
    """The nsfwjs network itself, rebuilt from its topology by Keras' legacy loader, weights by exact name.

    Independent of the creation-order mapping: if that mapping were wrong, the
    converted model's features would differ from this one's.
    """
    from keras.src.legacy.saving import saving_utils

    # The legacy loader consumes the config dict it is given.
    model = saving_utils.model_from_config(copy.deepcopy(tfjs.topology["model_config"]))
    for layer in model.layers:
        arrays = _tfjs_layer_arrays(tfjs, layer.name)
        if arrays or layer.weights:
            _assign(layer, arrays, layer.name)
    return model


# ------------------------------------------------------------------- Xception


def load_wheel_xception(wheel_path: Path):
    """The pneumonia-model-package Keras 3 model and its nested ImageNet Xception backbone."""
    import keras

    with zipfile.ZipFile(wheel_path) as wheel, tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / Path(registry_assets.WHEEL_XCEPTION_MODEL).name
        local.write_bytes(wheel.read(registry_assets.WHEEL_XCEPTION_MODEL))
        full = keras.saving.load_model(local, compile=False, safe_mode=True)
    backbone = full.get_layer("xception")
    return full, backbone


def convert_xception(backbone):
    model = build_notop_model("Xception")
    source, target = backbone.get_weights(), model.weights
    if len(source) != len(target):
        raise ValueError(f"Xception: wheel backbone has {len(source)} arrays, Keras {len(target)}")
    for value, variable in zip(source, target):
        if value.shape != tuple(variable.shape):
            raise ValueError(f"Xception {variable.path}: shape {value.shape} vs {tuple(variable.shape)}")
    model.set_weights(source)
    weighted_layers = sum(1 for layer in model.layers if layer.weights)
    return model, {"layers_assigned": weighted_layers, "arrays_assigned": len(source)}


# --------------------------------------------------------- checks and manifest


def check_input(model_name: str) -> np.ndarray:
    """The fixed input of the feature checksum: seeded smooth waves in [-1, 1] (preprocess_input's range).

    Smooth, image-like content keeps the deep features dense; white noise
    drives most pooled features to zero, which would make a weak checksum.
    """
    import zlib

    n, height, width, channels = CHECK_INPUT_SHAPES[model_name]
    rng = np.random.default_rng(CHECK_INPUT_SEED + zlib.crc32(model_name.encode()))
    v, u = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    x = np.zeros((n, height, width, channels))
    for _ in range(6):
        fu, fv = rng.uniform(1, 12, size=(2, n, 1, 1, channels))
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, channels))
        x += np.sin(2 * np.pi * (fu * u[None, :, :, None] + fv * v[None, :, :, None]) + phase)
    x /= np.abs(x).max()
    return x.astype(np.float32)


def pooled_features(model, x: np.ndarray, layer_name: str | None = None) -> np.ndarray:
    """Spatially averaged activations of ``layer_name`` (default: the model's output)."""
    import keras

    output = model.output if layer_name is None else model.get_layer(layer_name).output
    maps = keras.Model(model.inputs[0], output)(x, training=False)
    return np.asarray(maps, dtype=np.float64).mean(axis=(1, 2))


def feature_checksum(features: np.ndarray) -> dict:
    flat = features.reshape(-1)
    return {
        "shape": list(features.shape),
        "sum": float(flat.sum()),
        "abs_sum": float(np.abs(flat).sum()),
        "nonzero": int(np.count_nonzero(flat)),
        "samples": [float(v) for v in flat[:: max(1, flat.size // 8)][:8]],
    }


def _checksums_match(recorded: dict, actual: dict, tolerance: float = TOLERANCE) -> bool:
    if recorded["shape"] != actual["shape"]:
        return False
    for key in ("sum", "abs_sum"):
        if not math.isclose(recorded[key], actual[key], rel_tol=tolerance, abs_tol=tolerance):
            return False
    return np.allclose(recorded["samples"], actual["samples"], rtol=tolerance, atol=tolerance)


def _model_checks(model_name: str, model, reference_features: dict[str, np.ndarray]) -> dict:
    """Checksums of ``model``'s pooled features, and the largest gap to a reference model's."""
    x = check_input(model_name)
    entry = {"keras_arrays_total": len(model.weights), "feature_checksum": {}, "reference_max_abs_diff": {}}
    for layer_name, expected in reference_features.items():
        features = pooled_features(model, x, None if layer_name == "output" else layer_name)
        entry["feature_checksum"][layer_name] = feature_checksum(features)
        entry["reference_max_abs_diff"][layer_name] = float(np.abs(features - expected).max())
    return entry


def _convert_inception_v3():
    tarball = registry_assets.fetch(registry_assets.NSFWJS)
    _log(f"InceptionV3: decoding {tarball.name}")
    tfjs = load_nsfwjs_inception(tarball)
    model, counts = convert_inception_v3(tfjs)
    reference = tfjs_reference_model(tfjs)
    x = check_input("InceptionV3")
    compare = {"mixed5": pooled_features(reference, x, "mixed5"), "output": pooled_features(reference, x, "mixed10")}
    del reference
    entry = {
        "source": f"npm {registry_assets.NSFWJS.spec} {NSFWJS_MODEL_DIR} (tgz sha256 {registry_assets.NSFWJS.sha256})",
        "reference": "the nsfwjs tfjs topology rebuilt with keras' legacy loader, weights assigned by exact name",
        **counts,
        **_model_checks("InceptionV3", model, compare),
        "imagenet_through": tfjs.imagenet_through(),
        "caution": (
            "only the layers up to imagenet_through are ImageNet (frozen in nsfwjs); later blocks were "
            "fine-tuned on the nsfwjs task. Prefer feature_layer=mixed5. Weights are uint8-dequantized."
        ),
        "preprocessing": "keras.applications.inception_v3.preprocess_input (pixels to [-1, 1])",
    }
    return model, entry


def _convert_xception():
    wheel = registry_assets.fetch(registry_assets.PNEUMONIA_MODEL_PACKAGE)
    _log(f"Xception: loading the backbone from {wheel.name}")
    full, backbone = load_wheel_xception(wheel)
    model, counts = convert_xception(backbone)
    compare = {"output": pooled_features(backbone, check_input("Xception"))}
    del full, backbone
    return model, {
        "source": (
            f"PyPI {registry_assets.PNEUMONIA_MODEL_PACKAGE.spec} {registry_assets.WHEEL_XCEPTION_MODEL} "
            f"(wheel sha256 {registry_assets.PNEUMONIA_MODEL_PACKAGE.sha256})"
        ),
        "reference": "the wheel's own frozen Xception backbone",
        **counts,
        **_model_checks("Xception", model, compare),
        "imagenet_through": "all (the backbone was frozen in the wheel's model)",
        "preprocessing": "keras.applications.xception.preprocess_input (pixels to [-1, 1])",
    }


# model name -> () -> (converted keras model, manifest entry)
CONVERTERS: dict[str, Callable[[], tuple]] = {
    "InceptionV3": _convert_inception_v3,
    "Xception": _convert_xception,
}


def read_manifest(weights_dir: Path) -> dict:
    path = weights_dir / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def _write_manifest(weights_dir: Path, manifest: dict) -> None:
    path = weights_dir / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _validate_entry(model_name: str, entry: dict) -> None:
    if entry["arrays_assigned"] != entry["keras_arrays_total"]:
        raise WeightsVerificationError(
            f"{model_name}: {entry['arrays_assigned']} of {entry['keras_arrays_total']} weight arrays assigned"
        )
    worst = max(entry["reference_max_abs_diff"].values())
    if worst > TOLERANCE:
        raise WeightsVerificationError(
            f"{model_name}: converted features differ from the reference model by {worst:.3g} (> {TOLERANCE})"
        )


def provision(models=tuple(WEIGHT_FILES), weights_dir: Path | None = None, force: bool = False) -> dict:
    """Convert, check and record the weights of ``models``; models already verified are skipped."""
    weights_dir = Path(weights_dir or paths.WEIGHTS_DIR)
    weights_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(weights_dir)
    for model_name in models:
        if model_name not in CONVERTERS:
            default_weights_path(model_name, weights_dir)  # raises the explanatory error
        path = weights_dir / WEIGHT_FILES[model_name]
        entry = manifest.get(model_name)
        if not force and entry and path.exists() and registry_assets.sha256_of(path) == entry["sha256"]:
            _log(f"{model_name}: {path} already provisioned")
            continue
        model, entry = CONVERTERS[model_name]()
        _validate_entry(model_name, entry)
        staging = path.with_name(".partial-" + path.name)  # Keras wants the .weights.h5 suffix
        model.save_weights(staging)
        os.replace(staging, path)
        del model
        entry.update(file=path.name, sha256=registry_assets.sha256_of(path), bytes=path.stat().st_size)
        manifest[model_name] = entry
        _write_manifest(weights_dir, manifest)
        _log(
            f"{model_name}: wrote {path} ({entry['arrays_assigned']} arrays, "
            f"reference max |diff| {max(entry['reference_max_abs_diff'].values()):.2g})"
        )
    return manifest


def verify(models=None, weights_dir: Path | None = None) -> dict:
    """Re-check files against the manifest: sha256, load into keras.applications, feature checksums."""
    weights_dir = Path(weights_dir or paths.WEIGHTS_DIR)
    manifest = read_manifest(weights_dir)
    results = {}
    for model_name in models or tuple(WEIGHT_FILES):
        path = default_weights_path(model_name, weights_dir)
        entry = manifest.get(model_name)
        if entry is None:
            raise WeightsVerificationError(f"{model_name}: not in {weights_dir / MANIFEST_NAME}: run `make weights`")
        actual_sha = registry_assets.sha256_of(path)
        if actual_sha != entry["sha256"]:
            raise WeightsVerificationError(
                f"{model_name}: {path} sha256 {actual_sha} does not match the manifest's {entry['sha256']}; "
                f"the file is corrupt or was replaced: delete it and {weights_dir / STAMP_NAME}, "
                f"then run `make weights`"
            )
        model = build_notop_model(model_name)
        model.load_weights(path)
        x = check_input(model_name)
        for layer_name, recorded in entry["feature_checksum"].items():
            actual = feature_checksum(pooled_features(model, x, None if layer_name == "output" else layer_name))
            if not _checksums_match(recorded, actual):
                raise WeightsVerificationError(
                    f"{model_name}: feature checksum at {layer_name} is {actual['sum']:.6g}, manifest says "
                    f"{recorded['sum']:.6g} (tolerance {TOLERANCE})"
                )
        results[model_name] = "ok"
        _log(f"{model_name}: {path.name} verified (sha256, {len(model.weights)} arrays, feature checksums)")
        del model
    return results
