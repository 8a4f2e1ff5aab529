"""What a shared, long-lived results directory meets (issue 21): unreadable results, full disks, FIFOs and
devices named like results, copied run directories, another user's lock file, weights gone, temp files of a
killed write, a store of thousands of results. Each case failed on commit 1703f74; a hypothesis test runs
random sequences of run / copy / corrupt / delete weights / report on one store."""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxr import cli, engine, index, record, report, results, sweep
from tests.test_store import SPEC, _data, _fast_fit

ROOT = Path(__file__).resolve().parents[1]
SPEC_FILE = '[experiment]\nname = "h"\nwidth = 4\nepochs = 1\nseeds = [0]\nlr = 0.001\n'


@pytest.fixture
def fast(monkeypatch):
    """Training without the loop: the store is under test."""
    monkeypatch.setattr(engine, "fit", _fast_fit)


def _cli_run(tmp_path, *extra) -> int:
    spec = tmp_path / "h.toml"
    spec.write_text(SPEC_FILE)
    return cli.main(["run", str(spec), "--data", "synthetic", "--out", str(tmp_path / "out"), *extra])


def _record_path(tmp_path) -> Path:
    return tmp_path / "out" / "runs" / "h-ce-lr0.001-bs32" / "seed-0.json"


# ------------------------------------------------------------------------------ 1. unreadable results

@pytest.mark.parametrize("damage", ["newer-schema", "added-field", "garbage", "no-permission"])
def test_1_an_unreadable_result_blocks_its_run_and_is_not_replaced(tmp_path, capsys, fast, monkeypatch, damage):
    assert _cli_run(tmp_path) == 0
    path = _record_path(tmp_path)
    obj = json.loads(path.read_text())
    weights = tmp_path / "out" / obj["weights"]
    if damage == "newer-schema":
        path.write_text(json.dumps({**obj, "schema_version": 99}))
    elif damage == "added-field":
        path.write_text(json.dumps({**obj, "note": "added by hand"}))
    elif damage == "garbage":
        path.write_bytes(b"{not json")
    else:
        path.chmod(0)
        real_open, denied = os.open, [True]

        def open_as_a_user(p, flags, *args):  # root reads any file: deny it what a user without read permission meets
            if denied[0] and Path(p) == path:
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(p, flags, *args)

        monkeypatch.setattr(os, "open", open_as_a_user)
    before, weights_before = path.read_bytes() if damage != "no-permission" else None, weights.read_bytes()
    capsys.readouterr()
    assert _cli_run(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "--rerun" in err
    if before is not None:
        assert path.read_bytes() == before
    assert weights.read_bytes() == weights_before
    assert _cli_run(tmp_path, "--rerun") == 0  # --rerun replaces it
    if damage == "no-permission":
        assert "Permission denied" in err
        denied[0] = False  # the new file is the user's own
    assert results.read(path).ok


# ------------------------------------------------------------------------------ 2. full disk

def test_2_torch_save_failing_is_one_line_and_a_failed_run(tmp_path, capsys, fast, monkeypatch):
    real = results.atomic_write

    def torch_save_fails(f):  # what torch.save raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    def weights_fail(path, write):
        real(path, torch_save_fails if path.name == results.WEIGHTS_NAME else write)

    monkeypatch.setattr(results, "atomic_write", weights_fail)
    assert _cli_run(tmp_path) == 1  # the run failed, and was recorded as such
    out = capsys.readouterr().out
    rec = results.read(_record_path(tmp_path))
    assert rec.status == "failed" and "model_weights.pth: cannot write" in rec.error and "Traceback" not in out


def test_2_a_file_size_limit_is_one_line_naming_the_path(tmp_path):
    spec = tmp_path / "h.toml"
    spec.write_text(SPEC_FILE.replace("epochs = 1", "epochs = 1\nbatch_size = 64"))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # 2 KB: no record or weights fit

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "cxr.cli", "run", str(spec), "--data", "synthetic", "--out",
                           str(tmp_path / "out")], env=env, cwd=ROOT, preexec_fn=limit, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and "cannot write (File too large)" in last and "seed-0" in last
    assert not list((tmp_path / "out").rglob("*.tmp"))


# ------------------------------------------------------------------------------ 3. FIFOs and devices

