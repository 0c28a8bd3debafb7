"""MLflow experiment tracking and model registry: every training run is also an MLflow run.

The run folder stays the source of truth; MLflow is an addition. The training paths hand a finished run over as
a plain payload (:class:`RunRecord`: ``spark.classifier.mlflow_run``, ``cnn.mlflow_run``); this package reads
nothing of either path. Modules: ``record`` (what a run records, pure), ``store`` (settings, store, experiment,
UI links), ``runs`` (:func:`log_run`), ``registry`` (versions, the champion, ``models:/`` URIs), ``__main__``
(the command line). For each run of ``jobs/train_featurizer.py``, ``jobs/train_cnn.py`` and notebooks 02/03
this records:

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
Nothing here may lose a training result: :func:`log_run` warns (:class:`TrackingWarning`) and returns None on
any MLflow failure. A run folder can be logged later with
``python -m cxr_pipeline.tracking log RUN``; ``python -m cxr_pipeline.tracking resolve models:/NAME@ALIAS``
prints the local run folder a registry URI stands for; ``python -m cxr_pipeline.tracking ui`` (make mlflow-ui)
starts the MLflow UI on the configured store, on loopback.
"""

from __future__ import annotations

from .record import HEADLINE_METRICS, RUN_FOLDER_ARTIFACT, LoggedRun
from .registry import is_registry_uri, resolve_model
from .runs import KerasModel, RunRecord, SparkModel, TrackingWarning, log_run
from .store import TrackingSettings, ui_url, use_store

__all__ = [
    "HEADLINE_METRICS",
    "RUN_FOLDER_ARTIFACT",
    "KerasModel",
    "LoggedRun",
    "RunRecord",
    "SparkModel",
    "TrackingSettings",
    "TrackingWarning",
    "is_registry_uri",
    "log_run",
    "resolve_model",
    "ui_url",
    "use_store",
]
