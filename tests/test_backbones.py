"""Backbones from keras.applications as feature extractors (TensorFlow, no Spark)."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import assert_same_features

from cxr_pipeline.models import backbones
from cxr_pipeline.models.backbones import BackboneError, build_backbone, featurize_arrays, input_size, preprocess


@pytest.mark.parametrize(
    "model_name, module",
    [
        ("InceptionV3", "inception_v3"),
        ("Xception", "xception"),
        ("ResNet50", "resnet50"),
        ("MobileNetV2", "mobilenet_v2"),
        ("DenseNet121", "densenet"),
    ],
)
def test_preprocess_matches_keras(model_name, module):
    import keras

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = getattr(keras.applications, module).preprocess_input(batch.astype(np.float32).copy())
    np.testing.assert_allclose(preprocess(model_name, batch), np.asarray(expected), rtol=1e-5, atol=1e-4)
    assert preprocess(model_name, batch).dtype == np.float32


def test_inception_scales_to_minus_one_one():
    out = preprocess("InceptionV3", np.array([[[[0, 255, 127]]]], np.uint8))
    assert out.min() == -1.0 and out.max() == 1.0


def test_input_sizes():
    assert input_size("InceptionV3") == (299, 299)
    assert input_size("ResNet50") == (224, 224)
    with pytest.raises(BackboneError, match="unknown backbone"):
        input_size("AlexNet")


def test_random_backbone_is_deterministic_and_pools_the_chosen_layer():
    first = build_backbone("InceptionV3", weights="random", feature_layer="mixed0")
    second = build_backbone("InceptionV3", weights="random", feature_layer="mixed0")
    assert first.output.shape[-1] == 256  # mixed0 has 256 channels
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    a = featurize_arrays(first, "InceptionV3", batch, batch_size=2)
    b = featurize_arrays(second, "InceptionV3", batch, batch_size=2)
    assert a.shape == (3, 256) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # chunking and padding must not change anything: same as one plain predict call
    plain = first.predict(preprocess("InceptionV3", batch), verbose=0)
    assert_same_features(a, plain)
    assert not np.allclose(a[0], a[1])  # different images, different features


def test_weights_file_round_trip(tmp_path):
    model = build_backbone("MobileNetV2", weights="random", feature_layer="block_1_project_BN")
    base_file = tmp_path / "mobilenet.weights.h5"
    # the file a featurizer loads holds the weights of the no-top base
    import keras

    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(224, 224, 3))
    base.set_weights([w * 0 + 0.01 for w in base.get_weights()])
    base.save_weights(base_file)
    loaded = build_backbone("MobileNetV2", weights=str(base_file), feature_layer="block_1_project_BN")
    assert all(np.allclose(w, 0.01) for w in loaded.get_weights())
    assert not all(np.allclose(w, 0.01) for w in model.get_weights())


def test_missing_weights_file_says_how_to_provision(tmp_path):
    with pytest.raises(BackboneError, match="make weights"):
        build_backbone("InceptionV3", weights=str(tmp_path / "nope.weights.h5"))


def test_unknown_layer_lists_choices():
    with pytest.raises(BackboneError, match="mixed"):
        build_backbone("InceptionV3", weights="random", feature_layer="mixed99")


def test_featurize_empty_batch():
    model = build_backbone("MobileNetV2", weights="random", feature_layer="block_1_project_BN")
    out = featurize_arrays(model, "MobileNetV2", np.zeros((0, 224, 224, 3), np.uint8))
    assert out.shape == (0, backbones.feature_dim(model))


def test_several_layers_are_pooled_and_concatenated_in_one_model():
    import keras

    layers = ("block_1_project_BN", "block_3_project_BN")  # 24 and 32 channels
    both = build_backbone("MobileNetV2", weights="random", feature_layer="+".join(layers), image_size=64)
    batch = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    joined = featurize_arrays(both, "MobileNetV2", batch)
    assert joined.shape == (2, 24 + 32)
    maps = keras.Model(both.inputs, [both.get_layer(n).output for n in layers])
    expected = np.hstack([m.mean(axis=(1, 2)) for m in maps.predict(preprocess("MobileNetV2", batch), verbose=0)])
    assert_same_features(joined, expected)  # each layer average-pooled, in the order named
    assert backbones.feature_layers("mixed4 + mixed5") == ["mixed4", "mixed5"] and backbones.feature_layers(None) == [
        None
    ]
    for bad in ("mixed4++mixed5", "mixed5+mixed5"):
        with pytest.raises(BackboneError, match="once each"):
            backbones.feature_layers(bad)
