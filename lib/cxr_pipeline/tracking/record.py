"""What an MLflow run records, computed from a run folder's metrics.json and config alone (no MLflow, no I/O)."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import config as cfg

RUN_FOLDER_ARTIFACT = "run_folder"  # the complete run folder inside the MLflow run: what models:/ URIs resolve to
MODEL_ARTIFACT = "model"
MAX_PARAM_CHARS = 6000

HEADLINE_METRICS = (  # what run_metrics logs, in the order the runs list shows them
    "test_auc",
    "test_accuracy",
    "test_sensitivity",
    "test_specificity",
    "test_brier",
    "validation_auc",
)


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


def listing_digest(rows: list[tuple[str, int]]) -> str:
    return hashlib.sha256("".join(f"{p}\t{s}\n" for p, s in rows).encode()).hexdigest()


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
