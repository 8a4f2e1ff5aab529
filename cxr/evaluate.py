"""Evaluation: predictions, metrics and loss of a model on one split, and `cxr-bench evaluate`.

How a head's logits become predictions, scores of pneumonia and a loss is the loss's business
(cxr.losses): one logit is read as BCE's (pneumonia when logit > 0, sigmoid), two as CE's (argmax,
softmax; a focal-loss model has the same head).

`cxr-bench evaluate` reads with a decision (cxr.decision: the argmax or equal-prior rule, optionally
test-time augmentation; `decision_from_options` checks its options) and may average several models
(a seed ensemble): their class probabilities, each under the same TTA draws, are averaged and the
mean is decided with the rule. One --weights and no options is the course's loop, exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr import data as data_mod
from cxr import losses
from cxr.arrays import _image_size
from cxr.decision import PLAIN, Decision, tta_probabilities
from cxr.env import resolve_device
from cxr.errors import CxrError, one_line
from cxr.metrics import binary_metrics
from cxr.models import WeightsError, infer_model
from cxr.spec import DECISIONS

EVAL_BATCH = 1024

# A weights file larger than this is refused before a byte is read. The largest model infer_model
# accepts (cxr.models.MAX_PARAMETERS, 100M parameters) is 400 MB in float32 and 800 MB in float64,
# so 2 GiB leaves room for any legitimate state dict while bounding what torch.load is asked to read.
MAX_WEIGHTS_BYTES = 2 * 1024**3

# --image-size bounds. 8 px is the least the networks can pool down (3 halvings for cnn/vgg and
# resnet18); 1024 px keeps one evaluation batch (EVAL_BATCH images) of activations within memory.

# The default range of --tta's draws: the real-data recipe's augmentation (specs/recipes/pneumoniamnist.toml,
# a test checks they agree), so that TTA averages over the transforms the recipe's models were trained with.
AUGMENT_SHIFT, AUGMENT_ROTATE, AUGMENT_SCALE = 0.08, 8.0, 0.08
MAX_TTA = 64  # as a spec's `tta` (cxr.spec._RANGES)
# option, default, largest value (the spec's ranges of augment_shift, augment_rotate, augment_scale)
AUGMENT_OPTIONS = (("--augment-shift", AUGMENT_SHIFT, 0.5), ("--augment-rotate", AUGMENT_ROTATE, 180.0),
                   ("--augment-scale", AUGMENT_SCALE, 0.5))


class EvaluateError(CxrError):
    """An option of `cxr-bench evaluate` that cannot be used; one line naming the option."""


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
                   decision: Decision = PLAIN, logits: torch.Tensor | None = None) -> dict:
    """Metrics (accuracy, balanced accuracy, sensitivity, specificity, AUROC, ECE, confusion, loss) and
    predictions under `decision` (rule and TTA, cxr.decision); with a decision other than the plain
    argmax, also "plain": the metrics of the same weights under the plain argmax rule, without TTA.
    The loss is that of the plain outputs (the head's negative log-likelihood). `logits`: the model's
    plain logits on x when already computed (cxr.unit evaluates a fused group in one batched forward)."""
    logits = predict_logits(model, x, device) if logits is None else logits
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


def _shown(value) -> str:
    """A user's option value for a one-line message: as typed when short and printable, else quoted."""
    text = str(value)
    return text if len(text) <= 40 and text.isprintable() else repr(text[:40])


def _number(option: str, value, low: float, high: float, low_in: bool = True, high_in: bool = True) -> float:
    allowed = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
    try:
        x = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        x = float("nan")
    if not ((low < x or (low_in and x == low)) and (x < high or (high_in and x == high))):  # NaN fails too
        raise EvaluateError(f"{option} {_shown(value)}: expected a number in {allowed}")
    return x


def decision_from_options(rule: str | None = None, prior=None, tta=None, shift=None, rotate=None,
                          scale=None) -> Decision:
    """The Decision that `cxr-bench evaluate`'s options ask for; values may be the options' strings.

    None means "not given": the argmax rule, no TTA, and the recipe's augmentation range for --tta's
    draws. An option that would be ignored (--prior without equal-prior, a range without --tta) is
    refused, like a value out of range; each refusal is one EvaluateError line naming the option.
    """
    rule = "argmax" if rule is None else rule
    if rule not in DECISIONS:
        raise EvaluateError(f"--decision {_shown(rule)}: allowed values are {', '.join(DECISIONS)}")
    if rule == "equal-prior":
        if prior is None:
            raise EvaluateError("--decision equal-prior needs --prior P: the train split's prevalence of pneumonia, "
                                "a number in (0, 1)")
        prior = _number("--prior", prior, 0, 1, low_in=False, high_in=False)
    elif prior is not None:
        raise EvaluateError(f"--prior {_shown(prior)}: applies only to --decision equal-prior (the rule is {rule})")
    n = 0
    if tta is not None:
        try:
            n = int(str(tta).strip()) if not isinstance(tta, bool) else -1
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_TTA:
            raise EvaluateError(f"--tta {_shown(tta)}: expected an integer in 0..{MAX_TTA} (0 = off)")
    given = (shift, rotate, scale)
    if not n:
        unused = [option for (option, _, _), value in zip(AUGMENT_OPTIONS, given, strict=True) if value is not None]
        if unused:
            raise EvaluateError(f"{unused[0]}: applies only with --tta N, N > 0 (the range of the TTA draws)")
        return Decision(rule, prior)
    ranges = tuple(default if value is None else _number(option, value, 0, high)
                   for (option, default, high), value in zip(AUGMENT_OPTIONS, given, strict=True))
    if not any(ranges):
        raise EvaluateError(f"--tta {n}: --augment-shift, --augment-rotate and --augment-scale are all 0, so every "
                            "draw would be the identity")
    return Decision(rule, prior, n, ranges)


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


@torch.no_grad()
def class_probabilities(model: nn.Module, x: torch.Tensor, device: torch.device,
                        decision: Decision = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, decided): (N, 2) class probabilities of one model on x, of its plain outputs and under
    the decision's TTA (the same tensor without TTA). FloatingPointError when any is not finite."""
    logits = predict_logits(model, x, device)
    head = losses.for_outputs(logits.shape[1])
    plain = head.probabilities(logits)
    decided = tta_probabilities(model, x, device, decision, predict_logits, head.probabilities) \
        if decision.tta else plain
    if not (torch.isfinite(plain).all() and torch.isfinite(decided).all()):
        raise FloatingPointError("the model produced non-finite outputs")
    return plain, decided


def ensemble_split(plain: torch.Tensor, decided: torch.Tensor, y: torch.Tensor, decision: Decision = PLAIN) -> dict:
    """Like evaluate_split, for an ensemble: `plain` and `decided` are the models' mean (N, 2) class
    probabilities (class_probabilities). Pneumonia when the mean P(pneumonia) > the rule's threshold
    (argmax: 0.5); "plain" is the plain mean under argmax, given when the decision is not plain. The
    loss is the negative log-likelihood of the plain mean."""
    y_cpu = y.cpu()
    y_np = y_cpu.numpy()
    score, plain_score = decided[:, 1].numpy(), plain[:, 1].numpy()
    y_pred = (score > decision.threshold).astype(np.int64)
    p_true = plain.double().gather(1, y_cpu.view(-1, 1)).clamp_min(1e-12)
    loss = float(-p_true.log().mean())
    out = {"metrics": {**binary_metrics(y_np, score, y_pred), "loss": loss},
           "predictions": {"y_true": y_cpu.tolist(), "y_score": [round(float(s), 6) for s in score],
                           "y_pred": y_pred.tolist()}}
    if not decision.plain:
        out["plain"] = {**binary_metrics(y_np, plain_score, (plain_score > 0.5).astype(np.int64)), "loss": loss}
    return out


@contextmanager
def _running(weights: Path, x: torch.Tensor, normal, pneumonia) -> Iterator[None]:
    """Failures of a model on the images, as one WeightsError line naming its weights file."""
    try:
        yield
    except RuntimeError as e:  # e.g. an image too small for the network
        raise WeightsError(f"{weights}: the model cannot run on images of shape {tuple(x.shape[1:])} "
                           f"({one_line(e, 160)})") from None
    except FloatingPointError:  # finite weights can still overflow, e.g. huge values or a negative running_var
        raise WeightsError(f"{weights}: the model produced non-finite outputs on {normal} and {pneumonia} "
                           "(NaN or infinite scores; the weights are finite but unusable)") from None


def _weights_paths(weights: str | Path | Sequence[str | Path]) -> list[Path]:
    paths = [Path(weights)] if isinstance(weights, (str, Path)) else [Path(w) for w in weights]
    if not paths:
        raise EvaluateError("--weights: no weights file given")
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            also = "" if str(seen[key]) == str(path) else f" (also as {seen[key]})"
            raise EvaluateError(f"{path}: given twice to --weights{also}; an ensemble averages different models")
        seen[key] = path
    return paths


def evaluate_weights(weights: str | Path | Sequence[str | Path], normal: str | Path, pneumonia: str | Path, *,
                     model: str | None = None, loss: str | None = None, device: str = "auto",
                     image_size: int | None = None, decision: Decision = PLAIN) -> dict:
    """The course's evaluation task: accuracy etc. of saved weights on test_normal / test_pneumonia.

    `weights` is one file, or several: a seed ensemble, whose models must have the same head (1 or 2
    outputs); their mean class probabilities are decided with `decision`'s rule. One file and the
    PLAIN decision is exactly the course's loop. The models are loaded one at a time.

    Returns {"accuracy", "balanced_accuracy", "n", "sensitivity", "specificity", "auroc", "confusion",
    "model", "loss", "num_outputs", "width", "device", "decision", "plain_accuracy", "models", "members",
    "predictions", ...}; "plain_accuracy" is that of the plain argmax (of the mean, for an ensemble),
    the accuracy itself when the decision is plain.
    """
    check_image_size(image_size)
    paths = _weights_paths(weights)
    num_outputs = None if loss is None else losses.get(loss).outputs
    members: list[dict] = []
    x = y = dev = result = None
    plain_sum = decided_sum = None
    for path in paths:
        name, outputs, width, net = infer_model(load_state_dict(path), model, num_outputs, source=str(path))
        if members and outputs != members[0]["num_outputs"]:
            first = members[0]
            raise WeightsError(f"{path}: {outputs} output{'s' * (outputs > 1)} ({losses.for_outputs(outputs).name}) "
                               f"but {first['weights']} has {first['num_outputs']} "
                               f"({losses.for_outputs(first['num_outputs']).name}); an ensemble needs one head size")
        members.append({"weights": str(path), "model": name, "width": width, "num_outputs": outputs})
        if x is None:
            x, y = data_mod.load_pair(normal, pneumonia, image_size)
            dev = resolve_device(device)
        net.to(dev)
        with _running(path, x, normal, pneumonia):
            if len(paths) == 1:
                result = evaluate_split(net, x, y, dev, decision)
            else:
                plain, decided = class_probabilities(net, x, dev, decision)
                plain_sum = plain if plain_sum is None else plain_sum + plain
                decided_sum = decided if decided_sum is None else decided_sum + decided
        del net
    if result is None:
        result = ensemble_split(plain_sum / len(paths), decided_sum / len(paths), y, decision)
    m = result["metrics"]
    outputs = members[0]["num_outputs"]
    names, widths = sorted({e["model"] for e in members}), {e["width"] for e in members}
    return {
        "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "n": m["n"],
        "correct": m["confusion"][0][0] + m["confusion"][1][1],
        "sensitivity": m["sensitivity"], "specificity": m["specificity"], "auroc": m["auroc"],
        "ece": m["ece"], "loss_value": m["loss"], "confusion": m["confusion"],
        "model": "+".join(names), "loss": loss or losses.for_outputs(outputs).name, "num_outputs": outputs,
        "width": widths.pop() if len(widths) == 1 else None,
        "device": str(dev), "image_shape": list(x.shape[1:]),
        "decision": {**decision.to_dict(), "text": decision.describe()},
        "plain_accuracy": result.get("plain", m)["accuracy"],
        "models": len(paths), "members": members, "predictions": result["predictions"],
    }
