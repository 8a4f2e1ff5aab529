"""The report's history section (`cxr-bench report --history history.jsonl`): each setting across commits.

One figure per setting (ids holding the same runs at every snapshot share one): test accuracy and
training throughput per snapshot, the line the mean (throughput: the median) over seeds and the band the
seeds' min to max; a point `cxr-bench compare` would have flagged against the snapshot before it
(`cxr.history.flags`, the default gate) is marked: a red triangle down for a regression, green up for an
improvement.
"""

from __future__ import annotations

import re
from pathlib import Path

from cxr import gate as gate_mod
from cxr import history as history_mod
from cxr.report.files import draw_atomically
from cxr.report.model import Figure


def _short(commit: str) -> str:
    return commit[:12]


def _why(row: dict) -> str:
    """What the gate saw, e.g. "accuracy −4.01 points, throughput 0.60x"."""
    v, said = row["verdicts"], []
    for m in gate_mod.METRICS:
        if v[m] in (gate_mod.REGRESSION, gate_mod.IMPROVEMENT):
            d = row["metrics"][m]["diff"]
            said.append(f"{gate_mod.METRIC_NAMES[m]} {d:+.4f}" if m == "auroc" else
                        f"{gate_mod.METRIC_NAMES[m]} {100 * d:+.2f} points")
    if v["throughput"] in ("slower", "faster"):
        said.append(f"throughput {row['throughput']['ratio']:.2f}x")
    return ", ".join(said).replace("-", "−")


def _draw(setting: dict, path: Path) -> str | None:
    from matplotlib.figure import Figure as MplFigure  # object API: no pyplot state, Agg canvas on savefig

    points = [p for p in setting["points"] if p["n"]]
    if not points:
        return None
    fig = MplFigure(figsize=(max(6.4, 0.6 * len(setting["points"]) + 3), 5.6), dpi=120, layout="constrained")
    ax_acc, ax_ips = fig.subplots(2, 1, sharex=True)
    x = [p["index"] for p in points]
    panels = ((ax_acc, "accuracy", "mean", 100, "test accuracy (%)", "accuracy"),
              (ax_ips, "images_per_second", "median", 1, "training images/s", "throughput"))
    for ax, key, centre, scale, label, what in panels:
        mid = [p[key][centre] for p in points]
        if all(v is None for v in mid):
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="grey")
            continue
        xs = [xi for xi, v in zip(x, mid, strict=True) if v is not None]
        ax.plot(xs, [scale * v for v in mid if v is not None], "o-", color="tab:blue", lw=1.5, ms=5,
                label="mean over seeds" if centre == "mean" else "median over seeds")
        lows = [p[key]["min"] for p in points if p[key][centre] is not None]
        highs = [p[key]["max"] for p in points if p[key][centre] is not None]
        ax.fill_between(xs, [scale * v for v in lows], [scale * v for v in highs], color="tab:blue", alpha=0.15,
                        lw=0, label="seeds, min to max")
        for p in points:
            flag = p["flag"]
            if flag is None or p[key][centre] is None:
                continue
            hit = flag["verdicts"]["throughput"] in ("slower", "faster") if what == "throughput" else \
                any(flag["verdicts"][m] in (gate_mod.REGRESSION, gate_mod.IMPROVEMENT) for m in gate_mod.METRICS)
            if hit:
                down = flag["verdict"] == gate_mod.REGRESSION
                ax.plot([p["index"]], [scale * p[key][centre]], "v" if down else "^", ms=13, mfc="none", mew=2,
                        color="firebrick" if down else "forestgreen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_acc.plot([], [], "v", ms=10, mfc="none", mew=2, color="firebrick",
                label="flagged: regression vs the point before")
    ax_acc.plot([], [], "^", ms=10, mfc="none", mew=2, color="forestgreen", label="flagged: improvement")
    ax_acc.legend(fontsize=8, loc="best")
    ax_ips.set_xticks([p["index"] for p in setting["points"]], [_short(p["commit"]) for p in setting["points"]],
                      rotation=30, ha="right", fontsize=8)
    ax_ips.set_xlabel("commit (in the order the history holds them)")
    more = len(setting["ids"]) - 1
    fig.suptitle(f"{setting['ids'][0]}{f' (= {more} more ids)' if more else ''}: across commits")
    fig.savefig(path)
    return (f"{', '.join(setting['ids'])}: test accuracy (mean over seeds) and training throughput (median over "
            "seeds) per commit; the band spans the seeds (min to max). A red triangle down marks a point that "
            "`cxr-bench compare` would have flagged as a regression against the point before, a green one up an "
            "improvement.")


def _slug(ids: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", ids[0])


def section(path: str | Path, fig_dir: Path | None = None, gate: gate_mod.Gate = gate_mod.DEFAULT) -> dict:
    """The history section's context: {"file", "snapshots", "settings": [{"ids", "points", "flagged", "latest",
    "figure"}]}; with fig_dir, the figures drawn there as figures/history-<id>.png."""
    snaps = history_mod.snapshots(history_mod.read(path))
    flagged = history_mod.flags(snaps, gate)
    series: dict[str, list[dict]] = {}
    for k, snap in enumerate(snaps):
        for run_id, line in snap["lines"].items():
            row = flagged.get((k, run_id))
            series.setdefault(run_id, []).append({
                "index": k, "commit": line["commit"], "date": line["date"], "n": line["n"],
                "accuracy": line["accuracy"], "images_per_second": line["images_per_second"],
                "flag": row if row and row["verdict"] in (gate_mod.REGRESSION, gate_mod.IMPROVEMENT) else None,
                "identity": (line.get("predictions") or {}).get("y_pred"), "ips": line["images_per_second"]["by_seed"]})
    merged: dict[str, list[str]] = {}  # ids whose every point holds the same runs share one figure
    for run_id, points in series.items():
        merged.setdefault(repr([(p["index"], p["identity"], p["ips"]) for p in points]), []).append(run_id)
    settings = []
    for ids in merged.values():
        points = series[ids[0]]
        for p in points:
            p["why"] = _why(p["flag"]) if p["flag"] else ""
            p["regression"] = bool(p["flag"]) and p["flag"]["verdict"] == gate_mod.REGRESSION
        setting = {"ids": ids, "points": points, "latest": points[-1],
                   "flagged": [p for p in points if p["flag"]], "figure": None}
        if fig_dir is not None:
            fig = fig_dir / f"history-{_slug(ids)}.png"
            caption = draw_atomically(fig, lambda tmp, s=setting: _draw(s, tmp))
            if caption:
                setting["figure"] = Figure(path=f"figures/{fig.name}", caption=caption,
                                           alt=f"{', '.join(ids)} across commits")
        settings.append(setting)
    return {"file": Path(path).name, "snapshots": snaps, "settings": settings, "gate": gate.text()}
