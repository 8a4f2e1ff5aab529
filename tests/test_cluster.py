"""`cxr-bench run --ray` (cxr.cluster): a sweep spread over a Ray cluster stores exactly what a sequential
run stores; declared GPUs are handed out one per task; a node lost mid-sweep loses no run and stores none
twice; Ctrl-C keeps what finished; without Ray, one line says how to install it. And deploy/: the KubeRay
RayJob and the Slurm script parse and say what they must.

The Ray tests skip, saying so, where Ray is not installed (pip install -e ".[ray]"; CI installs it).
There is no GPU here: the "GPUs" are declared to Ray (num_gpus=2), which hands them out and sets
CUDA_VISIBLE_DEVICES, while the tasks train on the CPU (device="cpu").
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cxr import cli, cluster, results, selection, sweep
from tests.conftest import learnable_npz

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}


def _ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')


@pytest.fixture(autouse=True)
def watchdog():
    """A Ray test that hangs (a task that is never scheduled waits forever) ends the session with every
    thread's traceback after 180 s, instead of stalling CI."""
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def one_thread():
    """One torch thread here, so that the tasks (which use the driver's count) and the sequential run agree
    and two tasks fit the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="class")
def ray_two_gpus():
    """A local Ray of 2 CPUs and 2 declared GPUs (Ray accepts GPUs that are not there), for one class."""
    ray = _ray()
    ray.init(address="local", num_cpus=2, num_gpus=2, **QUIET)
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    """Fail the test (rather than the watchdog ending the session) when the block runs past `seconds`: the
    driver's wait loop wakes every CHECKPOINT_POLL seconds, so the alarm's exception gets in."""
    def fail(*_):
        pytest.fail(f"still running after {seconds:g} s: {what}")

    before = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _spec_files(tmp_path: Path, twin: bool = True, fuse: bool = True) -> list[str]:
    """A 2 x 2 grid (lr x batch size) on a small npz; with `twin`, a second file holding one of its
    recipes under another id (trained once, copied)."""
    npz = learnable_npz(tmp_path / "d.npz", 0, (("train", 96), ("val", 32), ("test", 32)))
    head = f'dataset = "npz:{npz}"\nepochs = 1\nwidth = 4\nseeds = [0]\nfuse = {str(fuse).lower()}\n'
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[experiment]\nname = "c"\n{head}[grid]\nlr = [0.001, 0.01]\nbatch_size = [32, 64]\n')
    files = [str(grid)]
    if twin:
        (tmp_path / "twin.toml").write_text(f'[experiment]\nname = "t"\n{head}lr = 0.001\nbatch_size = 32\n')
        files.append(str(tmp_path / "twin.toml"))
    return files


def _store(out: Path) -> list[str]:
    """Every file of a results directory, relative to it (results, attempts, weights, locks, temp files),
    but the lookup index runs/.index.json (cxr.index): a cache of the result files, rebuilt from them."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != ".index.json")


def _same_run(a, b) -> None:
    assert (a.id, a.seed, a.status, a.identity, a.best_epoch, a.reused_from) == \
        (b.id, b.seed, b.status, b.identity, b.best_epoch, b.reused_from)
    assert a.metrics == b.metrics and a.predictions == b.predictions
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in a.history] == \
        [{k: v for k, v in e.items() if k != "seconds"} for e in b.history]


