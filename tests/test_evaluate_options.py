"""`cxr-bench evaluate`'s decision options (issue 15): --decision equal-prior --prior P, --tta N with its
augmentation range, several --weights (a seed ensemble) and balanced accuracy, each against a direct
computation from the models; bad values are one line and exit status 2; no options is the course's rule."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from cxr import cli, spec
from cxr.decision import TTA_SEED
from cxr.evaluate import (
    AUGMENT_OPTIONS,
    AUGMENT_ROTATE,
    AUGMENT_SCALE,
    AUGMENT_SHIFT,
    MAX_TTA,
    EvaluateError,
    decision_from_options,
    evaluate_weights,
)
from cxr.models import build_model
from cxr.recipe import augment
from cxr.spec import ExperimentSpec

from .conftest import make_split

RECIPE = Path(__file__).resolve().parents[1] / "specs" / "recipes" / "pneumoniamnist.toml"
CE_SEEDS, BCE_SEEDS = (0, 1, 2), (3, 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """normal.npy / pneumonia.npy (N, 28, 28) float32, and small untrained cnn models: ce-<seed>.pth
    (2 outputs) and bce-<seed>.pth (1 output), width 4."""
    tmp = tmp_path_factory.mktemp("options")
    split = make_split(60, 21)
    x, y = split.x[:, 0].numpy(), split.y.numpy()
    np.save(tmp / "normal.npy", x[y == 0])
    np.save(tmp / "pneumonia.npy", x[y == 1])
    for outputs, name, seeds in ((2, "ce", CE_SEEDS), (1, "bce", BCE_SEEDS)):
        for seed in seeds:
            torch.manual_seed(seed)
            model = build_model("cnn", outputs, 4)
            with torch.no_grad():  # random BatchNorm statistics, so that the models disagree and vary
                for m in model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.uniform_(-0.2, 0.2)
                        m.running_var.uniform_(0.5, 2.0)
            torch.save(model.state_dict(), tmp / f"{name}-{seed}.pth")
    return tmp


def _data(files) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels as load_pair reads them: normal first, (N, 1, 28, 28)."""
    normal, pneumonia = np.load(files / "normal.npy"), np.load(files / "pneumonia.npy")
    x = torch.from_numpy(np.concatenate([normal, pneumonia])).unsqueeze(1)
    y = torch.cat([torch.zeros(len(normal)), torch.ones(len(pneumonia))]).long()
    return x, y


def _probabilities(path: Path, images: list[torch.Tensor]) -> torch.Tensor:
    """(N, 2) class probabilities of the model in `path`, averaged over `images` (views of the same set)."""
    state = torch.load(path, weights_only=True)
    outputs = state["head.3.weight"].shape[0]
    model = build_model("cnn", outputs, 4)
    model.load_state_dict(state)
    model.eval()
    out = []
    with torch.no_grad():
        for x in images:
            logits = model(x)
            p = torch.sigmoid(logits[:, 0]) if outputs == 1 else torch.softmax(logits, 1)[:, 1]
            out.append(torch.stack([1 - p, p], 1))
    return torch.stack(out).mean(0)


def _draws(x: torch.Tensor, n: int, ranges=(AUGMENT_SHIFT, AUGMENT_ROTATE, AUGMENT_SCALE)) -> list[torch.Tensor]:
    """The identity and n explicit draws of the affine augmentation, draw k seeded TTA_SEED + k."""
    s = ExperimentSpec(augment_shift=ranges[0], augment_rotate=ranges[1], augment_scale=ranges[2])
    return [x] + [augment(x, s, torch.Generator().manual_seed(TTA_SEED + k)) for k in range(n)]


def _evaluate(files, weights, **options) -> dict:
    paths = [files / w for w in weights]
    return evaluate_weights(paths[0] if len(paths) == 1 else paths, files / "normal.npy", files / "pneumonia.npy",
                            device="cpu", decision=decision_from_options(**options))


