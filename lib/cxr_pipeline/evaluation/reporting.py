"""Honest reporting shared by the Spark job and the CNN job (pure: no Spark, no TensorFlow).

For the test scores of a run: 95 % bootstrap intervals of accuracy, AUC,
sensitivity and specificity at each reported threshold, the Brier score, a
calibration curve (``calibration.png``) and a ``model_card.md`` that says what
the model was trained on, what it is for, how well it did on which split (with
intervals) and where it is known to fail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import metrics as M
from . import plots

CALIBRATION_PNG = "calibration.png"
MODEL_CARD = "model_card.md"

INTENDED_USE = (
    "Research and teaching: a worked example of a distributed chest X-ray pipeline. It flags frontal "
    "paediatric chest X-rays as PNEUMONIA or NORMAL, to be read together with a radiologist, never alone. "
    "Not a medical device; not validated for adults, lateral views, other diseases or other hospitals."
)

KNOWN_FAILURE_MODES = (
    "False alarms on normal X-rays from other sites: trained on one hospital's images (Guangzhou, "
    "Kermany et al. 2018, or PneumoniaMNIST derived from them), the model calls NORMAL images from a "
    "differently collected test set PNEUMONIA far more often than on its own validation data "
    "(specificity at 0.5 fell to 0.60-0.68 on PneumoniaMNIST's official test split with earlier defaults, "
    "while validation specificity was above 0.9). Expect specificity to drop first on new data; re-check "
    "the threshold on local images before any use.",
    "The threshold was chosen on validation images from the training distribution; its sensitivity/"
    "specificity trade-off moves when prevalence or acquisition differ.",
    "Bacterial and viral pneumonia are one class; other findings (effusion, masses, devices) were never seen.",
    "Low-resolution inputs (PneumoniaMNIST is 28 px upscaled) carry little detail: figures on it do not "
    "transfer to full-resolution X-rays, and the reverse.",
)


def honest_metrics(labels: Sequence[int], scores: Sequence[float], thresholds: Mapping[str, float]) -> dict[str, Any]:
    """``{"intervals": {name: metrics_with_intervals}, "brier": b, "calibration": {...}}`` for the test scores."""
    if not len(labels):
        return {"intervals": {}, "brier": None, "calibration": None}
    intervals = {
        name: M.metrics_with_intervals(labels, scores, t, M.BOOTSTRAP_RESAMPLES, M.BOOTSTRAP_SEED)
        for name, t in thresholds.items()
    }
    return {
        "intervals": intervals,
        "brier": M.brier_score(labels, scores),
        "calibration": M.calibration_curve(labels, scores).to_dict(),
    }


def write_calibration_plot(honest: Mapping[str, Any], out: str) -> str | None:
    cal = honest.get("calibration")
    if not cal:
        return None
    plots.plot_calibration(cal["mean_predicted"], cal["observed_rate"], cal["count"], honest.get("brier"), out=out)
    return out


# metrics.json's threshold blocks, as the summary's other lines name them
_THRESHOLD_LABELS = {"at_chosen": "@chosen", "at_threshold": "@chosen", "at_default_0.5": "@0.5", "at_0.5": "@0.5"}


def interval_lines(honest: Mapping[str, Any]) -> list[str]:
    """Summary lines: each threshold's metrics with their 95 % intervals, then the Brier score."""
    lines = []
    for name, block in honest.get("intervals", {}).items():
        label = _THRESHOLD_LABELS.get(name, name)
        lines.append(
            f"  95% CI {label + ' (' + format(block['threshold'], '.3f') + '):':<17}"
            + "  ".join(f"{k} {M.fmt_interval(block[k])}" for k in M.INTERVAL_METRICS)
        )
    cal = honest.get("calibration") or {}
    lines.append(
        f"  Brier {M.fmt(honest.get('brier'))}  ECE {M.fmt(cal.get('expected_calibration_error'))}"
        f"  ({M.BOOTSTRAP_RESAMPLES} bootstrap resamples, seed {M.BOOTSTRAP_SEED})"
    )
    return lines


def _counts_table(counts: Mapping[str, Any], label_names: Sequence[str]) -> list[str]:
    rows = ["| subset | " + " | ".join(label_names) + " | total |", "|---|" + "---|" * (len(label_names) + 1)]
    for subset in ("train", "val", "test"):
        c = counts.get(subset)
        if c is None:
            continue
        values = list(c.values()) if isinstance(c, Mapping) else list(c)
        rows.append(f"| {subset} | " + " | ".join(str(v) for v in values) + f" | {sum(values)} |")
    return rows


def _metrics_table(honest: Mapping[str, Any]) -> list[str]:
    rows = ["| threshold | n | accuracy | AUC | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for name, b in honest.get("intervals", {}).items():
        rows.append(
            f"| {name} ({b['threshold']:.3f}) | {b['n']} | "
            + " | ".join(M.fmt_interval(b[k]) for k in M.INTERVAL_METRICS)
            + " |"
        )
    return rows


def model_card(
    *,
    title: str,
    model_description: str,
    data: str,
    counts: Mapping[str, Any],
    label_names: Sequence[str],
    split_description: str,
    threshold: M.ThresholdChoice,
    honest: Mapping[str, Any],
    test_description: str,
    validation: Mapping[str, Any] | None = None,
    extra: Sequence[str] = (),
) -> str:
    """``model_card.md`` text. ``honest`` is :func:`honest_metrics` of the test scores."""
    cal = honest.get("calibration") or {}
    lines = [
        f"# Model card: {title}",
        "",
        "## Model",
        model_description,
        "",
        "## Intended use",
        INTENDED_USE,
        "",
        "## Data",
        f"Source: `{data}`. Positive class: {label_names[1]} (label 1); score = P({label_names[1]}).",
        "",
        *_counts_table(counts, label_names),
        "",
        split_description,
        "",
        "## Decision threshold",
        f"{threshold.threshold:.4f}, chosen {threshold.describe()}.",
        "",
        "## Metrics",
        f"Measured on: {test_description}. 95 % percentile bootstrap intervals "
        f"({M.BOOTSTRAP_RESAMPLES} resamples of the images, seed {M.BOOTSTRAP_SEED}).",
        "",
        *_metrics_table(honest),
        "",
        f"Brier score {M.fmt(honest.get('brier'))} (0 = perfect, 0.25 = always 0.5); expected calibration error "
        f"{M.fmt(cal.get('expected_calibration_error'))}; see `{CALIBRATION_PNG}`.",
    ]
    if validation:
        at = validation.get("at_chosen") or {}
        lines += [
            "",
            f"Validation (threshold chosen here, n={validation.get('n')}): AUC {M.fmt(validation.get('roc_auc'))}, "
            f"sensitivity {M.fmt(at.get('sensitivity'))}, specificity {M.fmt(at.get('specificity'))}. "
            "Validation comes from the training distribution: expect the test figures, not these, on new data.",
        ]
    lines += ["", "## Known failure modes", *[f"- {m}" for m in KNOWN_FAILURE_MODES]]
    if extra:
        lines += ["", "## Notes", *[f"- {e}" for e in extra]]
    return "\n".join(lines) + "\n"
