"""One finished training run into MLflow, from a plain payload (:class:`RunRecord`): params, metrics, artifacts,
the data set, tags, the model and, when configured, its registered version. Nothing here may lose a training
result: :func:`log_run` warns (:class:`TrackingWarning`) and returns None on any MLflow failure."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as cfg
from .. import paths
from .record import (
    MODEL_ARTIFACT,
    RUN_FOLDER_ARTIFACT,
    LoggedRun,
    config_params,
    history_metrics,
    listing_digest,
    model_params,
    run_metrics,
    run_name,
    run_params,
    subset_auc,
)
from .registry import register
from .store import DEFAULT_UI, TrackingSettings, experiment_id, ui_url, use_store

log = logging.getLogger(__name__)

TOP_LEVEL_ARTIFACTS = ("metrics.json", "rejected.csv", "config.yaml", "summary.txt", "history.csv")


class TrackingWarning(UserWarning):
    """MLflow could not record a run; the run folder itself is complete."""


@dataclass(frozen=True)
class SparkModel:
    """A fitted Spark ``PipelineModel`` whose input is the raw image bytes column ``content``; logged through
    ``mlflow.spark`` (it loads as a pyfunc too)."""

    pipeline: Any


@dataclass(frozen=True)
class KerasModel:
    """A Keras classifier, logged through MLflow's Keras flavor. ``load(folder)`` loads it from the local copy
    of its run folder: an object with ``model`` (the ``keras.Model``) and ``decode(list[bytes])`` returning
    ``(images, good, bad)``, its input decoding (the input example is decoded with it)."""

    load: Callable[[str], Any]


@dataclass(frozen=True)
class RunRecord:
    """A finished training run, as its job hands it to MLflow: plain values and the model to log.

    ``kind``: ``spark`` or ``cnn`` (``tracking.model_names.<kind>``); ``run_uri``: the run folder the job wrote,
    copied whole into the MLflow run; ``metrics``: its metrics.json; ``started_at`` (``time.time()`` when the
    job began) starts the MLflow run there, so its duration is the job's (None = now); ``tags``: extra tags."""

    kind: str
    run_uri: str
    metrics: Mapping[str, Any]
    data_uri: str
    model: SparkModel | KerasModel
    started_at: float | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


def log_run(config: Mapping[str, Any], run: RunRecord) -> LoggedRun | None:
    """Records ``run`` in the store ``config``'s ``tracking:`` names, and registers its model when configured.
    Never raises: any MLflow failure warns (:class:`TrackingWarning`) and returns None."""
    try:
        settings = TrackingSettings.from_config(config)
    except cfg.ConfigError as exc:
        _warn(f"tracking settings are invalid ({exc}); the run was not logged to MLflow", run)
        return None
    if not settings.enabled:
        return None
    try:
        logged = _log_run(settings, config, run)
    except Exception as exc:  # noqa: BLE001 - MLflow must never lose a finished training run
        log.debug("MLflow logging failed", exc_info=True)
        _warn(
            f"MLflow at {settings.tracking_uri()} could not record this run: {type(exc).__name__}: "
            f"{str(exc)[:300].rstrip('.')}",
            run,
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


def _warn(message: str, run: RunRecord) -> None:
    text = (
        f"{message}. The run folder {run.run_uri} is complete and unaffected; log it later with "
        f"`python -m cxr_pipeline.tracking log --kind {run.kind} {run.run_uri}` (or --set tracking.enabled=false)."
    )
    log.warning(text)
    warnings.warn(text, TrackingWarning, stacklevel=3)


def _log_run(settings: TrackingSettings, config: Mapping[str, Any], run: RunRecord) -> LoggedRun:
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
                    **run.tags,
                }
            )
            mlflow.log_params(
                {
                    **config_params(config),
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
            model_info = _log_model(run, local_run)
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
                logged = register(settings, run.kind, logged, subset_auc(run.kind, run.metrics, "validation"))
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


def _log_model(run: RunRecord, local_run: Path):
    if isinstance(run.model, SparkModel):
        return _log_spark_model(run.model.pipeline, run.data_uri)
    return _log_keras_model(run.model.load(str(local_run)), run.data_uri)


def _log_spark_model(model, data_uri: str):
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


def _log_keras_model(classifier, data_uri: str):
    """The CNN through the Keras flavor: input = one decoded image at the model's size (uint8 range, float32)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

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


def _redact_config_file(path: Path) -> None:
    import yaml

    if path.is_file():
        path.write_text(cfg.dump_config(yaml.safe_load(path.read_text()) or {}))  # dump_config redacts


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


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
