"""The Keras CNN path: models, tf.data over the tree, training runs on the sample
tree (CPU), reload-and-predict, Grad-CAM, and reading/writing the real local HDFS."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from job_args import NO_TRACKING  # noqa: E402
from tolerances import assert_same_features, assert_same_probabilities  # noqa: E402

from cxr_pipeline import config as config_mod  # noqa: E402
from cxr_pipeline.cnn import data, gradcam, models  # noqa: E402
from cxr_pipeline.images import layout as dataset_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_FILES = (
    "model.keras",
    "cnn.json",
    "metrics.json",
    "config.yaml",
    "history.csv",
    "predictions.csv",
    "training_curves.png",
    "roc.png",
    "confusion_matrix.png",
    "confusion_matrix_0.5.png",
    "rejected.csv",
    "calibration.png",
    "model_card.md",
)


def cnn_config(*overrides: str) -> dict:
    base = ["cnn.epochs=1", "cnn.batch_size=4", "cnn.cache=memory", "cnn.verbose=0"]
    return config_mod.load_config("local", overrides=[*base, *overrides])


def cnn_settings():
    from cxr_pipeline.cnn.settings import CnnSettings

    return CnnSettings.from_config(cnn_config())


def inception_transfer(weights, feature_layer: str):
    """The transfer model at 75 px with the configured head (cnn.inception.dense_units, .dropout)."""
    head = cnn_settings().inception
    return models.build_inception_transfer(75, weights, feature_layer, head.dense_units, head.dropout)


@pytest.fixture(scope="module")
def tree_with_junk(sample_tree, tmp_path_factory) -> Path:
    """The sample tree plus a corrupt JPEG and a stray text file in train/NORMAL."""
    root = tmp_path_factory.mktemp("cnn") / "chest_xray"
    shutil.copytree(sample_tree, root)
    good = next((root / "train" / "NORMAL").glob("*.jpeg")).read_bytes()
    (root / "train" / "NORMAL" / "IM-0001-0001.jpeg").write_bytes(good[: len(good) // 50])
    (root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def small_run(tree_with_junk, tmp_path_factory):
    from cxr_pipeline.cnn.train import train_and_evaluate

    out = tmp_path_factory.mktemp("cnn_run") / "run"
    # equalized: cnn.json must carry it to prediction (test_saved_model_reloads_and_predicts_the_same_probabilities)
    config = cnn_config("cnn.model=small_cnn", "data.intensity=equalize")
    metrics = train_and_evaluate(config, str(tree_with_junk), str(out))
    return out, metrics


# ----------------------------------------------------------------- models


def test_cnn_settings_refuse_an_unknown_intensity_mode():
    from cxr_pipeline.cnn.train import Settings

    assert Settings.from_config(cnn_config("data.intensity=none")).intensity == "none"
    with pytest.raises(config_mod.ConfigError, match="data.intensity must be one of"):
        Settings.from_config(cnn_config("data.intensity=clahe"))


def test_cnn_settings_take_a_scoring_runtime_and_refuse_bf16_off_openvino():
    from cxr_pipeline.cnn.train import Settings

    assert Settings.from_config(cnn_config("cnn.runtime=openvino")).runtime == "openvino"
    with pytest.raises(config_mod.ConfigError, match="bf16 runs on OpenVINO only"):
        Settings.from_config(cnn_config("cnn.runtime=onnxruntime", "cnn.precision=bf16"))


def test_small_cnn_is_the_seeds_architecture():
    model = models.build_small_cnn(150)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("SeparableConv2D") == 8 and kinds.count("Conv2D") == 2
    assert kinds.count("MaxPooling2D") == 5 and kinds.count("BatchNormalization") == 4
    assert [layer.units for layer in model.layers if type(layer).__name__ == "Dense"] == [512, 128, 64, 1]
    assert model.input_shape == (None, 150, 150, 3) and model.output_shape == (None, 1)
    with pytest.raises(ValueError):
        models.build_small_cnn(16)


def test_inception_transfer_freezes_backbone_and_unfreezes_top_blocks():
    model = inception_transfer("none", "mixed7")
    backbone = models.backbone_of(model)
    assert backbone.output_shape[-1] == 768  # mixed7
    frozen = models.trainable_summary(model)["trainable"]
    unfrozen = models.unfreeze_top_blocks(model, 2)
    assert unfrozen and all(backbone.get_layer(n).trainable for n in unfrozen)
    assert not any(layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    # Only layers after mixed5 (the top two blocks: mixed6, mixed7) are trainable.
    names = [layer.name for layer in backbone.layers]
    assert min(names.index(n) for n in unfrozen) > names.index("mixed5")
    assert models.trainable_summary(model)["trainable"] > frozen
    with pytest.raises(ValueError):
        inception_transfer("none", "conv2d_3")


def test_inception_loads_provisioned_weights():
    from cxr_pipeline.models.weights import default_weights_path

    model = inception_transfer(None, "mixed5")
    reference = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(75, 75, 3))
    reference.load_weights(str(default_weights_path("InceptionV3")))

    def first_and_last_conv(m):
        convs = [layer for layer in m.layers if isinstance(layer, keras.layers.Conv2D)]
        return convs[0].get_weights()[0], convs[-1].get_weights()[0]

    for ours, theirs in zip(first_and_last_conv(models.backbone_of(model)), first_and_last_conv(reference)[:1]):
        np.testing.assert_array_equal(ours, theirs)
        assert np.abs(ours).sum() > 0


# ----------------------------------------------------------------- data


def test_listing_labels_and_rejects_junk(tree_with_junk):
    rejections = data.Rejections()
    records, label_names = data.list_image_tree(str(tree_with_junk), rejections)
    assert label_names == ["NORMAL", "PNEUMONIA"]
    assert len(records) == 17  # 16 sample images + the corrupt JPEG (caught at decode time)
    assert [reason for uri, reason in rejections.items if uri.endswith("notes.txt")] == ["not an image extension"]
    for r in records:
        assert r.label == (1 if "/PNEUMONIA/" in r.uri else 0)


def test_validation_carve_keeps_patients_together(tree_with_junk):
    records, _ = data.list_image_tree(str(tree_with_junk))
    train, val, test = data.split_records(records, "carve", 0.25, seed=42)
    assert {r.split for r in test} == {"test"}
    train_patients = {dataset_layout.patient_id(r.file_name) for r in train}
    assert train_patients.isdisjoint(dataset_layout.patient_id(r.file_name) for r in val)
    folder_train, folder_val, _ = data.split_records(records, "folder", 0.25, 42)
    assert {r.split for r in folder_val} == {"val"} and {r.split for r in folder_train} == {"train"}
    assert val and len(train) + len(val) == len(folder_train) + len(folder_val)


def test_carve_pools_the_val_folder_like_the_spark_job(tree_with_junk):
    """The Spark job (training.assign_subsets) carves from train + val pooled; so must the CNN."""
    from cxr_pipeline.images import splits

    records, _ = data.list_image_tree(str(tree_with_junk))
    train, val, _ = data.split_records(records, "carve", 0.25, seed=42)
    pooled = [r for r in records if r.split in ("train", "val")]
    assert any(r.split == "val" for r in pooled)
    assert sorted(r.uri for r in train + val) == sorted(r.uri for r in pooled)  # no val/ image dropped
    spark_flags = splits.is_validation([r.file_name for r in pooled], [r.label for r in pooled], 0.25, 42)
    assert sorted(r.uri for r in val) == sorted(r.uri for r, f in zip(pooled, spark_flags) if f)


def test_decoding_matches_imaging_and_excludes_corrupt_files(tree_with_junk):
    from cxr_pipeline.images import decode as imaging

    records, _ = data.list_image_tree(str(tree_with_junk / "train"))  # layout: .../train/CLASS/file
    rejections = data.Rejections()
    ds = data.decoded_dataset(records, 64, rejections, cache="memory")
    good = data.prepare(ds, records, rejections)
    assert len(good) == len(records) - 1
    assert [Path(u).name for u, _ in rejections.items] == ["IM-0001-0001.jpeg"]
    images = np.concatenate([x.numpy() for x, _ in ds.batch(32)])
    expected = imaging.decode_image(Path(good[0].uri).read_bytes(), size=(64, 64))
    np.testing.assert_array_equal(images[0], expected)
    assert images.dtype == np.uint8 and images.shape == (len(good), 64, 64, 3)
    # The cache is filled: a second pass decodes nothing more (no new rejection is recorded).
    assert len(list(ds)) == len(good) and len(rejections.items) == 1
    equalized = data.decoded_dataset(good[:1], 64, data.Rejections(), cache=None, intensity="equalize")
    [(first, _)] = list(equalized)
    uri = good[0].uri
    np.testing.assert_array_equal(
        first.numpy(), imaging.decode_image(Path(uri).read_bytes(), (64, 64), intensity="equalize")
    )
    assert not np.array_equal(first.numpy(), expected)


def test_augmentation_and_oversampling_batches(tree_with_junk):
    records, _ = data.list_image_tree(str(tree_with_junk / "train"))
    rejections = data.Rejections()
    ds = data.decoded_dataset(records, 48, rejections, cache="memory")
    good = data.prepare(ds, records, rejections)
    labels = [r.label for r in good]
    settings = cnn_settings()
    aug = data.augmenter(**asdict(settings.augment), seed=1)
    batches, steps = data.training_dataset(
        ds, labels, 4, seed=1, augment=aug, balance="oversample", shuffle_buffer=settings.shuffle_buffer
    )
    assert steps == len(good) // 4
    seen = np.concatenate([y.numpy() for _, y in batches.take(50)])
    assert 0.3 < seen.mean() < 0.7  # 3 NORMAL vs 4 PNEUMONIA drawn at 50/50
    x, _ = next(iter(batches))
    assert x.dtype == np.float32 and x.shape == (4, 48, 48, 3) and float(x.numpy().max()) <= 255.0


# ----------------------------------------------------------------- training runs


def test_devices_on_cpu_say_so():
    from cxr_pipeline.cnn.train import configure_devices

    devices, strategy = configure_devices("auto", "auto")
    assert devices.gpus == [] and not devices.mixed_precision and not devices.xla
    assert "CPU only" in devices.describe() and strategy.num_replicas_in_sync == 1


@pytest.mark.parametrize("xla", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gpu_settings_forced_on_cpu_train_in_mixed_precision(xla):
    """The GPU path's switches (mixed precision, XLA) work when forced, even on CPU
    (XLA compilation on 2 CPU cores takes over a minute, hence slow)."""
    from cxr_pipeline.cnn.train import compile_model, configure_devices

    try:
        devices, strategy = configure_devices(mixed_precision=True, xla=xla)
        assert devices.mixed_precision and devices.xla == xla
        with strategy.scope():
            model = models.build_small_cnn(32)
            compile_model(model, 1e-3, devices.xla)
        assert model.layers[1].compute_dtype == "float16" and model.output.dtype == "float32"
        x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
        history = model.fit(x, np.array([0, 1, 0, 1], np.float32), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_small_cnn_run_outputs_are_well_formed(small_run):
    out, metrics = small_run
    for name in RUN_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["evaluated_on"] == "test" and saved["model"] == "small_cnn" and saved["image_size"] == 150
    test = saved["test"]
    assert test["n"] == 4 and test["class_counts"] == [2, 2]
    for key in ("at_0.5", "at_threshold"):
        cm = np.array(test[key]["confusion_matrix"])
        assert cm.shape == (2, 2) and cm.sum() == test["n"]
        assert set(test[key]) >= {"accuracy", "precision", "recall", "f1", "specificity"}
    assert test["at_threshold"]["threshold"] == saved["threshold"]
    assert 0.0 <= test["auc"] <= 1.0
    assert saved["rejected"] == 2  # notes.txt + the corrupt JPEG
    assert sum(saved["class_counts"]["train"] + saved["class_counts"]["val"]) == 12  # train/ 8 + val/ 4, pooled
    for key in ("at_0.5", "at_threshold"):
        block = test["intervals"][key]
        assert block["threshold"] == test[key]["threshold"] and block["accuracy"]["value"] == test[key]["accuracy"]
        lo, hi = block["accuracy"]["ci95"]
        assert lo <= block["accuracy"]["value"] <= hi
    assert 0.0 <= test["brier"] <= 1.0 and sum(test["calibration"]["count"]) == 4
    card = (out / "model_card.md").read_text()
    assert "Measured on: the dataset's test folder (n=4)" in card and "## Known failure modes" in card
    assert "intensity equalize." in card
    assert len(saved["history"]["loss"]) == 1 and saved["train_images_per_s"][0] > 0
    rejected = (out / "rejected.csv").read_text()
    assert "IM-0001-0001.jpeg" in rejected and "notes.txt" in rejected
    meta = json.loads((out / "cnn.json").read_text())
    assert meta["image_size"] == 150 and meta["label_names"] == ["NORMAL", "PNEUMONIA"]
    assert meta["intensity"] == "equalize"
    defaults = config_mod.load_config("local")["cnn"]
    assert (meta["runtime"], meta["precision"]) == (defaults["runtime"], defaults["precision"])  # what scores it
    conf = config_mod.read_yaml(out / "config.yaml")
    assert conf["cnn"]["model"] == "small_cnn" and conf["cnn"]["epochs"] == 1
    assert saved["threshold_choice"]["rule"] == conf["training"]["threshold_rule"]  # the Spark job's rule


def test_saved_model_reloads_and_predicts_the_same_probabilities(small_run):
    from cxr_pipeline.cnn.predict import LocalCnnClassifier

    out, metrics = small_run
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["used_as"] for r in rows} == {"val", "test"}
    for source in (out, out / "model.keras"):
        classifier = LocalCnnClassifier.load(str(source))
        assert classifier.intensity == "equalize"
        results = classifier.predict_bytes([Path(r["path"]).read_bytes() for r in rows] + [b"junk"])
        got = np.array([res["probability"] for res in results[:-1]])
        assert_same_probabilities(got, [float(r["probability"]) for r in rows])
        assert results[-1]["error"] and results[-1]["probability"] is None
    assert classifier.threshold == metrics["threshold"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_cnn_saved_for_another_runtime_scores_the_keras_probabilities(small_run, tmp_path, runtime):
    """cnn.json names the runtime (cnn.runtime at training); the model is converted and scored on it."""
    from cxr_pipeline.cnn.predict import LocalCnnClassifier

    out, _ = small_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    meta = json.loads((run / "cnn.json").read_text())
    (run / "cnn.json").write_text(json.dumps({**meta, "runtime": runtime, "precision": "fp32"}))
    classifier = LocalCnnClassifier.load(str(run))
    assert classifier.scorer is not None and classifier.scorer.runtime == runtime
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    results = classifier.predict_bytes([Path(r["path"]).read_bytes() for r in rows])
    assert_same_probabilities([res["probability"] for res in results], [float(r["probability"]) for r in rows])


def test_gradcam_heatmap_shape_and_range(small_run, sample_tree):
    from cxr_pipeline.cnn.predict import LocalCnnClassifier

    out, _ = small_run
    classifier = LocalCnnClassifier.load(str(out))
    image = next((sample_tree / "test" / "PNEUMONIA").glob("*.jpeg")).read_bytes()
    batch, _, _ = classifier.decode([image])
    heat = gradcam.gradcam_heatmap(classifier.model, batch)
    assert heat.shape == (1, 150, 150) and heat.min() >= 0.0 and heat.max() <= 1.0
    assert gradcam.overlay(batch[0], heat[0]).shape == (150, 150, 3)


def test_gradcam_points_at_the_informative_region():
    """Evidence only in the top-left quadrant of the image: the heat is there."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer="ones", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="ones")(x)
    model = keras.Model(inputs, outputs)
    images = np.zeros((2, 32, 32, 3), np.float32)
    images[:, 2:14, 2:14] = np.random.default_rng(0).uniform(0.01, 0.05, (2, 12, 12, 3))
    heat = gradcam.gradcam_heatmap(model, images, layer_name="conv")
    assert heat[:, 2:14, 2:14].mean() > 0.3
    assert heat[:, 18:, 18:].max() < 0.05


