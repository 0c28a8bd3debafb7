"""The Spark training job: settings, subsets, weights, tuning, and the job end to end.

End-to-end tests use the REAL featurizer (InceptionV3 up to mixed5, provisioned
weights) on the 16-image sample tree in the REAL local HDFS. The features are
cached once per pytest session (see ``sample_in_hdfs`` in conftest.py) so that the second
training and test_predict.py reuse them instead of featurizing again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from job_args import NO_TRACKING
from tolerances import assert_same_probabilities, same_probability

from cxr_pipeline import config as cfg
from cxr_pipeline.spark.classifier import training as T

REPO = Path(__file__).resolve().parents[1]
FAST_FEATURES = ["featurizer.feature_layer=mixed5", "featurizer.batch_size=8"]


# ------------------------------------------------------------------ pure


def settings(**changes) -> T.TrainingSettings:
    """The configured training settings (conf/defaults.yaml) with ``changes``."""
    from dataclasses import replace

    return replace(T.TrainingSettings.from_config(cfg.load_config("local")), **changes)


def test_settings_from_config_and_validation():
    config = cfg.load_config("local", overrides=["training.reg_param=0.5", "training.tuning=cv"])
    s = T.TrainingSettings.from_config(config)
    assert s.reg_param == 0.5 and s.tuning == "cv" and s.target_sensitivity == 0.95 and s.class_weighting
    with pytest.raises(cfg.ConfigError, match="training.threshold_rule must be one of"):
        T.TrainingSettings.from_config(cfg.load_config("local", overrides=["training.threshold_rule=coin"]))
    for bad in (
        "training.tuning=grid",
        "training.validation_fraction=1.5",
        "training.bogus=1",
        "training.validation=random",
    ):
        with pytest.raises(cfg.ConfigError):
            T.TrainingSettings.from_config(cfg.load_config("local", overrides=[bad]))
    incomplete = cfg.load_config("local")
    del incomplete["training"]["reg_param"]
    with pytest.raises(cfg.ConfigError, match="reg_param"):  # no default restated in code
        T.TrainingSettings.from_config(incomplete)


def test_feature_cache_fingerprint_covers_everything_that_makes_a_feature():
    from cxr_pipeline.spark.feature_cache import fingerprint
    from cxr_pipeline.spark.featurizer import ImageFeaturizer

    def digest(source="binaryFile", dicom=None, **params):
        base = {"featureLayer": "mixed5", "weightsSha256": "a" * 64, "runtime": "keras", "precision": "fp32", **params}
        return json.dumps(fingerprint(ImageFeaturizer(**base), source, dicom), sort_keys=True)

    base = digest()
    assert base == digest(batchSize=3)  # batching does not change a feature vector
    assert base == digest(weights="/elsewhere/same_file.h5")  # the file's hash is its identity, not its path
    assert base == digest(dicom={"patient_key": "secret"})  # secrets never enter the cache's files
    assert "secret" not in digest(dicom={"patient_key": "secret"})
    changed = [
        digest(weightsSha256="b" * 64),
        digest(maxPixels=1000),
        digest(source="image"),
        digest(imageSize=150),
        digest(featureLayer="mixed7"),
        digest(weights="random"),
        digest(dicom={"window": "percentile"}),
        digest(runtime="onnxruntime"),
        digest(runtime="openvino"),
        digest(runtime="openvino", precision="bf16"),
    ]
    assert len({base, *changed}) == len(changed) + 1
    # Keras at fp32 was the only featurizer before the runtime setting: its entries from then stay valid.
    legacy = json.loads(digest(runtime="keras", precision="fp32"))
    assert "runtime" not in legacy["featurizer"] and "precision" not in legacy["featurizer"]
    assert "onnxruntime" in json.loads(digest(runtime="onnxruntime"))["libraries"]  # its version decides too


def test_job_help_and_bad_option_exit_codes():
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_featurizer.py"), "--help"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0 and "--target-sensitivity" in out.stdout and "--set" in out.stdout
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_featurizer.py"), "--out", "/tmp/x", "--tuning", "bogus"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2


# ------------------------------------------------------------------ Spark, no featurizer


def kermany_rows(n_patients=40, seed=0):
    """(path, split, label, label_name) rows for a fake tree: several images per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = p % 2
        for i in range(int(rng.integers(1, 4))):
            name = f"person{p}_bacteria_{i}.jpeg" if label else f"IM-{p:04d}-{i + 1:04d}.jpeg"
            cls = "PNEUMONIA" if label else "NORMAL"
            rows.append((f"hdfs://nn/d/train/{cls}/{name}", "train", label, cls))
    rows += [(f"hdfs://nn/d/test/NORMAL/IM-9{i}-0001.jpeg", "test", 0, "NORMAL") for i in range(3)]
    return rows


