"""The PneumoniaMNIST recipe (specs/recipes/pneumoniamnist.toml) and the option it added: an
exponential moving average of the weights (`ema`), which leaves the course's specs and hashes as they were."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cxr import data, engine, recipe, results, spec, sweep
from cxr.models import infer_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "specs" / "recipes" / "pneumoniamnist.toml"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_recipe_loads_with_three_seeds_and_the_documented_settings():
    specs = spec.load_file(RECIPE)
    assert [s.seed for s in specs] == [0, 1, 2] and len({s.id for s in specs}) == 1
    s = specs[0]
    assert (s.dataset, s.image_size, s.model, s.loss, s.optimizer, s.schedule, s.select) == (
        "pneumoniamnist", 28, "vgg", "ce", "adamw", "onecycle", "auroc")
    assert s.weight_decay > 0 and s.label_smoothing > 0 and 0 < s.ema < 1
    assert s.augment_shift > 0 and s.augment_rotate > 0 and s.augment_scale > 0
    assert (s.decision, s.tta, s.class_weight) == ("equal-prior", 15, "none")  # fixed rules, see the file


def test_recipe_is_not_part_of_the_default_suite():
    assert not any(s.source == str(RECIPE) or s.name == "recipe" for s in spec.load([ROOT / "specs"]))


def test_recipe_settings_train_one_epoch_on_tiny_data(tiny_data, tmp_path):
    s = replace(spec.load_file(RECIPE)[0], epochs=1, batch_size=32)
    r = sweep.run(s, tmp_path, "cpu", data=tiny_data, progress=False)
    assert r.status == "ok" and r.best_epoch == 1 and r.spec["ema"] == s.ema
    assert 0 <= r.test("auroc") <= 1 and len(r.predictions["y_score"]) == tiny_data.test.n
    # the saved (averaged) weights are a plain state dict that `cxr-bench evaluate` can load
    weights = torch.load(tmp_path / r.weights, weights_only=True)
    name, outputs, width, _ = infer_model(weights)
    assert (name, outputs, width) == ("vgg", 2, 16)
    assert results.find(tmp_path, s).spec_hash == s.spec_hash()


@pytest.mark.shared_data
def test_recipe_command_line_source_on_the_shared_file():
    if not (SHARED / "pneumoniamnist-trainval.npz").exists():
        pytest.skip(f"{SHARED} is absent (the shared data sits beside the checkout)")
    source = f"npz:{SHARED / 'pneumoniamnist-trainval.npz'}?holdout=0.5"
    s = spec.override(spec.load_file(RECIPE)[0], dataset=source)
    d = data.load(s.dataset, s.image_size)
    assert d.test.n == 262 and "held out" in d.summary()["name"]


# --- ema ------------------------------------------------------------------------------------------

def test_default_spec_hash_is_unchanged_by_the_ema_field():
    # The hash every result store made before `ema` existed; a spec without ema must keep it.
    assert spec.ExperimentSpec().spec_hash() == "ce5c5d252d80a65d"
    assert "ema" not in spec.ExperimentSpec().recipe() and spec.ExperimentSpec(ema=0.9).recipe()["ema"] == 0.9
    assert spec.ExperimentSpec(ema=0.9).spec_hash() != spec.ExperimentSpec().spec_hash()
    for s in spec.load([ROOT / "specs"]):
        assert s.ema == 0.0 and "ema" not in s.recipe()


@pytest.mark.parametrize("value, message", [(1, r"must be in \[0, 1\)"), (-0.1, "must be in"),
                                            ("0.9", "expected a number"), (True, "expected a float")])
def test_ema_is_validated(value, message):
    toml = f"[experiment]\nema = {value!r}".replace("True", "true").replace("'", '"')
    with pytest.raises(spec.SpecError, match=f"x.toml: experiment.ema = .*{message}"):
        spec.parse(toml, "x.toml")
    assert spec.parse("[experiment]\nema = 0.99\n[grid]\nlr = [0.1]")[0].id == "experiment-ce-lr0.1-bs32"


def test_ema_model_averages_weights_and_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    ema = recipe.ema_model(model, 0.75)
    for value in (4.0, 8.0):  # the first update copies, then ema = 0.75 ema + 0.25 new
        model[0].weight.data.fill_(value)
        model[1].running_mean.fill_(value)
        ema.update_parameters(model)
    assert ema.module[0].weight.item() == 5.0 and ema.module[1].running_mean.item() == 5.0


def test_fit_with_ema_validates_and_returns_the_average(tiny_data):
    base = spec.ExperimentSpec(epochs=2, width=4, select="last")
    plain = engine.fit(base, tiny_data, "cpu", progress=False)
    averaged = engine.fit(replace(base, ema=0.9), tiny_data, "cpu", progress=False)
    # same training trajectory (the average does not feed back), different validated model
    assert [h["train_loss"] for h in averaged.history] == [h["train_loss"] for h in plain.history]
    assert averaged.history[-1]["val_loss"] != plain.history[-1]["val_loss"]
    assert type(averaged.model) is type(plain.model) and not averaged.model.training
    assert set(averaged.model.state_dict()) == set(plain.model.state_dict())
    differs = [not torch.equal(a, b) for a, b in zip(averaged.model.state_dict().values(),
                                                    plain.model.state_dict().values(), strict=True)]
    assert any(differs)
    # a decay of (almost) 0 follows the weights: the average is the model itself
    follow = engine.fit(replace(base, ema=1e-12), tiny_data, "cpu", progress=False)
    for a, b in zip(follow.model.state_dict().values(), plain.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


@pytest.mark.cuda
def test_recipe_settings_with_ema_on_cuda(tiny_data):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    s = replace(spec.load_file(RECIPE)[0], epochs=2, batch_size=32)
    fitted = engine.fit(s, tiny_data, "cuda", progress=False)
    assert fitted.status == "ok" and next(fitted.model.parameters()).is_cuda
    no_aug = replace(s, augment_shift=0.0, augment_rotate=0.0, augment_scale=0.0)  # the CUDA-graph path
    assert engine.fit(no_aug, tiny_data, "cuda", progress=False).status == "ok"
