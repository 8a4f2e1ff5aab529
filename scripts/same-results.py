#!/usr/bin/env python3
"""Whether two results stores hold the same results: every run record of A has its twin in B (and the other
way round) with the same status, error, history (each epoch's numbers, its wall time left out), best
epoch, metrics and test predictions, and weights that are equal tensor for tensor. Timing, environment
and file paths are not compared. Exit status 0 when all are the same, 1 otherwise.

    scripts/same-results.py results-before results-after
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

COMPARED = ("status", "error", "best_epoch", "metrics", "predictions", "spec_hash", "identity")


def records(store: Path) -> dict[str, dict]:
    return {f"{p.parent.name}/{p.name}": json.loads(p.read_text()) for p in sorted(store.glob("runs/*/seed-*.json"))
            if p.name.count(".") == 1}


def differences(a: dict, b: dict, store_a: Path, store_b: Path) -> list[str]:
    why = [key for key in COMPARED if a.get(key) != b.get(key)]
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in r["history"]] for r in (a, b)]
    if strip[0] != strip[1]:
        why.append("history")
    if bool(a.get("weights")) != bool(b.get("weights")):
        why.append("weights (one has none)")
    elif a.get("weights"):
        wa = torch.load(store_a / a["weights"], weights_only=True)
        wb = torch.load(store_b / b["weights"], weights_only=True)
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            why.append("weights")
    return why


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    store_a, store_b = map(Path, argv)
    ra, rb = records(store_a), records(store_b)
    bad, same = 0, 0
    for name in sorted(ra.keys() | rb.keys()):
        if name not in ra or name not in rb:
            print(f"{name}: only in {store_a if name in ra else store_b}")
            bad += 1
        elif why := differences(ra[name], rb[name], store_a, store_b):
            print(f"{name}: differs in {', '.join(why)}")
            bad += 1
        else:
            same += 1
    print(f"{same} of {len(ra.keys() | rb.keys())} runs the same (history, metrics, predictions, weights)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