@pytest.mark.slow
def test_augmentation_inside_the_model_saves_the_bare_model(sample_tree, tmp_path):
    from cxr_pipeline.cnn.train import train_and_evaluate

    config = cnn_config("cnn.image_size=48", "cnn.augment_on=model")
    train_and_evaluate(config, str(sample_tree), str(tmp_path / "run"))
    saved = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert saved.name == "small_cnn" and saved.input_shape == (None, 48, 48, 3)
    assert not any(layer.name == "augmentation" for layer in saved.layers)


@pytest.mark.slow
def test_inception_transfer_one_epoch_with_fine_tuning(tree_with_junk, tmp_path):
    from cxr_pipeline.cnn.predict import LocalCnnClassifier
    from cxr_pipeline.cnn.train import train_and_evaluate

    config = cnn_config(
        "cnn.model=inception_v3",
        "cnn.image_size=75",
        "cnn.inception.feature_layer=mixed5",
        "cnn.fine_tune.epochs=1",
        "cnn.fine_tune.blocks=1",
    )
    metrics = train_and_evaluate(config, str(tree_with_junk), str(tmp_path / "run"))
    assert len(metrics["history"]["loss"]) == 2  # one frozen epoch + one fine-tuning epoch
    rows = list(csv.DictReader((tmp_path / "run" / "predictions.csv").open()))
    classifier = LocalCnnClassifier.load(str(tmp_path / "run"))
    got = [r["probability"] for r in classifier.predict_bytes([Path(r["path"]).read_bytes() for r in rows])]
    assert_same_probabilities(got, [float(r["probability"]) for r in rows])
    check_exported_backbone(tmp_path / "run", [Path(r["path"]).read_bytes() for r in rows])


