"""Pure numpy metrics: confusion matrix, ROC/PR, threshold for a target sensitivity."""

import warnings

import numpy as np
import pytest

from cxr_pipeline.evaluation import metrics as m


def brute_auc(y, s):
    pos = [si for yi, si in zip(y, s) if yi == 1]
    neg = [si for yi, si in zip(y, s) if yi == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_confusion_matrix_orientation():
    cm = m.confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, 1, 0])
    assert cm.tolist() == [[1, 1], [1, 2]]  # rows = truth: [[TN, FP], [FN, TP]]


def test_binary_report_counts_and_rates():
    r = m.binary_report([0, 0, 0, 1, 1, 1, 1], [0.1, 0.6, 0.4, 0.9, 0.5, 0.2, 0.7], threshold=0.5)
    assert (r.tn, r.fp, r.fn, r.tp) == (2, 1, 1, 3)
    assert r.sensitivity == pytest.approx(3 / 4)
    assert r.specificity == pytest.approx(2 / 3)
    assert r.accuracy == pytest.approx(5 / 7)
    assert r.f1 == pytest.approx(2 * 0.75 * 0.75 / 1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) * 0.5 + y * 0.3, 1)  # coarse scores => many ties
    assert m.roc_auc(y, s) == pytest.approx(brute_auc(y, s))
    fpr, tpr, thr = m.roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(thr) < 0)


def test_average_precision_perfect_and_pr_curve_shape():
    y, s = [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]
    assert m.average_precision(y, s) == pytest.approx(1.0)
    p, r, _ = m.pr_curve([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert r.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert p[1:].tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.5])


def test_threshold_reaches_target_sensitivity_and_is_highest():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = rng.random(500) * 0.6 + y * 0.4
    choice = m.threshold_for_sensitivity(y, s, target=0.95)
    assert choice.fallback is None
    assert m.binary_report(y, s, choice.threshold).sensitivity >= 0.95
    # the threshold sits strictly between the lowest included and the highest excluded score
    lowest_included, highest_excluded = s[s >= choice.threshold].min(), s[s < choice.threshold].max()
    assert choice.threshold == pytest.approx((lowest_included + highest_excluded) / 2)
    # the same confusion matrix as the lowest included score itself, and any higher score drops below the target
    assert m.binary_report(y, s, lowest_included).tp == m.binary_report(y, s, choice.threshold).tp
    higher = np.unique(s[s > lowest_included])
    assert m.binary_report(y, s, higher.min()).sensitivity < 0.95
    assert choice.sensitivity >= 0.95 and 0 <= choice.specificity <= 1


def test_threshold_exact_small_case():
    # positives sorted: 0.9, 0.8, 0.3, 0.2 ; target 0.75 -> 3 of 4 -> 0.3 included, 0.2 next below -> 0.25
    choice = m.threshold_for_sensitivity([1, 1, 1, 1, 0, 0], [0.9, 0.2, 0.8, 0.3, 0.5, 0.1], target=0.75)
    assert choice.threshold == pytest.approx(0.25)
    assert choice.sensitivity == pytest.approx(0.75)
    assert choice.specificity == pytest.approx(0.5)


def test_threshold_is_the_lowest_positive_when_nothing_scores_below_it():
    choice = m.threshold_for_sensitivity([1, 0, 1], [0.2, 0.6, 0.9], target=1.0)
    assert choice.threshold == pytest.approx(0.2)
    assert choice.sensitivity == 1.0 and choice.specificity == 0.0


def test_single_class_falls_back_to_default_with_warning():
    with pytest.warns(m.ThresholdWarning):
        choice = m.threshold_for_sensitivity([1, 1, 1], [0.2, 0.7, 0.9], target=0.95)
    assert choice.threshold == 0.5 and choice.fallback
    assert choice.specificity is None
    assert m.roc_auc([1, 1], [0.1, 0.2]) is None
    assert m.average_precision([0, 0], [0.1, 0.2]) is None
    assert m.fmt(None) == "undefined"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m.threshold_for_sensitivity([], [], 0.9).fallback == "validation set is empty"


