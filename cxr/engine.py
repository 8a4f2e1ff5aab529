"""The one training loop: `fit` trains 1..N runs of one data set together; a lone run is a group of one.

The data set lives on the device as tensors and batches are `randperm` slices (no DataLoader). Each
run ("member") keeps its own model, optimizer, generator (batch order, augmentation), EMA, loss, head,
schedule, validation and best-epoch selection; only the step is shared (`Step`, with the kernel that
cxr.kernels.choose picks). On CUDA: bf16 autocast, channels_last, and the step captured as a CUDA
graph (cxr.graphs). The best epoch is chosen on validation; the caller evaluates test once, with the
weights of that epoch. A member whose loss stops being finite is stopped and recorded `diverged` at
the end of that epoch; the group goes on without it.

The engine knows nothing of results directories: a caller that wants runs to survive a kill passes
`checkpoints` (cxr.sweep keeps them in the store), which the loop asks for a run's last state before
it starts and hands each run's state at the end of every epoch. Resumed, a run computes on the CPU
exactly what it would have computed uninterrupted.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm

from cxr import data as data_mod
from cxr import graphs, kernels, losses, record
from cxr.decision import Decision
from cxr.env import resolve_device, resolve_precision, synchronize
from cxr.errors import one_line
from cxr.evaluate import evaluate_split
from cxr.models import build_model
from cxr.recipe import augmenting, ema_model, lr_factor, make_optimizer, scheduled, set_lr
from cxr.spec import ExperimentSpec

CHECKPOINT_FORMAT = 1  # bump when the content of a run's state (Member.state) changes


@dataclass
class Fit:
    status: str  # record.OK or record.DIVERGED
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
    fused_with: list[str] | None = None  # the other run ids of its group when it had several, else None
    fused_kernel: str | None = None  # the group's kernel (cxr.kernels.KERNELS), when it had several runs
    resumed_after_epoch: int | None = None  # the last epoch of the checkpoint it resumed from
    precision: str = "fp32"  # what the training arithmetic was: "bf16" (autocast) or "fp32"
    checkpoint_seconds: float = 0.0  # writing its end-of-epoch checkpoints


class Checkpoints(Protocol):
    """Where a run's state survives the process (cxr.sweep.StoreCheckpoints)."""

    def load(self, spec: ExperimentSpec) -> dict | None: ...

    def save(self, spec: ExperimentSpec, state: dict) -> None: ...

    def discard(self, spec: ExperimentSpec, why: str) -> None: ...


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds CUDA


def is_better(spec: ExperimentSpec, value: float, best: float | None) -> bool:
    """Whether an epoch's validation `value` beats the best so far under spec.select."""
    if best is None or spec.select == "last":
        return True
    return value < best if spec.select == "loss" else value > best


def steps_in_epoch(n: int, batch: int) -> int:
    """Optimizer steps of one epoch of n images (cxr.graphs.batches leaves out a last batch of one image)."""
    return n // batch + (n % batch >= 2)


