"""The one training engine: `fit` trains a spec on a data set; `run` adds the results store.

The data set lives on the device as tensors and batches are `randperm` slices (no DataLoader).
On CUDA: bf16 autocast and channels_last. The best epoch is chosen on validation; the test split
is evaluated once, with the weights of that epoch. A non-finite loss stops the run as `diverged`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cxr import data as data_mod
from cxr import losses, record, results
from cxr.env import environment, now, resolve_device, synchronize
from cxr.errors import one_line
from cxr.evaluate import evaluate_split
from cxr.models import build_model
from cxr.record import RunRecord
from cxr.spec import ExperimentSpec


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
    capture_error: str | None = None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds CUDA


def make_optimizer(spec: ExperimentSpec, params, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The spec's optimizer. On CUDA, Adam/AdamW are capturable with the lr in a device tensor,
    so that a CUDA graph of the training step can replay them (see TrainStep)."""
    if spec.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if spec.optimizer == "adam" else torch.optim.AdamW
        if device is not None and device.type == "cuda":
            return cls(params, lr=torch.tensor(spec.lr, device=device), weight_decay=spec.weight_decay,
                       capturable=True)
        return cls(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def lr_factor(spec: ExperimentSpec, step: int, steps_per_epoch: int) -> float:
    """Multiplier of spec.lr at optimizer step `step` (0-based) under the spec's schedule."""
    total = spec.epochs * steps_per_epoch
    epoch = step / steps_per_epoch
    warmup = spec.warmup_epochs * steps_per_epoch
    if spec.schedule == "onecycle":
        # The shape of torch's OneCycleLR (cosine, 30% up from lr/25, down to lr/1e4), as a pure function.
        up = max(1.0, 0.3 * total)
        if step < up:
            return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * step / up)) / 2
        t = min(1.0, (step - up) / max(1.0, total - up))
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * t)) / 2
    if warmup and step < warmup:
        return (step + 1) / warmup
    if spec.schedule == "cosine":
        t = (step - warmup) / max(1.0, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if spec.schedule == "step":
        return spec.step_gamma ** int(epoch // spec.step_epochs)
    return 1.0


def augment(x: torch.Tensor, spec: ExperimentSpec, generator: torch.Generator) -> torch.Tensor:
    """Random affine (shift, rotation, zoom) per image on the device; labels are untouched.

    No flips: a chest radiograph is not left-right symmetric (heart on the left).
    """
    if not (spec.augment_shift or spec.augment_rotate or spec.augment_scale):
        return x
    n = x.shape[0]

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * bound

    angle = uniform(math.radians(spec.augment_rotate))
    scale = 1 + uniform(spec.augment_scale)
    shift = torch.stack([uniform(2 * spec.augment_shift), uniform(2 * spec.augment_shift)], 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _is_better(spec: ExperimentSpec, value: float, best: float | None) -> bool:
    if best is None or spec.select == "last":
        return True
    return value < best if spec.select == "loss" else value > best


class TrainStep:
    """One optimizer step on the batch x[idx], with running sums of loss and correct predictions.

    On CUDA (Adam/AdamW, no augmentation) the whole step, gather, forward, loss, backward and
    optimizer, is captured once as a CUDA graph and replayed: at the course's batch of 32 a step
    of this small CNN is ~100 kernel launches of a few microseconds each, so launching, not
    arithmetic, would set the pace. Anything else (CPU, a short last batch) runs eagerly.
    Set CXR_CUDA_GRAPHS=0 to turn graphs off.
    """

    def __init__(self, model, optimizer, spec: ExperimentSpec, x, y, generator, device: torch.device):
        self.model, self.optimizer, self.spec, self.x, self.y, self.generator = model, optimizer, spec, x, y, generator
        self.loss = losses.get(spec.loss)
        self.cuda = device.type == "cuda"
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.graph, self.static_idx = None, None
        self.capture_error = None
        if (self.cuda and spec.optimizer in ("adam", "adamw") and not _augmenting(spec)
                and os.environ.get("CXR_CUDA_GRAPHS", "1") != "0" and len(y) >= spec.batch_size):
            try:
                self._capture()
            except Exception as e:  # unsupported op or driver: train eagerly, say why
                self.graph, self.capture_error = None, one_line(e)

    def _body(self, idx) -> None:
        xb, yb = augment(self.x[idx], self.spec, self.generator), self.y[idx]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda, cache_enabled=False):
            logits = self.model(xb)
        loss = self.loss.train_loss(logits.float(), yb, self.spec)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(yb)
        self.correct += (self.loss.predict(logits) == yb).sum()

    def __call__(self, idx: torch.Tensor) -> None:
        if self.graph is not None and len(idx) == len(self.static_idx):
            self.static_idx.copy_(idx)
            self.graph.replay()
        else:
            # graph mode keeps its gradient buffers (the graph reads them), so zero in place
            self.optimizer.zero_grad(set_to_none=self.graph is None)
            self._body(idx)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def _capture(self) -> None:
        snapshot = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.static_idx = torch.arange(self.spec.batch_size, device=self.y.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        rest = len(self.y) % self.spec.batch_size  # the eager last batch: tune its shape here, not in epoch 1
        with torch.cuda.stream(side):  # warm-up steps, as torch.cuda.graph requires
            for idx in [self.static_idx] * 3 + ([self.static_idx[:rest]] if rest >= 2 else []):
                self.optimizer.zero_grad(set_to_none=True)
                self._body(idx)
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body(self.static_idx)
        # Undo the warm-up steps: weights, BatchNorm statistics, Adam's moments and step count.
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(snapshot[k])
            for state in self.optimizer.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
        self.reset()
        self.graph = graph


def _augmenting(spec: ExperimentSpec) -> bool:
    return bool(spec.augment_shift or spec.augment_rotate or spec.augment_scale)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a captured graph reads the lr from this tensor
        else:
            group["lr"] = lr


def fit(spec: ExperimentSpec, data: data_mod.Dataset, device: torch.device | str = "cpu",
        progress: bool | None = None) -> Fit:
    """Train `spec` on `data`; the returned model holds the best epoch's weights."""
    device = resolve_device(device)
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
    ema = _ema_model(model, spec.ema) if spec.ema else None
    evaluated = ema.module if ema is not None else model  # what is validated, selected and returned

    result = Fit(status=record.OK)
    t_setup = time.perf_counter()
    step = TrainStep(model, optimizer, spec, x_train, y_train, generator, device)
    synchronize(device)
    result.setup_seconds = time.perf_counter() - t_setup
    result.cuda_graph = step.graph is not None
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
        for i in range(0, n, spec.batch_size):
            idx = perm[i:i + spec.batch_size]
            if len(idx) < 2:  # a 1-image batch breaks BatchNorm statistics
                continue
            if spec.schedule != "none" or spec.warmup_epochs:
                _set_lr(optimizer, spec.lr * lr_factor(spec, n_step, steps_per_epoch))
            step(idx)
            if ema is not None:
                ema.update_parameters(model)
            n_step += 1
            result.train_images += len(idx)
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
            val = evaluate_split(evaluated, x_val, y_val, device)["metrics"]
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
        if _is_better(spec, value, best_value):
            best_value, result.best_epoch = value, epoch
            best_state = copy.deepcopy(evaluated.state_dict())
        bar.set_postfix(loss=f"{train_loss:.4f}", val_acc=f"{val['accuracy']:.3f}")
    bar.close()
    if result.status == record.OK:
        evaluated.load_state_dict(best_state)
        result.model = evaluated
    return result


def _ema_model(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """Exponential moving average of the weights and of the BatchNorm statistics (torch's swa_utils)."""
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)


def run(spec: ExperimentSpec, out: str | Path = "results", device: str = "auto", *, rerun: bool = False,
        data: data_mod.Dataset | None = None, progress: bool | None = None) -> RunRecord:
    """Train and evaluate one run and store its record; a stored result with the same spec hash is
    returned instead (with `cached` True) unless `rerun`. Data errors propagate (they concern every
    run); any other exception is recorded as status "failed" with a one-line error."""
    if not rerun:
        stored = results.find(out, spec) or _reuse_same_recipe(out, spec)
        if stored is not None:
            return dataclasses.replace(stored, cached=True)
    dev = resolve_device(device)
    data = data if data is not None else data_mod.load(spec.dataset, spec.image_size)
    rec = RunRecord(id=spec.id, seed=spec.seed, spec=spec.to_dict(), spec_hash=spec.spec_hash(),
                    status=record.FAILED, environment={**environment(dev), "started_at": now()},
                    dataset=data.summary())
    try:
        fitted = fit(spec, data, dev, progress)
        timing = {"train_seconds": round(fitted.train_seconds, 3),
                  "images_per_second": round(fitted.train_images / max(fitted.train_seconds, 1e-9), 1),
                  "eval_seconds": None, "setup_seconds": round(fitted.setup_seconds, 3),
                  "cuda_graph": fitted.cuda_graph}
        if fitted.capture_error:
            timing["cuda_graph_error"] = fitted.capture_error
        rec = dataclasses.replace(rec, status=fitted.status, error=fitted.error, history=tuple(fitted.history),
                                  best_epoch=fitted.best_epoch, timing=timing)
        if fitted.status == record.OK:
            t0 = time.perf_counter()
            val = evaluate_split(fitted.model, data.val.x, data.val.y, dev)
            test = evaluate_split(fitted.model, data.test.x, data.test.y, dev)  # the one look at test
            timing["eval_seconds"] = round(time.perf_counter() - t0, 3)
            wpath = results.save_weights(results.weights_path(out, spec), fitted.model.state_dict())
            rec = dataclasses.replace(rec, metrics={"val": val["metrics"], "test": test["metrics"]},
                                      predictions=test["predictions"],
                                      weights=wpath.relative_to(Path(out)).as_posix())
    except (KeyboardInterrupt, data_mod.DataError):
        raise
    except Exception as e:  # a crashed run is recorded, and the sweep goes on
        rec = dataclasses.replace(rec, status=record.FAILED, error=one_line(e), metrics=None, predictions=None)
    rec = dataclasses.replace(rec, environment={**rec.environment, "finished_at": now()})
    results.write(out, rec)
    return rec


def _reuse_same_recipe(out: str | Path, spec: ExperimentSpec) -> RunRecord | None:
    """A finished run with the identical recipe and seed stored under another id (e.g. Task A's
    CE run is Task B's lr 0.001 run): copy it under this id instead of training it again."""
    want = spec.spec_hash()
    for path in sorted((Path(out) / "runs").glob(f"*/seed-{spec.seed}.json")):
        try:
            other = results.read(path)
        except results.ResultError:
            continue
        if other.spec_hash != want or other.status == record.FAILED or other.id == spec.id:
            continue
        rec = dataclasses.replace(other, id=spec.id, spec=spec.to_dict(), reused_from=other.id, weights=None)
        if other.weights:
            src = Path(out) / other.weights
            if src.exists():
                dst = results.weights_path(out, spec)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                rec = dataclasses.replace(rec, weights=dst.relative_to(Path(out)).as_posix())
        results.write(out, rec)
        return rec
    return None
