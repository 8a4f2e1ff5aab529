"""Resumable runs: a run (or a fused group) killed after any epoch continues from its last checkpoint, and on
the CPU ends exactly as an uninterrupted run (history, best epoch, weights); checkpoints of another identity
are never resumed, broken ones are discarded with one line, and they go once the result is written."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cxr import engine, results, sweep
from cxr.spec import ExperimentSpec
from tests.conftest import learnable_npz

ROOT = Path(__file__).resolve().parents[1]
SPEC = ExperimentSpec(name="r", epochs=4, batch_size=32, width=4)
GROUP = [replace(SPEC, seed=0, lr=0.01), replace(SPEC, seed=1, lr=0.003, ema=0.9),
         replace(SPEC, seed=2, lr=1e20, optimizer="sgd"), replace(SPEC, seed=3, schedule="cosine",
                                                                              warmup_epochs=1)]


class Killed(BaseException):
    """What the tests raise in place of SIGKILL right after a checkpoint was written."""


class MemoryCheckpoints:
    """cxr.engine.Checkpoints kept as serialized bytes (as on disk); raises Killed after epoch `kill_after`."""

    def __init__(self, kill_after: int | None = None):
        self.saved: dict[str, bytes] = {}
        self.kill_after = kill_after
        self.discarded: list[str] = []

    def load(self, spec):
        blob = self.saved.get(spec.run_id)
        return None if blob is None else torch.load(io.BytesIO(blob), weights_only=True)

    def save(self, spec, state):
        buf = io.BytesIO()
        torch.save(state, buf)
        self.saved[spec.run_id] = buf.getvalue()
        if state["epoch"] == self.kill_after and spec.run_id == self._last:
            raise Killed

    def discard(self, spec, why):
        self.discarded.append(why)
        self.saved.pop(spec.run_id, None)

    def arm(self, specs, kill_after):
        self.kill_after, self._last = kill_after, specs[-1].run_id


def _same(a: engine.Fit, b: engine.Fit) -> None:
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b.history]
    assert (a.status, a.best_epoch, a.error) == (b.status, b.best_epoch, b.error)
    if a.model is not None:
        for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
            assert torch.equal(v, w), k


def _resumed(specs, data, kill_after, kernel=None):
    store = MemoryCheckpoints()
    store.arm(specs, kill_after)
    with pytest.raises(Killed):
        engine.fit(specs, data, "cpu", progress=False, kernel=kernel, checkpoints=store)
    store.kill_after = None
    return engine.fit(specs, data, "cpu", progress=False, kernel=kernel, checkpoints=store), store


@pytest.mark.parametrize("kill_after", [1, 2, 3, 4])
def test_a_lone_run_killed_after_any_epoch_resumes_to_the_uninterrupted_result(tiny_data, kill_after):
    spec = replace(SPEC, ema=0.9, schedule="cosine", warmup_epochs=1, augment_shift=0.05, seed=5)
    (fit,), _ = _resumed([spec], tiny_data, kill_after)
    _same(fit, engine.fit(spec, tiny_data, "cpu", progress=False))
    assert fit.resumed_after_epoch == kill_after and fit.status == "ok"


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_a_fused_group_resumes_with_a_member_that_diverged_before_the_kill(tiny_data, kernel):
    kill_after = 2
    resumed, store = _resumed(GROUP, tiny_data, kill_after, kernel)
    whole = engine.fit(GROUP, tiny_data, "cpu", progress=False, kernel=kernel)
    assert whole[2].status == "diverged" and len(whole[2].history) <= kill_after  # stopped before the kill
    for a, b in zip(resumed, whole, strict=True):
        _same(a, b)
    assert [f.resumed_after_epoch for f in resumed] == [kill_after, kill_after, len(whole[2].history), kill_after]
    assert not store.discarded


def test_members_of_a_group_at_different_epochs_catch_up(tiny_data):
    """A group whose runs were checkpointed at different epochs (another selection trained some of them
    earlier) trains each from its own epoch, with the same result as uninterrupted."""
    store = MemoryCheckpoints()
    store.arm(GROUP[:1], 3)
    with pytest.raises(Killed):
        engine.fit(GROUP[:1], tiny_data, "cpu", progress=False, checkpoints=store)
    store.kill_after = None
    resumed = engine.fit([GROUP[0], GROUP[3]], tiny_data, "cpu", progress=False, checkpoints=store, kernel="loop")
    for a, spec in zip(resumed, [GROUP[0], GROUP[3]], strict=True):
        _same(a, engine.fit(spec, tiny_data, "cpu", progress=False))
    assert [f.resumed_after_epoch for f in resumed] == [3, None]


def test_a_checkpoint_that_does_not_fit_the_model_starts_the_run_over(tiny_data):
    store = MemoryCheckpoints()
    store.arm([SPEC], 2)
    with pytest.raises(Killed):
        engine.fit(SPEC, tiny_data, "cpu", progress=False, checkpoints=store)
    store.kill_after = None
    wider = replace(SPEC, width=8)  # same run id, other weights' shapes
    fit = engine.fit(wider, tiny_data, "cpu", progress=False, checkpoints=store)
    assert len(store.discarded) == 1 and "does not fit the run" in store.discarded[0]
    assert fit.resumed_after_epoch is None
    _same(fit, engine.fit(wider, tiny_data, "cpu", progress=False))


# ------------------------------------------------------------------------------ in the store

def _kill_in_store(spec, data, out, kill_after):
    """sweep.run, killed (Killed) right after the run's checkpoint of epoch `kill_after` is written."""
    real = sweep.StoreCheckpoints.save

    def save(self, s, state):
        real(self, s, state)
        if state["epoch"] == kill_after:
            raise Killed

    sweep.StoreCheckpoints.save = save
    try:
        with pytest.raises(Killed):
            sweep.run(spec, out, "cpu", data=data, progress=False)
    finally:
        sweep.StoreCheckpoints.save = real
    assert results.checkpoint_path(out, spec).is_file()
    assert results.stored(out, spec) is None


