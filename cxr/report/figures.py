"""The report's figures (matplotlib, PNG), one table of kinds: `FIGURE_KINDS`.

Each kind draws one figure of a comparison into <report dir>/figures/<slug>-<kind>.png and returns its
caption, or None when the comparison has nothing to show in it. It draws to a temp file that replaces
the figure once complete (cxr.report.files.draw_atomically). Adding a figure is one entry in
FIGURE_KINDS: its file suffix, its alt text and its draw function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.report.files import draw_atomically
from cxr.report.format import key_name, num, num_ms, plural, value_text
from cxr.report.model import Comparison, Figure, Setting


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # object API: no pyplot state, Agg canvas on savefig

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _colors(c: Comparison) -> dict:
    """One colour per setting label, the same in every figure of the comparison."""
    from matplotlib import colormaps

    return {s.label: colormaps["tab10"](i % 10) for i, s in enumerate(c.settings)}


def curves_figure(c: Comparison, path: Path) -> str | None:
    """Train and validation loss and accuracy per epoch: mean of the ok runs, band = min to max."""
    drawn = [s for s in c.settings if s.ok and all(r.history for r in s.ok)]
    if not drawn:
        return None
    from matplotlib.lines import Line2D

    fig = _figure(11, 4.6)
    ax_loss, ax_acc = fig.subplots(1, 2)
    loss_values = []
    colors = _colors(c)
    for s in drawn:
        color = colors[s.label]
        length = min(len(r.history) for r in s.ok)
        epochs = [row["epoch"] for row in s.ok[0].history[:length]]
        panels = (("train_loss", ax_loss, "-", 1), ("val_loss", ax_loss, "--", 1),
                  ("train_accuracy", ax_acc, "-", 100), ("val_accuracy", ax_acc, "--", 100))
        for key, ax, style, scale in panels:
            v = np.array([[np.nan if row.get(key) is None else row[key] * scale
                           for row in r.history[:length]] for r in s.ok], dtype=float)
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
                      label=f"{s.label} ({plural(len(s.ok), 'seed')})" if s in drawn
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

    drawn = [s for s in c.settings if any(r.predictions for r in s.ok)]
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
            if not r.predictions:
                continue
            p = roc_curve_points(r.predictions["y_true"], r.predictions["y_score"])
            lines.append((p["fpr"], p["tpr"], colors[s.label], 0.8, 0.35))
            ax.plot(*lines[-1][:2], color=colors[s.label], lw=0.8, alpha=0.35)
            tprs.append(np.interp(grid, p["fpr"], p["tpr"]))
        mean = np.mean(tprs, 0)
        mean[0] = 0.0
        lines.append((grid, mean, colors[s.label], 2.2, 1.0))
        auroc = num(s.auroc["mean"]) if s.auroc["std"] is None else num_ms(s.auroc)
        ax.plot(grid, mean, color=colors[s.label], lw=2.2,
                label=f"{s.label}: AUROC {auroc} ({plural(len(tprs), 'seed')})")
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
    note = f"\n[{s.note}]" if s.note else ""
    if len(sweep) == 1:
        return value_text(sweep[0], s.values[0]) + note
    lines = [f"{key_name(k)} {value_text(k, v)}" for k, v in zip(sweep, s.values, strict=True)]
    return "\n".join(lines) + note if lines else s.label


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
    numeric = key is not None and all(isinstance(v, (int, float)) and v > 0 for v in values) \
        and len(set(values)) == len(values)  # a value with several variants: one position per setting
    xs = values if numeric else list(range(len(values)))
    ratio = max(values) / min(values) if numeric else 1
    if ratio >= 4:
        ax.set_xscale("log", base=10 if ratio >= 50 else 2)
    xs_ok, means, stds = [], [], []
    for x, s in zip(xs, c.settings, strict=True):
        acc = [100 * r.test("accuracy") for r in s.ok]
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
    name = key_name(key) if key else "setting"
    xlabel = name + (" (log scale)" if ax.get_xscale() == "log" else "")
    ax.set(title=f"{c.name}: test accuracy by {name}", xlabel=xlabel, ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return f"Test accuracy by {name}: grey dots are single seeds, blue marks the mean with ± 1 std error " \
           "bars; n is the number of finished runs (of all runs) per setting."


@dataclass(frozen=True)
class FigureKind:
    kind: str  # the file suffix: figures/<slug>-<kind>.png
    alt: str  # the image's alt text after the comparison's name
    draw: Callable[[Comparison, Path], str | None]  # draws to the path, returns the caption or None


FIGURE_KINDS = (
    FigureKind("curves", "learning curves", curves_figure),
    FigureKind("roc", "ROC curves", roc_figure),
    FigureKind("accuracy", "test accuracy by setting", accuracy_figure),
)


def with_figures(c: Comparison, fig_dir: Path) -> Comparison:
    """The comparison with its figures, drawn into fig_dir (a new Comparison; c is unchanged)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for kind in FIGURE_KINDS:
        path = fig_dir / f"{c.slug}-{kind.kind}.png"
        caption = draw_atomically(path, lambda tmp, kind=kind: kind.draw(c, tmp))
        if caption:
            figures.append(Figure(path=f"figures/{path.name}", caption=caption, alt=f"{c.name}: {kind.alt}"))
    return dataclasses.replace(c, figures=tuple(figures))
