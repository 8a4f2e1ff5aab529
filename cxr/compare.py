"""`cxr-bench compare BASE NEW`: the runs of two results stores, setting by setting, through the regression gate.

Runs are matched by id and seed (`results.load_all` reads each store, so an unreadable file is skipped with
its reason, as everywhere). A matched pair is compared only when both runs finished (status ok, with test
predictions), their recipe (`spec_hash`) is the same and so is their test data (the test split's
fingerprint, and the labels); everything else is listed, never compared: added (only in NEW), removed (only
in BASE), recipe changed, test data changed, not finished, and no longer finishes (ok in BASE, diverged or
failed in NEW), which counts as a regression. A setting is a run id with its paired seeds; ids whose runs are
identical in both stores (the same recipe stored under several ids, `reused_from`) are one setting, tested
once. `cxr.gate` tests and judges them; `markdown` and `to_json` render the result.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr import gate as gate_mod
from cxr import results
from cxr.errors import CxrError
from cxr.gate import environment
from cxr.record import OK, RunRecord

KINDS = ("no longer finishes", "added", "removed", "recipe changed", "test data changed", "not finished")


class CompareError(CxrError):
    """Input `cxr-bench compare` cannot use: a missing or unreadable directory, no runs in common."""


@dataclass(frozen=True)
class Store:
    path: str  # as given
    records: tuple[RunRecord, ...]  # every readable result, sorted by (id, seed)
    skipped: tuple[str, ...]  # one line per result file that could not be read

    def summary(self) -> dict:
        """{"path", "runs", "commits", "environments"}: what the table's header says about the store."""
        ok = [r for r in self.records if r.status == OK] or list(self.records)
        return {"path": self.path, "runs": len(self.records),
                "commits": sorted({str(r.environment.get("git_commit")) for r in ok}),
                "environments": sorted({environment(r) for r in ok})}


def load_store(path: str | Path, role: str) -> Store:
    """The records of a results directory, or CompareError naming it (role: BASE or NEW)."""
    p = Path(path)
    if not p.exists():
        raise CompareError(f"{role} {path}: no such directory")
    if not p.is_dir():
        raise CompareError(f"{role} {path}: not a directory (give a results directory, the --out of cxr-bench run)")
    try:  # a directory we may not list would read as empty: say so instead
        os.listdir(p)
        if (p / "runs").is_dir():
            os.listdir(p / "runs")
    except OSError as e:
        raise CompareError(f"{role} {path}: cannot be read ({e.strerror or e})") from None
    skipped: list[str] = []
    records = results.load_all(p, skipped=skipped)
    return Store(str(path), tuple(records), tuple(skipped))


def _test_print(r: RunRecord) -> str | None:
    return (r.data_fingerprint or {}).get("test")


def _why_not(rb: RunRecord, rn: RunRecord) -> tuple[str, str, bool] | None:
    """(kind, detail, whether that is a change) when a matched pair is not compared; None when it is."""
    if rb.spec_hash != rn.spec_hash:
        keys = [k for k in sorted(rb.spec.keys() | rn.spec.keys()) if k != "seed" and rb.spec.get(k) != rn.spec.get(k)]
        said = ", ".join(f"{k} {rb.spec.get(k)!r} -> {rn.spec.get(k)!r}" for k in keys[:4]) or "spec_hash differs"
        return "recipe changed", said + (f" and {len(keys) - 4} more" if len(keys) > 4 else ""), True
    if rb.status != OK or rn.status != OK or not rb.predictions or not rn.predictions:
        def state(r):
            return r.status if r.status != OK else "ok" if r.predictions else "ok, no predictions"
        # finished in BASE, diverged or failed in NEW: a regression (Result.unfinished); unfinished alike: no change
        kind = "no longer finishes" if state(rb) == "ok" and rn.status != OK else "not finished"
        return kind, f"BASE {state(rb)}, NEW {state(rn)}", state(rb) != state(rn)
    if _test_print(rb) != _test_print(rn):
        return ("test data changed", f"test fingerprint {str(_test_print(rb))[:8]} -> {str(_test_print(rn))[:8]}",
                True)
    if rb.predictions["y_true"] != rn.predictions["y_true"]:
        return "test data changed", "the test labels differ", True
    return None


