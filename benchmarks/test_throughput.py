"""Training and evaluation throughput (images/s): the engine vs the course's DataLoader loop.

Same model (cxr.models.build_model("cnn", 2), same initial weights), same data (the synthetic
train split at 28 px, cycled to --throughput-images images), same optimizer (Adam, lr 0.001) and
loss (cross-entropy), at batch sizes 32, 64 and 128, measured side by side in one process, each
after a warm-up of a few batches and as the best of 3 timed repeats (a shared machine is noisy):

- engine, training: an epoch of the real `cxr.engine.fit` (epochs=1; no second training loop
  here): the data on the device, randperm index batches, bf16 autocast and channels_last on CUDA.
  Images/s is fit's own train_images / train_seconds, which leave out its validation pass.
- course, training: `DataLoader(TensorDataset(x, y), batch_size, shuffle=True)`, a `.to(device)`
  per batch, loss and accuracy read with `.item()` every batch, as the course's loop does.
- evaluation: `cxr.evaluate.predict_logits` vs the course's no_grad DataLoader loop with argmax,
  at the same batch size.

Fused groups (test_fused_throughput): a group trained at once by each cxr.kernels kernel, and by torch.func's
vmap over stacked models, against its runs one after another and the course loop.

MFU (model FLOP utilisation) = model FLOPs per image (x3 for a training step: forward and
backward) x images/s / the device's peak, measured here by timing a matmul (2048x2048 float32 on
CPU, 8192x8192 bfloat16 on CUDA). On CUDA every clock stops after torch.cuda.synchronize.
Timings are reported (extra_info and the table at the end of the session), never asserted: the
machine may be shared. The benchmark's own wall time is that of the engine's 3 fit() calls.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cxr import data as data_mod
from cxr import graphs
from cxr.engine import fit
from cxr.env import cpu_text, device_name, resolve_precision, synchronize
from cxr.evaluate import predict_logits
from cxr.kernels import KERNELS, default_kernel
from cxr.models import build_model, count_flops
from cxr.spec import ExperimentSpec

BATCH_SIZES = (32, 64, 128)
IMAGE_SIZE = 28
IMAGES = {"cpu": 2048, "cuda": 16384}  # per timed pass, unless --throughput-images
WARMUP_BATCHES = 4
VAL_IMAGES = 128
ROUNDS = 3  # timed repeats of each measurement; the best counts, as with timeit (a shared machine is noisy)


@pytest.fixture(scope="module")
def workload(cxr_settings) -> tuple[data_mod.Split, data_mod.Split]:
    """(train images to measure on, the validation split that fit() wants)."""
    data = data_mod.load("synthetic", IMAGE_SIZE)
    n = cxr_settings.throughput_images or IMAGES.get(cxr_settings.device.type, IMAGES["cpu"])
    idx = torch.arange(n) % data.train.n
    val = data_mod.Split(x=data.val.x[:VAL_IMAGES], y=data.val.y[:VAL_IMAGES])  # fit() validates on it; untimed
    return data_mod.Split(x=data.train.x[idx].contiguous(), y=data.train.y[idx]), val


@pytest.fixture(scope="module")
def peak(cxr_settings) -> tuple[float, str]:
    """(FLOP/s, what was timed): the best of a few timings of one large matmul on the device."""
    device = cxr_settings.device
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = math.inf
    for _ in range(4 if device.type == "cpu" else 20):  # the first one warms up
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best, f"{n}x{n} {str(dtype).removeprefix('torch.')} matmul"


@pytest.fixture(scope="module")
def peak_bf16(cxr_settings, peak) -> tuple[float, str]:
    """The bf16 matmul peak (on CUDA `peak` is already bf16): what bf16 training is measured against."""
    device = cxr_settings.device
    if device.type == "cuda":
        return peak
    n = 2048
    a, b = (torch.randn(n, n).to(torch.bfloat16) for _ in range(2))
    best = math.inf
    for _ in range(4):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best, f"{n}x{n} bfloat16 matmul"


def best_rate(fn, device: torch.device) -> float:
    """Images/s of fn (which returns how many images it processed): the best of ROUNDS timed calls."""
    best = 0.0
    for _ in range(ROUNDS):
        synchronize(device)
        t0 = time.perf_counter()
        images = fn()
        synchronize(device)
        best = max(best, images / (time.perf_counter() - t0))
    return best


def course_train_epoch(model: nn.Module, loader: DataLoader, optimizer, device: torch.device) -> int:
    """The course's training loop, one epoch; returns the number of images seen."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    running_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item() * labels.size(0)
        correct += (outputs.argmax(1) == labels).sum().item()
        seen += labels.size(0)
    return seen


