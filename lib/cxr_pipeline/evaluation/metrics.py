"""Binary classification metrics in pure numpy (no Spark, no sklearn).

Convention everywhere: label 1 = PNEUMONIA = positive, score = P(PNEUMONIA).
Sensitivity = TPR on PNEUMONIA, specificity = TNR on NORMAL. A quantity that
cannot be computed (one class only) is ``None``, written "undefined" in reports.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5
BOOTSTRAP_RESAMPLES = 1000  # every reported 95 % interval: this many resamples of the test images ...
BOOTSTRAP_SEED = 0  # ... drawn with this seed, so a report is reproducible


class ThresholdWarning(UserWarning):
    pass


def _arrays(y_true: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y, s


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = 2) -> np.ndarray:
    """``cm[i, j]`` = images of true class i predicted as j (rows: truth)."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    return cm


def predict_at(scores: Sequence[float], threshold: float) -> np.ndarray:
    """Positive when ``score >= threshold`` (the rule used by every component)."""
    return (np.asarray(scores, dtype=np.float64) >= threshold).astype(np.int64)


def decisions(
    n: int,
    scored: Sequence[tuple[int, float]],
    failed: Sequence[tuple[int, str]],
    threshold: float | None,
    label_names: Sequence[str],
) -> list[dict[str, Any]]:
    """The Spark-free scorers' answer per input, in order: ``probability, predicted_label, label_name, threshold,
    error``. ``scored`` holds (index, P(positive)), ``failed`` (index, reason); a failed input has only ``error``."""
    results: list[dict[str, Any]] = [
        {"probability": None, "predicted_label": None, "label_name": None, "threshold": threshold, "error": None}
        for _ in range(n)
    ]
    for index, reason in failed:
        results[index]["error"] = reason
    for index, probability in scored:
        label = int(probability >= threshold)
        results[index].update(probability=float(probability), predicted_label=label, label_name=label_names[label])
    return results


@dataclass(frozen=True)
class BinaryReport:
    threshold: float
    n: int
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None
    precision: float | None
    npv: float | None
    f1: float | None
    tn: int
    fp: int
    fn: int
    tp: int

    def to_dict(self) -> dict:
        return asdict(self)