def check_exported_backbone(run: Path, images: list[bytes]) -> None:
    """The exported backbone file, loaded as the featurizer loads it, gives the trained backbone's pooled features."""
    from cxr_pipeline.cnn.run_outputs import BACKBONE_FILE
    from cxr_pipeline.images import decode as imaging
    from cxr_pipeline.models import backbones

    backbone = json.loads((run / "cnn.json").read_text())["backbone"]
    exported = run / BACKBONE_FILE
    assert backbone["weights_sha256"] == backbones.file_sha256(exported)
    assert (backbone["feature_layer"], backbone["image_size"]) == ("mixed5", 75)
    size = (75, 75)
    pixels = np.stack([imaging.decode_image(b, size, intensity=backbone["intensity"]) for b in images])

    def features(weights):
        model = backbones.build_backbone("InceptionV3", weights, "mixed5", image_size=size)
        return backbones.featurize_arrays(model, "InceptionV3", pixels)

    trained = models.backbone_of(keras.models.load_model(run / "model.keras"))
    pooled = keras.layers.GlobalAveragePooling2D()(trained(backbones.preprocess("InceptionV3", pixels)))
    assert_same_features(features(str(exported)), np.asarray(pooled))


def test_exported_backbone_carries_the_trained_values(sample_tree, tmp_path):
    """Values changed in the cut backbone (as fine-tuning changes them) reach the featurizer through the file;
    layers past the cut keep the start weights so the file loads into a whole no-top InceptionV3."""
    from cxr_pipeline.images import decode as imaging
    from cxr_pipeline.models import backbones

    model = inception_transfer(None, "mixed5")
    conv = [layer for layer in models.backbone_of(model).layers if layer.weights][-1]
    conv.set_weights([w + 0.05 for w in conv.get_weights()])
    models.export_backbone(model, None, tmp_path / "backbone.weights.h5")
    pixels = np.stack([imaging.decode_image(p.read_bytes(), (75, 75)) for p in sorted(sample_tree.rglob("*.jpeg"))[:4]])
    x = backbones.preprocess("InceptionV3", pixels)
    expected = np.asarray(keras.layers.GlobalAveragePooling2D()(models.backbone_of(model)(x)))

    def features(weights):
        built = backbones.build_backbone("InceptionV3", weights, "mixed5", image_size=75)
        return backbones.featurize_arrays(built, "InceptionV3", pixels)

    assert_same_features(features(str(tmp_path / "backbone.weights.h5")), expected)
    assert not np.allclose(features(None), expected, atol=1e-3)


