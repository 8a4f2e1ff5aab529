"""The report's robustness section: a comparison's settings scored on MedMNIST-C's corrupted test splits.

`section(c, scores, fig_dir)` gives the template what it shows for one comparison (cxr.report.model): a table
of settings x corruption families (cxr.corruptions.FAMILIES: noise, blur, digital = pixelate and JPEG,
intensity = brightness, contrast and gamma; each cell the balanced error averaged over the family's corruptions
and 5 severities, mean ± std over seeds), the same per corruption, mCE and relative mCE with their seed spread,
paired tests of mCE between settings, and two figures (accuracy against severity per corruption; a heat map of
settings x corruptions of CE). `scores(results_dir, records)` reads the up-to-date scores
(cxr.robustness.current) of the records.

The paired test: a paired t-test over seeds (scipy.stats.ttest_rel on mCE of the same seed's runs), Holm-adjusted
over the pairs of a comparison. The seed is the unit that replicates a training run; mCE already averages 65
corrupted copies of the whole test split, so what varies between two trainings of one setting is the seed, and
pairing by seed removes what seeds share (data order, initialisation draw). Its limits: few seeds give few
degrees of freedom (n - 1), and the test split is held fixed (a statement about these images); the per-image
decisions are stored in the score files for image-level tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats as sp_stats

from cxr import corruptions as corr
from cxr import robustness, stats
from cxr.record import RunRecord
from cxr.report.files import draw_atomically
from cxr.report.model import Comparison, Figure, Setting

FAMILY_TITLES = {"noise": "noise (Gaussian, speckle, impulse, shot)", "blur": "blur (Gaussian)",
                 "digital": "digital (pixelate, JPEG)", "intensity": "intensity (brightness, contrast, gamma)"}


def scores(results_dir: str | Path, records: list[RunRecord]) -> dict[tuple[str, int], dict]:
    """{(id, seed): score} of the ok records whose stored robustness score is the run's as it is now."""
    out = {}
    for r in records:
        s = robustness.current(results_dir, r) if r.ok else None
        if s is not None:
            out[r.id, r.seed] = s
    return out


def _runs(s: Setting, scores_: dict) -> list[tuple[RunRecord, dict]]:
    return [(r, scores_[r.id, r.seed]) for r in s.ok if (r.id, r.seed) in scores_]


def family_error(score: dict, family: str) -> float:
    """Balanced error of one run averaged over a family's corruptions (each already averaged over severities)."""
    return float(np.mean([score["corruption_scores"][c]["balanced_error"] for c in corr.FAMILIES[family]]))


def setting_row(s: Setting, scores_: dict) -> dict | None:
    """One table row: mean_std_ci over the setting's scored seeds of every number the section shows."""
    runs = _runs(s, scores_)
    if not runs:
        return None
    summary = {k: stats.mean_std_ci([sc["summary"][k] for _, sc in runs])
               for k in ("mce", "relative_mce", "clean_balanced_error", "mean_balanced_error", "drop_balanced_accuracy",
                         "drop_accuracy")}
    return {"label": s.label, "n": len(runs), "seeds": tuple(r.seed for r, _ in runs), **summary,
            "families": {f: stats.mean_std_ci([family_error(sc, f) for _, sc in runs], bounds=(0, 1))
                         for f in corr.FAMILIES},
            "corruptions": {c: stats.mean_std_ci([sc["corruption_scores"][c]["balanced_error"] for _, sc in runs],
                                                 bounds=(0, 1)) for c in corr.CORRUPTIONS},
            "ce": {c: stats.mean_std_ci([sc["corruption_scores"][c]["ce"] for _, sc in runs])
                   for c in corr.CORRUPTIONS}}