@torch.no_grad()
def course_evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> int:
    """The course's evaluation loop; returns the number of images seen."""
    model.eval()
    correct, total = 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        _, predicted = torch.max(model(images), 1)
        total += labels.size(0)
        correct += (predicted == labels).sum().item()
    return total


def _dataset(train: data_mod.Split, val: data_mod.Split) -> data_mod.Dataset:
    return data_mod.Dataset(source="synthetic", name="throughput workload", synthetic=True,
                            image_size=IMAGE_SIZE, train=train, val=val, test=val)


def _loader(split: data_mod.Split, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(TensorDataset(split.x, split.y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


def course_defaults():
    """PyTorch's default cuDNN settings (no autotuning), as a course script runs with."""
    return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False)


def course_model(spec: ExperimentSpec, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model fit() starts from (same seed, same constructor) and the course's optimizer."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, spec.num_outputs, spec.width).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=spec.lr)


@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"batch{b}")
def test_throughput(batch_size, benchmark, cxr_settings, workload, peak, peak_bf16, throughput_rows, monkeypatch):
    device = cxr_settings.device
    train, val = workload
    n_warm = WARMUP_BATCHES * batch_size
    warm = data_mod.Split(x=train.x[:n_warm], y=train.y[:n_warm])
    spec = ExperimentSpec(name="throughput", model="cnn", loss="ce", optimizer="adam", lr=0.001,
                          batch_size=batch_size, epochs=1, select="last")

    # Training. Engine: a warm-up fit, then the measured ones (fit's own clock, validation left out).
    fit(spec, _dataset(warm, val), device, progress=False)
    fits = []

    def engine_epoch():
        fits.append(fit(spec, _dataset(train, val), device, progress=False))
        synchronize(device)

    benchmark.pedantic(engine_epoch, rounds=ROUNDS, iterations=1)
    if fits[-1].model is None:
        pytest.fail(f"the engine's fit did not finish: {fits[-1].status} ({fits[-1].error})", pytrace=False)
    engine_train = max(f.train_images / f.train_seconds for f in fits)
    precision = fits[-1].precision  # the default, "auto": bf16 where the device computes it natively
    # The engine in fp32 too (precision = "fp32"), side by side: what channels-last and fused Adam give alone.
    fp32_spec = replace(spec, precision="fp32")
    fit(fp32_spec, _dataset(warm, val), device, progress=False)
    engine_fp32 = max(f.train_images / f.train_seconds
                      for f in (fit(fp32_spec, _dataset(train, val), device, progress=False) for _ in range(ROUNDS)))
    # On CUDA, also with every full batch of an epoch in one graph replay (cxr.graphs, CXR_GRAPH_STEPS=epoch).
    epoch_graph = None
    if device.type == "cuda":
        with monkeypatch.context() as env:
            env.setenv(graphs.STEPS_ENV, "epoch")
            fit(spec, _dataset(warm, val), device, progress=False)
            whole = [fit(spec, _dataset(train, val), device, progress=False) for _ in range(ROUNDS)]
        epoch_graph = max(f.train_images / f.train_seconds for f in whole)
    # Course: the same model from the same seed; a warm-up on a few batches, then timed epochs,
    # with PyTorch's default cuDNN settings (fit() turns cudnn.benchmark on for the process).
    model, optimizer = course_model(spec, device)
    with course_defaults():
        course_train_epoch(model, _loader(warm, batch_size, True), optimizer, device)
        loader = _loader(train, batch_size, True)
        course_train = best_rate(lambda: course_train_epoch(model, loader, optimizer, device), device)

    # Evaluation, each loop with its own trained model, after a warm-up.
    engine_model = fits[-1].model
    predict_logits(engine_model, warm.x, device, batch_size)
    engine_eval = best_rate(lambda: len(predict_logits(engine_model, train.x, device, batch_size)), device)
    with course_defaults():
        course_evaluate(model, _loader(warm, batch_size, False), device)
        loader = _loader(train, batch_size, False)
        course_eval = best_rate(lambda: course_evaluate(model, loader, device), device)

    peak_flops, peak_what = peak
    flops = count_flops(build_model("cnn", 2), IMAGE_SIZE)  # forward pass of one image

    def mfu(images_per_second: float, passes: int, peak_of: float = peak_flops) -> float:
        return passes * flops * images_per_second / peak_of

    engine_peak = peak_bf16[0] if precision == "bf16" else peak_flops

    name = device_name(device) if device.type == "cuda" else f"CPU {cpu_text()}"
    row = {
        "batch_size": batch_size, "images": train.n, "rounds": ROUNDS, "device": device.type,
        "device_name": name, "engine_cuda_graph": fits[-1].cuda_graph,
        "engine_train_ips": round(engine_train, 1), "course_train_ips": round(course_train, 1),
        "train_ratio": round(engine_train / course_train, 3),
        "engine_epoch_graph_train_ips": round(epoch_graph, 1) if epoch_graph else None,
        "epoch_graph_ratio": round(epoch_graph / course_train, 3) if epoch_graph else None,
        "engine_eval_ips": round(engine_eval, 1), "course_eval_ips": round(course_eval, 1),
        "eval_ratio": round(engine_eval / course_eval, 3),
        "engine_train_mfu": mfu(engine_train, 3, engine_peak), "course_train_mfu": mfu(course_train, 3),
        "engine_precision": precision, "engine_fp32_train_ips": round(engine_fp32, 1),
        "fp32_ratio": round(engine_fp32 / course_train, 3), "engine_fp32_train_mfu": mfu(engine_fp32, 3),
        "peak_bf16_gflops": round(peak_bf16[0] / 1e9, 1),
        "engine_eval_mfu": mfu(engine_eval, 1), "course_eval_mfu": mfu(course_eval, 1),
        "model_mflops": flops / 1e6, "peak_gflops": round(peak_flops / 1e9, 1), "peak_matmul": peak_what,
    }
    benchmark.extra_info.update(row)
    throughput_rows.append(row)


# ------------------------------------------------------------------------------- fused groups

FUSED_MEMBERS = (3, 9, 18)
FUSED_IMAGES_PER_MEMBER = {"cpu": 512, "cuda": 16384}  # training images per member and timed pass
# (--throughput-images overrides): a group of 18 at 512 images is 9,216 images per pass on a 2-core CPU


@pytest.fixture(scope="module")
def bandwidth(cxr_settings) -> float:
    """Memory bandwidth in bytes/s: the best of a few timed copies of a 256 MiB (CPU) or 2 GiB (CUDA)
    buffer, counting each byte read and written (2 x the buffer per copy)."""
    device = cxr_settings.device
    n = (256 if device.type == "cpu" else 2048) * 2**20 // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    best = math.inf
    for _ in range(4 if device.type == "cpu" else 10):  # the first one warms up
        synchronize(device)
        t0 = time.perf_counter()
        b.copy_(a)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def activation_bytes(image_size: int, element_bytes: int) -> int:
    """Bytes of every layer's output for one image in one forward pass of the cnn (conv, BatchNorm,
    ReLU and pooling outputs, logits): the activations a training step must stream through memory."""
    model = build_model("cnn", 2)
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += output.numel() * element_bytes

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, image_size, image_size))
    for h in handles:
        h.remove()
    return total


