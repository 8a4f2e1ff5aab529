"""The Markdown report: tables, paired tests, figures and analysis sentences from stored results.

`render(results_dir)` reads every results/runs/<id>/seed-<n>.json (cxr.results.read: RunRecord
objects; a file that is not a readable record, or a record the report cannot use, is listed under
"Skipped files" with its reason), groups the runs into comparisons (all runs sharing spec.name and
spec.sweep; a setting is one value of the swept key(s) and one recipe, data content and training
version: different ones are never averaged), computes the statistics (cxr.stats), draws the figures
(matplotlib, PNG) into <out dir>/figures and renders templates/report.md.j2 (Jinja2, StrictUndefined);
report and figures are replaced atomically.

    format     how numbers, intervals, p-values and swept values read; the Jinja filters
    prose      the analysis sentences, each built under a condition that makes it true
    model      Setting, Pair, Comparison (immutable) and how runs are grouped and tested
    decision   each run's decision rule and TTA as a line, the argmax accuracy beside the rule's, balanced
               accuracy, and the seed ensemble (the mean probability of a setting's seeds)
    figures    FIGURE_KINDS, the one table of figures: file suffix, alt text, draw function
    info       the "What was run" rows and the "All runs" table
    timings    pytest-benchmark JSON as tables
    files      reading the result files (skipping unreadable ones and records the report cannot use:
               why_unusable), atomic writes with the user's mode
    template   the Jinja environment, the context, the sections, render()
    history    the section of `--history` (a cxr.history file): each setting across commits, flagged points

The report knows no course: section headings are the spec files' titles (spec.title) and the grid
it expects is the spec file's (spec.grid).
"""

from cxr.report.decision import argmax_accuracy, decision_text, ensemble, is_plain
from cxr.report.figures import FIGURE_KINDS, FigureKind, accuracy_figure, curves_figure, roc_figure, with_figures
from cxr.report.files import draw_atomically, load, skipped_line, why_unusable, write_text
from cxr.report.format import (
    FILTERS,
    KEY_NAMES,
    capfirst,
    cell,
    duration,
    fmt_seeds,
    key_name,
    num,
    num_ci,
    num_ms,
    p_text,
    pct,
    pct_ci,
    pct_ms,
    plural,
    pt,
    pts,
    pval,
    rate,
    secs,
    setting_label,
    short_source,
    value_text,
)
from cxr.report.info import _training, run_info, run_rows
from cxr.report.model import (
    BOOT_SEED,
    N_BOOT,
    UNIT,
    Comparison,
    Figure,
    Pair,
    ReportError,
    Setting,
    comparison,
    comparisons,
)
from cxr.report.prose import (
    ALPHA,
    GAP,
    analysis_sentences,
    balance_sentences,
    baseline_sentences,
    best_sentences,
    grid_text,
    mcnemar_sentence,
    missing_sentences,
    pair_sentence,
    status_sentences,
    trend_sentence,
    variant_sentences,
)
from cxr.report.template import Expected, Section, context, environment, expected, render, sections, templates_dir
from cxr.report.timings import benchmarks

__all__ = [
    # rendering
    "render", "context", "environment", "templates_dir", "sections", "expected", "Section", "Expected",
    "ReportError",
    # data model
    "Setting", "Pair", "Comparison", "Figure", "comparison", "comparisons", "N_BOOT", "BOOT_SEED", "UNIT",
    # formatting (the Jinja filters)
    "FILTERS", "KEY_NAMES", "pct", "num", "pct_ms", "pct_ci", "num_ms", "num_ci", "pval", "p_text", "pts",
    "pt", "secs", "rate", "duration", "capfirst", "cell", "plural", "fmt_seeds", "key_name", "value_text",
    "setting_label", "short_source",
    # sentences
    "ALPHA", "pair_sentence", "mcnemar_sentence", "best_sentences", "trend_sentence", "baseline_sentences",
    "status_sentences", "missing_sentences", "analysis_sentences", "grid_text", "variant_sentences",
    "GAP", "balance_sentences",
    # decisions
    "decision_text", "is_plain", "argmax_accuracy", "ensemble",
    # figures
    "FigureKind", "FIGURE_KINDS", "with_figures", "curves_figure", "roc_figure", "accuracy_figure",
    # what was run, timings
    "run_info", "run_rows", "_training", "benchmarks",
    # files
    "load", "why_unusable", "skipped_line", "write_text", "draw_atomically",
]
