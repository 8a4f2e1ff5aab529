"""cxr.metrics against hand-computed values, against scikit-learn, and under hypothesis."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm

from cxr.metrics import binary_metrics, roc_curve_points

KEYS = {"n", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "ece",
        "confusion"}
RATIOS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "ece")

# 3 normal, 5 pneumonia. Predictions (score > 0.5): 0 1 0 | 1 1 0 1 0
#   normal:    0.1 -> tn, 0.6 -> fp, 0.3 -> tn                   tn = 2, fp = 1
#   pneumonia: 0.9 -> tp, 0.8 -> tp, 0.4 -> fn, 0.7 -> tp, 0.2 -> fn   fn = 2, tp = 3
# AUROC: (pneumonia, normal) pairs ranked right: 0.9: 3, 0.8: 3, 0.4: 2, 0.7: 3, 0.2: 1 -> 12 / 15
Y_TRUE = [0, 0, 0, 1, 1, 1, 1, 1]
Y_SCORE = [0.1, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.2]


def test_hand_computed_example():
    m = binary_metrics(Y_TRUE, Y_SCORE)
    assert set(m) == KEYS
    assert m["n"] == 8
    assert m["confusion"] == [[2, 1], [2, 3]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert m["sensitivity"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 / 3)  # 2 * 3 / (2 * 3 + 1 + 2)
    assert m["auroc"] == pytest.approx(12 / 15)


def test_result_is_plain_json():
    m = binary_metrics(np.array(Y_TRUE), np.array(Y_SCORE, dtype=np.float32))
    assert type(m["n"]) is int
    assert all(type(m[k]) is float for k in RATIOS)
    assert all(type(v) is int for row in m["confusion"] for v in row)
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_explicit_y_pred_overrides_threshold():
    # A score of exactly 0.5 is normal by default; a CE argmax or BCE logit > 0 may say pneumonia.
    assert binary_metrics([1, 0], [0.5, 0.2])["confusion"] == [[1, 0], [1, 0]]
    assert binary_metrics([1, 0], [0.5, 0.2], [1, 0])["confusion"] == [[1, 0], [0, 1]]


def test_label_dtypes_accepted():
    expected = binary_metrics(Y_TRUE, Y_SCORE)
    assert binary_metrics(np.array(Y_TRUE, dtype=bool), Y_SCORE) == expected
    assert binary_metrics(np.array(Y_TRUE, dtype=np.float32), Y_SCORE) == expected
    assert binary_metrics(np.array(Y_TRUE, dtype=np.uint8), Y_SCORE) == expected


def test_undefined_ratios_are_none():
    # No pneumonia and nothing predicted as pneumonia: sensitivity, precision, F1 and AUROC undefined.
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert m["confusion"] == [[3, 0], [0, 0]]
    assert (m["sensitivity"], m["precision"], m["f1"], m["auroc"]) == (None, None, None, None)
    assert (m["accuracy"], m["specificity"]) == (1.0, 1.0)
    # Only pneumonia, all missed: specificity undefined, precision undefined, F1 = 0.
    m = binary_metrics([1, 1], [0.2, 0.4])
    assert (m["specificity"], m["precision"], m["auroc"]) == (None, None, None)
    assert (m["sensitivity"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0)
    json.dumps(m, allow_nan=False)


# --- ECE ---------------------------------------------------------------------------------------


def test_ece_perfect_calibration_is_zero():
    # 10 scored 0.8 (confidence 0.8 in pneumonia), 8 of them pneumonia; 10 scored 0.3 (confidence
    # 0.7 in normal), 7 of them normal: in every bin accuracy equals confidence.
    y_true = [1] * 8 + [0] * 2 + [0] * 7 + [1] * 3
    y_score = [0.8] * 10 + [0.3] * 10
    assert binary_metrics(y_true, y_score)["ece"] == pytest.approx(0.0, abs=1e-12)
    assert binary_metrics([0, 1, 1], [0.0, 1.0, 1.0])["ece"] == 0.0  # certain and right


def test_ece_all_confident_wrong_is_one():
    assert binary_metrics([0, 1, 0, 1], [1.0, 0.0, 1.0, 0.0])["ece"] == 1.0


def test_ece_hand_computed():
    # scores 0.95 0.85 0.15 0.65 with labels 1 0 0 1: predictions 1 1 0 1,
    # confidence 0.95 0.85 0.85 0.65, correct 1 0 1 1.
    y_true, y_score = [1, 0, 0, 1], [0.95, 0.85, 0.15, 0.65]
    # 10 bins: (0.9, 1]: {0.95 right}; (0.8, 0.9]: {0.85 wrong, 0.85 right}; (0.6, 0.7]: {0.65 right}
    expected = 1 / 4 * abs(1 - 0.95) + 2 / 4 * abs(0.5 - 0.85) + 1 / 4 * abs(1 - 0.65)
    assert expected == pytest.approx(0.275)
    assert binary_metrics(y_true, y_score, n_bins=10)["ece"] == pytest.approx(expected)
    # 1 bin: |mean accuracy - mean confidence| = |0.75 - 0.825|
    assert binary_metrics(y_true, y_score, n_bins=1)["ece"] == pytest.approx(0.075)


def test_ece_bins_are_right_closed():
    # 2 bins, [0, 0.5] and (0.5, 1]: confidence 0.5 (wrong) and 0.75 (right) fall in different
    # bins: 1/2 * 0.5 + 1/2 * 0.25 = 0.375. One shared bin would give |0.5 - 0.625| = 0.125.
    assert binary_metrics([1, 1], [0.5, 0.75], n_bins=2)["ece"] == pytest.approx(0.375)


def test_ece_uses_the_predicted_class():
    # A decision that disagrees with the score: confidence is that of the class actually predicted.
    # pred 1 at score 0.3 -> confidence 0.3, right: ECE = |1 - 0.3| = 0.7 (not |1 - 0.7|).
    assert binary_metrics([1], [0.3], [1], n_bins=10)["ece"] == pytest.approx(0.7)


def _reference_ece(y_true, y_score, y_pred, n_bins):
    """Textbook loop: bins (lo, hi] over [0, 1], the first closed at 0, weighted by count / N."""
    y_true, y_score, y_pred = map(np.asarray, (y_true, y_score, y_pred))
    confidence = np.where(y_pred == 1, y_score, 1 - y_score)
    correct = y_pred == y_true
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        in_bin = ((confidence > lo) | (i == 0)) & (confidence <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total


# --- agreement with scikit-learn ---------------------------------------------------------------


def _check_against_sklearn(y_true, y_score, y_pred, m):
    y_true, y_score, y_pred = np.asarray(y_true), np.asarray(y_score, dtype=float), np.asarray(y_pred)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["confusion"] == skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()
    pairs = [
        ("sensitivity", skm.recall_score, {"pos_label": 1}),
        ("specificity", skm.recall_score, {"pos_label": 0}),
        ("precision", skm.precision_score, {}),
        ("f1", skm.f1_score, {}),
    ]
    for key, score, kwargs in pairs:
        expected = score(y_true, y_pred, labels=[0, 1], zero_division=np.nan, **kwargs)
        if math.isnan(expected):
            assert m[key] is None, key
        else:
            assert m[key] == pytest.approx(expected), key
    if len(set(y_true.tolist())) == 2:
        assert m["auroc"] == pytest.approx(skm.roc_auc_score(y_true, y_score))
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    else:
        assert m["auroc"] is None and m["balanced_accuracy"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, 500)
    y_score = np.clip(0.3 * y_true + rng.uniform(0, 0.7, 500), 0, 1)
    m = binary_metrics(y_true, y_score)
    _check_against_sklearn(y_true, y_score, y_score > 0.5, m)
    assert 0.5 < m["auroc"] < 1.0  # informative but imperfect scores
    assert m["ece"] == pytest.approx(_reference_ece(y_true, y_score, y_score > 0.5, 15))


# --- properties --------------------------------------------------------------------------------

scores = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False),
    st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),  # ties and exact bin edges
)


@st.composite
def valid_inputs(draw):
    n = draw(st.integers(1, 40))
    labels = st.lists(st.integers(0, 1), min_size=n, max_size=n)
    y_true = draw(labels)
    y_score = draw(st.lists(scores, min_size=n, max_size=n))
    y_pred = draw(st.one_of(st.none(), labels))
    return y_true, y_score, y_pred, draw(st.integers(1, 20))


@given(valid_inputs())
def test_properties_of_valid_inputs(inputs):
    y_true, y_score, y_pred, n_bins = inputs
    m = binary_metrics(y_true, y_score, y_pred, n_bins=n_bins)
    (tn, fp), (fn, tp) = m["confusion"]
    assert m["n"] == len(y_true) == tn + fp + fn + tp
    assert m["accuracy"] == pytest.approx((tn + tp) / m["n"])
    for key in RATIOS:
        assert m[key] is None or 0.0 <= m[key] <= 1.0, key
    pred = [int(s > 0.5) for s in y_score] if y_pred is None else y_pred
    _check_against_sklearn(y_true, y_score, pred, m)
    assert m["ece"] == pytest.approx(_reference_ece(y_true, y_score, pred, n_bins), abs=1e-12)
    json.dumps(m, allow_nan=False)


@given(valid_inputs())
def test_roc_curve_points_match_sklearn(inputs):
    y_true, y_score, _, _ = inputs
    if len(set(y_true)) < 2:
        with pytest.raises(ValueError, match="only class"):
            roc_curve_points(y_true, y_score)
        return
    points = roc_curve_points(y_true, y_score)
    fpr, tpr, _ = skm.roc_curve(y_true, y_score)
    assert points == {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    assert (points["fpr"][0], points["tpr"][0], points["fpr"][-1], points["tpr"][-1]) == (0, 0, 1, 1)
    json.dumps(points, allow_nan=False)


# --- invalid input -----------------------------------------------------------------------------

bad_labels = st.sampled_from([2, -1, 0.5, math.nan, math.inf, 1.0001])
bad_scores = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1e-9, 1 + 1e-9, 2]),
    st.floats(allow_nan=False).filter(lambda x: not 0 <= x <= 1),
)


@st.composite
def invalid_inputs(draw):
    """Valid inputs with exactly one thing broken, and the name the error message must contain."""
    y_true, y_score, y_pred, _ = draw(valid_inputs())
    y_pred = y_pred or [int(s > 0.5) for s in y_score]
    args = {"y_true": y_true, "y_score": y_score, "y_pred": y_pred, "n_bins": 15}
    name = draw(st.sampled_from(["y_true", "y_score", "y_pred", "n_bins"]))
    if name == "n_bins":
        args["n_bins"] = draw(st.sampled_from([0, -3, 2.5, True, "15", None]))
        return args, name
    values = list(args[name])
    how = draw(st.sampled_from(["value", "length", "empty", "2d", "text"]))
    if how == "value":
        i = draw(st.integers(0, len(values) - 1))
        values[i] = draw(bad_scores if name == "y_score" else bad_labels)
    elif how == "length":
        values = values[:-1] if draw(st.booleans()) else values + values[:1]
    elif how == "empty":
        args = {key: [] if key != "n_bins" else 15 for key in args}
        values, name = [], "y_true"  # the first argument checked
    elif how == "2d":
        values = [values]
    else:
        values = [str(v) for v in values]
    args[name] = values
    return args, name


@given(invalid_inputs())
def test_invalid_input_raises_value_error(case):
    args, name = case
    with pytest.raises(ValueError) as info:  # any other exception fails the test
        binary_metrics(args["y_true"], args["y_score"], args["y_pred"], n_bins=args["n_bins"])
    message = str(info.value)
    assert message.startswith("binary_metrics: ") and "\n" not in message
    assert name in message


@pytest.mark.parametrize(
    ("y_true", "y_score", "fragment"),
    [
        ([0, 1], [0.1], "y_score has 1 values but y_true has 2"),
        ([], [], "y_true is empty"),
        ([0, 2], [0.1, 0.9], "y_true must be 0 (normal) or 1 (pneumonia), got 2"),
        ([0, 1], [0.1, math.nan], "y_score must be probabilities in [0, 1], got nan"),
        ([0, 1], [0.1, 1.5], "y_score must be probabilities in [0, 1], got 1.5"),
        ([[0, 1]], [[0.1, 0.9]], "y_true must be 1-D, got shape (1, 2)"),
        ([0, 1], ["a", "b"], "y_score must hold numbers"),
        ([0, [1, 0]], [0.1, 0.9], "y_true is not an array of numbers"),
    ],
)
def test_error_messages(y_true, y_score, fragment):
    with pytest.raises(ValueError, match=r"^binary_metrics: ") as info:
        binary_metrics(y_true, y_score)
    assert fragment in str(info.value)
    with pytest.raises(ValueError, match=r"^roc_curve_points: "):
        roc_curve_points(y_true, y_score)


def test_roc_curve_points_needs_both_classes():
    with pytest.raises(ValueError, match="y_true holds only class 1; a ROC curve needs both classes"):
        roc_curve_points([1, 1], [0.2, 0.9])
