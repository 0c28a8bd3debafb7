"""MLflow experiment tracking and model registry: every training run is also an MLflow run.

The run folder stays the source of truth; MLflow is an addition. For each run of
``jobs/train_featurizer.py``, ``jobs/train_cnn.py`` and notebooks 02/03 this records:

* a run named by data, model and start (``chest_xray · InceptionV3 mixed5 + LR · 2026-12-07 19:55``) that
  starts when the job did (``started_at``), so its duration is the job's;
* params: the resolved config, flattened (secrets redacted), plus backbone, layer, image size, weights sha256,
  the chosen threshold and its rule, images per subset;
* metrics: what the run measured (:data:`HEADLINE_METRICS`: test AUC, accuracy, sensitivity and specificity at
  the chosen threshold, Brier; validation AUC), and the CNN's per-epoch history (``train_history.*``, step =
  epoch); everything else of ``metrics.json`` is in that artifact;
* artifacts: the plots, ``metrics.json``, ``rejected.csv``, ``config.yaml`` at the top, and the complete run
  folder under ``run_folder/`` (what ``models:/`` URIs resolve to, so the existing loaders serve it);
* a dataset input (``mlflow.data``): the data URI and a digest of the image set (relative path + size);
* tags: git commit, Spark master, ``run_folder`` = ``runs:/<id>/run_folder`` (the copy a registered version
  resolves to; the folder the job wrote, ``written_to``, can be replaced by a later run);
* the experiment's type (model training, not GenAI) and a shared runs-list view with the headline metrics as
  columns, which the links this module prints open (:func:`ui_url`);
* the model: Spark ``PipelineModel`` through ``mlflow.spark`` (loads as a pyfunc too), the CNN through the
  Keras flavor, each with a signature and a real input example; registered under
  ``tracking.model_names.<kind>``. The alias ``tracking.champion_alias`` moves to the new version only when
  its VALIDATION AUC beats the current champion's (test figures never decide); the decision is printed and
  recorded as the tag ``champion_decision`` on the run and the version.

Where: ``tracking.uri`` null = ``$MLFLOW_TRACKING_URI`` if set, else an embedded SQLite store under
``.local/mlflow`` (``make mlflow-ui``);
``databricks`` = the workspace; any other MLflow URI. ``tracking.enabled: false`` = off.
Nothing here may lose a training result: :func:`log_spark_run` and :func:`log_cnn_run` warn
(:class:`TrackingWarning`) and return None on any MLflow failure. A run folder can be logged later with
``python -m cxr_pipeline.tracking log RUN``; ``python -m cxr_pipeline.tracking resolve models:/NAME@ALIAS``
prints the local run folder a registry URI stands for; ``python -m cxr_pipeline.tracking ui`` (make mlflow-ui)
starts the MLflow UI on the configured store, on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .. import config as cfg
from .. import paths

log = logging.getLogger(__name__)

KINDS = ("spark", "cnn")
REGISTRY_PREFIX = "models:/"
RUN_FOLDER_ARTIFACT = "run_folder"
MODEL_ARTIFACT = "model"
TOP_LEVEL_ARTIFACTS = ("metrics.json", "rejected.csv", "config.yaml", "summary.txt", "history.csv")
MAX_PARAM_CHARS = 6000
HEADLINE_METRICS = (  # what run_metrics logs, in the order the runs list shows them
    "test_auc",
    "test_accuracy",
    "test_sensitivity",
    "test_specificity",
    "test_brier",
    "validation_auc",
)
# The UI's runs list with these metrics as columns, newest first: a view MLflow's UI shares through an experiment
# tag (mlflow.sharedViewState.<key>) and opens from a link (viewStateShareKey=<key>). The UI's own default shows
# no metric at all.
RUNS_VIEW_KEY = "cxr-pipeline-runs"
RUNS_VIEW = {
    "selectedColumns": ["attributes.`Dataset`", "attributes.`Models`", *(f"metrics.`{m}`" for m in HEADLINE_METRICS)],
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
}
# MLflow 3's experiment type: a model-training experiment (runs, metrics, registry), not GenAI traces.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    f"mlflow.sharedViewState.{RUNS_VIEW_KEY}": json.dumps(RUNS_VIEW),
}
# The UI's own switch between its GenAI and model-training views (this UI reads it from the link, not from the
# experiment type): a link with it opens the latter, with the model registry.
UI_VIEW = "workflowType=machine_learning"
DEFAULT_UI = "http://127.0.0.1:5000"  # make mlflow-ui (MLFLOW_PORT=5000)


class TrackingWarning(UserWarning):
    """MLflow could not record a run; the run folder itself is complete."""


@dataclass(frozen=True)
class TrackingSettings:
    """The ``tracking:`` section of ``conf/defaults.yaml`` (the one home of its defaults)."""

    enabled: bool
    uri: str | None
    registry_uri: str | None
    experiment: str | None
    register: bool
    model_names: Mapping[str, str] | None
    champion_alias: str
    connect_timeout_s: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrackingSettings:
        return cfg.section_settings(cls, config, "tracking")

    def validate(self) -> None:
        missing = [k for k in KINDS if not (self.model_names or {}).get(k)]
        if self.register and missing:
            raise cfg.ConfigError(f"tracking.model_names needs a name for {', '.join(missing)}")

    def tracking_uri(self) -> str:
        """tracking.uri; null = $MLFLOW_TRACKING_URI when set (MLflow's own convention), on a Databricks cluster
        ``databricks``, else the embedded store."""
        if self.uri:
            return str(self.uri)
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if os.environ.get("DATABRICKS_RUNTIME_VERSION"):  # a Databricks cluster: its workspace's tracking server
            return "databricks"
        return f"sqlite:///{default_store_dir() / 'mlflow.db'}"

    def model_name(self, kind: str) -> str:
        return str((self.model_names or {})[kind])


def default_store_dir() -> Path:
    """The embedded store: ``.local/mlflow`` (git-ignored) holds mlflow.db and artifacts/."""
    return paths.LOCAL_DIR / "mlflow"


def ui_url(base: str, experiment: str | None = None, run: str | None = None) -> str:
    """A link into MLflow's UI at ``base`` (``http://127.0.0.1:5000``) that opens its model-training view: the
    experiment's runs list with the headline metrics, or one run."""
    if experiment is None:
        return f"{base}/#/?{UI_VIEW}"
    if run is not None:
        return f"{base}/#/experiments/{experiment}/runs/{run}?{UI_VIEW}"
    return f"{base}/#/experiments/{experiment}/runs?viewStateShareKey={RUNS_VIEW_KEY}&{UI_VIEW}"


def artifact_root_for(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite file, else the server's own default."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


# ---------------------------------------------------------------- what a run records (pure)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    params = {}
    for name, value in flatten(cfg.redact_secrets(config)).items():
        text = "null" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        params[name] = text[:MAX_PARAM_CHARS]
    return params


def model_params(kind: str, metrics: Mapping[str, Any], run_meta: Mapping[str, Any]) -> dict[str, str]:
    """The model's identity: backbone, layer, image size, intensity mode, weights sha256 (whatever the run has)."""
    if kind == "spark":
        f = metrics.get("featurizer") or {}
        values = {
            "backbone": f.get("model_name"),
            "feature_layer": f.get("feature_layer"),
            "image_size": f.get("image_size"),
            "intensity": f.get("intensity"),
            "weights_sha256": f.get("weights_sha256"),
        }
    else:
        values = {
            "backbone": run_meta.get("model_name") or metrics.get("model"),
            "feature_layer": run_meta.get("feature_layer"),
            "image_size": run_meta.get("image_size") or metrics.get("image_size"),
            "intensity": run_meta.get("intensity"),  # the Keras flavor takes decoded pixels, decoded with this mode
            "weights_sha256": run_meta.get("weights_sha256"),
        }
    return {f"model.{k}": "null" if v is None else str(v) for k, v in values.items()}


CHOSEN_THRESHOLD_BLOCK = {"spark": "at_chosen", "cnn": "at_threshold"}  # metrics.json's name per kind
HEADLINE = ("accuracy", "sensitivity", "specificity")  # at the threshold chosen on validation


def run_metrics(kind: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """What the run measured, the charts' subject: test AUC, accuracy, sensitivity and specificity at the
    chosen threshold, Brier score, and validation AUC (what the champion decision compares). The rest of
    ``metrics.json`` (intervals, both thresholds, Spark's evaluators) stays in the ``metrics.json`` artifact;
    settings and counts are params."""
    numbers = {}
    for subset in ("validation", "test"):
        auc = subset_auc(kind, metrics, subset)
        if auc is not None:
            numbers[f"{subset}_auc"] = auc
    test = metrics.get(evaluated_subset(kind, metrics)) or {}
    at_chosen = test.get(CHOSEN_THRESHOLD_BLOCK[kind]) or {}
    for name in HEADLINE:
        if _is_number(at_chosen.get(name)):
            numbers[f"test_{name}"] = float(at_chosen[name])
    if _is_number(test.get("brier")):
        numbers["test_brier"] = float(test["brier"])
    return {name: numbers[name] for name in HEADLINE_METRICS if name in numbers}


def run_params(kind: str, metrics: Mapping[str, Any]) -> dict[str, str]:
    """What the run was trained as, beyond the config: the chosen threshold and its rule, images per subset."""
    threshold = metrics.get("threshold")
    choice = threshold if isinstance(threshold, Mapping) else metrics.get("threshold_choice") or {}
    value = choice.get("threshold") if isinstance(threshold, Mapping) else threshold
    params = {"model.threshold": value, "model.threshold_rule": choice.get("rule")}
    for subset, per_class in image_counts(metrics).items():
        params[f"data.{subset}_images"] = sum(per_class)
    return {k: "null" if v is None else str(v) for k, v in params.items()}


def image_counts(metrics: Mapping[str, Any]) -> dict[str, list[int]]:
    """Images per subset and class: a Spark run's ``counts`` ({subset: {class: n}}), a CNN run's ``class_counts``."""
    counts = metrics.get("counts")
    if isinstance(counts, Mapping):
        return {s: [int(n) for n in c.values() if _is_number(n)] for s, c in counts.items() if isinstance(c, Mapping)}
    return {s: [int(n) for n in c] for s, c in (metrics.get("class_counts") or {}).items() if isinstance(c, list)}


def evaluated_subset(kind: str, metrics: Mapping[str, Any]) -> str:
    """The CNN reports on ``val`` when a data set has no test folder (``evaluated_on``); the Spark job on test."""
    return str(metrics.get("evaluated_on") or "test") if kind == "cnn" else "test"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def subset_auc(kind: str, metrics: Mapping[str, Any], subset: str) -> float | None:
    block = metrics.get(subset) or {}
    keys = ("roc_auc", "areaUnderROC", "numpy_roc_auc") if kind == "spark" else ("auc",)
    for key in keys:
        if isinstance(block.get(key), (int, float)):
            return float(block[key])
    return None


def history_metrics(metrics: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) per epoch of the CNN's Keras history: ``train_history.<name>``, step = epoch index.
    The UI orders charts by name: these come after the test figures."""
    rows = []
    for name, values in (metrics.get("history") or {}).items():
        for step, value in enumerate(values or []):
            if isinstance(value, (int, float)) and value == value:  # NaN losses are skipped, not logged
                rows.append((f"train_history.{name}", float(value), step))
    return rows


def image_set_listing(data_uri: str) -> list[tuple[str, int]]:
    """(path relative to the data root, size) of every file under it, sorted: the image set's identity."""
    from ..infra import storage

    root = data_uri.rstrip("/")
    rows = []
    for info in storage.list_files(root, recursive=True):
        rel = info.uri[len(root) :].lstrip("/") if info.uri.startswith(root) else info.uri
        if not posixpath.basename(rel).startswith((".", "_")):
            rows.append((rel, int(info.size)))
    return sorted(rows)


def listing_digest(rows: list[tuple[str, int]]) -> str:
    return hashlib.sha256("".join(f"{p}\t{s}\n" for p, s in rows).encode()).hexdigest()


def champion_decision(
    new_auc: float | None, champion_auc: float | None, champion_version: str | None, new_version: str, alias: str
) -> tuple[bool, str]:
    """(move the alias?, the sentence that says why). Only validation AUC decides."""
    if new_auc is None:
        return False, f"v{new_version} kept out of {alias}: it has no validation AUC"
    if champion_version is None:
        return True, f"v{new_version} is {alias}: first version (validation AUC {new_auc:.4f})"
    if champion_auc is None:
        return True, f"v{new_version} is {alias}: v{champion_version} has no validation AUC to beat"
    if new_auc > champion_auc:
        return True, (
            f"v{new_version} is {alias}: validation AUC {new_auc:.4f} beats "
            f"v{champion_version}'s {champion_auc:.4f}"
        )
    return False, (
        f"v{champion_version} stays {alias}: v{new_version}'s validation AUC {new_auc:.4f} does not "
        f"beat {champion_auc:.4f}"
    )


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(paths.REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def pip_requirements() -> list[str]:
    """The pinned packages a logged model needs (cxr_pipeline itself must be installed: make wheel)."""
    from importlib import metadata

    wanted = ("pyspark", "tensorflow-cpu", "keras", "numpy", "pandas", "pyarrow", "pillow", "mlflow")
    out = []
    for name in wanted:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------- talking to MLflow


def check_reachable(tracking_uri: str, timeout_s: float) -> None:
    """Fails fast (OSError) when an http(s) tracking server does not answer, instead of MLflow's minutes of
    retries."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
        pass


def use_store(settings: TrackingSettings) -> str:
    """Points MLflow at the configured store; returns the tracking URI."""
    import mlflow

    uri = settings.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in job logs
    check_reachable(uri, settings.connect_timeout_s)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(settings.registry_uri or uri)
    return uri


def experiment_id(settings: TrackingSettings, uri: str) -> str | None:
    """The configured experiment (created with its artifacts beside a SQLite store); None = the active one."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not settings.experiment or (uri.startswith("databricks") and not settings.experiment.startswith("/")):
        return None  # the active experiment: in a Databricks notebook, the notebook's own
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(settings.experiment)
    if found is None:
        root = artifact_root_for(uri)
        location = f"{root}/{settings.experiment}" if root else None
        try:
            client.create_experiment(settings.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException:  # another job created it a moment ago
            pass
        found = client.get_experiment_by_name(settings.experiment)
        if found is None:
            raise MlflowException(f"experiment {settings.experiment} could not be created")
    for key, value in EXPERIMENT_TAGS.items():  # also an experiment made before this tag was set
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


@dataclass(frozen=True)
class LoggedRun:
    run_id: str
    experiment_id: str
    model_uri: str
    registered_name: str | None
    version: str | None
    promoted: bool
    decision: str | None
    tracking_uri: str


def _safely(kind: str, run_uri: str, config: Mapping[str, Any], body: Callable[[TrackingSettings], LoggedRun]):
    try:
        settings = TrackingSettings.from_config(config)
    except cfg.ConfigError as exc:
        _warn(f"tracking settings are invalid ({exc}); the run was not logged to MLflow", run_uri, kind)
        return None
    if not settings.enabled:
        return None
    try:
        logged = body(settings)
    except Exception as exc:  # noqa: BLE001 - MLflow must never lose a finished training run
        log.debug("MLflow logging failed", exc_info=True)
        _warn(
            f"MLflow at {settings.tracking_uri()} could not record this run: {type(exc).__name__}: "
            f"{str(exc)[:300].rstrip('.')}",
            run_uri,
            kind,
        )
        return None
    print(
        f"mlflow: run {logged.run_id} in {logged.tracking_uri}"
        + (f"; registered {logged.registered_name} v{logged.version}" if logged.version else "")
    )
    if logged.decision:
        print(f"mlflow: {logged.decision}")
    link = ui_link(logged)
    if link:
        print(f"mlflow: {link}")
    return logged


def ui_link(logged: LoggedRun) -> str | None:
    """Where to see the run: the embedded store through ``make mlflow-ui``, a tracking server at its own address."""
    if logged.tracking_uri.startswith("sqlite:///"):
        return f"make mlflow-ui, then {ui_url(DEFAULT_UI, logged.experiment_id)}"
    if logged.tracking_uri.startswith(("http://", "https://")):
        return ui_url(logged.tracking_uri.rstrip("/"), logged.experiment_id)
    return None


def _warn(message: str, run_uri: str, kind: str) -> None:
    text = (
        f"{message}. The run folder {run_uri} is complete and unaffected; log it later with "
        f"`python -m cxr_pipeline.tracking log --kind {kind} {run_uri}` (or --set tracking.enabled=false)."
    )
    log.warning(text)
    warnings.warn(text, TrackingWarning, stacklevel=3)


def log_spark_run(
    config: Mapping[str, Any], result, data_uri: str, spark, started_at: float | None = None
) -> LoggedRun | None:
    """Logs a ``training.TrainingResult`` (needs the live Spark session for the model). Never raises.

    ``started_at`` (``time.time()`` when the job began) starts the MLflow run there, so its duration is the
    job's; None = now."""
    run_uri = result.run.root

    def body(settings: TrackingSettings) -> LoggedRun:
        return _log_run(
            settings,
            _RunToLog("spark", config, run_uri, result.metrics, data_uri, started_at),
            tags={"spark_master": spark.sparkContext.master},
            log_model=lambda local_run: _log_spark_model(result.model, spark, data_uri),
        )

    return _safely("spark", run_uri, config, body)


def log_cnn_run(
    config: Mapping[str, Any], metrics: Mapping[str, Any], run_uri: str, data_uri: str, started_at: float | None = None
) -> LoggedRun | None:
    """Logs a finished ``cnn.train.train_and_evaluate`` run folder. Never raises. ``started_at``: as
    :func:`log_spark_run`."""

    def body(settings: TrackingSettings) -> LoggedRun:
        return _log_run(
            settings,
            _RunToLog("cnn", config, run_uri, metrics, data_uri, started_at),
            tags={"spark_master": "none (the CNN trains with Keras, not Spark)"},
            log_model=lambda local_run: _log_keras_model(local_run, data_uri),
        )

    return _safely("cnn", run_uri, config, body)


@dataclass(frozen=True)
class _RunToLog:
    kind: str
    config: Mapping[str, Any]
    run_uri: str
    metrics: Mapping[str, Any]
    data_uri: str
    started_at: float | None


def run_name(kind: str, data_uri: str, metrics: Mapping[str, Any], run_meta: Mapping[str, Any], started: float) -> str:
    """``chest_xray · InceptionV3 mixed5 + LR · 2026-12-07 19:55``: the data, the model, when the job began."""
    import time

    data = posixpath.basename(str(data_uri).rstrip("/")) or str(data_uri)
    model = model_params(kind, metrics, run_meta)
    if kind == "spark":
        tuned = " fine-tuned" if (metrics.get("featurizer") or {}).get("backbone_run") else ""
        what = f"{model['model.backbone']}{tuned} {model['model.feature_layer']} + LR"
    else:
        what = f"{model['model.backbone']} {model['model.image_size']} px"
    return f"{data} · {what} · {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}"


def _log_run(settings: TrackingSettings, run: _RunToLog, tags: Mapping[str, str], log_model) -> LoggedRun:
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    from ..infra import storage

    uri = use_store(settings)
    exp_id = experiment_id(settings, uri)
    started = run.started_at if run.started_at is not None else time.time()
    with tempfile.TemporaryDirectory(prefix="cxr_mlflow_") as tmp:
        local_run = Path(tmp) / RUN_FOLDER_ARTIFACT
        storage.download_dir(run.run_uri, local_run)
        _redact_config_file(local_run / "config.yaml")
        run_meta = _read_json(local_run / ("cnn.json" if run.kind == "cnn" else "classifier.json"))
        created = MlflowClient().create_run(
            exp_id or _active_experiment_id(),
            start_time=int(started * 1000),
            run_name=run_name(run.kind, run.data_uri, run.metrics, run_meta, started),
        )
        run_id = created.info.run_id
        with mlflow.start_run(run_id=run_id) as active:
            mlflow.set_tags(
                {
                    "kind": run.kind,
                    # what this run was trained as: its copy in MLflow; the folder it was written to can be
                    # replaced by a later run (make demo --overwrite)
                    "run_folder": f"runs:/{run_id}/{RUN_FOLDER_ARTIFACT}",
                    "written_to": run.run_uri,
                    "data_uri": run.data_uri,
                    "git_commit": git_commit() or "unknown",
                    **backbone_tags(run.metrics, exp_id),
                    **tags,
                }
            )
            mlflow.log_params(
                {
                    **config_params(run.config),
                    **model_params(run.kind, run.metrics, run_meta),
                    **run_params(run.kind, run.metrics),
                }
            )
            _log_metrics(run_id, run.kind, run.metrics)
            _log_dataset(run.data_uri)
            for path in sorted(local_run.iterdir()):
                if path.is_file() and (path.suffix == ".png" or path.name in TOP_LEVEL_ARTIFACTS):
                    mlflow.log_artifact(str(path))
            mlflow.log_artifacts(str(local_run), artifact_path=RUN_FOLDER_ARTIFACT)
            model_info = log_model(local_run)
            logged = LoggedRun(
                run_id=run_id,
                experiment_id=active.info.experiment_id,
                model_uri=model_info.model_uri,
                registered_name=None,
                version=None,
                promoted=False,
                decision=None,
                tracking_uri=uri,
            )
            if settings.register:
                logged = _register(settings, run.kind, logged, subset_auc(run.kind, run.metrics, "validation"))
    return logged


def backbone_tags(metrics: Mapping[str, Any], exp_id: str | None) -> dict[str, str]:
    """A Spark run on a CNN run's fine-tuned backbone (``featurizer.backbone_run``) names that run folder and,
    when this store logged it, its MLflow run: the latest CNN run written to that folder."""
    from mlflow.tracking import MlflowClient

    backbone_run = (metrics.get("featurizer") or {}).get("backbone_run")
    if not backbone_run:
        return {}
    tags = {"backbone_run": str(backbone_run)}
    found = MlflowClient().search_runs(
        [exp_id or _active_experiment_id()],
        filter_string=f"tags.kind = 'cnn' and tags.written_to = '{backbone_run}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        tags["backbone_mlflow_run"] = found[0].info.run_id
    return tags


def _active_experiment_id() -> str:
    """The experiment ``mlflow.start_run`` would use (a Databricks notebook's own, or MLflow's default)."""
    from mlflow.tracking.fluent import _get_experiment_id

    return _get_experiment_id()


def _log_metrics(run_id: str, kind: str, metrics: Mapping[str, Any]) -> None:
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    rows = [Metric(k, v, now, 0) for k, v in run_metrics(kind, metrics).items()]
    rows += [Metric(k, v, now, step) for k, v, step in history_metrics(metrics)]
    MlflowClient().log_batch(run_id, metrics=rows)


def _log_dataset(data_uri: str) -> None:
    import mlflow
    import pandas as pd

    rows = image_set_listing(data_uri)
    frame = pd.DataFrame(rows, columns=["path", "size"])
    parts = frame["path"].str.split("/")
    frame["split"] = parts.map(lambda p: p[-3] if len(p) >= 3 else "")
    frame["label_name"] = parts.map(lambda p: p[-2] if len(p) >= 2 else "")
    digest = listing_digest(rows)
    name = posixpath.basename(data_uri.rstrip("/")) or data_uri
    with warnings.catch_warnings():  # MLflow's hints on ambiguous local sources and integer columns: noise here
        warnings.simplefilter("ignore", UserWarning)
        try:
            dataset = mlflow.data.from_pandas(frame, source=data_uri, name=name, digest=digest[:32])
        except Exception:  # noqa: BLE001 - a URI scheme MLflow has no source class for (s3a://, ...)
            dataset = mlflow.data.from_pandas(frame, name=data_uri, digest=digest[:32])
        mlflow.log_input(dataset, context="training")  # the schema (and its hint) is computed here
    mlflow.log_param("data.images_sha256", digest)
    mlflow.log_param("data.images", len(rows))


def _log_spark_model(model, spark, data_uri: str):
    """The PipelineModel through mlflow.spark: input = the raw image bytes column, output = prediction."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    example = pd.DataFrame({"content": [_example_image_bytes(data_uri)]})
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "content")]), outputs=Schema([ColSpec("double", "prediction")])
    )
    return mlflow.spark.log_model(
        model,
        artifact_path=MODEL_ARTIFACT,
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
    )


def _log_keras_model(local_run: Path, data_uri: str):
    """The CNN through the Keras flavor: input = one decoded image at the model's size (uint8 range, float32)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from ..cnn.predict import LocalCnnClassifier

    classifier = LocalCnnClassifier.load(str(local_run))
    images, _good, bad = classifier.decode([_example_image_bytes(data_uri)])
    if bad:
        raise ValueError(f"the input example image does not decode: {bad[0][1]}")
    example = np.asarray(images, np.float32)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1), "p_pneumonia")]),
    )
    from mlflow.models import Model

    with _keras_quietly():
        return Model.log(
            artifact_path=None,
            name=MODEL_ARTIFACT,
            flavor=_KerasFlavor(),
            model=classifier.model,
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
        )


@contextlib.contextmanager
def _keras_quietly():
    """MLflow scores the input example with the model it saved: without this, Keras draws a progress bar (ANSI
    colour codes and backspaces in a job's or notebook's log) and warns that a named input got a plain tensor."""
    import keras

    interactive = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match", category=UserWarning)
            yield
    finally:
        if interactive:
            keras.config.enable_interactive_logging()


class _KerasFlavor:
    """``mlflow.keras`` with the model folder made first: mlflow 3.17.2's keras ``save_model`` writes
    input_example.json before it creates the folder (FileNotFoundError whenever an input example is given)."""

    def __getattr__(self, name: str):
        import mlflow.keras

        return getattr(mlflow.keras, name)

    @staticmethod
    def save_model(path, **kwargs):
        import mlflow.keras

        os.makedirs(path, exist_ok=True)
        return mlflow.keras.save_model(path=path, **kwargs)


def _example_image_bytes(data_uri: str) -> bytes:
    """One real image of the data set (the first test image, else the first file).

    A DICOM file's header holds patient data, and MLflow stores the example (base64) in the model's artifacts:
    a DICOM example is its decoded image without the header (``dicom.pack_payload``, as packed tables store it).
    """
    from ..images import dicom
    from ..images.decode import ImageDecodeError, configured_max_pixels
    from ..images.layout import is_dicom
    from ..infra import storage

    files = [
        f
        for f in storage.list_files(data_uri, recursive=True)
        if f.uri.lower().endswith((".jpeg", ".jpg", ".png", ".dcm"))
    ]
    if not files:
        raise FileNotFoundError(f"no image under {data_uri} for the model's input example")
    tests = [f for f in files if "/test/" in f.uri]
    for candidate in sorted(tests or files, key=lambda f: f.uri):
        data = storage.read_bytes(candidate.uri)
        if not is_dicom(data):
            return data
        try:
            return dicom.pack_payload(data, configured_max_pixels())[0]
        except ImageDecodeError:
            continue  # an unusable DICOM: the next file
    raise FileNotFoundError(f"no decodable image under {data_uri} for the model's input example")


def _register(settings: TrackingSettings, kind: str, logged: LoggedRun, validation_auc: float | None) -> LoggedRun:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias = settings.model_name(kind), settings.champion_alias
    version = mlflow.register_model(logged.model_uri, name)
    client = MlflowClient()
    run_tags = client.get_run(logged.run_id).data.tags
    for tag in ("run_folder", "written_to"):  # the version's own copy, and where the run was first written
        if tag in run_tags:
            client.set_model_version_tag(name, version.version, tag, run_tags[tag])
    if validation_auc is not None:
        client.set_model_version_tag(name, version.version, "validation_auc", f"{validation_auc:.6f}")
    try:
        champion = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        champion = None
    champion_auc = _version_validation_auc(client, champion) if champion is not None else None
    promote, decision = champion_decision(
        validation_auc, champion_auc, champion.version if champion else None, version.version, alias
    )
    if promote:
        client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "champion_decision", decision)
    client.set_tag(logged.run_id, "champion_decision", decision)
    return LoggedRun(
        **{
            **logged.__dict__,
            "registered_name": name,
            "version": str(version.version),
            "promoted": promote,
            "decision": f"{name}: {decision}",
        }
    )


