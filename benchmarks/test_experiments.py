"""One benchmark case per (experiment, seed) of the spec files (parametrised in conftest.py).

Each case is one `cxr.train.run`: trained and stored, or read back from the store when a result
with the same spec hash is there. Its metrics go to benchmark.extra_info (and so to
--benchmark-json) and to the summary table at the end of the session.
"""

from __future__ import annotations

import pytest

from benchmarks import synchronize
from cxr import data as data_mod
from cxr import results, train


def extra_info(record: dict) -> dict:
    """The benchmark's extra_info: who, how it ended, and the test metrics of one result record."""
    test = (record.get("metrics") or {}).get("test") or {}
    timing = record.get("timing") or {}
    info = {
        "id": record["id"], "seed": record["seed"], "status": record["status"],
        "cached": bool(record.get("cached")),
        "test_accuracy": test.get("accuracy"), "test_auroc": test.get("auroc"),
        "test_sensitivity": test.get("sensitivity"), "test_specificity": test.get("specificity"),
        "best_epoch": record.get("best_epoch"), "train_seconds": timing.get("train_seconds"),
        "images_per_second": timing.get("images_per_second"),
        "device": (record.get("environment") or {}).get("device"),
    }
    if record.get("error"):
        info["error"] = record["error"]
    return info


def test_experiment(spec, benchmark, cxr_settings, experiment_rows):
    s = cxr_settings
    stored = not s.rerun and results.find(s.out, spec) is not None

    def load_data():  # pedantic's setup: not timed; cxr.data caches the dataset per process
        return (None if stored else data_mod.load(spec.dataset, spec.image_size),), {}

    def run(data):
        record = train.run(spec, s.out, s.device.type, rerun=s.rerun, data=data, progress=False)
        synchronize(s.device)
        return record

    try:
        record = benchmark.pedantic(run, setup=load_data, rounds=1, iterations=1)
    except data_mod.DataError as e:
        pytest.fail(str(e), pytrace=False)
    info = extra_info(record)
    benchmark.extra_info.update(info)
    experiment_rows.append({"run_id": spec.run_id, **info})
    if record["status"] == results.STATUS_FAILED:
        pytest.fail(f"{spec.run_id}: {record['error']}", pytrace=False)