def test_assign_subsets_is_patient_grouped_and_keeps_test(spark):
    from cxr_pipeline.images.layout import parse_image_path, patient_id

    rows = kermany_rows()
    df = spark.createDataFrame(rows, "path string, split string, label int, label_name string")
    out, info = T.assign_subsets(df, settings(validation_fraction=0.25, seed=3))
    got = {r["path"]: r["subset"] for r in out.collect()}
    assert len(got) == len(rows)
    assert {p for p, s in got.items() if s == "test"} == {r[0] for r in rows if r[1] == "test"}
    sides: dict[str, set] = {}
    for path, subset in got.items():
        sides.setdefault(patient_id(parse_image_path(path).file_name), set()).add(subset)
    assert all(len(s) == 1 for s in sides.values()), "a patient is on both sides"
    assert {"train", "val"} <= set(got.values())
    assert info["mode"] == "carve" and info["val_patients"] > 0


def test_class_weights_balance_the_classes(spark):
    df = spark.createDataFrame([(0,)] * 2 + [(1,)] * 6, "label int")
    weighted, weights = T.add_class_weights(df, [2, 6])
    totals = {
        r["label"]: r["w"]
        for r in weighted.groupBy("label").agg({"weight": "sum"}).withColumnRenamed("sum(weight)", "w").collect()
    }
    assert totals[0] == pytest.approx(totals[1]) == pytest.approx(4.0)
    assert weights == pytest.approx([2.0, 2 / 3])


def _vector_df(spark, n=80, seed=0):
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(i % 4 != 0)  # 75 % positives
        x = rng.normal(size=5) + (1.5 * label) * np.array([1, 0, 0, 0, 0])
        rows.append((f"person{i}_x.jpeg", label, Vectors.dense(x.tolist())))
    return spark.createDataFrame(rows, ["patient", "label", "features"])


@pytest.mark.parametrize("tuning", ["none", "cv", "tvs"])
def test_fit_classifier_learns_and_tunes(spark, tuning):
    from cxr_pipeline.evaluation import metrics as M

    df = _vector_df(spark)
    tuned = settings(tuning=tuning, tuning_folds=2, grid={"reg_param": [0.01, 1.0]})
    df_w, _ = T.add_class_weights(df, [20, 60])
    model, info = T.fit_classifier(df_w, tuned, weighted=True)
    assert info["mode"] == tuning
    if tuning != "none":
        assert len(info["candidates"]) == 2 and info["best"]["regParam"] in (0.01, 1.0)
    scored = T.with_scores(model.transform(df))
    labels, scores = T.collect_scores(scored)
    assert M.roc_auc(labels, scores) > 0.85


def test_label_names_of_rejects_inconsistent_mapping(spark):
    good = spark.createDataFrame([(0, "NORMAL"), (1, "PNEUMONIA")], "label int, label_name string")
    assert T.label_names_of(good) == ["NORMAL", "PNEUMONIA"]
    both_one = spark.createDataFrame([(1, "NORMAL"), (1, "PNEUMONIA")], "label int, label_name string")
    with pytest.raises(T.TrainingError):  # the seeds' bug: both classes labelled 1
        T.label_names_of(both_one)


def test_single_class_validation_falls_back_to_half():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback is logged, not raised as a warning
        choice = T.choose_threshold([1, 1], [0.3, 0.9], 0.95)
    assert choice.threshold == 0.5 and "single class" in choice.fallback


# ------------------------------------------------------------------ end to end (real featurizer + HDFS)


def train_on_sample(spark, base, data, name, overrides=(), overwrite=False):
    config = cfg.load_config("local", overrides=[*FAST_FEATURES, f"training.features_cache={base}/_cache", *overrides])
    return T.train(spark, config, data, f"{base}/{name}", overwrite=overwrite)


@pytest.fixture(scope="module")
def trained(sample_run):
    return sample_run