def binary_report(y_true: Sequence[int], scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> BinaryReport:
    y, s = _arrays(y_true, scores)
    cm = confusion_matrix(y, predict_at(s, threshold))
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = None
    if precision is not None and sensitivity is not None and precision + sensitivity > 0:
        f1 = 2 * precision * sensitivity / (precision + sensitivity)
    return BinaryReport(
        threshold=float(threshold),
        n=int(y.size),
        accuracy=_ratio(tp + tn, y.size),
        sensitivity=sensitivity,
        specificity=_ratio(tn, tn + fp),
        precision=precision,
        npv=_ratio(tn, tn + fn),
        f1=f1,
        tn=tn,
        fp=fp,
        fn=fn,
        tp=tp,
    )


def has_both_classes(y_true: Sequence[int]) -> bool:
    y = np.asarray(y_true).ravel()
    return bool((y == 0).any() and (y == 1).any())


def roc_curve(y_true: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing, starting at +inf (nothing positive).

    Point k is the rule ``score >= thresholds[k]``; tied scores make one point.
    Raises ValueError when one class is missing (the curve is undefined).
    """
    y, s = _arrays(y_true, scores)
    if not has_both_classes(y):
        raise ValueError("ROC curve needs both classes")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s_sorted))[0], y.size - 1]
    tps = np.cumsum(y_sorted)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    thresholds = np.r_[np.inf, s_sorted[last_of_tie]]
    return fpr, tpr, thresholds


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (trapezoids; ties count one half), None if undefined."""
    if not has_both_classes(y_true):
        return None
    fpr, tpr, _ = roc_curve(y_true, scores)
    return float(np.trapezoid(tpr, fpr))


def pr_curve(y_true: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) with recall increasing, starting at recall 0 / precision 1."""
    y, s = _arrays(y_true, scores)
    if not (y == 1).any():
        raise ValueError("precision-recall curve needs at least one positive")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s_sorted))[0], y.size - 1]
    tps = np.cumsum(y_sorted)[last_of_tie]
    predicted = last_of_tie + 1
    precision = np.r_[1.0, tps / predicted]
    recall = np.r_[0.0, tps / tps[-1]]
    thresholds = np.r_[np.inf, s_sorted[last_of_tie]]
    return precision, recall, thresholds


def average_precision(y_true: Sequence[int], scores: Sequence[float]) -> float | None:
    """Step-wise area under the PR curve (sum of precision x recall increments)."""
    y = np.asarray(y_true).ravel()
    if not (y == 1).any():
        return None
    precision, recall, _ = pr_curve(y_true, scores)
    return float(np.sum(np.diff(recall) * precision[1:]))


THRESHOLD_RULES = ("sensitivity", "youden", "cost", "fixed")


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    target_sensitivity: float | None  # None: the rule had none to reach
    sensitivity: float | None
    specificity: float | None
    fallback: str | None = None  # why the default was used instead, if it was
    rule: str = "sensitivity"  # one of THRESHOLD_RULES
    cost_fn: float | None = None  # the costs the "cost" rule weighed
    cost_fp: float | None = None

    def describe(self) -> str:
        """One line for humans: how the threshold was chosen."""
        if self.rule == "cost":
            how = f"minimising {self.cost_fn:g}*FN + {self.cost_fp:g}*FP on validation"
        else:
            how = {
                "sensitivity": f"for sensitivity >= {self.target_sensitivity} on validation",
                "youden": "maximising sensitivity + specificity - 1 (Youden's J) on validation",
                "fixed": "fixed in the configuration",
            }[self.rule]
        return how + (f" [fallback: {self.fallback}]" if self.fallback else "")

    def to_dict(self) -> dict:
        return asdict(self)


def threshold_for_sensitivity(
    y_true: Sequence[int],
    scores: Sequence[float],
    target: float,
    default: float = DEFAULT_THRESHOLD,
) -> ThresholdChoice:
    """The highest threshold whose sensitivity on (y_true, scores) is >= ``target`` (``training.target_sensitivity``).

    The highest such threshold keeps specificity as high as possible. It lies
    halfway between the lowest included score (a positive's) and the next lower
    score, so the validation confusion matrix is the same as with the positive's
    own score, but an image scored again with float noise (alone instead of in a
    batch, in Keras instead of Spark) does not flip class. With no
    positive or no negative example the choice is meaningless: ``default`` is
    returned with a warning and ``fallback`` says why.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, s = _arrays(y_true, scores)
    if not has_both_classes(y):
        reason = "validation set has a single class" if y.size else "validation set is empty"
        warnings.warn(f"{reason}: using threshold {default}", ThresholdWarning, stacklevel=2)
        report = binary_report(y, s, default) if y.size else None
        return ThresholdChoice(
            threshold=float(default),
            target_sensitivity=float(target),
            sensitivity=report.sensitivity if report else None,
            specificity=report.specificity if report else None,
            fallback=reason,
        )
    positives = np.sort(s[y == 1])[::-1]
    # k positives at or above the threshold give sensitivity k / P.
    k = int(math.ceil(target * positives.size - 1e-9))
    k = min(max(k, 1), positives.size)
    threshold = _midpoint_below(float(positives[k - 1]), s)
    report = binary_report(y, s, threshold)
    return ThresholdChoice(
        threshold=threshold,
        target_sensitivity=float(target),
        sensitivity=report.sensitivity,
        specificity=report.specificity,
    )


def _fallback(y: np.ndarray, s: np.ndarray, default: float, **fields) -> ThresholdChoice | None:
    """The ``default`` threshold (with a warning) when validation cannot choose one, else None."""
    if has_both_classes(y):
        return None
    reason = "validation set has a single class" if y.size else "validation set is empty"
    warnings.warn(f"{reason}: using threshold {default}", ThresholdWarning, stacklevel=3)
    report = binary_report(y, s, default) if y.size else None
    return ThresholdChoice(
        threshold=float(default),
        sensitivity=report.sensitivity if report else None,
        specificity=report.specificity if report else None,
        fallback=reason,
        **fields,
    )


def threshold_minimising(
    y_true: Sequence[int], scores: Sequence[float], cost_fn: float, cost_fp: float, per_class: bool = False
) -> float:
    """The threshold minimising ``cost_fn * FN + cost_fp * FP`` over the ROC points (both classes needed).

    ``per_class``: costs apply to the miss *rates* (1 - sensitivity, 1 - specificity) instead of
    counts, so the validation prevalence does not matter; equal costs are then Youden's J.
    Ties go to the highest threshold (fewer false alarms). Like ``threshold_for_sensitivity``,
    the threshold sits halfway below the lowest score called positive.
    """
    y, s = _arrays(y_true, scores)
    fpr, tpr, thresholds = roc_curve(y, s)
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    if per_class:
        cost = cost_fn * (1.0 - tpr) + cost_fp * fpr
    else:
        cost = cost_fn * (1.0 - tpr) * positives + cost_fp * fpr * negatives
    cost[0] = np.inf  # "nothing is positive" is never a useful operating point
    best = int(np.flatnonzero(cost <= cost.min() + 1e-12)[0])  # thresholds decrease: first = highest
    return _midpoint_below(float(thresholds[best]), s)


def rule_args_from_config(training: Mapping[str, Any]) -> dict[str, Any]:
    """``choose_threshold_by_rule`` keyword arguments from the ``training`` config section (CNN job)."""
    names = {
        "threshold_rule": "rule",
        "target_sensitivity": "target_sensitivity",
        "cost_fn": "cost_fn",
        "cost_fp": "cost_fp",
        "fixed_threshold": "fixed",
    }
    return {
        arg: training[key] if key == "threshold_rule" else float(training[key])
        for key, arg in names.items()
        if key in training
    }


def choose_threshold_by_rule(
    y_true: Sequence[int],
    scores: Sequence[float],
    rule: str,
    target_sensitivity: float | None = None,
    cost_fn: float | None = None,
    cost_fp: float | None = None,
    fixed: float | None = None,
    default: float = DEFAULT_THRESHOLD,
) -> ThresholdChoice:
    """The decision threshold on validation by one of ``THRESHOLD_RULES`` (``training.threshold_rule``); a rule's
    own values (``training.target_sensitivity``, ``.cost_fn``/``.cost_fp``, ``.fixed_threshold``) are required
    by that rule, and the jobs pass them all (``TrainingSettings.threshold_rule_args``):

    - ``sensitivity``: the highest threshold reaching ``target_sensitivity``;
    - ``youden``: maximises sensitivity + specificity - 1 (independent of the validation prevalence);
    - ``cost``: minimises ``cost_fn * FN + cost_fp * FP`` counted on validation (a clinician's
      price of a missed pneumonia against a false alarm, at the validation prevalence);
    - ``fixed``: ``fixed`` as is (the weighted model's probabilities are balanced, so 0.5 is a prior-free cut).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    needed = {"sensitivity": ("target_sensitivity",), "cost": ("cost_fn", "cost_fp"), "fixed": ("fixed",)}
    given = {"target_sensitivity": target_sensitivity, "cost_fn": cost_fn, "cost_fp": cost_fp, "fixed": fixed}
    missing = [name for name in needed.get(rule, ()) if given[name] is None]
    if missing:
        raise ValueError(f"threshold rule {rule} needs {', '.join(missing)}")
    if rule == "sensitivity":
        return threshold_for_sensitivity(y_true, scores, target_sensitivity, default)
    if rule == "cost" and (min(cost_fn, cost_fp) < 0 or cost_fn + cost_fp <= 0):
        raise ValueError(f"costs must be >= 0 and not both 0, got cost_fn={cost_fn}, cost_fp={cost_fp}")
    y, s = _arrays(y_true, scores)
    target = None if target_sensitivity is None else float(target_sensitivity)
    fields = {"target_sensitivity": target, "rule": rule}
    if rule == "cost":
        fields.update(cost_fn=float(cost_fn), cost_fp=float(cost_fp))
    if rule == "fixed":
        threshold = float(fixed)
    else:
        fallback = _fallback(y, s, default, **fields)
        if fallback is not None:
            return fallback
        threshold = (
            threshold_minimising(y, s, 1.0, 1.0, per_class=True)
            if rule == "youden"
            else threshold_minimising(y, s, cost_fn, cost_fp)
        )
    report = binary_report(y, s, threshold) if y.size else None
    return ThresholdChoice(
        threshold=threshold,
        sensitivity=report.sensitivity if report else None,
        specificity=report.specificity if report else None,
        **fields,
    )


# ---------------------------------------------------------------- intervals and calibration

INTERVAL_METRICS = ("accuracy", "auc", "sensitivity", "specificity")


def _resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]``: how often each item is drawn in each bootstrap resample (with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(draws.ravel(), minlength=n * n_boot).reshape(n_boot, n).astype(np.float64)


def _weighted_auc(counts: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUC (ties count one half) of each row of item multiplicities ``counts``; NaN where a class is absent."""
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted, c = s[order], y[order], counts[:, order]
    ends = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]  # last index of each tie group
    neg_cum = np.cumsum(c * (y_sorted == 0), axis=1)[:, ends]
    pos_cum = np.cumsum(c * (y_sorted == 1), axis=1)[:, ends]
    neg_group = np.diff(neg_cum, axis=1, prepend=0.0)
    pos_group = np.diff(pos_cum, axis=1, prepend=0.0)
    wins = np.sum(pos_group * (neg_cum - neg_group + 0.5 * neg_group), axis=1)
    pairs = pos_cum[:, -1] * neg_cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def bootstrap_intervals(
    y_true: Sequence[int],
    scores: Sequence[float],
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals ``[low, high]`` of accuracy, AUC, sensitivity, specificity.

    Images are resampled with replacement (``n_boot`` resamples, seeded: the same
    data give the same interval). Resamples where a metric is undefined (one class)
    are left out of that metric; a metric never defined is ``None``. Vectorised:
    1,000 resamples of 600 images take about 0.1 s, of 5,000 images 1-2 s.
    """
    y, s = _arrays(y_true, scores)
    if y.size == 0 or n_boot < 1:
        return {name: None for name in INTERVAL_METRICS}
    counts = _resample_counts(y.size, int(n_boot), int(seed))
    pred = predict_at(s, threshold)
    tp = counts @ ((y == 1) & (pred == 1)).astype(np.float64)
    tn = counts @ ((y == 0) & (pred == 0)).astype(np.float64)
    pos = counts @ (y == 1).astype(np.float64)
    neg = counts @ (y == 0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = {
            "accuracy": (tp + tn) / y.size,
            "auc": _weighted_auc(counts, y, s),
            "sensitivity": np.where(pos > 0, tp / np.where(pos > 0, pos, 1), np.nan),
            "specificity": np.where(neg > 0, tn / np.where(neg > 0, neg, 1), np.nan),
        }
    tail = 100.0 * (1.0 - level) / 2.0
    out: dict[str, list[float] | None] = {}
    for name, v in values.items():
        v = v[~np.isnan(v)]
        out[name] = [float(np.percentile(v, tail)), float(np.percentile(v, 100.0 - tail))] if v.size else None
    return out


def brier_score(y_true: Sequence[int], scores: Sequence[float]) -> float | None:
    """Mean squared difference between P(PNEUMONIA) and the label (0 = perfect, 0.25 = always 0.5)."""
    y, s = _arrays(y_true, scores)
    return float(np.mean((s - y) ** 2)) if y.size else None


@dataclass(frozen=True)
class Calibration:
    """Reliability diagram data: per probability bin, the mean prediction and the observed positive rate."""

    bin_edges: list[float]
    mean_predicted: list[float | None]
    observed_rate: list[float | None]
    count: list[int]
    expected_calibration_error: float | None  # sum over bins of |observed - predicted| weighted by bin size

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_curve(y_true: Sequence[int], scores: Sequence[float], n_bins: int = 10) -> Calibration:
    y, s = _arrays(y_true, scores)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    sum_s = np.bincount(which, weights=s, minlength=n_bins)
    sum_y = np.bincount(which, weights=y.astype(np.float64), minlength=n_bins)
    mean_p = [float(a / c) if c else None for a, c in zip(sum_s, count)]
    observed = [float(a / c) if c else None for a, c in zip(sum_y, count)]
    ece = float(np.sum(np.abs(sum_y - sum_s)) / y.size) if y.size else None
    return Calibration([float(e) for e in edges], mean_p, observed, [int(c) for c in count], ece)


def metrics_with_intervals(
    y_true: Sequence[int],
    scores: Sequence[float],
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Point values and 95 % bootstrap intervals at ``threshold``, plus the Brier score:
    ``{"accuracy": {"value": v, "ci95": [lo, hi]}, ..., "brier": b, "n_bootstrap": n_boot}``."""
    y, s = _arrays(y_true, scores)
    report = binary_report(y, s, threshold)
    values = {
        "accuracy": report.accuracy,
        "auc": roc_auc(y, s) if y.size else None,
        "sensitivity": report.sensitivity,
        "specificity": report.specificity,
    }
    intervals = bootstrap_intervals(y, s, threshold, n_boot, seed)
    out: dict = {name: {"value": values[name], "ci95": intervals[name]} for name in INTERVAL_METRICS}
    out.update(
        threshold=float(threshold),
        n=int(y.size),
        brier=brier_score(y, s) if y.size else None,
        n_bootstrap=int(n_boot),
        bootstrap_seed=int(seed),
    )
    return out


def fmt_interval(block: dict | None, digits: int = 3) -> str:
    """``0.912 [0.889, 0.934]`` from a ``{"value", "ci95"}`` block; "undefined" when missing."""
    if not block or block.get("value") is None:
        return "undefined"
    ci = block.get("ci95")
    text = f"{block['value']:.{digits}f}"
    return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _midpoint_below(lowest_included: float, scores: np.ndarray) -> float:
    below = scores[scores < lowest_included]
    if below.size == 0:
        return lowest_included
    return float((lowest_included + below.max()) / 2.0)


def class_counts(labels: Sequence[int], n_classes: int = 2) -> list[int]:
    y = np.asarray(labels, dtype=np.int64).ravel()
    return [int(v) for v in np.bincount(y, minlength=n_classes)[:n_classes]]


def inverse_frequency_weights(counts: Sequence[int]) -> list[float]:
    """Weight per class = n / (k * n_class), so a balanced set gets 1.0 everywhere.

    A class with no examples gets weight 0 (it never occurs, so the value is unused).
    """
    total = float(sum(counts))
    present = sum(1 for c in counts if c > 0)
    return [total / (present * c) if c > 0 else 0.0 for c in counts]


def fmt(value: float | None, digits: int = 3) -> str:
    """A metric for humans: ``undefined`` for None."""
    return "undefined" if value is None else f"{value:.{digits}f}"