@pytest.mark.hdfs
def test_pipeline_reads_the_real_hdfs_with_the_same_pixels(sample_tree, hdfs_tmp):
    from cxr_pipeline.infra import storage

    storage.upload_dir(str(sample_tree / "test"), f"{hdfs_tmp}/chest_xray/test")
    storage.write_bytes(f"{hdfs_tmp}/chest_xray/test/NORMAL/IM-0002-0001.jpeg", b"\xff\xd8\xff truncated")
    records, _ = data.list_image_tree(f"{hdfs_tmp}/chest_xray")
    assert len(records) == 5 and all(r.uri.startswith("hdfs://") for r in records)
    rejections = data.Rejections()
    ds = data.decoded_dataset(records, 64, rejections, cache=None)
    good = data.prepare(ds, records, rejections)
    assert [Path(u).name for u, _ in rejections.items] == ["IM-0002-0001.jpeg"] and len(good) == 4
    local, _ = data.list_image_tree(str(sample_tree))
    local_test = [r for r in local if r.split == "test"]
    local_ds = data.decoded_dataset(local_test, 64, data.Rejections(), cache=None)
    remote_images = np.concatenate([x.numpy() for x, _ in ds.batch(8)])
    local_images = np.concatenate([x.numpy() for x, _ in local_ds.batch(8)])
    np.testing.assert_array_equal(remote_images, local_images)