@pytest.mark.slow
@pytest.mark.hdfs
def test_run_folder_is_complete(trained):
    from cxr_pipeline.infra import storage

    _, _, result = trained
    names = {Path(f.uri).name for f in storage.list_files(result.run.root, recursive=False)}
    names |= {
        f.uri.rstrip("/").split("/")[-1]
        for f in storage.list_files(result.run.root, recursive=True)
        if "/model/" in f.uri
    }
    for expected in (
        "config.yaml",
        "metrics.json",
        "classifier.json",
        "roc.png",
        "pr.png",
        "confusion_matrix.png",
        "rejected.csv",
        "summary.txt",
        "images.csv",
        "_SUCCESS",
    ):
        assert expected in names, expected
    assert storage.exists(result.run.model + "/metadata")
    saved_config = yaml.safe_load(storage.read_bytes(result.run.config))
    assert saved_config["featurizer"]["feature_layer"] == "mixed5"
    assert saved_config["training"]["target_sensitivity"] == 0.95


@pytest.mark.slow
@pytest.mark.hdfs
def test_metrics_are_well_formed(trained):
    from cxr_pipeline.infra import storage

    _, _, result = trained
    m = json.loads(storage.read_bytes(result.run.metrics))
    assert m["label_names"] == ["NORMAL", "PNEUMONIA"]
    total = sum(sum(c.values()) for c in m["counts"].values())
    assert total + m["rejected"] == 16
    assert m["counts"]["test"] == {"NORMAL": 2, "PNEUMONIA": 2}
    t = m["test"]
    assert t["n"] == 4
    for key in ("at_chosen", "at_default_0.5"):
        block = t[key]
        assert sum(map(sum, block["confusion_matrix"])) == 4
        assert block["tn"] + block["fp"] == 2 and block["fn"] + block["tp"] == 2
        for name in ("accuracy", "f1", "weightedPrecision", "weightedRecall"):
            assert 0.0 <= block["spark"][name] <= 1.0
        assert block["spark"]["accuracy"] == pytest.approx(block["accuracy"])
        assert block["spark"]["truePositiveRateByLabel"]["PNEUMONIA"] == pytest.approx(block["sensitivity"])
        assert block["spark"]["truePositiveRateByLabel"]["NORMAL"] == pytest.approx(block["specificity"])
    assert t["areaUnderROC"] == pytest.approx(t["numpy_roc_auc"])
    th = m["threshold"]
    assert 0.0 < th["threshold"] <= 1.0 and th["target_sensitivity"] == 0.95
    assert th["fallback"] is not None or th["sensitivity"] >= 0.95
    assert "AUC-ROC" in result.summary and "threshold" in result.summary
    saved_config = yaml.safe_load(storage.read_bytes(result.run.config))
    assert m["featurizer"]["intensity"] == saved_config["data"]["intensity"]  # how the images were decoded
    card = storage.read_bytes(result.run.file("model_card.md")).decode()
    assert f"intensity {saved_config['data']['intensity']})" in card


def test_run_records_the_wall_time_of_each_phase(trained):
    from cxr_pipeline.infra import storage

    _, _, result = trained
    timing = json.loads(storage.read_bytes(result.run.metrics))["timing"]
    assert set(timing["seconds"]) == {"listing", "featurizing", "cache_read", "fitting", "evaluation", "writing"}
    assert all(seconds > 0 for seconds in timing["seconds"].values())
    assert sum(timing["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert timing["total_seconds"] == pytest.approx(sum(timing["seconds"].values()), abs=0.01)
    featurized = result.metrics["featurizer"]["cache"]["featurized_rows"]
    if featurized:  # the session's sample run may reuse an earlier session's cache
        assert timing["featurize_images_per_s"] == pytest.approx(
            featurized / timing["seconds"]["featurizing"], rel=1e-2
        )
    assert "Time: " in result.summary and "featurizing" in result.summary


@pytest.mark.slow
@pytest.mark.hdfs
def test_label_mapping_follows_class_folders(trained):
    import csv
    import io

    from cxr_pipeline.infra import storage

    _, _, result = trained
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(result.run.images).decode())))
    assert len(rows) == 16
    assert {r["subset"] for r in rows} == {"train", "val", "test"}
    assert all(r["subset"] == "test" for r in rows if "/test/" in r["path"])
    for r in rows:
        folder = r["path"].rstrip("/").split("/")[-2]
        assert r["label_name"] == folder
        assert int(r["label"]) == {"NORMAL": 0, "PNEUMONIA": 1}[folder]