class Member:
    """One run of a unit: its spec, model, optimizer, generator, EMA, loss and running result."""

    def __init__(self, spec: ExperimentSpec, data: data_mod.Dataset, y_train: torch.Tensor, device: torch.device):
        self.spec = spec
        self.decision = Decision.of(spec, data.train.y)  # validation is read with the spec's rule and TTA
        self.precision = resolve_precision(spec.precision, device)
        self.bf16 = self.precision == "bf16"  # autocast of forward and backward; losses, statistics, state fp32
        seed_everything(spec.seed)
        self.model = build_model(spec.model, spec.num_outputs, spec.width).to(device)
        self.model = self.model.to(memory_format=torch.channels_last)  # conv kernels of CPUs and GPUs prefer it
        self.optimizer = make_optimizer(spec, self.model.parameters(), device)
        self.generator = torch.Generator(device=device).manual_seed(spec.seed)
        self.ema = ema_model(self.model, spec.ema) if spec.ema else None
        self.loss = losses.get(spec.loss)
        self.class_weights = losses.balanced_class_weights(y_train) if spec.class_weight == "balanced" else None
        self.result = Fit(status=record.OK)
        self.best_value: float | None = None
        self.best_state: dict | None = None
        self.active = True
        self.epochs_done = 0

    @property
    def evaluated(self) -> torch.nn.Module:
        """What is validated, selected and returned: the EMA's copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state(self) -> dict:
        """Everything the loop needs to go on from the end of this epoch as if never stopped."""
        r = self.result
        return {"format": CHECKPOINT_FORMAT, "epoch": self.epochs_done, "model": _copy(self.model.state_dict()),
                "optimizer": self.optimizer.state_dict(), "ema": None if self.ema is None else self.ema.state_dict(),
                "generator": self.generator.get_state(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.model_device.type == "cuda" else None,
                "best_value": self.best_value, "best_state": self.best_state, "active": self.active,
                "result": {"status": r.status, "error": r.error, "history": r.history, "best_epoch": r.best_epoch,
                           "train_seconds": r.train_seconds, "train_images": r.train_images,
                           "checkpoint_seconds": r.checkpoint_seconds}}

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def restore(self, state: dict) -> None:
        """Load a state of `state()`; raises (ValueError, KeyError, RuntimeError, ...) when it does not fit."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, this code reads {CHECKPOINT_FORMAT}")
        epoch = state["epoch"]
        if not (isinstance(epoch, int) and 1 <= epoch <= self.spec.epochs):
            raise ValueError(f"epoch {epoch!r} is not in 1..{self.spec.epochs}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (self.ema is None) != (state["ema"] is None):
            raise ValueError("EMA state does not match the spec's ema")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        r = state["result"]
        self.result = Fit(status=r["status"], error=r["error"], history=list(r["history"]),
                          best_epoch=r["best_epoch"], train_seconds=r["train_seconds"],
                          train_images=r["train_images"], checkpoint_seconds=r["checkpoint_seconds"],
                          resumed_after_epoch=epoch)
        self.best_value, self.best_state, self.active = state["best_value"], state["best_state"], state["active"]
        self.epochs_done = epoch


def _copy(state_dict: dict) -> dict:
    return {k: v.detach().clone() for k, v in state_dict.items()}


class Step:
    """One optimizer step of every active member, each on its own batch x[idx[k]] (idx: (members, batch)),
    with running sums of each member's loss and correct predictions; the body is the unit's kernel
    (cxr.kernels). On CUDA (every member Adam/AdamW, no augmentation) the whole step, gather, forward,
    loss, backward and optimizers, is captured as a CUDA graph, `steps` consecutive steps per graph, and
    replayed (cxr.graphs): at the course's batch of 32 a step of this small CNN is ~100 kernel launches of
    a few microseconds each, so launching, not arithmetic, would set the pace. Anything else (CPU, a short
    last batch) runs eagerly. CXR_CUDA_GRAPHS=0 turns graphs off."""

    def __init__(self, members: list[Member], x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 batch_size: int, kernel: str, steps: int = 1):
        self.members, self.x, self.y, self.batch_size = members, x, y, batch_size
        self.body = functools.partial(kernels.BODIES[kernel], self)
        self.fused = kernels.FusedConvNet([mb.model for mb in members]).train() if kernel == "grouped" else None
        self.cuda, self.device_type = device.type == "cuda", device.type
        self.augmenting = augmenting(members[0].spec)
        self.loss_sum = torch.zeros(len(members), device=device)
        self.correct = torch.zeros(len(members), device=device, dtype=torch.long)
        self.graphs: graphs.StepGraphs | None = None
        self.capture_error = None
        if (graphs.available(device) and not self.augmenting and len(y) >= batch_size
                and all(mb.spec.optimizer in ("adam", "adamw") for mb in members)):
            try:
                self._capture(steps)
            except Exception as e:  # unsupported op or driver: train eagerly, say why
                self.graphs, self.capture_error = None, one_line(e)

    @property
    def steps(self) -> int:
        """Optimizer steps per call that the loop may hand over at once (cxr.graphs.batches)."""
        return self.graphs.steps if self.graphs is not None else 1

    def __call__(self, idx: torch.Tensor) -> None:
        if self.graphs is not None and self.graphs.replay(idx, self.batch_size):
            return
        for mb in self.members:  # graph mode keeps its gradient buffers (the graph reads them): zero in place
            mb.optimizer.zero_grad(set_to_none=self.graphs is None)
        self.body(idx)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def zero_grad(self) -> None:
        for mb in self.members:
            mb.optimizer.zero_grad(set_to_none=True)

    def _capture(self, steps: int) -> None:
        models, optimizers = [mb.model for mb in self.members], [mb.optimizer for mb in self.members]
        saved = graphs.snapshot(models, optimizers)
        batch = self.batch_size
        static = torch.arange(batch, device=self.y.device).repeat(len(self.members), 1)
        rest = len(self.y) % batch  # the eager last batch: tune its shape here, not in epoch 1
        graphs.warm_up(self.body, self.zero_grad, [static] * 3 + ([static[:, :rest]] if rest >= 2 else []))
        self.graphs = graphs.StepGraphs(self.body, self.zero_grad, static, steps, len(self.y) // batch)
        graphs.undo_warmup(models, optimizers, saved)  # weights, statistics, optimizer state as before
        self.reset()


def fit(specs: ExperimentSpec | list[ExperimentSpec], data: data_mod.Dataset, device: torch.device | str = "cpu",
        progress: bool | None = None, kernel: str | None = None, checkpoints: Checkpoints | None = None):
    """Train `specs` (one spec, or several of one cxr.kernels.fusion_key) together on `data`. One Fit per
    run, in order (a lone spec: its Fit); each model holds its best epoch's weights. `kernel`: the group's
    step (cxr.kernels.choose). `checkpoints`: resume each run from its last saved epoch, save every epoch."""
    if isinstance(specs, ExperimentSpec):
        return fit([specs], data, device, progress, kernel, checkpoints)[0]
    device = resolve_device(device)
    kernel = kernels.choose(specs, device, kernel)
    spec0 = specs[0]
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    x_val, y_val = data.val.x.to(device), data.val.y.to(device)  # validated every epoch: keep it there too
    x_train = x_train.contiguous(memory_format=torch.channels_last)  # once, not per batch
    members = [Member(s, data, y_train, device) for s in specs]
    if checkpoints is not None:
        _resume(members, data, y_train, device, checkpoints)
    n, batch = len(y_train), spec0.batch_size
    steps_per_epoch = math.ceil(n / batch)
    step, setup, active = None, 0.0, []
    show = sys.stderr.isatty() if progress is None else progress
    start = min(mb.epochs_done for mb in members)
    desc = spec0.run_id if len(specs) == 1 else f"{len(specs)} fused runs"
    bar = tqdm(range(start + 1, spec0.epochs + 1), desc=desc, unit="epoch", disable=not show, leave=False)
    for epoch in bar:
        now_active = [mb for mb in members if mb.active and mb.epochs_done < epoch]
        if not now_active:
            continue
        if now_active != active:  # first epoch, or a member stopped: (re)build the step
            active = now_active
            t_setup = time.perf_counter()
            between = any(scheduled(mb.spec) or mb.ema is not None for mb in active)
            steps = graphs.steps_per_graph(n // batch, between_steps=between)
            step = Step(active, x_train, y_train, device, batch, kernel, steps)
            synchronize(device)
            setup += time.perf_counter() - t_setup
        seconds, rows = _train_epoch(step, active, epoch, n, batch, steps_per_epoch, device)
        _validate(active, rows, kernel, x_val, y_val, device, seconds)
        if checkpoints is not None:
            _save(active, checkpoints)
        bar.set_postfix(active=sum(mb.active for mb in members))
    bar.close()
    ids = [s.run_id for s in specs]
    for mb in members:
        r = mb.result
        r.setup_seconds = setup
        r.cuda_graph = step is not None and step.graphs is not None
        r.graph_steps = step.steps if r.cuda_graph else None
        r.capture_error = step.capture_error if step is not None else None
        r.precision = mb.precision
        if len(specs) > 1:
            r.fused_with, r.fused_kernel = [i for i in ids if i != mb.spec.run_id], kernel
        if r.status == record.OK:
            kernels.detach_statistics(mb.evaluated)
            mb.evaluated.load_state_dict(mb.best_state)
            r.model = mb.evaluated
    return [mb.result for mb in members]


def _resume(members: list[Member], data, y_train, device, checkpoints: Checkpoints) -> None:
    """Each member from its checkpoint, when it has one that fits; a member whose checkpoint does not fit
    starts over (the checkpoint is discarded with one line)."""
    for k, mb in enumerate(members):
        state = checkpoints.load(mb.spec)
        if state is None:
            continue
        try:
            mb.restore(state)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with it, the run starts over
            checkpoints.discard(mb.spec, f"does not fit the run ({one_line(e)})")
            members[k] = Member(mb.spec, data, y_train, device)


def _train_epoch(step: Step, active: list[Member], epoch: int, n: int, batch: int, steps_per_epoch: int,
                 device: torch.device) -> tuple[float, list[dict]]:
    """One epoch of the active members: the seconds it took, and each member's history row so far."""
    t0 = time.perf_counter()
    for mb in active:
        mb.model.train()
    if step.fused is not None:
        step.fused.train()
    n_step = (epoch - 1) * steps_in_epoch(n, batch)  # the schedule's position: the same in every epoch
    lr_now = [mb.spec.lr * lr_factor(mb.spec, n_step, steps_per_epoch) for mb in active]
    step.reset()
    perm = torch.stack([torch.randperm(n, device=device, generator=mb.generator) for mb in active])
    stepped_lr = [mb for mb in active if scheduled(mb.spec)]
    images = 0
    for idx in graphs.batches(perm, batch, step.steps):  # step.steps > 1: nothing between steps
        for mb in stepped_lr:
            set_lr(mb.optimizer, mb.spec.lr * lr_factor(mb.spec, n_step, steps_per_epoch))
        step(idx)
        for mb in active:
            if mb.ema is not None:
                mb.ema.update_parameters(mb.model)
        n_step += -(-idx.shape[1] // batch)
        images += idx.shape[1]
    if images == 0:  # every batch had one image: nothing was learnt, so nothing to store as ok
        raise ValueError(f"no batch of at least 2 images in an epoch ({n} training images, batch size "
                         f"{batch}); the run trained on 0 images")
    loss_sums, corrects = step.loss_sum.tolist(), step.correct.tolist()
    synchronize(device)
    seconds = time.perf_counter() - t0
    for mb in active:  # each member's own training: the group's steps while it took part
        mb.result.train_seconds += seconds
        mb.result.train_images += images
    return seconds, [{"epoch": epoch, "lr": lr, "train_loss": loss / n, "train_accuracy": correct / n}
                     for lr, loss, correct in zip(lr_now, loss_sums, corrects, strict=True)]


def _validate(active: list[Member], rows: list[dict], kernel: str, x_val, y_val, device, seconds: float) -> None:
    """Each active member's history row of the epoch: stopped as diverged, or validated and selected."""
    t_val = time.perf_counter()
    plain = [mb for mb in active if not mb.decision.tta] if kernels.evaluates_together(kernel, device) else []
    logits = dict(zip(map(id, plain), kernels.fused_logits([mb.evaluated for mb in plain], x_val, device),
                      strict=True)) if plain else {}
    for mb, row in zip(active, rows, strict=True):
        r, spec, epoch, train_loss = mb.result, mb.spec, row["epoch"], row["train_loss"]
        mb.epochs_done = epoch
        if not math.isfinite(train_loss):
            r.status, mb.active = record.DIVERGED, False
            r.error = f"non-finite training loss in epoch {epoch} (lr {spec.lr:g})"
            r.history.append({**row, "train_loss": None, "seconds": seconds})
            continue
        try:
            val = evaluate_split(mb.evaluated, x_val, y_val, device, mb.decision, logits=logits.get(id(mb)))["metrics"]
        except FloatingPointError:
            r.status, mb.active = record.DIVERGED, False
            r.error = f"non-finite model outputs on validation in epoch {epoch} (lr {spec.lr:g})"
            r.history.append({**row, "seconds": seconds})
            continue
        row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_auroc=val["auroc"], seconds=seconds)
        r.history.append(row)
        value = {"loss": val["loss"], "accuracy": val["accuracy"], "auroc": val["auroc"] or 0.0,
                 "last": 0.0}[spec.select]
        if is_better(spec, value, mb.best_value):
            mb.best_value, r.best_epoch = value, epoch
            mb.best_state = copy.deepcopy(mb.evaluated.state_dict())
    val_seconds = (time.perf_counter() - t_val) / len(active)
    for mb in active:  # as a lone run's: the epoch and its validation
        mb.result.history[-1]["seconds"] += val_seconds


def _save(active: list[Member], checkpoints: Checkpoints) -> None:
    for mb in active:
        t0 = time.perf_counter()
        checkpoints.save(mb.spec, mb.state())
        mb.result.checkpoint_seconds += time.perf_counter() - t0