def test_inverse_frequency_weights():
    w = m.inverse_frequency_weights([100, 300])
    assert w == pytest.approx([2.0, 2 / 3])
    assert 100 * w[0] == pytest.approx(300 * w[1])
    assert m.inverse_frequency_weights([0, 5]) == [0.0, 1.0]


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        m.binary_report([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        m.roc_curve([0, 1], [0.1])


def test_plots_render_png(tmp_path):
    from cxr_pipeline.evaluation import plots

    y, s = [0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.8, 0.9]
    fpr, tpr, _ = m.roc_curve(y, s)
    data = plots.plot_roc(fpr, tpr, m.roc_auc(y, s), out=tmp_path / "roc.png", operating_points={"0.5": (0.5, 0.67)})
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "roc.png").read_bytes() == data
    p, r, _ = m.pr_curve(y, s)
    assert plots.plot_pr(p, r, m.average_precision(y, s), prevalence=0.6)[:4] == b"\x89PNG"
    assert (
        plots.plot_confusion_matrix(m.confusion_matrix(y, m.predict_at(s, 0.5)), ["NORMAL", "PNEUMONIA"])[:4]
        == b"\x89PNG"
    )


# ---------------------------------------------------------------- threshold rules


def brute_best(y, s, cost):
    """The threshold (a score value) with the lowest cost over every distinct score; highest on ties."""
    best = None
    for t in sorted(set(s), reverse=True):
        r = m.binary_report(y, s, t)
        c = cost(r)
        if best is None or c < best[0] - 1e-12:
            best = (c, t)
    return best[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_cost_and_youden_rules_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(160) < 0.75).astype(int)  # imbalanced like the data: Youden (rates) != equal costs (counts)
    s = np.round(rng.random(160) * 0.6 + y * 0.3, 2)
    for rule, kwargs, cost in (
        ("cost", {"cost_fn": 3.0, "cost_fp": 1.0}, lambda r: 3 * r.fn + r.fp),
        ("cost", {"cost_fn": 1.0, "cost_fp": 4.0}, lambda r: r.fn + 4 * r.fp),
        ("youden", {}, lambda r: -(r.sensitivity + r.specificity)),
    ):
        choice = m.choose_threshold_by_rule(y, s, rule, **kwargs)
        lowest_included = brute_best(y, s, cost)
        below = s[s < lowest_included]
        assert below.max() < choice.threshold <= lowest_included  # halfway below, same confusion matrix
        assert m.binary_report(y, s, choice.threshold).to_dict() | {"threshold": 0} == m.binary_report(
            y, s, lowest_included
        ).to_dict() | {"threshold": 0}
        assert choice.rule == rule and ("FN" if rule == "cost" else "Youden") in choice.describe()


def test_higher_false_alarm_cost_raises_threshold_and_specificity():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    cheap, dear = (m.choose_threshold_by_rule(y, s, "cost", cost_fn=1.0, cost_fp=c) for c in (0.2, 5.0))
    assert dear.threshold > cheap.threshold and dear.specificity > cheap.specificity
    assert m.choose_threshold_by_rule(y, s, "fixed", fixed=0.42).threshold == 0.42
    assert m.choose_threshold_by_rule(y, s, "sensitivity", target_sensitivity=0.9).sensitivity >= 0.9


def test_rules_fall_back_on_one_class_and_reject_bad_input():
    with pytest.warns(m.ThresholdWarning):
        choice = m.choose_threshold_by_rule([1, 1, 1], [0.2, 0.7, 0.9], "youden")
    assert choice.threshold == 0.5 and choice.fallback and choice.rule == "youden"
    with pytest.raises(ValueError):
        m.choose_threshold_by_rule([0, 1], [0.2, 0.7], "median")
    with pytest.raises(ValueError):
        m.choose_threshold_by_rule([0, 1], [0.2, 0.7], "cost", cost_fn=-1.0)
    assert m.rule_args_from_config({"threshold_rule": "cost", "cost_fn": 2, "seed": 1}) == {
        "rule": "cost",
        "cost_fn": 2.0,
    }


# ---------------------------------------------------------------- intervals, calibration


def test_bootstrap_auc_of_each_resample_equals_auc_of_the_resampled_data():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60) * 0.5 + y * 0.3, 1)  # ties
    counts = m._resample_counts(60, 4, seed=9)
    assert counts.sum(axis=1).tolist() == [60] * 4
    aucs = m._weighted_auc(counts, y, s)
    for row, auc in zip(counts, aucs):
        idx = np.repeat(np.arange(60), row.astype(int))
        assert auc == pytest.approx(brute_auc(y[idx], s[idx]))