def _version_validation_auc(client, version) -> float | None:
    tag = (version.tags or {}).get("validation_auc")
    if tag is not None:
        return float(tag)
    if version.run_id:
        value = client.get_run(version.run_id).data.metrics.get("validation_auc")
        return float(value) if value is not None else None
    return None


def _redact_config_file(path: Path) -> None:
    import yaml

    if path.is_file():
        path.write_text(cfg.dump_config(yaml.safe_load(path.read_text()) or {}))  # dump_config redacts


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------- registry URIs -> local run folders


def resolved_dir(tracking_uri: str) -> Path:
    """Where registered run folders are copied to: beside a SQLite store (its own cache, a test's store's in a
    temporary folder), else ``.local/mlflow/resolved``."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).parent / "resolved"
    return default_store_dir() / "resolved"


def is_registry_uri(model: str) -> bool:
    return str(model).startswith(REGISTRY_PREFIX)


def resolve_model(model: str, config: Mapping[str, Any] | None = None, dest: str | os.PathLike | None = None) -> str:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> a local copy of that version's run folder (what
    the run-folder loaders read). Anything else is returned as it is. Raises ValueError with what to do."""
    if not is_registry_uri(model):
        return model
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    settings = TrackingSettings.from_config(config or cfg.load_config("local"))
    try:
        uri = use_store(settings)
        client = MlflowClient()
        version = _version_of(client, model)
        # keyed by the run too: two stores (a test's, the embedded one) both have a "v1"
        target = (
            Path(dest)
            if dest
            else resolved_dir(uri) / version.name / f"v{version.version}-{(version.run_id or 'norun')[:12]}"
        )
        local = target / f"{version.name}-v{version.version}"  # its name becomes the served model's id
        if not (local / "_SUCCESS").is_file():  # renamed into place only once complete
            if not version.run_id:
                raise ValueError(f"{model} (v{version.version}) has no MLflow run to take the run folder from")
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            client.download_artifacts(version.run_id, RUN_FOLDER_ARTIFACT, str(target))
            (target / RUN_FOLDER_ARTIFACT).rename(local)
    except (MlflowException, OSError) as exc:
        raise ValueError(
            f"cannot resolve {model} in the MLflow registry at {settings.registry_uri or settings.tracking_uri()}: "
            f"{str(exc)[:300]} (check --set tracking.uri=... or list versions in `make mlflow-ui`)"
        ) from exc
    return str(local)


