"""ONNX Runtime and OpenVINO run the featurizer's backbone: the same model as Keras, by tests/tolerances.py.

On the provisioned InceptionV3 weights and the 16 real X-rays of data/sample, at the default layer and size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import assert_same_features, assert_same_probabilities

from cxr_pipeline.images.decode import decode_image
from cxr_pipeline.models.backbones import (
    BackboneError,
    WeightsMismatchError,
    featurize_arrays,
    file_sha256,
    resolve_weights_file,
)
from cxr_pipeline.models.runtimes import RuntimeUnavailableError, build_feature_model, converted_onnx
from cxr_pipeline.spark.featurizer import FeaturizerSettings

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = FeaturizerSettings.defaults()
MODEL, LAYER = DEFAULTS.model_name, DEFAULTS.feature_layer
OTHER_RUNTIMES = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def weights() -> str:
    return resolve_weights_file(MODEL, None)


@pytest.fixture(scope="module")
def pixels(sample_tree) -> np.ndarray:
    from cxr_pipeline.models.backbones import resolve_image_size

    size = resolve_image_size(MODEL, DEFAULTS.image_size)
    paths = sorted(sample_tree.rglob("*.jpeg"))
    assert len(paths) >= 16
    return np.stack([decode_image(p.read_bytes(), size, intensity=DEFAULTS.intensity) for p in paths])


@pytest.fixture(scope="module")
def keras_features(pixels, weights) -> np.ndarray:
    model = build_feature_model(MODEL, feature_layer=LAYER, weights_sha256=file_sha256(weights), runtime="keras")
    return featurize_arrays(model, MODEL, pixels, DEFAULTS.batch_size)


@pytest.mark.parametrize("runtime", OTHER_RUNTIMES)
def test_fp32_features_are_the_keras_features(runtime, pixels, weights, keras_features):
    model = build_feature_model(MODEL, feature_layer=LAYER, weights_sha256=file_sha256(weights), runtime=runtime)
    got = featurize_arrays(model, MODEL, pixels, DEFAULTS.batch_size)
    assert got.shape == keras_features.shape
    assert_same_features(got, keras_features)


def test_a_replaced_weights_file_is_refused_before_any_conversion(tmp_path, weights):
    with pytest.raises(WeightsMismatchError, match="refusing to score with other weights"):
        build_feature_model(MODEL, feature_layer=LAYER, weights_sha256="0" * 64, runtime="onnxruntime")


def test_bf16_runs_on_openvino_only_and_only_where_the_cpu_computes_it(pixels, keras_features):
    import openvino as ov

    with pytest.raises(BackboneError, match="bf16 runs on OpenVINO only"):
        build_feature_model(MODEL, feature_layer=LAYER, runtime="onnxruntime", precision="bf16")
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # AMX / avx512_bf16
        model = build_feature_model(MODEL, feature_layer=LAYER, runtime="openvino", precision="bf16")
        got = featurize_arrays(model, MODEL, pixels, DEFAULTS.batch_size)
        # bf16 keeps 8 bits of mantissa: close to fp32, not inside the fp32 tolerances.
        assert np.max(np.abs(got - keras_features)) < 2e-2 * np.max(np.abs(keras_features))
    else:
        with pytest.raises(RuntimeUnavailableError, match="Use featurizer.precision=fp32"):
            build_feature_model(MODEL, feature_layer=LAYER, runtime="openvino", precision="bf16")


def test_the_conversion_is_cached_beside_the_weights_keyed_by_hash_and_spec(tmp_path, weights):
    copy = tmp_path / "backbone.weights.h5"
    shutil.copyfile(weights, copy)
    first = converted_onnx(MODEL, str(copy), "mixed0", 75)
    assert first.parent == tmp_path / "converted"
    key = json.loads(first.with_suffix(".json").read_text())
    assert key["weights"] == file_sha256(weights) and key["feature_layer"] == "mixed0"
    assert key["converter"]["tf2onnx"] and key["converter"]["keras"]
    made = first.stat().st_mtime_ns
    assert converted_onnx(MODEL, str(copy), "mixed0", 75) == first and first.stat().st_mtime_ns == made  # reused
    assert converted_onnx(MODEL, str(copy), "mixed0", 96) != first  # another input size is another file
    assert not [p for p in first.parent.iterdir() if ".part" in p.name]


def test_two_processes_converting_at_once_convert_once(tmp_path):
    """Each process asks for the same (random-weights) backbone; the second waits for the first's file."""
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
        "from cxr_pipeline.models.runtimes import converted_onnx\n"
        "print('FILE', converted_onnx('InceptionV3', None, 'mixed0', 75))\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO / "lib")}  # random weights: cached in TMPDIR
    runs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    files = {line.split(" ", 1)[1] for out in outputs for line in out.splitlines() if line.startswith("FILE ")}
    assert len(files) == 1
    assert sum(out.count("converting InceptionV3") for out in outputs) == 1
    folder = Path(next(iter(files))).parent
    assert not [p for p in folder.iterdir() if ".part" in p.name]
    import onnxruntime

    onnxruntime.InferenceSession(next(iter(files)), providers=["CPUExecutionProvider"])  # a complete file


def test_a_converted_backbone_runs_without_loading_tensorflow(weights):
    converted_onnx(MODEL, weights, LAYER, DEFAULTS.image_size)  # cached by now, or made here
    script = (
        "import sys\n"
        "from cxr_pipeline.models.runtimes import build_feature_model\n"
        f"build_feature_model({MODEL!r}, feature_layer={LAYER!r}, runtime='onnxruntime')\n"
        "print('tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_spark_free_scorer_uses_the_runtime_saved_with_the_model(pixels, keras_features, weights):
    from cxr_pipeline.spark.classifier.model_export import LocalClassifier, score_features

    rng = np.random.default_rng(0)
    dim = keras_features.shape[1]
    spec = {
        "model_name": MODEL,
        "feature_layer": LAYER,
        "image_size": list(pixels.shape[1:3]),
        "weights": None,
        "weights_sha256": file_sha256(weights),
        "max_pixels": DEFAULTS.max_pixels,
        "intensity": DEFAULTS.intensity,
        "label_names": ["NORMAL", "PNEUMONIA"],
        "scaler": {
            "with_mean": True,
            "with_std": True,
            "mean": keras_features.mean(0).tolist(),
            "std": (keras_features.std(0) + 1e-3).tolist(),
        },
        "coefficients": (rng.normal(size=dim) / np.sqrt(dim)).tolist(),
        "intercept": 0.0,
        "threshold": 0.5,
        "runtime": "onnxruntime",
        "precision": "fp32",
    }
    classifier = LocalClassifier(spec)
    assert classifier.backbone().runtime == "onnxruntime"
    assert_same_probabilities(score_features(spec, classifier.features(pixels)), score_features(spec, keras_features))
    older = {k: v for k, v in spec.items() if k not in ("runtime", "precision")}  # exported before the setting
    assert LocalClassifier(older).runtime == ("keras", "fp32")