def test_the_store_resumes_a_run_and_deletes_its_checkpoint(tiny_data, tmp_path, capsys):
    _kill_in_store(SPEC, tiny_data, tmp_path, 2)
    rec = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    assert f"resuming {SPEC.run_id} after epoch 2" in capsys.readouterr().err
    assert rec.ok and rec.timing["resumed_after_epoch"] == 2 and rec.timing["checkpoint_seconds"] > 0
    assert not results.checkpoint_path(tmp_path, SPEC).exists()
    fresh = sweep.run(SPEC, tmp_path / "fresh", "cpu", data=tiny_data, progress=False)
    assert [dict(r, seconds=0) for r in rec.history] == [dict(r, seconds=0) for r in fresh.history]
    assert rec.metrics == fresh.metrics and "resumed_after_epoch" not in fresh.timing


def test_a_checkpoint_of_another_recipe_is_never_resumed(tiny_data, tmp_path, capsys):
    other = replace(SPEC, lr=0.01)
    _kill_in_store(other, tiny_data, tmp_path, 2)
    path = results.checkpoint_path(tmp_path, SPEC)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(results.checkpoint_path(tmp_path, other), path)  # another recipe's state under this run's name
    rec = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    err = capsys.readouterr().err
    assert "a checkpoint of another recipe, data or training version; not resumed" in err
    assert rec.ok and "resumed_after_epoch" not in rec.timing and not path.exists()


def test_a_checkpoint_of_other_data_is_never_resumed(tiny_data, tmp_path, capsys):
    _kill_in_store(SPEC, tiny_data, tmp_path, 1)
    other = replace(tiny_data, train=replace(tiny_data.train, x=tiny_data.train.x.flip(-1)))
    rec = sweep.run(SPEC, tmp_path, "cpu", data=other, progress=False)
    assert "not resumed" in capsys.readouterr().err and "resumed_after_epoch" not in rec.timing


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not-a-dict"])
def test_a_broken_checkpoint_is_discarded_with_one_line_and_the_run_starts_over(tiny_data, tmp_path, capsys,
                                                                                damage):
    _kill_in_store(SPEC, tiny_data, tmp_path, 2)
    path = results.checkpoint_path(tmp_path, SPEC)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    else:
        torch.save([1, 2, 3], path)
    rec = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    assert len(lines) == 1 and str(path) in lines[0] and "discarded, the run starts over" in lines[0]
    assert rec.ok and "resumed_after_epoch" not in rec.timing


def test_rerun_ignores_a_checkpoint(tiny_data, tmp_path):
    _kill_in_store(SPEC, tiny_data, tmp_path, 2)
    rec = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False, rerun=True)
    assert rec.ok and "resumed_after_epoch" not in rec.timing
    assert not results.checkpoint_path(tmp_path, SPEC).exists()


