"""The pieces of a training recipe that are not the loop: the optimizer, the learning-rate schedule as
a pure function of the step, the on-device affine augmentation, and the weight EMA (cxr.engine runs them)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from cxr.spec import ExperimentSpec


def make_optimizer(spec: ExperimentSpec, params, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The spec's optimizer, its state in fp32. On CUDA, Adam/AdamW are capturable with the lr in a device
    tensor, so that a CUDA graph of the training step can replay them (cxr.engine.Step). On a CPU the
    fused implementation (one kernel over all parameters instead of a few per tensor) where torch has one."""
    cpu = device is None or device.type == "cpu"
    if spec.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if spec.optimizer == "adam" else torch.optim.AdamW
        if device is not None and device.type == "cuda":
            return cls(params, lr=torch.tensor(spec.lr, device=device), weight_decay=spec.weight_decay,
                       capturable=True)
        return cls(params, lr=spec.lr, weight_decay=spec.weight_decay, **_fused(cls, cpu))
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                           **_fused(torch.optim.SGD, cpu))


@functools.cache
def _fused(cls: type, cpu: bool) -> dict:
    """{"fused": True} where this torch has a fused CPU implementation of `cls`, else {} (its default)."""
    if not cpu:
        return {}
    try:
        cls([torch.zeros(1, requires_grad=True)], lr=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return {}
    return {"fused": True}


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


def augmenting(spec: ExperimentSpec) -> bool:
    return bool(spec.augment_shift or spec.augment_rotate or spec.augment_scale)


def scheduled(spec: ExperimentSpec) -> bool:
    """Whether spec's learning rate changes from step to step (a schedule or warm-up): set_lr every step."""
    return spec.schedule != "none" or bool(spec.warmup_epochs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a captured graph reads the lr from this tensor
        else:
            group["lr"] = lr


def ema_model(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """Exponential moving average of the weights and of the BatchNorm statistics (torch's swa_utils)."""
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)
