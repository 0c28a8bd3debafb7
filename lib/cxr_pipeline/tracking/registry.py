"""The model registry: a logged run becomes a version of ``tracking.model_names.<kind>``, the champion alias moves
on validation AUC alone, and ``models:/NAME@ALIAS`` resolves to a local copy of that version's run folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import config as cfg
from .record import RUN_FOLDER_ARTIFACT, LoggedRun, champion_decision
from .store import TrackingSettings, default_store_dir, use_store

REGISTRY_PREFIX = "models:/"


def register(settings: TrackingSettings, kind: str, logged: LoggedRun, validation_auc: float | None) -> LoggedRun:
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
