"""Binary classification metrics (normal = 0, pneumonia = 1) as pure functions over arrays.

Every function checks its inputs once and returns plain Python numbers and lists, so results go
straight into JSON. A ratio whose denominator is 0, and AUROC when y_true holds one class only,
is None (JSON null), never NaN. scikit-learn computes AUROC, the ROC curve and the confusion
matrix; the tests hold the rest against scikit-learn too.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve


def _array(name: str, x, *, fn: str) -> np.ndarray:
    """`x` as a non-empty 1-D numeric array, or a one-line ValueError naming `fn` and `name`."""
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:  # ragged nested lists, unconvertible objects
        raise ValueError(f"{fn}: {name} is not an array of numbers ({e})") from None
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{fn}: {name} must hold numbers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{fn}: {name} is empty")
    return a


def _labels(name: str, x, *, fn: str) -> np.ndarray:
    a = _array(name, x, fn=fn)
    bad = ~np.isin(a, (0, 1))  # NaN is not in {0, 1} either
    if bad.any():
        raise ValueError(f"{fn}: {name} must be 0 (normal) or 1 (pneumonia), got {a[bad][0].item()!r}")
    return a.astype(np.int64)


def _scores(name: str, x, *, fn: str) -> np.ndarray:
    a = _array(name, x, fn=fn).astype(np.float64)
    bad = ~((a >= 0.0) & (a <= 1.0))  # also catches NaN
    if bad.any():
        raise ValueError(f"{fn}: {name} must be probabilities in [0, 1], got {a[bad][0].item()!r}")
    return a


def _same_length(fn: str, **arrays: np.ndarray) -> None:
    (first, a), *rest = arrays.items()
    for name, b in rest:
        if len(b) != len(a):
            raise ValueError(f"{fn}: {name} has {len(b)} values but {first} has {len(a)}")


def _ratio(num: int, den: int) -> float | None:
    return float(num / den) if den else None


def _ece(y_true: np.ndarray, y_score: np.ndarray, y_pred: np.ndarray, n_bins: int) -> float:
    """Expected calibration error of the predicted class's confidence (Guo et al., 2017).

    confidence = y_score where y_pred is 1, else 1 - y_score (= max(p, 1 - p) whenever y_pred
    agrees with the score); correct = (y_pred == y_true). The confidences fall into n_bins
    equal-width bins over [0, 1], bin m holding (m/n_bins, (m+1)/n_bins] (the first also holds
    0), and ECE = sum over bins of |B|/N * |accuracy(B) - mean confidence(B)|, in [0, 1].
    With a 0.5 threshold the confidence is at least 0.5, so the bins below 0.5 stay empty.
    Trusts its inputs: validated arrays of one length.
    """
    confidence = np.where(y_pred == 1, y_score, 1.0 - y_score)
    correct = (y_pred == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    # |B|/N * |acc(B) - conf(B)| == |sum of correct in B - sum of confidence in B| / N
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(
        bins, weights=confidence, minlength=n_bins
    )
    return float(min(np.abs(gap).sum() / len(y_true), 1.0))  # min: rounding only


def binary_metrics(y_true, y_score, y_pred=None, *, n_bins: int = 15) -> dict:
    """Accuracy, balanced accuracy, sensitivity, specificity, precision, F1, AUROC, ECE, confusion matrix.

    y_true: (N,) labels in {0, 1}; y_score: (N,) predicted probability of pneumonia in [0, 1];
    y_pred: (N,) predicted labels, default y_score > 0.5 (callers pass it when the model decides
    otherwise, e.g. BCE's logit > 0 or CE's argmax, which can differ at exact ties).
    Returns {"n", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1",
    "auroc", "ece", "confusion": [[tn, fp], [fn, tp]]}; sensitivity = tp / (tp + fn), specificity =
    tn / (tn + fp), balanced accuracy their mean; ratios with a zero denominator, balanced accuracy
    and AUROC of a one-class y_true, are None.
    ECE: the standard expected calibration error of the predicted class's confidence (y_score
    where y_pred is 1, else 1 - y_score) against correctness, over n_bins equal-width bins of
    [0, 1], each weighted by its count / N (details in `_ece`). Bad input: one-line ValueError.
    """
    fn = "binary_metrics"
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"{fn}: n_bins must be an integer >= 1, got {n_bins!r}")
    y_true = _labels("y_true", y_true, fn=fn)
    y_score = _scores("y_score", y_score, fn=fn)
    y_pred = (y_score > 0.5).astype(np.int64) if y_pred is None else _labels("y_pred", y_pred, fn=fn)
    _same_length(fn, y_true=y_true, y_score=y_score, y_pred=y_pred)

    (tn, fp), (fn_, tp) = confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()
    n = len(y_true)
    one_class = tn + fp == 0 or fn_ + tp == 0
    sensitivity, specificity = _ratio(tp, tp + fn_), _ratio(tn, tn + fp)
    return {
        "n": n,
        "accuracy": float((tn + tp) / n),
        "balanced_accuracy": None if one_class else (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn_),
        "auroc": None if one_class else float(roc_auc_score(y_true, y_score)),
        "ece": _ece(y_true, y_score, y_pred, int(n_bins)),
        "confusion": [[tn, fp], [fn_, tp]],
    }


def roc_curve_points(y_true, y_score) -> dict:
    """{"fpr": [...], "tpr": [...]} from sklearn.metrics.roc_curve, running (0, 0) to (1, 1).

    A ROC curve needs both classes: a one-class y_true raises ValueError (sklearn would give NaN).
    """
    fn = "roc_curve_points"
    y_true = _labels("y_true", y_true, fn=fn)
    y_score = _scores("y_score", y_score, fn=fn)
    _same_length(fn, y_true=y_true, y_score=y_score)
    if np.unique(y_true).size < 2:
        raise ValueError(f"{fn}: y_true holds only class {int(y_true[0])}; a ROC curve needs both classes")
    fpr, tpr, _ = roc_curve(y_true, y_score)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as percent, as every table and line of this package shows it: 0.87662 -> "87.66%"."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"