@pytest.mark.hdfs
@pytest.mark.slow
def test_train_from_and_to_the_real_hdfs(sample_tree, hdfs_tmp):
    from cxr_pipeline.cnn.predict import LocalCnnClassifier
    from cxr_pipeline.infra import storage

    data_uri = f"{hdfs_tmp}/chest_xray"
    storage.upload_dir(str(sample_tree), data_uri)
    out_uri = f"{hdfs_tmp}/runs/cnn"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "train_cnn.py"),
            "--data",
            data_uri,
            "--out",
            out_uri,
            "--model",
            "small_cnn",
            "--image-size",
            "64",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--cache",
            "disk",
            "--verbose",
            "2",
            *NO_TRACKING,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "devices: CPU only" in proc.stderr
    names = {Path(info.uri).name for info in storage.list_files(out_uri)}
    assert set(RUN_FILES) <= names
    metrics = json.loads(storage.read_bytes(f"{out_uri}/metrics.json"))
    assert metrics["data"] == data_uri and metrics["test"]["n"] == 4
    rows = list(csv.DictReader(storage.read_bytes(f"{out_uri}/predictions.csv").decode().splitlines()))
    assert all(r["path"].startswith("hdfs://") for r in rows)
    classifier = LocalCnnClassifier.load(out_uri)
    got = [r["probability"] for r in classifier.predict_bytes([storage.read_bytes(r["path"]) for r in rows])]
    assert_same_probabilities(got, [float(r["probability"]) for r in rows])


