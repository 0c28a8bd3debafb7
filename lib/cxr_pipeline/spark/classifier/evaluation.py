"""Test-set evaluation: Spark ML evaluators, numpy cross-checks, metrics.json, figures, summary.

Spark's ``MulticlassClassificationEvaluator`` / ``BinaryClassificationEvaluator``
give the headline numbers; ``cxr_pipeline.evaluation.metrics`` gives the confusion matrix,
sensitivity/specificity and the curve points for the figures. Everything is
reported at two thresholds: the one chosen on validation and 0.5. A value that
cannot be computed (a test set with one class) is ``null`` in metrics.json and
"undefined" in the summary, never a crash and never NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pyspark.ml.evaluation import BinaryClassificationEvaluator, MulticlassClassificationEvaluator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ...evaluation import metrics as M
from ...evaluation import plots, reporting

SCORE_COL = "p_pneumonia"
MULTICLASS_METRICS = ("accuracy", "f1", "weightedPrecision", "weightedRecall")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def spark_metrics_at(predictions: DataFrame, threshold: float, label_names: Sequence[str]) -> dict[str, Any]:
    """Spark evaluators with prediction = ``p_pneumonia >= threshold``."""
    df = predictions.withColumn("thresholded", (F.col(SCORE_COL) >= F.lit(float(threshold))).cast("double")).withColumn(
        "label_d", F.col("label").cast("double")
    )
    out: dict[str, Any] = {"threshold": float(threshold)}
    for name in MULTICLASS_METRICS:
        ev = MulticlassClassificationEvaluator(labelCol="label_d", predictionCol="thresholded", metricName=name)
        out[name] = ev.evaluate(df)
    out["truePositiveRateByLabel"] = {}
    present = {r[0] for r in df.select("label").distinct().collect()}
    for label, name in enumerate(label_names):
        if label not in present:
            out["truePositiveRateByLabel"][name] = None
            continue
        ev = MulticlassClassificationEvaluator(
            labelCol="label_d",
            predictionCol="thresholded",
            metricName="truePositiveRateByLabel",
            metricLabel=float(label),
        )
        out["truePositiveRateByLabel"][name] = ev.evaluate(df)
    return out


def spark_auc(predictions: DataFrame, both_classes: bool) -> dict[str, float | None]:
    if not both_classes:
        return {"areaUnderROC": None, "areaUnderPR": None}
    df = predictions.withColumn("label_d", F.col("label").cast("double"))
    return {
        name: BinaryClassificationEvaluator(
            labelCol="label_d", rawPredictionCol="probability", metricName=name
        ).evaluate(df)
        for name in ("areaUnderROC", "areaUnderPR")
    }


def _at(labels, scores, threshold: float) -> dict[str, Any]:
    report = M.binary_report(labels, scores, threshold).to_dict()
    report["confusion_matrix"] = M.confusion_matrix(labels, M.predict_at(scores, threshold)).tolist()
    return report


def evaluate(test: DataFrame, choice: M.ThresholdChoice, label_names: Sequence[str]) -> dict[str, Any]:
    """The ``test`` block of metrics.json (+ curve points kept aside for the figures)."""
    rows = test.select("label", SCORE_COL).collect()
    labels = [int(r[0]) for r in rows]
    scores = [float(r[1]) for r in rows]
    both = M.has_both_classes(labels)
    thresholds = {"chosen": choice.threshold, "default_0.5": M.DEFAULT_THRESHOLD}
    test_block: dict[str, Any] = {"n": len(labels), **(spark_auc(test, both) if labels else {})}
    test_block["numpy_roc_auc"] = M.roc_auc(labels, scores) if labels else None
    test_block["numpy_average_precision"] = M.average_precision(labels, scores) if labels else None
    for key, t in thresholds.items():
        block = _at(labels, scores, t) if labels else {"threshold": t}
        if labels:
            block["spark"] = spark_metrics_at(test, t, label_names)
        test_block[f"at_{key}"] = block
    honest = reporting.honest_metrics(labels, scores, {f"at_{k}": t for k, t in thresholds.items()})
    test_block.update(intervals=honest["intervals"], brier=honest["brier"], calibration=honest["calibration"])
    return {
        "label_names": list(label_names),
        "positive_label": label_names[1],
        "threshold": {**choice.to_dict(), "default": M.DEFAULT_THRESHOLD, "description": choice.describe()},
        "test": test_block,
        "_curves": {"labels": labels, "scores": scores},
    }


def validation_report(labels: Sequence[int], scores: Sequence[float], choice: M.ThresholdChoice) -> dict[str, Any]:
    return {
        "n": len(labels),
        "roc_auc": M.roc_auc(labels, scores) if labels else None,
        "at_chosen": M.binary_report(labels, scores, choice.threshold).to_dict() if labels else None,
        "at_default_0.5": M.binary_report(labels, scores, 0.5).to_dict() if labels else None,
    }


def write_figures(
    run, labels: Sequence[int], scores: Sequence[float], choice: M.ThresholdChoice, label_names: Sequence[str]
) -> list[str]:
    """ROC, PR, confusion matrix (chosen threshold) and threshold trade-off; skips what is undefined."""
    import numpy as np

    written = []
    cm = M.confusion_matrix(labels, M.predict_at(scores, choice.threshold))
    plots.plot_confusion_matrix(
        cm, label_names, out=run.confusion, title=f"Confusion matrix (test, threshold {choice.threshold:.3f})"
    )
    written.append(run.confusion)
    if M.has_both_classes(labels):
        fpr, tpr, thr = M.roc_curve(labels, scores)
        points = {}
        for name, t in (("chosen", choice.threshold), ("0.5", 0.5)):
            r = M.binary_report(labels, scores, t)
            points[f"threshold {name} ({t:.3f})"] = (1 - r.specificity, r.sensitivity)
        plots.plot_roc(fpr, tpr, M.roc_auc(labels, scores), out=run.roc, operating_points=points)
        precision, recall, _ = M.pr_curve(labels, scores)
        plots.plot_pr(
            precision, recall, M.average_precision(labels, scores), out=run.pr, prevalence=float(np.mean(labels))
        )
        grid = np.linspace(0, 1, 101)
        reports = [M.binary_report(labels, scores, t) for t in grid]
        plots.plot_threshold_tradeoff(
            grid,
            [r.sensitivity for r in reports],
            [r.specificity for r in reports],
            chosen=choice.threshold,
            out=run.threshold_plot,
            title="Test sensitivity / specificity vs threshold",
        )
        written += [run.roc, run.pr, run.threshold_plot]
    return written


def write_report(run, report: dict[str, Any], test: DataFrame, label_names: Sequence[str]) -> None:
    from ...infra import storage

    curves = report.pop("_curves")
    choice = threshold_choice_of(report)
    report["figures"] = write_figures(run, curves["labels"], curves["scores"], choice, label_names)
    if M.has_both_classes(curves["labels"]):  # like ROC/PR: no figure for an undefined curve
        report["figures"].append(reporting.write_calibration_plot(report["test"], run.file(reporting.CALIBRATION_PNG)))
    storage.write_bytes(run.metrics, json.dumps(_clean(report), indent=2, sort_keys=True).encode())
    storage.write_bytes(run.file(reporting.MODEL_CARD), model_card_text(report, choice, label_names).encode())


def threshold_choice_of(report: Mapping[str, Any]) -> M.ThresholdChoice:
    fields = M.ThresholdChoice.__dataclass_fields__
    return M.ThresholdChoice(**{k: v for k, v in report["threshold"].items() if k in fields})


def _weights_origin(featurizer: Mapping[str, Any]) -> str:
    backbone_run = featurizer.get("backbone_run")
    return f"fine-tuned (the backbone of CNN run {backbone_run})" if backbone_run else "ImageNet"


def model_card_text(report: Mapping[str, Any], choice: M.ThresholdChoice, label_names: Sequence[str]) -> str:
    feat = report.get("featurizer") or {}
    clf = report.get("classifier") or {}
    split = report.get("split") or {}
    if split.get("mode") == "carve":
        split_text = (
            f"Validation: carved from the pooled train + val folders, grouped by patient "
            f"(fraction {split.get('fraction')}, seed {split.get('seed')}; {split.get('train_patients')} "
            f"train / {split.get('val_patients')} validation patients). It chose the threshold only."
        )
    else:
        split_text = "Validation: the dataset's own val folder. It chose the threshold only."
    return reporting.model_card(
        title=f"Spark ML pneumonia classifier ({report.get('run')})",
        model_description=(
            f"{feat.get('model_name')} {_weights_origin(feat)} features pooled at `{feat.get('feature_layer')}` "
            f"(image size {feat.get('image_size') or 'native'}, intensity {feat.get('intensity') or 'none'}), "
            f"run on {feat.get('runtime') or 'keras'} at {feat.get('precision') or 'fp32'} -> "
            "StandardScaler -> "
            f"LogisticRegression (regParam {clf.get('regParam')}, elasticNetParam "
            f"{clf.get('elasticNetParam')}, class weights {report.get('class_weights')})."
        ),
        data=str(report.get("data")),
        counts=report.get("counts", {}),
        label_names=label_names,
        split_description=split_text,
        threshold=choice,
        honest=report["test"],
        test_description=(
            f"the dataset's test folder (n={report['test'].get('n')}), never used for training "
            "or for choosing the threshold"
        ),
        validation=report.get("validation"),
    )


def summary_text(report: Mapping[str, Any]) -> str:
    """A short human-readable summary of a metrics.json dict."""
    f = M.fmt
    t = report["test"]
    th = report["threshold"]
    lines = [f"run:   {report.get('run')}", f"data:  {report.get('data')}"]
    counts = report.get("counts", {})
    for subset in ("train", "val", "test"):
        if subset in counts:
            lines.append(f"{subset:5s}  " + ", ".join(f"{k} {v}" for k, v in counts[subset].items()))
    if report.get("rejected"):
        lines.append(f"rejected images: {report['rejected']} (see rejected.csv)")
    lines.append(f"threshold: {th['threshold']:.4f} chosen {threshold_choice_of(report).describe()}")
    lines.append(f"test n={t['n']}  AUC-ROC {f(t.get('areaUnderROC'))}  AUC-PR {f(t.get('areaUnderPR'))}")
    for key, label in (("at_chosen", "chosen"), ("at_default_0.5", "0.5")):
        b = t.get(key, {})
        if "accuracy" not in b:
            continue
        lines.append(
            f"  @{label:6s} ({b['threshold']:.3f}): accuracy {f(b['accuracy'])}  sensitivity {f(b['sensitivity'])}"
            f"  specificity {f(b['specificity'])}  F1 {f(b['spark']['f1'] if 'spark' in b else b['f1'])}"
            f"  [[TN {b['tn']} FP {b['fp']}] [FN {b['fn']} TP {b['tp']}]]"
        )
    if t.get("intervals"):
        lines += reporting.interval_lines(t)
    return "\n".join(lines) + "\n"
