"""Checkpoints of a sweep on Ray (cxr.cluster): the tasks have no store, the driver alone writes it.

`Relay` is a small Ray actor: a task saves each run's checkpoint there at the end of every epoch
(`RelayCheckpoints`, the engine's cxr.engine.Checkpoints on a worker) and a retried task loads it back;
the driver puts the store's checkpoints in before a unit starts and takes the new ones out into the
store while it waits, so that a later `cxr-bench run` resumes too. It also notes which tasks started,
so the driver can tell a task that waits for resources from one that runs.
"""

from __future__ import annotations

import sys

from cxr import data as data_mod
from cxr import results, unit
from cxr.errors import one_line
from cxr.spec import ExperimentSpec


class Relay:
    """A Ray actor that carries checkpoints between the tasks and the driver, which alone writes the store:
    a task saves each run's checkpoint here at the end of every epoch and a retried task loads it back;
    the driver puts the store's checkpoints in before a unit starts and takes the new ones out into the
    store while it waits (so a later `cxr-bench run` resumes too). Blobs are checkpoint files' bytes."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.new: dict[str, bytes | None] = {}
        self.started: list[str] = []

    def begin(self, run_id: str) -> None:
        """A task started (a unit is named by its first run): the driver tells waiting tasks from running ones."""
        self.started.append(run_id)

    def put(self, run_id: str, blob: bytes, from_store: bool = False) -> None:
        self.blobs[run_id] = blob
        if not from_store:
            self.new[run_id] = blob

    def get(self, run_id: str) -> bytes | None:
        return self.blobs.get(run_id)

    def drop(self, run_id: str) -> None:
        self.blobs.pop(run_id, None)
        self.new[run_id] = None

    def take(self) -> tuple[dict[str, bytes | None], list[str]]:
        """The checkpoints saved and the tasks started since the last call."""
        (new, self.new), (started, self.started) = (self.new, {}), (self.started, [])
        return new, started


def start(ray):
    """The sweep's Relay, on the driver's node (a node lost mid-sweep must not take it along), restarted
    by Ray should its process die anyway (it then holds no checkpoint: the store still has them)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=here)(Relay).remote()


class RelayCheckpoints:
    """cxr.engine.Checkpoints on a worker, through the driver's Relay."""

    def __init__(self, relay, data: data_mod.Dataset):
        self.relay, self.data = relay, data

    def load(self, spec: ExperimentSpec) -> dict | None:
        import ray

        try:
            blob = ray.get(self.relay.get.remote(spec.run_id))  # the driver checked its identity
        except ray.exceptions.RayError as e:  # the relay is gone: the run starts over, it is not lost
            _say(f"{spec.run_id}: no checkpoint to resume from ({one_line(e)})")
            return None
        return None if blob is None else results.load_checkpoint(blob)[1]

    def save(self, spec: ExperimentSpec, state: dict) -> None:
        import ray

        blob = results.checkpoint_bytes(unit.identity(spec, self.data), spec.run_id, state)
        try:
            ray.get(self.relay.put.remote(spec.run_id, blob))  # there before the next epoch starts
        except ray.exceptions.RayError as e:  # as a full disk for a local run: it goes on, just not resumable
            _say(f"{spec.run_id}: cannot save the checkpoint ({one_line(e)}); the run goes on without one")

    def discard(self, spec: ExperimentSpec, why: str) -> None:
        _say(f"{spec.run_id}: checkpoint {why}; discarded, the run starts over")
        self.relay.drop.remote(spec.run_id)


def _say(line: str) -> None:
    print(f"cxr-bench: {line}", file=sys.stderr, flush=True)
