"""MLflow tracking and registry (cxr_pipeline.tracking) against a REAL MLflow store (SQLite in a temp folder).

The Spark run is the real sample-tree training of test_training.py (features shared through
``sample_in_hdfs``); everything is read back through ``MlflowClient``. The UI test starts
``python -m cxr_pipeline.tracking ui`` (what ``make mlflow-ui`` runs) on a free loopback port and
reads the run page in Debian's Chromium.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tolerances import assert_same_probabilities

from cxr_pipeline import config as cfg
from cxr_pipeline import tracking
from cxr_pipeline.spark.classifier.mlflow_run import log_spark_run
from cxr_pipeline.tracking import record, registry, runs, store

REPO = Path(__file__).resolve().parents[1]


def store_config(store: Path, *overrides: str) -> dict:
    return cfg.load_config("local", overrides=[f"tracking.uri=sqlite:///{store}/mlflow.db", *overrides])


# ------------------------------------------------------------------ pure


def test_settings_come_from_defaults_and_the_embedded_store_is_git_ignored_state(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    settings = tracking.TrackingSettings.from_config(cfg.load_config("local"))
    assert settings.enabled and settings.champion_alias == "champion"
    assert settings.model_name("spark") == "cxr-pneumonia-spark" and settings.model_name("cnn") == "cxr-pneumonia-cnn"
    assert settings.tracking_uri().endswith("/.local/mlflow/mlflow.db")
    assert store.artifact_root_for("sqlite:////x/y/mlflow.db") == "file:///x/y/artifacts"
    assert store.artifact_root_for("databricks") is None
    assert registry.resolved_dir("sqlite:////x/y/mlflow.db") == Path("/x/y/resolved")  # a store's own copies
    assert registry.resolved_dir(settings.tracking_uri()) == store.default_store_dir() / "resolved"
    with pytest.raises(cfg.ConfigError):
        tracking.TrackingSettings.from_config(cfg.load_config("local", overrides=["tracking.bogus=1"]))
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    assert settings.tracking_uri() == "databricks"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert settings.tracking_uri() == "http://127.0.0.1:5000"


def test_params_are_the_flattened_config_without_secrets():
    config = cfg.load_config("local", overrides=["dicom.patient_key=site-secret", "training.reg_param=0.5"])
    params = record.config_params(config)
    assert params["training.reg_param"] == "0.5" and params["featurizer.feature_layer"] == "mixed5"
    assert params["dicom.patient_key"] == cfg.REDACTED
    assert "site-secret" not in json.dumps(params)
    assert json.loads(params["training.grid.reg_param"]) == [0.001, 0.01, 0.1]


def test_metrics_are_the_headline_figures_and_settings_are_params():
    spark_metrics = {
        "validation": {"roc_auc": 0.7, "at_chosen": {"sensitivity": 1.0, "specificity": 0.5}},
        "test": {
            "areaUnderROC": 0.99,
            "brier": 0.12,
            "at_chosen": {"accuracy": 0.75, "sensitivity": 1.0, "specificity": 0.5, "f1": None},
            "at_default_0.5": {"specificity": 0.25},
        },
        "threshold": {"threshold": 0.42, "rule": "youden"},
        "counts": {"train": {"NORMAL": 3, "PNEUMONIA": 5}, "test": {"NORMAL": 2, "PNEUMONIA": 2}},
        "classifier": {"regParam": 0.1, "maxIter": 100},
        "class_weights": {"NORMAL": 1.33, "PNEUMONIA": 0.8},
        "featurizer": {"cache": {"reused": True}},
    }
    assert record.run_metrics("spark", spark_metrics) == {
        "test_auc": 0.99,
        "test_accuracy": 0.75,
        "test_sensitivity": 1.0,
        "test_specificity": 0.5,
        "test_brier": 0.12,
        "validation_auc": 0.7,
    }
    assert record.run_params("spark", spark_metrics) == {
        "model.threshold": "0.42",
        "model.threshold_rule": "youden",
        "data.train_images": "8",
        "data.test_images": "4",
    }
    cnn = {
        "evaluated_on": "test",
        "validation": {"auc": 0.6},
        "test": {"auc": 0.9, "brier": 0.2, "at_threshold": {"accuracy": 0.5, "sensitivity": 1.0, "specificity": 0.0}},
        "threshold": 0.3,
        "threshold_choice": {"threshold": 0.3, "rule": "youden"},
        "class_counts": {"train": [4, 4], "test": [2, 2]},
        "history": {"val_auc": [0.5, 0.75], "loss": [1.0, float("nan")]},
    }
    assert record.run_metrics("cnn", cnn) == {
        "test_auc": 0.9,
        "test_accuracy": 0.5,
        "test_sensitivity": 1.0,
        "test_specificity": 0.0,
        "test_brier": 0.2,
        "validation_auc": 0.6,
    }
    assert record.run_params("cnn", cnn)["data.train_images"] == "8"
    assert record.run_params("cnn", cnn)["model.threshold"] == "0.3"
    assert record.history_metrics(cnn) == [
        ("train_history.val_auc", 0.5, 0),
        ("train_history.val_auc", 0.75, 1),
        ("train_history.loss", 1.0, 0),
    ]


def test_run_name_says_data_model_and_time():
    import time

    started = time.mktime((2026, 12, 7, 19, 55, 0, 0, 0, -1))
    spark = {"featurizer": {"model_name": "InceptionV3", "feature_layer": "mixed5"}}
    name = record.run_name("spark", "hdfs://nn:9000/data/chest_xray/", spark, {}, started)
    assert name == "chest_xray · InceptionV3 mixed5 + LR · 2026-12-07 19:55"
    cnn_name = record.run_name("cnn", "/d/pmnist", {"image_size": 96}, {"model_name": "inception_v3"}, started)
    assert cnn_name == "pmnist · inception_v3 96 px · 2026-12-07 19:55"
    spark["featurizer"]["backbone_run"] = "hdfs://nn:9000/runs/cnn"
    tuned = record.run_name("spark", "hdfs://nn:9000/data/chest_xray", spark, {}, started)
    assert tuned == "chest_xray · InceptionV3 fine-tuned mixed5 + LR · 2026-12-07 19:55"


def test_a_spark_run_on_a_cnn_backbone_links_the_cnn_run(tmp_path):
    """The Spark run's tags name the CNN run folder its backbone came from and the MLflow run that wrote it
    (the latest one, when the folder was overwritten)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = MlflowClient().create_experiment("links")
    folder = "hdfs://nn:9000/runs/cnn"
    ids = []
    for kind, written_to in (("cnn", folder), ("cnn", folder), ("spark", folder), ("cnn", folder + "_other")):
        run = MlflowClient().create_run(exp, tags={"kind": kind, "written_to": written_to})
        MlflowClient().set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
        time.sleep(0.01)  # distinct start times
    tags = runs.backbone_tags({"featurizer": {"backbone_run": folder}}, exp)
    assert tags == {"backbone_run": folder, "backbone_mlflow_run": ids[1]}
    assert runs.backbone_tags({"featurizer": {"backbone_run": None}}, exp) == {}
    unknown = runs.backbone_tags({"featurizer": {"backbone_run": "hdfs://nn:9000/runs/gone"}}, exp)
    assert unknown == {"backbone_run": "hdfs://nn:9000/runs/gone"}


