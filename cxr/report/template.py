"""Rendering: results directory -> context -> templates/report.md.j2 (Jinja2, StrictUndefined) -> report.md.

A result file that cannot be read, or a record the report cannot use (cxr.report.files.why_unusable), is
listed under "Skipped files", not fatal; report.md and the figures are written atomically
(cxr.report.files), so a failed render leaves the previous ones.

The report knows nothing about any course or task list: a comparison's section is the title its runs'
spec file gave them (spec.title), and what was meant to run is the spec file's grid (spec.grid) and
the spec files passed as `specs`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cxr import spec as spec_mod
from cxr.record import RunRecord
from cxr.report.figures import with_figures
from cxr.report.files import load, write_text
from cxr.report.format import FILTERS
from cxr.report.history import section as history_section
from cxr.report.info import run_info, run_rows
from cxr.report.model import BOOT_SEED, N_BOOT, Comparison, ReportError, comparisons
from cxr.report.robustness import scores as robustness_scores
from cxr.report.robustness import section as robustness_section
from cxr.report.timings import benchmarks


def templates_dir() -> Path:
    """templates/ of the source tree, or cxr/templates when an installed package ships it there."""
    package = Path(__file__).resolve().parents[1]  # cxr/
    for candidate in (package.parent / "templates", package / "templates"):
        if (candidate / "report.md.j2").is_file():
            return candidate
    raise ReportError(f"{package.parent / 'templates'}: report.md.j2 not found (nor in {package / 'templates'})")


def environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(templates_dir())), undefined=StrictUndefined,
                      autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(FILTERS)
    return env


@dataclass(frozen=True)
class Section:
    """The comparisons of one spec title, e.g. "Task A: BCE vs CE"."""

    title: str
    sweep: tuple  # the grid keys of the spec file that gives this title
    spec: str  # that spec file, relative to the current directory; "" when only results name the title
    comparisons: tuple[Comparison, ...]


@dataclass(frozen=True)
class Expected:
    """A titled spec file: its results are expected in the report, which says so when there are none."""

    title: str
    sweep: tuple
    spec: str


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the current directory, never absolute."""
    try:
        return Path(os.path.relpath(path)).as_posix()
    except ValueError:  # another drive
        return path.name


def expected(specs: Sequence[str | Path] | str | Path | None) -> list[Expected]:
    """The titled experiments of the spec files (files or directories, sorted as cxr.spec.spec_files does)."""
    if specs is None:
        return []
    if isinstance(specs, (str, Path)):
        specs = [specs]
    out = []
    for path in spec_mod.spec_files(list(specs)):
        first = spec_mod.load_file(path)[0]
        if first.title:
            out.append(Expected(first.title, first.sweep, _shown(path)))
    return out


def sections(comps: list[Comparison], wanted: list[Expected]) -> tuple[list[Section], list[Comparison]]:
    """(titled sections, untitled comparisons): the spec files' titles in their order, each with its
    comparisons (or none: not run), then titles only the results name, by title."""
    by_title: dict[str, list[Comparison]] = {}
    for c in comps:
        if c.section:
            by_title.setdefault(c.section, []).append(c)
    out, seen = [], set()
    for e in wanted:
        if e.title not in seen:
            seen.add(e.title)
            out.append(Section(e.title, e.sweep, e.spec, tuple(by_title.get(e.title, ()))))
    for title in sorted(set(by_title) - seen):
        out.append(Section(title, by_title[title][0].sweep, "", tuple(by_title[title])))
    return out, [c for c in comps if not c.section]


def context(results: list[RunRecord], benchmark_json: str | Path | None = None, *,
            specs: Sequence[str | Path] | None = None, fig_dir: Path | None = None,
            skipped: Sequence[str] = (), history: str | Path | None = None,
            results_dir: str | Path | None = None) -> dict:
    """Everything the template shows; with fig_dir, the comparisons' figures drawn there. skipped: one
    line per result file that could not be read ("`runs/<id>/seed-<n>.json`: <problem>"). history: a
    history.jsonl (cxr.history) whose section is added (cxr.report.history). results_dir: where the records
    are, for their robustness scores (cxr.report.robustness; a comparison with scores gets that section)."""
    bench = benchmarks(benchmark_json) if benchmark_json else None
    past = history_section(history, fig_dir) if history is not None else None
    wanted = expected(specs)
    comps = comparisons(results)
    if fig_dir is not None:
        fig_dir.mkdir(parents=True, exist_ok=True)
        comps = [with_figures(c, fig_dir) for c in comps]
    titled, others = sections(comps, wanted)
    scored = robustness_scores(results_dir, results) if results_dir is not None else {}
    shift = {c.slug: sec for c in comps if scored and (sec := robustness_section(c, scored, fig_dir))}
    info = run_info(results)
    return {
        "n_results": len(results), "info": info["rows"], "datasets": info["datasets"],
        "synthetic": [d for d in info["datasets"] if d["synthetic"]],
        "sections": titled, "others": others,
        "runs": run_rows([c for s in titled for c in s.comparisons] + others),
        "benchmarks": bench, "n_boot": N_BOOT, "boot_seed": BOOT_SEED, "skipped": list(skipped),
        "history": past, "robustness": shift,
    }


def render(results_dir: str | Path = "results", out: str | Path | None = None,
           benchmark_json: str | Path | None = None, *, figures: bool = True,
           specs: Sequence[str | Path] | None = None, history: str | Path | None = None) -> Path:
    """Write the report of every run under results_dir/runs to `out` (default results_dir/report.md),
    its figures to <out dir>/figures/*.png; returns the report's path. Each file is replaced whole
    (temp file, then rename) with the permissions of a plain open(path, "w"): a render that fails midway
    (a full disk) leaves the previous report, never a truncated one. A result file that is not a
    readable run record, or a record the report cannot use, is left out and listed under "Skipped files"
    with its reason.

    specs: spec files or directories whose titled experiments are expected: one with no results is
    listed as not run. None: expect nothing beyond what the results show. A spec file that cannot be
    read raises cxr.spec.SpecError (a CxrError naming the file). history: a history file (cxr-bench history)
    whose section, one figure per setting across commits, is added; one that cannot be read raises
    cxr.history.HistoryError.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"{results_dir}: no such results directory")
    out = Path(out) if out is not None else results_dir / "report.md"
    records, skipped = load(results_dir)
    ctx = context(records, benchmark_json, specs=specs, fig_dir=out.parent / "figures" if figures else None,
                  skipped=skipped, history=history, results_dir=results_dir)
    write_text(out, environment().get_template("report.md.j2").render(**ctx))
    return out