def test_a_checkpoint_that_cannot_be_written_costs_the_run_nothing(tiny_data, tmp_path, capsys, monkeypatch):
    real = results.atomic_write

    def full(path, write):
        if path.name.endswith(".checkpoint.pt"):
            raise OSError(28, "No space left on device", str(path))
        real(path, write)

    monkeypatch.setattr(results, "atomic_write", full)
    rec = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    assert rec.ok and len(lines) == 1 and "No space left on device" in lines[0]


# ------------------------------------------------------------------------------ SIGKILL, for real

def _spec_file(path: Path, epochs: int) -> Path:
    """A fused group of two (lr 0.001, 0.003) and a lone run (fuse = false)."""
    path.write_text(f'[experiment]\nname = "k"\nwidth = 4\nepochs = {epochs}\nbatch_size = 16\nseeds = [0]\n'
                    '[grid]\nlr = [0.001, 0.003]\n')
    lone = path.with_name("lone.toml")
    lone.write_text(f'[experiment]\nname = "l"\nwidth = 4\nepochs = {epochs}\nbatch_size = 16\nseeds = [0]\n'
                    'fuse = false\nema = 0.9\n')
    return path.parent


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "cxr.cli", "run", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _epoch(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["state"]["epoch"]
    except Exception:  # noqa: BLE001 - not there yet
        return 0


@pytest.mark.slow
def test_sigkill_at_a_random_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    epochs = 8
    specs_dir = tmp_path / "specs"
    specs_dir.mkdir()
    _spec_file(specs_dir / "k.toml", epochs)
    data = f"npz:{learnable_npz(tmp_path / 'd.npz', 0, (('train', 400), ('val', 64), ('test', 64)))}"
    args = [str(specs_dir), "--data", data]
    whole = _cli([*args, "--out", str(tmp_path / "whole")])
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    out = tmp_path / "killed"
    rng = random.Random()
    killed = {}
    for name, run_id in (("k.toml", "k-ce-lr0.003-bs16"), ("lone.toml", "l-ce-lr0.001-bs16")):  # group, lone
        target = rng.randint(1, epochs - 3)
        proc = _cli([str(specs_dir / name), "--data", data, "--out", str(out)])
        ckpt = out / "runs" / run_id / "seed-0.checkpoint.pt"
        deadline = time.monotonic() + 240
        while _epoch(ckpt) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"{name}: the run ended before it could be killed"
        killed[name[0]] = _epoch(ckpt)  # what was written before the kill (maybe past the target)
    assert min(killed.values()) >= 1, killed
    resumed = _cli([*args, "--out", str(out)])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    paths = sorted((tmp_path / "whole" / "runs").glob("*/seed-0.json"))
    assert len(paths) == 3
    for path in paths:
        a = json.loads(path.read_text())
        b = json.loads((out / "runs" / path.parent.name / path.name).read_text())
        assert [dict(r, seconds=0) for r in a["history"]] == [dict(r, seconds=0) for r in b["history"]], killed
        assert a["metrics"] == b["metrics"] and a["best_epoch"] == b["best_epoch"]
        wa = torch.load(tmp_path / "whole" / a["weights"], weights_only=True)
        wb = torch.load(out / b["weights"], weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), killed
        assert "resumed_after_epoch" not in a["timing"]
        assert b["timing"]["resumed_after_epoch"] == killed[path.parent.name[0]], killed
    assert not list(out.rglob("*.checkpoint.pt"))


def test_a_failed_run_keeps_its_checkpoint_and_the_next_run_resumes_from_it(tiny_data, tmp_path, monkeypatch):
    real = engine._save

    def save_then_fail(active, checkpoints):
        real(active, checkpoints)
        if active[0].epochs_done == 2:
            raise RuntimeError("a transient fault after epoch 2")

    monkeypatch.setattr(engine, "_save", save_then_fail)
    failed = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    assert failed.status == "failed" and "transient fault" in failed.error
    assert results.checkpoint_path(tmp_path, SPEC).is_file()
    monkeypatch.setattr(engine, "_save", real)
    rec = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    assert rec.ok and rec.timing["resumed_after_epoch"] == 2
    assert not results.checkpoint_path(tmp_path, SPEC).exists()
    fresh = sweep.run(SPEC, tmp_path / "fresh", "cpu", data=tiny_data, progress=False)
    assert [dict(r, seconds=0) for r in rec.history] == [dict(r, seconds=0) for r in fresh.history]
    assert rec.metrics == fresh.metrics
