"""Decisions that hold on new patients (cxr.decision, cxr.losses): class weights from the train split's
counts, the equal-prior threshold, test-time augmentation, each against a direct computation."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr import losses, spec, sweep
from cxr.decision import TTA_SEED, Decision
from cxr.evaluate import evaluate_split, predict_logits
from cxr.models import build_model
from cxr.recipe import augment
from cxr.spec import ExperimentSpec

SPEC = ExperimentSpec(name="d", epochs=2, width=4)


def test_balanced_class_weights_are_n_over_2_n_c():
    y = torch.tensor([0] * 1214 + [1] * 3494)  # PneumoniaMNIST's train split
    w = losses.balanced_class_weights(y)
    assert w.tolist() == pytest.approx([4708 / (2 * 1214), 4708 / (2 * 3494)])
    assert w.tolist() == pytest.approx([1.939, 0.674], abs=1e-3)
    assert (w * torch.tensor([1214, 3494])).tolist() == pytest.approx([2354, 2354])  # each class half the loss


@pytest.mark.parametrize("name", ["bce", "ce", "focal"])
def test_class_weighted_losses_equal_the_weighted_mean_of_per_image_losses(name):
    g = torch.Generator().manual_seed(0)
    loss = losses.get(name)
    logits, y = torch.randn(40, loss.outputs, generator=g), torch.randint(0, 2, (40,), generator=g)
    w = torch.tensor([1.9, 0.7])
    s = ExperimentSpec(loss=name)
    per_image = torch.stack([loss.train_loss(logits[i:i + 1], y[i:i + 1], s) for i in range(40)])
    expected = (w[y] * per_image).sum() / w[y].sum()
    assert loss.train_loss(logits, y, s, w).item() == pytest.approx(expected.item(), rel=1e-5)
    if name == "ce":
        assert loss.train_loss(logits, y, s, w).item() == pytest.approx(F.cross_entropy(logits, y, weight=w).item())


def test_equal_prior_threshold_is_the_train_prevalence_and_bce_agrees_on_the_logit():
    y_train = torch.tensor([0] * 26 + [1] * 74)
    d = Decision.of(replace(SPEC, decision="equal-prior"), y_train)
    assert d.prior == pytest.approx(0.74) and d.threshold == pytest.approx(0.74)
    assert Decision.of(SPEC, y_train).threshold == 0.5 and Decision.of(SPEC, y_train).plain
    # Saerens et al.: p / pi > (1 - p) / (1 - pi)  <=>  p > pi; for BCE: logit > log(pi / (1 - pi))
    logits = torch.linspace(-4, 4, 81)
    p = torch.sigmoid(logits)
    corrected = (p / 0.74) / (p / 0.74 + (1 - p) / 0.26)
    assert torch.equal(corrected > 0.5, p > 0.74)
    assert torch.equal(p > 0.74, logits > math.log(0.74 / 0.26))


def _model(outputs=2):
    torch.manual_seed(0)
    return build_model("cnn", outputs, 4).eval()


def test_equal_prior_predictions_are_score_above_prior(tiny_data):
    model, d = _model(), Decision("equal-prior", 0.7)
    out = evaluate_split(model, tiny_data.test.x, tiny_data.test.y, torch.device("cpu"), d)
    score = torch.softmax(predict_logits(model, tiny_data.test.x, torch.device("cpu")), 1)[:, 1].numpy()
    assert out["predictions"]["y_pred"] == (score > 0.7).astype(int).tolist()
    plain = evaluate_split(model, tiny_data.test.x, tiny_data.test.y, torch.device("cpu"))
    assert out["plain"] == plain["metrics"] and "plain" not in plain


def test_tta_is_the_mean_probability_of_explicit_transforms(tiny_data):
    model, x = _model(), tiny_data.test.x
    d = Decision("argmax", None, 3, (0.1, 10.0, 0.1))
    ranges = ExperimentSpec(augment_shift=0.1, augment_rotate=10.0, augment_scale=0.1)
    draws = [x] + [augment(x, ranges, torch.Generator().manual_seed(TTA_SEED + k)) for k in range(3)]
    with torch.no_grad():
        expected = torch.stack([torch.softmax(model(v), 1) for v in draws]).mean(0)[:, 1]
    out = evaluate_split(model, x, tiny_data.test.y, torch.device("cpu"), d)
    assert np.allclose(out["predictions"]["y_score"], expected.numpy(), atol=2e-6)
    assert out["predictions"]["y_pred"] == (expected.numpy() > 0.5).astype(int).tolist()
    again = evaluate_split(model, x, tiny_data.test.y, torch.device("cpu"), d)
    assert again["predictions"] == out["predictions"]  # fixed draws: the same for every call


def test_a_run_stores_its_decision_and_the_plain_metrics(tiny_data, tmp_path):
    s = replace(SPEC, class_weight="balanced", decision="equal-prior", tta=2, augment_shift=0.05)
    rec = sweep.run(s, tmp_path, "cpu", data=tiny_data, progress=False)
    prior = float(tiny_data.train.y.float().mean())
    assert rec.ok and rec.decision == {"rule": "equal-prior", "threshold": pytest.approx(prior),
                                       "prior": pytest.approx(prior), "tta": 2, "augment": [0.05, 0.0, 0.0]}
    assert {"val", "test", "val_plain", "test_plain"} == set(rec.metrics)
    model = build_model("cnn", 2, 4)
    model.load_state_dict(torch.load(tmp_path / rec.weights, weights_only=True))
    plain = evaluate_split(model, tiny_data.test.x, tiny_data.test.y, torch.device("cpu"))["metrics"]
    assert rec.metrics["test_plain"]["accuracy"] == plain["accuracy"]


def test_the_options_stay_out_of_existing_hashes_and_tta_needs_a_range():
    for s in spec.load(["specs"]):
        assert not {"class_weight", "decision", "tta"} & set(s.recipe())
    with pytest.raises(spec.SpecError, match="tta = 3 draws of the augmentation"):
        spec.parse("[experiment]\ntta = 3\n", "t.toml")
    with pytest.raises(spec.SpecError, match="allowed values are argmax, equal-prior"):
        spec.parse('[experiment]\ndecision = "youden"\n', "t.toml")
