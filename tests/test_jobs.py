"""`cxr-bench run --jobs N` (cxr.jobs): units split between worker processes, twins kept together, the
same results as a sequential run at the workers' thread count, and its refusals in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr import cli, jobs
from cxr import spec as spec_mod
from cxr.unit import identity
from tests.conftest import learnable_npz

# Task A's CE run and Task B's lr 0.001 run are twins (one identity): 3 identities x 2 seeds, 8 runs.
SPECS = {
    "loss": '[grid]\nloss = ["bce", "ce"]',
    "lr": '[grid]\nlr = [0.001, 0.01]',
}
SPEC = """\
[experiment]
name = "{name}"
dataset = "npz:{data}"
model = "cnn"
width = 4
loss = "ce"
lr = 0.001
batch_size = 32
epochs = 2
seeds = [0, 1]
{grid}
"""


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("specs")
    npz = learnable_npz(folder / "tiny.npz")
    for name, grid in SPECS.items():
        (folder / f"{name}.toml").write_text(SPEC.format(name=name, data=npz, grid=grid))
    return folder


def _cli(*args: str, threads: int) -> subprocess.CompletedProcess:
    # the loop kernel computes each member as alone; the grouped one (a CPU's default in bf16 at small
    # batches) may differ in the last bits with the group's size, which --jobs changes
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MPLBACKEND": "Agg", "CXR_FUSE_KERNEL": "loop"}
    return subprocess.run([sys.executable, "-m", "cxr.cli", "run", *args, "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)


def _records(store: Path) -> dict[str, dict]:
    return {p.relative_to(store).as_posix(): json.loads(p.read_text()) for p in store.glob("runs/*/seed-*.json")}


def test_split_deals_a_group_by_identity_keeps_twins_together_and_hands_out_largest_first(spec_dir):
    specs = spec_mod.load([spec_dir])
    from cxr import data as data_mod

    data = data_mod.load(specs[0].dataset, specs[0].image_size)
    units = [specs]  # one fused group of 8 runs, 6 identities
    pieces = jobs.split(units, 4)
    assert sorted(s.run_id for p in pieces for s in p) == sorted(s.run_id for s in specs)
    owner = {}
    for k, p in enumerate(pieces):
        for s in p:
            assert owner.setdefault(identity(s, data), k) == k, "twins were split between pieces"
    sizes = [len({identity(s, data) for s in p}) for p in pieces]
    assert sizes == sorted(sizes, reverse=True) and len(pieces) == 4 and sum(sizes) == 6
    assert jobs.split(units, 1) == [specs]
    assert jobs.threads_per_job(2, 2) == 1 and jobs.threads_per_job(3, 8) == 2 and jobs.threads_per_job(4, 2) == 1


@pytest.mark.slow
def test_jobs_store_what_a_sequential_run_stores_at_their_thread_count_and_twins_train_once(spec_dir, tmp_path):
    par, seq = tmp_path / "jobs", tmp_path / "sequential"
    done = _cli(str(spec_dir), "--jobs", "2", "--out", str(par), threads=2)
    assert done.returncode == 0, done.stderr
    assert "2 worker processes, 1 torch threads each" in done.stdout
    assert _cli(str(spec_dir), "--out", str(seq), threads=1).returncode == 0
    a, b = _records(par), _records(seq)
    assert sorted(a) == sorted(b) and len(a) == 8
    for name in a:
        for key in ("history", "metrics", "predictions", "status", "identity"):
            if key == "history":  # the seconds differ: compare what was learnt
                strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in r[key]] for r in (a[name], b[name])]
                assert strip[0] == strip[1], name
            else:
                assert a[name][key] == b[name][key], (name, key)
        wa = torch.load(par / a[name]["weights"], weights_only=True)
        wb = torch.load(seq / b[name]["weights"], weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    copies = [r for r in a.values() if r["reused_from"]]
    assert len(copies) == 2 and {r["reused_from"] for r in copies} == {"loss-ce-lr0.001-bs32"}  # trained once
    again = _cli(str(spec_dir), "--jobs", "2", "--out", str(par), threads=2)  # everything stored: served
    assert again.returncode == 0 and again.stdout.count("stored") + again.stdout.count("reused") == 8


@pytest.mark.parametrize("args, says", [
    (["--jobs", "0"], "--jobs 0: give 1 or more"),
    (["--jobs", "2", "--ray", "local"], "--jobs: not with --ray"),
])
def test_bad_jobs_options_are_refused_in_one_line_before_any_run(spec_dir, tmp_path, capsys, args, says):
    out = tmp_path / "out"
    assert cli.main(["run", str(spec_dir), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (out / "runs").exists()
