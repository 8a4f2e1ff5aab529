#!/usr/bin/env python3
"""torch.compile on the CPU, measured against the engine's eager step, side by side in one process:

  OMP_NUM_THREADS=2 python scripts/compile-trial.py [--batch 32] [--images 4096]

The course CNN, channels-last, Adam (fused where torch has it), bf16 autocast where the CPU computes
bf16 natively (cxr.env.resolve_precision), as cxr.engine trains it. Variants:

- eager: the engine's arithmetic, no compilation;
- module: torch.compile(model) (inductor), the step otherwise eager;
- step: torch.compile of the whole step function (forward, loss, backward, optimizer step).

Each variant trains from the same weights on the same batches: a warm-up pass that includes a short last
batch (so a recompile for it is counted in the compile time, as an epoch of the default suite has one),
then the best of 3 timed passes. Printed per variant: the compile (warm-up) seconds, steady images/s, the
ratio to eager, and the break-even: how many training images it takes for the gain to pay for the compile
time (the default suite trains about 850,000 images: 18 distinct runs x 10 epochs x 4,708). Nothing is
asserted; the README's "Timings" quotes a run of this script.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from cxr.env import cpu_text, resolve_precision
from cxr.models import build_model
from cxr.recipe import _fused

SUITE_IMAGES = 18 * 10 * 4708


def make(variant: str, bf16: bool):
    torch.manual_seed(0)
    model = build_model("cnn", 2).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **_fused(torch.optim.Adam, True))
    net = torch.compile(model) if variant == "module" else model

    def step(xb, yb):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(xb)
        loss = F.cross_entropy(logits.float(), yb)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return torch.compile(step) if variant == "step" else step


def passes(step, x, y, batch: int) -> None:
    for i in range(0, len(y), batch):
        if len(y) - i >= 2:
            step(x[i:i + batch], y[i:i + batch])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--variants", default="eager,module,step")
    args = p.parse_args()
    bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.images,), generator=g)
    short = args.batch * 3 + args.batch // 2  # three full batches and a short one
    print(f"CPU {cpu_text()}, torch {torch.__version__}, "
          f"{'bf16' if bf16 else 'fp32'}, batch {args.batch}, {args.images} images per timed pass")
    rates = {}
    for variant in args.variants.split(","):
        step = make(variant, bf16)
        t0 = time.perf_counter()
        try:
            passes(step, x[:short], y[:short], args.batch)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
            print(f"{variant:>7}: failed to compile ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        warm = time.perf_counter() - t0
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            passes(step, x, y, args.batch)
            best = max(best, args.images / (time.perf_counter() - t0))
        rates[variant] = best
        line = f"{variant:>7}: warm-up {warm:6.1f} s, {best:8.0f} images/s"
        if variant != "eager" and "eager" in rates:
            gain = 1 / rates["eager"] - 1 / best  # seconds saved per image
            even = warm / gain if gain > 0 else math.inf
            line += (f", {best / rates['eager']:.2f}x eager; pays for its compile after "
                     f"{'never' if even == math.inf else f'{even:,.0f} images'} (default suite: {SUITE_IMAGES:,})")
        print(line, flush=True)


if __name__ == "__main__":
    main()
