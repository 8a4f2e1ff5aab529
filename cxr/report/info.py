"""What was run: the "What was run" rows, the data sets and the "All runs" table, from run records."""

from __future__ import annotations

import datetime as dt

from cxr.record import DIVERGED, FAILED, OK, RunRecord
from cxr.report.format import duration, plural, short_source
from cxr.report.model import Comparison


def _distinct(values, sep: str = ", ") -> str:
    seen = []
    for v in values:
        v = "n/a" if v is None else str(v)
        if v not in seen:
            seen.append(v)
    return sep.join(seen) if seen else "n/a"


def _time(s: str | None) -> dt.datetime | None:
    """An ISO time with its UTC offset (cxr.env writes one); None for one without: it cannot be ordered
    against the others."""
    try:
        t = dt.datetime.fromisoformat(s) if isinstance(s, str) else None
    except ValueError:
        return None
    return t if t is not None and t.tzinfo is not None else None


_PRECISION = {"bf16": "bf16 autocast (losses, BatchNorm statistics, optimizer state fp32)", "fp32": "fp32"}


def _precision(r: RunRecord) -> str:
    """What a run's training arithmetic was; records before timing.precision: bf16 on CUDA, fp32 elsewhere."""
    return r.timing_of("precision") or ("bf16" if (r.environment or {}).get("device") == "cuda" else "fp32")


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
    if s.get("class_weight") == "balanced":
        parts.append("class-balanced loss (n / (2 n_c))")
    if s.get("decision", "argmax") != "argmax":
        parts.append(f"decision {s['decision']}" + (" (P(pneumonia) > the train prevalence)"
                                                   if s["decision"] == "equal-prior" else ""))
    if s.get("tta"):
        parts.append(f"TTA {s['tta']} draws + identity")
    return ", ".join(parts) + f", best epoch chosen on validation {s['select']}"


def _datasets(results: list[RunRecord]) -> list[dict]:
    datasets, seen = [], set()
    for r in results:
        d = r.dataset or {}
        key = (d.get("source"), d.get("image_size"))
        if d and key not in seen:
            seen.add(key)
            datasets.append({"name": d.get("name", "?"), "source": short_source(str(d.get("source"))),
                             "synthetic": bool(d.get("synthetic")), "image_size": d.get("image_size"),
                             "splits": [{"name": k, **v} for k, v in (d.get("splits") or {}).items()]})
    return datasets


def run_info(results: list[RunRecord]) -> dict:
    """{"rows": [(label, value)] of the "What was run" table, "datasets": [...]}."""
    env = [r.environment for r in results]
    specs = [r.spec for r in results]
    fresh = [r for r in results if not r.reused_from]  # copies would count their time twice
    started = [t for t in (_time(e.get("started_at")) for e in env) if t]
    finished = [t for t in (_time(e.get("finished_at")) for e in env) if t]
    # A fused group's runs (cxr.engine) trained at once: each one's train_seconds is the group's, so a group
    # counts its longest member's once.
    groups: dict[frozenset, float] = {}
    for r in fresh:
        key = frozenset([r.run_id, *(r.timing_of("fused_with") or [])])
        groups[key] = max(groups.get(key, 0.0), r.timing_of("train_seconds") or 0)
    compute = sum(groups.values()) + sum(r.timing_of("eval_seconds") or 0 for r in fresh)
    fused = [k for k in groups if len(k) > 1]
    fmt_time = "%Y-%m-%d %H:%M %Z"
    span = f"{min(started).strftime(fmt_time).strip()} / {max(finished).strftime(fmt_time).strip()}" \
        if started and finished else "n/a"
    rows = [
        ("Model", _distinct(f"{s['model']} (width {s['width']})" for s in specs)),
        ("Image size", _distinct(f"{s['image_size']} × {s['image_size']} px" for s in specs)),
        ("Training", _distinct((_training(s) for s in specs), "; ")),  # a recipe line holds commas
        ("Epochs", _distinct(sorted({s["epochs"] for s in specs}))),
        ("Training arithmetic", _distinct(sorted({_PRECISION[_precision(r)] for r in fresh}), "; ")),
        ("Seeds", ", ".join(map(str, sorted({r.seed for r in results}))) or "n/a"),
        ("Device", _distinct(f"{e.get('device')} ({e.get('device_name')})" for e in env)),
        ("CPU", _distinct(e.get("cpu") for e in env)),
        ("Python / torch / CUDA", _distinct(f"{e.get('python')} / {e.get('torch')} / "
                                            f"{e.get('cuda') or 'none'}" for e in env)),
        ("Commit", _distinct(e.get("git_commit") or "unknown" for e in env)),
        ("Runs", f"{len(results)}: {sum(r.status == OK for r in results)} ok, "
                 f"{sum(r.status == DIVERGED for r in results)} diverged, "
                 f"{sum(r.status == FAILED for r in results)} failed"
                 + (f"; {len(results) - len(fresh)} reused the stored result of an identical run under "
                    f"another id" if len(fresh) < len(results) else "")
                 + (f"; {sum(len(k) for k in fused)} trained in {plural(len(fused), 'fused group')}"
                    if fused else "")),
        ("Started / finished", span),
        ("Total time", f"{duration(compute)} of training and evaluation over {plural(len(fresh), 'run')}"
         + (f"; {duration((max(finished) - min(started)).total_seconds())} from first start to last finish"
            if started and finished else "")),
    ]
    return {"rows": rows, "datasets": _datasets(results)}


def run_rows(comps: list[Comparison]) -> list[dict]:
    """One row per run for the "All runs" table, in the order of the comparisons and settings."""
    rows = []
    for r in (r for c in comps for s in c.settings for r in s.runs):
        note = r.error or (f"same recipe as `{r.reused_from}`: its result reused" if r.reused_from else "")
        if r.group_size > 1 and not r.reused_from:
            note = "; ".join(filter(None, [note, f"trained in a fused group of {r.group_size}"]))
        rows.append({"id": r.id, "seed": r.seed, "status": r.status, "note": note,
                     "accuracy": r.test("accuracy"), "auroc": r.test("auroc"),
                     "best_epoch": "n/a" if r.best_epoch is None else f"{r.best_epoch} of {r.spec['epochs']}",
                     "train_seconds": r.own_train_seconds()})
    return rows
