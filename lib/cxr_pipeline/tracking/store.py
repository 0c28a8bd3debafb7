"""Where MLflow writes: the ``tracking:`` settings, the store and experiment they name, links into its UI."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .. import config as cfg
from .. import paths
from .record import HEADLINE_METRICS

KINDS = ("spark", "cnn")
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