def _version_of(client, model: str):
    rest = model[len(REGISTRY_PREFIX) :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, number = rest.rpartition("/")
    if not name or not number.isdigit():
        raise ValueError(f"{model}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(name, number)


# ---------------------------------------------------------------- command line


def _log_later(args, config) -> int:
    from ..infra import run_folder, storage
    from ..spark.classifier.training import RunLayout, TrainingResult, load_metrics

    storage.configure(config)
    run_folder.require_complete(args.run)
    metrics = load_metrics(args.run)
    data_uri = args.data or metrics.get("data") or cfg.require(config, "data.uri")
    if args.kind == "cnn":
        logged = log_cnn_run(config, metrics, args.run, data_uri)
        return 0 if logged else 1
    from pyspark.ml import PipelineModel

    from ..spark.session import spark_session

    spark = spark_session(config, app_name="cxr-tracking-log", master=args.master)
    try:
        run = RunLayout(args.run)
        result = TrainingResult(run=run, model=PipelineModel.load(run.model), metrics=metrics, summary="")
        logged = log_spark_run(config, result, data_uri, spark)
    finally:
        spark.stop()
    return 0 if logged else 1


def ui_command(settings: TrackingSettings, port: int) -> list[str]:
    """``mlflow ui`` on the configured store, bound to loopback only (one worker: 2-core machines)."""
    uri = settings.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    root = artifact_root_for(uri)
    return command + (["--default-artifact-root", root] if root else [])


def _existing_experiment(settings: TrackingSettings) -> str | None:
    """The configured experiment's id when the store has it (the UI link opens its runs), else None."""
    if not settings.experiment:
        return None
    try:
        from mlflow.tracking import MlflowClient

        found = MlflowClient(use_store(settings)).get_experiment_by_name(settings.experiment)
    except Exception:  # noqa: BLE001 - a link to the UI's start page will do
        return None
    return found.experiment_id if found is not None else None


def main(argv=None) -> int:
    from ..cli import add_config_options, resolve_config

    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.tracking",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_log = sub.add_parser("log", help="log a finished run folder to MLflow (e.g. after the server was down)")
    p_log.add_argument("run", help="run folder URI of train_featurizer.py or train_cnn.py")
    p_log.add_argument("--kind", choices=KINDS, required=True)
    p_log.add_argument("--data", help="data URI the run was trained on (default: the one in metrics.json)")
    add_config_options(p_log)
    p_res = sub.add_parser("resolve", help="print the local run folder of models:/NAME@ALIAS or models:/NAME/N")
    p_res.add_argument("model")
    add_config_options(p_res)
    p_ui = sub.add_parser("ui", help="the MLflow UI on the configured store, on 127.0.0.1 only (make mlflow-ui)")
    p_ui.add_argument("--port", type=int, default=5000)
    add_config_options(p_ui)
    args = parser.parse_args(argv)
    config = resolve_config(args)
    if args.command == "ui":
        settings = TrackingSettings.from_config(config)
        command = ui_command(settings, args.port)
        print(
            f"MLflow UI on {ui_url(f'http://127.0.0.1:{args.port}', _existing_experiment(settings))} "
            f"({command[command.index('--backend-store-uri') + 1]})",
            flush=True,
        )
        os.execv(command[0], command)
    if args.command == "resolve":
        try:
            print(resolve_model(args.model, config))
        except ValueError as exc:
            print(f"tracking: error: {exc}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _log_later(args, config)


if __name__ == "__main__":
    sys.exit(main())