def _arrays(runs: list[RunRecord]) -> dict:
    return {"y_pred": np.asarray([r.predictions["y_pred"] for r in runs]),
            "y_score": np.asarray([r.predictions["y_score"] for r in runs], dtype=np.float64),
            "images_per_second": [r.own_images_per_second() for r in runs]}


def _digest(pairs: list[tuple[int, RunRecord, RunRecord]]) -> str:
    """What a setting's paired runs hold, so that ids holding the same runs (copies) are tested once."""
    blob = [[seed, rb.spec_hash, rb.predictions, rn.predictions, rb.own_images_per_second(),
             rn.own_images_per_second(), environment(rb), environment(rn)] for seed, rb, rn in pairs]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Result:
    base: Store
    new: Store
    gate: gate_mod.Gate
    rows: tuple[dict, ...]  # gate.judge's dicts plus "ids", "seeds", worst first
    not_compared: tuple[dict, ...]  # {"kind", "id", "seeds", "detail", "changed" (False: unfinished alike in both)}

    @property
    def regressions(self) -> list[dict]:
        """The settings the gate flags."""
        return [r for r in self.rows if r["verdict"] == gate_mod.REGRESSION]

    @property
    def unfinished(self) -> list[dict]:
        """Runs that finished in BASE and diverged or failed in NEW: regressions too, though never tested."""
        return [n for n in self.not_compared if n["kind"] == "no longer finishes"]

    @property
    def verdict(self) -> str:
        if self.regressions or self.unfinished:
            return "regression"
        changed = [r for r in self.rows if r["verdict"] != gate_mod.IDENTICAL]
        listed = [n for n in self.not_compared if n["changed"]]
        return "no change" if self.rows and not changed and not listed else "no regression"

    @property
    def exit_status(self) -> int:
        return 1 if self.verdict == "regression" else 0


def compare(base: Store, new: Store, gate: gate_mod.Gate = gate_mod.DEFAULT) -> Result:
    """Match, test and judge the runs of two stores; CompareError when they have no run in common."""
    old = {(r.id, r.seed): r for r in base.records}
    now = {(r.id, r.seed): r for r in new.records}
    if not old.keys() & now.keys():
        raise CompareError(f"BASE {base.path} ({len(old)} runs) and NEW {new.path} ({len(now)} runs) have no run "
                           "(id and seed) in common")
    notes: dict[tuple[str, str, str, bool], list[int]] = {}  # (kind, id, detail, changed) -> seeds
    paired: dict[str, list[tuple[int, RunRecord, RunRecord]]] = {}
    for key in sorted(old.keys() | now.keys()):
        if key not in now or key not in old:
            notes.setdefault(("removed" if key not in now else "added", key[0], "", True), []).append(key[1])
            continue
        why = _why_not(old[key], now[key])
        if why:
            notes.setdefault((why[0], key[0], *why[1:]), []).append(key[1])
        else:
            paired.setdefault(key[0], []).append((key[1], old[key], now[key]))
    groups: dict[str, list[str]] = {}  # digest -> ids holding the same runs
    for run_id, pairs in paired.items():
        y_true = pairs[0][1].predictions["y_true"]
        same = [p for p in pairs if p[1].predictions["y_true"] == y_true]  # a setting's seeds share the images
        for seed in sorted({p[0] for p in pairs} - {p[0] for p in same}):
            notes.setdefault(("test data changed", run_id, f"tested on other images than seed {pairs[0][0]}",
                              True), []).append(seed)
        paired[run_id] = same
        groups.setdefault(_digest(same), []).append(run_id)
    tests = []
    for ids in groups.values():
        pairs = paired[ids[0]]
        base_runs, new_runs = [p[1] for p in pairs], [p[2] for p in pairs]
        b, n = _arrays(base_runs), _arrays(new_runs)
        envs = {environment(r) for r in base_runs}, {environment(r) for r in new_runs}
        t = gate_mod.paired_differences(np.asarray(pairs[0][1].predictions["y_true"]), b, n, gate)
        t["throughput"] = gate_mod.throughput(b["images_per_second"], n["images_per_second"],
                                              len(envs[0]) == 1 and envs[0] == envs[1])
        t["environments"] = {"base": sorted(envs[0]), "new": sorted(envs[1])}
        tests.append({"ids": ids, "seeds": [p[0] for p in pairs], **t})
    rows = sorted(gate_mod.judge(tests, gate), key=lambda r: (*gate_mod.severity(r), r["ids"][0]))
    listed = sorted(notes.items(), key=lambda x: (KINDS.index(x[0][0]), x[0][1:]))
    not_compared = [{"kind": kind, "id": run_id, "seeds": seeds, "detail": detail, "changed": changed}
                    for (kind, run_id, detail, changed), seeds in listed]
    return Result(base, new, gate, tuple(rows), tuple(not_compared))