@pytest.mark.slow
@pytest.mark.hdfs
def test_model_reloads_with_identical_predictions_and_local_export_agrees(trained, spark):
    from pyspark.ml import PipelineModel

    from cxr_pipeline.infra import storage
    from cxr_pipeline.spark.classifier.model_export import LocalClassifier
    from cxr_pipeline.spark.reader import read_image_tree

    _, data, result = trained
    images = read_image_tree(spark, data + "/test")
    before = {
        r["path"]: r["p"]
        for r in T.with_scores(result.model.transform(images)).selectExpr("path", f"{T.SCORE_COL} as p").collect()
    }
    reloaded = PipelineModel.load(result.run.model)
    after = {
        r["path"]: r["p"]
        for r in T.with_scores(reloaded.transform(images)).selectExpr("path", f"{T.SCORE_COL} as p").collect()
    }
    assert len(before) == 4 and before.keys() == after.keys()
    assert_same_probabilities([after[p] for p in before], list(before.values()))
    local = LocalClassifier.load(result.run.root)
    paths = sorted(before)
    out = local.predict_bytes([storage.read_bytes(p) for p in paths])
    for path, res in zip(paths, out):
        assert res["error"] is None
        assert res["probability"] == same_probability(before[path])
        assert res["threshold"] == pytest.approx(result.metrics["threshold"]["threshold"])
    spec = json.loads(storage.read_bytes(result.run.classifier))
    assert spec["feature_layer"] == "mixed5" and spec["label_names"] == ["NORMAL", "PNEUMONIA"]


@pytest.mark.slow
@pytest.mark.hdfs
def test_retraining_reuses_features_with_tuning_and_no_weights(trained, spark):
    base, data, first = trained
    result = train_on_sample(
        spark,
        base,
        data,
        "run_cv",
        [
            "training.tuning=cv",
            "training.tuning_folds=2",
            "training.class_weighting=false",
            "training.grid.reg_param=[0.01, 0.1]",
            "training.grid.elastic_net_param=[0.0]",
            "training.max_iter=30",
        ],
    )
    m = result.metrics
    cache, first_cache = m["featurizer"]["cache"], first.metrics["featurizer"]["cache"]
    assert cache["featurized_rows"] == 0 and cache["reused_rows"] == 16, cache
    assert cache["snapshot"] == first_cache["snapshot"] and cache["reason"] == "every image and every setting matched"
    assert m["tuning"]["mode"] == "cv" and len(m["tuning"]["candidates"]) == 2
    assert m["class_weights"] is None


