"""Which runs a command line selects: the spec files' runs with `--seeds`, `--data` and `--epochs`
applied, and `-k` (cxr.keyword's grammar) with loss names matching the loss exactly."""

from __future__ import annotations

from pathlib import Path

from cxr import keyword
from cxr.spec import LOSSES, ExperimentSpec, SpecError, load, override, with_seeds


def select(paths: list[str | Path], *, seeds: int | None = None, dataset: str | None = None,
           epochs: int | None = None, keyword_expr: str | None = None) -> list[ExperimentSpec]:
    """The runs a command line asks for: the spec files' runs, with `--seeds`, `--data` and `--epochs`
    applied, then those that `-k` selects. `cxr-bench run/specs` and `pytest benchmarks` both call this
    (pytest applies its own -k, so it passes none)."""
    specs = load(paths)
    if seeds is not None:
        specs = with_seeds(specs, seeds)
    specs = [override(s, dataset=dataset, epochs=epochs) for s in specs]
    if keyword_expr:
        specs = [s for s in specs if matches(s, keyword_expr)]
    return specs


def loss_word(word: str) -> str | None:
    """The loss a `-k` word names (`bce`, `ce`, `focal`, any case), or None for any other word."""
    low = word.lower()
    return low if low in LOSSES else None


def matches(spec: ExperimentSpec, expr: str) -> bool:
    """pytest-style `-k` selection over a run id, with `and`, `or`, `not` and parentheses.

    A word that names a loss (`bce`, `ce`, `focal`) matches the loss exactly: plain substring
    matching would make `ce` select `bce` runs too. Any other word is a case-insensitive substring
    of the run id (`lr0.1`, `bs128`, `seed2`, `loss-`...).
    """
    try:
        evaluate = keyword.compile(expr)
    except keyword.KeywordError as e:
        raise SpecError(f"<command line>: {e}") from None
    haystack = spec.run_id.lower()

    def word_matches(word: str) -> bool:
        loss = loss_word(word)
        return spec.loss == loss if loss else word.lower() in haystack

    return evaluate(word_matches)
