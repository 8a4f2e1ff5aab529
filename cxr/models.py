"""Models: `build_model(name, num_outputs)` returns an nn.Module taking (N, 1, H, W) floats in [0, 1].

Input normalisation lives inside the model, so `model(x)` is all a caller does (the course's
evaluation loop calls it exactly so). Any H, W from 28 up works (global average pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from cxr import losses
from cxr.errors import CxrError

# Fixed normalisation of [0, 1] inputs to roughly zero mean, unit spread. Constants, not
# statistics of one data set, so a state dict means the same thing on any data.
_MEAN, _STD = 0.5, 0.25


class WeightsError(CxrError):
    """Weights that do not fit any model; the message names the file and the mismatch."""


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - _MEAN) / _STD


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ConvNet(nn.Module):
    """VGG-style: 3 stages of `depth` conv-BN-ReLU blocks (width, 2x, 4x channels), each stage
    ending in 2x2 max-pooling, then global average pooling and a linear head."""

    def __init__(self, num_outputs: int, width: int = 16, depth: int = 1, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [_Normalize()]
        c_in = 1
        for stage in range(3):
            c_out = width * 2**stage
            for _ in range(depth):
                layers += _conv_bn_relu(c_in, c_out)
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
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


def infer_model(state_dict: dict, name: str | None = None, num_outputs: int | None = None,
                source: str = "weights") -> tuple[str, int, int, nn.Module]:
    """(name, num_outputs, width, model loaded with state_dict) for weights of a known model.

    Width and output count are read off the tensors' shapes; `name`/`num_outputs` restrict the
    search (e.g. from --model / --loss). Raises WeightsError naming `source` when nothing fits.
    """
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{source}: not a state dict (a mapping of parameter names to tensors)")
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
        width = state_dict[first].shape[0] // per_width
        outputs = state_dict[head[-1]].shape[0]
        if num_outputs is not None and outputs != num_outputs:
            raise WeightsError(f"{source}: the weights have {outputs} output(s) but --loss asks for "
                               f"{num_outputs} ({losses.for_outputs(num_outputs).name})")
        if outputs not in losses.OUTPUTS or width < 1:
            problems.append(f"{candidate}: {outputs} outputs, width {width}")
            continue
        model = build_model(candidate, outputs, width)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            first_line = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            problems.append(f"{candidate}: {first_line[:200]}")
            continue
        return candidate, outputs, width, model
    raise WeightsError(f"{source}: the weights fit no model ({'; '.join(problems)})")
