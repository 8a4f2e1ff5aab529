"""Sweep fusion (cxr.engine, cxr.kernels): which runs form a group, and that a member of a group trains as its lone run
does: the same initial weights and batch order, the same first-step loss (1e-6 relative) and first epoch
(1e-3), the same results over a full run within the seed-to-seed spread, its own divergence, and
deterministic CPU training. Both kernels are tested here on the CPU: "grouped" (what CUDA runs) and
"loop" (the CPU default, which is the lone step exactly)."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace

import pytest
import torch

from cxr import cli, engine, kernels, losses, sweep, unit
from cxr.evaluate import predict_logits
from cxr.models import build_model
from cxr.spec import ExperimentSpec

SPEC = ExperimentSpec(name="f", epochs=2, batch_size=32, width=4)
# members differ in seed, lr, loss (1- and 2-logit heads), optimizer, schedule, EMA, smoothing, selection
MIXED = [
    replace(SPEC, seed=0, loss="bce"),
    replace(SPEC, seed=1, loss="ce", lr=0.003, label_smoothing=0.1),
    replace(SPEC, seed=2, loss="focal", class_weight="balanced", select="accuracy"),
    replace(SPEC, seed=3, loss="ce", optimizer="sgd", lr=0.05, schedule="cosine", ema=0.9),
    replace(SPEC, seed=4, loss="ce", optimizer="adamw", weight_decay=0.01, decision="equal-prior"),
]


def _strip(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ------------------------------------------------------------------------------------------- groups

def test_groups_join_runs_that_share_a_step_and_keep_the_rest_alone():
    a = [replace(SPEC, seed=s, lr=lr) for s in (0, 1) for lr in (0.001, 0.01)]
    other_batch = replace(SPEC, batch_size=64)
    resnet = replace(SPEC, model="resnet18")
    not_fused = replace(SPEC, seed=7, fuse=False)
    augmented = replace(SPEC, seed=8, augment_shift=0.1)
    units = sweep.groups([a[0], other_batch, a[1], resnet, a[2], not_fused, a[3], augmented])
    assert units == [[a[0], a[1], a[2], a[3]], [other_batch], [resnet], [not_fused], [augmented]]
    assert sweep.groups(a, fuse=False) == [[s] for s in a]
    assert sweep.groups(a, max_members=3) == [a[:3], a[3:]]
    assert kernels.fusion_key(resnet) is None and kernels.fusion_key(not_fused) is None


def test_fuse_is_bookkeeping_not_recipe():
    assert replace(SPEC, fuse=False).spec_hash() == SPEC.spec_hash()
    assert replace(SPEC, fuse=False).id == SPEC.id


def test_a_spec_file_may_turn_fusion_off(tmp_path):
    from cxr import spec as spec_mod

    (specs,) = spec_mod.parse("[experiment]\nname = 'x'\nfuse = false\n", tmp_path / "x.toml")
    assert specs.fuse is False
    with pytest.raises(spec_mod.SpecError, match="fuse = 1: expected true or false"):
        spec_mod.parse("[experiment]\nname = 'x'\nfuse = 1\n", tmp_path / "x.toml")
    with pytest.raises(spec_mod.SpecError, match="unknown grid key grid.fuse"):
        spec_mod.parse("[experiment]\nname = 'x'\n[grid]\nfuse = [true, false]\n", tmp_path / "x.toml")


# ------------------------------------------------------------------------------------- equivalence

def test_a_member_starts_from_its_lone_runs_weights_and_batch_order(tiny_data):
    y = tiny_data.train.y
    for spec in MIXED:
        member = engine.Member(spec, tiny_data, y, torch.device("cpu"))
        engine.seed_everything(spec.seed)
        lone = build_model(spec.model, spec.num_outputs, spec.width)
        for (k, a), b in zip(member.model.state_dict().items(), lone.state_dict().values(), strict=True):
            assert torch.equal(a, b), (spec.seed, k)
        g = torch.Generator().manual_seed(spec.seed)
        assert torch.equal(torch.randperm(len(y), generator=member.generator), torch.randperm(len(y), generator=g))


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_first_step_loss_matches_the_lone_run(tiny_data, kernel):
    x, y, dev = tiny_data.train.x, tiny_data.train.y, torch.device("cpu")
    members = [engine.Member(s, tiny_data, y, dev) for s in MIXED]
    perms = torch.stack([torch.randperm(len(y), generator=mb.generator) for mb in members])
    step = engine.Step(members, x, y, dev, SPEC.batch_size, kernel=kernel)
    step(perms[:, :SPEC.batch_size])
    fused_losses = (step.loss_sum / SPEC.batch_size).tolist()
    for spec, got in zip(MIXED, fused_losses, strict=True):
        lone_member = engine.Member(spec, tiny_data, y, dev)  # a lone run: a group of one, loop kernel
        lone = engine.Step([lone_member], x, y, dev, SPEC.batch_size, kernel="loop")
        lone(torch.randperm(len(y), generator=lone_member.generator)[:SPEC.batch_size].unsqueeze(0))
        expected = float(lone.loss_sum[0]) / SPEC.batch_size
        assert got == pytest.approx(expected, rel=1e-6, abs=0), spec.loss


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_first_epoch_matches_the_lone_run(tiny_data, kernel):
    specs = [replace(s, epochs=1) for s in MIXED]
    fits = engine.fit(specs, tiny_data, "cpu", progress=False, kernel=kernel)
    for spec, f in zip(specs, fits, strict=True):
        lone = engine.fit(spec, tiny_data, "cpu", progress=False)
        (a,), (b,) = _strip(f.history), _strip(lone.history)
        if kernel == "loop":  # the lone step itself: the same numbers, bit for bit
            assert a == b
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-3), (spec.seed, key)
        assert f.fused_with == [s.run_id for s in specs if s is not spec]


def test_loop_kernel_is_the_lone_run_exactly(tiny_data):
    fits = engine.fit(MIXED, tiny_data, "cpu", progress=False, kernel="loop")
    for spec, f in zip(MIXED, fits, strict=True):
        lone = engine.fit(spec, tiny_data, "cpu", progress=False)
        assert _strip(f.history) == _strip(lone.history) and f.best_epoch == lone.best_epoch
        for (k, a), b in zip(f.model.state_dict().items(), lone.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), k


def test_grouped_training_is_deterministic_on_cpu(tiny_data):
    a = engine.fit(MIXED, tiny_data, "cpu", progress=False, kernel="grouped")
    b = engine.fit(MIXED, tiny_data, "cpu", progress=False, kernel="grouped")
    for fa, fb in zip(a, b, strict=True):
        assert _strip(fa.history) == _strip(fb.history)
        for (k, va), vb in zip(fa.model.state_dict().items(), fb.model.state_dict().values(), strict=True):
            assert torch.equal(va, vb), k


def test_returned_models_own_their_statistics(tiny_data):
    """After a grouped run each member's BatchNorm buffers are its own tensors (not views of the group's),
    so its saved weights hold only its own numbers."""
    fits = engine.fit(MIXED[:2], tiny_data, "cpu", progress=False, kernel="grouped")
    for spec, f in zip(MIXED[:2], fits, strict=True):
        bn, lone = f.model.features[2], engine.fit(spec, tiny_data, "cpu", progress=False).model.features[2]
        assert bn.running_mean.untyped_storage().nbytes() == bn.running_mean.numel() * 4
        assert int(bn.num_batches_tracked) == int(lone.num_batches_tracked) > 0
        torch.testing.assert_close(bn.running_var, lone.running_var, rtol=1e-3, atol=1e-4)


def test_fused_evaluation_matches_each_model_alone(tiny_data):
    models = []
    for seed, outputs in ((0, 1), (1, 2), (2, 2)):
        torch.manual_seed(seed)
        m = build_model("cnn", outputs, 4)
        m.train()
        m(tiny_data.train.x[:64])  # move the BatchNorm statistics away from their initial values
        models.append(m)
    got = kernels.fused_logits(models, tiny_data.val.x, torch.device("cpu"), batch_size=40)
    for m, g in zip(models, got, strict=True):
        torch.testing.assert_close(g, predict_logits(m, tiny_data.val.x, torch.device("cpu")), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_a_diverging_member_stops_alone(tiny_data, kernel, monkeypatch):
    """The BCE member's loss turns NaN in epoch 2: it is stopped as diverged there, and the CE member
    trains on, as it would alone (the loop kernel: exactly; grouped: to 1e-3)."""
    calls = {"n": 0}
    real = losses.LOSSES["bce"]

    def exploding(logits, y, spec, class_weights=None):
        calls["n"] += 1
        loss = real.train_loss(logits, y, spec, class_weights)
        return loss * float("nan") if calls["n"] > 12 else loss  # epoch 2 of 8 batches per epoch

    monkeypatch.setitem(losses.LOSSES, "bce", replace(real, train_loss=exploding))
    good, bad = replace(SPEC, seed=0, epochs=4), replace(SPEC, seed=1, epochs=4, loss="bce")
    fits = engine.fit([good, bad], tiny_data, "cpu", progress=False, kernel=kernel)
    assert fits[1].status == "diverged" and "non-finite training loss in epoch 2" in fits[1].error
    assert fits[1].model is None and len(fits[1].history) == 2 and fits[1].history[-1]["train_loss"] is None
    alone = engine.fit(good, tiny_data, "cpu", progress=False)
    assert fits[0].status == "ok" and len(fits[0].history) == 4
    for a, b in zip(_strip(fits[0].history), _strip(alone.history), strict=True):
        if kernel == "loop":
            assert a == b
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)


@pytest.mark.slow
def test_fused_and_lone_runs_agree_within_the_seed_spread(tiny_data):
    """Three seeds trained fused (grouped kernel) and alone for 8 epochs: the mean test accuracy and
    loss of the two differ by less than the spread between seeds."""
    specs = [replace(SPEC, seed=s, epochs=8, lr=0.003) for s in range(3)]
    fused_recs = unit.train_unit(specs, tiny_data, "cpu", kernel="grouped")
    lone_recs = [unit.train_unit([s], tiny_data, "cpu")[0] for s in specs]
    for key in ("accuracy", "loss"):
        f = [t.record.metrics["test"][key] for t in fused_recs]
        lone = [t.record.metrics["test"][key] for t in lone_recs]
        spread = max(statistics.stdev(lone), statistics.stdev(f), 1 / len(tiny_data.test.y))
        assert abs(statistics.mean(f) - statistics.mean(lone)) <= spread, (key, f, lone)


# ------------------------------------------------------------------------------------ the command

def _spec_file(tmp_path, extra=""):
    path = tmp_path / "sweep.toml"
    path.write_text("[experiment]\nname = 'sw'\nepochs = 1\nwidth = 4\nseeds = [0, 1]\n" + extra +
                    "[grid]\nlr = [0.001, 0.01]\n")
    return path


def _suite_split(store):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "suite-split.py"
    spec = importlib.util.spec_from_file_location("suite_split", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.split(store)


@pytest.mark.parametrize("native, precision, batch, expected", [
    (True, "auto", 32, "grouped"), (True, "bf16", 64, "grouped"), (True, "auto", 128, "loop"),
    (True, "fp32", 32, "loop"), (False, "auto", 32, "loop"), (False, "bf16", 32, "grouped"),
])
def test_the_cpu_default_kernel_is_grouped_for_bf16_at_small_batches_only(monkeypatch, native, precision, batch,
                                                                           expected):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    monkeypatch.setattr("cxr.env.bf16_native", lambda device_type: native)
    spec = ExperimentSpec(name="k", precision=precision, batch_size=batch)
    assert kernels.default_kernel(torch.device("cpu"), spec) == expected
    assert kernels.choose([spec, replace(spec, seed=1)], torch.device("cpu")) == expected
    assert kernels.choose([spec], torch.device("cpu")) == "loop"  # a lone run
    monkeypatch.setenv(kernels.KERNEL_ENV, "loop")
    assert kernels.choose([spec, replace(spec, seed=1)], torch.device("cpu")) == "loop"


def test_cxr_bench_run_fuses_by_default_and_stores_ordinary_results(tmp_path, capsys, monkeypatch):
    from tests.conftest import learnable_npz

    monkeypatch.setenv(kernels.KERNEL_ENV, "loop")  # the exact kernel; the CPU default is machine-dependent

    npz = learnable_npz(tmp_path / "d.npz")
    base = ["run", str(_spec_file(tmp_path)), "--data", f"npz:{npz}"]
    assert cli.main([*base, "--out", str(tmp_path / "fused")]) == 0
    out = capsys.readouterr().out
    assert "4 runs ->" in out and "4 of them in 1 fused group" in out
    lines = [line for line in out.splitlines() if "(fused with 3 other runs; its share of the group's " in line]
    assert len(lines) == 4
    for line in lines:  # the run's own time is a quarter of the group's
        own, group = (float(t) for t in re.findall(r"(\d+\.\d)s\b", line))
        assert own == pytest.approx(group / 4, abs=0.06)
    assert cli.main([*base, "--out", str(tmp_path / "alone"), "--no-fuse"]) == 0
    assert "fused" not in capsys.readouterr().out
    files = sorted(p.relative_to(tmp_path / "fused") for p in (tmp_path / "fused").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "alone") for p in (tmp_path / "alone").rglob("*") if p.is_file())
    for path in (tmp_path / "fused" / "runs").glob("*/seed-*.json"):
        rec, alone = json.loads(path.read_text()), json.loads((tmp_path / "alone" / path.relative_to(
            tmp_path / "fused")).read_text())
        assert len(rec["timing"]["fused_with"]) == 3 and rec["timing"]["fused_kernel"] == "loop"
        assert "fused_with" not in alone["timing"]
        assert rec["identity"] == alone["identity"]
        assert rec["metrics"] == alone["metrics"]  # the CPU's loop kernel is the lone run exactly
    # scripts/suite-split.py (gpu-check's time split) counts the group's training once
    fused_split, alone_split = (_suite_split(tmp_path / d) for d in ("fused", "alone"))
    assert (fused_split["trained"], fused_split["units"], alone_split["units"]) == (4, 1, 4)
    one = json.loads(next((tmp_path / "fused" / "runs").glob("*/seed-*.json")).read_text())["timing"]
    assert fused_split["training"] == one["train_seconds"]
    assert alone_split["training"] == pytest.approx(sum(
        json.loads(p.read_text())["timing"]["train_seconds"] for p in (tmp_path / "alone" / "runs").glob("*/*.json")))
    assert fused_split["validation"] > 0 and alone_split["evaluation"] > 0
    # a selection that takes part of a group fuses only what it took
    assert cli.main([*base, "--out", str(tmp_path / "part"), "-k", "lr0.01"]) == 0
    part = [json.loads(p.read_text()) for p in (tmp_path / "part" / "runs").glob("*/seed-*.json")]
    assert len(part) == 2 and all(len(r["timing"]["fused_with"]) == 1 for r in part)


def test_runs_of_one_identity_in_a_group_train_once(tmp_path, tiny_data):
    a = replace(SPEC, name="a", epochs=1)
    b = replace(SPEC, name="b", epochs=1)  # same recipe under another id: Task A's CE run is Task B's
    other = replace(SPEC, name="a", epochs=1, lr=0.01, sweep=("lr",))
    recs = sweep.run_group([a, other, b], tmp_path, "cpu", data=tiny_data, progress=False)
    assert [r.cached for r in recs] == [False, False, True] and recs[2].reused_from == a.id
    assert recs[0].timing_of("fused_with") == [other.run_id]  # b was not trained a second time
    again = sweep.run_group([a, other, b], tmp_path, "cpu", data=tiny_data, progress=False, rerun=True)
    assert again[2].reused_from == a.id and again[2].metrics == again[0].metrics


# ------------------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_cuda_fused_group_captures_one_graph_and_trains_like_lone_runs(tiny_data, kernel):
    """On CUDA the group's step (every member: forward, loss, backward, optimizer) is one captured graph;
    each member's epochs follow its lone CUDA run (bf16 autocast: a looser tolerance than on the CPU)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    specs = [replace(s, epochs=3) for s in MIXED if s.optimizer in ("adam", "adamw")]
    fits = engine.fit(specs, tiny_data, "cuda", progress=False, kernel=kernel)
    for spec, f in zip(specs, fits, strict=True):
        assert f.status == "ok" and f.cuda_graph and f.capture_error is None and f.fused_kernel == kernel
        lone = engine.fit(spec, tiny_data, "cuda", progress=False)
        for a, b in zip(f.history, lone.history, strict=True):
            assert a["lr"] == b["lr"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)
    recs = unit.train_unit(specs, tiny_data, "cuda", kernel=kernel)  # batched evaluation on the GPU
    assert all(t.record.ok and t.record.metrics["test"]["accuracy"] > 0.5 for t in recs)


