"""How a model's outputs become a decision on a split: the rule (argmax, or the equal-prior threshold)
and test-time augmentation (TTA). Fixed rules, nothing fitted on validation or test data.

    argmax        the course's rule: the larger logit (BCE: logit > 0). With TTA: P(pneumonia) > 0.5.
    equal-prior   pneumonia when P(pneumonia) > the train split's prevalence pi: the Bayes decision for
                  equal class priors (Saerens, Latinne & Decaestecker 2002: correct the posterior from
                  the training prior pi to 50/50; p / pi > (1 - p) / (1 - pi)  <=>  p > pi).
    tta = N       the mean class probabilities over the identity and N fixed-seed draws of the spec's
                  own affine augmentation (cxr.recipe.augment), the same draws for every model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cxr.recipe import augment
from cxr.spec import DECISIONS, ExperimentSpec

TTA_SEED = 1234  # the draws are fixed: every model and every epoch sees the same augmented copies


@dataclass(frozen=True)
class Decision:
    rule: str = "argmax"  # "argmax" | "equal-prior"
    prior: float | None = None  # equal-prior: P(pneumonia) in the train split, the threshold
    tta: int = 0  # augmented draws besides the identity; 0 = off
    augment: tuple[float, float, float] = (0.0, 0.0, 0.0)  # shift, rotate (degrees), scale of the draws

    def __post_init__(self):
        if self.rule not in DECISIONS:
            raise ValueError(f"unknown decision rule {self.rule!r}; allowed: {', '.join(DECISIONS)}")
        if self.rule == "equal-prior" and not (self.prior is not None and 0 < self.prior < 1):
            raise ValueError(f"equal-prior needs a prior in (0, 1), got {self.prior!r}")

    @property
    def plain(self) -> bool:
        """The course's rule on the plain outputs: what `cxr-bench evaluate` does without options."""
        return self.rule == "argmax" and not self.tta

    @property
    def threshold(self) -> float:
        """P(pneumonia) above which the decision is pneumonia."""
        return self.prior if self.rule == "equal-prior" else 0.5

    def to_dict(self) -> dict:
        return {"rule": self.rule, "threshold": self.threshold, "prior": self.prior, "tta": self.tta,
                "augment": list(self.augment) if self.tta else None}

    def describe(self) -> str:
        rule = "argmax" if self.rule == "argmax" else f"equal-prior (P(pneumonia) > {self.prior:.3f})"
        return rule + (f", TTA {self.tta} draws + identity" if self.tta else "")

    @classmethod
    def of(cls, spec: ExperimentSpec, y_train: torch.Tensor) -> Decision:
        """A spec's decision; the prior is the train split's prevalence of pneumonia."""
        prior = float(y_train.float().mean()) if spec.decision == "equal-prior" else None
        return cls(spec.decision, prior, spec.tta, (spec.augment_shift, spec.augment_rotate, spec.augment_scale))


PLAIN = Decision()


@torch.no_grad()
def tta_probabilities(model: nn.Module, x: torch.Tensor, device: torch.device, decision: Decision,
                      predict, to_probabilities) -> torch.Tensor:
    """(N, 2) mean class probabilities over the identity and `decision.tta` fixed augmented draws.

    `predict(model, x, device)` gives logits on the CPU; `to_probabilities(logits)` the (N, 2)
    probabilities of the head. Draw k augments every image with a generator seeded TTA_SEED + k.
    """
    shift, rotate, scale = decision.augment
    ranges = ExperimentSpec(augment_shift=shift, augment_rotate=rotate, augment_scale=scale)
    total = to_probabilities(predict(model, x, device))
    for k in range(decision.tta):
        g = torch.Generator(device=x.device).manual_seed(TTA_SEED + k)
        total = total + to_probabilities(predict(model, augment(x, ranges, g), device))
    return total / (decision.tta + 1)
