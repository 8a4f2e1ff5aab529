"""The results store never loses a good result and never serves the wrong one (README "Results").

One test per finding of the store review (each failed on commit 0f5c6d1), and a hypothesis test that
runs random sequences of run / quick run / rerun / crash / data change against one store.
"""

import json
import os
import signal
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxr import cli, data, engine, record, results, sweep, unit
from cxr.data import Dataset
from cxr.spec import ExperimentSpec
from tests.conftest import learnable_npz, make_split

ROOT = Path(__file__).resolve().parents[1]
SPEC = ExperimentSpec(name="s", epochs=2, batch_size=32, width=4)


def _data(seed: int = 1) -> Dataset:
    return Dataset(source="tiny", name="tiny", synthetic=True, image_size=28,
                   train=make_split(128, seed), val=make_split(32, seed + 1), test=make_split(48, seed + 2))


def test_1_a_failed_rerun_keeps_the_good_result(tiny_data, tmp_path, monkeypatch):
    good = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    weights = (tmp_path / good.weights).read_bytes()

    def quota(*args, **kwargs):
        raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(results, "save_weights", quota)
    attempt = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False, rerun=True)
    assert attempt.status == "failed" and "Disk quota exceeded" in attempt.error and "kept" in attempt.error
    assert results.read(results.run_path(tmp_path, SPEC)) == good  # still the ok result, weights and all
    assert (tmp_path / good.weights).read_bytes() == weights
    assert results.read(results.attempt_path(tmp_path, SPEC)).status == "failed"
    assert [r.status for r in results.load_all(tmp_path)] == ["ok"]  # the attempt is not a result
    assert sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False).cached


def test_a_diverged_rerun_does_not_replace_an_ok_result_but_an_ok_one_does(tiny_data, tmp_path, monkeypatch):
    good = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    monkeypatch.setattr(engine, "fit", lambda specs, *a, **k: [engine.Fit(status="diverged", error="non-finite")])
    assert sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False, rerun=True).status == "diverged"
    assert results.read(results.run_path(tmp_path, SPEC)) == good
    monkeypatch.undo()
    again = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False, rerun=True)
    assert again.ok and not again.cached and results.read(results.run_path(tmp_path, SPEC)) == again


