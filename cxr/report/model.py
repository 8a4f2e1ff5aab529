"""The report's data model: runs grouped into comparisons and settings, with their paired tests.

A comparison is every run sharing spec.name and spec.sweep; a setting is one value of the swept
key(s) (without a sweep, one run id) and one variant: the recipe without the seed (spec.setting_hash),
the data's content (data_fingerprint) and the training code's version. Runs that differ in any of
these are never averaged: one swept value with several variants gives several settings, each label
naming how it differs ("learning rate 0.01 [epochs 1]"). Runs are paired only when their test split
is the same: equal test fingerprints (and labels); records without fingerprints (schema version 1)
are compared by their labels only. Only runs with status "ok" enter means, intervals and tests;
diverged and failed runs are counted and listed. Every object here is immutable: frozen dataclasses
holding tuples and read-only mappings, built once by `comparison`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from cxr import spec as spec_mod
from cxr import stats
from cxr.errors import CxrError
from cxr.record import DIVERGED, FAILED, OK, RunRecord
from cxr.report import decision as decision_mod
from cxr.report.format import key_name, plural, setting_label, short_source, value_text
from cxr.report.prose import analysis_sentences, mcnemar_sentence, missing_sentences, pair_sentence

N_BOOT = 2000  # paired bootstrap resamples
BOOT_SEED = 0  # numpy Generator seed of the bootstrap, so a report is reproducible
UNIT = (0.0, 1.0)  # fractions: t intervals are clipped to it


class ReportError(CxrError):
    """Input the report cannot use; the message is one line naming the file."""


def _freeze(obj, mappings: tuple[str, ...] = (), sequences: tuple[str, ...] = ()) -> None:
    """In __post_init__: dict fields become read-only mappings, sequence fields tuples."""
    for name in mappings:
        value = getattr(obj, name)
        if value is not None and not isinstance(value, MappingProxyType):
            object.__setattr__(obj, name, MappingProxyType(dict(value)))
    for name in sequences:
        object.__setattr__(obj, name, tuple(getattr(obj, name)))


@dataclass(frozen=True)
class Figure:
    path: str  # relative to the report, e.g. "figures/lr-curves.png"
    caption: str
    alt: str


@dataclass(frozen=True, eq=False)  # compared by identity: settings hold many runs
class Setting:
    values: tuple
    label: str
    runs: tuple[RunRecord, ...]  # every run of this setting, by seed
    ok: tuple[RunRecord, ...]  # the runs with status "ok"
    accuracy: dict  # mean_std_ci summaries over the ok runs (read-only)
    auroc: dict
    sensitivity: dict
    specificity: dict
    train_loss: dict  # final epoch
    train_seconds: dict
    images_per_second: dict
    best_epochs: str  # per seed, e.g. "7, 9, 8 of 10"
    n_diverged: int
    n_failed: int
    note: str = ""  # how it differs from the other settings of its swept value, e.g. "epochs 1"; "" if none
    balanced_accuracy: dict = dataclasses.field(default_factory=lambda: stats.mean_std_ci([]))  # n/a in v1 files
    argmax_accuracy: dict = dataclasses.field(default_factory=lambda: stats.mean_std_ci([]))  # plain argmax, no TTA
    decision: str = ""  # cxr.report.decision.decision_text of its runs, e.g. "argmax (the course's rule); no TTA"
    plain: bool = True  # every run decided by the plain argmax without TTA: accuracy is the argmax accuracy
    ensemble: dict | None = None  # cxr.report.decision.ensemble: the seeds' mean probability, 2+ finished seeds

    def __post_init__(self):
        _freeze(self, ("accuracy", "auroc", "sensitivity", "specificity", "train_loss", "train_seconds",
                       "images_per_second", "balanced_accuracy", "argmax_accuracy", "ensemble"),
                ("values", "runs", "ok"))

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(r.seed for r in self.runs)

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
    boot: dict  # stats.paired_bootstrap of accuracy(a) - accuracy(b) (read-only)
    p_adjusted: float  # Holm over the pairs of the comparison (= boot p with one pair)
    mcnemar: tuple  # ({"seed", "b", "c", "p_value"}, ...)
    sentences: tuple

    def __post_init__(self):
        _freeze(self, ("boot",), ("seeds", "sentences"))
        object.__setattr__(self, "mcnemar", tuple(MappingProxyType(dict(m)) for m in self.mcnemar))


@dataclass(frozen=True)
class Comparison:
    name: str
    sweep: tuple
    section: str  # the spec file's title, e.g. "Task A: BCE vs CE"; "" for runs without one
    grid: tuple  # the spec file's [grid] as ((key, (values...)), ...): what was meant to run
    slug: str
    title: str
    sources: str
    settings: tuple[Setting, ...]
    test_set: dict | None  # {"n", "normal", "pneumonia", "fingerprinted"} shared by every ok run, or None;
    #                        fingerprinted: the same images (test fingerprints equal), else the same labels
    pairs: tuple[Pair, ...]
    pair_scheme: str  # how pairs were chosen, or why there is no test
    not_ok: tuple[RunRecord, ...]  # runs that diverged or failed
    missing: tuple[str, ...]  # sentences: settings or seeds not run
    sentences: tuple[str, ...]  # analysis
    figures: tuple[Figure, ...] = ()  # drawn by cxr.report.figures.with_figures, which returns a new one
    decisions: tuple[tuple[str, str], ...] = ()  # (("", text),) when every setting decided alike, else (label, text)

    def __post_init__(self):
        _freeze(self, ("test_set",), ("sweep", "settings", "pairs", "not_ok", "missing", "sentences", "figures"))
        object.__setattr__(self, "grid", tuple((k, tuple(v)) for k, v in self.grid))
        object.__setattr__(self, "decisions", tuple((label, text) for label, text in self.decisions))

    @property
    def shows_argmax(self) -> bool:
        """Whether a setting decided otherwise than the plain argmax: the table then shows the argmax accuracy."""
        return not all(s.plain for s in self.settings)

    @property
    def n_runs(self) -> int:
        return sum(len(s.runs) for s in self.settings)

    @property
    def fused(self) -> bool:
        """Whether a finished run of these settings trained in a fused group (its train time is a share)."""
        return any(r.group_size > 1 for s in self.settings for r in s.ok)

    @property
    def runs_text(self) -> str:
        return _status_counts(sum(len(s.ok) for s in self.settings), sum(s.n_diverged for s in self.settings),
                              sum(s.n_failed for s in self.settings))


# ------------------------------------------------------------------------------ building

def _setting(sweep: tuple, values: tuple, runs: list[RunRecord], note: str = "") -> Setting:
    runs = sorted(runs, key=lambda r: r.seed)
    ok = tuple(r for r in runs if r.status == OK)
    epochs = sorted({r.spec["epochs"] for r in ok})
    best = ", ".join(str(r.best_epoch) for r in ok)
    best_epochs = f"{best} of {'/'.join(map(str, epochs))}" if ok else "n/a"
    return Setting(
        values=values, label=setting_label(sweep, values) + (f" [{note}]" if note else ""), note=note,
        runs=tuple(runs), ok=ok,
        accuracy=stats.mean_std_ci([r.test("accuracy") for r in ok], bounds=UNIT),
        auroc=stats.mean_std_ci([r.test("auroc") for r in ok], bounds=UNIT),
        sensitivity=stats.mean_std_ci([r.test("sensitivity") for r in ok], bounds=UNIT),
        specificity=stats.mean_std_ci([r.test("specificity") for r in ok], bounds=UNIT),
        train_loss=stats.mean_std_ci([r.final("train_loss") for r in ok]),
        train_seconds=stats.mean_std_ci([r.own_train_seconds() for r in ok]),
        images_per_second=stats.mean_std_ci([r.own_images_per_second() for r in ok]),
        best_epochs=best_epochs,
        n_diverged=sum(r.status == DIVERGED for r in runs),
        n_failed=sum(r.status == FAILED for r in runs),
        **decision_mod.summaries(ok), decision=decision_mod.setting_decision(runs),
        plain=all(decision_mod.is_plain(r) for r in runs), ensemble=decision_mod.ensemble(ok),
    )


def _variant(r: RunRecord) -> tuple:
    """What the runs averaged into one row share besides the swept values: (the recipe without the seed,
    the data's content as sorted (split, hash) pairs or None (not fingerprinted), the training version)."""
    fp = r.data_fingerprint
    return spec_mod.from_dict(r.spec).setting_hash(), tuple(sorted(fp.items())) if fp else None, r.training_version


def _order(v) -> tuple:
    return (isinstance(v, str), v)


def _notes(variants: dict[tuple, list[RunRecord]]) -> dict[tuple, tuple[tuple, str]]:
    """How each variant of one swept value differs from the others: {variant: (sort key, note)}, the note
    naming the spec keys whose values differ ("epochs 1"), the data ("data 1a2b3c4d": the test split's
    fingerprint) and the training version, where they differ."""
    specs = {v: spec_mod.from_dict(runs[0].spec) for v, runs in variants.items()}
    recipe_keys = set().union(*(s.recipe() for s in specs.values())) - {"seed"}
    keys = [f.name for f in dataclasses.fields(spec_mod.ExperimentSpec) if f.name in recipe_keys
            and len({repr(getattr(s, f.name)) for s in specs.values()}) > 1]
    parts = {v: [f"{key_name(k)} {_key_text(k, getattr(specs[v], k))}" for k in keys] for v in variants}
    order = {v: [_order(getattr(specs[v], k)) for k in keys] for v in variants}
    fps = {v: dict(v[1]) if v[1] else {} for v in variants}
    if len({v[1] for v in variants}) > 1:
        splits = ["test"] if len({fp.get("test") for fp in fps.values()}) > 1 else \
            [s for s in ("train", "val") if len({fp.get(s) for fp in fps.values()}) > 1]
        for v in variants:
            for split in splits:
                name = "data" if split == "test" else f"{split} data"
                parts[v].append(f"{name} {fps[v][split][:8]}" if split in fps[v] else f"{name} not fingerprinted")
                order[v].append(_order(fps[v].get(split, "")))
    if len({v[2] for v in variants}) > 1:
        for v in variants:
            parts[v].append(f"training version {'unknown' if v[2] is None else v[2]}")
            order[v].append(_order(-1 if v[2] is None else v[2]))
    notes = {v: ", ".join(parts[v]) for v in variants}
    for v in variants:  # spec values that read the same (floats beyond %g): the recipe's hash tells them apart
        if list(notes.values()).count(notes[v]) > 1:
            parts[v].append(f"recipe {v[0][:8]}")
    return {v: ((*order[v], v[0]), ", ".join(parts[v])) for v in variants}


def _key_text(key: str, v) -> str:
    return short_source(v) if key == "dataset" else value_text(key, v)


def _test_set(settings) -> tuple[dict | None, np.ndarray | None, str]:
    """The test split shared by every ok run with predictions, or (None, None, why not): the same images
    when the runs' test fingerprints are equal (and their y_true too); runs without a fingerprint (schema
    version 1) are compared by y_true only, and then "fingerprinted" is False."""
    runs = [r for s in settings for r in s.ok if r.predictions]
    if not runs:
        return None, None, "no finished run with stored test predictions"
    prints: dict[str, list[str]] = {}
    for s in settings:
        for fp in dict.fromkeys(r.data_fingerprint["test"] for r in s.ok if r.predictions and r.data_fingerprint):
            prints.setdefault(fp, []).append(s.label)
    if len(prints) > 1:
        listing = ", ".join(f"{fp[:8]} for {' and '.join(labels)}" for fp, labels in prints.items())
        return None, None, f"not paired: different test sets (test split fingerprint {listing})"
    ys = [r.predictions["y_true"] for r in runs]
    if any(y != ys[0] for y in ys[1:]):
        return None, None, "the runs were not evaluated on the same test images (their y_true differ)"
    y = np.asarray(ys[0])
    return {"n": int(y.size), "normal": int(np.sum(y == 0)), "pneumonia": int(np.sum(y == 1)),
            "fingerprinted": all(r.data_fingerprint for r in runs)}, y, ""


def _pairs(settings, y_true, same_images: bool = True) -> tuple[list[Pair], str]:
    testable = [s for s in settings if any(r.predictions for r in s.ok)]
    if len(settings) < 2:
        return [], "one setting only, nothing to compare"
    if len(testable) < 2:
        return [], "fewer than two settings have finished runs with test predictions"
    best = max(testable, key=lambda s: s.accuracy["mean"])  # first of equals, in setting order
    others = [s for s in testable if s is not best]
    untested = [f"{s.label} (no finished run)" for s in settings if s not in testable]
    raw = []
    for other in others:
        by_seed_a = {r.seed: r for r in best.ok if r.predictions}
        by_seed_b = {r.seed: r for r in other.ok if r.predictions}
        seeds = sorted(set(by_seed_a) & set(by_seed_b))
        if not seeds:
            untested.append(f"{other.label} (no finished seed in common with {best.label})")
            continue
        pa = np.asarray([by_seed_a[s].predictions["y_pred"] for s in seeds])
        pb = np.asarray([by_seed_b[s].predictions["y_pred"] for s in seeds])
        boot = stats.paired_bootstrap(y_true, pa, pb, n_boot=N_BOOT, seed=BOOT_SEED)
        mc = tuple({"seed": s, **stats.mcnemar(y_true, pa[i], pb[i])} for i, s in enumerate(seeds))
        raw.append((other, seeds, boot, mc))
    if not raw:
        return [], "the settings share no seed with finished runs"
    if len(settings) == 2:
        scheme = "the two settings on the same test images" if same_images else \
            "the two settings on test sets with the same labels (test images not fingerprinted)"
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


def _slug(name: str, sweep: tuple) -> str:
    tail = "" if sweep == (name,) else "-" + ("-".join(sweep) or "single")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name + tail)


