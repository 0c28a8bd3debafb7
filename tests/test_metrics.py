"""Pure numpy metrics: confusion matrix, ROC/PR, threshold for a target sensitivity."""
import warnings

import numpy as np
import pytest

from cxr_pipeline import metrics as m


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
    from cxr_pipeline import plots

    y, s = [0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.8, 0.9]
    fpr, tpr, _ = m.roc_curve(y, s)
    data = plots.plot_roc(fpr, tpr, m.roc_auc(y, s), out=tmp_path / "roc.png", operating_points={"0.5": (0.5, 0.67)})
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "roc.png").read_bytes() == data
    p, r, _ = m.pr_curve(y, s)
    assert plots.plot_pr(p, r, m.average_precision(y, s), prevalence=0.6)[:4] == b"\x89PNG"
    assert plots.plot_confusion_matrix(m.confusion_matrix(y, m.predict_at(s, 0.5)), ["NORMAL", "PNEUMONIA"])[:4] == b"\x89PNG"
