"""Evaluation figures as PNG (matplotlib, Agg backend: no display needed).

Every ``plot_*`` function returns the PNG bytes and, when ``out`` is given,
also writes them there: a local path or any URI ``cxr_pipeline.infra.storage`` knows
(hdfs://...). Shared by the Spark job, the CNN job and the notebooks.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _finish(fig, out: str | Path | None) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = buf.getvalue()
    if out is not None:
        write_png(data, out)
    return data


def write_png(data: bytes, out: str | Path) -> None:
    out = str(out)
    if "://" in out:
        from ..infra import storage

        storage.write_bytes(out, data)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(data)


def _auc_text(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def plot_roc(
    fpr: Sequence[float],
    tpr: Sequence[float],
    auc: float | None = None,
    out: str | Path | None = None,
    title: str = "ROC curve (test)",
    operating_points: dict[str, tuple[float, float]] | None = None,
) -> bytes:
    """``operating_points``: name -> (fpr, tpr), e.g. the two thresholds."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {_auc_text(auc)}")
    for name, (x, y) in (operating_points or {}).items():
        ax.scatter([x], [y], zorder=3, label=name)
    _finish_roc_axes(ax, title)
    return _finish(fig, out)


def plot_roc_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float], float | None]],
    out: str | Path | None = None,
    title: str = "ROC on the same test images",
) -> bytes:
    """Several models' ROC curves on one figure: ``name -> (fpr, tpr, auc)`` (the notebooks' model comparison)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC {_auc_text(auc)})")
    _finish_roc_axes(ax, title)
    return _finish(fig, out)


def _finish_roc_axes(ax, title: str) -> None:
    """The chance diagonal, the axes' names and limits, the legend: every ROC figure's frame."""
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)


def plot_pr(
    precision: Sequence[float],
    recall: Sequence[float],
    average_precision: float | None = None,
    out: str | Path | None = None,
    title: str = "Precision-recall (test)",
    prevalence: float | None = None,
) -> bytes:
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.step(recall, precision, where="post", lw=2, label=f"AP = {_auc_text(average_precision)}")
    if prevalence is not None:
        ax.axhline(prevalence, ls="--", c="grey", lw=1, label=f"prevalence {prevalence:.2f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _finish(fig, out)


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]],
    label_names: Sequence[str],
    out: str | Path | None = None,
    title: str = "Confusion matrix (test)",
) -> bytes:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    ax.imshow(cm, cmap="Blues")
    ticks = np.arange(len(label_names))
    ax.set_xticks(ticks, label_names)
    ax.set_yticks(ticks, label_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    high = cm.max() / 2 if cm.size and cm.max() else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(int(cm[i, j])),
                ha="center",
                va="center",
                color="white" if cm[i, j] > high else "black",
                fontsize=12,
            )
    return _finish(fig, out)


def plot_threshold_tradeoff(
    thresholds: Sequence[float],
    sensitivity: Sequence[float],
    specificity: Sequence[float],
    chosen: float | None = None,
    out: str | Path | None = None,
    title: str = "Sensitivity / specificity vs threshold",
) -> bytes:
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    ax.plot(thresholds, sensitivity, label="sensitivity")
    ax.plot(thresholds, specificity, label="specificity")
    if chosen is not None:
        ax.axvline(chosen, ls="--", c="k", lw=1, label=f"chosen {chosen:.3f}")
    ax.axvline(0.5, ls=":", c="grey", lw=1, label="0.5")
    ax.set(xlabel="threshold on P(PNEUMONIA)", ylabel="rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return _finish(fig, out)


def plot_training_curves(
    history: dict[str, Sequence[float]], out: str | Path | None = None, title: str = "Training curves"
) -> bytes:
    """Keras-style history: one line per key (loss, val_loss, accuracy, ...)."""
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for key, values in history.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=key)
    ax.set(xlabel="epoch", title=title)
    ax.legend(fontsize=8)
    return _finish(fig, out)


def plot_calibration(
    mean_predicted: Sequence[float | None],
    observed_rate: Sequence[float | None],
    count: Sequence[int],
    brier: float | None = None,
    out: str | Path | None = None,
    title: str = "Calibration (test)",
) -> bytes:
    """Reliability diagram: observed PNEUMONIA rate against mean P(PNEUMONIA) per bin (empty bins skipped),
    with the bin sizes below."""
    keep = [i for i, c in enumerate(count) if c]
    x = [mean_predicted[i] for i in keep]
    y = [observed_rate[i] for i in keep]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.8, 5.4), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    ax.plot(x, y, marker="o", lw=2, label=f"model (Brier {_auc_text(brier)})")
    ax.set(ylabel="observed fraction PNEUMONIA", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(x, [count[i] for i in keep], width=0.05, color="tab:blue")
    hist.set(xlabel="mean predicted P(PNEUMONIA)", ylabel="images")
    return _finish(fig, out)
