"""The CNN's run folder: model.keras, cnn.json, the fine-tuned backbone, metrics, plots, the model card, and
the all-or-nothing upload to ``--out`` (:mod:`cxr_pipeline.infra.run_folder`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import config as config_mod
from ..evaluation import metrics as M
from ..evaluation import plots, reporting
from ..infra import storage
from . import models

if TYPE_CHECKING:  # the settings and data the run was trained with
    from .train import Prepared, Settings

CNN_JSON = "cnn.json"
MODEL_FILE = "model.keras"
BACKBONE_FILE = "backbone.weights.h5"  # the fine-tuned backbone, for the Spark featurizer (featurizer.backbone_run)


def write_outputs(stage: Path, out_uri: str, overwrite: bool) -> None:
    """The finished local run folder -> ``out_uri``, all or nothing (:mod:`cxr_pipeline.infra.run_folder`)."""
    from ..infra import run_folder

    with run_folder.staged_output(out_uri, overwrite=overwrite, tool="train_cnn") as target:
        storage.upload_dir(str(stage), target)


def history_csv(history: dict[str, list[float]]) -> str:
    keys = list(history)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["epoch", *keys])
    for i in range(max((len(v) for v in history.values()), default=0)):
        writer.writerow([i + 1, *[history[k][i] if i < len(history[k]) else "" for k in keys]])
    return buf.getvalue()


def predictions_csv(scored) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "used_as", "label", "probability"])
    for used_as, record, p in scored:
        writer.writerow([record.uri, used_as, record.label, repr(float(p))])
    return buf.getvalue()


def export_backbone(settings: Settings, model, stage: Path) -> dict[str, Any]:
    """Write the trained backbone beside the model; returns how the featurizer is to use it (cnn.json)."""
    from cxr_pipeline.models.backbones import file_sha256

    inception = settings.cnn.inception
    models.export_backbone(model, inception.weights, stage / BACKBONE_FILE)
    return {
        "model_name": "InceptionV3",
        "weights_file": BACKBONE_FILE,
        "weights_sha256": file_sha256(stage / BACKBONE_FILE),
        "feature_layer": inception.feature_layer,
        "image_size": settings.image_size,
        "intensity": settings.intensity,
    }


def write_run(stage: Path, config, settings: Settings, metrics, prepared: Prepared, scored) -> None:
    eval_name = metrics["evaluated_on"]
    threshold = metrics["threshold"]
    final = [(r.label, p) for used_as, r, p in scored if used_as == eval_name]
    y = np.array([label for label, _ in final], np.int64)
    p = np.array([prob for _, prob in final], np.float64)
    (stage / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    (stage / "config.yaml").write_text(config_mod.dump_config(config))
    (stage / CNN_JSON).write_text(
        json.dumps(
            {
                "model_name": settings.model,
                "model_file": MODEL_FILE,
                "image_size": settings.image_size,
                "label_names": prepared.label_names,
                "threshold": threshold,
                "default_threshold": M.DEFAULT_THRESHOLD,
                "max_pixels": settings.max_pixels,
                "intensity": settings.intensity,
                "feature_layer": settings.cnn.inception.feature_layer if settings.model == "inception_v3" else None,
                "backbone": metrics.get("backbone"),
                "runtime": settings.runtime,
                "precision": settings.precision,
            },
            indent=2,
        )
    )
    (stage / "rejected.csv").write_text(prepared.rejections.to_csv())
    (stage / "history.csv").write_text(history_csv(metrics["history"]))
    plots.plot_training_curves(metrics["history"], out=stage / "training_curves.png")
    report = metrics[eval_name]
    cm = report["at_threshold"]["confusion_matrix"]
    plots.plot_confusion_matrix(
        cm,
        prepared.label_names,
        out=stage / "confusion_matrix.png",
        title=f"Confusion matrix ({eval_name}, threshold {threshold:.3f})",
    )
    plots.plot_confusion_matrix(
        report["at_0.5"]["confusion_matrix"],
        prepared.label_names,
        out=stage / "confusion_matrix_0.5.png",
        title=f"Confusion matrix ({eval_name}, threshold 0.5)",
    )
    if M.has_both_classes(y):
        fpr, tpr, _ = M.roc_curve(y, p)
        points = {
            name: (1 - (r["specificity"] or 0.0), r["sensitivity"] or 0.0)
            for name, r in (("0.5", report["at_0.5"]), (f"{threshold:.3f}", report["at_threshold"]))
        }
        plots.plot_roc(
            fpr, tpr, report["auc"], out=stage / "roc.png", title=f"ROC curve ({eval_name})", operating_points=points
        )
    else:
        plots.plot_roc(
            [0, 1], [0, 1], None, out=stage / "roc.png", title=f"ROC curve ({eval_name}): undefined, one class only"
        )
    reporting.write_calibration_plot(report, str(stage / reporting.CALIBRATION_PNG))
    (stage / reporting.MODEL_CARD).write_text(model_card(config, settings, metrics, prepared))


def model_card(config, settings: Settings, metrics, prepared: Prepared) -> str:
    eval_name = metrics["evaluated_on"]
    choice_fields = M.ThresholdChoice.__dataclass_fields__
    choice = M.ThresholdChoice(**{k: v for k, v in metrics["threshold_choice"].items() if k in choice_fields})
    if settings.model == "inception_v3":
        description = (
            f"Keras InceptionV3 transfer model cut at `{settings.cnn.inception.feature_layer}`, "
            f"{settings.image_size} px, {settings.epochs} frozen + {settings.cnn.fine_tune.epochs} fine-tuning epochs, "
            f"balance {settings.balance}, intensity {settings.intensity}."
        )
    else:
        description = (
            f"Keras {settings.model} trained from scratch, {settings.image_size} px, balance {settings.balance}, "
            f"intensity {settings.intensity}."
        )
    counts = {k: dict(zip(prepared.label_names, v)) for k, v in prepared.counts().items()}
    split = (
        f"Validation: carved from the pooled train + val folders, grouped by patient (fraction "
        f"{settings.validation_fraction}, seed {settings.seed}), as in the Spark job. It picked the best epoch "
        "and the threshold."
        if settings.validation == "carve"
        else "Validation: the dataset's own val folder. It picked the best epoch and the threshold."
    )
    test = (
        f"the dataset's test folder (n={metrics[eval_name]['n']}), never used for training, epoch or threshold"
        if eval_name == "test"
        else f"VALIDATION (n={metrics[eval_name]['n']}): there was no test folder, so these figures are optimistic"
    )
    validation = metrics.get("validation") or {}
    return reporting.model_card(
        title=f"Keras CNN pneumonia classifier ({settings.model})",
        model_description=description,
        data=str(metrics.get("data")),
        counts=counts,
        label_names=prepared.label_names,
        split_description=split,
        threshold=choice,
        honest=metrics[eval_name],
        test_description=test,
        validation={
            "n": validation.get("n"),
            "roc_auc": validation.get("auc"),
            "at_chosen": validation.get("at_threshold"),
        }
        if validation
        else None,
    )
