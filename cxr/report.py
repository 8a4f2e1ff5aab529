"""The Markdown report: tables, paired tests, figures and analysis sentences from stored results.

`render(results_dir)` reads every results/runs/<id>/seed-<n>.json, groups the runs into
comparisons (all runs sharing spec.name and spec.sweep; a setting is one value of the swept
key(s)), computes the statistics (cxr.stats), draws the figures (matplotlib, PNG) into
<out dir>/figures and renders templates/report.md.j2 (Jinja2, StrictUndefined).

Only runs with status "ok" enter means, intervals, tests and figures; diverged and failed runs
are counted and listed. Every analysis sentence is built by a function here under a condition
that makes it true; the template only lays them out.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr import results as results_mod
from cxr import stats

N_BOOT = 2000  # paired bootstrap resamples
BOOT_SEED = 0  # numpy Generator seed of the bootstrap, so a report is reproducible
ALPHA = 0.05
UNIT = (0.0, 1.0)  # fractions: t intervals are clipped to it
OK, DIVERGED, FAILED = results_mod.STATUS_OK, results_mod.STATUS_DIVERGED, results_mod.STATUS_FAILED


class ReportError(ValueError):
    """Input the report cannot use; the message is one line naming the file."""


@dataclass(frozen=True)
class Task:
    title: str
    sweep: tuple[str, ...]
    expected: tuple  # the course's low / medium / high values (or the two losses)
    spec: str  # the shipped spec file that runs it


TASKS = (
    Task("Task A: BCE vs CE", ("loss",), ("bce", "ce"), "specs/task-a-loss.toml"),
    Task("Task B: learning rate", ("lr",), (0.001, 0.01, 0.1), "specs/task-b-lr.toml"),
    Task("Task B: batch size", ("batch_size",), (32, 64, 128), "specs/task-b-batch-size.toml"),
)
KEY_NAMES = {"lr": "learning rate", "batch_size": "batch size", "loss": "loss function"}


def templates_dir() -> Path:
    """templates/ of the source tree, or cxr/templates when an installed package ships it there."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "templates", here.parent / "templates"):
        if (candidate / "report.md.j2").is_file():
            return candidate
    raise ReportError(f"{here.parents[1] / 'templates'}: report.md.j2 not found "
                      f"(nor in {here.parent / 'templates'})")


# ----------------------------------------------------------------------------------- formatting
# Registered as Jinja2 filters; the analysis sentences use the same functions.

