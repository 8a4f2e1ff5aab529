"""Formatting: how a number, interval, p-value, duration or swept value reads in the report.

Registered as Jinja2 filters (FILTERS); the analysis sentences use the same functions, and `pct`
is the CLI's and the benchmark runner's too (cxr.metrics): a percentage reads the same everywhere.
Each takes None (or a summary whose mean is None) and gives "n/a".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

from cxr import losses
from cxr.metrics import pct  # the one percent format, shared with the CLI and the benchmark runner

KEY_NAMES = {"lr": "learning rate", "batch_size": "batch size", "loss": "loss function"}


def num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def pct_ms(s, digits: int = 2) -> str:
    """mean ± std of a mean_std_ci summary of fractions, in percent without the sign."""
    return _ms(s, lambda v: f"{100 * v:.{digits}f}")


def pct_ci(s, digits: int = 2) -> str:
    return _ci(s, lambda v: f"{100 * v:.{digits}f}")


def num_ms(s, digits: int = 3) -> str:
    return _ms(s, lambda v: f"{v:.{digits}f}")


def num_ci(s, digits: int = 3) -> str:
    return _ci(s, lambda v: f"{v:.{digits}f}")


def _ms(s, f: Callable[[float], str]) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{f(s['mean'])} ± {'n/a' if s['std'] is None else f(s['std'])}"


def _ci(s, f: Callable[[float], str]) -> str:
    return "n/a" if s["ci_low"] is None else f"[{f(s['ci_low'])}, {f(s['ci_high'])}]"


def pval(p) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_text(p: float) -> str:
    """"p = 0.034" or "p < 0.001"."""
    return f"p {pval(p)}" if p < 0.001 else f"p = {pval(p)}"


def pts(x, digits: int = 2) -> str:
    """A difference of fractions in percentage points, signed: 0.004 -> "+0.40"."""
    return "n/a" if x is None else signed(100 * x, digits)


def signed(x, digits: int = 3) -> str:
    """A signed difference with a true minus sign: -0.064 -> "−0.064"."""
    return "n/a" if x is None else f"{x:+.{digits}f}".replace("-", "−")


def pt(x: float) -> str:
    """Unsigned-when-positive percentage points for ranges: 0.004 -> "0.40", -0.002 -> "−0.20"."""
    s = pts(x)
    return s[1:] if s.startswith("+") else s


def secs(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def rate(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def duration(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):  # a sum of huge times overflows to inf
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def capfirst(s: str) -> str:
    return s[:1].upper() + s[1:]


def cell(v) -> str:
    """Any scalar for a table cell (benchmark extra_info)."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt_seeds(seeds: Iterable[int]) -> str:
    """"seed 2", "seeds 0, 2"."""
    seeds = list(seeds)
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"


def key_name(key: str) -> str:
    """A spec key as a reader names it: "lr" -> "learning rate"; other keys as they are."""
    return KEY_NAMES.get(key, key)


def value_text(key: str, v) -> str:
    """A swept value as a reader names it: loss "bce" -> "BCE" (cxr.losses' label), lr 0.001 -> "0.001"."""
    if key == "loss":
        loss = losses.LOSSES.get(v)
        return loss.label if loss is not None else str(v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def short_source(source: str) -> str:
    """A data source without directories, so the report holds no absolute paths: "npz:/a/b.npz" -> "npz:b.npz"."""
    scheme, sep, arg = source.partition(":")
    if sep and ("/" in arg or "\\" in arg):
        return f"{scheme}:{Path(arg).name}"
    return source


def setting_label(sweep: tuple[str, ...], values: tuple) -> str:
    """"BCE", "learning rate 0.01", "learning rate 0.01, batch size 64"; without a sweep, the run id."""
    if not sweep:
        return str(values[0])
    if sweep == ("loss",):
        return value_text("loss", values[0])
    return ", ".join(f"{key_name(k)} {value_text(k, v)}" for k, v in zip(sweep, values, strict=True))


FILTERS = {"pct": pct, "num": num, "pct_ms": pct_ms, "pct_ci": pct_ci, "num_ms": num_ms, "num_ci": num_ci,
           "pval": pval, "pts": pts, "secs": secs, "rate": rate, "duration": duration, "cell": cell,
           "capfirst": capfirst, "signed": signed, "plural": plural}