def _cli(capsys, files, *args) -> tuple[int, str, str]:
    code = cli.main(["evaluate", "--normal", str(files / "normal.npy"), "--pneumonia", str(files / "pneumonia.npy"),
                     "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _between(scores: np.ndarray) -> float:
    """A threshold halfway between two middle scores: predictions split, and no score sits on it."""
    s = np.sort(scores)
    i = len(s) // 3
    return float((s[i] + s[i + 1]) / 2)


def test_defaults_are_the_recipe_files_augmentation():
    recipe = spec.load_file(RECIPE)[0]
    assert (AUGMENT_SHIFT, AUGMENT_ROTATE, AUGMENT_SCALE) == \
        (recipe.augment_shift, recipe.augment_rotate, recipe.augment_scale)
    assert tuple(default for _, default, _ in AUGMENT_OPTIONS) == (AUGMENT_SHIFT, AUGMENT_ROTATE, AUGMENT_SCALE)
    assert decision_from_options(tta="5").augment == (recipe.augment_shift, recipe.augment_rotate, recipe.augment_scale)
    # the options' limits are the spec's
    for (option, _, high), key in zip(AUGMENT_OPTIONS, ("augment_shift", "augment_rotate", "augment_scale"),
                                      strict=True):
        assert option == "--" + key.replace("_", "-") and spec._RANGES[key][:2] == (0, high)
    assert spec._RANGES["tta"][:2] == (0, MAX_TTA)


@pytest.mark.parametrize("name", ["ce", "bce"])
def test_equal_prior_predictions_are_score_above_the_prior(files, name):
    path = files / f"{name}-{(CE_SEEDS if name == 'ce' else BCE_SEEDS)[0]}.pth"
    x, y = _data(files)
    score = _probabilities(path, [x])[:, 1].numpy()
    prior = _between(score)
    r = _evaluate(files, [path.name], rule="equal-prior", prior=repr(prior))
    expected = (score > prior).astype(int)
    assert 0 < expected.sum() < len(expected)  # the rule splits the images
    assert r["predictions"]["y_pred"] == expected.tolist()
    assert r["accuracy"] == pytest.approx((expected == y.numpy()).mean())
    assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y.numpy(), expected))
    assert r["plain_accuracy"] == pytest.approx(((score > 0.5) == y.numpy()).mean())  # argmax, beside
    assert r["decision"]["rule"] == "equal-prior" and r["decision"]["threshold"] == prior


def test_tta_is_the_mean_probability_of_explicit_transforms(files):
    x, _ = _data(files)
    expected = _probabilities(files / "ce-0.pth", _draws(x, 3))[:, 1].numpy()
    r = _evaluate(files, ["ce-0.pth"], tta="3")
    assert np.allclose(r["predictions"]["y_score"], expected, atol=2e-6)
    assert r["predictions"]["y_pred"] == (expected > 0.5).astype(int).tolist()
    ranges = (0.1, 0.0, 0.05)
    expected = _probabilities(files / "ce-0.pth", _draws(x, 2, ranges))[:, 1].numpy()
    r = _evaluate(files, ["ce-0.pth"], tta="2", shift="0.1", rotate="0", scale="0.05")
    assert np.allclose(r["predictions"]["y_score"], expected, atol=2e-6)
    assert r["decision"]["augment"] == list(ranges)


