"""The one training engine: `fit` trains a spec on a data set; `run` adds the results store.

The data set lives on the device as tensors and batches are `randperm` slices (no DataLoader).
On CUDA: bf16 autocast and channels_last. The best epoch is chosen on validation; the test split
is evaluated once, with the weights of that epoch. A non-finite loss stops the run as `diverged`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from cxr import data as data_mod
from cxr import fused, graphs, losses, record, results
from cxr.decision import Decision
from cxr.env import environment, now, resolve_device, synchronize
from cxr.errors import CxrError, one_line
from cxr.evaluate import evaluate_split
from cxr.models import build_model
from cxr.recipe import augment, augmenting, ema_model, lr_factor, make_optimizer, scheduled, set_lr
from cxr.record import RunRecord
from cxr.spec import ExperimentSpec

TRAINING_VERSION = 1  # bump when code that decides training changes (engine, models, splits): stored
#                       results of the old version are then not served (cxr.record.identity)


@dataclass
class Fit:
    status: str  # record.OK or STATUS_DIVERGED
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    model: torch.nn.Module | None = None  # with the best epoch's weights loaded
    train_seconds: float = 0.0
    train_images: int = 0
    error: str | None = None
    setup_seconds: float = 0.0  # CUDA graph capture etc., outside train_seconds
    cuda_graph: bool = False
    graph_steps: int | None = None  # optimizer steps per CUDA graph replay (cxr.graphs), when graphed
    capture_error: str | None = None
    fused_with: list[str] | None = None  # run ids trained in the same fused group (cxr.fused), else None
    fused_kernel: str | None = None  # how the group's step ran: "grouped" or "loop" (cxr.fused.KERNELS)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds CUDA


def is_better(spec: ExperimentSpec, value: float, best: float | None) -> bool:
    """Whether an epoch's validation `value` beats the best so far under spec.select."""
    if best is None or spec.select == "last":
        return True
    return value < best if spec.select == "loss" else value > best


