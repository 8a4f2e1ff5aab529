"""`cxr-bench compare BASE NEW`: the regression gate on results stores made as the store makes them.

Stores are fabricated with tests/test_report.py's `fabricate` (cxr.record.RunRecord, checked against the JSON
Schema, written with cxr.results.write): two spec files, five settings, three seeds, 300 test images. A
change is made to the records of a copy: predictions turned wrong, swapped, throughput scaled, an
environment renamed. The false-alarm test runs the gate's core (cxr.compare.compare) on in-memory stores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import binom

from cxr import cli, compare, gate, record, results
from cxr import spec as spec_mod
from cxr.metrics import binary_metrics
from tests.test_report import TASK_A, TASK_BS, fabricate

N_TEST = 300
SETTINGS = [(TASK_A, kw) for kw in TASK_A.settings] + [(TASK_BS, kw) for kw in TASK_BS.settings]


@functools.cache
def _runs() -> tuple[record.RunRecord, ...]:
    return tuple(fabricate(kw, task, seed, n_test=N_TEST, index=3 * i + seed)
                 for i, (task, kw) in enumerate(SETTINGS) for seed in (0, 1, 2))


IDS = sorted({r.id for r in _runs()})


def store(path: Path, change=None, runs=None) -> Path:
    """A results directory of the fabricated runs, each passed through change(record) (None: left out)."""
    for r in runs or _runs():
        r = change(r) if change else r
        if r is not None:
            results.write(path, r)
    return path


def with_predictions(r: record.RunRecord, y_pred, y_score) -> record.RunRecord:
    """The record with these test predictions, its test metrics recomputed from them."""
    y = np.asarray(r.predictions["y_true"])
    test = {**binary_metrics(y, y_score, y_pred), "loss": r.metrics["test"]["loss"]}
    return dataclasses.replace(r, predictions={"y_true": y.tolist(), "y_score": np.asarray(y_score).tolist(),
                                               "y_pred": np.asarray(y_pred).tolist()},
                               metrics={**r.metrics, "test": test})


def turned_wrong(r: record.RunRecord, k: int = 25) -> record.RunRecord:
    """k correct predictions turned wrong (chosen by the seed): the score mirrored across 0.5."""
    y, pred, score = (np.asarray(r.predictions[key]) for key in ("y_true", "y_pred", "y_score"))
    right = np.flatnonzero((pred == y) & (score != 0.5))
    pick = np.random.default_rng(r.seed).choice(right, k, replace=False)
    score, pred = score.copy(), pred.copy()
    score[pick] = 1 - score[pick]
    pred[pick] = 1 - pred[pick]
    assert np.sum(pred != np.asarray(r.predictions["y_pred"])) == k
    return with_predictions(r, pred, score)


def swapped(r: record.RunRecord, per_class: int = 6) -> record.RunRecord:
    """In each class, per_class right images and per_class wrong ones trade scores: as many right -> wrong as
    wrong -> right, and every metric of the run (accuracy, balanced accuracy, AUROC) exactly as before."""
    y, pred, score = (np.asarray(r.predictions[key]) for key in ("y_true", "y_pred", "y_score"))
    score, pred = score.copy(), pred.copy()
    rng = np.random.default_rng(r.seed + 10)
    for label in (0, 1):
        right = rng.choice(np.flatnonzero((y == label) & (pred == y)), per_class, replace=False)
        wrong = rng.choice(np.flatnonzero((y == label) & (pred != y)), per_class, replace=False)
        score[right], score[wrong] = score[wrong], score[right].copy()
        pred[right], pred[wrong] = pred[wrong], pred[right].copy()
    return with_predictions(r, pred, score)


def scaled_throughput(factor: float, device_name: str | None = None):
    def change(r):
        env = r.environment if device_name is None else {**r.environment, "device_name": device_name}
        return dataclasses.replace(r, timing={**r.timing, "images_per_second": r.timing["images_per_second"] * factor},
                                   environment=env)
    return change


def run_compare(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return store(tmp_path_factory.mktemp("base") / "results")


# ------------------------------------------------------------------------------------------ the cases

def test_a_store_compared_with_itself_is_no_change(base, capsys):
    code, out, err = run_compare(capsys, base, base)
    assert code == 0 and err == ""
    assert "**Verdict: no change.**" in out
    assert "5 settings with the same predictions in every seed" in out  # collapsed into one line
    rows = [line for line in out.splitlines() if line.startswith("| ") and "Setting" not in line]
    assert len(rows) == 1 and rows[0].endswith("| identical |")


def test_25_predictions_turned_wrong_in_every_seed_of_one_setting_is_a_regression(base, tmp_path, capsys):
    victim = "bs-ce-lr0.001-bs64"
    new = store(tmp_path / "new", lambda r: turned_wrong(r) if r.id == victim else r)
    code, out, _ = run_compare(capsys, base, new)
    assert code == 1
    assert f"**Verdict: regression** in 1 setting: `{victim}`." in out
    worst = next(line for line in out.splitlines() if line.startswith(f"| `{victim}`"))
    assert "**−8.33 [" in worst  # 25 of 300 images: -8.33 points in every seed
    assert "**regression**: accuracy, balanced accuracy, AUROC" in worst
    assert out.index(worst) < out.index("4 settings with the same predictions")  # worst first
    code, out, _ = run_compare(capsys, base, new, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["exit_status"] == 1 and doc["regressions"] == [[victim]]
    first = doc["settings"][0]
    assert first["ids"] == [victim] and first["metrics"]["accuracy"]["diff"] == pytest.approx(-25 / N_TEST)
    assert first["metrics"]["accuracy"]["p_adjusted"] < 0.05


def test_as_many_swaps_right_to_wrong_as_wrong_to_right_is_no_regression(base, tmp_path, capsys):
    new = store(tmp_path / "new", lambda r: swapped(r) if r.id == IDS[0] else r)
    code, out, _ = run_compare(capsys, base, new, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["verdict"] == "no regression" and doc["regressions"] == []
    row = next(s for s in doc["settings"] if s["ids"] == [IDS[0]])
    assert row["verdict"] == "no change" and not row["identical"]  # 24 images changed, no metric did
    for m in gate.METRICS:
        assert row["metrics"][m]["diff"] == pytest.approx(0, abs=1e-12)
        assert row["metrics"][m]["p_adjusted"] >= 0.05


def test_throughput_at_0_6_on_the_same_environment_is_a_regression(base, tmp_path, capsys):
    new = store(tmp_path / "new", scaled_throughput(0.6))
    code, out, _ = run_compare(capsys, base, new)
    assert code == 1
    assert "**Verdict: regression** in 5 settings" in out
    assert "**0.60 (900 → 540 images/s)**" in out and "**regression**: throughput slower" in out


def test_throughput_at_0_6_on_another_device_is_not_comparable(base, tmp_path, capsys):
    new = store(tmp_path / "new", scaled_throughput(0.6, device_name="NVIDIA H100 80GB HBM3"))
    code, out, _ = run_compare(capsys, base, new)
    assert code == 0 and "**Verdict: no regression.**" in out
    assert "0.60 (900 → 540 images/s), not comparable" in out
    assert "- NEW `" in out and "NVIDIA H100 80GB HBM3, torch 2.13.0+cpu" in out  # both environments named
    assert "x86_64, torch 2.13.0+cpu" in out


# ------------------------------------------------------------------------------------------ false alarms

def test_the_false_alarm_rate_of_null_comparisons_is_at_most_the_nominal_level():
    """200 comparisons of two stores that are resamples of one recipe: each store is three fresh seeds of the
    same model of correctness on the same 300 test images, and a comparison is a false alarm when the gate
    flags it. The model is calibrated to 12 seeds of the real CE recipe (loss-ce-lr0.001-bs32, synthetic data,
    624 test images; README "Catching regressions in CI"): every image has a fixed difficulty (a margin, 2.0
    +- 1.3 for pneumonia images, 1.4 +- 1.3 for normal ones), every seed a shift of its decision threshold
    (sd 0.3 in logits: that recipe's seeds trade sensitivity against specificity) and of its quality (sd
    0.05), and every run its own noise per image (sd 0.5). Simulated at 624 images, 300 seeds: accuracy 0.890
    +- 1.41 points, sensitivity +- 3.2, specificity +- 6.3, balanced accuracy +- 2.1, AUROC 0.958 +- 0.0059;
    measured on the 12 real seeds: 0.884 +- 1.31, +- 2.6, +- 6.6, +- 2.2, 0.964 +- 0.0055.

    The gate tests both directions at 0.05 and flags only drops, so its false-alarm rate should stay near
    0.025 or below. The bound allows the nominal 0.05 plus a binomial margin: the count of alarms that 200
    independent comparisons at a true rate of 0.05 stay at or below with probability 0.99 (scipy: 18, a rate
    of 0.09). A gate at its nominal level fails this test for at most one random seed in a hundred; one at
    0.14 passes it with probability below 0.05."""
    comparisons, alpha = 200, 0.05
    limit = int(binom.ppf(0.99, comparisons, alpha))
    assert limit == 18 and binom.cdf(limit, comparisons, 0.14) < 0.05
    rng = np.random.default_rng(2024)
    y = np.asarray(_runs()[0].predictions["y_true"])
    difficulty = np.where(y == 1, rng.normal(2.0, 1.3, y.size), rng.normal(1.4, 1.3, y.size))
    recipe = [r for r in _runs() if r.id == IDS[0]]

    def draw() -> compare.Store:
        out = []
        for r in recipe:
            margin = difficulty + rng.normal(0, 0.05) + rng.normal(0, 0.5, y.size)
            score = np.round(expit((2 * y - 1) * margin + rng.normal(0, 0.3)), 6)
            out.append(dataclasses.replace(r, predictions={"y_true": y.tolist(), "y_score": score.tolist(),
                                                           "y_pred": (score > 0.5).astype(int).tolist()},
                                           timing={**r.timing, "images_per_second": 900 * rng.lognormal(0, 0.05)}))
        return compare.Store("null", tuple(out), ())

    alarms = sum(bool(compare.compare(draw(), draw()).regressions) for _ in range(comparisons))
    print(f"{alarms} false alarms in {comparisons} null comparisons")  # shown with pytest -s
    assert alarms <= limit, f"{alarms} false alarms in {comparisons} null comparisons"


# ------------------------------------------------------------------------------------------ bad input: exit 2

def test_a_missing_directory_is_one_line(base, tmp_path, capsys):
    for args, role in (((tmp_path / "nope", base), "BASE"), ((base, tmp_path / "nope"), "NEW")):
        code, out, err = run_compare(capsys, *args)
        assert code == 2 and out == ""
        assert err == f"cxr-bench compare: error: {role} {tmp_path / 'nope'}: no such directory\n"


def test_a_file_instead_of_a_directory_is_one_line(base, tmp_path, capsys):
    (tmp_path / "f.json").write_text("{}")
    code, _, err = run_compare(capsys, base, tmp_path / "f.json")
    assert code == 2 and err.count("\n") == 1 and "NEW" in err and "not a directory" in err


def test_an_unreadable_directory_is_one_line(base, tmp_path, monkeypatch, capsys):
    locked = store(tmp_path / "locked")
    real = os.listdir

    def listdir(path="."):  # what a directory without read permission does (root reads anything: simulated)
        if Path(path).resolve() in (locked.resolve(), (locked / "runs").resolve()):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    code, _, err = run_compare(capsys, base, locked)
    assert code == 2 and err == f"cxr-bench compare: error: NEW {locked}: cannot be read (Permission denied)\n"


def test_no_runs_in_common_is_one_line(base, tmp_path, capsys):
    other = store(tmp_path / "other", lambda r: dataclasses.replace(r, id="x" + r.id, weights=None))
    (tmp_path / "empty").mkdir()
    for new in (other, tmp_path / "empty"):
        code, _, err = run_compare(capsys, base, new)
        assert code == 2 and err.count("\n") == 1 and "have no run (id and seed) in common" in err


def test_gate_options_out_of_range_are_one_line(base, capsys):
    for option, value in (("--alpha", "1.5"), ("--min-effect", "-1"), ("--factor", "0.5"), ("--alpha", "nan")):
        code, _, err = run_compare(capsys, base, base, option, value)
        assert code == 2 and err.startswith(f"cxr-bench compare: error: {option} ") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ what is not compared

def test_added_removed_recipe_data_and_unfinished_runs_are_listed_never_compared(base, tmp_path, capsys):
    a, b, c, d = IDS[:4]

    def change(r):
        if r.id == a and r.seed == 2:
            return None  # removed
        if r.id == b:  # recipe changed: another number of epochs under the same id
            spec = {**r.spec, "epochs": 5}
            return dataclasses.replace(r, spec=spec, spec_hash=spec_mod.from_dict(spec).spec_hash())
        if r.id == c:
            return dataclasses.replace(r, data_fingerprint={**r.data_fingerprint, "test": "f" * 16})
        if r.id == d and r.seed == 0:
            return dataclasses.replace(r, status="diverged", error="non-finite training loss in epoch 2",
                                       metrics=None, predictions=None, best_epoch=None)
        return r

    extra = fabricate(TASK_A.settings[1], TASK_A, 7, n_test=N_TEST)
    assert extra.id not in (a, b, c, d)
    new = store(tmp_path / "new", change, runs=[*_runs(), extra])
    code, out, _ = run_compare(capsys, base, new, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["regressions"] == []  # the run that no longer finishes is the regression
    assert doc["unfinished"] == [{"id": d, "seeds": [0], "detail": "BASE ok, NEW diverged"}]
    listed = {(n["kind"], n["id"], tuple(n["seeds"])) for n in doc["not_compared"]}
    assert listed == {("added", extra.id, (7,)), ("removed", a, (2,)), ("recipe changed", b, (0, 1, 2)),
                      ("test data changed", c, (0, 1, 2)), ("no longer finishes", d, (0,))}
    compared = {i for s in doc["settings"] for i in s["ids"]}
    assert b not in compared and c not in compared
    assert next(s for s in doc["settings"] if s["ids"] == [a])["seeds"] == [0, 1]
    assert next(s for s in doc["settings"] if s["ids"] == [d])["seeds"] == [1, 2]
    code, out, _ = run_compare(capsys, base, new)
    assert f"**Verdict: regression** in `{d}` seed 0 no longer finishes (BASE ok, NEW diverged)." in out
    assert f"- no longer finishes: `{d}` seed 0 (BASE ok, NEW diverged)" in out
    assert f"- recipe changed: `{b}` seeds 0, 1, 2 (epochs 4 -> 5)" in out


def test_runs_unfinished_alike_in_both_stores_are_no_change_and_finishing_again_no_regression(base, tmp_path,
                                                                                              capsys):
    def diverge(r):
        return dataclasses.replace(r, status="diverged", error="non-finite", metrics=None, predictions=None,
                                   best_epoch=None) if r.id == IDS[0] else r
    one = store(tmp_path / "one", diverge)
    code, out, _ = run_compare(capsys, one, one)
    assert code == 0 and "**Verdict: no change.**" in out
    assert f"- not finished: `{IDS[0]}` seeds 0, 1, 2 (BASE diverged, NEW diverged)" in out
    code, out, _ = run_compare(capsys, one, base)  # diverged in BASE, ok in NEW: listed, no regression
    assert code == 0 and "**Verdict: no regression.**" in out and "(BASE diverged, NEW ok)" in out


def test_ids_holding_the_same_runs_are_one_setting_tested_once(tmp_path, capsys):
    """The default suite stores one recipe under three ids (reused_from): one line, one test in Holm's family."""
    source = [r for r in _runs() if r.id == IDS[0]]
    twins = [dataclasses.replace(r, id="twin", reused_from=r.id, weights=None) for r in source]
    old = store(tmp_path / "old", runs=[*_runs(), *twins])
    new = store(tmp_path / "new", lambda r: turned_wrong(r) if r.id in (IDS[0], "twin") else r, runs=[*_runs(), *twins])
    code, out, _ = run_compare(capsys, old, new, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["regressions"] == [[IDS[0], "twin"]]
    assert len(doc["settings"]) == len(IDS)  # six ids, five settings
    code, out, _ = run_compare(capsys, old, new)
    assert f"| `{IDS[0]}` (= `twin`) |" in out


def test_an_unreadable_result_file_is_listed_and_the_rest_compared(base, tmp_path, capsys):
    new = store(tmp_path / "new")
    (new / "runs" / IDS[0] / "seed-1.json").write_text("{not json")
    code, out, _ = run_compare(capsys, base, new)
    assert code == 0 and "Skipped files of NEW" in out and "unreadable result file" in out
    assert f"- removed: `{IDS[0]}` seed 1" in out


def test_out_writes_the_table_and_says_the_verdict(base, tmp_path, capsys):
    new = store(tmp_path / "new", lambda r: turned_wrong(r) if r.id == IDS[1] else r)
    code, out, _ = run_compare(capsys, base, new, "--out", tmp_path / "compare.md")
    assert code == 1 and out == f"regression ({IDS[1]}); table written to {tmp_path / 'compare.md'}\n"
    text = (tmp_path / "compare.md").read_text()
    assert text.startswith("## cxr-bench compare\n") and "Gate: a regression is" in text


def test_min_effect_keeps_a_small_significant_drop_from_failing(base, tmp_path, capsys):
    """5 images of 300 wrong in every seed (1.67 points) is significant; a minimal effect of 2 points lets it pass."""
    new = store(tmp_path / "new", lambda r: turned_wrong(r, 5) if r.id == IDS[2] else r)
    assert run_compare(capsys, base, new)[0] == 1
    assert run_compare(capsys, base, new, "--min-effect", "2")[0] == 0


def test_the_gates_holm_family_is_every_setting_and_metric():
    tests = [{"metrics": {m: {"diff": -0.02, "p_value": p} for m in gate.METRICS}, "identical": False,
              "throughput": None} for p in (0.001, 0.02)]
    judged = gate.judge(tests, gate.Gate())
    # 6 tests: 0.001 x 6, 5, 4 -> 0.006; then 0.02 x 3 = 0.06 (and x 2, x 1, held up to 0.06 by the step-down)
    assert [t["p_adjusted"]["accuracy"] for t in judged] == pytest.approx([0.006, 0.06])
    assert [t["verdict"] for t in judged] == ["regression", "no change"]


def test_a_cpu_device_name_names_its_model_and_cores_so_that_two_cpus_do_not_compare_throughput():
    import os

    import torch

    from cxr import env

    name = env.device_name(torch.device("cpu"))
    assert name == f"{env.cpu_model()}, {os.cpu_count()} cores" and env.cpu_model().strip()