@pytest.mark.parametrize("name", ["ce", "bce"])
def test_the_ensemble_is_the_mean_of_the_models_probabilities(files, name):
    x, y = _data(files)
    weights = [f"{name}-{s}.pth" for s in (CE_SEEDS if name == "ce" else BCE_SEEDS)]
    mean = torch.stack([_probabilities(files / w, [x]) for w in weights]).mean(0)[:, 1].numpy()
    r = _evaluate(files, weights)
    assert r["models"] == len(weights) and [m["weights"] for m in r["members"]] == [str(files / w) for w in weights]
    assert np.allclose(r["predictions"]["y_score"], mean, atol=2e-6)
    assert r["predictions"]["y_pred"] == (mean > 0.5).astype(int).tolist()
    assert r["plain_accuracy"] == r["accuracy"] == pytest.approx(((mean > 0.5) == y.numpy()).mean())
    # with TTA (the same draws for every model) and the equal-prior rule on the mean
    draws = _draws(x, 2)
    mean = torch.stack([_probabilities(files / w, draws) for w in weights]).mean(0)[:, 1].numpy()
    prior = _between(mean)
    r = _evaluate(files, weights, rule="equal-prior", prior=repr(prior), tta="2")
    assert np.allclose(r["predictions"]["y_score"], mean, atol=2e-6)
    assert r["predictions"]["y_pred"] == (mean > prior).astype(int).tolist()
    plain = torch.stack([_probabilities(files / w, [x]) for w in weights]).mean(0)[:, 1].numpy()
    assert r["plain_accuracy"] == pytest.approx(((plain > 0.5) == y.numpy()).mean())


