"""The analysis sentences. Each function returns only sentences whose condition holds for the numbers
it is given; the template only lays them out.

Settings are cxr.report.model.Setting objects (label, values, runs, ok, accuracy, auroc summaries);
runs are cxr.record.RunRecord objects.
"""

from __future__ import annotations

import itertools
import math

from cxr.record import DIVERGED, FAILED
from cxr.report.format import fmt_seeds, key_name, num, p_text, pct, plural, pt, setting_label, value_text

ALPHA = 0.05  # "evidence of a difference" below it


def _all_runs(n: int) -> str:
    return {1: "its only run", 2: "both runs"}.get(n, f"all {n} runs")


def pair_sentence(a: str, b: str, boot: dict, p: float, n_tests: int = 1) -> str:
    """The paired accuracy test of a vs b, worded by p against ALPHA; n_tests > 1 names Holm."""
    d, n_seeds, n_images = boot["diff"], boot["n_seeds"], boot["n_images"]
    hi, lo = (a, b) if d >= 0 else (b, a)
    size = abs(d)
    if d >= 0:
        ci = f"95% CI {pt(boot['ci_low'])} to {pt(boot['ci_high'])}"
    else:  # the interval of hi - lo is the mirrored interval of a - b
        ci = f"95% CI {pt(-boot['ci_high'])} to {pt(-boot['ci_low'])}"
    test = f"paired bootstrap, {p_text(p)}"
    if n_tests > 1:
        test += f" after Holm's adjustment for {n_tests} tests"
    n = f"n = {plural(n_seeds, 'seed')}, {n_images} test images"
    if d == 0:
        text = f"{a} and {b} have the same test accuracy on the paired runs ({test}): no evidence of a " \
               f"difference at {n}."
    elif p < ALPHA:
        text = f"{hi} is more accurate than {lo} by {pt(size)} points of test accuracy ({ci} points; " \
               f"{test}): evidence of a difference at the 5% level, at {n}."
    else:
        text = f"{hi} and {lo} differ by {pt(size)} points of test accuracy ({hi} higher; {ci} points; " \
               f"{test}): no evidence of a difference at {n}."
    if n_tests > 1 and p >= ALPHA and d != 0 and (boot["ci_low"] > 0 or boot["ci_high"] < 0):
        text += (" The 95% interval, which is not adjusted for the multiple comparisons, excludes 0: the "
                 "difference is suggestive, not established.")
    if n_seeds == 1:
        text += (" With one seed the interval covers the sampling of test images only, not seed-to-seed "
                 "variation.")
    return text


def mcnemar_sentence(rows) -> str:
    """How many per-seed McNemar tests reach p < ALPHA; rows: [{"seed", "b", "c", "p_value"}]."""
    hits = [r["seed"] for r in rows if r["p_value"] < ALPHA]
    if not hits:
        which = "the one seed" if len(rows) == 1 else f"all {len(rows)} seeds"
        return f"McNemar's exact test on each seed's predictions: p ≥ 0.05 for {which}."
    which = "the one seed" if len(rows) == 1 else f"{len(hits)} of {len(rows)} seeds"
    return f"McNemar's exact test on each seed's predictions: p < 0.05 for {which} ({fmt_seeds(hits)})."


def best_sentences(settings) -> list[str]:
    """Which setting has the highest mean test accuracy (and AUROC, when another one)."""
    done = [s for s in settings if s.accuracy["mean"] is not None]
    if not done:
        return ["No setting has a finished run, so there are no test metrics to compare."] if settings else []
    if len(done) == 1:
        if len(settings) == 1:
            return []
        return [f"Only {done[0].label} has finished runs; the other settings have no test metrics."]
    top = max(s.accuracy["mean"] for s in done)
    best = [s for s in done if s.accuracy["mean"] == top]
    if len(best) > 1:
        out = [f"{' and '.join(s.label for s in best)} tie for the highest mean test accuracy, {pct(top)}."]
    else:
        s = best[0]
        spread = "" if s.accuracy["std"] is None else f" ± {pct(s.accuracy['std'])[:-1]}"
        out = [f"Highest mean test accuracy: {s.label}, {pct(top)}{spread} over "
               f"{plural(s.accuracy['n'], 'seed')}."]
    scored = [s for s in done if s.auroc["mean"] is not None]
    if scored:
        top_auc = max(s.auroc["mean"] for s in scored)
        best_auc = [s for s in scored if s.auroc["mean"] == top_auc]
        if len(best_auc) == 1 and best_auc[0] not in best:
            out.append(f"The highest mean AUROC is {best_auc[0].label}'s ({num(top_auc)}), not the most "
                       f"accurate setting's: accuracy depends on the decision threshold, AUROC does not.")
    return out


def trend_sentence(key: str, settings) -> list[str]:
    """Whether mean test accuracy rises or falls monotonically along a numeric swept key (>= 3 values)."""
    done = [s for s in settings if s.accuracy["mean"] is not None]
    if len(done) < 3 or not all(isinstance(s.values[0], (int, float)) for s in done):
        return []
    if len({s.values for s in done}) < len(done):  # a value with several variants: no single curve
        return []
    done.sort(key=lambda s: s.values[0])
    means = [s.accuracy["mean"] for s in done]
    listing = ", ".join(f"{pct(s.accuracy['mean'])} ({value_text(key, s.values[0])})" for s in done)
    name = key_name(key)
    steps = list(zip(means, means[1:], strict=False))
    if all(x < y for x, y in steps):
        return [f"Mean test accuracy rises with {name}: {listing}."]
    if all(x > y for x, y in steps):
        return [f"Mean test accuracy falls as {name} grows: {listing}."]
    return [f"Mean test accuracy is not monotonic in {name}: {listing}."]


