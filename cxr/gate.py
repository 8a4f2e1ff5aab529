"""The regression gate: is NEW worse than BASE, setting by setting? Pure functions over arrays.

A setting is tested on its paired runs (the same seeds, the same test images) in both stores:

- the differences NEW - BASE of test accuracy, balanced accuracy and AUROC, with the paired bootstrap over
  seeds and test images (`stats.paired_bootstrap_metrics`, 2000 resamples, seed 0, the report's);
- the throughput ratio NEW / BASE, the median over seeds of each seed's ratio of training images/s.

`judge` then decides for all settings at once. The p-values of every (setting, metric) test form one
family, Holm-adjusted (`stats.holm`): the gate gives one verdict, so its false-alarm rate is the
family-wise one. A metric is "worse" when its adjusted p is below alpha *and* NEW - BASE is at least
`min_effect` points down (accuracies in percentage points, AUROC in hundredths: 1 means 0.01 for all
three), "better" likewise upwards. Throughput is "slower" below 1 / factor and "faster" above factor; it
counts only when both sides ran on the same device name and torch build (`comparable`), else it is "not
comparable". A setting is a regression when a metric is worse or it is slower on a comparable machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxr import stats
from cxr.errors import CxrError

METRICS = ("accuracy", "balanced_accuracy", "auroc")
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auroc": "AUROC"}
REGRESSION, IMPROVEMENT, NO_CHANGE, IDENTICAL = "regression", "improvement", "no change", "identical"


class GateError(CxrError):
    """Gate parameters out of range (the CLI's options); a one-line message naming the option."""


@dataclass(frozen=True)
class Gate:
    """What counts as a regression (the options of `cxr-bench compare`)."""

    alpha: float = 0.05  # family-wise level of the Holm-adjusted tests
    min_effect: float = 1.0  # points: 1 = 0.01 of accuracy, balanced accuracy and AUROC
    factor: float = 1.25  # throughput: slower below 1 / factor, faster above factor
    n_boot: int = 2000  # bootstrap resamples (the report's N_BOOT)
    seed: int = 0  # the bootstrap's numpy Generator seed (the report's BOOT_SEED)

    def __post_init__(self):
        checks = (("--alpha", self.alpha, 0 < self.alpha < 1, "a level in (0, 1), e.g. 0.05"),
                  ("--min-effect", self.min_effect, 0 <= self.min_effect < 100, "points in [0, 100), e.g. 1"),
                  ("--factor", self.factor, self.factor >= 1, "a ratio >= 1, e.g. 1.25"),
                  ("n_boot", self.n_boot, self.n_boot >= 1, "an integer >= 1"))
        for option, value, ok, allowed in checks:
            if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and ok):
                raise GateError(f"{option} {value!r}: must be {allowed}")

    @property
    def threshold(self) -> float:
        """The minimal effect as a fraction (1 point = 0.01), the same for every metric."""
        return self.min_effect / 100

    def text(self) -> str:
        """The gate's definition in one sentence, for a table's footnote."""
        return (f"a regression is a NEW − BASE difference of test accuracy, balanced accuracy or AUROC whose "
                f"Holm-adjusted p-value is below {self.alpha:g} (paired bootstrap over seeds and test images, "
                f"{self.n_boot} resamples; Holm over every setting and metric) and which is at least "
                f"{self.min_effect:g} point{'s' * (self.min_effect != 1)} down (AUROC {self.threshold:g}), or a "
                f"throughput ratio NEW / BASE below 1 / {self.factor:g} = {1 / self.factor:.2f} on the same "
                "device name and torch build")


DEFAULT = Gate()  # `cxr-bench compare` without options


def environment(r) -> str:
    """What makes two throughputs comparable, of a run record: its device's name and its torch build."""
    return f"{r.environment.get('device_name')}, torch {r.environment.get('torch')}"


def throughput(base: list, new: list, comparable: bool) -> dict:
    """{"ratio" (median over seeds of NEW / BASE images/s, None without any pair of numbers), "base", "new"
    (medians of each side), "n" (seeds with both), "comparable"}."""
    pairs = [(b, n) for b, n in zip(base, new, strict=True) if b and n]
    return {"ratio": float(np.median([n / b for b, n in pairs])) if pairs else None,
            "base": float(np.median([b for b, _ in pairs])) if pairs else None,
            "new": float(np.median([n for _, n in pairs])) if pairs else None,
            "n": len(pairs), "comparable": bool(comparable)}


