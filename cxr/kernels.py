"""How one training step of 1..N runs is computed: the step's kernels, and what runs must share to use them.

A training unit's runs ("members") each keep their own model, optimizer, generator, EMA, loss and head
(cxr.engine.Member); a kernel is the body of the one step they take together (cxr.engine.Step):

- `loop`: each member's own step in turn (gather, forward, loss, backward, optimizer). A lone run is a
  group of one that runs this kernel, and so does a CPU group in fp32 or at a large batch: each member
  computes exactly what it would compute alone, bit for bit.
- `grouped`: every member's forward pass as one grouped convolution per layer (`FusedConvNet`: member k
  owns the channels [k C, (k + 1) C) of every layer, so BatchNorm's per-channel statistics are per
  member), and one backward pass of the sum of the members' losses, which gives each member exactly its
  own gradient; then each member's torch optimizer steps its own parameters. On CUDA a small model's
  step is bound by kernel launches, not arithmetic, so one launch per layer for the whole group is what
  pays; on a CPU in bf16 at small batches, one grouped convolution per layer beats M small ones too
  (`default_kernel` has the measurements).

`choose` is the one place that picks a unit's kernel. Only ConvNet models (`cnn`, `vgg`) share a step
(`fusion_key`); any other model, or a spec with `fuse = false`, trains as a group of one.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from cxr.env import resolve_precision
from cxr.errors import CxrError
from cxr.evaluate import EVAL_BATCH
from cxr.models import _MEAN, _STD, ConvNet
from cxr.recipe import augment
from cxr.spec import ExperimentSpec

FUSABLE_MODELS = ("cnn", "vgg")  # ConvNet: conv, BatchNorm, ReLU, max-pool, average-pool, linear
KERNELS = ("grouped", "loop")
KERNEL_ENV = "CXR_FUSE_KERNEL"


def fusion_key(spec: ExperimentSpec) -> tuple | None:
    """What runs must share to train as one group, or None for a run that trains alone."""
    if not spec.fuse or spec.model not in FUSABLE_MODELS:
        return None
    return (spec.dataset, spec.image_size, spec.model, spec.width, spec.batch_size, spec.epochs,
            spec.augment_shift, spec.augment_rotate, spec.augment_scale, spec.precision)


GROUPED_CPU_MAX_BATCH = 64  # on a CPU, the grouped kernel pays in bf16 up to this batch size (default_kernel)


def default_kernel(device: torch.device, spec: ExperimentSpec | None = None) -> str:
    """A group's kernel on `device`: "grouped" on CUDA; on a CPU "grouped" for a group that trains in bf16
    at a batch of at most GROUPED_CPU_MAX_BATCH, else "loop"; CXR_FUSE_KERNEL=grouped|loop overrides.

    Measured with benchmarks/test_throughput.py (test_fused_throughput, 2-core CPU with avx512_bf16, bf16,
    groups of 3 and 9, aggregate images/s against the runs one after another): grouped 1.16-1.35x at batch
    32, 1.09-1.18x at 64, 0.97x at 128; in fp32 it lost (0.8x for 12 members at batch 32), and loop is
    ~1.0x everywhere. bf16 makes one grouped convolution per layer cheaper than M small ones; at batch 128
    the small ones are already large enough."""
    kernel = os.environ.get(KERNEL_ENV)
    if not kernel:
        if device.type == "cuda":
            return "grouped"
        bf16 = spec is not None and resolve_precision(spec.precision, device) == "bf16"
        return "grouped" if bf16 and spec.batch_size <= GROUPED_CPU_MAX_BATCH else "loop"
    if kernel not in KERNELS:
        raise CxrError(f"{KERNEL_ENV}={kernel!r}: allowed values are {', '.join(KERNELS)}")
    return kernel


def choose(specs: list[ExperimentSpec], device: torch.device, kernel: str | None = None) -> str:
    """The kernel of a unit of `specs`: "loop" for a group of one (a lone run), else `kernel` or the
    device's default. Refuses a group whose runs cannot share a step."""
    if len(specs) == 1:
        return "loop"
    keys = {fusion_key(s) for s in specs}
    if len(keys) != 1 or None in keys:
        raise ValueError("a group of several runs needs runs of one fusion key (cxr.kernels.fusion_key)")
    kernel = kernel or default_kernel(device, specs[0])
    if kernel not in KERNELS:
        raise ValueError(f"unknown fusion kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    return kernel


def loop(step, idx: torch.Tensor) -> None:
    """Each member's own step in turn, on its batch x[idx[k]]: forward, loss, backward, optimizer."""
    for k, mb in enumerate(step.members):
        xb, yb = augment(step.x[idx[k]], mb.spec, mb.generator), step.y[idx[k]]
        with torch.autocast(step.device_type, dtype=torch.bfloat16, enabled=mb.bf16, cache_enabled=False):
            logits = mb.model(xb)
        loss = mb.loss.train_loss(logits.float(), yb, mb.spec, mb.class_weights)
        loss.backward()
        mb.optimizer.step()
        step.loss_sum[k] += loss.detach() * len(yb)
        step.correct[k] += (mb.loss.predict(logits) == yb).sum()


def grouped(step, idx: torch.Tensor) -> None:
    """Every member's forward pass in one FusedConvNet, one backward pass of the sum of their losses."""
    m, b = idx.shape
    if step.augmenting:  # each member's own draws, from its own generator, as a lone run
        xs = torch.stack([augment(step.x[idx[k]], mb.spec, mb.generator) for k, mb in enumerate(step.members)])
    else:
        xs = step.x[idx.reshape(-1)].view(m, b, *step.x.shape[1:])
    xb = xs[:, :, 0].transpose(0, 1)  # (B, M, H, W): member k's images are channel k
    xb = xb.contiguous(memory_format=torch.channels_last)
    with torch.autocast(step.device_type, dtype=torch.bfloat16, enabled=step.members[0].bf16, cache_enabled=False):
        logits = step.fused(xb)
    member_losses, correct = [], []
    for k, (mb, lg) in enumerate(zip(step.members, logits, strict=True)):
        yb = step.y[idx[k]]
        member_losses.append(mb.loss.train_loss(lg.float(), yb, mb.spec, mb.class_weights))
        correct.append((mb.loss.predict(lg) == yb).sum())
    stacked = torch.stack(member_losses)
    stacked.sum().backward()  # d(sum)/d(member k's weights) = d(loss k)/d(member k's weights)
    for mb in step.members:
        mb.optimizer.step()
    step.loss_sum += stacked.detach() * b
    step.correct += torch.stack(correct)


BODIES = {"loop": loop, "grouped": grouped}


class FusedConvNet(nn.Module):
    """M ConvNets of one architecture as one model: input (B, M, H, W), member k's images in channel
    k; output a list of M logits tensors (B, outputs of member k).

    Parameters are read from the members on every call (concatenated per layer); BatchNorm running
    statistics live here, and the members' running_mean, running_var and num_batches_tracked are
    re-pointed to views of them (`share_statistics`), so that both always agree (`detach_statistics`
    gives a member its own again). With share_statistics=False the statistics are copied instead (for
    evaluation of EMA copies).
    """

    def __init__(self, members: list[ConvNet], share_statistics: bool = True):
        super().__init__()
        if not members or not all(isinstance(m, ConvNet) for m in members):
            raise TypeError("FusedConvNet fuses ConvNet models only")
        self.members = members  # a plain list: the members are not submodules, their parameters stay theirs
        self.m = len(members)
        self.plan: list[tuple[str, int]] = []
        for j, layer in enumerate(members[0].features):
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


def detach_statistics(model: nn.Module) -> None:
    """Give a member's BatchNorm layers their own running statistics again (copies of the fused views)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean = module.running_mean.clone()
            module.running_var = module.running_var.clone()
            module.num_batches_tracked = module.num_batches_tracked.clone()


def evaluates_together(kernel: str | None, device: torch.device) -> bool:
    """Whether a unit trained by `kernel` evaluates its models in one batched forward (fused_logits) rather
    than one by one: a grouped unit on CUDA, where one launch per layer for the group pays. Not on a CPU,
    where an fp32 grouped convolution is slow: the 12 models of the default suite's batch-32 group on its
    524 validation images took 674 ms fused and 233 ms one by one (2-core CPU, torch 2.13.0+cpu; 10 epochs
    of that cost 4 s)."""
    return kernel == "grouped" and device.type == "cuda"


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