def test_ui_links_open_the_model_training_view():
    assert tracking.ui_url("http://127.0.0.1:5000", "3") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=cxr-pipeline-runs&workflowType=machine_learning"
    )
    run_link = tracking.ui_url("http://h:5000", "3", "abc")
    assert run_link.endswith("/#/experiments/3/runs/abc?workflowType=machine_learning")
    view = json.loads(store.EXPERIMENT_TAGS["mlflow.sharedViewState.cxr-pipeline-runs"])
    assert "metrics.`test_auc`" in view["selectedColumns"] and "metrics.`validation_auc`" in view["selectedColumns"]


def test_champion_decision_uses_only_validation_auc():
    assert record.champion_decision(0.6, None, None, "1", "champion")[0]
    assert record.champion_decision(0.8, 0.7, "1", "2", "champion") == (
        True,
        "v2 is champion: validation AUC 0.8000 beats v1's 0.7000",
    )
    promote, why = record.champion_decision(0.7, 0.7, "1", "2", "champion")
    assert not promote and why.startswith("v1 stays champion")
    assert not record.champion_decision(None, 0.1, "1", "2", "champion")[0]


def test_non_registry_models_pass_through():
    assert not tracking.is_registry_uri("hdfs://127.0.0.1:9000/runs/demo")
    assert tracking.resolve_model("runs/demo") == "runs/demo"