def pct(x, digits: int = 2) -> str:
    """A fraction as percent: 0.87662 -> "87.66%"."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def pct_ms(s: dict, digits: int = 2) -> str:
    """mean ± std of a mean_std_ci summary of fractions, in percent without the sign."""
    return _ms(s, lambda v: f"{100 * v:.{digits}f}")


def pct_ci(s: dict, digits: int = 2) -> str:
    return _ci(s, lambda v: f"{100 * v:.{digits}f}")


def num_ms(s: dict, digits: int = 3) -> str:
    return _ms(s, lambda v: f"{v:.{digits}f}")


def num_ci(s: dict, digits: int = 3) -> str:
    return _ci(s, lambda v: f"{v:.{digits}f}")


def _ms(s: dict, f) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{f(s['mean'])} ± {'n/a' if s['std'] is None else f(s['std'])}"


def _ci(s: dict, f) -> str:
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
    return "n/a" if x is None else f"{100 * x:+.{digits}f}".replace("-", "−")


def secs(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def rate(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def duration(seconds) -> str:
    if seconds is None:
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


def value_text(key: str, v) -> str:
    """A swept value as a reader names it: loss "bce" -> "BCE", lr 0.001 -> "0.001"."""
    if key == "loss":
        return str(v).upper()
    return f"{v:g}" if isinstance(v, float) else str(v)


def setting_label(sweep: tuple[str, ...], values: tuple) -> str:
    """"BCE", "learning rate 0.01", "learning rate 0.01, batch size 64"; without a sweep, the run id."""
    if not sweep:
        return str(values[0])
    if sweep == ("loss",):
        return value_text("loss", values[0])
    return ", ".join(f"{KEY_NAMES.get(k, k)} {value_text(k, v)}" for k, v in zip(sweep, values, strict=True))


FILTERS = {"pct": pct, "num": num, "pct_ms": pct_ms, "pct_ci": pct_ci, "num_ms": num_ms, "num_ci": num_ci,
           "pval": pval, "pts": pts, "secs": secs, "rate": rate, "duration": duration, "cell": cell,
           "capfirst": capfirst, "plural": lambda n, word: _plural(n, word)}


# --------------------------------------------------------------------------------- data model

@dataclass(frozen=True, eq=False)  # compared by identity: settings hold many runs
class Setting:
    values: tuple
    label: str
    runs: tuple  # every run of this setting, by seed
    ok: tuple  # the runs with status "ok"
    accuracy: dict  # mean_std_ci summaries over the ok runs
    auroc: dict
    sensitivity: dict
    specificity: dict
    train_loss: dict  # final epoch
    train_seconds: dict
    images_per_second: dict
    best_epochs: str  # per seed, e.g. "7, 9, 8 of 10"
    n_diverged: int
    n_failed: int

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.runs]

    @property
    def runs_text(self) -> str:
        return _status_counts(len(self.ok), self.n_diverged, self.n_failed)


def _status_counts(n_ok: int, n_diverged: int, n_failed: int) -> str:
    parts = [f"{n_ok} ok"] + [f"{n} {what}" for n, what in ((n_diverged, DIVERGED), (n_failed, FAILED)) if n]
    return ", ".join(parts)


@dataclass(frozen=True)
class Pair:
    a: str  # the better setting by mean test accuracy
    b: str
    seeds: tuple  # seeds with an ok run in both
    n_images: int
    boot: dict  # stats.paired_bootstrap of accuracy(a) - accuracy(b)
    p_adjusted: float  # Holm over the pairs of the comparison (= boot p with one pair)
    mcnemar: tuple  # ({"seed", "b", "c", "p_value"}, ...)
    sentences: tuple


@dataclass(frozen=True)
class Comparison:
    name: str
    sweep: tuple
    slug: str
    title: str
    sources: str
    settings: tuple
    test_set: dict | None  # {"n", "normal", "pneumonia"} shared by every ok run, or None
    pairs: tuple
    pair_scheme: str  # how pairs were chosen, or why there is no test
    not_ok: tuple  # runs that diverged or failed
    missing: tuple  # sentences: settings or seeds not run
    sentences: tuple  # analysis
    figures: list = field(default_factory=list)  # [{"path", "caption"}], filled by render

    @property
    def n_runs(self) -> int:
        return sum(len(s.runs) for s in self.settings)

    @property
    def runs_text(self) -> str:
        return _status_counts(sum(len(s.ok) for s in self.settings), sum(s.n_diverged for s in self.settings),
                              sum(s.n_failed for s in self.settings))


# ------------------------------------------------------------------------------ run accessors

def _test(r: dict, key: str):
    return ((r.get("metrics") or {}).get("test") or {}).get(key)


def _timing(r: dict, key: str):
    return (r.get("timing") or {}).get(key)


def _final(r: dict, key: str):
    history = r.get("history") or []
    return history[-1].get(key) if history else None


def _fmt_seeds(seeds) -> str:
    seeds = list(seeds)
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _all_runs(n: int) -> str:
    return {1: "its only run", 2: "both runs"}.get(n, f"all {n} runs")


# ------------------------------------------------------------------------------ sentences
# Each function returns only sentences whose condition holds for the numbers it is given.

def pair_sentence(a: str, b: str, boot: dict, p: float, n_tests: int = 1) -> str:
    """The paired accuracy test of a vs b, worded by p against ALPHA; n_tests > 1 names Holm."""
    d, n_seeds, n_images = boot["diff"], boot["n_seeds"], boot["n_images"]
    hi, lo = (a, b) if d >= 0 else (b, a)
    size = abs(d)
    if d >= 0:
        ci = f"95% CI {_pt(boot['ci_low'])} to {_pt(boot['ci_high'])}"
    else:  # the interval of hi - lo is the mirrored interval of a - b
        ci = f"95% CI {_pt(-boot['ci_high'])} to {_pt(-boot['ci_low'])}"
    test = f"paired bootstrap, {p_text(p)}"
    if n_tests > 1:
        test += f" after Holm's adjustment for {n_tests} tests"
    n = f"n = {_plural(n_seeds, 'seed')}, {n_images} test images"
    if d == 0:
        text = f"{a} and {b} have the same test accuracy on the paired runs ({test}): no evidence of a " \
               f"difference at {n}."
    elif p < ALPHA:
        text = f"{hi} is more accurate than {lo} by {_pt(size)} points of test accuracy ({ci} points; " \
               f"{test}): evidence of a difference at the 5% level, at {n}."
    else:
        text = f"{hi} and {lo} differ by {_pt(size)} points of test accuracy ({hi} higher; {ci} points; " \
               f"{test}): no evidence of a difference at {n}."
    if n_tests > 1 and p >= ALPHA and d != 0 and (boot["ci_low"] > 0 or boot["ci_high"] < 0):
        text += (" The 95% interval, which is not adjusted for the multiple comparisons, excludes 0: the "
                 "difference is suggestive, not established.")
    if n_seeds == 1:
        text += (" With one seed the interval covers the sampling of test images only, not seed-to-seed "
                 "variation.")
    return text


def _pt(x: float) -> str:
    """Unsigned-when-positive percentage points for ranges: 0.004 -> "0.40", -0.002 -> "−0.20"."""
    s = pts(x)
    return s[1:] if s.startswith("+") else s


def mcnemar_sentence(rows) -> str:
    """How many per-seed McNemar tests reach p < ALPHA; rows: [{"seed", "b", "c", "p_value"}]."""
    hits = [r["seed"] for r in rows if r["p_value"] < ALPHA]
    if not hits:
        which = "the one seed" if len(rows) == 1 else f"all {len(rows)} seeds"
        return f"McNemar's exact test on each seed's predictions: p ≥ 0.05 for {which}."
    which = "the one seed" if len(rows) == 1 else f"{len(hits)} of {len(rows)} seeds"
    return f"McNemar's exact test on each seed's predictions: p < 0.05 for {which} ({_fmt_seeds(hits)})."


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
               f"{_plural(s.accuracy['n'], 'seed')}."]
    scored = [s for s in done if s.auroc["mean"] is not None]
    if scored:
        top_auc = max(s.auroc["mean"] for s in scored)
        best_auc = [s for s in scored if s.auroc["mean"] == top_auc]
        if len(best_auc) == 1 and best_auc[0] not in best:
            out.append(f"The highest mean AUROC is {best_auc[0].label}'s ({num(top_auc)}), not the most "
                       f"accurate setting's: accuracy depends on the 0.5 threshold, AUROC does not.")
    return out


def trend_sentence(key: str, settings) -> list[str]:
    """Whether mean test accuracy rises or falls monotonically along a numeric swept key (>= 3 values)."""
    done = [s for s in settings if s.accuracy["mean"] is not None]
    if len(done) < 3 or not all(isinstance(s.values[0], (int, float)) for s in done):
        return []
    done.sort(key=lambda s: s.values[0])
    means = [s.accuracy["mean"] for s in done]
    listing = ", ".join(f"{pct(s.accuracy['mean'])} ({value_text(key, s.values[0])})" for s in done)
    name = KEY_NAMES.get(key, key)
    steps = list(zip(means, means[1:], strict=False))
    if all(x < y for x, y in steps):
        return [f"Mean test accuracy rises with {name}: {listing}."]
    if all(x > y for x, y in steps):
        return [f"Mean test accuracy falls as {name} grows: {listing}."]
    return [f"Mean test accuracy is not monotonic in {name}: {listing}."]


def baseline_sentences(settings, test_set: dict | None) -> list[str]:
    """Settings whose mean accuracy is no better than always predicting the majority class."""
    if not test_set:
        return []
    majority = max(test_set["normal"], test_set["pneumonia"]) / test_set["n"]
    which = "pneumonia" if test_set["pneumonia"] >= test_set["normal"] else "normal"
    return [f"{s.label}: mean test accuracy {pct(s.accuracy['mean'])} is no better than always predicting "
            f"{which} ({pct(majority)})." for s in settings
            if s.accuracy["mean"] is not None and s.accuracy["mean"] <= majority]


def status_sentences(setting: Setting) -> list[str]:
    """What happened to the runs that did not finish."""
    runs = setting.runs
    div = [r for r in runs if r["status"] == DIVERGED]
    fail = [r for r in runs if r["status"] == FAILED]
    if not div and not fail:
        return []
    if len(div) == len(runs):
        epochs = ", ".join(str(len(r.get("history") or [])) for r in div)
        return [f"{setting.label}: {_all_runs(len(runs))} diverged (stopped in epoch {epochs}), "
                f"so it has no test metrics."]
    if len(fail) == len(runs):
        return [f"{setting.label}: {_all_runs(len(runs))} failed, so it has no test metrics."]
    parts = []
    if div:
        parts.append(f"{len(div)} of {len(runs)} runs diverged ({_fmt_seeds(r['seed'] for r in div)})")
    if fail:
        parts.append(f"{len(fail)} of {len(runs)} runs failed ({_fmt_seeds(r['seed'] for r in fail)})")
    tail = f"its row averages the {_plural(len(setting.ok), 'run')} that finished" if setting.ok \
        else "it has no test metrics"
    return [f"{setting.label}: {' and '.join(parts)}; {tail}."]


# ------------------------------------------------------------------------------ building

def _setting(sweep: tuple, values: tuple, runs: list[dict]) -> Setting:
    runs = sorted(runs, key=lambda r: r["seed"])
    ok = tuple(r for r in runs if r["status"] == OK)
    epochs = sorted({r["spec"]["epochs"] for r in ok})
    best = ", ".join(str(r.get("best_epoch")) for r in ok)
    best_epochs = f"{best} of {'/'.join(map(str, epochs))}" if ok else "n/a"
    return Setting(
        values=values, label=setting_label(sweep, values), runs=tuple(runs), ok=ok,
        accuracy=stats.mean_std_ci([_test(r, "accuracy") for r in ok], bounds=UNIT),
        auroc=stats.mean_std_ci([_test(r, "auroc") for r in ok], bounds=UNIT),
        sensitivity=stats.mean_std_ci([_test(r, "sensitivity") for r in ok], bounds=UNIT),
        specificity=stats.mean_std_ci([_test(r, "specificity") for r in ok], bounds=UNIT),
        train_loss=stats.mean_std_ci([_final(r, "train_loss") for r in ok]),
        train_seconds=stats.mean_std_ci([_timing(r, "train_seconds") for r in ok]),
        images_per_second=stats.mean_std_ci([_timing(r, "images_per_second") for r in ok]),
        best_epochs=best_epochs,
        n_diverged=sum(r["status"] == DIVERGED for r in runs),
        n_failed=sum(r["status"] == FAILED for r in runs),
    )


def _test_set(settings) -> tuple[dict | None, np.ndarray | None, str]:
    """The y_true shared by every ok run with predictions, or (None, None, why not)."""
    ys = [r["predictions"]["y_true"] for s in settings for r in s.ok if r.get("predictions")]
    if not ys:
        return None, None, "no finished run with stored test predictions"
    if any(y != ys[0] for y in ys[1:]):
        return None, None, "the runs were not evaluated on the same test images (their y_true differ)"
    y = np.asarray(ys[0])
    return {"n": int(y.size), "normal": int(np.sum(y == 0)), "pneumonia": int(np.sum(y == 1))}, y, ""


def _pairs(settings, y_true) -> tuple[list[Pair], str]:
    testable = [s for s in settings if any(r.get("predictions") for r in s.ok)]
    if len(settings) < 2:
        return [], "one setting only, nothing to compare"
    if len(testable) < 2:
        return [], "fewer than two settings have finished runs with test predictions"
    best = max(testable, key=lambda s: s.accuracy["mean"])  # first of equals, in setting order
    others = [s for s in testable if s is not best]
    untested = [f"{s.label} (no finished run)" for s in settings if s not in testable]
    raw = []
    for other in others:
        by_seed_a = {r["seed"]: r for r in best.ok if r.get("predictions")}
        by_seed_b = {r["seed"]: r for r in other.ok if r.get("predictions")}
        seeds = sorted(set(by_seed_a) & set(by_seed_b))
        if not seeds:
            untested.append(f"{other.label} (no finished seed in common with {best.label})")
            continue
        pa = np.asarray([by_seed_a[s]["predictions"]["y_pred"] for s in seeds])
        pb = np.asarray([by_seed_b[s]["predictions"]["y_pred"] for s in seeds])
        boot = stats.paired_bootstrap(y_true, pa, pb, n_boot=N_BOOT, seed=BOOT_SEED)
        mc = tuple({"seed": s, **stats.mcnemar(y_true, pa[i], pb[i])} for i, s in enumerate(seeds))
        raw.append((other, seeds, boot, mc))
    if not raw:
        return [], "the settings share no seed with finished runs"
    if len(settings) == 2:
        scheme = "the two settings on the same test images"
    else:
        scheme = f"each setting against the most accurate one ({best.label})" + \
            (", the p-values adjusted with Holm's method" if len(raw) > 1 else "") + \
            (f"; not tested: {', '.join(untested)}" if untested else "")
    adjusted = stats.holm([boot["p_value"] for _, _, boot, _ in raw])
    pairs = [Pair(a=best.label, b=other.label, seeds=tuple(seeds), n_images=int(y_true.size), boot=boot,
                  p_adjusted=p, mcnemar=mc,
                  sentences=(pair_sentence(best.label, other.label, boot, p, len(raw)), mcnemar_sentence(mc)))
             for (other, seeds, boot, mc), p in zip(raw, adjusted, strict=True)]
    return pairs, scheme


def _missing(task: Task | None, sweep: tuple, settings) -> list[str]:
    out = []
    if task is not None:
        present = [s.values[0] for s in settings]
        absent = [v for v in task.expected if not any(_same(v, p) for p in present)]
        if absent:
            grid = ", ".join(value_text(sweep[0], v) for v in task.expected)
            out.append(f"Not run: {', '.join(setting_label(sweep, (v,)) for v in absent)} "
                       f"(the course's grid is {grid}).")
    all_seeds = sorted({seed for s in settings for seed in s.seeds})
    for s in settings:
        lacking = [x for x in all_seeds if x not in s.seeds]
        if lacking:
            out.append(f"{s.label} has no result for {_fmt_seeds(lacking)} (other settings have "
                       f"{_fmt_seeds(all_seeds)}).")
    return out


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _slug(name: str, sweep: tuple) -> str:
    tail = "" if sweep == (name,) else "-" + ("-".join(sweep) or "single")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name + tail)


def comparison(runs: list[dict], task: Task | None = None) -> Comparison:
    """One comparison from the runs sharing (spec.name, spec.sweep)."""
    name, sweep = runs[0]["spec"]["name"], tuple(runs[0]["spec"].get("sweep") or ())
    groups: dict[tuple, list] = {}
    for r in runs:
        key = tuple(r["spec"][k] for k in sweep) if sweep else (r["id"],)
        groups.setdefault(key, []).append(r)
    keys = sorted(groups, key=lambda k: tuple((isinstance(v, str), v) for v in k))
    settings = tuple(_setting(sweep, k, groups[k]) for k in keys)
    test_set, y_true, why = _test_set(settings)
    pairs, scheme = _pairs(settings, y_true) if y_true is not None else ([], why)
    sentences = []
    for s in settings:
        sentences += status_sentences(s)
    sentences += best_sentences(settings)
    if len(sweep) == 1:
        sentences += trend_sentence(sweep[0], settings)
    sentences += baseline_sentences(settings, test_set)
    n_ok = [len(s.ok) for s in settings if s.ok]
    if n_ok and max(n_ok) == 1:
        sentences.append("Each setting has at most one finished run: a standard deviation and a 95% interval "
                         "need two seeds, so they show as n/a.")
    sources = ", ".join(sorted({Path(r["spec"].get("source") or "?").name for r in runs}))
    labels = [s.label for s in settings]
    names = [KEY_NAMES.get(k, k) for k in sweep]
    if sweep == ("loss",):
        title = f"`{name}`: {' vs '.join(labels)}"
    elif len(sweep) == 1:
        title = f"`{name}`: {names[0]} {' / '.join(value_text(sweep[0], s.values[0]) for s in settings)}"
    elif sweep:
        title = f"`{name}`: {' × '.join(names)}, {_plural(len(settings), 'setting')}"
    else:
        title = f"`{name}`: one experiment"
    return Comparison(
        name=name, sweep=sweep, slug=_slug(name, sweep), title=title, sources=sources, settings=settings,
        test_set=test_set, pairs=tuple(pairs), pair_scheme=scheme,
        not_ok=tuple(r for s in settings for r in s.runs if r["status"] != OK),
        missing=tuple(_missing(task, sweep, settings)), sentences=tuple(sentences),
    )


def _task_of(sweep: tuple) -> Task | None:
    return next((t for t in TASKS if t.sweep == sweep), None)


def comparisons(results: list[dict]) -> list[Comparison]:
    """Group runs by (spec.name, spec.sweep), Task A and B first, then the rest by name."""
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["spec"]["name"], tuple(r["spec"].get("sweep") or ())), []).append(r)
    order = {t.sweep: i for i, t in enumerate(TASKS)}
    keys = sorted(groups, key=lambda k: (order.get(k[1], len(TASKS)), k[0], k[1]))
    return [comparison(groups[k], _task_of(k[1])) for k in keys]


# --------------------------------------------------------------------------- what was run

def _distinct(values) -> str:
    seen = []
    for v in values:
        v = "n/a" if v is None else str(v)
        if v not in seen:
            seen.append(v)
    return ", ".join(seen) if seen else "n/a"


def _short_source(source: str) -> str:
    """A data source without directories, so the report holds no absolute paths."""
    scheme, sep, arg = source.partition(":")
    if sep and ("/" in arg or "\\" in arg):
        return f"{scheme}:{Path(arg).name}"
    return source


def _time(s: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(s) if s else None
    except ValueError:
        return None


def run_info(results: list[dict]) -> dict:
    env = [r.get("environment") or {} for r in results]
    specs = [r["spec"] for r in results]
    fresh = [r for r in results if not r.get("reused_from")]  # copies would count their time twice
    started = [t for t in (_time(e.get("started_at")) for e in env) if t]
    finished = [t for t in (_time(e.get("finished_at")) for e in env) if t]
    compute = sum((_timing(r, "train_seconds") or 0) + (_timing(r, "eval_seconds") or 0) for r in fresh)
    datasets, seen = [], set()
    for r in results:
        d = r.get("dataset") or {}
        key = (d.get("source"), d.get("image_size"))
        if d and key not in seen:
            seen.add(key)
            datasets.append({"name": d.get("name", "?"), "source": _short_source(str(d.get("source"))),
                             "synthetic": bool(d.get("synthetic")), "image_size": d.get("image_size"),
                             "splits": [{"name": k, **v} for k, v in (d.get("splits") or {}).items()]})
    fmt_time = "%Y-%m-%d %H:%M %Z"
    span = f"{min(started).strftime(fmt_time).strip()} / {max(finished).strftime(fmt_time).strip()}" \
        if started and finished else "n/a"
    rows = [
        ("Model", _distinct(f"{s['model']} (width {s['width']})" for s in specs)),
        ("Image size", _distinct(f"{s['image_size']} × {s['image_size']} px" for s in specs)),
        ("Training", _distinct(_training(s) for s in specs)),
        ("Epochs", _distinct(sorted({s["epochs"] for s in specs}))),
        ("Seeds", ", ".join(map(str, sorted({r["seed"] for r in results}))) or "n/a"),
        ("Device", _distinct(f"{e.get('device')} ({e.get('device_name')})" for e in env)),
        ("CPU", _distinct(e.get("cpu") for e in env)),
        ("Python / torch / CUDA", _distinct(f"{e.get('python')} / {e.get('torch')} / "
                                            f"{e.get('cuda') or 'none'}" for e in env)),
        ("Commit", _distinct(e.get("git_commit") or "unknown" for e in env)),
        ("Runs", f"{len(results)}: {sum(r['status'] == OK for r in results)} ok, "
                 f"{sum(r['status'] == DIVERGED for r in results)} diverged, "
                 f"{sum(r['status'] == FAILED for r in results)} failed"
                 + (f"; {len(results) - len(fresh)} reused the stored result of an identical run under "
                    f"another id" if len(fresh) < len(results) else "")),
        ("Started / finished", span),
        ("Total time", f"{duration(compute)} of training and evaluation over {_plural(len(fresh), 'run')}"
         + (f"; {duration((max(finished) - min(started)).total_seconds())} from first start to last finish"
            if started and finished else "")),
    ]
    return {"rows": rows, "datasets": datasets}


# ---------------------------------------------------------------------------- benchmarks

def _training(s: dict) -> str:
    """One line of a spec's training recipe; options at their off value are not mentioned."""
    parts = [f"{s['optimizer']}", f"schedule {s['schedule']}", f"weight decay {s['weight_decay']:g}"]
    if s.get("label_smoothing"):
        parts.append(f"label smoothing {s['label_smoothing']:g}")
    augment = [f"{name} {s[key]:g}{unit}" for key, name, unit in (
        ("augment_shift", "shift", ""), ("augment_rotate", "rotation", "°"), ("augment_scale", "zoom", ""))
        if s.get(key)]
    if augment:
        parts.append("augmentation " + ", ".join(augment))
    if s.get("ema"):
        parts.append(f"weight EMA {s['ema']:g}")
    return ", ".join(parts) + f", best epoch chosen on validation {s['select']}"


