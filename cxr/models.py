"""Models: `build_model(name, num_outputs)` returns an nn.Module taking (N, 1, H, W) floats in [0, 1].

Input normalisation lives inside the model, so `model(x)` is all a caller does (the course's
evaluation loop calls it exactly so). Any H, W from 28 up works (global average pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from cxr import losses
from cxr.errors import CxrError, one_line

# Fixed normalisation of [0, 1] inputs to roughly zero mean, unit spread. Constants, not
# statistics of one data set, so a state dict means the same thing on any data.
_MEAN, _STD = 0.5, 0.25


class WeightsError(CxrError):
    """Weights that do not fit any model; the message names the file and the mismatch.

    The message is kept to one line: line breaks (a key or path may hold one) become spaces."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - _MEAN) / _STD


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ConvNet(nn.Module):
    """VGG-style: 3 stages of `depth` conv-BN-ReLU blocks (width, 2x, 4x channels), each stage
    ending in 2x2 max-pooling, then global average pooling and a linear head. The last block of a stage
    pools before its ReLU: max and ReLU commute, so it computes the same numbers, forward and backward, as
    conv-BN-ReLU-pool (tested), with a quarter of the pixels to rectify (the default suite: -10% training)."""

    def __init__(self, num_outputs: int, width: int = 16, depth: int = 1, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [_Normalize()]
        c_in = 1
        for stage in range(3):
            c_out = width * 2**stage
            for _ in range(depth):
                layers += _conv_bn_relu(c_in, c_out)
                c_in = c_out
            layers.insert(-1, nn.MaxPool2d(2))  # pool, then ReLU: the same numbers on a quarter of the pixels
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_in, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with a small-image stem (3x3 stride-1 conv, no max-pool), as MedMNIST uses at
    28 px. Stage widths are 4x, 8x, 16x, 32x `width` (width 16 gives the standard 64..512)."""

    def __init__(self, num_outputs: int, width: int = 16):
        super().__init__()
        c = 4 * width
        self.stem = nn.Sequential(_Normalize(), *_conv_bn_relu(1, c))
        blocks, c_in = [], c
        for stage, stride in enumerate((1, 2, 2, 2)):
            c_out = c * 2**stage
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


# name -> (constructor, key of the first conv weight, channels of that conv per unit of width)
MODELS = {
    "cnn": (lambda k, w: ConvNet(k, w, depth=1), "features.1.weight", 1),
    "vgg": (lambda k, w: ConvNet(k, w, depth=2), "features.1.weight", 1),
    "resnet18": (lambda k, w: ResNet18(k, w), "stem.1.weight", 4),
}


MAX_PARAMETERS = 100_000_000  # 400 MB of fp32 weights, ~1.6 GB with gradients and Adam's moments; resnet18
#                              at width 16 has 11.2M. Raise it here for a bigger model on a bigger machine.


def parameter_count(name: str, num_outputs: int, width: int) -> int:
    """Parameters of build_model(name, num_outputs, width), counted on the meta device: no memory spent."""
    with torch.device("meta"):
        model = MODELS[name][0](num_outputs, width)
    return sum(p.numel() for p in model.parameters())


def check_size(name: str, num_outputs: int, width: int, where: str) -> None:
    """Raise WeightsError (a CxrError naming `where`) when the model would have more than MAX_PARAMETERS."""
    try:
        n = parameter_count(name, num_outputs, width)
    except (RuntimeError, OverflowError, ValueError):  # sizes past int64 ("Storage size calculation overflowed")
        n = None
    if n is None or n > MAX_PARAMETERS:
        count = "more than 2**63" if n is None else f"{n:,}"
        raise WeightsError(f"{where}: {name} at width {width} has {count} parameters, more than the limit of "
                           f"{MAX_PARAMETERS:,} (cxr.models.MAX_PARAMETERS)")


def build_model(name: str = "cnn", num_outputs: int = 2, width: int = 16) -> nn.Module:
    """A fresh model; num_outputs is the loss's head size (cxr.losses: 1 for BCE, 2 for CE and focal)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    if num_outputs not in losses.OUTPUTS:
        raise ValueError(f"num_outputs must be one of {losses.OUTPUTS} (a loss's head), got {num_outputs}")
    return MODELS[name][0](num_outputs, width)


def count_flops(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates x 2 of one forward pass of one image (convolutions and linear layers)."""
    flops = 0

    def hook(module, inputs, output):
        nonlocal flops
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops += 2 * k * output.numel()
        elif isinstance(module, nn.Linear):
            flops += 2 * module.in_features * output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, 1, image_size, image_size, device=p.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return flops


def _key(key: str) -> str:
    """A state-dict key for a message: quoted, escaped, and cut to 80 characters."""
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_entries(state_dict, source: str) -> None:
    """A mapping of str keys to plain dense CPU tensors of a real dtype; only metadata is read."""
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{source}: not a state dict (a mapping of parameter names to tensors) "
                           f"but a {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise WeightsError(f"{source}: not a state dict: the key {key!r:.80} is a {type(key).__name__}, "
                               "not a parameter name")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{source}: not a state dict: {_key(key)} holds a {type(value).__name__}, not a tensor")
        if (value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized or value.is_nested
                or value.is_complex()):
            raise WeightsError(f"{source}: {_key(key)} is not a plain tensor of real numbers (layout {value.layout}, "
                               f"device {value.device.type}, dtype {value.dtype})")


def _shape(state_dict: dict, key: str, rank: int, what: str, source: str) -> tuple[int, ...]:
    shape = tuple(state_dict[key].shape)
    if len(shape) != rank:
        raise WeightsError(f"{source}: expected a {rank}-D {what} weight at {_key(key)}, found shape {list(shape)}")
    return shape


def _keys(keys: list[str]) -> str:
    return ", ".join(map(_key, keys[:3])) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _mismatch(expected: dict, given: dict) -> str:
    """How `given` differs from the keys and shapes of `expected` (a model's state dict); "" when it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    parts = [f"{what} {_keys(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if not parts:
        wrong = [k for k in expected if tuple(given[k].shape) != tuple(expected[k].shape)]
        if wrong:
            k = wrong[0]
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            parts.append(f"{_key(k)} has shape {list(given[k].shape)}, expected {list(expected[k].shape)}{more}")
    return "; ".join(parts)


def check_finite(model: nn.Module, source: str) -> None:
    """Raise WeightsError naming the first tensor of `model` that holds NaN or infinite values."""
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise WeightsError(f"{source}: {bad} non-finite value{'s' if bad > 1 else ''} in {key}")


def infer_model(state_dict: dict, name: str | None = None, num_outputs: int | None = None,
                source: str = "weights") -> tuple[str, int, int, nn.Module]:
    """(name, num_outputs, width, model loaded with state_dict) for weights of a known model.

    Width and output count are read off the tensors' shapes; `name`/`num_outputs` restrict the
    search (e.g. from --model / --loss). Raises WeightsError naming `source` when nothing fits.
    Everything is checked before memory is spent: the dict's form (str keys, plain tensors), the
    ranks of the first conv and head weights, and the size of the model they imply (check_size,
    on the meta device), so a small hostile file cannot make build_model allocate gigabytes.
    Loaded weights must be finite.
    """
    _check_entries(state_dict, source)
    names = [name] if name else list(MODELS)
    problems = []
    for candidate in names:
        if candidate not in MODELS:
            raise WeightsError(f"{source}: unknown model {candidate!r}; available: {', '.join(MODELS)}")
        _, first, per_width = MODELS[candidate]
        head = [k for k in state_dict if k.startswith("head.") and k.endswith(".weight")]
        if first not in state_dict or not head:
            problems.append(f"{candidate}: missing {first if first not in state_dict else 'head weights'}")
            continue
        width = _shape(state_dict, first, 4, "conv", source)[0] // per_width
        outputs = _shape(state_dict, head[-1], 2, "linear head", source)[0]
        if num_outputs is not None and outputs != num_outputs:
            raise WeightsError(f"{source}: the weights have {outputs} output(s) but --loss asks for "
                               f"{num_outputs} ({losses.for_outputs(num_outputs).name})")
        if outputs not in losses.OUTPUTS or width < 1:
            problems.append(f"{candidate}: {outputs} outputs, width {width}")
            continue
        check_size(candidate, outputs, width, source)
        with torch.device("meta"):  # the keys and shapes the model needs, still without memory
            mismatch = _mismatch(MODELS[candidate][0](outputs, width).state_dict(), state_dict)
        if mismatch:
            problems.append(f"{candidate} at width {width}: {mismatch}")
            continue
        model = build_model(candidate, outputs, width)
        try:
            model.load_state_dict(state_dict, strict=True)
        except (RuntimeError, ValueError, TypeError) as e:  # e.g. a dtype that cannot be copied
            problems.append(f"{candidate}: {one_line(e, 200)}")
            continue
        check_finite(model, source)
        return candidate, outputs, width, model
    raise WeightsError(f"{source}: the weights fit no model ({'; '.join(problems)})")
