"""CUDA graphs of training steps: cxr.engine.Step captures its step (of 1..N runs, any kernel) with these.

A small model's step is ~100 kernel launches of a few microseconds each, so on a GPU the host's
launching, not the arithmetic, sets the pace. The step (gather, forward, loss, backward, optimizer)
is captured once and replayed. A graph may hold several consecutive steps, up to every full batch
of an epoch: the epoch's permutation is copied into the graph's index buffer and one replay runs
them all (CXR_GRAPH_STEPS). That needs nothing to happen on the host between the steps, so runs
with an lr schedule or EMA replay one step at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cxr.errors import CxrError

STEPS_ENV = "CXR_GRAPH_STEPS"


def available(device: torch.device) -> bool:
    """Whether training steps on `device` are captured: on CUDA, unless CXR_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("CXR_CUDA_GRAPHS", "1") != "0"


def steps_per_graph(full_batches: int, between_steps: bool) -> int:
    """Optimizer steps per captured graph: CXR_GRAPH_STEPS ("1", the default, also when unset or empty;
    an integer K; or "epoch", every full batch of an epoch), at most the epoch's full batches; 1 when the
    host must act between steps (an lr schedule, EMA)."""
    text = os.environ.get(STEPS_ENV) or "1"  # empty is the default, as for CXR_FUSE_KERNEL
    if text == "epoch":
        steps = full_batches
    else:
        try:  # ASCII digits only: int() alone would also take " 2 ", "+2", "1_0" and "٢"
            steps = int(text) if text.isascii() and text.isdigit() else 0
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            steps = 0
        if steps < 1:
            raise CxrError(f"{STEPS_ENV}={text!r}: expected a positive integer or 'epoch'")
    return 1 if between_steps else max(1, min(steps, full_batches))


def batches(perm: torch.Tensor, batch: int, steps: int) -> Iterator[torch.Tensor]:
    """The epoch's batches along perm's last axis: the full ones `steps` at a time (one replay of a
    `steps`-step graph each) while `steps` of them remain, then one at a time; the last, short batch
    alone, unless it has a single image (that breaks BatchNorm statistics, so it is left out)."""
    n = perm.shape[-1]
    start = 0
    while steps > 1 and start + steps * batch <= n:
        yield perm[..., start:start + steps * batch]
        start += steps * batch
    for i in range(start, n, batch):
        idx = perm[..., i:i + batch]
        if idx.shape[-1] >= 2:
            yield idx


def snapshot(models: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> tuple[list[dict], list[dict]]:
    """Copies of each model's weights and buffers and of each optimizer's state, for `undo_warmup`."""
    weights = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    states = [{p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in o.state.items()}
              for o in optimizers]
    return weights, states


def undo_warmup(models: list[nn.Module], optimizers: list[torch.optim.Optimizer], saved: tuple[list, list]) -> None:
    """Undo the warm-up steps that capture needs, in place (the graphs hold these tensors' addresses):
    weights and BatchNorm statistics from the `snapshot`, and each optimizer's state as it was: the values
    it had (a resumed run's Adam moments, a group rebuilt after a member stopped), or zero for state the
    warm-up made (as before a first step)."""
    weights, states = saved
    with torch.no_grad():
        for model, before in zip(models, weights, strict=True):
            for k, v in model.state_dict().items():
                v.copy_(before[k])
        for optimizer, before in zip(optimizers, states, strict=True):
            for p, state in optimizer.state.items():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        v.copy_(before[p][k]) if p in before and k in before[p] else v.zero_()


def capture(body: Callable[[torch.Tensor], None], zero_grad: Callable[[], None],
            static_idx: torch.Tensor) -> torch.cuda.CUDAGraph:
    """One CUDA graph of len(static_idx) consecutive optimizer steps, step j on the batch static_idx[j].
    Refill static_idx in place and replay the graph to run the next ones. The caller has warmed the
    step up on a side stream first, as torch.cuda.graph requires, and undoes the warm-up after.
    zero_grad sets the gradients to None: each captured backward then writes fresh gradients in the
    graph's memory pool, which that step's optimizer reads."""
    graph = torch.cuda.CUDAGraph()
    zero_grad()
    with torch.cuda.graph(graph):
        for j in range(len(static_idx)):
            if j:
                zero_grad()
            body(static_idx[j])
    return graph


def warm_up(body: Callable[[torch.Tensor], None], zero_grad: Callable[[], None], idx: list[torch.Tensor]) -> None:
    """Run the step on each index batch of `idx` on a side stream (cuDNN autotuning, the optimizer's
    lazily made state, the allocator): what must happen before capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for batch_idx in idx:
            zero_grad()
            body(batch_idx)
    torch.cuda.current_stream().wait_stream(side)


class StepGraphs:
    """The captured graphs of one training step: of `steps` steps, and of one step when the epoch's full
    batches are not a multiple of `steps`; each with its static index buffer of shape (k, *batch_shape)."""

    def __init__(self, body: Callable[[torch.Tensor], None], zero_grad: Callable[[], None],
                 batch_idx: torch.Tensor, steps: int, full_batches: int):
        sizes = sorted({steps, 1} if full_batches % steps else {steps}, reverse=True)
        self.steps = steps
        self.static = {k: batch_idx.unsqueeze(0).repeat(k, *[1] * batch_idx.dim()) for k in sizes}
        self.graphs = {k: capture(body, zero_grad, self.static[k]) for k in sizes}

    def replay(self, idx: torch.Tensor, batch: int) -> bool:
        """Run the steps of idx (shape (*member_dims, k * batch)) as one replay; False when no graph fits
        (a short last batch: the caller runs it eagerly)."""
        k, rest = divmod(idx.shape[-1], batch)
        if rest or k not in self.graphs:
            return False
        static = self.static[k]
        # (..., k*B) -> (k, ..., B): step j's batch is static[j]
        static.copy_(idx.unflatten(-1, (k, batch)).movedim(-2, 0))
        self.graphs[k].replay()
        return True
