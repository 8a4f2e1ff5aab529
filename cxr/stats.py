"""Statistics of the report as pure functions: spread over seeds and paired tests between settings.

- `mean_std_ci`: mean, sample std (ddof 1) and a Student t interval over seeds.
- `mcnemar`: McNemar's exact test of two classifiers on the same test images (scipy binomtest on
  the discordant pairs).
- `paired_bootstrap`: the accuracy difference of two settings with a bootstrap interval and
  p-value, resampling seed pairs and test images together (numpy Generator, fixed seed).
- `paired_bootstrap_metrics`: the same bootstrap for any metric of a weighted sample (`BOOT_METRICS`:
  accuracy, balanced accuracy, AUROC), every metric on the same resamples, vectorised.
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


# ---- the paired bootstrap of any metric: a resample of images is a count per image (a weight), so each metric
# is a function of weights, computed for every resample at once. metric(y_true (N,), values (S, N), weights
# (B, N)) -> (B, S): the metric of each seed's run under each resample's image counts (NaN where undefined,
# e.g. a resample without a normal image for balanced accuracy).

def _weighted_accuracy(y_true: np.ndarray, y_pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    correct = (y_pred == y_true).astype(np.float64)
    return (w @ correct.T) / w.sum(1, keepdims=True)


def _weighted_recall(y_true: np.ndarray, y_pred: np.ndarray, w: np.ndarray, label: int) -> np.ndarray:
    mask = y_true == label
    correct = (y_pred[:, mask] == label).astype(np.float64)
    wc = w[:, mask]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (wc @ correct.T) / wc.sum(1, keepdims=True)


def _weighted_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (_weighted_recall(y_true, y_pred, w, 1) + _weighted_recall(y_true, y_pred, w, 0)) / 2


def _weighted_auroc(y_true: np.ndarray, y_score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P(score of a pneumonia image > score of a normal one) + half the ties, each image counted by its
    weight: the Mann-Whitney form of AUROC (sklearn's roc_auc_score with sample_weight), by ranks."""
    pos, neg = y_true == 1, y_true == 0
    wp, wn = np.ascontiguousarray(w[:, pos].T), w[:, neg].T  # (n_pos, B), (n_neg, B): rows gather fast
    with np.errstate(invalid="ignore", divide="ignore"):
        total = wp.sum(0) * wn.sum(0)
        out = np.empty((w.shape[0], y_score.shape[0]))
        for s, score in enumerate(y_score):
            order = np.argsort(score[neg], kind="stable")
            neg_sorted = score[neg][order]
            cum = np.zeros((order.size + 1, w.shape[0]))  # cum[k]: weight of the k lowest-scored normals
            np.cumsum(wn[order], axis=0, out=cum[1:])
            left = np.searchsorted(neg_sorted, score[pos], "left")  # normals scored below each pneumonia image
            right = np.searchsorted(neg_sorted, score[pos], "right")  # ... below or tied
            out[:, s] = 0.5 * np.einsum("pb,pb->b", cum[left] + cum[right], wp) / total
    return out


# name -> (the predictions it reads, the metric of weighted samples)
BOOT_METRICS = {"accuracy": ("y_pred", _weighted_accuracy),
                "balanced_accuracy": ("y_pred", _weighted_balanced_accuracy),
                "auroc": ("y_score", _weighted_auroc)}
_CHUNK = 1 << 22  # resampled image counts held at once (B x N entries), so a large test set stays in memory


def paired_bootstrap_metrics(y_true, a: dict, b: dict, metrics=tuple(BOOT_METRICS), *, n_boot: int = 2000,
                             seed: int = 0, confidence: float = 0.95) -> dict[str, dict]:
    """Differences A - B of several metrics over paired runs, with bootstrap intervals and p-values.

    a, b: {"y_pred": (S, N), "y_score": (S, N)} of S runs each (what the metrics read), row s of A paired
    with row s of B (same seed), all on the same N test images with labels y_true. The resampling is
    `paired_bootstrap`'s scheme: each of n_boot resamples draws N images (the same for every seed) and S
    seed pairs with replacement; a metric is computed per run on the resampled images (each image counted
    as often as drawn), and the difference is the seed-count-weighted mean of the runs' differences. Every
    metric uses the same resamples. For accuracy this is `paired_bootstrap`'s statistic, on other draws.
    Returns {metric: {"diff" (observed: the mean over seeds of A's metric minus B's), "ci_low",
    "ci_high", "p_value", "n_boot" (resamples where the metric is defined for every drawn run),
    "n_seeds", "n_images"}}; the p-value as in `paired_bootstrap`. A metric undefined on the data itself
    (AUROC of one class) gives None for diff, interval and p-value.
    """
    y = np.asarray(y_true)
    arrays = {}
    for key in {BOOT_METRICS[m][0] for m in metrics}:
        xa, xb = (np.atleast_2d(np.asarray(side[key])) for side in (a, b))
        if xa.shape != xb.shape or xa.shape[-1:] != y.shape or y.ndim != 1 or y.size == 0:
            raise ValueError(f"paired_bootstrap_metrics: {key} of A has shape {xa.shape}, of B {xb.shape}, "
                             f"y_true {y.shape}")
        arrays[key] = (xa, xb)
    s, n = next(iter(arrays.values()))[0].shape
    ones = np.ones((1, n))
    observed = {m: (BOOT_METRICS[m][1](y, arrays[BOOT_METRICS[m][0]][0], ones)
                    - BOOT_METRICS[m][1](y, arrays[BOOT_METRICS[m][0]][1], ones))[0] for m in metrics}
    rng = np.random.default_rng(seed)
    boots: dict[str, list] = {m: [] for m in metrics}
    step = max(1, _CHUNK // n)
    for start in range(0, n_boot, step):
        size = min(step, n_boot - start)
        # N images drawn with replacement, as counts per image (B, N): paired_bootstrap's multinomial counts,
        # drawn as uniform indices and counted (several times faster than Generator.multinomial)
        drawn = rng.integers(0, n, (size, n)) + n * np.arange(size)[:, None]
        w = np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        seed_counts = rng.multinomial(s, np.full(s, 1 / s), size=size)  # (B, S)
        for m in metrics:
            key, fn = BOOT_METRICS[m]
            d = fn(y, arrays[key][0], w) - fn(y, arrays[key][1], w)  # (B, S)
            d = np.where(seed_counts > 0, d, 0.0)  # a seed not drawn does not count, even where undefined
            boots[m].append(np.einsum("bs,bs->b", seed_counts, d) / s)
    alpha = 1 - confidence
    out = {}
    for m in metrics:
        boot = np.concatenate(boots[m])
        boot = np.round(boot[np.isfinite(boot)], 12)  # equal metrics differ by float rounding only: count as 0
        if not np.all(np.isfinite(observed[m])) or boot.size == 0:
            out[m] = {"diff": None, "ci_low": None, "ci_high": None, "p_value": None, "n_boot": 0,
                      "n_seeds": s, "n_images": n}
            continue
        low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        share_le = (np.sum(boot <= 0) + 1) / (boot.size + 1)
        share_ge = (np.sum(boot >= 0) + 1) / (boot.size + 1)
        out[m] = {"diff": float(observed[m].mean()), "ci_low": float(low), "ci_high": float(high),
                  "p_value": float(min(1.0, 2 * min(share_le, share_ge))), "n_boot": int(boot.size),
                  "n_seeds": s, "n_images": n}
    return out


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (family-wise error control)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()