@pytest.mark.usefixtures("ray_two_gpus", "one_thread")
class TestDeclaredGpus:
    """Test 1 and Ctrl-C, on one local Ray (started once: it takes seconds)."""

    def test_1_one_gpu_per_task_and_the_sequential_store(self, tmp_path):
        specs = selection.select(_spec_files(tmp_path))
        units = sweep.groups(specs)
        assert [len(u) for u in units] == [3, 2]  # batch 32 (with the twin) and batch 64: two tasks
        seen = []
        got = cluster.run_on_ray(units, tmp_path / "ray", None, gpus_per_task=1, device="cpu", progress=False,
                                 on_result=lambda s, r: seen.append(s.run_id))
        assert sorted(seen) == sorted(s.run_id for s in specs)  # each run reported once
        for unit in units:
            sweep.run_group(unit, tmp_path / "seq", "cpu", progress=False)

        assert _store(tmp_path / "ray") == _store(tmp_path / "seq")  # the same files: no locks, no attempts
        for spec, rec in zip([s for u in units for s in u], got, strict=True):  # results in the order of the units
            seq = results.read(results.run_path(tmp_path / "seq", spec))
            ray_rec = results.read(results.run_path(tmp_path / "ray", spec))
            assert ray_rec == rec and rec.ok
            _same_run(rec, seq)
            a = torch.load(results.weights_path(tmp_path / "ray", spec), weights_only=True)
            b = torch.load(results.weights_path(tmp_path / "seq", spec), weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        twin = next(r for r in got if r.id.startswith("t-"))
        assert twin.reused_from == "c-ce-lr0.001-bs32"  # trained once, copied, as the sequential run does

        # One GPU per task: the two tasks (units) saw different CUDA_VISIBLE_DEVICES, and trained on the CPU.
        trained = [r for r in got if not r.reused_from]
        visible = {u: {r.environment["cuda_visible_devices"] for r in trained if r.id.endswith(f"bs{u}")}
                   for u in (32, 64)}
        assert all(len(v) == 1 for v in visible.values()) and visible[32] | visible[64] == {"0", "1"}
        assert {r.environment["device"] for r in got} == {"cpu"}

        # A second sweep trains nothing: every run is served from the store.
        again = cluster.run_on_ray(units, tmp_path / "ray", None, progress=False)
        assert all(r.cached for r in again) and _store(tmp_path / "ray") == _store(tmp_path / "seq")

    def test_a_task_whose_worker_dies_resumes_from_its_last_epoch(self, tmp_path, monkeypatch):
        """The worker dies (os._exit) right after the first epoch's checkpoint; Ray retries the task, which
        resumes from that checkpoint (through the driver's relay) and ends as a sequential run."""
        (spec,) = selection.select(_spec_files(tmp_path, twin=False), epochs=3, keyword_expr="lr0.001 and bs32")
        marker = tmp_path / "died"

        def dying_task(specs, threads, device, relay=None, _train=cluster._train_task, _marker=str(marker)):
            import os
            from pathlib import Path

            from cxr import relay as here

            real = here.RelayCheckpoints.save

            def save(self, s, state):
                real(self, s, state)
                if state["epoch"] == 1 and not Path(_marker).exists():
                    Path(_marker).touch()
                    os._exit(1)  # the worker process dies, as with a lost node

            here.RelayCheckpoints.save = save
            return _train(specs, threads, device, relay)

        monkeypatch.setattr(cluster, "_train_task", dying_task)
        (rec,) = cluster.run_on_ray([[spec]], tmp_path / "ray", None, gpus_per_task=0, device="cpu", progress=False)
        assert marker.exists() and rec.ok and rec.timing["resumed_after_epoch"] == 1
        _same_run(rec, sweep.run(spec, tmp_path / "seq", "cpu", progress=False))
        assert not list((tmp_path / "ray").rglob("*.checkpoint.pt"))

    def test_a_unit_resumes_from_the_stores_checkpoint(self, tmp_path, monkeypatch):
        """A local run killed after epoch 2 left its checkpoint in the store; --ray resumes from it."""
        (spec,) = selection.select(_spec_files(tmp_path, twin=False), epochs=3, keyword_expr="lr0.01 and bs64")
        real = sweep.StoreCheckpoints.save

        def killed(self, s, state):
            real(self, s, state)
            if state["epoch"] == 2:
                raise KeyboardInterrupt

        monkeypatch.setattr(sweep.StoreCheckpoints, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            sweep.run(spec, tmp_path / "ray", "cpu", progress=False)
        monkeypatch.undo()
        (rec,) = cluster.run_on_ray([[spec]], tmp_path / "ray", None, gpus_per_task=0, device="cpu", progress=False)
        assert rec.ok and rec.timing["resumed_after_epoch"] == 2
        _same_run(rec, sweep.run(spec, tmp_path / "seq", "cpu", progress=False))

    def test_a_task_that_cannot_start_yet_says_what_it_awaits(self, tmp_path, monkeypatch):
        """An actor holds both GPUs; after AWAIT_NOTICE seconds without a task starting, one line says what
        the task awaits (and the test then frees the GPUs, so the task starts and finishes)."""
        ray = _ray()

        class Holder:
            def ready(self):
                return True

        holder = ray.remote(num_gpus=2, num_cpus=0)(Holder).remote()
        ray.get(holder.ready.remote())  # both GPUs are taken
        monkeypatch.setattr(cluster, "AWAIT_NOTICE", 0.5)
        (spec,) = selection.select(_spec_files(tmp_path, twin=False), keyword_expr="lr0.001 and bs32")
        lines = []

        def say(line):
            lines.append(line)
            if "not started" in line:
                ray.kill(holder)  # the GPUs are free again

        with _deadline(120, "the task never started"):
            (rec,) = cluster.run_on_ray([[spec]], tmp_path / "out", None, gpus_per_task=1, device="cpu",
                                        progress=False, say=say)
        assert rec.ok
        (wait,) = [line for line in lines if "not started" in line]  # once: then the task started
        assert re.fullmatch(r"Ray: 1 task not started after \d+s, each asking 1 GPU, 1 CPU; the cluster has "
                            r"\d+ of 2 CPUs and 0 of 2 GPUs free", wait), wait

    def test_ctrl_c_cancels_the_rest_and_keeps_what_finished(self, tmp_path):
        specs = selection.select(_spec_files(tmp_path, twin=False))
        units = sweep.groups(specs)
        seen = []

        def interrupt(spec, rec):
            seen.append(spec)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            cluster.run_on_ray(units, tmp_path / "out", None, gpus_per_task=0, device="cpu", progress=False,
                               on_result=interrupt)
        unit = next(u for u in units if seen[0] in u)
        for spec in unit:  # every run of the task that finished is stored, before anyone is told
            assert results.read(results.run_path(tmp_path / "out", spec)).ok
        assert len(results.result_files(tmp_path / "out")) == len(unit)  # the other task's runs: not stored
        assert not [f for f in _store(tmp_path / "out") if f.endswith(".lock")]  # the claims are released


def test_2_a_node_lost_mid_sweep_loses_no_run_and_stores_none_twice(one_thread, tmp_path, monkeypatch):
    ray = _ray()
    from ray.cluster_utils import Cluster

    started = tmp_path / "started"  # each task touches <run id>@<node id>@<time> here as it starts
    started.mkdir()

    def slow_task(specs, threads, device, relay=None, _train=cluster._train_task, _started=str(started)):
        import time
        from pathlib import Path

        import ray

        Path(_started, f"{specs[0].run_id}@{ray.get_runtime_context().get_node_id()}@{time.time()}").touch()
        time.sleep(0.5)  # long enough for the test to remove the node while the task runs there
        return _train(specs, threads, device, relay)

    monkeypatch.setattr(cluster, "_train_task", slow_task)  # a closure: Ray ships it by value
    fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                        "_system_config": fast})  # the head trains nothing
    removed = []

    def remove_the_first_busy_node():
        while not (first := list(started.iterdir())):
            time.sleep(0.02)
        node_id = first[0].name.split("@")[1]
        node = next(n for n in nodes if n.node_id == node_id)
        sim.remove_node(node, allow_graceful=False)  # kill -9 of its raylet and workers, mid-task
        removed.append(node_id)

    try:
        nodes = [sim.add_node(num_cpus=1) for _ in range(2)]
        sim.wait_for_nodes()
        specs = selection.select(_spec_files(tmp_path, twin=False, fuse=False))
        units = sweep.groups(specs, fuse=False)
        assert len(units) == 4
        killer = threading.Thread(target=remove_the_first_busy_node, daemon=True)
        killer.start()
        got = cluster.run_on_ray(units, tmp_path / "out", sim.address, device="cpu", progress=False)
        killer.join(timeout=10)
    finally:
        ray.shutdown()
        sim.shutdown()
    assert len(removed) == 1 and all(r.ok for r in got)
    starts = [name.split("@")[:2] for name in sorted(p.name for p in started.iterdir())]
    lost = [run for run, node in starts if node == removed[0]]
    assert len(lost) == 1 and len(starts) == 5  # the task on the removed node started again elsewhere
    rec = next(r for r in got if r.run_id == lost[0])
    assert rec.environment["ray_node_id"] != removed[0]  # its stored result is the retry's
    files = _store(tmp_path / "out")
    assert [f for f in files if f.endswith(".json")] == sorted(f"runs/{s.id}/seed-0.json" for s in specs)
    assert len([f for f in files if f.endswith("model_weights.pth")]) == 4 and len(files) == 8  # nothing else