def test_2_a_quick_run_does_not_overwrite_a_full_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec_file = tmp_path / "q.toml"
    spec_file.write_text('[experiment]\nname = "q"\nwidth = 4\nepochs = 2\nseeds = [0]\n')
    out = tmp_path / "results"
    npz = _npz(tmp_path / "d.npz", seed=0)
    args = ["run", str(spec_file), "--out", str(out), "--data", f"npz:{npz}"]
    assert cli.main(args) == 0
    before = (out / "runs/q-ce-lr0.001-bs32/seed-0.json").read_bytes()
    capsys.readouterr()
    assert cli.main([*args, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another recipe (epochs 2 stored, 1 now); pass --rerun" in err
    assert (out / "runs/q-ce-lr0.001-bs32/seed-0.json").read_bytes() == before
    assert cli.main([*args, "--epochs", "1", "--out", str(tmp_path / "quick")]) == 0  # a separate store is fine


def _npz(path: Path, seed: int) -> Path:
    return learnable_npz(path, seed, (("train", 96), ("val", 32), ("test", 32)))


def test_3_changed_data_behind_the_same_source_is_not_served(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    npz = _npz(tmp_path / "d.npz", seed=0)
    spec = replace(SPEC, dataset=f"npz:{npz}")
    first = sweep.run(spec, tmp_path / "r", "cpu", progress=False)
    _npz(npz, seed=1)  # the same path, other images
    data.clear_cache()
    with pytest.raises(results.StoreConflict, match="other data"):
        sweep.run(spec, tmp_path / "r", "cpu", progress=False)
    second = sweep.run(spec, tmp_path / "r", "cpu", progress=False, rerun=True)
    assert second.data_fingerprint != first.data_fingerprint and second.identity != first.identity
    assert sweep.run(spec, tmp_path / "r", "cpu", progress=False).cached
    # a new training version (code that decides training changed) is not served either
    stored_version = unit.TRAINING_VERSION
    monkeypatch.setattr(unit, "TRAINING_VERSION", stored_version + 1)
    with pytest.raises(results.StoreConflict, match=f"training version {stored_version} "):
        sweep.run(spec, tmp_path / "r", "cpu", progress=False)


def test_synthetic_data_is_fingerprinted_by_its_generator(monkeypatch):
    a = data.load("synthetic", 28).fingerprint
    assert a != data.load("synthetic:1", 28).fingerprint != data.load("synthetic", 32).fingerprint
    assert len({a["train"], a["val"], a["test"]}) == 3


def test_5_swept_data_paths_stay_inside_the_store(tmp_path):
    from cxr import spec as spec_mod

    (s,) = spec_mod.parse('[experiment]\nname = "d"\n[grid]\ndataset = ["npz:../../x/y.npz"]\n', "d.toml")
    assert "/" not in s.id and s.id == "d-ce-lr0.001-bs32-data-npz_.._.._x_y.npz"
    out = tmp_path / "out"
    assert out.resolve() in results.run_path(out, s).resolve().parents
    with pytest.raises(results.StoreError, match="outside the results directory"):
        results.inside(out, out / "runs" / ".." / ".." / "escape.json")


def test_5_a_reused_result_never_copies_a_file_from_outside_the_store(tiny_data, tmp_path):
    first = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    path = results.run_path(tmp_path, SPEC)
    hostile = json.loads(path.read_text())
    hostile["weights"] = "/etc/hostname"
    path.write_text(json.dumps(hostile))
    other = replace(SPEC, name="other")
    rec = sweep.run(other, tmp_path, "cpu", data=tiny_data, progress=False)
    assert rec.reused_from is None and not rec.cached  # trained, not copied
    assert torch.load(tmp_path / rec.weights, weights_only=True).keys() == \
        torch.load(tmp_path / first.weights, weights_only=True).keys()


def test_7_out_that_is_a_file_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine, "fit", lambda *a, **k: pytest.fail("trained before checking --out"))
    regular = tmp_path / "file"
    regular.write_text("x")
    for out in (regular, regular / "sub"):
        assert cli.main(["run", "specs/task-a-loss.toml", "--seeds", "1", "--epochs", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cxr-bench run: error: {out}") and err.count("\n") == 1


def test_7_disk_full_mid_sweep_is_one_line_and_keeps_what_was_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec_file = tmp_path / "f.toml"
    spec_file.write_text('[experiment]\nname = "f"\nwidth = 4\nepochs = 1\nseeds = [0]\n'
                         '[grid]\nlr = [0.001, 0.002]\n')
    out = tmp_path / "results"
    real, writes = results.atomic_write, []

    def full_after_two(path, write):  # the first run's weights and JSON, then the disk is full
        if path.name.endswith(".checkpoint.pt") or path.name == ".index.json":  # tested on their own
            return real(path, write)
        writes.append(path)
        if len(writes) > 2:
            raise OSError(28, "No space left on device", str(path))
        real(path, write)

    monkeypatch.setattr(results, "atomic_write", full_after_two)
    assert cli.main(["run", str(spec_file), "--out", str(out), "--data", f"npz:{_npz(tmp_path / 'd.npz', 0)}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    assert results.read(out / "runs/f-ce-lr0.001-bs32/seed-0.json").ok
    assert not list(out.rglob("*.tmp"))


def test_7_files_get_the_users_umask(tiny_data, tmp_path):
    rec = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    for path in (results.run_path(tmp_path, SPEC), tmp_path / rec.weights):
        assert stat.S_IMODE(path.stat().st_mode) == results.file_mode() == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from cxr import results
from cxr.spec import ExperimentSpec
with results.claim(sys.argv[1], ExperimentSpec(name="s", epochs=2, batch_size=32, width=4)):
    print("claimed", flush=True)
    time.sleep(60)
"""


def test_7_a_run_claimed_by_another_process_is_not_trained_twice(tiny_data, tmp_path, monkeypatch):
    script = tmp_path / "hold.py"
    script.write_text(_HOLD.format(root=str(ROOT)))
    holder = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(results.Claimed, match=r"being trained by .* pid \d+"):
            sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the claim must not go stale
        holder.wait()
    assert sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False).ok
    assert not list(tmp_path.rglob("*.lock"))


# ------------------------------------------------------------------------------ hypothesis

def _fast_fit(specs, data_set, device, progress=None, kernel=None, checkpoints=None):
    """A real model with real weights and a history, without the training loop (the store is under test)."""
    (spec,) = specs
    torch.manual_seed(spec.seed)
    model = engine.build_model(spec.model, spec.num_outputs, spec.width)
    history = [{"epoch": e, "lr": spec.lr, "train_loss": 0.5, "train_accuracy": 0.7, "val_loss": 0.6,
                "val_accuracy": 0.7, "val_auroc": 0.8, "seconds": 0.01} for e in range(1, spec.epochs + 1)]
    return [engine.Fit(status="ok", history=history, best_epoch=spec.epochs, model=model, train_images=128)]


def _crash(*args, **kwargs):
    raise RuntimeError("boom")


OPS = st.lists(st.tuples(st.sampled_from(["run", "quick", "rerun", "crash", "data"]), st.integers(0, 1)),
               min_size=1, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS)
def test_random_sequences_keep_the_store_invariants(tmp_path_factory, ops):
    out = tmp_path_factory.mktemp("store")
    datasets = [_data(1), _data(7)]
    which = 0
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(engine, "fit", _fast_fit)
        for op, seed in ops:
            spec = replace(SPEC, seed=seed, epochs=1 if op == "quick" else SPEC.epochs)
            d = datasets[which]
            before = results.stored(out, spec)
            if op == "data":
                which = 1 - which
                continue
            if op == "crash":
                mp.setattr(engine, "fit", _crash)
            try:
                rec = sweep.run(spec, out, "cpu", data=d, progress=False, rerun=op in ("rerun", "crash"))
            except results.StoreConflict:
                # refused only when another identity is stored, and then nothing changed
                assert before is not None and before.ok and before.identity != unit.identity(spec, d)
                assert results.stored(out, spec) == before
                continue
            finally:
                mp.setattr(engine, "fit", _fast_fit)
            after = results.stored(out, spec)
            if rec.cached:  # served: exactly this recipe, this data, this code
                assert rec.identity == unit.identity(spec, d) and rec.spec_hash == spec.spec_hash()
            if before is not None and before.ok:  # no ok result is ever lost
                assert after.ok and (after == before or rec.ok)
            if rec.ok and not rec.cached:
                assert after == rec and (out / after.weights).is_file()
        for r in results.load_all(out):  # every stored result is whole and consistent
            assert r.identity == record.identity(r.spec_hash, r.data_fingerprint, r.training_version)
            assert not r.ok or (out / r.weights).is_file()
    finally:
        mp.undo()


def test_a_run_that_trained_on_no_images_is_failed_not_ok(tmp_path):
    one = Dataset(source="one", name="one", synthetic=True, image_size=28, train=make_split(2, 1),
                  val=make_split(32, 2), test=make_split(32, 3))
    one = replace(one, train=replace(one.train, x=one.train.x[:1], y=one.train.y[:1]))
    rec = sweep.run(SPEC, tmp_path, "cpu", data=one, progress=False)
    assert rec.status == "failed" and "trained on 0 images" in rec.error
    assert rec.metrics is None and rec.predictions is None and rec.weights is None


def test_the_schema_refuses_a_failed_record_with_metrics(tiny_data, tmp_path):
    ok = sweep.run(SPEC, tmp_path, "cpu", data=tiny_data, progress=False).to_dict()
    with pytest.raises(record.RecordError, match="metrics: the value does not satisfy type \"null\""):
        record.from_dict({**ok, "status": "failed", "error": "boom", "weights": None, "predictions": None}, "f.json")
    with pytest.raises(record.RecordError):
        record.from_dict({**ok, "metrics": None}, "f.json")