class TrainStep:
    """One optimizer step on the batch x[idx], with running sums of loss and correct predictions.

    On CUDA (Adam/AdamW, no augmentation) the whole step, gather, forward, loss, backward and
    optimizer, is captured as a CUDA graph and replayed (cxr.graphs), `steps` consecutive steps per
    graph: at the course's batch of 32 a step of this small CNN is ~100 kernel launches of a few
    microseconds each, so launching, not arithmetic, would set the pace. Anything else (CPU, a short
    last batch) runs eagerly. Set CXR_CUDA_GRAPHS=0 to turn graphs off.
    """

    def __init__(self, model, optimizer, spec: ExperimentSpec, x, y, generator, device: torch.device,
                 steps: int = 1):
        self.model, self.optimizer, self.spec, self.x, self.y, self.generator = model, optimizer, spec, x, y, generator
        self.loss = losses.get(spec.loss)
        self.class_weights = losses.balanced_class_weights(y) if spec.class_weight == "balanced" else None
        self.cuda = device.type == "cuda"
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.graphs: graphs.StepGraphs | None = None
        self.capture_error = None
        if (graphs.available(device) and spec.optimizer in ("adam", "adamw") and not augmenting(spec)
                and len(y) >= spec.batch_size):
            try:
                self._capture(steps)
            except Exception as e:  # unsupported op or driver: train eagerly, say why
                self.graphs, self.capture_error = None, one_line(e)

    @property
    def steps(self) -> int:
        """Optimizer steps per call that the fit loop may hand over at once (cxr.graphs.batches)."""
        return self.graphs.steps if self.graphs is not None else 1

    def _body(self, idx) -> None:
        xb, yb = augment(self.x[idx], self.spec, self.generator), self.y[idx]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda, cache_enabled=False):
            logits = self.model(xb)
        loss = self.loss.train_loss(logits.float(), yb, self.spec, self.class_weights)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(yb)
        self.correct += (self.loss.predict(logits) == yb).sum()

    def __call__(self, idx: torch.Tensor) -> None:
        if self.graphs is not None and self.graphs.replay(idx, self.spec.batch_size):
            return
        # graph mode keeps its gradient buffers (the graph reads them), so zero in place
        self.optimizer.zero_grad(set_to_none=self.graphs is None)
        self._body(idx)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def _capture(self, steps: int) -> None:
        saved = graphs.snapshot([self.model])
        batch = self.spec.batch_size
        static = torch.arange(batch, device=self.y.device)
        rest = len(self.y) % batch  # the eager last batch: tune its shape here, not in epoch 1

        def zero_grad() -> None:
            self.optimizer.zero_grad(set_to_none=True)

        graphs.warm_up(self._body, zero_grad, [static] * 3 + ([static[:rest]] if rest >= 2 else []))
        self.graphs = graphs.StepGraphs(self._body, zero_grad, static, steps, len(self.y) // batch)
        graphs.undo_warmup([self.model], saved, [self.optimizer])  # weights, statistics, Adam's state
        self.reset()


def fit(spec: ExperimentSpec, data: data_mod.Dataset, device: torch.device | str = "cpu",
        progress: bool | None = None) -> Fit:
    """Train `spec` on `data`; the returned model holds the best epoch's weights."""
    device = resolve_device(device)
    decision = Decision.of(spec, data.train.y)  # validation is read with the spec's rule and TTA
    seed_everything(spec.seed)
    model = build_model(spec.model, spec.num_outputs, spec.width).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    x_train = data.train.x.to(device)
    y_train = data.train.y.to(device)
    x_val, y_val = data.val.x.to(device), data.val.y.to(device)  # validated every epoch: keep it there too
    if cuda:
        x_train = x_train.contiguous(memory_format=torch.channels_last)
    optimizer = make_optimizer(spec, model.parameters(), device)
    n = len(y_train)
    steps_per_epoch = math.ceil(n / spec.batch_size)
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    ema = ema_model(model, spec.ema) if spec.ema else None
    evaluated = ema.module if ema is not None else model  # what is validated, selected and returned

    result = Fit(status=record.OK)
    t_setup = time.perf_counter()
    stepped_lr = scheduled(spec)
    steps = graphs.steps_per_graph(n // spec.batch_size, between_steps=stepped_lr or ema is not None)
    step = TrainStep(model, optimizer, spec, x_train, y_train, generator, device, steps)
    synchronize(device)
    result.setup_seconds = time.perf_counter() - t_setup
    result.cuda_graph = step.graphs is not None
    result.graph_steps = step.steps if result.cuda_graph else None
    result.capture_error = step.capture_error
    best_value, best_state = None, None
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(1, spec.epochs + 1), desc=spec.run_id, unit="epoch", disable=not show, leave=False)
    n_step = 0
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        lr_now = spec.lr * lr_factor(spec, n_step, steps_per_epoch)
        step.reset()
        perm = torch.randperm(n, device=device, generator=generator)
        for idx in graphs.batches(perm, spec.batch_size, step.steps):  # step.steps > 1: nothing between steps
            if stepped_lr:
                set_lr(optimizer, spec.lr * lr_factor(spec, n_step, steps_per_epoch))
            step(idx)
            if ema is not None:
                ema.update_parameters(model)
            n_step += -(-len(idx) // spec.batch_size)
            result.train_images += len(idx)
        if result.train_images == 0:  # every batch had one image: nothing was learnt, so nothing to store as ok
            raise ValueError(f"no batch of at least 2 images in an epoch ({n} training images, batch size "
                             f"{spec.batch_size}); the run trained on 0 images")
        loss_sum, correct = step.loss_sum, step.correct
        synchronize(device)
        result.train_seconds += time.perf_counter() - t0
        train_loss = float(loss_sum) / n
        row = {"epoch": epoch, "lr": lr_now, "train_loss": train_loss, "train_accuracy": int(correct) / n}
        if not math.isfinite(train_loss):
            result.status = record.DIVERGED
            result.error = f"non-finite training loss in epoch {epoch} (lr {spec.lr:g})"
            result.history.append({**row, "train_loss": None, "seconds": time.perf_counter() - t0})
            break
        try:
            val = evaluate_split(evaluated, x_val, y_val, device, decision)["metrics"]
        except FloatingPointError:
            result.status = record.DIVERGED
            result.error = f"non-finite model outputs on validation in epoch {epoch} (lr {spec.lr:g})"
            result.history.append({**row, "seconds": time.perf_counter() - t0})
            break
        row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_auroc=val["auroc"],
                   seconds=time.perf_counter() - t0)
        result.history.append(row)
        value = {"loss": val["loss"], "accuracy": val["accuracy"], "auroc": val["auroc"] or 0.0,
                 "last": 0.0}[spec.select]
        if is_better(spec, value, best_value):
            best_value, result.best_epoch = value, epoch
            best_state = copy.deepcopy(evaluated.state_dict())
        bar.set_postfix(loss=f"{train_loss:.4f}", val_acc=f"{val['accuracy']:.3f}")
    bar.close()
    if result.status == record.OK:
        evaluated.load_state_dict(best_state)
        result.model = evaluated
    return result


def identity(spec: ExperimentSpec, data: data_mod.Dataset) -> str:
    """What a stored result must match to be served for this run: recipe, data content, training version."""
    return record.identity(spec.spec_hash(), data.fingerprint, TRAINING_VERSION)


def conflict(out: str | Path, spec: ExperimentSpec, ident: str, old: RunRecord | None = None) -> str | None:
    """Why the result stored for this run id (`old`, read from the store when not given) cannot be served
    nor silently replaced, or None.

    A stored result of another recipe, data or training version conflicts; a failed one, one of the same
    identity, and one written by schema version 1 with the same recipe (no data fingerprint to compare;
    it is trained again and replaced when the new run is ok) do not.
    """
    old = old if old is not None else results.stored(out, spec)
    if old is None or old.status == record.FAILED or old.identity == ident:
        return None
    if old.identity is None and old.spec_hash == spec.spec_hash():
        return None
    if old.spec_hash != spec.spec_hash():
        theirs, ours = old.spec, spec.to_dict()
        keys = [k for k in spec.recipe() if theirs.get(k) != ours.get(k)]
        what = "another recipe (" + ", ".join(f"{k} {theirs.get(k)!r} stored, {ours.get(k)!r} now" for k in keys[:3])
        what += ", ..." * (len(keys) > 3) + ")"
    elif old.training_version != TRAINING_VERSION:
        what = f"training version {old.training_version} (this code trains as version {TRAINING_VERSION})"
    else:
        what = "other data (the content of the data set changed since; same source string)"
    return (f"{results.run_path(out, spec)}: holds a result of {what}; pass --rerun to replace it, or --out DIR "
            "for a separate results directory")


@dataclass
class Trained:
    """One run trained and evaluated but not yet stored: its record (weights None) and, for an ok run,
    its weights on the CPU. What a remote worker sends back (cxr.store writes it on the driver)."""

    record: RunRecord
    state: dict[str, torch.Tensor] | None = None


def train_unit(specs: list[ExperimentSpec], data: data_mod.Dataset, device: torch.device | str = "cpu",
               progress: bool | None = None, kernel: str | None = None) -> list[Trained]:
    """Train and evaluate runs as one unit, touching no store: one run alone (`fit`), or several runs of
    one fusion key together (cxr.fused.fit_group). Data errors propagate (they concern every run); any
    other exception makes the runs it hit status "failed" with a one-line error."""
    dev = resolve_device(device)
    recs = [new_record(s, data, dev) for s in specs]
    try:
        fits = fused.fit_group(specs, data, dev, progress, kernel) if len(specs) > 1 else \
            [fit(specs[0], data, dev, progress)]
    except (KeyboardInterrupt, data_mod.DataError):
        raise
    except Exception as e:
        if len(specs) > 1:  # a fault of fusion must not cost the runs: train each one alone instead
            why = one_line(e)
            print(f"cxr-bench: a fused group of {len(specs)} runs failed ({why}); training them one by one",
                  file=sys.stderr)
            return [_fused_error(train_unit([s], data, dev, progress)[0], why) for s in specs]
        return [Trained(failed_record(rec, e)) for rec in recs]  # a crashed run is recorded; the sweep goes on
    logits = {}
    if fits[0].fused_kernel == "grouped":  # val and test of every plain-decision member in one batched forward
        batch = [(i, f.model) for i, f in enumerate(fits) if f.status == record.OK and not recs[i].decision["tta"]]
        try:
            for split in ("val", "test") if batch else ():
                part = getattr(data, split)
                for (i, _), lg in zip(batch, fused.fused_logits([m for _, m in batch], part.x, dev), strict=True):
                    logits[i, split] = lg
        except (RuntimeError, ValueError):  # each model evaluates alone instead (_finish)
            logits = {}
    return [_finish(spec, rec, fitted, data, dev, logits.get((i, "val")), logits.get((i, "test")))
            for i, (spec, rec, fitted) in enumerate(zip(specs, recs, fits, strict=True))]


def _fused_error(trained: Trained, why: str) -> Trained:
    """A run trained alone because its fused group failed: its record says why (timing.fused_error)."""
    rec = trained.record
    return dataclasses.replace(trained, record=dataclasses.replace(rec, timing={**(rec.timing or {}),
                                                                            "fused_error": why}))


def new_record(spec: ExperimentSpec, data: data_mod.Dataset, dev: torch.device) -> RunRecord:
    """The record of a run about to train: status failed until its training finishes (cxr.cluster too)."""
    return RunRecord(id=spec.id, seed=spec.seed, spec=spec.to_dict(), spec_hash=spec.spec_hash(),
                     identity=identity(spec, data), data_fingerprint=dict(data.fingerprint),
                     training_version=TRAINING_VERSION, status=record.FAILED,
                     environment={**environment(dev), "started_at": now()}, dataset=data.summary(),
                     decision=Decision.of(spec, data.train.y).to_dict())


def failed_record(rec: RunRecord, e: BaseException) -> RunRecord:
    """`rec` as a failed run: the error in one line, no metrics or weights (the next run retries it)."""
    return dataclasses.replace(rec, status=record.FAILED, error=one_line(e), metrics=None, predictions=None,
                               weights=None, environment={**rec.environment, "finished_at": now()})


def _finish(spec: ExperimentSpec, rec: RunRecord, fitted: Fit, data: data_mod.Dataset, dev: torch.device,
            val_logits: torch.Tensor | None = None, test_logits: torch.Tensor | None = None) -> Trained:
    """The record of a fitted run: history, timing and, when ok, the val and test metrics of its model."""
    try:
        decision = Decision.of(spec, data.train.y)
        timing = {"train_seconds": round(fitted.train_seconds, 3),
                  "images_per_second": round(fitted.train_images / max(fitted.train_seconds, 1e-9), 1),
                  "eval_seconds": None, "setup_seconds": round(fitted.setup_seconds, 3),
                  "cuda_graph": fitted.cuda_graph}
        if fitted.graph_steps:
            timing["graph_steps"] = fitted.graph_steps
        if fitted.capture_error:
            timing["cuda_graph_error"] = fitted.capture_error
        if fitted.fused_with is not None:
            timing.update(fused_with=fitted.fused_with, fused_kernel=fitted.fused_kernel)
        rec = dataclasses.replace(rec, status=fitted.status, error=fitted.error, history=tuple(fitted.history),
                                  best_epoch=fitted.best_epoch, timing=timing)
        state = None
        if fitted.status == record.OK:
            t0 = time.perf_counter()
            val = evaluate_split(fitted.model, data.val.x, data.val.y, dev, decision, logits=val_logits)
            test = evaluate_split(fitted.model, data.test.x, data.test.y, dev, decision,  # the one look at test
                                  logits=test_logits)
            timing["eval_seconds"] = round(time.perf_counter() - t0, 3)
            metrics = {"val": val["metrics"], "test": test["metrics"]}
            if not decision.plain:  # the same weights under the course's plain argmax, for comparison
                metrics.update(val_plain=val["plain"], test_plain=test["plain"])
            rec = dataclasses.replace(rec, metrics=metrics, predictions=test["predictions"])
            state = {k: v.detach().to("cpu", copy=True) for k, v in fitted.model.state_dict().items()}
    except (KeyboardInterrupt, data_mod.DataError):
        raise
    except Exception as e:
        return Trained(failed_record(rec, e))
    return Trained(dataclasses.replace(rec, environment={**rec.environment, "finished_at": now()}), state)


def store(out: str | Path, spec: ExperimentSpec, trained: Trained, previous: RunRecord | None) -> RunRecord:
    """Write a trained run into the store, under the caller's claim; `previous` is what the store held
    before training. A failed or diverged attempt never replaces a stored ok result: it is written beside
    it (seed-<n>.attempt.json) and returned."""
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
        return rec
    kept = results.attempt_path(out, spec)
    rec = dataclasses.replace(rec, error=f"{rec.error}; the stored {previous.status} result is kept, this "
                                         f"attempt is in {kept.name}")
    results.write(out, rec, kept)
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
    """`run` for a training unit (runs of one data set; cxr.fused.groups): each run is served from the
    store when it can be, the others are claimed and trained together (fused when there are several),
    and each is stored as `run` stores it. One entry per run, in order: its record, or the Claimed
    error when another process trains it. Runs of one identity (Task A's CE run is Task B's lr 0.001
    run) train once; the others are copies of its result."""
    data = data if data is not None else data_mod.load(specs[0].dataset, specs[0].image_size)
    dev = resolve_device(device)
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
            if not rerun and (served := serve(out, spec, ident)) is not None:  # finished by another process
                done[i] = served
            elif ident in first:
                twins.append(i)
            else:
                first[ident] = i
                todo.append(i)
        previous = {i: results.stored(out, specs[i]) for i in todo}
        trained = train_unit([specs[i] for i in todo], data, dev, progress, kernel) if todo else []
        for i, t in zip(todo, trained, strict=True):
            done[i] = store(out, specs[i], t, previous[i])
        for i in twins:  # a copy of its twin's result when that one is served; else trained on its own
            spec = specs[i]
            served = serve(out, spec, identity(spec, data)) if not rerun else \
                copy_twin(out, spec, done[first[identity(spec, data)]])
            if served is None:
                prev = results.stored(out, spec)
                served = store(out, spec, train_unit([spec], data, dev, progress)[0], prev)
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
    old = results.stored(out, spec)  # read once: what conflicts is also what would be served
    why = conflict(out, spec, ident, old)
    if why:
        raise results.StoreConflict(why)
    found = old if results.serves(old, ident) else _reuse_same_recipe(out, spec, ident)
    return dataclasses.replace(found, cached=True) if found is not None else None


def _reuse_same_recipe(out: str | Path, spec: ExperimentSpec, ident: str, only: str | None = None
                       ) -> RunRecord | None:
    """A finished run of the same identity and seed stored under another id (e.g. Task A's CE run is
    Task B's lr 0.001 run; `only`: that id): copy it under this id instead of training it again."""
    for path in results.result_files(out):
        if path.name != f"seed-{spec.seed}.json" or (only is not None and path.parent.name != only):
            continue
        try:
            other = results.read(path)
        except results.ResultError:
            continue
        if not results.serves(other, ident) or other.id == spec.id:
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