def test_3_without_ray_one_line_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = cli.main(["run", *_spec_files(tmp_path, twin=False), "--ray", "local", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("cxr-bench run: error: --ray needs Ray") and 'pip install -e ".[ray]"' in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_gpu_task_on_a_machine_without_gpus_is_refused_at_once(one_thread, tmp_path, capsys, monkeypatch):
    """--ray local --gpus-per-task 1 where there is no GPU: Ray would wait forever for one; one line, exit 2,
    nothing stored, no claim left."""
    ray = _ray()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a local Ray of CPUs only, even on a GPU machine
    out = tmp_path / "out"
    t0 = time.monotonic()
    with _deadline(120, "a task that asks for a GPU the cluster does not have waits forever"):
        code = cli.main(["run", *_spec_files(tmp_path, twin=False), "--ray", "local", "--gpus-per-task", "1",
                         "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and time.monotonic() - t0 < 60
    assert re.fullmatch(r"cxr-bench run: error: --ray local: each task asks for 1 GPU and 1 CPU, and this machine "
                        r"has \d+ CPUs and 0 GPUs, so no task could ever start; --gpus-per-task 0 trains on the "
                        r"CPUs\n", err), err
    assert _store(out) == [] and not ray.is_initialized()  # no result, lock or checkpoint; the local Ray is gone


def test_a_cluster_with_no_node_for_a_task_is_refused(one_thread, tmp_path):
    """Joining a cluster (an autoscaler may add nodes later) whose alive nodes cannot hold one task: refused
    too, saying what was asked and what the nodes have."""
    ray = _ray()
    (spec,) = selection.select(_spec_files(tmp_path, twin=False), keyword_expr="lr0.001 and bs32")
    ray.init(address="local", num_cpus=2, num_gpus=0, **QUIET)
    try:
        with _deadline(60, "a task that asks for a GPU the cluster does not have waits forever"), \
                pytest.raises(cluster.RayError) as e:
            cluster.run_on_ray([[spec]], tmp_path / "out", None, gpus_per_task=1, device="cpu", progress=False)
    finally:
        ray.shutdown()
    assert str(e.value) == ("Ray: each task asks for 1 GPU and 1 CPU, and no alive node has that (nodes: 1 x (2 "
                            "CPUs, 0 GPUs)); a task would wait for a node the cluster may never add; "
                            "--gpus-per-task 0 trains on the CPUs")
    assert _store(tmp_path / "out") == []


def test_gpus_per_task_needs_ray(tmp_path, capsys):
    assert cli.main(["run", *_spec_files(tmp_path, twin=False), "--gpus-per-task", "1"]) == 2
    assert "--gpus-per-task: only with --ray" in capsys.readouterr().err


def test_4_cli_ray_local_end_to_end(one_thread, tmp_path, capsys):
    ray = _ray()
    files = _spec_files(tmp_path, twin=False)
    assert cli.main(["run", *files, "--ray", "local", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "4 runs -> " in out and "on a Ray cluster (local)" in out and "Ray cluster of 1 nodes" in out
    lines = [line for line in out.splitlines() if re.match(r"\[\d/4\] c-ce-lr", line)]
    assert sorted(line[:5] for line in lines) == [f"[{i}/4]" for i in range(1, 5)]
    assert all(" ok " in line and "test acc" in line for line in lines)
    assert "done in" in out and "0 failed" in out
    assert len(results.load_all(tmp_path / "out")) == 4 and not ray.is_initialized()  # the local Ray is gone


# deploy/: no Ray needed.

def test_deploy_rayjob_manifest():
    text = (ROOT / "deploy/rayjob.yaml").read_text()
    try:
        import yaml
    except ImportError:  # PyYAML comes with Ray; without it, check the text
        assert re.search(r"^apiVersion: ray\.io/v1$", text, re.M) and re.search(r"^kind: RayJob$", text, re.M)
        assert re.search(r"^\s+image: cxr-bench$", text, re.M) and "nvidia.com/gpu: 1" in text
        assert "cxr-bench run --ray auto --out /out/results" in text and "cxr-bench report" in text
        return
    job = yaml.safe_load(text)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].split(" && ") == ["cxr-bench run --ray auto --out /out/results",
                                               "cxr-bench report /out/results"]
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert {c["image"] for c in containers} == {"cxr-bench"}
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") == 1 for c in containers)


def test_deploy_slurm_script():
    path = ROOT / "deploy/slurm-ray.sbatch"
    text = path.read_text()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert text.startswith("#!/usr/bin/env bash") and "#SBATCH --nodes=" in text
    for needed in ("ray start --head", "ray start --address", "cxr-bench run --ray auto", "cxr-bench report"):
        assert needed in text, needed