# ---------------------------------------------------------------------------------------------- rendering

def _signed(x: float | None, scale: float, digits: int) -> str:
    return "n/a" if x is None else f"{x * scale:+.{digits}f}".replace("-", "−")


def _p(p: float | None) -> str:
    return "n/a" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _metric_cell(row: dict, m: str) -> str:
    b = row["metrics"][m]
    scale, digits = (1, 4) if m == "auroc" else (100, 2)
    if b["diff"] is None:
        return "n/a"
    if row["identical"]:
        return "±0 (the same predictions)"
    text = f"{_signed(b['diff'], scale, digits)} [{_signed(b['ci_low'], scale, digits)}, " \
           f"{_signed(b['ci_high'], scale, digits)}], p {_p(row['p_adjusted'][m])}"
    return f"**{text}**" if row["verdicts"][m] in (gate_mod.REGRESSION, gate_mod.IMPROVEMENT) else text


def _throughput_cell(row: dict) -> str:
    t = row["throughput"]
    if t["ratio"] is None:
        return "n/a"
    text = f"{t['ratio']:.2f} ({t['base']:,.0f} → {t['new']:,.0f} images/s)"
    verdict = row["verdicts"]["throughput"]
    if verdict == "not comparable":
        return f"{text}, not comparable"
    return f"**{text}**" if verdict in ("slower", "faster") else text


def _why(row: dict) -> str:
    """The verdict cell: the verdict and what made it."""
    v = row["verdicts"]
    said = [gate_mod.METRIC_NAMES[m] for m in gate_mod.METRICS if v[m] in (gate_mod.REGRESSION, gate_mod.IMPROVEMENT)]
    if v["throughput"] in ("slower", "faster"):
        said.append(f"throughput {v['throughput']}")
    if row["verdict"] in (gate_mod.REGRESSION, gate_mod.IMPROVEMENT):
        return f"**{row['verdict']}**: {', '.join(said)}"
    return row["verdict"]


def _ids(ids: list[str]) -> str:
    return f"`{ids[0]}`" + (f" (= {', '.join(f'`{i}`' for i in ids[1:])})" if len(ids) > 1 else "")


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def _store_line(role: str, s: dict) -> str:
    commits = ", ".join(s["commits"]) or "unknown"
    envs = "; ".join(s["environments"]) or "no environment"
    return f"- {role} `{s['path']}`: {s['runs']} run{'s' * (s['runs'] != 1)}, commit {commits}, {envs}"


