"""One benchmark case per (experiment, seed) of the spec files (parametrised in conftest.py).

Each case is one run of `cxr.sweep.run_group`: trained and stored, or read back from the store when
a result of the same identity (recipe, data content, training version) is there. Runs that can share
a step train as one fused group (cxr.engine; --no-fuse turns it off): the group's first case trains
them all, and its time is the group's; the other cases of the group take their result from it and
report the time of that lookup, with "timed_in_case" naming the case whose time covers them. Its metrics go to
benchmark.extra_info (and so to --benchmark-json) and to the summary table at the end of the session.
"""

from __future__ import annotations

import pytest

from cxr import data as data_mod
from cxr import record, results, sweep
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
        "fused_with": rec.timing_of("fused_with"),
    }
    if rec.error:
        info["error"] = rec.error
    return info


def test_experiment(spec, benchmark, cxr_settings, experiment_rows, fusion_units, unit_results):
    s = cxr_settings
    unit = fusion_units.get(spec.run_id, [spec])  # the runs it trains with (conftest: among the selected cases)

    def load_data():  # pedantic's setup: not timed; cxr.data caches the dataset per process
        return (data_mod.load(spec.dataset, spec.image_size),), {}

    def run(data):
        # The first case of a fused group trains the whole group: its time is the group's. The group's other
        # cases find their result here and cost (and report) only that lookup.
        if spec.run_id not in unit_results:
            recs = sweep.run_group(unit, s.out, s.device.type, rerun=s.rerun, data=data, progress=False)
            synchronize(s.device)
            unit_results.update({u.run_id: (r, spec.run_id) for u, r in zip(unit, recs, strict=True)})
        return unit_results.pop(spec.run_id)

    try:
        rec, timed_in = benchmark.pedantic(run, setup=load_data, rounds=1, iterations=1)
    except CxrError as e:  # bad data, or a stored result of another recipe or data under this id
        pytest.fail(str(e), pytrace=False)
    if isinstance(rec, results.Claimed):  # another process (a pytest -n worker, a cxr-bench run) trains it
        pytest.skip(str(rec))
    info = extra_info(rec)
    if len(unit) > 1:  # one of a fused group's cases: the case whose benchmark time covers its training
        info["timed_in_case"] = timed_in
    benchmark.extra_info.update(info)
    experiment_rows.append({"run_id": spec.run_id, **info})
    if rec.status == record.FAILED:
        pytest.fail(f"{spec.run_id}: {rec.error}", pytrace=False)
