"""Checkpoints of a sweep on Ray (cxr.cluster): the tasks have no store, the driver alone writes it.

`Relay` is a small Ray actor: a task saves each run's checkpoint there at the end of every epoch
(`RelayCheckpoints`, the engine's cxr.engine.Checkpoints on a worker) and a retried task loads it back;
the driver puts the store's checkpoints in before a unit starts and takes the new ones out into the
store while it waits, so that a later `cxr-bench run` resumes too. It also notes which tasks started,
so the driver can tell a task that waits for resources from one that runs.
"""

from __future__ import annotations

import io
import sys

import torch

from cxr import data as data_mod
from cxr import unit
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


class RelayCheckpoints:
    """cxr.engine.Checkpoints on a worker, through the driver's Relay."""

    def __init__(self, relay, data: data_mod.Dataset):
        self.relay, self.data = relay, data

    def load(self, spec: ExperimentSpec) -> dict | None:
        import ray

        blob = ray.get(self.relay.get.remote(spec.run_id))
        return None if blob is None else torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)["state"]

    def save(self, spec: ExperimentSpec, state: dict) -> None:
        import ray

        buf = io.BytesIO()
        torch.save({"identity": unit.identity(spec, self.data), "run": spec.run_id, "state": state}, buf)
        ray.get(self.relay.put.remote(spec.run_id, buf.getvalue()))  # there before the next epoch starts

    def discard(self, spec: ExperimentSpec, why: str) -> None:
        print(f"cxr-bench: {spec.run_id}: checkpoint {why}; discarded, the run starts over", file=sys.stderr)
        self.relay.drop.remote(spec.run_id)
