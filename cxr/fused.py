"""Sweep fusion: the compatible runs of a sweep train at once, as one batched model.

Runs that share a step (same model, width, image size, batch size, epochs, data and augmentation;
`fusion_key`) become the members of one group. Each member is an ordinary model built exactly as a
lone run builds it (its own seed, so its own initial weights), with its own optimizer, learning
rate and schedule, EMA, loss and head, and its own generator (so its own batch order and
augmentation draws). Only the step is shared: `FusedConvNet` runs every member's forward pass as
one grouped convolution per layer (member k owns the channels [k C, (k + 1) C) of every layer, so
BatchNorm's per-channel statistics are per member), and one backward pass of the sum of the
members' losses gives each member exactly its own gradient. Each member's torch optimizer then
steps its own parameters, so Adam, AdamW and SGD are torch's own, not re-implementations.

The members' parameters stay their own leaf tensors; the fused model concatenates them per layer
in the forward pass. Their BatchNorm running statistics are views into the fused buffers, so the
running statistics the fused step updates are the members' own, and a member's `state_dict()` is
always that of its lone model.

A member whose loss stops being finite is stopped and recorded `diverged` at the end of that epoch
(as a lone run is); the group goes on without it. Validation, best-epoch selection and the one test
evaluation are per member. Only ConvNet models (`cnn`, `vgg`) fuse; a run of another model, or with
`fuse = false`, trains alone (cxr.train.fit).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cxr import data as data_mod
from cxr import graphs, losses, record
from cxr.decision import Decision
from cxr.env import resolve_device, synchronize
from cxr.errors import CxrError, one_line
from cxr.evaluate import EVAL_BATCH, evaluate_split
from cxr.models import _MEAN, _STD, ConvNet, build_model
from cxr.recipe import augment, augmenting, ema_model, lr_factor, make_optimizer, scheduled, set_lr
from cxr.spec import ExperimentSpec

FUSABLE_MODELS = ("cnn", "vgg")  # ConvNet: conv, BatchNorm, ReLU, max-pool, average-pool, linear
KERNELS = ("grouped", "loop")


def fusion_key(spec: ExperimentSpec) -> tuple | None:
    """What runs must share to train as one group, or None for a run that trains alone."""
    if not spec.fuse or spec.model not in FUSABLE_MODELS:
        return None
    return (spec.dataset, spec.image_size, spec.model, spec.width, spec.batch_size, spec.epochs,
            spec.augment_shift, spec.augment_rotate, spec.augment_scale)


def groups(specs: list[ExperimentSpec], fuse: bool = True, max_members: int | None = None
           ) -> list[list[ExperimentSpec]]:
    """The runs as training units, in the order of their first run: compatible runs together (at most
    `max_members` per group), every other run alone. `fuse=False`: every run alone."""
    units: list[list[ExperimentSpec]] = []
    open_groups: dict[tuple, list[ExperimentSpec]] = {}
    for spec in specs:
        key = fusion_key(spec) if fuse else None
        if key is None:
            units.append([spec])
            continue
        group = open_groups.get(key)
        if group is None or (max_members and len(group) >= max_members):
            group = open_groups[key] = []
            units.append(group)
        group.append(spec)
    return units


class FusedConvNet(nn.Module):
    """M ConvNets of one architecture as one model: input (B, M, H, W), member k's images in channel
    k; output a list of M logits tensors (B, outputs of member k).

    Parameters are read from the members on every call (concatenated per layer); BatchNorm running
    statistics live here, and the members' running_mean, running_var and num_batches_tracked are
    re-pointed to views of them (`share_statistics`), so that both always agree. With
    share_statistics=False the statistics are copied instead (for evaluation of EMA copies).
    """

    def __init__(self, members: list[ConvNet], share_statistics: bool = True):
        super().__init__()
        if not members or not all(isinstance(m, ConvNet) for m in members):
            raise TypeError("FusedConvNet fuses ConvNet models only")
        self.members = members  # a plain list: the members are not submodules, their parameters stay theirs
        self.m = len(members)
        layers = list(members[0].features)
        self.plan: list[tuple[str, int]] = []
        for j, layer in enumerate(layers):
            kind = type(layer).__name__
            if kind not in ("_Normalize", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"):
                raise TypeError(f"cannot fuse a {kind} layer")
            self.plan.append((kind, j))
            if kind == "BatchNorm2d":
                bns = [m.features[j] for m in members]
                mean = torch.cat([bn.running_mean for bn in bns])
                var = torch.cat([bn.running_var for bn in bns])
                count = torch.stack([bn.num_batches_tracked for bn in bns])
                self.register_buffer(f"mean{j}", mean)
                self.register_buffer(f"var{j}", var)
                self.register_buffer(f"count{j}", count)
                if share_statistics:
                    c = bns[0].num_features
                    for k, bn in enumerate(bns):
                        bn.running_mean = mean[k * c:(k + 1) * c]
                        bn.running_var = var[k * c:(k + 1) * c]
                        bn.num_batches_tracked = count[k]
        head = members[0].head
        if not (isinstance(head[3], nn.Linear) and head[2].p == 0):
            raise TypeError("cannot fuse a head with dropout")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        members, m = self.members, self.m
        h = x
        for kind, j in self.plan:
            if kind == "_Normalize":
                h = (h - _MEAN) / _STD
            elif kind == "Conv2d":
                conv = members[0].features[j]
                w = torch.cat([k.features[j].weight for k in members]) if m > 1 else conv.weight
                h = F.conv2d(h, w, None, conv.stride, conv.padding, conv.dilation, m)
            elif kind == "BatchNorm2d":
                bn = members[0].features[j]
                weight = torch.cat([k.features[j].weight for k in members]) if m > 1 else bn.weight
                bias = torch.cat([k.features[j].bias for k in members]) if m > 1 else bn.bias
                if self.training:
                    getattr(self, f"count{j}").add_(1)
                h = F.batch_norm(h, getattr(self, f"mean{j}"), getattr(self, f"var{j}"), weight, bias,
                                 self.training, bn.momentum, bn.eps)
            elif kind == "ReLU":
                h = F.relu(h, inplace=True)  # as the lone model's ReLU(inplace=True)
            else:
                pool = members[0].features[j]
                h = F.max_pool2d(h, pool.kernel_size, pool.stride)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)  # (B, M * C)
        c = h.shape[1] // m
        return [F.linear(h[:, k * c:(k + 1) * c], member.head[3].weight, member.head[3].bias)
                for k, member in enumerate(members)]


@torch.no_grad()
def fused_logits(models: list[ConvNet], x: torch.Tensor, device: torch.device,
                 batch_size: int = EVAL_BATCH) -> list[torch.Tensor]:
    """Eval-mode logits of every model on x in one batched forward per batch: a list of (N, k) float32
    CPU tensors, as cxr.evaluate.predict_logits gives for each model alone."""
    fused = FusedConvNet(models, share_statistics=False).eval()
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True)
        xb = xb.expand(-1, len(models), -1, -1)  # every member sees every image: (B, M, H, W)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = fused(xb)
        for k, lg in enumerate(logits):
            outs[k].append(lg.float())
    return [torch.cat(o).cpu() for o in outs]


class Member:
    """One run of a group: its spec, model, optimizer, generator, EMA, loss and running result."""

    def __init__(self, spec: ExperimentSpec, data: data_mod.Dataset, y_train: torch.Tensor, device: torch.device):
        from cxr.train import Fit, seed_everything  # cxr.train imports this module

        self.spec = spec
        self.decision = Decision.of(spec, data.train.y)
        seed_everything(spec.seed)  # as a lone run: the same initial weights
        self.model = build_model(spec.model, spec.num_outputs, spec.width).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(spec, self.model.parameters(), device)
        self.generator = torch.Generator(device=device).manual_seed(spec.seed)
        self.ema = ema_model(self.model, spec.ema) if spec.ema else None
        self.loss = losses.get(spec.loss)
        self.class_weights = losses.balanced_class_weights(y_train) if spec.class_weight == "balanced" else None
        self.result = Fit(status=record.OK)
        self.best_value: float | None = None
        self.best_state: dict | None = None
        self.active = True

    @property
    def evaluated(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


class FusedStep:
    """One optimizer step of every active member, each on its own batch x[idx[k]], with running sums of
    each member's loss and correct predictions. On CUDA (all members Adam/AdamW, no augmentation) the
    whole fused step is captured as a CUDA graph, `steps` consecutive steps per graph (cxr.graphs), and
    replayed, as cxr.train.TrainStep does."""

    def __init__(self, members: list[Member], x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 batch_size: int, graphed: bool, kernel: str, steps: int = 1):
        self.members, self.x, self.y, self.kernel, self.batch_size = members, x, y, kernel, batch_size
        self.fused = FusedConvNet([mb.model for mb in members]).train() if kernel == "grouped" else None
        self.cuda = device.type == "cuda"
        self.loss_sum = torch.zeros(len(members), device=device)
        self.correct = torch.zeros(len(members), device=device, dtype=torch.long)
        self.graphs: graphs.StepGraphs | None = None
        self.capture_error = None
        self.augmenting = augmenting(members[0].spec)
        if (graphed and graphs.available(device) and not self.augmenting and len(y) >= batch_size
                and all(mb.spec.optimizer in ("adam", "adamw") for mb in members)):
            try:
                self._capture(steps)
            except Exception as e:  # unsupported op or driver: train eagerly, say why
                self.graphs, self.capture_error = None, one_line(e)

    @property
    def steps(self) -> int:
        """Optimizer steps per call that the group loop may hand over at once (cxr.graphs.batches)."""
        return self.graphs.steps if self.graphs is not None else 1

    def _inputs(self, idx: torch.Tensor) -> torch.Tensor:
        m, b = idx.shape
        if self.augmenting:  # each member's own draws, from its own generator, as a lone run
            xs = torch.stack([augment(self.x[idx[k]], mb.spec, mb.generator) for k, mb in enumerate(self.members)])
        else:
            xs = self.x[idx.reshape(-1)].view(m, b, *self.x.shape[1:])
        xb = xs[:, :, 0].transpose(0, 1)  # (B, M, H, W): member k's images are channel k
        return xb.contiguous(memory_format=torch.channels_last if self.cuda else torch.contiguous_format)

    def _body(self, idx: torch.Tensor) -> None:
        if self.kernel == "loop":
            return self._loop_body(idx)
        xb = self._inputs(idx)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda, cache_enabled=False):
            logits = self.fused(xb)
        member_losses, correct = [], []
        for k, (mb, lg) in enumerate(zip(self.members, logits, strict=True)):
            yb = self.y[idx[k]]
            member_losses.append(mb.loss.train_loss(lg.float(), yb, mb.spec, mb.class_weights))
            correct.append((mb.loss.predict(lg) == yb).sum())
        stacked = torch.stack(member_losses)
        stacked.sum().backward()  # d(sum)/d(member k's weights) = d(loss k)/d(member k's weights)
        for mb in self.members:
            mb.optimizer.step()
        self.loss_sum += stacked.detach() * idx.shape[1]
        self.correct += torch.stack(correct)

    def _loop_body(self, idx: torch.Tensor) -> None:
        """Each member's lone step in turn (forward, backward, optimizer): the same operations as
        cxr.train.TrainStep, so the same numbers bit for bit."""
        for k, mb in enumerate(self.members):
            xb, yb = augment(self.x[idx[k]], mb.spec, mb.generator), self.y[idx[k]]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda, cache_enabled=False):
                logits = mb.model(xb)
            loss = mb.loss.train_loss(logits.float(), yb, mb.spec, mb.class_weights)
            loss.backward()
            mb.optimizer.step()
            self.loss_sum[k] += loss.detach() * len(yb)
            self.correct[k] += (mb.loss.predict(logits) == yb).sum()

    def __call__(self, idx: torch.Tensor) -> None:
        if self.graphs is not None and self.graphs.replay(idx, self.batch_size):
            return
        for mb in self.members:
            mb.optimizer.zero_grad(set_to_none=self.graphs is None)
        self._body(idx)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def _capture(self, steps: int) -> None:
        saved = graphs.snapshot([mb.model for mb in self.members])
        batch = self.batch_size
        static = torch.arange(batch, device=self.y.device).repeat(len(self.members), 1)
        rest = len(self.y) % batch

        def zero_grad() -> None:
            for mb in self.members:
                mb.optimizer.zero_grad(set_to_none=True)

        graphs.warm_up(self._body, zero_grad, [static] * 3 + ([static[:, :rest]] if rest >= 2 else []))
        self.graphs = graphs.StepGraphs(self._body, zero_grad, static, steps, len(self.y) // batch)
        graphs.undo_warmup([mb.model for mb in self.members], saved, [mb.optimizer for mb in self.members])
        self.reset()


def default_kernel(device: torch.device) -> str:
    """How a group's step runs: "grouped" (one grouped convolution per layer for all members) on CUDA,
    where a small model's step is bound by kernel launches, not arithmetic; "loop" (each member's lone
    step in turn, inside the one group loop) on a CPU, where the arithmetic is the cost and the wider
    grouped tensors fall out of the caches (benchmarks/test_throughput.py measures both).
    CXR_FUSE_KERNEL=grouped|loop overrides."""
    kernel = os.environ.get("CXR_FUSE_KERNEL") or ("grouped" if device.type == "cuda" else "loop")
    if kernel not in KERNELS:
        raise CxrError(f"CXR_FUSE_KERNEL={kernel!r}: allowed values are {', '.join(KERNELS)}")
    return kernel


def check_environment() -> None:
    """Refuse a bad CXR_FUSE_KERNEL or CXR_GRAPH_STEPS (CxrError, one line) before any training starts."""
    default_kernel(torch.device("cpu"))
    graphs.steps_per_graph(1, between_steps=False)


def fit_group(specs: list[ExperimentSpec], data: data_mod.Dataset, device: torch.device | str = "cpu",
              progress: bool | None = None, kernel: str | None = None) -> list:
    """Train the runs `specs` (one fusion_key) together; one cxr.train.Fit per run, in order, each as
    its lone `cxr.train.fit` would return it (the model holds the best epoch's weights). `kernel`:
    "grouped" or "loop" (default_kernel: by device)."""
    from cxr.train import is_better

    keys = {fusion_key(s) for s in specs}
    if len(keys) != 1 or None in keys:
        raise ValueError("fit_group needs runs of one fusion key (cxr.fused.fusion_key)")
    device = resolve_device(device)
    kernel = kernel or default_kernel(device)
    if kernel not in KERNELS:
        raise ValueError(f"unknown fusion kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    spec0 = specs[0]
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    x_val, y_val = data.val.x.to(device), data.val.y.to(device)
    members = [Member(s, data, y_train, device) for s in specs]
    n, batch = len(y_train), spec0.batch_size
    steps_per_epoch = math.ceil(n / batch)
    ids = [s.run_id for s in specs]

    step, setup, active = None, 0.0, []
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(1, spec0.epochs + 1), desc=f"{len(specs)} fused runs", unit="epoch", disable=not show,
               leave=False)
    n_step = 0
    for epoch in bar:
        now_active = [mb for mb in members if mb.active]
        if not now_active:
            break
        if now_active != active:  # first epoch, or a member stopped: (re)build the fused step
            active = now_active
            t_setup = time.perf_counter()
            between = any(scheduled(mb.spec) or mb.ema is not None for mb in active)
            steps = graphs.steps_per_graph(n // batch, between_steps=between)
            step = FusedStep(active, x_train, y_train, device, batch, True, kernel, steps)
            synchronize(device)
            setup += time.perf_counter() - t_setup
        t0 = time.perf_counter()
        for mb in active:
            mb.model.train()
        if step.fused is not None:
            step.fused.train()
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
        if images == 0:
            raise ValueError(f"no batch of at least 2 images in an epoch ({n} training images, batch size "
                             f"{batch}); the run trained on 0 images")
        loss_sums, corrects = step.loss_sum.tolist(), step.correct.tolist()
        synchronize(device)
        seconds = time.perf_counter() - t0
        for mb in active:  # each member's own training: the group's steps while it took part
            mb.result.train_seconds += seconds
            mb.result.train_images += images
        t_val = time.perf_counter()
        plain = [mb for mb in active if not mb.decision.tta] if kernel == "grouped" else []
        logits = dict(zip(map(id, plain), fused_logits([mb.evaluated for mb in plain], x_val, device), strict=True)) \
            if plain else {}
        for k, mb in enumerate(active):
            r = mb.result
            train_loss = loss_sums[k] / n
            row = {"epoch": epoch, "lr": lr_now[k], "train_loss": train_loss, "train_accuracy": corrects[k] / n}
            if not math.isfinite(train_loss):
                r.status, mb.active = record.DIVERGED, False
                r.error = f"non-finite training loss in epoch {epoch} (lr {mb.spec.lr:g})"
                r.history.append({**row, "train_loss": None, "seconds": seconds})
                continue
            try:
                val = evaluate_split(mb.evaluated, x_val, y_val, device, mb.decision, logits=logits.get(id(mb)))
            except FloatingPointError:
                r.status, mb.active = record.DIVERGED, False
                r.error = f"non-finite model outputs on validation in epoch {epoch} (lr {mb.spec.lr:g})"
                r.history.append({**row, "seconds": seconds})
                continue
            row.update(val_loss=val["metrics"]["loss"], val_accuracy=val["metrics"]["accuracy"],
                       val_auroc=val["metrics"]["auroc"], seconds=seconds)
            r.history.append(row)
            value = {"loss": val["metrics"]["loss"], "accuracy": val["metrics"]["accuracy"],
                     "auroc": val["metrics"]["auroc"] or 0.0, "last": 0.0}[mb.spec.select]
            if is_better(mb.spec, value, mb.best_value):
                mb.best_value, r.best_epoch = value, epoch
                mb.best_state = copy.deepcopy(mb.evaluated.state_dict())
        val_seconds = (time.perf_counter() - t_val) / len(active)
        for mb in active:
            if mb.result.history and mb.result.history[-1]["epoch"] == epoch:
                mb.result.history[-1]["seconds"] += val_seconds  # as a lone run's: the epoch and its validation
        bar.set_postfix(active=sum(mb.active for mb in members))
    bar.close()
    fits = []
    for mb in members:
        r = mb.result
        r.setup_seconds = setup
        r.cuda_graph = step is not None and step.graphs is not None
        r.graph_steps = step.steps if r.cuda_graph else None
        r.capture_error = step.capture_error if step is not None else None
        r.fused_with = [i for i in ids if i != mb.spec.run_id]
        r.fused_kernel = kernel
        if r.status == record.OK:
            model = mb.evaluated
            _detach_statistics(model)
            model.load_state_dict(mb.best_state)
            r.model = model
        fits.append(r)
    return fits


def _detach_statistics(model: nn.Module) -> None:
    """Give a member's BatchNorm layers their own running statistics again (copies of the fused views)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean = module.running_mean.clone()
            module.running_var = module.running_var.clone()
            module.num_batches_tracked = module.num_batches_tracked.clone()
