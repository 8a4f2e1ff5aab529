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


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N, as Slurm array and Kubernetes JOB_COMPLETION_INDEX count) -> (I, N)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise SpecError(f"<command line>: --shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return i, n


def shard(specs: list[ExperimentSpec], index: int, count: int) -> list[ExperimentSpec]:
    """The index-th of count deterministic slices of the runs, for job arrays writing to one store.

    Runs of the identical recipe (the same spec hash under several ids, e.g. Task A's CE run and Task
    B's lr 0.001 run) fall in the same slice, so that one job trains it and the others' ids reuse it
    instead of two jobs training it twice; recipes are dealt round-robin in their order. Every run is
    in exactly one slice, and the slices of one selection are the same on every machine.
    """
    order: dict[str, int] = {}
    for s in specs:
        order.setdefault(s.spec_hash(), len(order))
    return [s for s in specs if order[s.spec_hash()] % count == index]