# A training step streams each activation about 5 times: the forward pass writes it and the next layer
# reads it (2), the backward pass reads it again and writes and reads its gradient (3). Weights are
# small next to a batch's activations and are left out. So the memory roofline is
# bandwidth / (5 x activation bytes per image): what the fraction below compares to.
STREAMS_PER_TRAINING_IMAGE = 5


def vmap_rate(specs: list[ExperimentSpec], train: data_mod.Split, device: torch.device) -> float:
    """Aggregate training images/s of one epoch of the group's step batched by torch.func instead: the
    members' parameters and BatchNorm buffers stacked (stack_module_state), one vmap of functional_call
    over (member, its own batch), one backward of the summed losses, one torch Adam over the stacked
    parameters, eagerly (no CUDA graph). The issue's other way to batch models; measured, not an engine
    kernel (vmap's convolution rule is itself a grouped convolution). One lr for the stack: per-member
    learning rates would take a stacked Adam of one's own, at the same arithmetic."""
    from torch.func import functional_call, stack_module_state, vmap

    models = []
    for s in specs:
        torch.manual_seed(s.seed)
        models.append(build_model(s.model, s.num_outputs, s.width).to(device).train())
    params, buffers = stack_module_state(models)
    shape = build_model(specs[0].model, specs[0].num_outputs, specs[0].width).to("meta").train()
    optimizer = torch.optim.Adam(params.values(), lr=specs[0].lr)
    x, y = train.x.to(device), train.y.to(device)
    m, n, batch = len(specs), len(train.y), specs[0].batch_size
    generator = torch.Generator(device=device).manual_seed(0)
    perm = torch.stack([torch.randperm(n, device=device, generator=generator) for _ in range(m)])

    def one(p, b, xb):
        return functional_call(shape, (p, b), (xb,))

    synchronize(device)
    t0 = time.perf_counter()
    for i in range(0, n - batch + 1, batch):  # full batches
        idx = perm[:, i:i + batch]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = vmap(one)(params, buffers, x[idx])  # (M, B, 2)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y[idx].flatten(), reduction="none").view(m, -1)
        optimizer.zero_grad(set_to_none=True)
        losses.mean(1).sum().backward()
        optimizer.step()
    synchronize(device)
    return m * (n // batch) * batch / (time.perf_counter() - t0)


@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("members", FUSED_MEMBERS, ids=lambda m: f"members{m}")
def test_fused_throughput(members, batch_size, benchmark, cxr_settings, bandwidth, fused_rows, monkeypatch):
    """Aggregate training images/s of a fused group (cxr.engine.fit, each kernel) against the same
    runs trained one after another (cxr.engine.fit of each run alone) and against the course's loop, side by side.

    The members are a sweep as the suite has them: seeds and learning rates of one CE recipe. One epoch
    each; images/s counts every member's images over the training clock (fit's own
    train_seconds: validation and setup are left out). Best of ROUNDS timed repeats."""
    device = cxr_settings.device
    full = data_mod.load("synthetic", IMAGE_SIZE)
    n = cxr_settings.throughput_images or FUSED_IMAGES_PER_MEMBER.get(device.type, 512)
    idx = torch.arange(n) % full.train.n
    train = data_mod.Split(x=full.train.x[idx].contiguous(), y=full.train.y[idx])
    val = data_mod.Split(x=full.val.x[:VAL_IMAGES], y=full.val.y[:VAL_IMAGES])
    data = _dataset(train, val)
    lrs = (0.001, 0.003, 0.01)
    specs = [ExperimentSpec(name="fused", loss="ce", lr=lrs[i % 3], seed=i // 3, batch_size=batch_size, epochs=1,
                            select="last") for i in range(members)]
    warm = _dataset(data_mod.Split(x=train.x[:WARMUP_BATCHES * batch_size], y=train.y[:WARMUP_BATCHES * batch_size]),
                    val)

    def sequential() -> float:
        fits = [fit(s, data, device, progress=False) for s in specs]
        return sum(f.train_images for f in fits) / sum(f.train_seconds for f in fits)

    def fused(kernel: str) -> float:
        fits = fit(specs, data, device, progress=False, kernel=kernel)
        return sum(f.train_images for f in fits) / fits[0].train_seconds

    fit(specs[0], warm, device, progress=False)
    for kernel in KERNELS:
        fit(specs[:2], warm, device, progress=False, kernel=kernel)
    vmap_rate(specs[:2], warm.train, device)
    rates = {"sequential": [], **{k: [] for k in KERNELS}, "vmap": []}

    def one_round():  # the measured runs, interleaved so that a slow moment of the machine hits each alike
        rates["sequential"].append(sequential())
        for kernel in KERNELS:
            rates[kernel].append(fused(kernel))
        rates["vmap"].append(vmap_rate(specs, train, device))

    rounds = cxr_settings.throughput_rounds or ROUNDS
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    best = {k: max(v) for k, v in rates.items()}
    epoch_graph = None  # on CUDA: the default kernel with a whole epoch per graph replay (CXR_GRAPH_STEPS=epoch)
    default = default_kernel(device, specs[0])  # what cxr-bench run would train this group with
    if device.type == "cuda":
        with monkeypatch.context() as env:
            env.setenv(graphs.STEPS_ENV, "epoch")
            fit(specs[:2], warm, device, progress=False, kernel=default)
            epoch_graph = max(fused(default) for _ in range(ROUNDS))
    model, optimizer = course_model(specs[0], device)
    with course_defaults():
        course_train_epoch(model, _loader(warm.train, batch_size, True), optimizer, device)
        loader = _loader(train, batch_size, True)
        course = best_rate(lambda: course_train_epoch(model, loader, optimizer, device), device)
    element = 2 if resolve_precision(specs[0].precision, device) == "bf16" else 4  # bf16 autocast, or float32
    per_image = STREAMS_PER_TRAINING_IMAGE * activation_bytes(IMAGE_SIZE, element)
    roofline = bandwidth / per_image
    # The same ratio round by round: sequential and the group ran side by side in each round, so a slow
    # moment of a shared machine hits both; the median round's ratio, with a bootstrap interval from 5 rounds.
    paired = [f / q for f, q in zip(rates[default], rates["sequential"], strict=True)]
    low = high = None
    if len(paired) >= 5:
        ci = scipy_stats.bootstrap((paired,), statistics.median, confidence_level=0.95, method="percentile",
                                   random_state=0, vectorized=False).confidence_interval
        low, high = round(float(ci.low), 3), round(float(ci.high), 3)
    row = {
        "members": members, "batch_size": batch_size, "images_per_member": n, "rounds": rounds,
        "device": device.type, "device_name": device_name(device) if device.type == "cuda" else f"CPU {cpu_text()}",
        "sequential_ips": round(best["sequential"], 1), "grouped_ips": round(best["grouped"], 1),
        "loop_ips": round(best["loop"], 1), "course_ips": round(course, 1), "default_kernel": default,
        "fused_vs_sequential": round(best[default] / best["sequential"], 3),
        "grouped_vs_sequential": round(best["grouped"] / best["sequential"], 3),
        "loop_vs_sequential": round(best["loop"] / best["sequential"], 3),
        "vmap_ips": round(best["vmap"], 1), "vmap_vs_sequential": round(best["vmap"] / best["sequential"], 3),
        "fused_vs_course": round(best[default] / course, 3),
        "bytes_per_training_image": per_image, "bandwidth_gbs": round(bandwidth / 1e9, 1),
        "roofline_fraction": round(best[default] / roofline, 4),
        "fused_vs_sequential_median_of_rounds": round(statistics.median(paired), 3),
        "fused_vs_sequential_ci_low": low, "fused_vs_sequential_ci_high": high,
        "epoch_graph_ips": round(epoch_graph, 1) if epoch_graph else None,
        "epoch_graph_vs_sequential": round(epoch_graph / best["sequential"], 3) if epoch_graph else None,
        "epoch_graph_roofline_fraction": round(epoch_graph / roofline, 4) if epoch_graph else None,
    }
    benchmark.extra_info.update(row)
    fused_rows.append(row)