def test_intervals_cover_the_value_shrink_with_n_and_are_seeded():
    rng = np.random.default_rng(0)

    def sample(n):
        y = rng.integers(0, 2, n)
        return y, np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)

    y, s = sample(600)
    out = m.metrics_with_intervals(y, s, 0.5, n_boot=500, seed=1)
    for name in m.INTERVAL_METRICS:
        lo, hi = out[name]["ci95"]
        assert lo <= out[name]["value"] <= hi and 0 < hi - lo < 0.15
    assert out["brier"] == pytest.approx(np.mean((s - y) ** 2))
    assert m.metrics_with_intervals(y, s, 0.5, n_boot=500, seed=1) == out
    y_big, s_big = sample(2400)
    big = m.bootstrap_intervals(y_big, s_big, 0.5, n_boot=300)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(big["accuracy"]) < 0.7 * width(out["accuracy"]["ci95"])  # ~ 1/sqrt(4)
    one_class = m.bootstrap_intervals([1, 1, 1, 1], [0.2, 0.6, 0.7, 0.9], 0.5, n_boot=50)
    assert one_class["auc"] is None and one_class["specificity"] is None and one_class["sensitivity"] is not None
    assert m.fmt_interval(out["auc"]).count("[") == 1 and m.fmt_interval({"value": None}) == "undefined"


def test_calibration_curve_bins_and_error():
    y = [0, 0, 1, 1, 1, 0]
    s = [0.05, 0.15, 0.95, 0.85, 0.91, 0.99]
    cal = m.calibration_curve(y, s, n_bins=10)
    assert sum(cal.count) == 6 and cal.count[0] == 1 and cal.count[9] == 3
    assert cal.observed_rate[9] == pytest.approx(2 / 3) and cal.mean_predicted[9] == pytest.approx(
        (0.95 + 0.91 + 0.99) / 3
    )
    assert cal.observed_rate[5] is None
    perfect = m.calibration_curve([0, 1] * 50, [0.0, 1.0] * 50)
    assert perfect.expected_calibration_error == pytest.approx(0.0) and m.brier_score([0, 1], [0.0, 1.0]) == 0.0


def test_reporting_model_card_and_calibration_plot(tmp_path):
    from cxr_pipeline.evaluation import reporting

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    choice = m.choose_threshold_by_rule(y, s, "cost", cost_fn=2.0, cost_fp=1.0)
    honest = reporting.honest_metrics(y, s, {"at_chosen": choice.threshold, "at_default_0.5": 0.5})
    assert set(honest["intervals"]) == {"at_chosen", "at_default_0.5"} and honest["brier"] > 0
    png = reporting.write_calibration_plot(honest, str(tmp_path / reporting.CALIBRATION_PNG))
    assert (tmp_path / "calibration.png").read_bytes().startswith(b"\x89PNG") and png
    card = reporting.model_card(
        title="t",
        model_description="InceptionV3 mixed5 -> LR",
        data="hdfs://x/chest_xray",
        counts={"train": {"NORMAL": 3, "PNEUMONIA": 5}, "test": {"NORMAL": 90, "PNEUMONIA": 110}},
        label_names=["NORMAL", "PNEUMONIA"],
        split_description="carved by patient",
        threshold=choice,
        honest=honest,
        test_description="the dataset's test folder (n=200)",
    )
    acc = honest["intervals"]["at_chosen"]["accuracy"]
    assert f"{acc['value']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]" in card
    for needle in (
        "## Intended use",
        "## Known failure modes",
        "False alarms on normal X-rays from other sites",
        "Measured on: the dataset's test folder (n=200)",
        "| test | 90 | 110 | 200 |",
        "2*FN + 1*FP",
        "Brier score",
    ):
        assert needle in card
    assert any("95% CI @chosen (" in line for line in reporting.interval_lines(honest))


def test_decisions_give_one_answer_per_input_in_order():
    rows = m.decisions(
        4, [(0, 0.2), (3, 0.7)], [(1, "truncated image"), (2, "not an image")], 0.5, ["NORMAL", "PNEUMONIA"]
    )
    assert [r["label_name"] for r in rows] == ["NORMAL", None, None, "PNEUMONIA"]
    assert [r["error"] for r in rows] == [None, "truncated image", "not an image", None]
    assert rows[3] == {
        "probability": 0.7,
        "predicted_label": 1,
        "label_name": "PNEUMONIA",
        "threshold": 0.5,
        "error": None,
    }
    assert rows[1]["probability"] is None and rows[1]["threshold"] == 0.5
    assert m.decisions(1, [(0, 0.5)], [], 0.5, ["NORMAL", "PNEUMONIA"])[0]["predicted_label"] == 1  # >= threshold
