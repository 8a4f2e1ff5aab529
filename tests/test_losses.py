"""The losses table (cxr.losses): each loss against a direct formula, label smoothing, and the seam:
spec validation, -k, training, evaluation and weight inference all take a loss from the table."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cxr import losses, models, selection, spec, sweep
from cxr.evaluate import evaluate_weights
from cxr.spec import ExperimentSpec


def test_label_smoothing_changes_the_loss_for_every_loss():
    logits2, y = torch.tensor([[-2.0, 2.0], [3.0, -1.0]]), torch.tensor([1, 0])
    for name, loss in losses.LOSSES.items():
        logits = logits2 if loss.outputs == 2 else logits2[:, 1:] - logits2[:, :1]
        plain = loss.train_loss(logits, y, ExperimentSpec(loss=name))
        smooth = loss.train_loss(logits, y, ExperimentSpec(loss=name, label_smoothing=0.2))
        assert smooth > plain, name
    # BCE smoothing pulls targets toward 0.5: at ls = 1 the target is 0.5 everywhere
    z = torch.tensor([[0.7]])
    expected = -(0.5 * math.log(torch.sigmoid(z).item()) + 0.5 * math.log(1 - torch.sigmoid(z).item()))
    bce = losses.get("bce").train_loss(z, torch.tensor([1]), ExperimentSpec(loss="bce", label_smoothing=0.999999))
    assert bce.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_focal_loss_equals_the_direct_formula(gamma):
    """Lin et al. 2017: FL(p_t) = -(1 - p_t)^gamma log(p_t), averaged over images."""
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 2, generator=g) * 3, torch.randint(0, 2, (64,), generator=g)
    direct = 0.0
    for row, label in zip(logits.tolist(), y.tolist(), strict=True):
        p_t = math.exp(row[label]) / (math.exp(row[0]) + math.exp(row[1]))
        direct += -((1 - p_t) ** gamma) * math.log(p_t)
    got = losses.get("focal").train_loss(logits, y, ExperimentSpec(loss="focal", focal_gamma=gamma))
    assert got.item() == pytest.approx(direct / 64, rel=1e-5)
    if gamma == 0:  # no focusing: cross-entropy
        assert got.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_focal_loss_down_weights_easy_images():
    easy, hard = torch.tensor([[-4.0, 4.0]]), torch.tensor([[0.5, -0.5]])
    y = torch.tensor([1])
    focal, ce = losses.get("focal"), losses.get("ce")
    spec_focal = ExperimentSpec(loss="focal")
    ratio_easy = focal.train_loss(easy, y, spec_focal) / ce.train_loss(easy, y, ExperimentSpec())
    ratio_hard = focal.train_loss(hard, y, spec_focal) / ce.train_loss(hard, y, ExperimentSpec())
    assert ratio_easy < 1e-3 < ratio_hard < 1


def test_focal_loss_with_label_smoothing_matches_the_soft_target_sum():
    logits, y, s, gamma = torch.tensor([[1.0, -1.0], [0.2, 0.3]]), torch.tensor([0, 1]), 0.2, 2.0
    p = torch.softmax(logits, 1)
    q = torch.nn.functional.one_hot(y, 2) * (1 - s) + s / 2
    direct = -(q * (1 - p) ** gamma * p.log()).sum(1).mean()
    got = losses.focal_loss(logits, y, gamma, s)
    assert got.item() == pytest.approx(direct.item(), rel=1e-6)


def test_every_part_of_the_package_takes_its_losses_from_the_table():
    assert spec.LOSSES == losses.NAMES == ("bce", "ce", "focal")
    for name, loss in losses.LOSSES.items():
        s = ExperimentSpec(loss=name)
        assert s.num_outputs == loss.outputs
        assert models.build_model("cnn", loss.outputs, 4).head[-1].out_features == loss.outputs
    assert losses.for_outputs(1).name == "bce" and losses.for_outputs(2).name == "ce"
    with pytest.raises(spec.SpecError, match="allowed values are bce, ce, focal"):
        spec.parse('[experiment]\nloss = "mse"\n', "x.toml")


def test_focal_gamma_is_a_spec_option_and_stays_out_of_other_hashes():
    (s,) = spec.parse('[experiment]\nloss = "focal"\nfocal_gamma = 1.5\n', "f.toml")
    assert s.focal_gamma == 1.5 and s.spec_hash() != replace(s, focal_gamma=2.0).spec_hash()
    assert "focal_gamma" not in ExperimentSpec().recipe()  # at its default: old hashes and stores hold
    with pytest.raises(spec.SpecError, match="focal_gamma"):
        spec.parse('[experiment]\nfocal_gamma = -1\n', "f.toml")


def test_k_focal_selects_the_focal_runs_and_ce_does_not():
    runs = spec.parse('[experiment]\nname = "l"\n[grid]\nloss = ["bce", "ce", "focal"]\n', "l.toml")
    pick = {expr: [r.loss for r in runs if selection.matches(r, expr)] for expr in ("focal", "ce", "bce", "not focal")}
    assert pick == {"focal": ["focal"], "ce": ["ce"], "bce": ["bce"], "not focal": ["bce", "ce"]}


def test_a_focal_run_trains_and_its_weights_evaluate(tiny_data, tmp_path):
    s = ExperimentSpec(name="f", loss="focal", epochs=3, lr=0.01, width=4)
    r = sweep.run(s, tmp_path, "cpu", data=tiny_data, progress=False)
    assert r.status == "ok" and r.spec["loss"] == "focal" and r.history[-1]["train_loss"] < r.history[0]["train_loss"]
    x, y = tiny_data.test.x[:, 0].numpy(), tiny_data.test.y.numpy()
    normal, pneumonia = tmp_path / "test_normal.npy", tmp_path / "test_pneumonia.npy"
    np.save(normal, x[y == 0])
    np.save(pneumonia, x[y == 1])
    inferred = evaluate_weights(tmp_path / r.weights, normal, pneumonia, device="cpu")
    told = evaluate_weights(tmp_path / r.weights, normal, pneumonia, loss="focal", device="cpu")
    assert inferred["num_outputs"] == told["num_outputs"] == 2 and told["loss"] == "focal"
    assert inferred["accuracy"] == told["accuracy"]
