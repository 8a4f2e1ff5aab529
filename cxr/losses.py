"""The losses: each one object that knows its name, its number of outputs, its training loss, its
prediction and its score of pneumonia. Spec validation, `-k`, training, evaluation, weight inference
and the report all ask this table; adding a loss is one entry in `LOSSES`.

    bce     1 logit, BCEWithLogits; pneumonia when the logit > 0, score sigmoid(logit)
    ce      2 logits, cross-entropy; argmax, score softmax(logits)[:, 1]
    focal   2 logits, focal loss (Lin et al. 2017), -(1 - p_t)^gamma log p_t with gamma = spec.focal_gamma
            (default 2): easy, confident images weigh less, so the minority class (normal in
            PneumoniaMNIST's train split, 26%) and hard cases count more. Same head as ce.

Label smoothing (spec.label_smoothing = s) moves the targets towards 1/2 for every loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cxr.spec import ExperimentSpec


def _weighted_mean(per_image: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over images, each weighted by its class's weight and normalised by the weights' sum (as
    torch's cross_entropy(weight=...) does), or the plain mean without class weights."""
    if class_weights is None:
        return per_image.mean()
    w = class_weights[y]
    return (w * per_image).sum() / w.sum()


def _bce(logits: torch.Tensor, y: torch.Tensor, spec: ExperimentSpec,
         class_weights: torch.Tensor | None = None) -> torch.Tensor:
    target = y.float()
    if spec.label_smoothing:
        target = target * (1 - spec.label_smoothing) + 0.5 * spec.label_smoothing
    per_image = F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
    return _weighted_mean(per_image, y, class_weights)


def _ce(logits: torch.Tensor, y: torch.Tensor, spec: ExperimentSpec,
        class_weights: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(logits, y, weight=class_weights, label_smoothing=spec.label_smoothing)


def _focal(logits: torch.Tensor, y: torch.Tensor, spec: ExperimentSpec,
           class_weights: torch.Tensor | None = None) -> torch.Tensor:
    return focal_loss(logits, y, spec.focal_gamma, spec.label_smoothing, class_weights)


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float = 2.0, label_smoothing: float = 0.0,
               class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images of sum_c -q_c (1 - p_c)^gamma log p_c, q the (smoothed) one-hot target; with
    class weights, each image weighs its class's weight (normalised by their sum).

    With no smoothing this is Lin et al.'s -(1 - p_t)^gamma log p_t; gamma 0 is cross-entropy.
    """
    log_p = F.log_softmax(logits, 1)
    q = F.one_hot(y, logits.shape[1]).to(log_p.dtype)
    if label_smoothing:
        q = q * (1 - label_smoothing) + label_smoothing / logits.shape[1]
    weight = (1 - log_p.exp()).clamp(min=0) ** gamma
    return _weighted_mean(-(q * weight * log_p).sum(1), y, class_weights)


def balanced_class_weights(y: torch.Tensor) -> torch.Tensor:
    """n / (2 n_c) per class c from the labels' counts (scikit-learn's "balanced"): each class then
    weighs half of the loss. PneumoniaMNIST's train split (1214 normal, 3494 pneumonia): 1.94, 0.67."""
    counts = torch.bincount(y, minlength=2).double()
    return (len(y) / (2 * counts)).float()


@dataclass(frozen=True)
class Loss:
    name: str  # as in spec files and run ids: `loss = "ce"`, `lr-ce-lr0.01-bs32`
    label: str  # as a reader names it in the report
    outputs: int  # logits of the model's head
    description: str  # one line, for errors and help
    train_loss: Callable[..., torch.Tensor]  # (logits, y, spec, class_weights=None): what training minimises

    def nll(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the labels under the head: the loss reported for val and
        test, the same for every loss with the same head."""
        if self.outputs == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
        return F.cross_entropy(logits, y)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted labels (0 normal, 1 pneumonia), taken on the logits themselves."""
        return (logits[:, 0] > 0).long() if self.outputs == 1 else logits.argmax(1)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """P(pneumonia) per image."""
        return torch.sigmoid(logits[:, 0]) if self.outputs == 1 else torch.softmax(logits, 1)[:, 1]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, 2) class probabilities (normal, pneumonia): what test-time augmentation averages."""
        p = self.score(logits)
        return torch.stack([1 - p, p], 1) if self.outputs == 1 else torch.softmax(logits, 1)


LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    Loss("bce", "BCE", 1, "1 logit + BCEWithLogitsLoss", _bce),
    Loss("ce", "CE", 2, "2 logits + CrossEntropyLoss", _ce),
    Loss("focal", "focal", 2, "2 logits + focal loss (Lin et al. 2017), gamma = focal_gamma", _focal),
)}
NAMES = tuple(LOSSES)
OUTPUTS = tuple(sorted({loss.outputs for loss in LOSSES.values()}))  # head sizes a model may have


def get(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; allowed: {', '.join(NAMES)}") from None


def for_outputs(outputs: int) -> Loss:
    """The loss whose predictions a head of `outputs` logits is read with (bce for 1, ce for 2:
    focal shares ce's head, and at inference they are the same)."""
    return next(loss for loss in LOSSES.values() if loss.outputs == outputs)
