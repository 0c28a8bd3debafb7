"""Binary classification metrics in pure numpy (no Spark, no sklearn).

Convention everywhere: label 1 = PNEUMONIA = positive, score = P(PNEUMONIA).
Sensitivity = TPR on PNEUMONIA, specificity = TNR on NORMAL. A quantity that
cannot be computed (one class only) is ``None``, written "undefined" in reports.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.5


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
        tn=tn, fp=fp, fn=fn, tp=tp,
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


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    target_sensitivity: float
    sensitivity: float | None
    specificity: float | None
    fallback: str | None = None  # why the default was used instead, if it was

    def to_dict(self) -> dict:
        return asdict(self)


def threshold_for_sensitivity(
    y_true: Sequence[int],
    scores: Sequence[float],
    target: float = 0.95,
    default: float = DEFAULT_THRESHOLD,
) -> ThresholdChoice:
    """The highest threshold whose sensitivity on (y_true, scores) is >= ``target``.

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