def markdown(result: Result) -> str:
    """The table for a job summary or a pull-request comment: the verdict, then every setting worst first,
    the settings with identical runs collapsed into one line, then what was not compared, and the gate."""
    regressions, unfinished = result.regressions, result.unfinished
    if result.verdict == "regression":
        said = [f"{len(regressions)} setting{'s' * (len(regressions) > 1)}: "
                + "; ".join(_ids(r["ids"]) for r in regressions)] if regressions else []
        said += [f"`{n['id']}` seed{'s' * (len(n['seeds']) > 1)} {_seeds(n['seeds'])} no longer finish"
                 f"{'es' * (len(n['seeds']) == 1)} ({n['detail']})" for n in unfinished]
        head = f"**Verdict: regression** in {'; and '.join(said)}."
    elif result.verdict == "no change":
        head = "**Verdict: no change.** Every compared setting has the same test predictions in every seed."
    else:
        head = "**Verdict: no regression.**"
    lines = ["## cxr-bench compare", "", head, "",
             _store_line("BASE", result.base.summary()), _store_line("NEW", result.new.summary()), ""]
    shown = [r for r in result.rows if r["verdict"] != gate_mod.IDENTICAL]
    identical = [r for r in result.rows if r["verdict"] == gate_mod.IDENTICAL]
    if result.rows:
        lines += ["| Setting | Seeds | Test images | Accuracy, points | Balanced accuracy, points | AUROC "
                  "| Throughput NEW / BASE | Verdict |", "|---|---|--:|--:|--:|--:|--:|---|"]
        for r in shown:
            lines.append(f"| {_ids(r['ids'])} | {_seeds(r['seeds'])} | {r['n_images']} | "
                         + " | ".join(_metric_cell(r, m) for m in gate_mod.METRICS)
                         + f" | {_throughput_cell(r)} | {_why(r)} |")
        if identical:
            ratios = [r["throughput"]["ratio"] for r in identical if r["throughput"]["ratio"] is not None]
            spread = "n/a" if not ratios else f"{min(ratios):.2f}" if min(ratios) == max(ratios) else \
                f"{min(ratios):.2f} to {max(ratios):.2f}"
            names = ", ".join(_ids(r["ids"]) for r in sorted(identical, key=lambda r: r["ids"][0]))
            n_seeds = sorted({len(r["seeds"]) for r in identical})
            lines.append(f"| {len(identical)} setting{'s' * (len(identical) > 1)} with the same predictions in every "
                         f"seed: {names} | {'/'.join(map(str, n_seeds))} each | "
                         f"{'/'.join(str(n) for n in sorted({r['n_images'] for r in identical}))} | ±0 | ±0 | ±0 | "
                         f"{spread} | identical |")
        lines.append("")
        lines.append("Differences are NEW − BASE, as the mean over seeds, with a 95% bootstrap interval in brackets "
                     "and the Holm-adjusted p-value (AUROC in AUROC units, the others in percentage points); "
                     "throughput is the median over seeds of NEW / BASE training images/s (medians of each in "
                     "parentheses). Bold: beyond the gate.")
    else:
        lines.append("No setting could be compared (see below).")
    if result.not_compared:
        lines += ["", "Not compared:", ""]
        for n in result.not_compared:
            detail = f" ({n['detail']})" if n["detail"] else ""
            lines.append(f"- {n['kind']}: `{n['id']}` seed{'s' * (len(n['seeds']) > 1)} {_seeds(n['seeds'])}{detail}")
    for role, store in (("BASE", result.base), ("NEW", result.new)):
        if store.skipped:
            lines += ["", f"Skipped files of {role} (not readable as run records):", ""]
            lines += [f"- {' '.join(line.split())}" for line in store.skipped]
    lines += ["", f"Gate: {result.gate.text()}.", ""]
    return "\n".join(lines)


def to_json(result: Result) -> dict:
    """Everything `markdown` shows, as one JSON object (fractions, not points)."""
    settings = [{"ids": r["ids"], "seeds": r["seeds"], "n_images": r["n_images"], "verdict": r["verdict"],
                 "identical": r["identical"],
                 "metrics": {m: {**r["metrics"][m], "p_adjusted": r["p_adjusted"][m], "verdict": r["verdicts"][m]}
                             for m in gate_mod.METRICS},
                 "throughput": {**r["throughput"], "verdict": r["verdicts"]["throughput"]},
                 "environments": r["environments"]} for r in result.rows]
    g = result.gate
    return {"verdict": result.verdict, "exit_status": result.exit_status,
            "regressions": [r["ids"] for r in result.regressions],
            "unfinished": [{k: n[k] for k in ("id", "seeds", "detail")} for n in result.unfinished],
            "base": result.base.summary(), "new": result.new.summary(),
            "gate": {"alpha": g.alpha, "min_effect_points": g.min_effect, "factor": g.factor, "n_boot": g.n_boot,
                     "seed": g.seed},
            "settings": settings, "not_compared": list(result.not_compared),
            "skipped": {"base": list(result.base.skipped), "new": list(result.new.skipped)},
            "counts": dict(Counter(r["verdict"] for r in result.rows))}
