"""Statistics of the report as pure functions: spread over seeds and paired tests between settings.

- `mean_std_ci`: mean, sample std (ddof 1) and a Student t interval over seeds.
- `mcnemar`: McNemar's exact test of two classifiers on the same test images (scipy binomtest on
  the discordant pairs).
- `paired_bootstrap`: the accuracy difference of two settings with a bootstrap interval and
  p-value, resampling seed pairs and test images together (numpy Generator, fixed seed).
- `holm`: Holm's step-down adjustment when one comparison makes several tests.

Undefined results are None (JSON null), never NaN.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_std_ci(values, confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> dict:
    """{"n", "mean", "std", "ci_low", "ci_high"} of the non-None values.

    std is the sample standard deviation (ddof 1); the interval is mean ± t(1 - alpha/2, n - 1) *
    std / sqrt(n), clipped to `bounds` when given (e.g. (0, 1) for an accuracy, which a t interval
    over 3 seeds can otherwise overshoot). With n = 0 everything but n is None; with n = 1 std and
    the interval are None.
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"n": n, "mean": mean, "std": std, "ci_low": low, "ci_high": high}


def _correct(y_true, y_pred, what: str) -> np.ndarray:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_pred.shape[-1:] != y_true.shape or y_true.ndim != 1 or y_true.size == 0:
        raise ValueError(f"{what}: predictions of shape {y_pred.shape} do not match y_true of shape "
                         f"{y_true.shape}")
    return y_pred == y_true


def mcnemar(y_true, pred_a, pred_b) -> dict:
    """McNemar's exact test: {"b", "c", "p_value"}.

    b = images A classifies correctly and B does not, c = the reverse. Under "A and B are equally
    accurate" b ~ Binomial(b + c, 1/2); the p-value is scipy's two-sided exact binomial test
    (1.0 when b + c = 0: the two never disagree on correctness).
    """
    a = _correct(y_true, pred_a, "mcnemar")
    b_ = _correct(y_true, pred_b, "mcnemar")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return {"b": b, "c": c, "p_value": p}


def paired_bootstrap(y_true, preds_a, preds_b, *, n_boot: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """Accuracy difference A - B over paired runs, with a bootstrap interval and p-value.

    preds_a, preds_b: (S, N) predicted labels of S runs each, row s of A paired with row s of B
    (same seed), all on the same N test images (a 1-D array is one run). Each of n_boot resamples
    draws S seed pairs and N images with replacement (the same images for every seed) and takes
    the difference of mean accuracies. Returns {"diff" (observed), "ci_low", "ci_high" (percentile
    interval), "p_value", "n_boot", "n_seeds", "n_images"}. The two-sided p-value inverts the
    percentile interval: 2 * min(share of resampled differences <= 0, share >= 0), each share
    counted as (k + 1) / (n_boot + 1) so that it is never 0, capped at 1.
    """
    ca = np.atleast_2d(_correct(y_true, preds_a, "paired_bootstrap"))
    cb = np.atleast_2d(_correct(y_true, preds_b, "paired_bootstrap"))
    if ca.shape != cb.shape:
        raise ValueError(f"paired_bootstrap: A has shape {ca.shape} but B has {cb.shape}")
    d = ca.astype(np.float64) - cb  # (S, N), each entry -1, 0 or 1
    s, n = d.shape
    rng = np.random.default_rng(seed)
    # A resample is a count per image and per seed; its mean difference is a count-weighted sum.
    image_counts = rng.multinomial(n, np.full(n, 1 / n), size=n_boot)  # (B, N)
    seed_counts = rng.multinomial(s, np.full(s, 1 / s), size=n_boot)  # (B, S)
    boot = np.einsum("bs,bs->b", seed_counts, image_counts @ d.T) / (n * s)
    alpha = 1 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    share_le = (np.sum(boot <= 0) + 1) / (n_boot + 1)
    share_ge = (np.sum(boot >= 0) + 1) / (n_boot + 1)
    return {"diff": float(d.mean()), "ci_low": float(low), "ci_high": float(high),
            "p_value": float(min(1.0, 2 * min(share_le, share_ge))),
            "n_boot": n_boot, "n_seeds": s, "n_images": n}


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (family-wise error control)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()
