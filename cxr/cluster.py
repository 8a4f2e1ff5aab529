"""A sweep spread over a Ray cluster: `cxr-bench run --ray ADDRESS` (Ray core tasks; `pip install -e ".[ray]"`).

The unit of work is what the engine trains at once (cxr.sweep.groups: several runs of one fusion key, or
one run alone). One Ray task trains one unit with `cxr.unit.train_unit` and returns its runs, records and
CPU weights, without touching any store: the driver (the process running cxr-bench) alone reads and writes
the results directory, so the nodes need the data and cxr-bench installed, not a shared file system for
the results. The driver needs no GPU; it loads each data set too (a run's identity includes the data's
fingerprint), and its Ray must be the cluster's version. It follows `cxr.sweep.run_group`'s rules, for the
whole sweep:

- a run whose result is stored is served (or copied from an identical run stored under another id);
- every other run is claimed (cxr.results.claim) before its unit is submitted, and released once stored;
  a run claimed by another process is reported `Claimed`, as the local path does;
- runs of one identity ("twins", e.g. Task A's CE run is Task B's lr 0.001 run) train once, anywhere in
  the sweep (under --rerun too, where run_group copies within a unit only); the others become copies
  when that result arrives (and train on their own if it failed);
- a task saves each run's checkpoint at the end of every epoch through an actor (cxr.relay.Relay); the driver
  writes them into the store while it waits, a retried task resumes from them, and a unit whose runs
  have checkpoints in the store resumes from those (cxr.sweep.StoreCheckpoints' rules);
- each run is stored exactly once, when its task's result arrives (cxr.sweep.store: atomic, an ok result
  is never replaced by a failed one). A task lost with its node or worker is retried by Ray
  (`max_retries`); ordinary exceptions are not retried (train_unit records them as failed runs), and a
  task that still cannot finish is stored as failed runs (their environment is the driver's), retried by
  the next `cxr-bench run`.

A task asks for `gpus_per_task` GPUs (fractions pack several small units on one GPU; Ray sets
CUDA_VISIBLE_DEVICES for it) and trains on "cuda" when it was given GPUs, else on the CPU; `device="cpu"`
forces the CPU. A CPU task asks for as many CPUs as the driver's torch threads (at most a node's CPUs), a
GPU task for one; the worker uses the driver's torch thread count, so CPU results are those of a
sequential run. Each GPU task runs in a fresh worker process (max_calls=1), so a unit's GPU memory is
freed when it ends. Each record's environment also says where it ran: `ray_node_id` and
`cuda_visible_devices`.

Ray never starts a task that no node can hold (it waits, for a node an autoscaler may add), so the driver
refuses in one line when no alive node has one task's GPUs and CPUs, and says in one line what the tasks
wait for when none has started or finished for AWAIT_NOTICE seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from cxr import data as data_mod
from cxr import relay as relay_mod
from cxr import results, sweep, unit
from cxr.errors import CxrError, one_line
from cxr.record import RunRecord
from cxr.spec import ExperimentSpec

INSTALL = 'pip install -e ".[ray]"'
CHECKPOINT_POLL = 2.0  # seconds between the driver's writes of the tasks' new checkpoints into the store
MAX_RETRIES = 3  # Ray's retries of a task whose worker or node died (not of ordinary exceptions)
AWAIT_NOTICE = 30.0  # seconds without a task starting or finishing before one line says what the rest await
Result = RunRecord | results.Claimed


class RayError(CxrError):
    """--ray cannot be used: Ray is not installed, the cluster cannot be reached, or a bad option."""


def import_ray():
    """The ray module, or RayError saying how to install it."""
    try:
        import ray
        import ray.exceptions
    except ImportError as e:
        raise RayError(f"--ray needs Ray, which is not installed here ({one_line(e)}); install it with "
                       f"{INSTALL}") from None
    return ray


def run_on_ray(units: Sequence[Sequence[ExperimentSpec]], out: str | Path, address: str | None = "local",
               gpus_per_task: float | None = None, rerun: bool = False, device: str = "auto",
               on_result: Callable[[ExperimentSpec, Result], None] | None = None, *,
               say: Callable[[str], None] | None = None, max_retries: int = MAX_RETRIES,
               progress: bool | None = None) -> list[Result]:
    """Train the units on a Ray cluster into the store `out`; one result per run, in the order of the runs.

    address: "local" starts a cluster on this machine for the duration of the call (all its CPUs and
    CUDA GPUs), "auto" joins the cluster this node belongs to (or $RAY_ADDRESS), "ray://HOST:PORT" (Ray
    client) or "HOST:PORT" joins that one; None uses the Ray this process is already connected to. No
    cluster is started or joined when every run is served from the store.
    gpus_per_task: GPUs per unit (default 1 when the cluster has GPUs and device is not "cpu", else 0).
    device: "auto" (cuda when the task was given GPUs), "cpu" (always, even when given GPUs) or "cuda".
    on_result(spec, result) is called once per run as it finishes (served runs first); say(line) gets one
    line describing the cluster, and one whenever tasks have waited AWAIT_NOTICE seconds to start (stderr
    when say is None). RayError, before any task, when no alive node can hold one task. Ctrl-C cancels the
    outstanding tasks and raises KeyboardInterrupt; the runs stored until then stay stored.
    """
    ray = import_ray()
    if gpus_per_task is not None and (not gpus_per_task >= 0 or (gpus_per_task > 1 and gpus_per_task % 1)):
        raise RayError(f"--gpus-per-task {gpus_per_task:g}: allowed values are 0, a fraction of 1 (0.25 packs "
                       "four units on a GPU) or a whole number")
    if address is None and not ray.is_initialized():
        raise RayError("no Ray address given and this process is not connected to a Ray cluster")
    sweep = _Sweep(units, out, rerun, device, on_result, progress)
    started = False
    try:
        if sweep.plan():  # something to train
            if address is not None:
                _connect(ray, address)
                started = True
            sweep.train(ray, gpus_per_task, max_retries, say, address)
        return sweep.done
    finally:
        sweep.close()
        if started:
            ray.shutdown()


def _connect(ray, address: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report (the cluster may be offline)
    try:
        if address == "local":
            ray.init(address="local", num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(),
                     include_dashboard=False, logging_level=logging.WARNING)  # a new one, even beside a running one
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except Exception as e:  # no cluster there, wrong version, ...: one line, not Ray's traceback
        raise RayError(f"--ray {address}: cannot start or join the Ray cluster ({one_line(e)})") from None


def _check_fits(ray, gpus: float, cpus: float, address: str | None) -> None:
    """RayError when no alive node has `gpus` GPUs and `cpus` CPUs: Ray would wait for one forever (or
    until an autoscaler adds one, which "local" never does)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("GPU", 0) >= gpus and r.get("CPU", 0) >= cpus for r in nodes):
        return
    asked = f"each task asks for {gpus:g} GPU{'s' * (gpus > 1)} and {cpus:g} CPU{'s' * (cpus > 1)}"
    kinds = Counter((r.get("CPU", 0), r.get("GPU", 0)) for r in nodes)
    has = ", ".join(f"{k} x ({c:g} CPUs, {g:g} GPUs)" for (c, g), k in sorted(kinds.items())) or "none"
    hint = "; --gpus-per-task 0 trains on the CPUs" if gpus else ""
    if address == "local":  # one node, this machine: nothing will be added
        c, g = next(iter(kinds), (0, 0))
        raise RayError(f"--ray local: {asked}, and this machine has {c:g} CPUs and {g:g} GPUs, so no task "
                       f"could ever start{hint}")
    where = f"--ray {address}" if address else "Ray"
    raise RayError(f"{where}: {asked}, and no alive node has that (nodes: {has}); a task would wait for a node "
                   f"the cluster may never add{hint}")


