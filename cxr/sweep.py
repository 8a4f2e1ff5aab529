"""The sweep layer: which runs train together, and what the results store serves, claims, trains, copies,
resumes and writes (README "Results" has the rules; cxr.results holds the files).

`run_group` is one training unit through the store, as `cxr-bench run` and `pytest benchmarks` call it;
cxr.cluster follows the same rules for a sweep spread over Ray. The engine below (cxr.unit, cxr.engine)
trains and evaluates and knows nothing of results directories; its checkpoints reach the store through
`StoreCheckpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import torch

from cxr import data as data_mod
from cxr import graphs, index, kernels, record, results, unit
from cxr.env import resolve_device
from cxr.errors import CxrError, one_line
from cxr.record import RunRecord
from cxr.spec import ExperimentSpec
from cxr.unit import Trained, failed_record, identity


def groups(specs: list[ExperimentSpec], fuse: bool = True, max_members: int | None = None
           ) -> list[list[ExperimentSpec]]:
    """The runs as training units, in the order of their first run: runs of one cxr.kernels.fusion_key
    together (at most `max_members` per group), every other run alone. `fuse=False`: every run alone."""
    units: list[list[ExperimentSpec]] = []
    open_groups: dict[tuple, list[ExperimentSpec]] = {}
    for spec in specs:
        key = kernels.fusion_key(spec) if fuse else None
        if key is None:
            units.append([spec])
            continue
        group = open_groups.get(key)
        if group is None or (max_members and len(group) >= max_members):
            group = open_groups[key] = []
            units.append(group)
        group.append(spec)
    return units


def check_environment() -> None:
    """Refuse a bad CXR_FUSE_KERNEL or CXR_GRAPH_STEPS (CxrError, one line) before any training starts."""
    kernels.default_kernel(torch.device("cpu"))
    graphs.steps_per_graph(1, between_steps=False)


class StoreCheckpoints:
    """cxr.engine.Checkpoints in a results store: runs/<id>/seed-<n>.checkpoint.pt beside the run's record,
    written atomically at the end of every epoch by the process that holds the run's claim. A checkpoint
    is resumed only when its identity (recipe, data, training version) is the run's; one that cannot be
    read is discarded with one line and the run starts over. `rerun`: none is resumed."""

    def __init__(self, out: str | Path, data: data_mod.Dataset, rerun: bool = False):
        self.out, self.data, self.rerun = out, data, rerun
        self.failed: set[str] = set()  # runs whose checkpoint could not be written (said once)

    def load(self, spec: ExperimentSpec) -> dict | None:
        found = self.read(spec)
        return None if found is None else found[1]

    def read(self, spec: ExperimentSpec) -> tuple[bytes, dict] | None:
        """(the file's bytes, its state) of the run's checkpoint when it may be resumed, else None (saying
        why in one line): what `load` gives the engine, and what cxr.cluster hands a Ray task."""
        path = results.checkpoint_path(self.out, spec)
        if self.rerun or not path.is_file():
            return None
        try:
            data = path.read_bytes()
            ident, state = results.load_checkpoint(data)
        except Exception as e:  # noqa: BLE001 - truncated, corrupt, not ours: the run starts over
            self.discard(spec, f"unreadable ({one_line(e)})")
            return None
        if ident != identity(spec, self.data):
            _say(f"{path}: a checkpoint of another recipe, data or training version; not resumed, the run "
                 "starts over")
            return None
        _say(f"{path}: resuming {spec.run_id} after epoch {state.get('epoch')}")
        return data, state

    def save(self, spec: ExperimentSpec, state: dict) -> None:
        path = results.checkpoint_path(self.out, spec)
        try:
            data = results.checkpoint_bytes(identity(spec, self.data), spec.run_id, state)
            results.atomic_write(path, lambda f: f.write(data))
        except (CxrError, OSError, RuntimeError) as e:  # a full disk: the run goes on, it just cannot resume
            if spec.run_id not in self.failed:
                self.failed.add(spec.run_id)
                _say(f"{path}: cannot write the checkpoint ({one_line(e)}); the run goes on without one")

    def discard(self, spec: ExperimentSpec, why: str) -> None:
        path = results.checkpoint_path(self.out, spec)
        _say(f"{path}: checkpoint {why}; discarded, the run starts over")
        delete_checkpoint(self.out, spec)


def delete_checkpoint(out: str | Path, spec: ExperimentSpec) -> None:
    with contextlib.suppress(OSError):
        results.checkpoint_path(out, spec).unlink(missing_ok=True)


def _say(line: str) -> None:
    print(f"cxr-bench: {line}", file=sys.stderr, flush=True)


def conflict(out: str | Path, spec: ExperimentSpec, ident: str, old: RunRecord | None = None) -> str | None:
    """Why the result stored for this run id (`old`, read from the store when not given) cannot be served
    nor silently replaced, or None.

    A stored result of another recipe, data or training version conflicts; a failed one, one of the same
    identity, and one written by schema version 1 with the same recipe (no data fingerprint to compare;
    it is trained again and replaced when the new run is ok) do not.
    """
    if old is None:
        try:
            old = results.stored(out, spec, strict=True)
        except results.UnreadableResult as e:
            return str(e)
    if old is None or old.status == record.FAILED or old.identity == ident:
        return None
    if old.identity is None and old.spec_hash == spec.spec_hash():
        return None
    if old.spec_hash != spec.spec_hash():
        theirs, ours = old.spec, spec.to_dict()
        keys = [k for k in spec.recipe() if theirs.get(k) != ours.get(k)]
        what = "another recipe (" + ", ".join(f"{k} {theirs.get(k)!r} stored, {ours.get(k)!r} now" for k in keys[:3])
        what += ", ..." * (len(keys) > 3) + ")"
    elif old.training_version != unit.TRAINING_VERSION:
        what = f"training version {old.training_version} (this code trains as version {unit.TRAINING_VERSION})"
    else:
        what = "other data (the content of the data set changed since; same source string)"
    return (f"{results.run_path(out, spec)}: holds a result of {what}; pass --rerun to replace it, or --out DIR "
            "for a separate results directory")


def store(out: str | Path, spec: ExperimentSpec, trained: Trained, previous: RunRecord | None) -> RunRecord:
    """Write a trained run into the store, under the caller's claim; `previous` is what the store held
    before training. A failed or diverged attempt never replaces a stored ok result: it is written beside
    it (seed-<n>.attempt.json) and returned. The run's checkpoint goes once its result is written, unless
    the run failed: the next attempt resumes from its last complete epoch."""
    rec = trained.record
    if trained.state is not None:
        try:
            wpath = results.save_weights(results.weights_path(out, spec), trained.state)
            rec = dataclasses.replace(rec, weights=wpath.relative_to(Path(out)).as_posix())
        except (OSError, CxrError) as e:
            rec = failed_record(rec, e)
    if rec.ok or previous is None or previous.status == record.FAILED or \
            (previous.status == record.DIVERGED and rec.status == record.DIVERGED):
        results.write(out, rec)
    else:
        kept = results.attempt_path(out, spec)
        rec = dataclasses.replace(rec, error=f"{rec.error}; the stored {previous.status} result is kept, this "
                                             f"attempt is in {kept.name}")
        results.write(out, rec, kept)
    if rec.status != record.FAILED:  # a failed run is retried by the next cxr-bench run: it resumes from there
        delete_checkpoint(out, spec)
    return rec


def run(spec: ExperimentSpec, out: str | Path = "results", device: str = "auto", *, rerun: bool = False,
        data: data_mod.Dataset | None = None, progress: bool | None = None) -> RunRecord:
    """Train and evaluate one run and store its record (README "Results" has the store's rules).

    A stored result of the same identity is returned instead (`cached` True), or a copy of an identical
    run stored under another id, unless `rerun`. A stored result of another identity raises
    StoreConflict (unless `rerun`); a run another process is training raises Claimed. Data errors
    propagate (they concern every run); any other exception is recorded as status "failed" with a
    one-line error. A failed or diverged attempt never replaces a stored ok result: it is written
    beside it (seed-<n>.attempt.json) and returned.
    """
    (rec,) = run_group([spec], out, device, rerun=rerun, data=data, progress=progress)
    if isinstance(rec, results.Claimed):
        raise rec
    return rec


def run_group(specs: list[ExperimentSpec], out: str | Path = "results", device: str = "auto", *,
              rerun: bool = False, data: data_mod.Dataset | None = None, progress: bool | None = None,
              kernel: str | None = None) -> list[RunRecord | results.Claimed]:
    """`run` for a training unit (runs of one data set; `groups`): each run is served from the store when
    it can be, the others are claimed and trained together (resuming from their checkpoints), and each
    is stored as `run` stores it. One entry per run, in order: its record, or the Claimed error when
    another process trains it. Runs of one identity (Task A's CE run is Task B's lr 0.001 run) train
    once; the others are copies of its result."""
    data = data if data is not None else data_mod.load(specs[0].dataset, specs[0].image_size)
    dev = resolve_device(device)
    checkpoints = StoreCheckpoints(out, data, rerun)
    done: list[RunRecord | results.Claimed | None] = [None] * len(specs)
    with contextlib.ExitStack() as claims:
        todo, twins, first = [], [], {}
        for i, spec in enumerate(specs):
            ident = identity(spec, data)
            if not rerun and (served := serve(out, spec, ident)) is not None:
                done[i] = served
                continue
            try:
                claims.enter_context(results.claim(out, spec))
            except results.Claimed as e:
                done[i] = e
                continue
            results.remove_temp_files(out, spec)  # what a killed write of this run left; no write of it is live
            if not rerun and (served := serve(out, spec, ident)) is not None:  # finished by another process
                done[i] = served
            elif ident in first:
                twins.append(i)
            else:
                first[ident] = i
                todo.append(i)
        previous = {i: results.stored(out, specs[i]) for i in todo}
        trained = unit.train_unit([specs[i] for i in todo], data, dev, progress, kernel, checkpoints) if todo else []
        for i, t in zip(todo, trained, strict=True):
            done[i] = store(out, specs[i], t, previous[i])
        for i in twins:  # a copy of its twin's result when that one is served; else trained on its own
            spec = specs[i]
            served = serve(out, spec, identity(spec, data)) if not rerun else \
                copy_twin(out, spec, done[first[identity(spec, data)]])
            if served is None:
                alone = unit.train_unit([spec], data, dev, progress, checkpoints=checkpoints)[0]
                served = store(out, spec, alone, results.stored(out, spec))
            done[i] = served
    return done


def copy_twin(out: str | Path, spec: ExperimentSpec, twin: RunRecord) -> RunRecord | None:
    """Under --rerun, the twin trained just now (same identity) is this run's result too."""
    if not results.serves(twin, twin.identity):
        return None
    found = _reuse_same_recipe(out, spec, twin.identity, only=twin.id)
    return dataclasses.replace(found, cached=True) if found is not None else None


def serve(out: str | Path, spec: ExperimentSpec, ident: str) -> RunRecord | None:
    """The stored result that `spec` (identity `ident`) may reuse, marked cached, or None; a stored run of
    this id and seed with another recipe raises results.StoreConflict."""
    old = results.stored(out, spec, strict=True)  # read once: what conflicts is also what would be served
    why = conflict(out, spec, ident, old)
    if why:
        raise results.StoreConflict(why)
    if results.serves(old, ident) and not _weights_gone(out, old):
        return dataclasses.replace(old, cached=True)
    found = _reuse_same_recipe(out, spec, ident)
    return dataclasses.replace(found, cached=True) if found is not None else None


def _weights_gone(out: str | Path, rec: RunRecord) -> bool:
    """An ok result whose weights file is missing is not whole: it is trained again (one line says so)."""
    if not rec.weights or (Path(out) / rec.weights).is_file():
        return False
    line = f"{results.run_path(out, rec)}: its weights {rec.weights} are gone; the run is trained again"
    if line not in _TOLD:  # serve is asked before and after the claim: say it once
        _TOLD.add(line)
        _say(line)
    return True


_TOLD: set[str] = set()


def _reuse_same_recipe(out: str | Path, spec: ExperimentSpec, ident: str, only: str | None = None
                       ) -> RunRecord | None:
    """A finished run of the same identity and seed stored under another id (e.g. Task A's CE run is
    Task B's lr 0.001 run; `only`: that id): copy it under this id instead of training it again."""
    for path in index.candidates(out, ident, spec.seed):  # read and checked here: the files are the truth
        if only is not None and path.parent.name != only:
            continue
        try:
            other = results.read(path)
        except results.ResultError:
            continue
        if not results.serves(other, ident) or other.id == spec.id or not results.matches_path(path, other):
            continue
        rec = dataclasses.replace(other, id=spec.id, spec=spec.to_dict(), reused_from=other.id, weights=None)
        if other.weights:
            dst = results.weights_path(out, spec)
            try:
                results.copy_file(out, Path(out) / other.weights, dst)
            except (results.StoreError, OSError):
                continue  # its weights are gone or point outside the store: train instead
            rec = dataclasses.replace(rec, weights=dst.relative_to(Path(out)).as_posix())
        results.write(out, rec)
        return rec
    return None