@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_3_a_fifo_or_device_named_like_a_result_is_skipped_not_read(tmp_path, kind):
    path = tmp_path / "out" / "runs" / "h-ce-lr0.001-bs32" / "seed-0.json"
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rep = subprocess.run([sys.executable, "-m", "cxr.cli", "report", str(tmp_path / "out")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # a hang fails here
    assert rep.returncode == 0, rep.stderr
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Skipped files" in text and "not a regular file" in text
    spec = tmp_path / "h.toml"
    spec.write_text(SPEC_FILE)
    run = subprocess.run([sys.executable, "-m", "cxr.cli", "run", str(spec), "--data", "synthetic", "--out",
                          str(tmp_path / "out")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    why = "outside the results directory" if kind == "dev-zero" else "not a regular file"  # the link leaves it
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and why in run.stderr
    assert "MemoryError" not in run.stderr


def test_3_a_huge_file_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = tmp_path / "seed-0.json"
    path.write_bytes(b" " * 2000)
    monkeypatch.setattr(results, "MAX_RECORD_BYTES", 1000)
    with pytest.raises(record.RecordError, match="2000 bytes, more than a result file can be"):
        results.read(path)


# ------------------------------------------------------------------------------ 4. copied run directories

def test_4_a_copied_run_directory_is_not_counted_twice(tmp_path, fast):
    out = tmp_path / "out"
    for seed in (0, 1):
        sweep.run(replace(SPEC, seed=seed), out, "cpu", data=_data(), progress=False)
    shutil.copytree(out / "runs" / SPEC.id, out / "runs" / f"{SPEC.id}.bak")
    skipped: list[str] = []
    recs = results.load_all(out, skipped)
    assert [(r.id, r.seed) for r in recs] == [(SPEC.id, 0), (SPEC.id, 1)]
    assert len(skipped) == 2 and all(".bak" in s and "a copied run directory?" in s for s in skipped)
    report.render(out, specs=[])
    text = (out / "report.md").read_text()
    assert "## Skipped files" in text and f"{SPEC.id}.bak/seed-0.json" in text
    with pytest.raises(record.RecordError, match="copied run directory"):
        results.load_all(out)


# ------------------------------------------------------------------------------ 6. the index

def test_6_an_identical_run_is_found_through_the_index_and_checked_against_the_file(tmp_path, fast, monkeypatch):
    out, d = tmp_path / "out", _data()
    first = sweep.run(SPEC, out, "cpu", data=d, progress=False)
    others = [sweep.run(replace(SPEC, name=f"o{k}", lr=0.01 * (k + 1)), out, "cpu", data=d, progress=False)
              for k in range(5)]
    index.refresh(out)
    twin = replace(SPEC, name="twin")  # the same recipe under another id
    reads: list[Path] = []
    real = results.read
    monkeypatch.setattr(results, "read", lambda p: reads.append(Path(p)) or real(p))
    got = sweep.run(twin, out, "cpu", data=d, progress=False)
    assert got.reused_from == first.id
    assert reads and {p.parent.name for p in reads} <= {first.id, twin.id}  # none of the 5 others was read
    # a hand-edited index that names a file of another identity is never trusted
    index.refresh(out)
    path = out / "runs" / index.INDEX_NAME
    idx = json.loads(path.read_text())
    idx["dirs"][others[0].id]["files"]["seed-0.json"]["identity"] = first.identity
    path.write_text(json.dumps(idx))
    assert results.run_path(out, others[0]) in index.candidates(out, first.identity, 0)  # the index says so
    found = sweep._reuse_same_recipe(out, replace(SPEC, name="third"), first.identity)
    assert found is not None and found.reused_from in (first.id, twin.id)  # the file said otherwise


def test_6_a_corrupt_or_missing_index_is_rebuilt_from_the_files(tmp_path, fast):
    out, d = tmp_path / "out", _data()
    first = sweep.run(SPEC, out, "cpu", data=d, progress=False)
    path = out / "runs" / index.INDEX_NAME
    for damage in (b"{broken", None):
        if damage is None:
            path.unlink()
        else:
            path.write_bytes(damage)
        assert index.candidates(out, first.identity, 0) == [results.run_path(out, SPEC)]
        assert json.loads(path.read_text())["version"] == index.VERSION


def test_6_a_result_written_by_another_process_is_seen(tmp_path, fast):
    out, d = tmp_path / "out", _data()
    first = sweep.run(SPEC, out, "cpu", data=d, progress=False)
    assert index.candidates(out, first.identity, 1) == []
    rec = replace(first, seed=1)  # written without the index, as by an older cxr-bench
    results.write(out, rec)
    assert index.candidates(out, first.identity, 1) == [out / "runs" / SPEC.id / "seed-1.json"]


# ------------------------------------------------------------------------------ 7. another user's lock

def test_7_another_users_lock_file_skips_that_run_only(tmp_path, fast, monkeypatch, capsys):
    spec = tmp_path / "h.toml"
    spec.write_text('[experiment]\nname = "h"\nwidth = 4\nepochs = 1\nseeds = [0]\nfuse = false\n'
                    '[grid]\nlr = [0.001, 0.002]\n')
    real = os.open

    def not_ours(path, flags, *args):  # as a lock file of another user, mode 0644, opened by us
        if str(path).endswith("h-ce-lr0.001-bs32/seed-0.lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", not_ours)
    code = cli.main(["run", str(spec), "--data", "synthetic", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "busy" in out and "cannot be opened (Permission denied)" in out
    assert results.read(tmp_path / "out/runs/h-ce-lr0.002-bs32/seed-0.json").ok  # the rest trained


def test_7_lock_files_in_a_group_writable_store_are_group_writable(tmp_path):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs").chmod(0o2775)
    old = os.umask(0o022)
    try:
        with results.claim(out, SPEC):
            lock = out / "runs" / SPEC.id / f"seed-{SPEC.seed}.lock"
            assert stat.S_IMODE(lock.stat().st_mode) & stat.S_IWGRP
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------ 12. minor

def test_12_a_result_whose_weights_are_gone_is_trained_again(tmp_path, fast, capsys):
    out, d = tmp_path / "out", _data()
    first = sweep.run(SPEC, out, "cpu", data=d, progress=False)
    (out / first.weights).unlink()
    again = sweep.run(SPEC, out, "cpu", data=d, progress=False)
    assert not again.cached and (out / again.weights).is_file()
    assert capsys.readouterr().err.count("are gone; the run is trained again") == 1


def test_12_temp_files_of_a_killed_write_are_removed_by_the_runs_next_trainer(tmp_path, fast):
    out, d = tmp_path / "out", _data()
    base = out / "runs" / SPEC.id
    (base / f"seed-{SPEC.seed}").mkdir(parents=True)
    left = [base / f".seed-{SPEC.seed}.json.x1.tmp", base / f"seed-{SPEC.seed}" / ".model_weights.pth.x2.tmp"]
    other = base / ".seed-9.json.x3.tmp"  # another run's: not ours to remove
    for p in [*left, other]:
        p.write_bytes(b"partial")
    sweep.run(SPEC, out, "cpu", data=d, progress=False)
    assert not any(p.exists() for p in left) and other.exists()


# ------------------------------------------------------------------------------ hypothesis

OPS = st.lists(st.tuples(st.sampled_from(["run", "copy", "corrupt", "delete-weights", "report"]), st.integers(0, 1)),
               min_size=1, max_size=10)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS)
def test_random_sequences_lose_no_ok_result_and_count_none_twice(tmp_path_factory, ops):
    out, d = tmp_path_factory.mktemp("store"), _data()
    mp = pytest.MonkeyPatch()
    corrupted: set[int] = set()
    copies = 0
    try:
        mp.setattr(engine, "fit", _fast_fit)
        for op, seed in ops:
            spec = replace(SPEC, seed=seed)
            path = results.run_path(out, spec)
            before = path.read_bytes() if path.is_file() else None
            ok_before = before is not None and seed not in corrupted and results.read(path).ok
            if op == "run":
                try:
                    rec = sweep.run(spec, out, "cpu", data=d, progress=False)
                except results.StoreConflict as e:  # only an unreadable result blocks, and it stays as it was
                    assert seed in corrupted and str(path) in str(e) and path.read_bytes() == before
                    continue
                assert rec.ok and (out / rec.weights).is_file()
                if ok_before and rec.cached:
                    assert path.read_bytes() == before  # served, untouched
            elif op == "copy" and path.is_file():
                copies += 1
                shutil.copytree(path.parent, path.parent.with_name(f"{spec.id}.copy{copies}"))
            elif op == "corrupt" and path.is_file():
                path.write_bytes(b"\x00corrupt")
                corrupted.add(seed)
            elif op == "delete-weights" and ok_before:
                (out / results.read(path).weights).unlink(missing_ok=True)
            elif op == "report":
                report.render(out, specs=[])
            if ok_before and op not in ("corrupt",):  # an ok result is never lost
                assert results.read(path).ok
            skipped: list[str] = []
            recs = results.load_all(out, skipped)
            keys = [(r.id, r.seed) for r in recs]
            assert len(keys) == len(set(keys)) and all(r.id == SPEC.id for r in recs)  # none counted twice
            assert {k[1] for k in keys} == {s for s in (0, 1) if results.run_path(out, replace(SPEC, seed=s)).is_file()
                                           and s not in corrupted}
    finally:
        mp.undo()