@pytest.mark.slow
@pytest.mark.hdfs
@pytest.mark.cluster
def test_job_on_standalone_cluster_via_spark_submit_reuses_a_local_runs_features(
    spark_standalone, sample_run, hdfs_tmp
):
    """spark-submit on the standalone cluster trains from the features a local[2] run cached: the cache is
    keyed by what makes a feature, not by the master. (Featurizing on the cluster: test_featurizer, test_faults.)"""
    from cxr_pipeline.infra import storage

    base, data, local = sample_run
    out = f"{hdfs_tmp}/run"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "lib"),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    cmd = [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        spark_standalone,
        str(REPO / "jobs" / "train_featurizer.py"),
        "--conf-env",
        "standalone",
        "--data",
        data,
        "--out",
        out,
        *[arg for setting in FAST_FEATURES for arg in ("--set", setting)],
        "--features-cache",
        f"{base}/_cache",
        *NO_TRACKING,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training summary" in proc.stdout and "AUC-ROC" in proc.stdout
    m = json.loads(storage.read_bytes(out + "/metrics.json"))
    local_metrics = json.loads(storage.read_bytes(local.run.metrics))
    assert m["test"]["n"] == 4 and m["featurizer"]["cache"]["featurized_rows"] == 0
    assert (
        m["featurizer"]["cache"]["reused_rows"]
        == local_metrics["featurizer"]["cache"]["reused_rows"] + local_metrics["featurizer"]["cache"]["featurized_rows"]
    )
    assert storage.exists(out + "/model/metadata")


def test_report_with_single_class_sets_is_undefined_not_a_crash(spark, tmp_path):
    from pyspark.ml.linalg import Vectors

    from cxr_pipeline.spark.classifier import evaluation

    rows = [(1, Vectors.dense([1 - p, p]), p) for p in (0.2, 0.7, 0.9)]
    test = spark.createDataFrame(rows, ["label", "probability", T.SCORE_COL])
    choice = T.choose_threshold([1, 1], [0.6, 0.8], 0.95)  # validation with one class
    report = evaluation.evaluate(test, choice, ["NORMAL", "PNEUMONIA"])
    assert report["test"]["areaUnderROC"] is None and report["test"]["areaUnderPR"] is None
    block = report["test"]["at_chosen"]
    assert block["threshold"] == 0.5 and block["specificity"] is None and block["tp"] == 2
    assert block["spark"]["truePositiveRateByLabel"]["NORMAL"] is None
    report.update(run=str(tmp_path), data="x", counts={"test": {"NORMAL": 0, "PNEUMONIA": 3}})
    run = T.RunLayout(str(tmp_path))
    evaluation.write_report(run, report, test, ["NORMAL", "PNEUMONIA"])
    saved = json.loads(Path(run.metrics).read_text())
    assert saved["threshold"]["fallback"] and saved["figures"] == [run.confusion]
    text = evaluation.summary_text(saved)
    assert "AUC-ROC undefined" in text and "fallback" in text and "specificity undefined" in text


def write_cnn_run_with_backbone(cnn_run: str, scratch: Path, intensity: str) -> str:
    """A finished train_cnn run folder holding an exported backbone whose values differ from the provisioned
    ones (as fine-tuning leaves them); returns its weights' sha256."""
    import keras

    from cxr_pipeline.cnn import models
    from cxr_pipeline.cnn.run_outputs import BACKBONE_FILE, CNN_JSON
    from cxr_pipeline.cnn.settings import CnnSettings
    from cxr_pipeline.infra import run_folder, storage
    from cxr_pipeline.models import backbones

    head = CnnSettings.from_config(cfg.load_config("local")).inception
    model = models.build_inception_transfer(75, None, "mixed5", head.dense_units, head.dropout)
    conv = [layer for layer in models.backbone_of(model).layers if isinstance(layer, keras.layers.Conv2D)][-1]
    conv.set_weights([w * 1.5 for w in conv.get_weights()])
    scratch.mkdir(parents=True, exist_ok=True)
    models.export_backbone(model, None, scratch / BACKBONE_FILE)
    sha = backbones.file_sha256(scratch / BACKBONE_FILE)
    backbone = {
        "model_name": "InceptionV3",
        "weights_file": BACKBONE_FILE,
        "weights_sha256": sha,
        "feature_layer": "mixed5",
        "image_size": 75,
        "intensity": intensity,
    }
    (scratch / CNN_JSON).write_text(json.dumps({"model_name": "inception_v3", "backbone": backbone}))
    with run_folder.staged_output(cnn_run, overwrite=False, tool="train_cnn") as target:
        storage.upload_dir(str(scratch), target)
    return sha


@pytest.mark.slow
@pytest.mark.hdfs
def test_featurizes_with_the_fine_tuned_backbone_of_a_cnn_run(spark, sample_run, tmp_path):
    from cxr_pipeline.infra import storage
    from cxr_pipeline.models import backbones
    from cxr_pipeline.spark.classifier.model_export import LocalClassifier
    from cxr_pipeline.spark.featurizer import BackboneRunError

    base, data, default = sample_run
    intensity = cfg.get(cfg.load_config("local"), "data.intensity")
    cnn_run = f"{base}/cnn_with_backbone"
    sha = write_cnn_run_with_backbone(cnn_run, tmp_path / "cnn", intensity)

    result = train_on_sample(spark, base, data, "run_backbone", [f"featurizer.backbone_run={cnn_run}"])
    featurizer = result.metrics["featurizer"]
    assert featurizer["backbone_run"] == cnn_run and featurizer["image_size"] == 75
    assert featurizer["weights_sha256"] == sha != default.metrics["featurizer"]["weights_sha256"]
    assert featurizer["cache"]["reused_rows"] == 0  # other weights: no feature of the default run is reused
    # the run carries the weights, so the Spark-free scorer needs nothing from the CNN run
    spec = json.loads(storage.read_bytes(result.run.classifier))
    assert spec["weights"] == "backbone.weights.h5" and spec["weights_sha256"] == sha
    test_images = [f.uri for f in storage.list_files(f"{data}/test") if f.uri.endswith(".jpeg")]
    scored = LocalClassifier.load(result.run.root).predict_bytes([storage.read_bytes(u) for u in test_images])
    assert all(r["error"] is None for r in scored)

    other = "none" if intensity != "none" else "equalize"
    with pytest.raises(BackboneRunError, match=f"data.intensity={intensity}"):
        train_on_sample(spark, base, data, "run_x", [f"featurizer.backbone_run={cnn_run}", f"data.intensity={other}"])
    storage.write_bytes(f"{cnn_run}/backbone.weights.h5", b"replaced")
    with pytest.raises(backbones.WeightsMismatchError, match="replaced after the CNN run"):
        train_on_sample(spark, base, data, "run_y", [f"featurizer.backbone_run={cnn_run}"])
    with pytest.raises(BackboneRunError, match="not a finished train_cnn run"):
        train_on_sample(spark, base, data, "run_z", [f"featurizer.backbone_run={base}/no_such_run"])
