"""The pytest benchmark runner (benchmarks/) through pytester: -k/-m selection, the benchmark JSON,
results reused from the store, failures confined to their case, and the throughput table.

Selection is checked with in-process --collect-only runs (nothing trains); the runs that train go
through runpytest_subprocess, on tiny specs (cnn width 4, one epoch, seed 0) and a tiny npz.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import benchmarks.conftest  # noqa: F401  (loaded once here: pytester's in-process runs must not re-import numpy)
from cxr import selection
from cxr import spec as spec_mod
from tests.conftest import learnable_npz

pytest_plugins = ["pytester"]

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

SPEC = """\
[experiment]
name = "{name}"
dataset = "{dataset}"
model = "cnn"
width = 4
loss = "{loss}"
lr = {lr}
batch_size = 32
epochs = 1
seeds = [0]
{grid}
"""

# 6 runs: CE = loss-ce, lr-ce-lr0.001, lr-ce-lr0.1; BCE = loss-bce, bs-bce-bs32, bs-bce-bs128.
TASKS = {
    "loss": dict(loss="ce", lr=0.001, grid='[grid]\nloss = ["bce", "ce"]'),
    "lr": dict(loss="ce", lr=0.001, grid="[grid]\nlr = [0.001, 0.1]"),
    "bs": dict(loss="bce", lr=0.001, grid="[grid]\nbatch_size = [32, 128]"),
}


def write_npz(path: Path, seed: int = 0) -> Path:
    """A MedMNIST-format npz (train 128, val 32, test 48 images, 28 px): brighter squares = pneumonia."""
    return learnable_npz(path, seed)


def write_specs(folder: Path, dataset: str, tasks: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, values in tasks.items():
        (folder / f"{name}.toml").write_text(SPEC.format(name=name, dataset=dataset, **values))
    return folder


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Subprocesses train with one torch thread: on a busy shared machine two OpenMP threads stall at
    every barrier (measured here: 30x slower), and these tests check the runner, not the speed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runner")
    return write_specs(root / "specs", f"npz:{write_npz(root / 'tiny.npz')}", TASKS)


def collect(pytester: pytest.Pytester, spec_dir: Path, *args: str) -> tuple[list[str], int, list]:
    """(ids of the experiment cases left after selection, throughput cases left, deselect calls)."""
    rec = pytester.inline_run(BENCHMARKS, "--collect-only", "-p", "no:cacheprovider",
                              "--specs", str(spec_dir), *args)
    items = rec.getcalls("pytest_collection_finish")[0].session.items
    ids = [item.callspec.id for item in items if item.originalname == "test_experiment"]
    throughput = sum(item.originalname in ("test_throughput", "test_fused_throughput", "test_store_lookup")
                     for item in items)
    return ids, throughput, rec.getcalls("pytest_deselected")


@pytest.mark.parametrize("expr, expected", [
    ("ce", ["loss-ce-lr0.001-bs32", "lr-ce-lr0.001-bs32", "lr-ce-lr0.1-bs32"]),
    ("bce", ["bs-bce-lr0.001-bs32", "bs-bce-lr0.001-bs128", "loss-bce-lr0.001-bs32"]),
    ("CE", ["loss-ce-lr0.001-bs32", "lr-ce-lr0.001-bs32", "lr-ce-lr0.1-bs32"]),
    ("lr0.1", ["lr-ce-lr0.1-bs32"]),
    ("bs128", ["bs-bce-lr0.001-bs128"]),
    ("not ce", ["bs-bce-lr0.001-bs32", "bs-bce-lr0.001-bs128", "loss-bce-lr0.001-bs32"]),
    ("ce and not lr0.1", ["loss-ce-lr0.001-bs32", "lr-ce-lr0.001-bs32"]),
    ("bce or lr0.1",
     ["bs-bce-lr0.001-bs32", "bs-bce-lr0.001-bs128", "loss-bce-lr0.001-bs32", "lr-ce-lr0.1-bs32"]),
    ("loss-", ["loss-bce-lr0.001-bs32", "loss-ce-lr0.001-bs32"]),
])
def test_k_selects_what_the_user_means(pytester, spec_dir, expr, expected):
    ids, throughput, deselect_calls = collect(pytester, spec_dir, "-k", expr)
    assert ids == [f"{i}-seed0" for i in expected]
    # the same runs as `cxr-bench run -k` (cxr.spec.matches), in the same order
    assert ids == [s.run_id for s in spec_mod.load([spec_dir]) if selection.matches(s, expr)]
    # the throughput and store-lookup cases have no loss of their own: a loss word never selects them
    assert throughput == (14 if expr.startswith("not") else 0)
    # deselected once, by the runner's hook, and reported: 6 experiment + 3 + 9 throughput + 2 lookup cases
    assert len(deselect_calls) == 1
    assert len(deselect_calls[0].items) == 20 - len(ids) - throughput


def test_k_keeps_pytest_meaning_for_other_words_and_outside_benchmarks(pytester, spec_dir):
    ids, throughput, _ = collect(pytester, spec_dir, "-k", "throughput")
    assert (ids, throughput) == ([], 12)  # test_throughput and test_fused_throughput
    ids, throughput, _ = collect(pytester, spec_dir, "-k", "test_experiment and bs32")
    assert ids == ["bs-bce-lr0.001-bs32-seed0", "loss-bce-lr0.001-bs32-seed0", "loss-ce-lr0.001-bs32-seed0",
                   "lr-ce-lr0.001-bs32-seed0", "lr-ce-lr0.1-bs32-seed0"]
    # a test outside benchmarks/ is matched by substring, exactly as plain pytest does
    outside = pytester.makepyfile(test_outside="def test_bce_helper():\n    pass\n")
    rec = pytester.inline_run(BENCHMARKS, outside, "--collect-only", "-p", "no:cacheprovider",
                              "--specs", str(spec_dir), "-k", "ce")
    names = [i.name for i in rec.getcalls("pytest_collection_finish")[0].session.items]
    assert names == [f"test_experiment[{i}-seed0]" for i in ("loss-ce-lr0.001-bs32", "lr-ce-lr0.001-bs32",
                                                             "lr-ce-lr0.1-bs32")] + ["test_bce_helper"]


def test_ce_in_a_folder_name_does_not_pull_in_bce_cases(pytester, spec_dir, monkeypatch):
    # a checkout inside a folder named "science": that name is on every case's node chain
    copy = pytester.path / "science" / "benchmarks"
    shutil.copytree(BENCHMARKS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", str(BENCHMARKS.parent))  # cxr from this checkout
    result = pytester.runpytest_subprocess(copy / "test_experiments.py", "--rootdir", pytester.path,
                                           "--collect-only", "-q", "-p", "no:cacheprovider",
                                           "--specs", spec_dir, "-k", "ce")
    assert result.ret == pytest.ExitCode.OK
    ids = re.findall(r"^science/benchmarks/test_experiments.py::test_experiment\[(.+)\]$", result.stdout.str(), re.M)
    assert ids == ["loss-ce-lr0.001-bs32-seed0", "lr-ce-lr0.001-bs32-seed0", "lr-ce-lr0.1-bs32-seed0"]
    result.stdout.fnmatch_lines(["3/6 tests collected (3 deselected)*"])


def test_markers_are_registered_for_strict_m_selection(pytester, spec_dir):
    ids, _, _ = collect(pytester, spec_dir, "--strict-markers", "-m", "ce and task_lr")
    assert ids == ["lr-ce-lr0.001-bs32-seed0", "lr-ce-lr0.1-bs32-seed0"]
    ids, _, _ = collect(pytester, spec_dir, "--strict-markers", "-m", "sweep_batch_size")
    assert ids == ["bs-bce-lr0.001-bs32-seed0", "bs-bce-lr0.001-bs128-seed0"]


def test_overrides_change_the_cases(pytester, spec_dir):
    ids, _, _ = collect(pytester, spec_dir, "-k", "lr0.1", "--seeds", "2")
    assert ids == ["lr-ce-lr0.1-bs32-seed0", "lr-ce-lr0.1-bs32-seed1"]


@pytest.mark.parametrize("args, message", [
    (["--specs", "missing.toml"], "missing.toml: no such spec file"),
    (["--epochs", "0"], "--epochs = 0: must be in [1, 10000]"),
    (["--seeds", "0"], "--seeds 0: expected an integer >= 1"),
    (["--throughput-images", "1"], "--throughput-images 1: expected an integer >= 2"),
])
def test_bad_options_are_usage_errors(pytester, spec_dir, args, message):
    result = pytester.runpytest_inprocess(BENCHMARKS, "--collect-only", "-p", "no:cacheprovider",
                                          "--specs", str(spec_dir), *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_a_bad_graph_steps_setting_is_a_usage_error(pytester, spec_dir, monkeypatch):
    monkeypatch.setenv("CXR_GRAPH_STEPS", "0")
    result = pytester.runpytest_inprocess(BENCHMARKS, "--collect-only", "-p", "no:cacheprovider",
                                          "--specs", str(spec_dir))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "CXR_GRAPH_STEPS='0': expected a positive integer or 'epoch'" in result.stderr.str()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_a_usage_error(pytester, spec_dir):
    result = pytester.runpytest_inprocess(BENCHMARKS, "--collect-only", "-p", "no:cacheprovider",
                                          "--specs", str(spec_dir), "--device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "no CUDA GPU is available" in result.stderr.str()


def run_suite(pytester: pytest.Pytester, *args) -> pytest.RunResult:
    """The experiment cases (not the throughput ones) in a subprocess, on CPU."""
    return pytester.runpytest_subprocess(BENCHMARKS / "test_experiments.py", "-p", "no:cacheprovider",
                                         "--device", "cpu", *map(str, args), timeout=120)


def result_files(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*/seed-*.json"))}


@pytest.mark.slow
def test_k_ce_runs_only_ce_cases_and_a_second_run_retrains_nothing(pytester, spec_dir, tmp_path):
    out = tmp_path / "results"
    ce = ["loss-ce-lr0.001-bs32", "lr-ce-lr0.001-bs32", "lr-ce-lr0.1-bs32"]
    first = run_suite(pytester, "--specs", spec_dir, "--out", out, "-k", "ce",
                      "--benchmark-json", tmp_path / "1.json")
    first.assert_outcomes(passed=3, deselected=3)
    doc = json.loads((tmp_path / "1.json").read_text())
    info = {b["extra_info"]["id"]: b["extra_info"] for b in doc["benchmarks"]}
    assert sorted(info) == ce
    for extra in info.values():
        assert extra["seed"] == 0 and extra["device"] == "cpu" and extra["status"] in ("ok", "diverged")
        assert {"test_sensitivity", "test_specificity", "train_seconds", "images_per_second"} <= set(extra)
    ok = info["loss-ce-lr0.001-bs32"]
    assert ok["status"] == "ok" and 0 <= ok["test_accuracy"] <= 1 and 0 <= ok["test_auroc"] <= 1
    assert ok["best_epoch"] == 1 and ok["train_seconds"] > 0 and ok["images_per_second"] > 0
    assert ok["cached"] is False
    # lr-ce-lr0.001 is the same recipe as loss-ce-lr0.001: taken from the store, not trained twice
    assert info["lr-ce-lr0.001-bs32"]["cached"] is True
    assert sorted(result_files(out)) == ce  # no BCE run was trained
    first.stdout.fnmatch_lines(["*cxr-bench: 3 runs, 2 trained, 1 from the store*"])

    stored = result_files(out)
    second = run_suite(pytester, "--specs", spec_dir, "--out", out, "-k", "ce",
                       "--benchmark-json", tmp_path / "2.json")
    second.assert_outcomes(passed=3, deselected=3)
    doc = json.loads((tmp_path / "2.json").read_text())
    again = {b["extra_info"]["id"]: b["extra_info"] for b in doc["benchmarks"]}
    assert sorted(again) == ce and all(again[i]["cached"] is True for i in ce)
    assert [again[i]["test_accuracy"] for i in ce] == [info[i]["test_accuracy"] for i in ce]
    assert result_files(out) == stored  # nothing rewritten
    second.stdout.fnmatch_lines(["*cxr-bench: 3 runs, 0 trained, 3 from the store*"])


@pytest.mark.slow
def test_a_failed_run_fails_only_its_case(pytester, tmp_path):
    npz = write_npz(tmp_path / "tiny.npz")
    specs = write_specs(tmp_path / "specs", f"npz:{npz}", {"good": dict(loss="ce", lr=0.001, grid=""),
                                                            "crash": dict(loss="ce", lr=0.002, grid="")})
    write_specs(specs, f"npz:{tmp_path / 'missing.npz'}", {"nodata": dict(loss="bce", lr=0.001, grid="")})
    out = tmp_path / "results"
    (out / "runs" / "crash-ce-lr0.002-bs32").mkdir(parents=True)
    (out / "runs" / "crash-ce-lr0.002-bs32" / "seed-0").write_text("")  # where its weights folder must go

    result = run_suite(pytester, "--specs", specs, "--out", out, "--benchmark-json", tmp_path / "b.json")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["crash-ce-lr0.002-bs32-seed0: FileExistsError: *",
                                 "*missing.npz: no such file"])
    assert "Traceback" not in result.stdout.str()  # one-line failures, no stack trace
    doc = json.loads((tmp_path / "b.json").read_text())
    status = {b["extra_info"]["id"]: b["extra_info"]["status"] for b in doc["benchmarks"]}
    assert status == {"crash-ce-lr0.002-bs32": "failed", "good-ce-lr0.001-bs32": "ok"}  # no run for bad data


@pytest.mark.slow
def test_throughput_reports_the_ratio_per_batch_size(pytester, tmp_path):
    result = pytester.runpytest_subprocess(BENCHMARKS / "test_throughput.py", "-p", "no:cacheprovider",
                                           "--device", "cpu", "--throughput-images", "64", "-k", "not fused",
                                           "--benchmark-json", tmp_path / "t.json", timeout=120)
    result.assert_outcomes(passed=3, deselected=9)
    result.stdout.fnmatch_lines(["*cxr-bench throughput: engine (cxr.engine.fit) vs the course loop*",
                                 "*64 images per timed pass, best of 3*",
                                 "   32 *x *%*", "   64 *x *%*", "  128 *x *%*"])
    rows = [b["extra_info"] for b in json.loads((tmp_path / "t.json").read_text())["benchmarks"]]
    assert sorted(r["batch_size"] for r in rows) == [32, 64, 128]
    for r in rows:
        assert r["images"] == 64 and r["device"] == "cpu"
        assert r["train_ratio"] == pytest.approx(r["engine_train_ips"] / r["course_train_ips"], rel=1e-2)
        assert 0 < r["engine_train_mfu"] < 1 and 0 < r["course_train_mfu"] < 1 and r["peak_gflops"] > 0
        assert r["model_mflops"] > 0 and r["eval_ratio"] > 0


def test_k_focal_selects_exactly_the_focal_runs(pytester, tmp_path):
    """A third loss comes from cxr.losses alone: its marker, its -k word and its runs."""
    folder = write_specs(tmp_path / "specs", "synthetic",
                         {"l3": dict(loss="ce", lr=0.001, grid='[grid]\nloss = ["bce", "ce", "focal"]')})
    for expr, loss in (("focal", "focal"), ("ce", "ce"), ("bce", "bce")):
        ids, throughput, _ = collect(pytester, folder, "-k", expr)
        assert ids == [f"l3-{loss}-lr0.001-bs32-seed0"] and throughput == 0
    ids, _, _ = collect(pytester, folder, "-m", "focal")
    assert ids == ["l3-focal-lr0.001-bs32-seed0"]


@pytest.mark.slow
def test_fused_throughput_reports_each_kernel_against_sequential(pytester, tmp_path):
    result = pytester.runpytest_subprocess(BENCHMARKS / "test_throughput.py", "-p", "no:cacheprovider",
                                           "--device", "cpu", "--throughput-images", "64", "--throughput-rounds", "5",
                                           "-k", "fused and members3 and batch32",
                                           "--benchmark-json", tmp_path / "f.json", timeout=120)
    result.assert_outcomes(passed=1, deselected=11)
    result.stdout.fnmatch_lines(["*cxr-bench fused training: a group at once (cxr.engine) vs its runs one after*",
                                 "*64 images per member and pass*'default': the kernel cxr-bench run picks*",
                                 "memory roofline: * GB/s measured / * bytes per training image*",
                                 "      3    32 * *x *x *x * *x *%",
                                 "default kernel / sequential, round by round*5 rounds*",
                                 "      3    32  *x [[]*, *]"])  # [[] : a literal [ in fnmatch
    (row,) = [b["extra_info"] for b in json.loads((tmp_path / "f.json").read_text())["benchmarks"]]
    assert row["members"] == 3 and row["batch_size"] == 32 and row["images_per_member"] == 64
    assert row["loop_vs_sequential"] == pytest.approx(row["loop_ips"] / row["sequential_ips"], rel=1e-2)
    from cxr.kernels import default_kernel
    from cxr.spec import ExperimentSpec

    assert row["default_kernel"] == default_kernel(torch.device("cpu"), ExperimentSpec(name="f", batch_size=32))
    assert row["fused_vs_sequential"] == row[f"{row['default_kernel']}_vs_sequential"]  # what cxr-bench run picks
    assert row["grouped_ips"] > 0 and row["course_ips"] > 0 and 0 < row["roofline_fraction"] < 1
    assert row["vmap_vs_sequential"] == pytest.approx(row["vmap_ips"] / row["sequential_ips"], rel=1e-2)
    assert row["rounds"] == 5
    assert row["fused_vs_sequential_ci_low"] <= row["fused_vs_sequential_median_of_rounds"] \
        <= row["fused_vs_sequential_ci_high"]
    assert row["bytes_per_training_image"] > 0 and row["bandwidth_gbs"] > 0


def test_each_xdist_worker_takes_its_own_gpu():
    from benchmarks.conftest import worker_gpu

    assert [worker_gpu(f"gw{i}", ["0", "1"]) for i in range(4)] == ["0", "1", "0", "1"]
    assert worker_gpu("gw5", ["3", "7", "9"]) == "9"  # an existing CUDA_VISIBLE_DEVICES list is honoured
    assert worker_gpu("gw0", []) is None


@pytest.mark.slow
def test_xdist_runs_and_reports_the_same_cases(pytester, spec_dir, tmp_path):
    """`pytest benchmarks -n 2` selects, runs and reports the cases that a run without -n does: the same
    outcomes, summary rows, benchmark JSON entries (with timings) and store, each fused group in one worker."""
    pytest.importorskip("xdist")
    runs = {}
    for name, extra in (("plain", ()), ("xdist", ("-n", "2"))):
        out = tmp_path / name
        result = run_suite(pytester, "--specs", spec_dir, "--out", out / "results", "-k", "not lr0.1",
                           "--benchmark-json", out / "b.json", "-v", *extra)
        result.assert_outcomes(passed=5, deselected=0 if extra else 1)  # xdist's workers deselect, unreported
        rows = sorted(line.split()[0] for line in result.outlines if re.match(r"\w+-(b?ce)-lr\S+-seed0 ", line))
        doc = json.loads((out / "b.json").read_text())
        info = {b["name"]: (b["stats"]["rounds"], b["extra_info"]["status"], b["extra_info"]["test_accuracy"])
                for b in doc["benchmarks"]}
        runs[name] = (rows, info, sorted(result_files(out / "results")), result.stdout.str())
    (rows, info, files, _), (xrows, xinfo, xfiles, xout) = runs["plain"], runs["xdist"]
    assert len(rows) == 5 and xrows == rows
    assert len(info) == 5 and xinfo == info  # CPU training is deterministic at one thread
    assert xfiles == files
    assert "2 workers [5 items]" in xout and "Benchmarks are automatically disabled" not in xout
    workers = {m.group(2): m.group(1) for m in re.finditer(r"\[(gw\d)\] .*PASSED .*test_experiment\[(\S+)\]", xout)}
    assert workers["loss-bce-lr0.001-bs32-seed0"] == workers["bs-bce-lr0.001-bs32-seed0"]  # one fused group


@pytest.mark.parametrize("args, message", [
    (["--dist", "worksteal"], "--dist worksteal cannot keep a fused group on one worker; use --dist load "
                              "(the default here) or --no-fuse"),
    (["--dist", "each"], "--dist each runs every case in every worker"),
    (["--dist", "each", "--no-fuse"], "--dist each runs every case in every worker"),
], ids=["worksteal", "each", "each-no-fuse"])
def test_xdist_modes_that_split_a_fused_group_are_usage_errors(pytester, spec_dir, args, message):
    """worksteal moves single cases to an idle worker, which then finds its run claimed by the worker training
    the group, and each runs every case in every worker: refused before any worker starts."""
    pytest.importorskip("xdist")
    result = pytester.runpytest_inprocess(BENCHMARKS, "--collect-only", "-p", "no:cacheprovider",
                                          "--specs", str(spec_dir), "-n", "2", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


@pytest.mark.slow
@pytest.mark.parametrize("dist", [("--dist", "loadgroup"), ("--dist", "worksteal", "--no-fuse")],
                         ids=["loadgroup", "worksteal-no-fuse"])
def test_xdist_modes_train_every_case_once(pytester, spec_dir, tmp_path, dist):
    """loadgroup hands out whole fused groups (as load does); worksteal is fine with --no-fuse, where every
    group is one run: no case is skipped as claimed by a sibling worker."""
    pytest.importorskip("xdist")
    result = run_suite(pytester, "--specs", spec_dir, "--out", tmp_path / "results", "-k", "not lr0.1",
                       "-v", "-rs", "-n", "2", *dist)
    result.assert_outcomes(passed=5)  # none skipped
    assert sorted(result_files(tmp_path / "results")) == ["bs-bce-lr0.001-bs128", "bs-bce-lr0.001-bs32",
                                                          "loss-bce-lr0.001-bs32", "loss-ce-lr0.001-bs32",
                                                          "lr-ce-lr0.001-bs32"]
    out = result.stdout.str()
    workers = {m.group(2): m.group(1) for m in re.finditer(r"\[(gw\d)\] .*PASSED .*test_experiment\[(\S+)\]", out)}
    assert len(workers) == 5
    if "--no-fuse" in dist:
        assert " fused " not in out  # every run trained alone
    else:  # the batch-32 group trained in one worker
        assert len({workers[f"{r}-seed0"] for r in ("bs-bce-lr0.001-bs32", "loss-bce-lr0.001-bs32",
                                                    "loss-ce-lr0.001-bs32", "lr-ce-lr0.001-bs32")}) == 1
