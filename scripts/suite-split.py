#!/usr/bin/env python3
"""Where the time of `cxr-bench run` went, from the records in each results store given:

  python3 scripts/suite-split.py STORE [STORE ...]

setup (autotuning warm-up, CUDA graph capture), the training loop, validation every epoch (the
epochs' seconds less training) and the final val + test evaluation, summed over the runs trained
(not reused) in the store. A fused group's setup and training are counted once. The rest of the
command's wall time is start-up, data loading and the store. Used by scripts/gpu-check.sh.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def split(store: str | Path) -> dict:
    recs = [json.loads(p.read_text()) for p in Path(store).glob("runs/*/seed-*.json")]
    fresh = [r for r in recs if not r["reused_from"]]
    units: dict[frozenset, tuple[float, float]] = {}  # one per lone run or fused group: (setup, training)
    validation = evaluation = 0.0
    for r in fresh:
        t = r["timing"] or {}
        key = frozenset([f"{r['id']}-seed{r['seed']}", *(t.get("fused_with") or [])])
        train, setup = t.get("train_seconds") or 0.0, t.get("setup_seconds") or 0.0
        old = units.get(key, (0.0, 0.0))
        units[key] = (max(old[0], setup), max(old[1], train))
        epochs = sum(h.get("seconds") or 0.0 for h in r["history"] or [])
        validation += max(0.0, epochs - train)  # a fused member's epochs hold its own share of validation
        evaluation += t.get("eval_seconds") or 0.0
    return {"runs": len(recs), "trained": len(fresh), "units": len(units),
            "graph_steps": sorted({(r["timing"] or {}).get("graph_steps") for r in fresh} - {None}),
            "setup": sum(u[0] for u in units.values()), "training": sum(u[1] for u in units.values()),
            "validation": validation, "evaluation": evaluation}


def main(stores: list[str]) -> None:
    for store in stores:
        s = split(store)
        print(f"{store}: {s['runs']} runs, {s['trained']} trained in {s['units']} units (graph steps "
              f"{s['graph_steps']}); setup {s['setup']:.1f} s, training {s['training']:.1f} s, validation "
              f"{s['validation']:.1f} s, final evaluation {s['evaluation']:.1f} s; training + evaluation "
              f"{s['training'] + s['evaluation']:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
