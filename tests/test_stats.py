"""cxr.stats against hand-computed values (scipy.stats.binom and t tables), not against itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from cxr.stats import holm, mcnemar, mean_std_ci, paired_bootstrap, paired_bootstrap_metrics


def test_mean_std_ci_known_values():
    s = mean_std_ci([1.0, 2.0, 3.0])
    # mean 2, sample std 1, t(0.975, 2) = 4.302653 (t table), half width 4.302653 / sqrt(3)
    half = 4.302653 / math.sqrt(3)
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    assert s["ci_low"] == pytest.approx(2.0 - half, abs=1e-5)
    assert s["ci_high"] == pytest.approx(2.0 + half, abs=1e-5)


def test_mean_std_ci_two_values_and_zero_spread():
    s = mean_std_ci([0.8, 0.9])  # std = 0.1 / sqrt(2); t(0.975, 1) = 12.7062
    assert s["std"] == pytest.approx(0.1 / math.sqrt(2))
    assert s["ci_high"] - s["mean"] == pytest.approx(12.7062 * 0.05, rel=1e-4)
    same = mean_std_ci([0.5, 0.5, 0.5])
    assert same["std"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.5


def test_mean_std_ci_clips_to_bounds():
    s = mean_std_ci([0.9, 1.0, 1.0], bounds=(0.0, 1.0))
    # mean 0.96667, std 0.057735: the t interval's upper end 1.110 is clipped to 1
    assert s["ci_high"] == 1.0
    assert s["ci_low"] == pytest.approx(0.96667 - 4.302653 * 0.057735 / math.sqrt(3), abs=1e-4)
    assert mean_std_ci([0.9, 1.0, 1.0])["ci_high"] > 1.0


def test_mean_std_ci_single_and_missing_values():
    assert mean_std_ci([0.7]) == {"n": 1, "mean": 0.7, "std": None, "ci_low": None, "ci_high": None}
    assert mean_std_ci([None, 0.7, None])["n"] == 1
    assert mean_std_ci([]) == {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}


def _pairs(b: int, c: int, both_right: int = 5, both_wrong: int = 3):
    """Labels and two prediction vectors with exactly b (A right, B wrong) and c (A wrong, B right)."""
    y = np.ones(b + c + both_right + both_wrong, dtype=int)
    a_right = np.r_[np.ones(b), np.zeros(c), np.ones(both_right), np.zeros(both_wrong)].astype(bool)
    b_right = np.r_[np.zeros(b), np.ones(c), np.ones(both_right), np.zeros(both_wrong)].astype(bool)
    return y, np.where(a_right, y, 1 - y), np.where(b_right, y, 1 - y)


@pytest.mark.parametrize(("b", "c"), [(10, 2), (2, 10), (7, 7), (0, 6), (30, 12), (1, 0)])
def test_mcnemar_exact_matches_binomial_by_hand(b, c):
    y, pa, pb = _pairs(b, c)
    r = mcnemar(y, pa, pb)
    assert (r["b"], r["c"]) == (b, c)
    # Exact McNemar: two-sided, p = min(1, 2 * P(X <= min(b, c))), X ~ Binomial(b + c, 1/2)
    expected = min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5))
    assert r["p_value"] == pytest.approx(expected, rel=1e-9)


def test_mcnemar_hand_value_and_no_disagreement():
    y, pa, pb = _pairs(10, 2)
    # 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar(y, pa, pb)["p_value"] == pytest.approx(158 / 4096)
    y, pa, pb = _pairs(0, 0)
    assert mcnemar(y, pa, pb) == {"b": 0, "c": 0, "p_value": 1.0}


def test_mcnemar_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="mcnemar: predictions of shape"):
        mcnemar([0, 1, 1], [0, 1], [0, 1])


def test_paired_bootstrap_identical_predictions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = rng.integers(0, 2, (3, 200))
    r = paired_bootstrap(y, p, p, n_boot=500)
    assert r["diff"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0 and r["p_value"] == 1.0
    assert (r["n_seeds"], r["n_images"], r["n_boot"]) == (3, 200, 500)


def test_paired_bootstrap_all_right_vs_all_wrong():
    y = np.array([0, 1] * 50)
    r = paired_bootstrap(y, y, 1 - y, n_boot=999)
    assert r["diff"] == 1.0 and r["ci_low"] == r["ci_high"] == 1.0
    assert r["p_value"] == pytest.approx(2 / 1000)  # no resample <= 0: 2 * (0 + 1) / (999 + 1)


def test_paired_bootstrap_interval_matches_binomial_spread():
    # One seed, A right on 60% of images where B is right on 40%, disagreeing everywhere:
    # diff = 0.2 and the per-image difference is +-1, so its bootstrap sd is about sqrt(0.96 / N).
    n = 1000
    y = np.zeros(n, dtype=int)
    a = np.r_[np.zeros(600), np.ones(400)].astype(int)
    r = paired_bootstrap(y, a, 1 - a, n_boot=4000, seed=3)
    half = 1.96 * math.sqrt((1 - 0.2**2) / n)
    assert r["diff"] == pytest.approx(0.2)
    assert r["ci_low"] == pytest.approx(0.2 - half, abs=0.01)
    assert r["ci_high"] == pytest.approx(0.2 + half, abs=0.01)
    assert r["p_value"] < 0.001


def test_paired_bootstrap_is_deterministic_and_detects_no_difference():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    pa = np.where(rng.random((3, 300)) < 0.8, y, 1 - y)
    pb = np.where(rng.random((3, 300)) < 0.8, y, 1 - y)  # same accuracy in expectation
    r1 = paired_bootstrap(y, pa, pb, n_boot=800, seed=5)
    assert r1 == paired_bootstrap(y, pa, pb, n_boot=800, seed=5)
    assert r1["ci_low"] <= r1["diff"] <= r1["ci_high"]
    assert r1["ci_low"] < 0 < r1["ci_high"] and r1["p_value"] >= 0.05


def test_paired_bootstrap_rejects_unpaired_shapes():
    with pytest.raises(ValueError, match="paired_bootstrap: A has shape"):
        paired_bootstrap([0, 1], [[0, 1], [1, 1]], [0, 1])


def test_holm_hand_values():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(1 * 0.04, 0.06); back in input order
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2]) == [0.2]
    assert holm([0.6, 0.7]) == [1.0, 1.0]


# ---- paired_bootstrap_metrics: the general bootstrap behind `cxr-bench compare`

def _runs(rng, y, s=3, ties=False):
    score = rng.random((s, y.size))
    if ties:  # scores on a coarse grid: many ties, within and across classes
        score = np.round(score, 1)
    return {"y_score": score, "y_pred": (score > 0.5).astype(int)}


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_metrics_match_sklearn_with_sample_weights(ties):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    from cxr.stats import BOOT_METRICS

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 150)
    runs = _runs(rng, y, ties=ties)
    w = rng.integers(0, 4, (5, y.size)).astype(float)  # image counts of 5 resamples
    reference = {"accuracy": accuracy_score, "balanced_accuracy": balanced_accuracy_score, "auroc": roc_auc_score}
    for name, (key, fn) in BOOT_METRICS.items():
        got = fn(y, runs[key], w)
        assert got.shape == (5, 3)
        for b in range(5):
            for s in range(3):
                assert got[b, s] == pytest.approx(reference[name](y, runs[key][s], sample_weight=w[b]), abs=1e-12)


def test_paired_bootstrap_metrics_accuracy_is_the_reports_statistic():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    a, b = _runs(rng, y), _runs(rng, y)
    a["y_pred"][:, :40] = y[:40]  # A right on 40 more images
    new = paired_bootstrap_metrics(y, a, b, n_boot=4000, seed=1)["accuracy"]
    old = paired_bootstrap(y, a["y_pred"], b["y_pred"], n_boot=4000, seed=1)
    assert new["diff"] == pytest.approx(old["diff"], abs=1e-12)
    # the same resampling scheme on other draws: the intervals agree to the resampling noise
    assert new["ci_low"] == pytest.approx(old["ci_low"], abs=0.006)
    assert new["ci_high"] == pytest.approx(old["ci_high"], abs=0.006)
    assert (new["n_seeds"], new["n_images"], new["n_boot"]) == (3, 400, 4000)


def test_paired_bootstrap_metrics_of_identical_and_opposite_runs():
    rng = np.random.default_rng(5)
    y = np.array([0, 1] * 60)
    a = _runs(rng, y)
    same = paired_bootstrap_metrics(y, a, a, n_boot=300)
    for r in same.values():
        assert (r["diff"], r["ci_low"], r["ci_high"], r["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    right = {"y_pred": np.tile(y, (3, 1)), "y_score": np.tile(0.2 + 0.6 * y, (3, 1))}
    wrong = {"y_pred": 1 - right["y_pred"], "y_score": 1 - right["y_score"]}
    r = paired_bootstrap_metrics(y, right, wrong, n_boot=999)
    assert r["accuracy"]["diff"] == r["balanced_accuracy"]["diff"] == r["auroc"]["diff"] == 1.0
    assert r["auroc"]["p_value"] == pytest.approx(2 / 1000)  # no resample <= 0


def test_paired_bootstrap_metrics_undefined_and_mismatched():
    y = np.ones(20, dtype=int)  # one class: balanced accuracy and AUROC are undefined
    a = {"y_pred": np.ones((2, 20), int), "y_score": np.full((2, 20), 0.9)}
    r = paired_bootstrap_metrics(y, a, {**a, "y_pred": np.zeros((2, 20), int)}, n_boot=50)
    assert r["accuracy"]["diff"] == 1.0
    assert r["balanced_accuracy"]["diff"] is None and r["auroc"]["p_value"] is None
    with pytest.raises(ValueError, match="paired_bootstrap_metrics: y_pred of A has shape"):
        paired_bootstrap_metrics(y, a, {"y_pred": np.ones((3, 20), int), "y_score": np.ones((3, 20))}, ["accuracy"])
