"""Training arithmetic on the CPU: the spec's `precision` (auto, fp32, bf16), what the record says was used,
channels-last models and data, and torch's fused optimizers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cxr import engine, env, kernels, recipe, sweep
from cxr import spec as spec_mod
from cxr.spec import ExperimentSpec

SPEC = ExperimentSpec(name="p", epochs=2, batch_size=32, width=4)


def test_precision_is_a_recipe_key_that_keeps_old_hashes_at_its_default(tmp_path):
    (auto,) = spec_mod.parse('[experiment]\nname = "p"\n', tmp_path / "p.toml")
    (bf16,) = spec_mod.parse('[experiment]\nname = "p"\nprecision = "bf16"\n', tmp_path / "p.toml")
    assert auto.precision == "auto" and "precision" not in auto.recipe()  # stored hashes hold
    assert bf16.spec_hash() != auto.spec_hash()
    swept = spec_mod.parse('[experiment]\nname = "p"\n[grid]\nprecision = ["fp32", "bf16"]\n', tmp_path / "p.toml")
    assert [s.id for s in swept] == ["p-ce-lr0.001-bs32-fp32", "p-ce-lr0.001-bs32-bf16"]
    with pytest.raises(spec_mod.SpecError, match="precision = 'fp16': allowed values are auto, fp32, bf16"):
        spec_mod.parse('[experiment]\nname = "p"\nprecision = "fp16"\n', tmp_path / "p.toml")


def test_auto_is_bf16_only_where_the_device_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(env, "bf16_native", lambda device_type, n=native: n)
        assert env.resolve_precision("auto", cpu) == expected
        assert env.resolve_precision("fp32", cpu) == "fp32" and env.resolve_precision("bf16", cpu) == "bf16"


def test_the_record_says_what_was_used_and_bf16_changes_the_arithmetic(tiny_data, tmp_path):
    fp32, bf16, auto = (sweep.run(replace(SPEC, precision=p), tmp_path / p, "cpu", data=tiny_data, progress=False)
                        for p in ("fp32", "bf16", "auto"))
    assert (fp32.timing["precision"], bf16.timing["precision"]) == ("fp32", "bf16")
    assert auto.timing["precision"] == ("bf16" if env.bf16_native("cpu") else "fp32")
    assert fp32.history[0]["train_loss"] != bf16.history[0]["train_loss"]  # autocast was on
    assert abs(fp32.history[0]["train_loss"] - bf16.history[0]["train_loss"]) < 0.05  # and nothing else changed
    assert fp32.identity != bf16.identity


def test_models_and_training_images_are_channels_last_and_optimizers_fused_on_the_cpu(tiny_data):
    member = engine.Member(SPEC, tiny_data, tiny_data.train.y, torch.device("cpu"))
    conv = next(m for m in member.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for name in ("adam", "adamw", "sgd"):
        opt = recipe.make_optimizer(replace(SPEC, optimizer=name), [torch.zeros(2, requires_grad=True)],
                                    torch.device("cpu"))
        assert opt.defaults.get("fused") == bool(recipe._fused(type(opt), True)), name
    assert recipe._fused(torch.optim.Adam, True) == {"fused": True}  # torch 2.13 has it


def test_runs_of_different_precision_do_not_share_a_group():
    a, b = replace(SPEC, precision="fp32"), replace(SPEC, precision="bf16", seed=1)
    assert kernels.fusion_key(a) != kernels.fusion_key(b)
    assert [len(u) for u in sweep.groups([a, b, replace(a, seed=2)])] == [2, 1]
