"""A training unit (1..N runs of one data set, cxr.sweep.groups) trained and evaluated into run records.

`train_unit` is what a local sweep (cxr.sweep) and a Ray task (cxr.cluster) call: cxr.engine.fit, then
each run's one look at the test split, as records (cxr.record) and CPU weights. It touches no store.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

import torch

from cxr import data as data_mod
from cxr import engine, kernels, record
from cxr.decision import Decision
from cxr.env import environment, now, resolve_device
from cxr.errors import one_line
from cxr.evaluate import evaluate_split
from cxr.record import RunRecord
from cxr.spec import ExperimentSpec

TRAINING_VERSION = 2  # bump when code that decides training changes (engine, models, splits): stored
#                       results of the old version are then not served (cxr.record.identity).
#                       2: channels-last, fused optimizers and bf16 (spec precision) on CPUs too


def identity(spec: ExperimentSpec, data: data_mod.Dataset) -> str:
    """What a stored result (or checkpoint) must match to be served for this run: recipe, data content,
    training version."""
    return record.identity(spec.spec_hash(), data.fingerprint, TRAINING_VERSION)


@dataclass
class Trained:
    """One run trained and evaluated but not yet stored: its record (weights None) and, for an ok run,
    its weights on the CPU. What a remote worker sends back (cxr.sweep.store writes it on the driver)."""

    record: RunRecord
    state: dict[str, torch.Tensor] | None = None


def train_unit(specs: list[ExperimentSpec], data: data_mod.Dataset, device: torch.device | str = "cpu",
               progress: bool | None = None, kernel: str | None = None,
               checkpoints: engine.Checkpoints | None = None) -> list[Trained]:
    """Train and evaluate runs as one unit (cxr.engine.fit), touching no store. Data errors propagate
    (they concern every run); any other exception makes the runs it hit status "failed" with a one-line
    error; a group of several that raises trains its runs one by one instead."""
    dev = resolve_device(device)
    recs = [new_record(s, data, dev) for s in specs]
    try:
        fits = engine.fit(specs, data, dev, progress, kernel, checkpoints)
    except (KeyboardInterrupt, data_mod.DataError):
        raise
    except Exception as e:
        if len(specs) > 1:  # a fault of fusion must not cost the runs: train each one alone instead
            why = one_line(e)
            print(f"cxr-bench: a fused group of {len(specs)} runs failed ({why}); training them one by one",
                  file=sys.stderr)
            return [_fused_error(train_unit([s], data, dev, progress, checkpoints=checkpoints)[0], why)
                    for s in specs]
        return [Trained(failed_record(rec, e)) for rec in recs]  # a crashed run is recorded; the sweep goes on
    logits = {}
    if kernels.evaluates_together(fits[0].fused_kernel, dev):  # val and test of every plain-decision member
        # in one batched forward
        batch = [(i, f.model) for i, f in enumerate(fits) if f.status == record.OK and not recs[i].decision["tta"]]
        try:
            for split in ("val", "test") if batch else ():
                part = getattr(data, split)
                for (i, _), lg in zip(batch, kernels.fused_logits([m for _, m in batch], part.x, dev), strict=True):
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


def _timing(fitted: engine.Fit) -> dict:
    timing = {"train_seconds": round(fitted.train_seconds, 3),
              "images_per_second": round(fitted.train_images / max(fitted.train_seconds, 1e-9), 1),
              "eval_seconds": None, "setup_seconds": round(fitted.setup_seconds, 3),
              "cuda_graph": fitted.cuda_graph, "precision": fitted.precision}
    if fitted.graph_steps:
        timing["graph_steps"] = fitted.graph_steps
    if fitted.capture_error:
        timing["cuda_graph_error"] = fitted.capture_error
    if fitted.fused_with is not None:
        timing.update(fused_with=fitted.fused_with, fused_kernel=fitted.fused_kernel)
    if fitted.checkpoint_seconds:
        timing["checkpoint_seconds"] = round(fitted.checkpoint_seconds, 3)
    if fitted.resumed_after_epoch is not None:
        timing["resumed_after_epoch"] = fitted.resumed_after_epoch
    return timing


def _finish(spec: ExperimentSpec, rec: RunRecord, fitted: engine.Fit, data: data_mod.Dataset, dev: torch.device,
            val_logits: torch.Tensor | None = None, test_logits: torch.Tensor | None = None) -> Trained:
    """The record of a fitted run: history, timing and, when ok, the val and test metrics of its model."""
    try:
        decision = Decision.of(spec, data.train.y)
        timing = _timing(fitted)
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