def _title(name: str, sweep: tuple, settings) -> str:
    """The comparison's own heading: "`loss`: BCE vs CE", "`lr`: learning rate 0.001 / 0.01", ..."""
    values = list(dict.fromkeys(s.values for s in settings))  # a value with several variants: named once
    if sweep == ("loss",):
        return f"`{name}`: {' vs '.join(setting_label(sweep, v) for v in values)}"
    if len(sweep) == 1:
        return f"`{name}`: {key_name(sweep[0])} {' / '.join(value_text(sweep[0], v[0]) for v in values)}"
    if sweep:
        return f"`{name}`: {' × '.join(map(key_name, sweep))}, {plural(len(settings), 'setting')}"
    return f"`{name}`: one experiment"


def _section(runs: list[RunRecord]) -> str:
    """The spec title most of the runs carry (records written before titles carry none: "")."""
    titles = Counter(r.spec.get("title") or "" for r in runs)
    titles.pop("", None)
    return min(titles, key=lambda t: (-titles[t], t)) if titles else ""


def _grid(runs: list[RunRecord]) -> tuple:
    """The spec file's grid from the runs' specs: every key's values, in the file's order, over all runs."""
    grid: dict[str, list] = {}
    for r in runs:
        for key, values in (r.spec.get("grid") or {}).items():
            seen = grid.setdefault(key, [])
            seen.extend(v for v in values if v not in seen)
    return tuple((k, tuple(v)) for k, v in grid.items())