def test_job_help():
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_cnn.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--model" in proc.stdout and "--set" in proc.stdout


def write_packed_table(tree: Path, table: Path) -> None:
    """The packed-table layout of jobs/pack_images.py (split=<s>/part-*.parquet; path, content, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split_dir in sorted(p for p in tree.iterdir() if p.is_dir()):
        files = sorted(split_dir.glob("*/*.jpeg"))
        (table / f"split={split_dir.name}").mkdir(parents=True)
        pq.write_table(
            pa.table(
                {
                    "path": [f"file:{f}" for f in files],
                    "label_name": [f.parent.name for f in files],
                    "content": [f.read_bytes() for f in files],
                }
            ),
            table / f"split={split_dir.name}" / "part-00000.parquet",
            row_group_size=3,
        )
    (table / "_rejected").mkdir()
    (table / "_rejected" / "part-0.csv").write_text("path,reason\n")


def test_packed_parquet_table_gives_the_same_records_and_pixels(sample_tree, tmp_path):
    write_packed_table(sample_tree, tmp_path / "table")
    assert data.is_image_table(str(tmp_path / "table")) and not data.is_image_table(str(sample_tree))
    table_splits = data.load_splits(str(tmp_path / "table"), "carve", 0.25, 42)
    tree_splits = data.load_splits(str(sample_tree), "carve", 0.25, 42)
    for name in ("train", "val", "test"):
        got = [(Path(r.uri).name, r.label) for r in getattr(table_splits, name)]
        want = [(Path(r.uri).name, r.label) for r in getattr(tree_splits, name)]
        assert sorted(got) == sorted(want) and got
    records = table_splits.train
    ds = data.decoded_dataset(records, 48, data.Rejections(), cache=None)
    tree_by_name = {Path(r.uri).name: r for r in tree_splits.train}
    tree_ds = data.decoded_dataset([tree_by_name[Path(r.uri).name] for r in records], 48, data.Rejections(), cache=None)
    pairs = list(zip(ds, tree_ds))
    assert len(pairs) == len(records)
    for (a, la), (b, lb) in pairs:
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert float(la) == float(lb)
