"""What it costs to look a run up in the results store, in a store of 10 and of 2,000 results.

Before a run trains, the sweep asks the store for its own result and for an identical run stored under
another id (cxr.sweep.serve). That second question used to read every record of the run's seed (about
7 ms each), so a lookup grew with the store. It now goes through the store's index (cxr.index: one
small file, plus a stat per run directory). Each case times, side by side in one process, the lookup of
a run that is not stored (the common case before training) both ways: `index` (sweep.serve as it is)
and `scan` (reading every record of the seed, as before). extra_info has both and their ratio.

    pytest benchmarks/test_store_lookup.py
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cxr import results, sweep
from cxr.spec import ExperimentSpec
from cxr.unit import identity

SPEC = ExperimentSpec(name="look", epochs=2, batch_size=32, width=4)
ROUNDS = 5


def _store(out: Path, n: int, template: dict) -> None:
    """n records of other recipes (distinct ids and identities), written as the store writes them."""
    for k in range(n):
        rid = f"other{k}-ce-lr0.001-bs32"
        rec = {**template, "id": rid, "identity": f"{k:016x}", "weights": None, "reused_from": None}
        results.atomic_write(out / "runs" / rid / "seed-0.json", lambda f, r=rec: f.write(json.dumps(r).encode()))


def _scan(out: Path, spec: ExperimentSpec, ident: str) -> None:
    """The lookup before the index: every record of the seed read and checked."""
    for path in results.result_files(out):
        if path.name == f"seed-{spec.seed}.json":
            results.serves(results.read(path), ident)


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory) -> dict:
    """One real record (a 1-epoch run on a tiny synthetic set), as the template of the fabricated ones."""
    from cxr import data as data_mod

    d = data_mod.load("synthetic", 28)
    small = replace(d, train=data_mod.Split(x=d.train.x[:64], y=d.train.y[:64]),
                    val=data_mod.Split(x=d.val.x[:32], y=d.val.y[:32]),
                    test=data_mod.Split(x=d.test.x[:32], y=d.test.y[:32]))
    out = tmp_path_factory.mktemp("template")
    rec = sweep.run(replace(SPEC, epochs=1), out, "cpu", data=small, progress=False)
    return {**rec.to_dict(), "data": small}


@pytest.mark.parametrize("n", [10, 2000], ids=lambda n: f"store{n}")
def test_store_lookup(n, benchmark, tmp_path, tiny_record):
    small = tiny_record["data"]
    template = {k: v for k, v in tiny_record.items() if k != "data"}
    out = tmp_path / "out"
    _store(out, n, template)
    spec = replace(SPEC, name="new")  # not stored: both questions find nothing
    ident = identity(spec, small)
    sweep.serve(out, spec, ident)  # the first lookup builds the index (it reads every record once)
    index_t, scan_t = [], []
    for _ in range(ROUNDS):  # side by side, round by round
        t0 = time.perf_counter()
        assert sweep.serve(out, spec, ident) is None
        index_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _scan(out, spec, ident)
        scan_t.append(time.perf_counter() - t0)
    benchmark.pedantic(sweep.serve, args=(out, spec, ident), rounds=ROUNDS, iterations=1)
    index_s, scan_s = statistics.median(index_t), statistics.median(scan_t)
    benchmark.extra_info.update(records=n, index_ms=round(index_s * 1e3, 3), scan_ms=round(scan_s * 1e3, 3),
                                scan_over_index=round(scan_s / index_s, 1))
    print(f"\nstore of {n:>5} results: lookup with the index {index_s * 1e3:8.2f} ms, reading every record "
          f"{scan_s * 1e3:9.2f} ms ({scan_s / index_s:.0f}x); medians of {ROUNDS} rounds")
