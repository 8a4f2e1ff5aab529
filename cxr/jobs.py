"""A sweep on one machine's many cores: `cxr-bench run --jobs N` trains N units side by side.

One training of the course's small CNN cannot keep many cores busy: most of its operations are too small
to split well between threads. So N worker processes each train one unit at a time with 1/N of the
threads (`threads // N`, at least 1; threads is torch's count in this process, e.g. OMP_NUM_THREADS),
instead of one training on all of them.

The units are `cxr.sweep.groups`' units, with every fused group split into up to N smaller groups so that
the workers share its work (`split`); the runs of one identity ("twins") stay in one piece, so that they
train once and the others are copies. The pieces are handed out largest first. Each worker runs
`cxr.sweep.run_group` into the same store, under the store's own claims, as processes given `--shard`
do: a run another process trains is `busy`, a stored one is served. A run trains as it would in
`cxr-bench run` with OMP_NUM_THREADS set to the worker's thread count. With the loop kernel, which
computes each member as it would alone, neither the split nor N changes a result at a given thread count
(tested); the grouped kernel's arithmetic may differ in the last bits with the size of the group.

Workers are started with "spawn" (a fresh interpreter; forking a process that has started OpenMP threads
can hang). A data or device error in a worker stops the sweep as it would a sequential one; Ctrl-C stops
the workers, and what they stored stays stored (their runs resume from their last epoch's checkpoint).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cxr import data as data_mod
from cxr import results, sweep, unit
from cxr.errors import CxrError
from cxr.record import RunRecord
from cxr.spec import ExperimentSpec

Result = RunRecord | results.Claimed


def threads_per_job(jobs: int, threads: int | None = None) -> int:
    """Torch threads for each of `jobs` workers sharing `threads` (default: this process's count)."""
    return max(1, (threads or torch.get_num_threads()) // jobs)


def split(units: Sequence[Sequence[ExperimentSpec]], jobs: int) -> list[list[ExperimentSpec]]:
    """The units as pieces for `jobs` workers, largest first: a fused group of several identities is
    dealt round-robin, by identity, into min(jobs, identities) groups; twins stay together."""
    sized: list[tuple[int, list[ExperimentSpec]]] = []  # (identities, piece)
    for u in units:
        if len(u) == 1:
            sized.append((1, list(u)))
            continue
        data = data_mod.load(u[0].dataset, u[0].image_size)
        by_identity: dict[str, list[ExperimentSpec]] = {}
        for s in u:
            by_identity.setdefault(unit.identity(s, data), []).append(s)
        if jobs == 1:
            sized.append((len(by_identity), list(u)))
            continue
        k = min(jobs, len(by_identity))
        parts: list[list[ExperimentSpec]] = [[] for _ in range(k)]
        for i, twins in enumerate(by_identity.values()):
            parts[i % k].extend(twins)
        sized.extend((len(range(j, len(by_identity), k)), part) for j, part in enumerate(parts))
    return [piece for _, piece in sorted(sized, key=lambda sp: -sp[0])]


def _work(job: tuple[int, list[ExperimentSpec], str, str, bool, int]) -> tuple[int, list[Result]]:
    """In a worker: one piece, stored by cxr.sweep.run_group; (its number, its results)."""
    number, specs, out, device, rerun, threads = job
    torch.set_num_threads(threads)
    return number, sweep.run_group(specs, out, device, rerun=rerun, progress=False)


def run_in_jobs(units: Sequence[Sequence[ExperimentSpec]], out: str | Path, jobs: int, device: str = "auto", *,
                rerun: bool = False, on_result: Callable[[ExperimentSpec, Result], None] | None = None
                ) -> list[Result]:
    """Train `units` in `jobs` worker processes into the store `out`; one result per run, in the order of
    the units' runs. on_result(spec, result) is called for each run as its piece finishes. An error in a
    worker (or Ctrl-C) terminates the workers, as a kill would: the store keeps what was written."""
    if jobs < 1:
        raise CxrError(f"--jobs {jobs}: give 1 or more worker processes")
    pieces = split(units, jobs)
    threads = threads_per_job(jobs)
    found: dict[str, Result] = {}
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(pieces))) as pool:  # leaving it terminates it
        work = [(i, p, str(out), device, rerun, threads) for i, p in enumerate(pieces)]
        for number, done in pool.imap_unordered(_work, work):  # a worker's exception is raised here
            for s, r in zip(pieces[number], done, strict=True):
                found[s.run_id] = r
                if on_result is not None:
                    on_result(s, r)
        pool.close()  # every piece done: let the workers exit (leaving the block on an error terminates them)
        pool.join()
    return [found[s.run_id] for u in units for s in u]