def test_the_outputs_name_the_rule_the_ensemble_and_balanced_accuracy(files, capsys):
    code, out, _ = _cli(capsys, files, "--weights", files / "ce-0.pth", "--weights", files / "ce-1.pth",
                        "--decision", "equal-prior", "--prior", "0.6", "--tta", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("weights      ensemble of 2 models (CE: 2 outputs")
    assert "decision     equal-prior (P(pneumonia) > 0.600), TTA 2 draws + identity (shift 0.08, rotate 8 " in out
    assert "; plain argmax " in next(line for line in lines if line.startswith("accuracy"))
    assert any(line.startswith("balanced acc ") for line in lines)
    code, out, _ = _cli(capsys, files, "--weights", files / "ce-0.pth", "--weights", files / "ce-1.pth",
                        "--decision", "equal-prior", "--prior", "0.6", "--tta", "2", "--json")
    r = json.loads(out)
    assert code == 0 and r["models"] == 2
    assert r["decision"]["rule"] == "equal-prior" and r["decision"]["prior"] == 0.6 and r["decision"]["tta"] == 2
    assert {"plain_accuracy", "balanced_accuracy"} <= set(r)
    assert r["balanced_accuracy"] == pytest.approx((r["sensitivity"] + r["specificity"]) / 2)


def test_no_options_is_the_plain_argmax_of_one_model(files, capsys):
    """The course-loop case: one --weights, no options, predictions are the argmax of the logits."""
    x, y = _data(files)
    state = torch.load(files / "ce-1.pth", weights_only=True)
    model = build_model("cnn", 2, 4)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        predicted = model(x).max(1)[1]
    code, out, _ = _cli(capsys, files, "--weights", files / "ce-1.pth", "--json")
    r = json.loads(out)
    assert code == 0 and r["accuracy"] == (predicted == y).sum().item() / len(y)
    assert r["plain_accuracy"] == r["accuracy"] and r["models"] == 1
    assert r["decision"] == {"rule": "argmax", "threshold": 0.5, "prior": None, "tta": 0, "augment": None,
                             "text": "argmax"}
    code, out, _ = _cli(capsys, files, "--weights", files / "ce-1.pth")
    assert code == 0 and "ensemble" not in out and "plain argmax" not in out
    assert [line[:13] for line in out.splitlines()] == [
        "weights      ", "images       ", "decision     ", "accuracy     ", "balanced acc ", "sensitivity  ",
        "specificity  ", "AUROC        ", "confusion    ", "             ", "             "]
    assert f"weights      {files / 'ce-1.pth'} (cnn, width 4, CE: 2 outputs) on cpu" in out


@pytest.mark.parametrize(("args", "expected"), [
    (("--decision", "max"), "--decision max: allowed values are argmax, equal-prior"),
    (("--decision", "equal-prior"), "--decision equal-prior needs --prior P"),
    (("--decision", "equal-prior", "--prior", "1"), "--prior 1: expected a number in (0, 1)"),
    (("--decision", "equal-prior", "--prior", "0"), "--prior 0: expected a number in (0, 1)"),
    (("--decision", "equal-prior", "--prior", "nan"), "--prior nan: expected a number in (0, 1)"),
    (("--decision", "equal-prior", "--prior", "half"), "--prior half: expected a number in (0, 1)"),
    (("--prior", "0.7"), "--prior 0.7: applies only to --decision equal-prior"),
    (("--tta", "65"), "--tta 65: expected an integer in 0..64"),
    (("--tta", "-1"), "--tta -1: expected an integer in 0..64"),
    (("--tta", "2.5"), "--tta 2.5: expected an integer in 0..64"),
    (("--augment-rotate", "4"), "--augment-rotate: applies only with --tta N, N > 0"),
    (("--tta", "0", "--augment-shift", "0.1"), "--augment-shift: applies only with --tta N, N > 0"),
    (("--tta", "4", "--augment-rotate", "181"), "--augment-rotate 181: expected a number in [0, 180]"),
    (("--tta", "4", "--augment-shift", "-0.1"), "--augment-shift -0.1: expected a number in [0, 0.5]"),
    (("--tta", "4", "--augment-scale", "inf"), "--augment-scale inf: expected a number in [0, 0.5]"),
    (("--tta", "4", "--augment-shift", "0", "--augment-rotate", "0", "--augment-scale", "0"),
     "--tta 4: --augment-shift, --augment-rotate and --augment-scale are all 0"),
    (("--decision", "equal-prior\nsecond line"), "--decision 'equal-prior\\nsecond line'"),
    (("--weights", "bce-3.pth"), "bce-3.pth: 1 output (bce) but "),
    (("--weights", "ce-0.pth"), "ce-0.pth: given twice to --weights"),
    (("--weights", "missing.pth"), "missing.pth: no such weights file"),
])
def test_bad_options_are_one_line_and_exit_2(files, capsys, args, expected):
    args = [str(files / a) if a.endswith(".pth") else a for a in args]
    code, out, err = _cli(capsys, files, "--weights", files / "ce-0.pth", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("cxr-bench evaluate: error: ") and expected in err, err


def test_a_member_that_cannot_run_is_named(files, monkeypatch, capsys):
    """A model of the ensemble that fails on the images (e.g. too small for it) is one line naming its file."""
    from cxr import evaluate

    real, calls = evaluate.class_probabilities, []

    def second_fails(model, x, device, decision):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("Given input size: (16x1x1). Calculated output size: (16x0x0)")
        return real(model, x, device, decision)

    monkeypatch.setattr(evaluate, "class_probabilities", second_fails)
    code, out, err = _cli(capsys, files, "--weights", files / "ce-0.pth", "--weights", files / "ce-1.pth")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{files / 'ce-1.pth'}: the model cannot run on images of shape (1, 28, 28)" in err


def test_the_options_are_checked_before_any_file_is_read(files, capsys):
    with pytest.raises(EvaluateError, match="--tta"):
        decision_from_options(tta="100")
    assert decision_from_options().plain and decision_from_options(tta="0").plain
    d = decision_from_options("equal-prior", "0.742", "8")
    assert (d.rule, d.prior, d.tta, d.augment) == ("equal-prior", 0.742, 8, (0.08, 8.0, 0.08))
    code = cli.main(["evaluate", "--weights", str(files / "nowhere.pth"), "--normal", "nowhere.npy",
                     "--pneumonia", "nowhere.npy", "--tta", "x"])
    assert code == 2 and capsys.readouterr().err == "cxr-bench evaluate: error: --tta x: expected an integer in " \
        "0..64 (0 = off)\n"