def paired_t(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """A paired t-test of a - b over the seeds both have: {"seeds", "n", "diff", "std", "ci_low", "ci_high", "t",
    "df", "p_value"}; None with fewer than 2 common seeds. Equal values throughout give p = 1; a constant non-zero
    difference (no spread) gives t and p None."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.array([a[k] - b[k] for k in seeds], dtype=np.float64)
    ms = stats.mean_std_ci(d)
    out = {"seeds": tuple(seeds), "n": len(seeds), "diff": ms["mean"], "std": ms["std"], "ci_low": ms["ci_low"],
           "ci_high": ms["ci_high"], "df": len(seeds) - 1, "t": None, "p_value": None}
    if not d.any():
        return {**out, "p_value": 1.0}
    if ms["std"] == 0:
        return out
    t = sp_stats.ttest_rel([a[k] for k in seeds], [b[k] for k in seeds])
    return {**out, "t": float(t.statistic), "p_value": float(t.pvalue)}


def pairs(c: Comparison, scores_: dict, key: str = "mce") -> list[dict]:
    """Paired t-tests of summary[key] between every two settings with 2+ common scored seeds, Holm-adjusted over
    the comparison: [{"a", "b" (a has the lower mean), **paired_t, "p_adjusted"}]."""
    per = {s.label: {r.seed: sc["summary"][key] for r, sc in _runs(s, scores_)} for s in c.settings}
    found = []
    labels = [label for label, v in per.items() if v]
    for i, la in enumerate(labels):
        for lb in labels[i + 1:]:
            a, b = (la, lb) if np.mean(list(per[la].values())) <= np.mean(list(per[lb].values())) else (lb, la)
            test = paired_t(per[a], per[b])
            if test is not None:
                found.append({"a": a, "b": b, **test})
    tested = [p for p in found if p["p_value"] is not None]
    for p, adjusted in zip(tested, stats.holm([p["p_value"] for p in tested]), strict=True):
        p["p_adjusted"] = adjusted
    for p in found:
        p.setdefault("p_adjusted", None)
    return found


def section(c: Comparison, scores_: dict, fig_dir: Path | None = None) -> dict | None:
    """The robustness section of one comparison, or None when none of its runs has a current score:
    {"rows", "pairs", "families", "corruptions", "n_images", "image_size", "baseline", "not_scored", "figures"}."""
    rows = [row for s in c.settings if (row := setting_row(s, scores_))]
    if not rows:
        return None
    some = next(sc for s in c.settings for _, sc in _runs(s, scores_))
    not_scored = [f"{r.id} seed {r.seed}" for s in c.settings for r in s.ok if (r.id, r.seed) not in scores_]
    figures = []
    if fig_dir is not None:
        fig_dir.mkdir(parents=True, exist_ok=True)
        for kind, alt, draw in (("robustness-severity", "accuracy against severity per corruption", severity_figure),
                                ("robustness-heatmap", "corruption error per setting and corruption", heatmap_figure)):
            path = fig_dir / f"{c.slug}-{kind}.png"
            caption = draw_atomically(path, lambda tmp, draw=draw: draw(c, scores_, tmp))
            if caption:
                figures.append(Figure(path=f"figures/{path.name}", caption=caption, alt=f"{c.name}: {alt}"))
    return {"rows": rows, "pairs": pairs(c, scores_), "families": FAMILY_TITLES, "corruptions": tuple(corr.CORRUPTIONS),
            "n_images": some["n"], "image_size": some["image_size"], "corruption_set": some["corruptions"],
            "baseline": {"name": some["baseline"]["name"], "clean": some["baseline"]["clean_balanced_error"]},
            "not_scored": not_scored, "figures": figures}


# --- figures ---------------------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure  # object API: no pyplot state, Agg canvas on savefig

    return MplFigure(figsize=(width, height), dpi=120, layout="constrained")


def _colors(c: Comparison) -> dict:
    from matplotlib import colormaps

    return {s.label: colormaps["tab10"](i % 10) for i, s in enumerate(c.settings)}


def severity_figure(c: Comparison, scores_: dict, path: Path) -> str | None:
    """Small multiples, one panel per corruption: test accuracy at severity 0 (clean) to 5, per setting the mean
    over seeds with a min-to-max band."""
    drawn = [(s, runs) for s in c.settings if (runs := _runs(s, scores_))]
    if not drawn:
        return None
    fig = _figure(13, 9.5)
    axes = fig.subplots(3, 5, sharex=True, sharey=True).ravel()
    colors = _colors(c)
    x = np.arange(6)
    for ax, name in zip(axes, corr.CORRUPTIONS, strict=False):
        for s, runs in drawn:
            acc = 100 * np.array([[sc["clean"]["accuracy"]] + [v["accuracy"] for v in
                                  sc["corruption_scores"][name]["severities"]] for _, sc in runs])
            ax.plot(x, acc.mean(0), "o-", color=colors[s.label], lw=1.6, ms=3)
            if len(runs) > 1:
                ax.fill_between(x, acc.min(0), acc.max(0), color=colors[s.label], alpha=0.15, lw=0)
        ax.set_title(name.replace("_", " "), fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xticks(x, ["clean", "1", "2", "3", "4", "5"], fontsize=8)
    for ax in axes[len(corr.CORRUPTIONS):]:
        ax.set_axis_off()
    for ax in axes[::5]:
        ax.set_ylabel("test accuracy (%)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[s.label], lw=6, alpha=0.6, label=f"{s.label} (n = {len(runs)})")
               for s, runs in drawn]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), frameon=False)
    n = drawn[0][1][0][1]["n"]
    fig.suptitle(f"{c.name}: accuracy against corruption severity (MedMNIST-C, {n} test images each)")
    fig.savefig(path)
    band = "; band: min to max over seeds" if any(len(runs) > 1 for _, runs in drawn) else ""
    return ("Test accuracy on each corrupted copy of the test split, severity 1 (mild) to 5 (strong), beside the "
            f"clean split; line: mean over seeds{band}; n = seeds scored.")


def heatmap_figure(c: Comparison, scores_: dict, path: Path) -> str | None:
    """Settings x corruptions: corruption error CE (the setting's balanced error over AlexNet's, mean over seeds),
    diverging around 1 (AlexNet's level), with mCE per setting in its row label."""
    rows = [(s, row) for s in c.settings if (row := setting_row(s, scores_))]
    if not rows:
        return None
    from matplotlib.colors import TwoSlopeNorm

    names = list(corr.CORRUPTIONS)
    values = np.array([[row["ce"][n]["mean"] for n in names] for _, row in rows])
    fig = _figure(max(8, 0.75 * len(names) + 3), 2.4 + 0.5 * len(rows))
    ax = fig.subplots()
    high = max(2.0, float(values.max()))
    image = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(1.0, min(0.0, float(values.min())), high),
                      aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if abs(v - 1) > 0.6 * (high - 1) else "black")
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{s.label}\nmCE {row['mce']['mean']:.2f} (n = {row['n']})" for s, row in rows],
                  fontsize=8)
    fig.colorbar(image, ax=ax, label="CE (1 = AlexNet)", shrink=0.9)
    ax.set_title(f"{c.name}: corruption error by setting and corruption")
    fig.savefig(path)
    return ("Corruption error CE per setting and corruption: the balanced error averaged over 5 severities, divided "
            "by MedMNIST-C's AlexNet baseline for PneumoniaMNIST (blue: below AlexNet's, red: above); mean over "
            "seeds; mCE is the mean over the 13 corruptions.")