def test_a_failing_group_trains_its_runs_alone(tiny_data, monkeypatch, capsys, tmp_path):
    """A fault of fusion (here: engine.fit raising for the group) must not cost the runs: each trains alone,
    and its record says why (timing.fused_error)."""
    specs = [replace(SPEC, seed=s, epochs=1) for s in (0, 1)]

    real_fit = engine.fit

    def broken(specs, *args, **kwargs):  # a group of several raises; a lone run trains
        if isinstance(specs, list) and len(specs) > 1:
            raise RuntimeError("grouped kernel exploded")
        return real_fit(specs, *args, **kwargs)

    monkeypatch.setattr(engine, "fit", broken)
    trained = unit.train_unit(specs, tiny_data, "cpu", progress=False)
    assert "a fused group of 2 runs failed (RuntimeError: grouped kernel exploded); training them one by one" \
        in capsys.readouterr().err
    lone = [unit.train_unit([s], tiny_data, "cpu", progress=False)[0] for s in specs]
    for t, alone in zip(trained, lone, strict=True):
        assert t.record.ok and t.record.timing["fused_error"] == "RuntimeError: grouped kernel exploded"
        assert "fused_with" not in t.record.timing
        assert t.record.metrics == alone.record.metrics
    # stored and read back through the schema, as any result file
    recs = sweep.run_group(specs, tmp_path, "cpu", data=tiny_data, progress=False)
    assert all(r.ok and r.timing_of("fused_error") for r in recs)
    again = sweep.run_group(specs, tmp_path, "cpu", data=tiny_data, progress=False)
    assert all(r.cached for r in again)


