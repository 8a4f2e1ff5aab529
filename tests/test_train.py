"""The training engine: determinism, model selection on validation, divergence, failures, the
results store (skip, reuse, kill-and-resume), and the recipe options (schedules, augmentation,
label smoothing)."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cxr import engine, losses, recipe, record, results, sweep, unit
from cxr.spec import ExperimentSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ExperimentSpec(name="t", epochs=3, batch_size=32, width=4)


def test_same_spec_and_seed_give_identical_runs_on_cpu(tiny_data):
    a = engine.fit(SPEC, tiny_data, "cpu", progress=False)
    b = engine.fit(SPEC, tiny_data, "cpu", progress=False)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b.history]
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    c = engine.fit(replace(SPEC, seed=1), tiny_data, "cpu", progress=False)
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]


@pytest.mark.parametrize("name", ["cnn", "vgg"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_pooling_before_relu_computes_what_relu_before_pooling_does(name, bf16):
    """ConvNet pools before its ReLU (a quarter of the pixels to rectify); max and ReLU commute, so outputs,
    BatchNorm statistics and gradients are bit for bit those of the usual conv-BN-ReLU-pool order."""
    from torch import nn

    from cxr.models import build_model
    torch.manual_seed(0)
    ours = build_model(name, 2, 4).to(memory_format=torch.channels_last)
    usual = copy.deepcopy(ours)
    layers = list(usual.features)
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, nn.MaxPool2d):  # ..., BN, pool, ReLU -> ..., BN, ReLU, pool
            layers[i], layers[i + 1] = layers[i + 1], layer
    usual.features = nn.Sequential(*layers)
    pools = [i for i, m in enumerate(usual.features) if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(isinstance(usual.features[i - 1], nn.ReLU) for i in pools)
    x = torch.rand(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    outs = []
    for model in (ours, usual):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().square().sum().backward()
        outs.append((out, [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]))
    (a, grads_a, bufs_a), (b, grads_b, bufs_b) = outs
    assert torch.equal(a, b)
    assert all(torch.equal(g, h) for g, h in zip(grads_a, grads_b, strict=True))
    assert all(torch.equal(g, h) for g, h in zip(bufs_a, bufs_b, strict=True))


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_both_losses_learn_the_toy_task(tiny_data, loss):
    spec = replace(SPEC, loss=loss, epochs=6, lr=0.01, width=8)
    fitted = engine.fit(spec, tiny_data, "cpu", progress=False)
    assert fitted.status == "ok"
    assert fitted.history[-1]["train_loss"] < fitted.history[0]["train_loss"]
    assert fitted.model.head[-1].out_features == (1 if loss == "bce" else 2)


def test_best_epoch_is_chosen_on_validation_and_test_is_touched_once(tiny_data, tmp_path, monkeypatch):
    seen = []
    real = unit.evaluate_split

    def spy(model, x, y, device, *args, **kwargs):
        seen.append("test" if x is tiny_data.test.x else "val" if x is tiny_data.val.x else "?")
        return real(model, x, y, device, *args, **kwargs)

    monkeypatch.setattr(unit, "evaluate_split", spy)
    r = sweep.run(replace(SPEC, epochs=4), tmp_path, "cpu", data=tiny_data, progress=False)
    assert seen.count("test") == 1 and seen[-1] == "test" and "?" not in seen
    val_losses = [h["val_loss"] for h in r.history]
    assert r.best_epoch == 1 + val_losses.index(min(val_losses))
    last = engine.fit(replace(SPEC, select="last"), tiny_data, "cpu", progress=False)
    assert last.best_epoch == SPEC.epochs


def test_result_file_holds_the_documented_fields(tiny_data, tmp_path):
    r = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    stored = results.read(results.run_path(tmp_path, SPEC))
    assert stored == r and stored.to_dict() == json.loads(r.to_json())
    raw = json.loads(results.run_path(tmp_path, SPEC).read_text())
    assert raw["schema_version"] == record.SCHEMA_VERSION == 2
    assert list(raw) == ["schema_version", "id", "seed", "spec", "spec_hash", "identity", "data_fingerprint",
                         "training_version", "decision", "status", "error", "history", "best_epoch", "metrics",
                         "predictions", "timing", "environment", "dataset", "weights", "reused_from"]
    assert raw["decision"] == {"rule": "argmax", "threshold": 0.5, "prior": None, "tta": 0, "augment": None}
    assert set(raw["metrics"]) == {"val", "test"}  # plain argmax: no second set
    assert raw["identity"] == unit.identity(SPEC, tiny_data) and raw["training_version"] == unit.TRAINING_VERSION
    assert raw["data_fingerprint"] == tiny_data.fingerprint
    assert {"git_commit", "git_dirty", "version", "started_at", "finished_at"} <= set(raw["environment"])
    test = stored.metrics["test"]
    assert test["n"] == 96 and set(test) >= {"accuracy", "auroc", "sensitivity", "specificity", "loss", "ece",
                                             "confusion"}
    assert len(stored.predictions["y_score"]) == 96
    assert stored.timing["images_per_second"] > 0
    weights = torch.load(tmp_path / stored.weights, weights_only=True)
    assert set(weights) == set(engine.build_model("cnn", 2, 4).state_dict())


def test_stored_results_are_not_run_again(tiny_data, tmp_path, monkeypatch):
    first = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    monkeypatch.setattr(engine, "fit", lambda *a, **k: pytest.fail("retrained a stored run"))
    again = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data)
    assert again.cached and again.metrics == first.metrics
    # The identical recipe under another id (Task A's CE run is Task B's lr 0.001 run) is reused.
    other = replace(SPEC, name="other")
    reused = sweep.run(other, tmp_path, "cpu", data=tiny_data)
    assert reused.reused_from == SPEC.id and reused.id == other.id
    assert results.find(tmp_path, other).metrics == first.metrics
    assert (tmp_path / reused.weights).exists()


def test_changed_spec_is_refused_then_replaced_with_rerun(tiny_data, tmp_path):
    sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    changed = replace(SPEC, epochs=2)  # same id, different recipe
    assert results.find(tmp_path, changed) is None
    with pytest.raises(results.StoreConflict, match=r"another recipe \(epochs 3 stored, 2 now\); pass --rerun"):
        sweep.run(changed, tmp_path, "cpu", data=tiny_data, progress=False)
    rerun = sweep.run(changed, tmp_path, "cpu", data=tiny_data, progress=False, rerun=True)
    assert not rerun.cached and results.find(tmp_path, changed) == rerun


def test_non_finite_loss_stops_the_run_as_diverged(tiny_data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = losses.LOSSES["ce"]

    def exploding(logits, y, spec, class_weights=None):
        calls["n"] += 1
        loss = real.train_loss(logits, y, spec, class_weights)
        return loss * float("nan") if calls["n"] > 12 else loss  # epoch 2 of 8 batches per epoch

    monkeypatch.setitem(losses.LOSSES, "ce", replace(real, train_loss=exploding))
    r = sweep.run(replace(SPEC, epochs=4), tmp_path, "cpu", data=tiny_data, progress=False)
    assert r.status == "diverged" and "non-finite" in r.error
    assert len(r.history) == 2 and r.metrics is None and r.weights is None
    assert results.find(tmp_path, replace(SPEC, epochs=4)).status == "diverged"  # stored, not retried


def test_crashed_run_is_recorded_as_failed_and_retried(tiny_data, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(engine, "build_model", boom)
    r = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    assert r.status == "failed" and r.error == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert results.run_path(tmp_path, SPEC).exists() and results.find(tmp_path, SPEC) is None
    monkeypatch.undo()
    assert sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False).status == "ok"


_SWEEP = """
import sys
from dataclasses import replace
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from conftest import make_split
from cxr import engine, recipe, sweep, unit
from cxr.data import Dataset
from cxr.spec import ExperimentSpec
data = Dataset(source="tiny", name="tiny", synthetic=True, image_size=28,
               train=make_split(512, 1), val=make_split(64, 2), test=make_split(96, 3))
