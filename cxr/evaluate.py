"""Evaluation: predictions, metrics and loss of a model on one split, and `cxr-bench evaluate`.

How a head's logits become predictions, scores of pneumonia and a loss is the loss's business
(cxr.losses): one logit is read as BCE's (pneumonia when logit > 0, sigmoid), two as CE's (argmax,
softmax; a focal-loss model has the same head).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr import data as data_mod
from cxr import losses
from cxr.arrays import _image_size
from cxr.decision import PLAIN, Decision, tta_probabilities
from cxr.env import resolve_device
from cxr.errors import one_line
from cxr.metrics import binary_metrics
from cxr.models import WeightsError, infer_model

EVAL_BATCH = 1024

# A weights file larger than this is refused before a byte is read. The largest model infer_model
# accepts (cxr.models.MAX_PARAMETERS, 100M parameters) is 400 MB in float32 and 800 MB in float64,
# so 2 GiB leaves room for any legitimate state dict while bounding what torch.load is asked to read.
MAX_WEIGHTS_BYTES = 2 * 1024**3

# --image-size bounds. 8 px is the least the networks can pool down (3 halvings for cnn/vgg and
# resnet18); 1024 px keeps one evaluation batch (EVAL_BATCH images) of activations within memory.


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device,
                   batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits (N, k) as float32 on CPU. Model is put in eval mode; x may live on any device."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out.append(model(xb).float())
        else:
            out.append(model(xb).float())
    return torch.cat(out).cpu() if out else torch.empty(0, 1)


def evaluate_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                   decision: Decision = PLAIN) -> dict:
    """Metrics (accuracy, balanced accuracy, sensitivity, specificity, AUROC, ECE, confusion, loss) and
    predictions under `decision` (rule and TTA, cxr.decision); with a decision other than the plain
    argmax, also "plain": the metrics of the same weights under the plain argmax rule, without TTA.
    The loss is that of the plain outputs (the head's negative log-likelihood)."""
    logits = predict_logits(model, x, device)
    y_cpu, y_np = y.cpu(), y.cpu().numpy()
    head = losses.for_outputs(logits.shape[1])
    plain_score, plain_pred = head.score(logits).numpy(), head.predict(logits).numpy()
    if decision.plain:
        y_score, y_pred = plain_score, plain_pred
    else:
        if decision.tta:
            y_score = tta_probabilities(model, x, device, decision, predict_logits, head.probabilities)[:, 1].numpy()
        else:
            y_score = plain_score
        y_pred = (y_score > decision.threshold).astype(np.int64)
    if not (np.isfinite(y_score).all() and np.isfinite(plain_score).all()):
        raise FloatingPointError("the model produced non-finite outputs")
    loss = float(head.nll(logits, y_cpu))
    metrics = {**binary_metrics(y_np, y_score, y_pred), "loss": loss}
    predictions = {"y_true": y_cpu.tolist(), "y_score": [round(float(s), 6) for s in y_score],
                   "y_pred": y_pred.tolist()}
    out = {"metrics": metrics, "predictions": predictions}
    if not decision.plain:
        out["plain"] = {**binary_metrics(y_np, plain_score, plain_pred), "loss": loss}
    return out


def load_state_dict(path: str | Path) -> dict:
    """What a .pth file holds, loaded safely (weights_only=True); one-line WeightsError on any failure.

    A corrupt or hostile file can make torch.load fail in many ways (UnpicklingError, BadZipFile,
    RuntimeError, EOFError, but also KeyError, IndexError, struct.error, TypeError, ...); all of them
    mean "not loadable weights", so every Exception is mapped. The result is checked by infer_model.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise WeightsError(f"{path}: {size:,} bytes, more than the limit of {MAX_WEIGHTS_BYTES:,} "
                           "(MAX_WEIGHTS_BYTES in cxr/evaluate.py)")
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. "Detected pickle protocol 75": not a 2nd line
            warnings.simplefilter("always")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise WeightsError(f"{path}: cannot load weights (the file claims more memory than is available)") from None
    except Exception as e:  # any failure here means a bad file (see the docstring)
        raise WeightsError(f"{path}: cannot load weights ({one_line(e, 200)})") from None
    for w in caught:  # the file loaded: its warnings may matter, so pass them on
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return state


def check_image_size(image_size: int | None) -> None:
    """Refuse an --image-size outside cxr.arrays' [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE], naming the option."""
    if image_size is not None:
        _image_size(image_size, "--image-size")


def evaluate_weights(weights: str | Path, normal: str | Path, pneumonia: str | Path, *,
                     model: str | None = None, loss: str | None = None, device: str = "auto",
                     image_size: int | None = None) -> dict:
    """The course's evaluation task: accuracy etc. of saved weights on test_normal / test_pneumonia.

    Returns {"accuracy", "n", "sensitivity", "specificity", "auroc", "confusion", "model", "loss",
    "num_outputs", "width", "device", "input_dtype", ...}.
    """
    check_image_size(image_size)
    state = load_state_dict(weights)
    num_outputs = None if loss is None else losses.get(loss).outputs
    name, outputs, width, net = infer_model(state, model, num_outputs, source=str(weights))
    x, y = data_mod.load_pair(normal, pneumonia, image_size)
    dev = resolve_device(device)
    net.to(dev)
    try:
        result = evaluate_split(net, x, y, dev)
    except RuntimeError as e:  # e.g. an image too small for the network
        raise WeightsError(f"{weights}: the model cannot run on images of shape {tuple(x.shape[1:])} "
                           f"({one_line(e, 160)})") from None
    except FloatingPointError:  # finite weights can still overflow, e.g. huge values or a negative running_var
        raise WeightsError(f"{weights}: the model produced non-finite outputs on {normal} and {pneumonia} "
                           "(NaN or infinite scores; the weights are finite but unusable)") from None
    m = result["metrics"]
    return {
        "accuracy": m["accuracy"], "n": m["n"], "correct": m["confusion"][0][0] + m["confusion"][1][1],
        "sensitivity": m["sensitivity"], "specificity": m["specificity"], "auroc": m["auroc"],
        "ece": m["ece"], "loss_value": m["loss"], "confusion": m["confusion"],
        "model": name, "loss": loss or losses.for_outputs(outputs).name, "num_outputs": outputs, "width": width,
        "device": str(dev), "image_shape": list(x.shape[1:]),
    }