def test_a_failing_batched_evaluation_falls_back_to_each_model(tiny_data, monkeypatch):
    monkeypatch.setattr(kernels, "evaluates_together", lambda kernel, device: kernel == "grouped")  # as on CUDA
    specs = [replace(SPEC, seed=s, epochs=1) for s in (0, 1)]
    batched = unit.train_unit(specs, tiny_data, "cpu", progress=False, kernel="grouped")

    def broken(*args, **kwargs):
        raise RuntimeError("no memory for the batched forward")

    monkeypatch.setattr(kernels, "fused_logits", broken)
    alone = unit.train_unit(specs, tiny_data, "cpu", progress=False, kernel="grouped")
    for a, b in zip(alone, batched, strict=True):
        assert a.record.ok
        for split in ("val", "test"):
            assert a.record.metrics[split]["accuracy"] == pytest.approx(b.record.metrics[split]["accuracy"], abs=1e-9)


def test_a_cpu_group_evaluates_its_models_one_by_one(tiny_data, monkeypatch):
    """On a CPU an fp32 grouped convolution is slower than the models one by one (kernels.evaluates_together):
    neither validation nor the final evaluation of a grouped unit uses the batched forward there."""
    def broken(*args, **kwargs):
        raise AssertionError("fused_logits called on a CPU")

    monkeypatch.setattr(kernels, "fused_logits", broken)
    specs = [replace(SPEC, seed=s, epochs=2) for s in (0, 1)]
    trained = unit.train_unit(specs, tiny_data, "cpu", progress=False, kernel="grouped")
    assert [t.record.timing.get("fused_kernel") for t in trained] == ["grouped", "grouped"]
    assert all(t.record.ok and "fused_error" not in t.record.timing for t in trained)
