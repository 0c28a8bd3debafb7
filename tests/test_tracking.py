"""MLflow tracking and registry (cxr_pipeline.tracking) against a REAL MLflow store (SQLite in a temp folder).

The Spark run is the real sample-tree training of test_training.py (features shared through
``shared_sample_run``); everything is read back through ``MlflowClient``. The UI test starts
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
    assert tracking.artifact_root_for("sqlite:////x/y/mlflow.db") == "file:///x/y/artifacts"
    assert tracking.artifact_root_for("databricks") is None
    with pytest.raises(cfg.ConfigError):
        tracking.TrackingSettings.from_config(cfg.load_config("local", overrides=["tracking.bogus=1"]))
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    assert settings.tracking_uri() == "databricks"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert settings.tracking_uri() == "http://127.0.0.1:5000"


def test_params_are_the_flattened_config_without_secrets():
    config = cfg.load_config("local", overrides=["dicom.patient_key=site-secret", "training.reg_param=0.5"])
    params = tracking.config_params(config)
    assert params["training.reg_param"] == "0.5" and params["featurizer.feature_layer"] == "mixed5"
    assert params["dicom.patient_key"] == cfg.REDACTED
    assert "site-secret" not in json.dumps(params)
    assert json.loads(params["training.grid.reg_param"]) == [0.001, 0.01, 0.1]


def test_metrics_cover_both_subsets_and_thresholds_and_the_cnn_history():
    spark_metrics = {
        "validation": {"roc_auc": 0.7, "at_chosen": {"sensitivity": 1.0, "specificity": 0.5}},
        "test": {"areaUnderROC": 0.99, "at_default_0.5": {"specificity": 0.25, "f1": None}},
        "featurizer": {"cache": {"reused": True}},
    }
    numbers = tracking.run_metrics("spark", spark_metrics)
    assert numbers["validation_auc"] == 0.7 and numbers["test_auc"] == 0.99
    assert numbers["validation.at_chosen.sensitivity"] == 1.0 and numbers["test.at_default_0.5.specificity"] == 0.25
    assert "test.at_default_0.5.f1" not in numbers and "featurizer.cache.reused" not in numbers
    cnn = {
        "validation": {"auc": 0.6},
        "test": {"auc": 0.9},
        "history": {"val_auc": [0.5, 0.75], "loss": [1.0, float("nan")]},
    }
    assert tracking.subset_auc("cnn", cnn, "validation") == 0.6
    assert tracking.history_metrics(cnn) == [
        ("epoch.val_auc", 0.5, 0),
        ("epoch.val_auc", 0.75, 1),
        ("epoch.loss", 1.0, 0),
    ]


def test_champion_decision_uses_only_validation_auc():
    assert tracking.champion_decision(0.6, None, None, "1", "champion")[0]
    assert tracking.champion_decision(0.8, 0.7, "1", "2", "champion") == (
        True,
        "v2 is champion: validation AUC 0.8000 beats v1's 0.7000",
    )
    promote, why = tracking.champion_decision(0.7, 0.7, "1", "2", "champion")
    assert not promote and why.startswith("v1 stays champion")
    assert not tracking.champion_decision(None, 0.1, "1", "2", "champion")[0]


def test_non_registry_models_pass_through():
    assert not tracking.is_registry_uri("hdfs://127.0.0.1:9000/runs/demo")
    assert tracking.resolve_model("runs/demo") == "runs/demo"


def test_disabled_tracking_touches_nothing(tmp_path):
    config = store_config(tmp_path, "tracking.enabled=false")
    assert tracking.log_cnn_run(config, {}, str(tmp_path / "run"), str(tmp_path)) is None
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------ real Spark run, real store


@pytest.fixture(scope="module")
def spark_run(sample_run):
    _, data, result = sample_run  # the session's one trained sample run (conftest)
    return data, result


@pytest.fixture(scope="module")
def logged(spark_run, spark, tmp_path_factory):
    data, result = spark_run
    store = tmp_path_factory.mktemp("mlflow")
    config = store_config(store, "dicom.patient_key=site-secret")
    outcome = tracking.log_spark_run(config, result, data, spark)
    assert outcome is not None, "logging to a local SQLite store failed (see the TrackingWarning)"
    return store, config, outcome


@pytest.mark.slow
@pytest.mark.hdfs
def test_run_params_metrics_artifacts_dataset_and_tags_are_in_the_store(logged, spark_run):
    from mlflow.tracking import MlflowClient

    store, config, outcome = logged
    _, result = spark_run
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    run = client.get_run(outcome.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["featurizer.feature_layer"] == "mixed5" and params["model.backbone"] == "InceptionV3"
    assert params["model.weights_sha256"] == result.metrics["featurizer"]["weights_sha256"]
    assert params["model.intensity"] == config["data"]["intensity"] == result.metrics["featurizer"]["intensity"]
    assert params["dicom.patient_key"] == cfg.REDACTED
    assert metrics["validation_auc"] == pytest.approx(result.metrics["validation"]["roc_auc"])
    assert metrics["test_auc"] == pytest.approx(result.metrics["test"]["areaUnderROC"])
    for subset in ("validation", "test"):
        for at in ("at_chosen", "at_default_0.5"):
            for name in ("sensitivity", "specificity"):
                assert metrics[f"{subset}.{at}.{name}"] == pytest.approx(result.metrics[subset][at][name])
    top = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"roc.png", "pr.png", "confusion_matrix.png", "metrics.json", "rejected.csv", "config.yaml"} <= top
    folder = {a.path.split("/")[-1] for a in client.list_artifacts(outcome.run_id, tracking.RUN_FOLDER_ARTIFACT)}
    assert {"_SUCCESS", "classifier.json", "model"} <= folder
    config_text = Path(client.download_artifacts(outcome.run_id, "config.yaml", str(store / "dl"))).read_text()
    assert "site-secret" not in config_text
    (dataset_input,) = run.inputs.dataset_inputs
    rows = tracking.image_set_listing(result.metrics["data"])
    assert len(rows) == 16 and dataset_input.dataset.digest == tracking.listing_digest(rows)[:32]
    assert json.loads(dataset_input.dataset.source)["uri"] == result.metrics["data"]
    assert tags["spark_master"].startswith("local") and len(tags["git_commit"]) == 40
    assert tags["champion_decision"].startswith("v1 is champion")
    version = client.get_model_version(outcome.registered_name, outcome.version)
    assert version.run_id == outcome.run_id
    assert version.tags["validation_auc"] == f"{result.metrics['validation']['roc_auc']:.6f}"  # never the test AUC


@pytest.mark.slow
@pytest.mark.hdfs
def test_logged_spark_model_scores_like_the_runs_pipeline_model(logged, spark_run, spark):
    import mlflow

    from cxr_pipeline.spark.reader import read_image_tree
    from cxr_pipeline.spark_classifier import training as T

    _, _, outcome = logged
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

    from cxr_pipeline import run_folder
    from cxr_pipeline.spark_classifier.model_export import LocalClassifier

    _, config, first = logged
    settings = tracking.TrackingSettings.from_config(config)
    client = MlflowClient(tracking.use_store(settings))
    name = settings.model_name("spark")
    champion_auc = float(client.get_model_version(name, first.version).tags["validation_auc"])

    # same model registered again with a worse, an equal and a better validation AUC (test figures never enter)
    worse = tracking._register(settings, "spark", first, champion_auc - 0.1)
    equal = tracking._register(settings, "spark", first, champion_auc)
    assert not worse.promoted and not equal.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version
    assert "stays champion" in client.get_model_version(name, worse.version).tags["champion_decision"]
    better = tracking._register(settings, "spark", first, champion_auc + 0.01)
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
def test_unreachable_tracking_server_warns_and_keeps_the_run(spark_run, spark):
    from cxr_pipeline import run_folder
    from cxr_pipeline.localstack.processes import free_port

    data, result = spark_run
    uri = f"http://127.0.0.1:{free_port()}"
    config = cfg.load_config("local", overrides=[f"tracking.uri={uri}", "tracking.connect_timeout_s=2"])
    with pytest.warns(tracking.TrackingWarning, match="could not record this run") as caught:
        assert tracking.log_spark_run(config, result, data, spark) is None
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
    from playwright.sync_api import sync_playwright

    from cxr_pipeline.localstack.processes import free_port

    store, _, outcome = logged
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
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{outcome.experiment_id}/runs/{outcome.run_id}")
            page.wait_for_selector("text=validation_auc", timeout=120_000)
            text = page.inner_text("body")
            if os.environ.get("CXR_MLFLOW_SCREENSHOT"):
                page.screenshot(path=os.environ["CXR_MLFLOW_SCREENSHOT"])
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    _, result = spark_run
    assert f"spark: {result.run.root.rsplit('/', 1)[-1]}" in text and outcome.run_id in text
    assert "test_auc" in text and "validation.at_chosen.sensitivity" in text and "cxr-pneumonia-spark" in text


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