def _train_task(specs: list[ExperimentSpec], threads: int, device: str, relay=None) -> list[unit.Trained]:
    """On a worker: load the unit's data, train it (cxr.unit.train_unit; resuming from and saving
    checkpoints through `relay`) and return its runs."""
    import ray

    if relay is not None:
        relay.begin.remote(specs[0].run_id)
    torch.set_num_threads(threads)  # the driver's: CPU results then match a sequential run's
    dev = device if device != "auto" else ("cuda" if ray.get_gpu_ids() else "cpu")
    data = data_mod.load(specs[0].dataset, specs[0].image_size)
    where = {"ray_node_id": ray.get_runtime_context().get_node_id(),
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    checkpoints = relay_mod.RelayCheckpoints(relay, data) if relay is not None else None
    return [dataclasses.replace(t, record=dataclasses.replace(t.record, environment={**t.record.environment,
                                                                                       **where}))
            for t in unit.train_unit(specs, data, dev, progress=False, checkpoints=checkpoints)]


class _Sweep:
    """The driver's bookkeeping for one call of run_on_ray (see the module's docstring)."""

    def __init__(self, units, out, rerun, device, on_result, progress):
        self.out, self.rerun, self.device, self.on_result = out, rerun, device, on_result
        self.specs = [s for u in units for s in u]
        self.unit_of = [k for k, u in enumerate(units) for _ in u]
        self.done: list[Result | None] = [None] * len(self.specs)
        self.claims: dict[int, contextlib.ExitStack] = {}
        self.finished: list[int] = []  # final runs not yet passed to on_result
        self.todo: dict[int, list[int]] = {}  # unit -> its runs to train
        self.waiting: dict[str, list[int]] = {}  # identity -> twins waiting for the first run's result
        self.previous: dict[int, RunRecord | None] = {}  # what the store held before training
        self.pending: dict = {}  # ObjectRef -> run indices of the unit it trains
        self.started: set[str] = set()  # first run ids of the units whose task started
        self.moved = time.monotonic()  # when a task last started or finished
        self.threads = torch.get_num_threads()
        show = sys.stderr.isatty() if progress is None else progress
        self.bar = tqdm(total=len(self.specs), desc="ray", unit="run", disable=not show, leave=False)

    def plan(self) -> bool:
        """Serve what is stored, claim the rest (cxr.sweep.run_group's rules); whether any run must train."""
        first: dict[str, int] = {}
        for i, spec in enumerate(self.specs):
            ident = self._identity(i)
            if not self.rerun and (served := sweep.serve(self.out, spec, ident)) is not None:
                self._finish(i, served)
                continue
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(results.claim(self.out, spec))
            except results.Claimed as e:
                self._finish(i, e)
                continue
            self.claims[i] = stack
            if not self.rerun and (served := sweep.serve(self.out, spec, ident)) is not None:
                self._finish(i, served)  # finished by another process meanwhile
            elif ident in first:
                self.waiting.setdefault(ident, []).append(i)
            else:
                first[ident] = i
                self.todo.setdefault(self.unit_of[i], []).append(i)
        self._notify()
        return bool(self.todo)

    def train(self, ray, gpus_per_task: float | None, max_retries: int, say, address: str | None = None) -> None:
        """Submit a task per unit, and store each run as its task's result arrives; RayError first when no
        alive node can hold a task (`address`, as given to run_on_ray, words it)."""
        self.ray = ray
        have = ray.cluster_resources()
        gpus = gpus_per_task if gpus_per_task is not None else float(bool(have.get("GPU")) and self.device != "cpu")
        if self.device == "cuda" and not gpus:
            raise RayError(f"--device cuda: the tasks get no GPU (--gpus-per-task 0; the cluster has "
                           f"{have.get('GPU', 0):g} GPUs); give --gpus-per-task, e.g. 1")
        largest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        cpus = 1 if gpus else max(1, min(self.threads, int(largest)))  # a CPU task runs `threads` threads
        _check_fits(ray, gpus, cpus, address)
        self.asks = f"{gpus:g} GPU, {cpus:g} CPU"
        # max_calls=1: a GPU task runs in a fresh worker process, which frees its GPU memory when the unit
        # ends and never keeps a CUDA context on the GPU of an earlier task (ray-project/ray#29624)
        self.task = ray.remote(num_gpus=gpus, num_cpus=cpus, max_calls=1 if gpus else 0, max_retries=max_retries,
                               retry_exceptions=False)(_train_task)
        if say is not None:
            on = {"auto": "cuda when given a GPU, else cpu"}.get(self.device, self.device)
            say(f"Ray cluster of {len([n for n in ray.nodes() if n.get('Alive')])} nodes, {have.get('CPU', 0):g} "
                f"CPUs, {have.get('GPU', 0):g} GPUs; each task: {gpus:g} GPU, {cpus:g} CPU, {self.threads} "
                f"torch threads, device {on}")
        self.relay = relay_mod.start(ray)
        try:
            for runs in self.todo.values():
                self._submit(runs)
            self.moved, told = time.monotonic(), False
            while self.pending:
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=min(CHECKPOINT_POLL, AWAIT_NOTICE))
                if self._checkpoints() or ready:
                    self.moved, told = time.monotonic(), False
                for ref in ready:
                    self._arrived(self.pending.pop(ref), ref)
                self._notify()
                if not told and time.monotonic() - self.moved >= AWAIT_NOTICE:
                    told = self._awaiting(say)  # once until a task starts or finishes
        except BaseException:
            with contextlib.suppress(Exception):  # what the tasks saved so far: the next run resumes from it
                self._checkpoints()
            for ref in self.pending:  # Ctrl-C or an error for every run: stop the rest, keep what is stored
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            raise

    def close(self) -> None:
        for stack in self.claims.values():
            stack.close()
        self.claims.clear()
        self.bar.close()

    def _identity(self, i: int) -> str:
        spec = self.specs[i]
        return unit.identity(spec, data_mod.load(spec.dataset, spec.image_size))

    def _submit(self, runs: list[int]) -> None:
        for i in runs:
            spec = self.specs[i]
            self.previous[i] = results.stored(self.out, spec)
            data = data_mod.load(spec.dataset, spec.image_size)
            found = sweep.StoreCheckpoints(self.out, data, self.rerun).read(spec)  # same identity, readable
            if found is not None:
                self.ray.get(self.relay.put.remote(spec.run_id, found[0], True))
        ref = self.task.remote([self.specs[i] for i in runs], self.threads, self.device, self.relay)
        self.pending[ref] = runs

    def _arrived(self, runs: list[int], ref) -> None:
        try:
            trained = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, CxrError):  # bad data or device: it concerns every run, as in a local run
                raise cause from None
            trained = [self._lost(i, cause or e) for i in runs]
        except self.ray.exceptions.RayError as e:  # worker or node lost beyond max_retries, task cancelled
            trained = [self._lost(i, e) for i in runs]
        for i, t in zip(runs, trained, strict=True):
            self._finish(i, sweep.store(self.out, self.specs[i], t, self.previous[i]))
            self._twins(i)

    def _awaiting(self, say) -> bool:
        """One line on the tasks not started yet (if any): how many, what each asks for, what is free."""
        waiting = [runs for runs in self.pending.values() if self.specs[runs[0]].run_id not in self.started]
        if not waiting:
            return False
        have, free = self.ray.cluster_resources(), self.ray.available_resources()
        line = (f"Ray: {len(waiting)} task{'s' * (len(waiting) > 1)} not started after "
                f"{time.monotonic() - self.moved:.0f}s, each asking {self.asks}; the cluster has "
                f"{free.get('CPU', 0):g} of {have.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} of "
                f"{have.get('GPU', 0):g} GPUs free")
        with tqdm.external_write_mode():
            if say is not None:
                say(line)
            else:
                print(f"cxr-bench: {line}", file=sys.stderr, flush=True)
        return True

    def _checkpoints(self) -> bool:
        """Write the checkpoints the tasks saved since the last call into the store (runs still training);
        whether a task started since the last call."""
        training = {self.specs[i].run_id: i for runs in self.pending.values() for i in runs}
        blobs, started = self.ray.get(self.relay.take.remote())
        self.started.update(started)
        for run_id, blob in blobs.items():
            if run_id not in training:
                continue
            spec = self.specs[training[run_id]]
            if blob is None:  # discarded by the task
                sweep.delete_checkpoint(self.out, spec)
            else:
                results.atomic_write(results.checkpoint_path(self.out, spec), lambda f, b=blob: f.write(b))
        return bool(started)

    def _lost(self, i: int, e: BaseException) -> unit.Trained:
        spec = self.specs[i]
        rec = unit.new_record(spec, data_mod.load(spec.dataset, spec.image_size), torch.device("cpu"))
        return unit.Trained(unit.failed_record(rec, RuntimeError(f"Ray task lost: {one_line(e)}")))

    def _twins(self, i: int) -> None:
        """The runs waiting for run i's identity: copies of its result, or (when it failed) trained anew."""
        ident = self._identity(i)
        waiting = self.waiting.pop(ident, [])
        while waiting:
            j = waiting.pop(0)
            spec = self.specs[j]
            if self.rerun:
                copied = sweep.copy_twin(self.out, spec, self.done[i])
            else:
                copied = sweep.serve(self.out, spec, ident)
            if copied is not None:
                self._finish(j, copied)
                continue
            self.waiting[ident] = waiting  # j trains on its own; the rest wait for it
            self._submit([j])
            return

    def _finish(self, i: int, result: Result) -> None:
        """Run i is final (stored, served or claimed elsewhere): release its claim; _notify tells."""
        self.done[i] = result
        if i in self.claims:
            self.claims.pop(i).close()
        self.finished.append(i)

    def _notify(self) -> None:
        """on_result for the runs finished since the last call (after all of a task's runs are stored)."""
        while self.finished:
            i = self.finished.pop(0)
            self.bar.update(1)
            if self.on_result is not None:
                with tqdm.external_write_mode():
                    self.on_result(self.specs[i], self.done[i])