def baseline_sentences(settings, test_set) -> list[str]:
    """Settings whose mean accuracy is no better than always predicting the majority class."""
    if not test_set:
        return []
    majority = max(test_set["normal"], test_set["pneumonia"]) / test_set["n"]
    which = "pneumonia" if test_set["pneumonia"] >= test_set["normal"] else "normal"
    return [f"{s.label}: mean test accuracy {pct(s.accuracy['mean'])} is no better than always predicting "
            f"{which} ({pct(majority)})." for s in settings
            if s.accuracy["mean"] is not None and s.accuracy["mean"] <= majority]


GAP = 0.15  # sensitivity and specificity further apart than this (15 points) get a sentence


def balance_sentences(settings) -> list[str]:
    """Settings whose mean sensitivity and specificity are more than GAP apart: what a clinician reads first."""
    out = []
    for s in settings:
        sens, spec = s.sensitivity["mean"], s.specificity["mean"]
        if sens is None or spec is None or abs(sens - spec) <= GAP:
            continue
        apart = abs(round(100 * sens, 1) - round(100 * spec, 1))  # as the two shown numbers differ
        if sens > spec:
            out.append(f"{s.label}: sensitivity {pct(sens, 1)} but specificity {pct(spec, 1)} ({apart:.1f} points "
                       f"apart): the model calls pneumonia on many normal images.")
        else:
            out.append(f"{s.label}: specificity {pct(spec, 1)} but sensitivity {pct(sens, 1)} ({apart:.1f} points "
                       f"apart): the model calls many pneumonia images normal.")
    return out


def status_sentences(setting) -> list[str]:
    """What happened to the runs that did not finish."""
    runs = setting.runs
    div = [r for r in runs if r.status == DIVERGED]
    fail = [r for r in runs if r.status == FAILED]
    if not div and not fail:
        return []
    if len(div) == len(runs):
        epochs = ", ".join(str(len(r.history)) for r in div)
        return [f"{setting.label}: {_all_runs(len(runs))} diverged (stopped in epoch {epochs}), "
                f"so it has no test metrics."]
    if len(fail) == len(runs):
        return [f"{setting.label}: {_all_runs(len(runs))} failed, so it has no test metrics."]
    parts = []
    if div:
        parts.append(f"{len(div)} of {len(runs)} runs diverged ({fmt_seeds(r.seed for r in div)})")
    if fail:
        parts.append(f"{len(fail)} of {len(runs)} runs failed ({fmt_seeds(r.seed for r in fail)})")
    tail = f"its row averages the {plural(len(setting.ok), 'run')} that finished" if setting.ok \
        else "it has no test metrics"
    return [f"{setting.label}: {' and '.join(parts)}; {tail}."]


def variant_sentences(sweep: tuple, settings) -> list[str]:
    """Swept values whose runs differ in recipe, data or training version: shown as separate rows."""
    groups: dict[tuple, list] = {}
    for s in settings:
        if s.note:
            groups.setdefault(s.values, []).append(s)
    return [f"The runs of {setting_label(sweep, values)} were trained with different recipes or data "
            f"({'; '.join(s.note for s in group)}), so they are shown as separate rows, never averaged."
            for values, group in groups.items()]


def analysis_sentences(sweep: tuple, settings, test_set) -> list[str]:
    """The analysis of a comparison, before its pairs' sentences."""
    sentences = variant_sentences(sweep, settings)
    for s in settings:
        sentences += status_sentences(s)
    sentences += best_sentences(settings)
    if len(sweep) == 1:
        sentences += trend_sentence(sweep[0], settings)
    sentences += baseline_sentences(settings, test_set)
    sentences += balance_sentences(settings)
    n_ok = [len(s.ok) for s in settings if s.ok]
    if n_ok and max(n_ok) == 1:
        sentences.append("Each setting has at most one finished run: a standard deviation and a 95% interval "
                         "need two seeds, so they show as n/a.")
    return sentences


def grid_text(sweep: tuple, grid: dict) -> str:
    """A spec file's grid as a reader names it: "0.001, 0.01, 0.1"; "learning rate 0.001, 0.01 × batch size
    32, 64" for several keys."""
    if len(sweep) == 1:
        return ", ".join(value_text(sweep[0], v) for v in grid[sweep[0]])
    return " × ".join(f"{key_name(k)} {', '.join(value_text(k, v) for v in grid[k])}" for k in sweep)


def missing_sentences(sweep: tuple, grid: dict, settings) -> list[str]:
    """Points of the spec file's grid that have no run, and seeds a swept value (over its variants) lacks
    that others have."""
    out = []
    if sweep and set(grid) == set(sweep):
        present = [s.values for s in settings]
        absent = [point for point in itertools.product(*(grid[k] for k in sweep))
                  if not any(all(map(_same, point, values)) for values in present)]
        if absent:
            listing = (", " if len(sweep) == 1 else "; ").join(setting_label(sweep, p) for p in absent)
            out.append(f"Not run: {listing} (the spec file's grid is {grid_text(sweep, grid)}).")
    all_seeds = sorted({seed for s in settings for seed in s.seeds})
    seeds: dict[tuple, set] = {}  # a swept value's seeds, over its variants (rows that differ in recipe or data)
    labels: dict[tuple, str] = {}
    for s in settings:
        seeds.setdefault(s.values, set()).update(s.seeds)
        labels[s.values] = setting_label(sweep, s.values) if s.note else s.label
    for values, have in seeds.items():
        lacking = [x for x in all_seeds if x not in have]
        if lacking:
            out.append(f"{labels[values]} has no result for {fmt_seeds(lacking)} (other settings have "
                       f"{fmt_seeds(all_seeds)}).")
    return out


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b
