"""Comparing models on the same test images: joined score tables, metrics side by side (``metrics``),
agreement, a threshold table, ROC curves (``plots``) and thumbnails of predictions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .runs import _REPORT_COLUMNS

if TYPE_CHECKING:
    import pandas as pd


def join_scores(scores: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-model score tables joined on the image (only images every model scored): ``[key, label, <model>...]``."""
    joined = None
    for name, table in scores.items():
        part = table[["key", "label", "score"]].rename(columns={"score": name})
        if joined is None:
            joined = part
        else:
            joined = joined.merge(part, on="key", suffixes=("", "_other"))
            if (joined["label"] != joined["label_other"]).any():
                raise ValueError(f"{name}: labels disagree with the other models' for the same images")
            joined = joined.drop(columns="label_other")
    if joined is None:
        raise ValueError("no models to compare")
    return joined.reset_index(drop=True)


def compare_models(joined: pd.DataFrame, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """Metrics of each model on the same images, at its own chosen threshold and at 0.5."""
    import pandas as pd

    from ..evaluation import metrics as M

    labels = joined["label"].to_numpy()
    rows = []
    for name, threshold in thresholds.items():
        scores = joined[name].to_numpy()
        for rule, t in (("chosen on validation", threshold), ("0.5", M.DEFAULT_THRESHOLD)):
            report = M.binary_report(labels, scores, t).to_dict()
            rows.append(
                {
                    "model": name,
                    "threshold_rule": rule,
                    "auc": M.roc_auc(labels, scores),
                    **{k: report[k] for k in _REPORT_COLUMNS},
                }
            )
    return pd.DataFrame(rows)


def agreement_table(joined: pd.DataFrame, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """How often the models' decisions (each at its own threshold) are right: both, only one, neither."""
    import pandas as pd

    from ..evaluation import metrics as M

    names = list(thresholds)
    correct = {n: M.predict_at(joined[n], thresholds[n]) == joined["label"].to_numpy() for n in names}
    rows = []
    if len(names) == 2:
        a, b = names
        for label, mask in (
            ("both right", correct[a] & correct[b]),
            (f"only {a} right", correct[a] & ~correct[b]),
            (f"only {b} right", ~correct[a] & correct[b]),
            ("both wrong", ~correct[a] & ~correct[b]),
        ):
            rows.append({"outcome": label, "images": int(mask.sum())})
    else:
        rows = [{"outcome": f"{n} right", "images": int(c.sum())} for n, c in correct.items()]
    return pd.DataFrame(rows)


def threshold_table(labels, scores, thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> pd.DataFrame:
    """Sensitivity / specificity trade-off at a few thresholds (the curve is in the run's threshold.png)."""
    import pandas as pd

    from ..evaluation import metrics as M

    rows = []
    for t in thresholds:
        r = M.binary_report(labels, scores, float(t))
        rows.append(
            {
                "threshold": float(t),
                "sensitivity": r.sensitivity,
                "specificity": r.specificity,
                "accuracy": r.accuracy,
                "fp": r.fp,
                "fn": r.fn,
            }
        )
    return pd.DataFrame(rows)


def plot_roc_comparison(joined: pd.DataFrame, names, title: str = "ROC on the same test images") -> bytes:
    """ROC curves of several models over the same images (PNG bytes)."""
    from ..evaluation import metrics as M
    from ..evaluation.plots import plot_roc_curves

    labels = joined["label"].to_numpy()
    curves = {}
    if M.has_both_classes(labels):
        for name in names:
            scores = joined[name].to_numpy()
            fpr, tpr, _ = M.roc_curve(labels, scores)
            curves[name] = (fpr, tpr, M.roc_auc(labels, scores))
    return plot_roc_curves(curves, title=title)


def plot_predictions(scored: pd.DataFrame, columns: int = 4, title: str = "Predictions") -> bytes:
    """Thumbnails of scored images titled with the predicted class and P(PNEUMONIA) (PNG bytes)."""
    import matplotlib.pyplot as plt

    from ..evaluation.plots import _finish
    from .exploration import thumbnail

    n = max(1, len(scored))
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item in zip(axes.ravel(), scored.itertuples()):
        image = thumbnail(item.content, 192) if item.content is not None else None
        if image is not None:
            ax.imshow(image)
        name = str(item.path).rsplit("/", 1)[-1][:34]
        verdict = f"error: {item.error}" if item.error else f"{item.label_name} p={item.probability:.2f}"
        ax.set_title(f"{name}\n{verdict}", fontsize=7, color="red" if item.error else "black")
    fig.suptitle(title)
    return _finish(fig, None)