def benchmarks(path: str | Path) -> dict:
    """pytest-benchmark's JSON as a table: name, rounds, mean seconds, then every scalar extra_info."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: unreadable benchmark JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise ReportError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    # One table per kind of benchmark (experiment runs, throughput, ...): benchmarks whose extra_info
    # has the same keys share a table, so no table is a patchwork of columns that are mostly empty.
    tables: dict[tuple, dict] = {}
    for b in doc["benchmarks"]:
        extra = b.get("extra_info") or {}
        columns = tuple(k for k, v in extra.items() if v is None or isinstance(v, (str, int, float, bool)))
        table = tables.setdefault(columns, {"columns": list(columns), "rows": []})
        table["rows"].append({"name": b.get("name", "?"), "rounds": (b.get("stats") or {}).get("rounds"),
                              "mean": (b.get("stats") or {}).get("mean"), "extra": [extra.get(k) for k in columns]})
    machine = doc.get("machine_info") or {}
    cpu = (machine.get("cpu") or {}).get("brand_raw") if isinstance(machine.get("cpu"), dict) else None
    return {"file": path.name, "datetime": doc.get("datetime"), "cpu": cpu,
            "python": machine.get("python_version"), "tables": list(tables.values())}


# ------------------------------------------------------------------------------- figures

def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # object API: no pyplot state, Agg canvas on savefig

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _colors(c: Comparison) -> dict:
    """One colour per setting label, the same in every figure of the comparison."""
    from matplotlib import colormaps

    return {s.label: colormaps["tab10"](i % 10) for i, s in enumerate(c.settings)}


def curves_figure(c: Comparison, path: Path) -> str | None:
    """Train and validation loss and accuracy per epoch: mean of the ok runs, band = min to max."""
    drawn = [s for s in c.settings if s.ok and all(r.get("history") for r in s.ok)]
    if not drawn:
        return None
    from matplotlib.lines import Line2D

    fig = _figure(11, 4.6)
    ax_loss, ax_acc = fig.subplots(1, 2)
    loss_values = []
    colors = _colors(c)
    for s in drawn:
        color = colors[s.label]
        length = min(len(r["history"]) for r in s.ok)
        epochs = [row["epoch"] for row in s.ok[0]["history"][:length]]
        panels = (("train_loss", ax_loss, "-", 1), ("val_loss", ax_loss, "--", 1),
                  ("train_accuracy", ax_acc, "-", 100), ("val_accuracy", ax_acc, "--", 100))
        for key, ax, style, scale in panels:
            v = np.array([[np.nan if row.get(key) is None else row[key] * scale
                           for row in r["history"][:length]] for r in s.ok], dtype=float)
            if np.isnan(v).all():
                continue
            ax.plot(epochs, np.nanmean(v, 0), style, color=color, lw=1.8)
            if len(s.ok) > 1:
                ax.fill_between(epochs, np.nanmin(v, 0), np.nanmax(v, 0), color=color, alpha=0.15, lw=0)
            if ax is ax_loss:
                loss_values.extend(v[np.isfinite(v)].tolist())
    positive = [x for x in loss_values if x > 0]
    if positive and max(positive) / min(positive) > 30:
        ax_loss.set_yscale("log")
    ax_loss.set(title="Loss per epoch", xlabel="epoch", ylabel="loss (mean cross-entropy per image, nats)")
    ax_acc.set(title="Accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles = [Line2D([], [], color=colors[s.label], lw=6, alpha=0.6 if s in drawn else 0.15,
                      label=f"{s.label} ({_plural(len(s.ok), 'seed')})" if s in drawn
                      else f"{s.label} (no finished run)") for s in c.settings]
    handles += [Line2D([], [], color="black", ls="-", label="train"),
                Line2D([], [], color="black", ls="--", label="validation")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False)
    band = "line: mean over seeds; band: min to max over seeds" if max(len(s.ok) for s in drawn) > 1 \
        else "one seed per setting"
    fig.suptitle(f"{c.name}: learning curves ({band})")
    fig.savefig(path)
    left_out = [s.label for s in c.settings if s not in drawn]
    caption = ("Training and validation loss and accuracy per epoch of the runs that finished; the legend "
               "gives the number of seeds.")
    return caption + (f" Not drawn (no finished run): {', '.join(left_out)}." if left_out else "")


def roc_figure(c: Comparison, path: Path) -> str | None:
    """ROC curves on the test set: each seed thin, the mean TPR over seeds at each FPR bold."""
    from cxr.metrics import roc_curve_points

    drawn = [s for s in c.settings if any(r.get("predictions") for r in s.ok)]
    if not drawn or not c.test_set or min(c.test_set["normal"], c.test_set["pneumonia"]) == 0:
        return None
    fig = _figure(6, 6)
    ax = fig.subplots()
    grid = np.linspace(0, 1, 1001)
    colors = _colors(c)
    lines = []  # (fpr, tpr, color, lw, alpha), drawn again in the zoomed inset
    for s in drawn:
        tprs = []
        for r in s.ok:
            if not r.get("predictions"):
                continue
            p = roc_curve_points(r["predictions"]["y_true"], r["predictions"]["y_score"])
            lines.append((p["fpr"], p["tpr"], colors[s.label], 0.8, 0.35))
            ax.plot(*lines[-1][:2], color=colors[s.label], lw=0.8, alpha=0.35)
            tprs.append(np.interp(grid, p["fpr"], p["tpr"]))
        mean = np.mean(tprs, 0)
        mean[0] = 0.0
        lines.append((grid, mean, colors[s.label], 2.2, 1.0))
        auroc = num(s.auroc["mean"]) if s.auroc["std"] is None else num_ms(s.auroc)
        ax.plot(grid, mean, color=colors[s.label], lw=2.2,
                label=f"{s.label}: AUROC {auroc} ({_plural(len(tprs), 'seed')})")
    if all((s.auroc["mean"] or 0) >= 0.9 for s in drawn):
        # Good classifiers hug the top-left corner, where they differ: show it magnified.
        inset = ax.inset_axes([0.3, 0.3, 0.48, 0.42])
        for fpr, tpr, color, lw, alpha in lines:
            inset.plot(fpr, tpr, color=color, lw=lw, alpha=alpha)
        inset.set(xlim=(0, 0.2), ylim=(0.8, 1.0), title="zoom: FPR 0-0.2, TPR 0.8-1",
                  xticks=[0, 0.05, 0.1, 0.15, 0.2], yticks=[0.8, 0.85, 0.9, 0.95, 1.0])
        inset.title.set_fontsize(8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
    for s in c.settings:
        if s not in drawn:
            ax.plot([], [], color=colors[s.label], alpha=0.15, lw=2.2, label=f"{s.label}: no finished run")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal",
           title=f"{c.name}: ROC on the test set ({c.test_set['n']} images)",
           xlabel="false positive rate (1 − specificity)", ylabel="true positive rate (sensitivity)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.savefig(path)
    return ("ROC curves on the test set: thin lines are single seeds, bold lines their mean true positive "
            "rate at each false positive rate; AUROC as mean ± std over seeds.")


def _tick(sweep: tuple, s: Setting) -> str:
    """The x tick of a setting: its value for one key, one line per key for several, else the run id."""
    if len(sweep) == 1:
        return value_text(sweep[0], s.values[0])
    lines = [f"{KEY_NAMES.get(k, k)} {value_text(k, v)}" for k, v in zip(sweep, s.values, strict=True)]
    return "\n".join(lines) or s.label


def _n_runs(s: Setting) -> str:
    return f"n = {len(s.ok)}" if len(s.ok) == len(s.runs) else f"n = {len(s.ok)} of {len(s.runs)}"


def accuracy_figure(c: Comparison, path: Path) -> str | None:
    """Test accuracy per setting: seeds as dots, mean ± std as error bars, numeric keys on their scale."""
    if len(c.settings) < 2 or not any(s.ok for s in c.settings):
        return None
    fig = _figure(max(6.4, 1.4 * len(c.settings)), 4.4)
    ax = fig.subplots()
    key = c.sweep[0] if len(c.sweep) == 1 else None
    values = [s.values[0] for s in c.settings]
    numeric = key is not None and all(isinstance(v, (int, float)) and v > 0 for v in values)
    xs = values if numeric else list(range(len(values)))
    ratio = max(values) / min(values) if numeric else 1
    if ratio >= 4:
        ax.set_xscale("log", base=10 if ratio >= 50 else 2)
    xs_ok, means, stds = [], [], []
    for x, s in zip(xs, c.settings, strict=True):
        acc = [100 * _test(r, "accuracy") for r in s.ok]
        if not acc:
            continue
        ax.plot([x] * len(acc), acc, "o", color="grey", ms=4, alpha=0.6, zorder=2)
        xs_ok.append(x)
        means.append(100 * s.accuracy["mean"])
        stds.append(0 if s.accuracy["std"] is None else 100 * s.accuracy["std"])
    ax.errorbar(xs_ok, means, yerr=stds, fmt="o-" if numeric else "o", color="tab:blue", capsize=5, lw=1.5,
                ms=7, zorder=3, label="mean ± std over seeds")
    ax.plot([], [], "o", color="grey", ms=4, alpha=0.6, label="single seed")
    if c.test_set:
        majority = 100 * max(c.test_set["normal"], c.test_set["pneumonia"]) / c.test_set["n"]
        ax.axhline(majority, ls=":", color="firebrick", lw=1.2,
                   label=f"always the majority class ({majority:.1f}%)")
    for x, s in zip(xs, c.settings, strict=True):
        if not s.ok:
            ax.annotate(f"{s.label}:\nno finished run", (x, 0.06), xycoords=("data", "axes fraction"),
                        ha="center", va="bottom", fontsize=8, color="firebrick")
            ax.plot([x], [0.03], "x", color="firebrick", ms=8, transform=ax.get_xaxis_transform())
    ax.set_xticks(xs, [f"{_tick(c.sweep, s)}\n{_n_runs(s)}" for s in c.settings])
    if numeric:
        ax.minorticks_off()
        ax.set_xmargin(0.15)
    else:
        ax.set_xlim(-0.6, len(xs) - 0.4)
    name = KEY_NAMES.get(key, key) if key else "setting"
    xlabel = name + (" (log scale)" if ax.get_xscale() == "log" else "")
    ax.set(title=f"{c.name}: test accuracy by {name}", xlabel=xlabel, ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return f"Test accuracy by {name}: grey dots are single seeds, blue marks the mean with ± 1 std error " \
           "bars; n is the number of finished runs (of all runs) per setting."


FIGURES = (("curves", curves_figure), ("roc", roc_figure), ("accuracy", accuracy_figure))
FIGURE_NAMES = {"curves": "learning curves", "roc": "ROC curves", "accuracy": "test accuracy by setting"}


# ------------------------------------------------------------------------------- render

def environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(templates_dir())), undefined=StrictUndefined,
                      autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(FILTERS)
    return env


def run_rows(comps: list[Comparison]) -> list[dict]:
    """One row per run for the "All runs" table, in the order of the comparisons and settings."""
    rows = []
    for r in (r for c in comps for s in c.settings for r in s.runs):
        note = r.get("error") or (f"same recipe as `{r['reused_from']}`: its result reused"
                                  if r.get("reused_from") else "")
        best = r.get("best_epoch")
        rows.append({"id": r["id"], "seed": r["seed"], "status": r["status"], "note": note,
                     "accuracy": _test(r, "accuracy"), "auroc": _test(r, "auroc"),
                     "best_epoch": "n/a" if best is None else f"{best} of {r['spec']['epochs']}",
                     "train_seconds": _timing(r, "train_seconds")})
    return rows


def context(results: list[dict], benchmark_json: str | Path | None = None) -> dict:
    """Everything the template shows, without figures."""
    comps = comparisons(results)
    tasks = [{"title": t.title, "sweep": t.sweep, "spec": t.spec,
              "comparisons": [c for c in comps if c.sweep == t.sweep]} for t in TASKS]
    others = [c for c in comps if _task_of(c.sweep) is None]
    info = run_info(results)
    return {
        "n_results": len(results), "info": info["rows"], "datasets": info["datasets"],
        "synthetic": [d for d in info["datasets"] if d["synthetic"]],
        "tasks": tasks, "others": others, "runs": run_rows(comps),
        "benchmarks": benchmarks(benchmark_json) if benchmark_json else None,
        "n_boot": N_BOOT, "boot_seed": BOOT_SEED,
    }


def render(results_dir: str | Path = "results", out: str | Path | None = None,
           benchmark_json: str | Path | None = None, *, figures: bool = True) -> Path:
    """Write the report of every run under results_dir/runs to `out` (default results_dir/report.md),
    its figures to <out dir>/figures/*.png; returns the report's path."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"{results_dir}: no such results directory")
    out = Path(out) if out is not None else results_dir / "report.md"
    ctx = context(results_mod.load_all(results_dir), benchmark_json)
    if figures:
        fig_dir = out.parent / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        for c in [c for t in ctx["tasks"] for c in t["comparisons"]] + ctx["others"]:
            for kind, draw in FIGURES:
                path = fig_dir / f"{c.slug}-{kind}.png"
                caption = draw(c, path)
                if caption:
                    c.figures.append({"path": f"figures/{path.name}", "caption": caption,
                                      "alt": f"{c.name}: {FIGURE_NAMES[kind]}"})
    text = environment().get_template("report.md.j2").render(**ctx)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