for lr in (0.001, 0.002, 0.003, 0.004, 0.005, 0.006):
    r = sweep.run(ExperimentSpec(name="k", lr=lr, epochs=3, width=4), sys.argv[1], "cpu", data=data, progress=False)
    print(r.id, "cached" if r.cached else "trained", flush=True)
"""


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_without_loss_or_repeats(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(_SWEEP.format(root=str(ROOT), tests=str(ROOT / "tests")))
    out = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("runs/*/seed-0.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.parent.name for p in out.glob("runs/*/seed-0.json")}
    assert 2 <= len(done) < 6, "kill landed too late to test resuming"
    for p in out.glob("runs/*/seed-0.json"):
        assert results.read(p).status == "ok"  # every file present is complete
    second = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, check=True)
    lines = dict(line.split() for line in second.stdout.splitlines())
    assert {i for i, how in lines.items() if how == "cached"} == done
    assert len(lines) == 6 and len(list(out.glob("runs/*/seed-0.json"))) == 6


def test_lr_schedules_hit_their_documented_values():
    spe, epochs = 10, 10
    f = lambda schedule, step, **kw: recipe.lr_factor(  # noqa: E731
        ExperimentSpec(schedule=schedule, epochs=epochs, **kw), step, spe)
    assert f("none", 57) == 1.0
    assert f("cosine", 0) == 1.0 and f("cosine", 50) == pytest.approx(0.5) and f("cosine", 100) == pytest.approx(0)
    assert f("cosine", 0, warmup_epochs=2) == pytest.approx(1 / 20) and f("cosine", 19, warmup_epochs=2) == 1.0
    assert f("step", 39, step_epochs=4, step_gamma=0.5) == 1.0 and f("step", 40, step_epochs=4, step_gamma=0.5) == 0.5
    assert f("step", 80, step_epochs=4, step_gamma=0.5) == 0.25
    assert f("onecycle", 0) == pytest.approx(1 / 25) and f("onecycle", 30) == pytest.approx(1.0)
    assert f("onecycle", 100) == pytest.approx(1e-4)
    # and the optimizer really follows it
    spec = ExperimentSpec(schedule="cosine", epochs=2, lr=0.1)
    model = torch.nn.Linear(2, 1)
    opt = recipe.make_optimizer(spec, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: recipe.lr_factor(spec, s, 5))
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_optimizers_are_built_from_the_spec():
    params = list(torch.nn.Linear(2, 1).parameters())
    opt = recipe.make_optimizer(ExperimentSpec(optimizer="adamw", lr=0.003, weight_decay=0.05), params)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.05
    opt = recipe.make_optimizer(ExperimentSpec(optimizer="sgd", momentum=0.8), params)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.8


def test_augmentation_changes_images_but_not_shapes_and_is_off_by_default():
    x = torch.rand(8, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert recipe.augment(x, ExperimentSpec(), g) is x
    spec = ExperimentSpec(augment_shift=0.1, augment_rotate=10, augment_scale=0.1)
    y = recipe.augment(x, spec, g)
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.allclose(x, y)
    assert 0 <= y.min() and y.max() <= 1  # bilinear with border padding stays in range
    # a pure shift by 1/28 of the side moves the image one pixel
    img = torch.zeros(1, 1, 28, 28)
    img[0, 0, 10:14, 10:14] = 1
    theta_shift = recipe.augment(img, ExperimentSpec(augment_shift=1e-9), torch.Generator().manual_seed(1))
    assert torch.allclose(theta_shift, img, atol=1e-4)


@pytest.mark.cuda
def test_cuda_run_matches_cpu_roughly(tiny_data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    r = sweep.run(replace(SPEC, epochs=3), tmp_path, "cuda", data=tiny_data, progress=False)
    assert r.status == "ok" and r.environment["device"] == "cuda"
    assert r.test("accuracy") > 0.6


@pytest.mark.cuda
def test_cuda_graph_step_trains_like_the_eager_step(tiny_data, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    spec = replace(SPEC, epochs=3, schedule="cosine")
    graphed = engine.fit(spec, tiny_data, "cuda", progress=False)
    monkeypatch.setenv("CXR_CUDA_GRAPHS", "0")
    eager = engine.fit(spec, tiny_data, "cuda", progress=False)
    assert graphed.cuda_graph and graphed.capture_error is None and not eager.cuda_graph
    for g, e in zip(graphed.history, eager.history, strict=True):
        assert g["lr"] == e["lr"]
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=0.05)