def test_disabled_tracking_touches_nothing(tmp_path):
    config = store_config(tmp_path, "tracking.enabled=false")
    from cxr_pipeline.cnn.mlflow_run import log_cnn_run

    assert log_cnn_run(config, {}, str(tmp_path / "run"), str(tmp_path)) is None
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------ real Spark run, real store


@pytest.fixture(scope="module")
def spark_run(sample_run):
    _, data, result = sample_run  # the session's one trained sample run (conftest)
    return data, result


JOB_SECONDS = 90  # how long before logging the test's "job" started: the MLflow run must span it


@pytest.fixture(scope="module")
def logged(spark_run, spark, tmp_path_factory):
    data, result = spark_run
    store = tmp_path_factory.mktemp("mlflow")
    config = store_config(store, "dicom.patient_key=site-secret")
    started = time.time() - JOB_SECONDS
    outcome = log_spark_run(config, result, data, spark, started_at=started)
    assert outcome is not None, "logging to a local SQLite store failed (see the TrackingWarning)"
    return store, config, outcome, started


@pytest.mark.slow
@pytest.mark.hdfs
def test_run_params_metrics_artifacts_dataset_and_tags_are_in_the_store(logged, spark_run):
    from mlflow.tracking import MlflowClient

    store, config, outcome, started = logged
    _, result = spark_run
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    run = client.get_run(outcome.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["featurizer.feature_layer"] == "mixed5" and params["model.backbone"] == "InceptionV3"
    assert params["model.weights_sha256"] == result.metrics["featurizer"]["weights_sha256"]
    assert params["model.intensity"] == config["data"]["intensity"] == result.metrics["featurizer"]["intensity"]
    assert params["dicom.patient_key"] == cfg.REDACTED
    assert params["training.reg_param"] == str(config["training"]["reg_param"])  # settings are params ...
    assert params["data.test_images"] == str(sum(result.metrics["counts"]["test"].values()))
    assert params["model.threshold"] == str(result.metrics["threshold"]["threshold"])
    assert set(metrics) == set(tracking.HEADLINE_METRICS)  # ... and the metrics are what the run measured
    assert metrics["validation_auc"] == pytest.approx(result.metrics["validation"]["roc_auc"])
    assert metrics["test_auc"] == pytest.approx(result.metrics["test"]["areaUnderROC"])
    assert metrics["test_brier"] == pytest.approx(result.metrics["test"]["brier"])
    for name in ("accuracy", "sensitivity", "specificity"):
        assert metrics[f"test_{name}"] == pytest.approx(result.metrics["test"]["at_chosen"][name])
    data_name = result.metrics["data"].rstrip("/").rsplit("/", 1)[-1]
    assert run.info.run_name.startswith(f"{data_name} · InceptionV3 {params['model.feature_layer']} + LR · ")
    assert run.info.start_time == int(started * 1000)  # the run spans the job, not just the logging
    assert run.info.end_time - run.info.start_time >= JOB_SECONDS * 1000 and run.info.status == "FINISHED"
    experiment = client.get_experiment(outcome.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    top = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"roc.png", "pr.png", "confusion_matrix.png", "metrics.json", "rejected.csv", "config.yaml"} <= top
    folder = {a.path.split("/")[-1] for a in client.list_artifacts(outcome.run_id, tracking.RUN_FOLDER_ARTIFACT)}
    assert {"_SUCCESS", "classifier.json", "model"} <= folder
    config_text = Path(client.download_artifacts(outcome.run_id, "config.yaml", str(store / "dl"))).read_text()
    assert "site-secret" not in config_text
    (dataset_input,) = run.inputs.dataset_inputs
    rows = runs.image_set_listing(result.metrics["data"])
    assert len(rows) == 16 and dataset_input.dataset.digest == record.listing_digest(rows)[:32]
    assert json.loads(dataset_input.dataset.source)["uri"] == result.metrics["data"]
    assert tags["spark_master"].startswith("local") and len(tags["git_commit"]) == 40
    assert tags["champion_decision"].startswith("v1 is champion")
    assert tags["run_folder"] == f"runs:/{outcome.run_id}/{tracking.RUN_FOLDER_ARTIFACT}"
    assert tags["written_to"] == result.run.root
    version = client.get_model_version(outcome.registered_name, outcome.version)
    assert version.run_id == outcome.run_id
    assert version.tags["run_folder"] == tags["run_folder"] and version.tags["written_to"] == result.run.root
    assert version.tags["validation_auc"] == f"{result.metrics['validation']['roc_auc']:.6f}"  # never the test AUC


@pytest.mark.slow
@pytest.mark.hdfs
def test_logged_spark_model_scores_like_the_runs_pipeline_model(logged, spark_run, spark):
    import mlflow

    from cxr_pipeline.spark.classifier import training as T
    from cxr_pipeline.spark.reader import read_image_tree

    _, _, outcome, _ = logged
    data, result = spark_run
    model_info = mlflow.models.get_model_info(outcome.model_uri)
    assert model_info.signature.inputs.input_names() == ["content"] and model_info.saved_input_example_info
    images = read_image_tree(spark, data + "/test").orderBy("path")

    def scores(model):
        return [r["p"] for r in T.with_scores(model.transform(images)).selectExpr(f"{T.SCORE_COL} as p").collect()]

    expected = scores(result.model)
    assert len(expected) == 4
    assert_same_probabilities(scores(mlflow.spark.load_model(outcome.model_uri)), expected)
    pyfunc = mlflow.pyfunc.load_model(outcome.model_uri)
    labels = pyfunc.predict(images.select("content").toPandas())
    assert list(labels) == [r["prediction"] for r in result.model.transform(images).select("prediction").collect()]


@pytest.mark.slow
@pytest.mark.hdfs
def test_champion_moves_only_on_a_better_validation_auc_and_resolves_to_the_run_folder(logged, tmp_path):
    from mlflow.tracking import MlflowClient

    from cxr_pipeline.infra import run_folder
    from cxr_pipeline.spark.classifier.model_export import LocalClassifier

    _, config, first, _ = logged
    settings = tracking.TrackingSettings.from_config(config)
    client = MlflowClient(tracking.use_store(settings))
    name = settings.model_name("spark")
    champion_auc = float(client.get_model_version(name, first.version).tags["validation_auc"])

    # same model registered again with a worse, an equal and a better validation AUC (test figures never enter)
    worse = registry.register(settings, "spark", first, champion_auc - 0.1)
    equal = registry.register(settings, "spark", first, champion_auc)
    assert not worse.promoted and not equal.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version
    assert "stays champion" in client.get_model_version(name, worse.version).tags["champion_decision"]
    better = registry.register(settings, "spark", first, champion_auc + 0.01)
    assert better.promoted and str(client.get_model_version_by_alias(name, "champion").version) == better.version

    local = tracking.resolve_model(f"models:/{name}@champion", config, dest=tmp_path / "resolved")
    run_folder.require_complete(local)
    assert LocalClassifier.load(local).threshold == pytest.approx(
        json.loads(Path(local, "metrics.json").read_text())["threshold"]["threshold"]
    )
    assert tracking.resolve_model(f"models:/{name}/{first.version}", config, dest=tmp_path / "v1").endswith(
        f"{name}-v{first.version}"
    )
    with pytest.raises(ValueError, match="cannot resolve models:/nothing@champion"):
        tracking.resolve_model("models:/nothing@champion", config)


@pytest.mark.slow
@pytest.mark.hdfs
def test_a_version_keeps_what_it_was_trained_as_when_its_run_folder_is_replaced(spark_run, spark, hdfs_tmp, tmp_path):
    """Two `make demo`s write the same --out: v1 must still resolve to v1's run folder, not to v2's."""
    from mlflow.tracking import MlflowClient

    from cxr_pipeline.infra import storage
    from cxr_pipeline.spark.classifier.training import RunLayout, TrainingResult

    data, result = spark_run
    storage.download_dir(result.run.root, tmp_path / "run")
    folder = f"{hdfs_tmp}/runs/demo"
    config = store_config(tmp_path / "store")
    logged = []
    for text in ("first run\n", "second run\n"):  # the folder as each run left it
        storage.delete(folder, recursive=True)
        storage.upload_dir(str(tmp_path / "run"), folder)
        storage.write_bytes(f"{folder}/summary.txt", text.encode())
        run = TrainingResult(run=RunLayout(folder), model=result.model, metrics=result.metrics, summary=text)
        logged.append(log_spark_run(config, run, data, spark))
    first, second = logged
    assert (first.version, second.version) == ("1", "2")
    client = MlflowClient(tracking.use_store(tracking.TrackingSettings.from_config(config)))
    v1 = client.get_model_version(first.registered_name, "1")
    assert v1.tags["run_folder"] == f"runs:/{first.run_id}/run_folder" != f"runs:/{second.run_id}/run_folder"
    assert v1.tags["written_to"] == folder
    for version, text in (("1", "first run\n"), ("2", "second run\n")):
        local = tracking.resolve_model(f"models:/{first.registered_name}/{version}", config, dest=tmp_path / version)
        assert Path(local, "summary.txt").read_text() == text


@pytest.mark.slow
@pytest.mark.hdfs
def test_unreachable_tracking_server_warns_and_keeps_the_run(spark_run, spark):
    from cxr_pipeline.infra import run_folder
    from cxr_pipeline.infra.localstack.processes import free_port

    data, result = spark_run
    uri = f"http://127.0.0.1:{free_port()}"
    config = cfg.load_config("local", overrides=[f"tracking.uri={uri}", "tracking.connect_timeout_s=2"])
    with pytest.warns(tracking.TrackingWarning, match="could not record this run") as caught:
        assert log_spark_run(config, result, data, spark) is None
    message = str(caught[0].message)
    assert uri in message and result.run.root in message and "tracking log --kind spark" in message
    run_folder.require_complete(result.run.root)


# ------------------------------------------------------------------ the MLflow UI in Chromium


@pytest.mark.slow
@pytest.mark.hdfs
def test_mlflow_ui_shows_the_run_and_its_metrics(logged, spark_run, tmp_path):
    from test_serving_browser import CHROMIUM_ARGS, chromium_path

    executable = chromium_path()
    if executable is None:
        pytest.skip("Debian's chromium is not installed: run `make browser` (apt-get install -y chromium)")
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    from cxr_pipeline.infra.localstack.processes import free_port

    store, _, outcome, _ = logged
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    with open(tmp_path / "ui.log", "w") as log_file:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cxr_pipeline.tracking",
                "ui",
                "--port",
                str(port),
                "--set",
                f"tracking.uri=sqlite:///{store}/mlflow.db",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        wait_for_health(port, server, tmp_path / "ui.log")
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 3000, "height": 1000})  # the table renders visible columns
            page.goto(tracking.ui_url(base, outcome.experiment_id))  # the link `make mlflow-ui` prints
            page.wait_for_selector("text=test_auc", timeout=120_000)
            runs_list = page.inner_text("body")
            if os.environ.get("CXR_MLFLOW_SCREENSHOT"):
                page.screenshot(path=os.environ["CXR_MLFLOW_SCREENSHOT"])
            page.goto(tracking.ui_url(base, outcome.experiment_id, outcome.run_id))
            page.wait_for_selector("text=validation_auc", timeout=120_000)
            run_page = page.inner_text("body")
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    run_name = MlflowClient(f"sqlite:///{store}/mlflow.db").get_run(outcome.run_id).info.run_name
    # the classic model-training view (its model registry link), the run by its name, its headline metrics as columns
    assert "Model registry" in runs_list and run_name in runs_list
    for metric in tracking.HEADLINE_METRICS:
        assert metric in runs_list, runs_list
    assert outcome.run_id in run_page and "cxr-pneumonia-spark" in run_page and "test_sensitivity" in run_page


def wait_for_health(port: int, server: subprocess.Popen, log_path: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow ui exited {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow ui did not answer on {port} in {timeout_s} s: {log_path.read_text()[-2000:]}")
