"""The offline pretrained weights (make weights): files, manifest checks, Keras loading."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import tarfile

import numpy as np
import pytest

from cxr_pipeline import paths
from cxr_pipeline.infra import registry_assets
from cxr_pipeline.models import weights
from cxr_pipeline.models.weights import provisioning


@pytest.fixture(scope="module")
def provisioned():
    try:
        return {name: weights.default_weights_path(name) for name in weights.WEIGHT_FILES}
    except weights.WeightsNotFound as exc:
        pytest.fail(f"{exc} (make test does it)")


@pytest.fixture(scope="module")
def inception(provisioned):
    import keras

    return keras.applications.InceptionV3(weights=str(provisioned["InceptionV3"]), include_top=False)


def _h5_arrays(path) -> list[np.ndarray]:
    import h5py

    arrays = []
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda _, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def _fingerprints(arrays) -> list[tuple]:
    return sorted((tuple(a.shape), round(float(np.asarray(a, np.float64).sum()), 3)) for a in arrays)


# ------------------------------------------------------------ pure decoding


def test_js_literal_parsing_handles_minified_numbers_and_booleans():
    source = 'x(function(){n.exports={a:.5,b:[-.25,1e-3,!0,!1],c:{d:"k:v,{}"},e:null}})'
    assert provisioning.read_tfjs_model_js(source) == {
        "a": 0.5,
        "b": [-0.25, 0.001, True, False],
        "c": {"d": "k:v,{}"},
        "e": None,
    }


def test_dequantize_uses_byte_times_scale_plus_min_in_manifest_order():
    manifest = [
        {
            "paths": ["s1", "s2"],
            "weights": [
                {
                    "name": "a/kernel",
                    "shape": [2, 2],
                    "dtype": "float32",
                    "quantization": {"min": -1.0, "scale": 0.5, "dtype": "uint8"},
                },
                {
                    "name": "b/beta",
                    "shape": [2],
                    "dtype": "float32",
                    "quantization": {"min": 0.25, "scale": 2.0, "dtype": "uint8"},
                },
            ],
        }
    ]
    arrays = provisioning.dequantize_tfjs_weights(manifest, {"s1": bytes([0, 1, 2]), "s2": bytes([4, 0, 3])})
    np.testing.assert_allclose(arrays["a/kernel"], [[-1.0, -0.5], [0.0, 1.0]])
    np.testing.assert_allclose(arrays["b/beta"], [0.25, 6.25])
    with pytest.raises(ValueError, match="bytes"):
        provisioning.dequantize_tfjs_weights(manifest, {"s1": bytes([0, 1, 2]), "s2": bytes([4, 0, 3, 9])})


def test_shard_reader_takes_the_single_base64_literal():
    payload = bytes(range(256)) * 2
    literal = base64.b64encode(payload).decode()
    source = '!function(d){d()}(function(){return{1:[function(a,n){n.exports="' + literal + '"},{}]}});'
    assert provisioning.read_tfjs_shard_js(source) == payload


# ------------------------------------------------------------ API errors


def test_default_weights_path_errors(tmp_path):
    with pytest.raises(weights.WeightsNotFound, match="run `make weights`"):
        weights.default_weights_path("InceptionV3", tmp_path)
    with pytest.raises(weights.WeightsNotFound, match="no offline weights.*weights='imagenet'"):
        weights.default_weights_path("ResNet50")
    with pytest.raises(ValueError, match="unknown model 'VGG16'"):
        weights.default_weights_path("VGG16")


def test_default_weights_paths_point_at_provisioned_files(provisioned):
    assert provisioned["InceptionV3"] == paths.WEIGHTS_DIR / "inception_v3_notop.weights.h5"
    assert all(path.stat().st_size > 50_000_000 for path in provisioned.values())


# ------------------------------------------------------------ manifest


def test_manifest_records_complete_assignment_and_reference_agreement(provisioned):
    manifest = provisioning.read_manifest(paths.WEIGHTS_DIR)
    for name, path in provisioned.items():
        entry = manifest[name]
        assert entry["sha256"] == registry_assets.sha256_of(path)
        assert entry["arrays_assigned"] == entry["keras_arrays_total"] > 200
        assert max(entry["reference_max_abs_diff"].values()) <= provisioning.TOLERANCE
        assert entry["feature_checksum"]["output"]["nonzero"] > 100
    assert manifest["InceptionV3"]["imagenet_through"] == "mixed5"
    assert "fine-tuned" in manifest["InceptionV3"]["caution"]


def test_verify_passes_on_the_provisioned_files(provisioned):
    assert provisioning.verify() == {"InceptionV3": "ok", "Xception": "ok"}


@pytest.fixture
def xception_copy(provisioned, tmp_path):
    shutil.copy(provisioned["Xception"], tmp_path)
    manifest = provisioning.read_manifest(paths.WEIGHTS_DIR)
    (tmp_path / provisioning.MANIFEST_NAME).write_text(json.dumps({"Xception": manifest["Xception"]}))
    return tmp_path


def test_verify_rejects_a_tampered_file(xception_copy):
    path = xception_copy / weights.WEIGHT_FILES["Xception"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(provisioning.WeightsVerificationError, match="sha256 .* does not match.*make weights"):
        provisioning.verify(["Xception"], xception_copy)


def test_verify_rejects_features_that_differ_from_the_manifest(xception_copy):
    manifest_path = xception_copy / provisioning.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["Xception"]["feature_checksum"]["output"]["sum"] *= 1.01
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(provisioning.WeightsVerificationError, match="feature checksum"):
        provisioning.verify(["Xception"], xception_copy)


def test_verify_reports_a_missing_file(xception_copy):
    (xception_copy / weights.WEIGHT_FILES["Xception"]).unlink()
    with pytest.raises(weights.WeightsNotFound, match="make weights"):
        provisioning.verify(["Xception"], xception_copy)


# ------------------------------------------------------------ Keras loading


def test_inception_v3_loads_into_keras_applications_equal_to_the_file(provisioned, inception):
    assert _fingerprints(inception.get_weights()) == _fingerprints(_h5_arrays(provisioned["InceptionV3"]))
    assert len(inception.weights) == 376


def test_xception_loads_into_keras_applications_equal_to_the_file(provisioned):
    import keras

    model = keras.applications.Xception(weights=str(provisioned["Xception"]), include_top=False)
    assert _fingerprints(model.get_weights()) == _fingerprints(_h5_arrays(provisioned["Xception"]))
    # ImageNet BatchNorm statistics are far from the initial 0/1.
    variances = [w for w in model.weights if w.path.endswith("moving_variance")]
    assert not np.allclose(np.asarray(variances[0]), 1.0)


def test_first_inception_conv_matches_bytes_decoded_from_the_npm_shards(inception):
    """Independent of the converter: find conv2d_1/kernel's bytes in the shards and dequantize them here."""
    tarball = registry_assets.fetch(registry_assets.NSFWJS)
    with tarfile.open(tarball) as archive:
        model_js = archive.extractfile(provisioning.NSFWJS_MODEL_DIR + "model.min.js").read().decode()
        specs = re.findall(
            r'\{name:"([^"]+)",shape:\[([\d,]*)\],dtype:"float32",'
            r'quantization:\{min:(-?[\d.e-]+),scale:([\d.e-]+),dtype:"uint8"\}\}',
            model_js,
        )
        shards = b"".join(
            base64.b64decode(
                re.search(
                    r'"([A-Za-z0-9+/=]{1000,})"',
                    archive.extractfile(f"{provisioning.NSFWJS_MODEL_DIR}group1-shard{i}of6.min.js").read().decode(),
                ).group(1)
            )
            for i in range(1, 7)
        )
    offset = 0
    for name, shape, minimum, scale in specs:
        size = math.prod(int(s) for s in shape.split(","))
        if name == "conv2d_1/kernel":
            raw = np.frombuffer(shards, np.uint8, size, offset).astype(np.float64)
            expected = (raw * float(scale) + float(minimum)).reshape(3, 3, 3, 32)
            break
        offset += size
    first_conv = next(layer for layer in inception.layers if type(layer).__name__ == "Conv2D")
    np.testing.assert_allclose(np.asarray(first_conv.kernel), expected, atol=1e-6)
    assert np.unique(np.asarray(first_conv.kernel)).size <= 256  # uint8-quantized


def test_stage_to_local_uri(provisioned, tmp_path):
    target = weights.stage_to_hdfs("Xception", f"file://{tmp_path}/staged/")
    assert target.endswith("/staged/xception_notop.weights.h5")
    staged = tmp_path / "staged" / "xception_notop.weights.h5"
    assert registry_assets.sha256_of(staged) == registry_assets.sha256_of(provisioned["Xception"])


@pytest.mark.hdfs
def test_stage_to_hdfs(provisioned, hdfs_tmp):
    from cxr_pipeline.infra import storage

    target = weights.stage_to_hdfs("InceptionV3", hdfs_tmp + "/weights/")
    assert storage.exists(target)
    assert [f.size for f in storage.list_files(hdfs_tmp + "/weights")] == [provisioned["InceptionV3"].stat().st_size]