def paired_differences(y_true, base: dict, new: dict, gate: Gate = DEFAULT) -> dict:
    """One setting: base and new {"y_pred", "y_score": (S, N), "images_per_second": S numbers or None},
    rows paired by seed. Returns {"metrics": {metric: paired bootstrap of NEW - BASE}, "identical": the
    predictions are equal in every seed, "n_seeds", "n_images"} (the throughput is the caller's, `throughput`,
    since whether it is comparable depends on the stores)."""
    same = all(np.array_equal(np.asarray(base[k]), np.asarray(new[k])) for k in ("y_pred", "y_score"))
    n_seeds, n_images = np.shape(base["y_pred"])
    if same:  # every resample's difference is 0: what the bootstrap would find, without drawing 2000 of them
        both = np.unique(np.asarray(y_true)).size == 2  # balanced accuracy and AUROC need both classes
        boot = {m: {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "n_boot": gate.n_boot}
                if both or m == "accuracy" else {"diff": None, "ci_low": None, "ci_high": None, "p_value": None,
                                                 "n_boot": 0} for m in METRICS}
        boot = {m: {**b, "n_seeds": n_seeds, "n_images": n_images} for m, b in boot.items()}
    else:
        boot = stats.paired_bootstrap_metrics(y_true, new, base, METRICS, n_boot=gate.n_boot, seed=gate.seed)
    return {"metrics": boot, "identical": same, "n_seeds": n_seeds, "n_images": n_images}


def _metric_verdict(b: dict, p_adjusted: float | None, gate: Gate) -> str:
    if b["diff"] is None or p_adjusted is None or p_adjusted >= gate.alpha:
        return NO_CHANGE
    tolerance = 1e-12  # a difference of exactly the threshold counts
    if b["diff"] <= -gate.threshold + tolerance:
        return REGRESSION
    return IMPROVEMENT if b["diff"] >= gate.threshold - tolerance else NO_CHANGE


def _throughput_verdict(t: dict | None, gate: Gate) -> str:
    if t is None or t["ratio"] is None:
        return "n/a"
    if t["ratio"] < 1 / gate.factor:
        return "slower" if t["comparable"] else "not comparable"
    if t["ratio"] > gate.factor:
        return "faster" if t["comparable"] else "not comparable"
    return "same" if t["comparable"] else "not comparable"


def judge(tests: list[dict], gate: Gate = DEFAULT) -> list[dict]:
    """The verdicts of many settings at once: each test (`paired_differences`'s dict plus "throughput", from
    `throughput`, or None) gains "p_adjusted" {metric: Holm-adjusted p or None}, "verdicts" {metric: regression,
    improvement or no change; "throughput": slower, faster, same, not comparable or n/a} and "verdict": regression
    (a metric worse, or slower on a comparable machine), improvement (one better or faster, none worse),
    identical (the same predictions in every seed, throughput within the factor) or no change. New dicts."""
    family = [(i, m) for i, t in enumerate(tests) for m in METRICS if t["metrics"][m]["p_value"] is not None]
    adjusted = dict(zip(family, stats.holm([tests[i]["metrics"][m]["p_value"] for i, m in family]), strict=True))
    out = []
    for i, t in enumerate(tests):
        p_adj = {m: adjusted.get((i, m)) for m in METRICS}
        verdicts = {m: _metric_verdict(t["metrics"][m], p_adj[m], gate) for m in METRICS}
        verdicts["throughput"] = _throughput_verdict(t.get("throughput"), gate)
        if REGRESSION in verdicts.values() or verdicts["throughput"] == "slower":
            verdict = REGRESSION
        elif IMPROVEMENT in verdicts.values() or verdicts["throughput"] == "faster":
            verdict = IMPROVEMENT
        elif t["identical"] and verdicts["throughput"] != "not comparable":
            verdict = IDENTICAL
        else:
            verdict = NO_CHANGE
        out.append({**t, "p_adjusted": p_adj, "verdicts": verdicts, "verdict": verdict})
    return out


def severity(t: dict) -> tuple:
    """Sort key, worst first: regressions, then no change, identical, improvements; within each, more metrics
    beyond the gate first, then the largest drop of a metric, then the lowest throughput ratio."""
    rank = {REGRESSION: 0, NO_CHANGE: 1, IDENTICAL: 2, IMPROVEMENT: 3}[t["verdict"]]
    beyond = sum(t["verdicts"][m] == t["verdict"] for m in METRICS) if "verdicts" in t else 0
    diffs = [t["metrics"][m]["diff"] for m in METRICS if t["metrics"][m]["diff"] is not None]
    ratio = (t.get("throughput") or {}).get("ratio")
    return rank, -beyond, min(diffs, default=0.0), 1.0 if ratio is None else ratio
