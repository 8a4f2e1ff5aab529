#!/usr/bin/env python3
"""Test accuracy of the same runs in two results stores, paired run by run (same id and seed): the mean
of each, the mean paired difference with its 95% t interval and a paired t test (scipy), and the
seed-to-seed spread of each setting, so that a change of training arithmetic (fp32 -> bf16) can be read
against the spread between seeds. Runs copied from another id (reused_from) are counted once.

    scripts/paired-stores.py results-fp32 results-bf16
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
from scipy import stats

from cxr import results


def accuracies(store: str) -> dict[tuple[str, int], float]:
    return {(r.id, r.seed): r.test("accuracy") for r in results.load_all(store)
            if r.ok and not r.reused_from and r.test("accuracy") is not None}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    a, b = (accuracies(s) for s in argv)
    keys = sorted(a.keys() & b.keys())
    if len(keys) < 2:
        print("fewer than 2 runs in both stores", file=sys.stderr)
        return 2
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    d = y - x
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    p = stats.ttest_rel(y, x).pvalue
    print(f"{len(keys)} runs in both stores (ids x seeds)")
    print(f"test accuracy  A {x.mean():.4f} (sd {x.std(ddof=1):.4f})   B {y.mean():.4f} (sd {y.std(ddof=1):.4f})")
    print(f"B - A, paired  {d.mean():+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]  sd {d.std(ddof=1):.4f}  "
          f"paired t p = {p:.3f}")
    by_id = defaultdict(list)
    for k in keys:
        by_id[k[0]].append(k)
    spreads = [np.std([a[k] for k in ks], ddof=1) for ks in by_id.values() if len(ks) > 1]
    if spreads:
        print(f"seed-to-seed sd within a setting in A: median {np.median(spreads):.4f} over {len(spreads)} settings")
    for rid, ks in sorted(by_id.items()):
        print(f"  {rid:<28} n={len(ks)}  A {np.mean([a[k] for k in ks]):.4f}  B {np.mean([b[k] for k in ks]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
