"""One benchmark case per (experiment, seed) of the spec files (parametrised in conftest.py).

Each case is one `cxr.train.run`: trained and stored, or read back from the store when a result
of the same identity (recipe, data content, training version) is there. Its metrics go to
benchmark.extra_info (and so to --benchmark-json) and to the summary table at the end of the session.
"""

from __future__ import annotations

import pytest

from cxr import data as data_mod
from cxr import record, results, train
from cxr.env import synchronize
from cxr.errors import CxrError
from cxr.record import RunRecord


def extra_info(rec: RunRecord) -> dict:
    """The benchmark's extra_info: who, how it ended, and the test metrics of one run record."""
    info = {
        "id": rec.id, "seed": rec.seed, "status": rec.status, "cached": rec.cached,
        "test_accuracy": rec.test("accuracy"), "test_auroc": rec.test("auroc"),
        "test_sensitivity": rec.test("sensitivity"), "test_specificity": rec.test("specificity"),
        "best_epoch": rec.best_epoch, "train_seconds": rec.timing_of("train_seconds"),
        "images_per_second": rec.timing_of("images_per_second"), "device": rec.environment.get("device"),
    }
    if rec.error:
        info["error"] = rec.error
    return info


def test_experiment(spec, benchmark, cxr_settings, experiment_rows):
    s = cxr_settings

    def load_data():  # pedantic's setup: not timed; cxr.data caches the dataset per process
        return (data_mod.load(spec.dataset, spec.image_size),), {}

    def run(data):
        rec = train.run(spec, s.out, s.device.type, rerun=s.rerun, data=data, progress=False)
        synchronize(s.device)
        return rec

    try:
        rec = benchmark.pedantic(run, setup=load_data, rounds=1, iterations=1)
    except results.Claimed as e:  # another process (another pytest -n worker, a cxr-bench run) trains it
        pytest.skip(str(e))
    except CxrError as e:  # bad data, or a stored result of another recipe or data under this id
        pytest.fail(str(e), pytrace=False)
    info = extra_info(rec)
    benchmark.extra_info.update(info)
    experiment_rows.append({"run_id": spec.run_id, **info})
    if rec.status == record.FAILED:
        pytest.fail(f"{spec.run_id}: {rec.error}", pytrace=False)