def comparison(runs: list[RunRecord]) -> Comparison:
    """One comparison from the runs sharing (spec.name, spec.sweep)."""
    name, sweep = runs[0].spec["name"], tuple(runs[0].spec.get("sweep") or ())
    groups: dict[tuple, dict[tuple, list]] = {}  # swept values -> variant -> runs
    for r in runs:
        key = tuple(r.spec[k] for k in sweep) if sweep else (r.id,)
        groups.setdefault(key, {}).setdefault(_variant(r), []).append(r)
    settings = []
    for k in sorted(groups, key=lambda k: tuple(map(_order, k))):
        if len(groups[k]) == 1:
            settings.append(_setting(sweep, k, *groups[k].values()))
            continue
        notes = _notes(groups[k])
        settings += [_setting(sweep, k, groups[k][v], notes[v][1]) for v in sorted(notes, key=lambda v: notes[v][0])]
    settings = tuple(settings)
    test_set, y_true, why = _test_set(settings)
    pairs, scheme = _pairs(settings, y_true, test_set["fingerprinted"]) if y_true is not None else ([], why)
    grid = _grid(runs)
    return Comparison(
        name=name, sweep=sweep, section=_section(runs), grid=grid, slug=_slug(name, sweep),
        title=_title(name, sweep, settings),
        sources=", ".join(sorted({Path(r.spec.get("source") or "?").name for r in runs})),
        settings=settings, test_set=test_set, pairs=tuple(pairs), pair_scheme=scheme,
        not_ok=tuple(r for s in settings for r in s.runs if r.status != OK),
        missing=tuple(missing_sentences(sweep, dict(grid), settings)),
        sentences=tuple(_caveats(why if y_true is None else "") + analysis_sentences(sweep, settings, test_set)),
        decisions=decision_mod.comparison_decisions(settings),
    )


def _caveats(why_unpaired: str) -> list[str]:
    if why_unpaired.startswith("not paired: different test sets"):
        return ["The runs were evaluated on different test sets, so their test metrics below are not "
                "directly comparable: a difference may come from the images, not the setting."]
    return []


def comparisons(results: list[RunRecord]) -> list[Comparison]:
    """Group runs by (spec.name, spec.sweep), in that order."""
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r.spec["name"], tuple(r.spec.get("sweep") or ())), []).append(r)
    comps = [comparison(groups[k]) for k in sorted(groups)]
    slugs = [c.slug for c in comps]
    # Figure file names come from slugs: two comparisons whose names differ only in characters a slug
    # drops (e.g. non-ASCII letters of older result files) get a short hash each, never one file for both.
    return [c if slugs.count(c.slug) == 1 else
            dataclasses.replace(c, slug=f"{c.slug}-{hashlib.sha256(repr((c.name, c.sweep)).encode()).hexdigest()[:8]}")
            for c in comps]
