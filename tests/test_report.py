"""The Markdown report: golden files on fabricated results, figure links, sentences, benchmarks.

Result files are fabricated here as cxr.train writes them: cxr.spec for the spec and id (with the
title and grid of the shipped spec files), cxr.metrics for the metrics, cxr.record.RunRecord (schema
version 2, checked against its JSON Schema) stored with cxr.results.write, with fixed dates and commit,
so the rendered Markdown is byte-stable. Regenerate the golden files after an intended change:

    CXR_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

import cxr.report.figures as figures_mod
from cxr import record, report, results, stats
from cxr import spec as spec_mod
from cxr.metrics import binary_metrics
from cxr.spec import ExperimentSpec

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
UPDATE = os.environ.get("CXR_UPDATE_GOLDEN") == "1"


@dataclass(frozen=True)
class Task:
    """The settings fabricated for one spec file, with the file's sweep, title and grid."""

    settings: tuple  # ExperimentSpec keyword arguments, one per setting
    sweep: tuple
    source: str
    title: str = ""
    grid: tuple = ()


def from_spec_file(path: str | Path, settings: tuple, source: str | None = None) -> Task:
    """A Task with the sweep, title and grid of a spec file, as cxr.spec.load_file reads them."""
    first = spec_mod.load_file(path)[0]
    return Task(settings, first.sweep, source or str(path), first.title, first.grid)


def _shipped(name: str, settings: tuple) -> Task:
    return from_spec_file(REPO / "specs" / name, settings, f"specs/{name}")


TASK_A = _shipped("task-a-loss.toml", tuple({"name": "loss", "loss": v} for v in ("bce", "ce")))
TASK_LR = _shipped("task-b-lr.toml", tuple({"name": "lr", "lr": v} for v in (0.001, 0.01, 0.1)))
TASK_BS = _shipped("task-b-batch-size.toml", tuple({"name": "bs", "batch_size": v} for v in (32, 64, 128)))


def _y_true(n_test: int) -> np.ndarray:
    n_normal = round(n_test * 0.375)  # PneumoniaMNIST's test balance: 234 / 624
    labels = np.r_[np.zeros(n_normal, int), np.ones(n_test - n_normal, int)]
    return np.random.default_rng(123).permutation(labels)


def fabricate(kw: dict, task: Task, seed: int, *, acc: float = 0.85, status: str = "ok",
              n_test: int = 60, epochs: int = 4, error: str | None = None, stop_epoch: int = 2,
              index: int = 0) -> record.RunRecord:
    """One run record as cxr.train.run writes it; numbers are deterministic in (id, seed)."""
    spec = ExperimentSpec(**kw, epochs=epochs, seed=seed, sweep=task.sweep, source=task.source, title=task.title,
                          grid=task.grid)
    rng = np.random.default_rng([seed, zlib.crc32(spec.id.encode())])
    n_hist = {"ok": epochs, "diverged": stop_epoch, "failed": 0}[status]
    history = []
    for e in range(1, n_hist + 1):
        tl = 0.25 + 0.45 * np.exp(-e / 2) + rng.normal(0, 0.01)
        vl = tl + 0.06 + rng.normal(0, 0.01)
        history.append({"epoch": e, "lr": spec.lr, "train_loss": round(tl, 4),
                        "train_accuracy": round(1 - tl / 2, 4), "val_loss": round(vl, 4),
                        "val_accuracy": round(1 - vl / 2, 4), "val_auroc": round(1 - vl / 4, 4),
                        "seconds": 1.5})
    if status == "diverged":
        history[-1] = {"epoch": stop_epoch, "lr": spec.lr, "train_loss": None, "train_accuracy": 0.5,
                       "seconds": 1.5}
    metrics = predictions = best_epoch = None
    if status == "ok":
        y = _y_true(n_test)
        mu = norm.ppf(acc) + rng.normal(0, 0.05)
        y_score = 1 / (1 + np.exp(-((2 * y - 1) * mu + rng.normal(0, 1, n_test)) * 1.5))
        y_score = np.round(y_score, 6)
        test = {**binary_metrics(y, y_score), "loss": round(0.3 + rng.normal(0, 0.01), 4)}
        metrics = {"val": test, "test": test}
        predictions = {"y_true": y.tolist(), "y_score": y_score.tolist(),
                       "y_pred": (y_score > 0.5).astype(int).tolist()}
        best_epoch = int(epochs - rng.integers(0, 2))
    minute = 10 + 2 * index
    n_normal = round(n_test * 0.375)
    return record.from_dict({
        "schema_version": 2, "id": spec.id, "seed": seed, "spec": spec.to_dict(),
        "spec_hash": spec.spec_hash(),
        "status": status, "error": error, "history": history, "best_epoch": best_epoch,
        "metrics": metrics, "predictions": predictions,
        "timing": None if status == "failed" else
        {"train_seconds": round(6.0 * 32 / spec.batch_size + 0.1 * seed, 3),
         "images_per_second": round(900.0 * spec.batch_size / 32, 1), "eval_seconds": 0.2},
        "environment": {"python": "3.11.7", "torch": "2.13.0+cpu", "cuda": None, "device": "cpu",
                        "device_name": "x86_64", "cpu": "x86_64, 2 cores, 2 torch threads",
                        "hostname": "fixture",
                        "git_commit": "abc1234", "git_dirty": False, "version": "0.0.0",
                        "started_at": f"2025-03-01T10:{minute:02d}:00+00:00",
                        "finished_at": f"2025-03-01T10:{minute + 1:02d}:30+00:00"},
        "dataset": {"source": "synthetic", "name": "synthetic (procedural, not real X-rays)",
                    "synthetic": True, "image_size": 28,
                    "splits": {"train": {"n": 400, "normal": 100, "pneumonia": 300},
                               "val": {"n": 80, "normal": 20, "pneumonia": 60},
                               "test": {"n": n_test, "normal": n_normal, "pneumonia": n_test - n_normal}}},
        "weights": None if status != "ok" else f"runs/{spec.id}/seed-{seed}/model_weights.pth",
        "reused_from": None,
    }, f"fabricated {spec.run_id}")


def write_runs(out: Path, runs: list[record.RunRecord]) -> Path:
    for r in runs:
        results.write(out, r)
    return out


def full_suite(out: Path, n_test: int = 60, epochs: int = 4) -> Path:
    """All three comparisons, 3 seeds; lr 0.1 diverges in every seed, one bs 128 run fails."""
    runs, i = [], 0
    accs = {("loss", "bce"): 0.86, ("loss", "ce"): 0.84, ("lr", 0.001): 0.86, ("lr", 0.01): 0.80,
            ("bs", 32): 0.86, ("bs", 64): 0.85, ("bs", 128): 0.80}
    for task in (TASK_A, TASK_LR, TASK_BS):
        for kw in task.settings:
            for seed in (0, 1, 2):
                key = (kw["name"], kw[task.sweep[0]])
                common = dict(n_test=n_test, epochs=epochs, index=i)
                if kw.get("lr") == 0.1:
                    stop = 1 + seed % 2
                    r = fabricate(kw, task, seed, status="diverged", stop_epoch=stop,
                                  error=f"non-finite training loss in epoch {stop} (lr 0.1)", **common)
                elif kw.get("batch_size") == 128 and seed == 1:
                    r = fabricate(kw, task, seed, status="failed",
                                  error="RuntimeError: out of memory", **common)
                else:
                    r = fabricate(kw, task, seed, acc=accs[key], **common)
                runs.append(r)
                i += 1
    return write_runs(out, runs)


def partial_suite(out: Path) -> Path:
    """Task B learning rate only, one seed, lr 0.1 never run: two tasks and a setting missing."""
    runs = [fabricate(kw, TASK_LR, 0, acc=a, index=i)
            for i, (kw, a) in enumerate(zip(TASK_LR.settings[:2], (0.85, 0.80), strict=True))]
    return write_runs(out, runs)


def diverged_suite(out: Path) -> Path:
    """Only diverged runs: Task B learning rate 0.1, two seeds."""
    runs = [fabricate(TASK_LR.settings[2], TASK_LR, s, status="diverged", stop_epoch=1, index=s,
                      error="non-finite training loss in epoch 1 (lr 0.1)") for s in (0, 1)]
    return write_runs(out, runs)


def golden(name: str, text: str) -> None:
    path = FIXTURES / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} missing: run CXR_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py"
    assert text == path.read_text(encoding="utf-8"), f"{name} changed: diff it, then CXR_UPDATE_GOLDEN=1"


# ------------------------------------------------------------------------------ golden files

@pytest.mark.parametrize(("name", "make"), [("report-full.md", full_suite),
                                            ("report-partial.md", partial_suite),
                                            ("report-diverged.md", diverged_suite)])
def test_golden(tmp_path, monkeypatch, name, make):
    monkeypatch.chdir(REPO)  # spec files are named relative to the current directory
    out = report.render(make(tmp_path / "results"), figures=False, specs=[REPO / "specs"])
    text = out.read_text(encoding="utf-8")
    assert out == tmp_path / "results" / "report.md"
    assert str(tmp_path) not in text and "/work/" not in text  # no absolute paths
    golden(name, text)


def test_full_report_numbers_agree_with_the_runs(tmp_path):
    text = report.render(full_suite(tmp_path), figures=False).read_text()
    runs = [r for r in results.load_all(tmp_path) if r.id == "loss-bce-lr0.001-bs32"]
    acc = stats.mean_std_ci([r.test("accuracy") for r in runs], bounds=(0, 1))
    row = next(line for line in text.splitlines() if line.startswith("| BCE | 3 ok |"))
    assert f"| {report.pct_ms(acc)} | {report.pct_ci(acc)} |" in row
    # lr 0.1 diverged in every seed: counted, listed, never averaged in
    assert "| learning rate 0.1 | 0 ok, 3 diverged | n/a | n/a |" in text
    assert "- Learning rate 0.1: all 3 runs diverged (stopped in epoch 1, 2, 1), so it has no test metrics." \
        in text
    assert "- Batch size 128: 1 of 3 runs failed (seed 1); its row averages the 2 runs that finished." in text
    assert "| `bs-ce-lr0.001-bs128` | 1 | failed | 0 of 4 | RuntimeError: out of memory |" in text
    assert "**Warning: synthetic data.**" in text
    assert "**not run**" not in text and "Missing:" not in text
    # the 3-way comparisons say how pairs were chosen
    assert "against the most accurate one (batch size 32), the p-values adjusted with Holm" in text


def test_partial_report_says_what_is_missing(tmp_path):
    text = report.render(partial_suite(tmp_path), figures=False, specs=[REPO / "specs"]).read_text()
    assert "- Task A: BCE vs CE: **not run**" in text
    assert "- Task B: batch size: **not run**" in text
    assert "**Missing:** Not run: learning rate 0.1 (the spec file's grid is 0.001, 0.01, 0.1)." in text
    assert "a standard deviation and a 95% interval need two seeds, so they show as n/a." in text
    assert "| learning rate 0.001 | 1 ok |" in text and "± n/a | n/a |" in text
    # one seed: McNemar and the image bootstrap still run, and say what they cover
    assert "With one seed the interval covers the sampling of test images only" in text


def test_missing_seed_is_reported(tmp_path):
    runs = [fabricate(TASK_A.settings[0], TASK_A, s) for s in (0, 1)]
    runs.append(fabricate(TASK_A.settings[1], TASK_A, 0))
    text = report.render(write_runs(tmp_path, runs), figures=False).read_text()
    assert "**Missing:** CE has no result for seed 1 (other settings have seeds 0, 1)." in text
    assert re.search(r"\| (BCE − CE|CE − BCE) \| 0 \|", text)  # paired on the shared seed only


def test_reused_runs_are_noted_and_not_timed_twice(tmp_path):
    runs = [fabricate(TASK_LR.settings[0], TASK_LR, 0), fabricate(TASK_LR.settings[1], TASK_LR, 0)]
    runs[1] = dataclasses.replace(runs[1], reused_from="loss-ce-lr0.01-bs32")  # train.py copies a same recipe
    text = report.render(write_runs(tmp_path, runs), figures=False).read_text()
    assert "| Runs | 2: 2 ok, 0 diverged, 0 failed; 1 reused the stored result of an identical run" in text
    assert "| Total time | 6.2 s of training and evaluation over 1 run;" in text  # 6.0 s + 0.2 s eval
    assert "same recipe as `loss-ce-lr0.01-bs32`: its result reused |" in text


def test_empty_and_absent_results_dir(tmp_path):
    text = report.render(tmp_path, figures=False, specs=[REPO / "specs"]).read_text()
    assert "**No results.**" in text and text.count("**not run**") == 3
    assert str(REPO) not in text  # spec files named relative to the current directory
    # without spec files the report expects nothing
    text = report.render(tmp_path, figures=False).read_text()
    assert "**No results.**" in text and "not run" not in text and "## Task" not in text
    with pytest.raises(report.ReportError, match="no such results directory"):
        report.render(tmp_path / "nope")


def test_different_test_sets_get_no_paired_test(tmp_path):
    runs = [fabricate(TASK_A.settings[0], TASK_A, 0, n_test=60),
            fabricate(TASK_A.settings[1], TASK_A, 0, n_test=40)]
    text = report.render(write_runs(tmp_path, runs), figures=False).read_text()
    assert "No paired test: the runs were not evaluated on the same test images" in text


# ---------------------------------------------------------------------------------- figures

def test_every_linked_figure_exists(tmp_path):
    results_dir = full_suite(tmp_path / "results", n_test=120, epochs=3)
    out = report.render(results_dir, tmp_path / "site" / "report.md")
    text = out.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    # 3 comparisons x (curves, ROC, accuracy)
    assert len(links) == 9 and len(set(links)) == 9
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("figures/")
        png = out.parent / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    assert sorted(p.name for p in (out.parent / "figures").iterdir()) == sorted(Path(x).name for x in links)


def test_other_comparisons_two_keys_and_no_sweep(tmp_path):
    grid = Task((), ("lr", "batch_size"), "specs/grid.toml", "", (("lr", (0.001, 0.01)), ("batch_size", (32, 64))))
    runs = [fabricate({"name": "grid", "lr": lr, "batch_size": bs}, grid, 0, n_test=40, epochs=2)
            for lr in (0.001, 0.01) for bs in (32, 64)]
    runs.append(fabricate({"name": "single"}, Task((), (), "specs/single.toml"), 0, n_test=40, epochs=2))
    out = report.render(write_runs(tmp_path, runs))
    text = out.read_text()
    assert "## Other comparisons" in text
    assert "- Other: `grid`, 4 settings, 4 runs (4 ok)." in text
    assert "| learning rate 0.01, batch size 64 | 1 ok |" in text
    assert "| single-ce-lr0.001-bs32 | 1 ok |" in text and "No paired test: one setting only" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == [f"figures/grid-lr-batch_size-{k}.png" for k in ("accuracy", "curves", "roc")] + \
        [f"figures/single-single-{k}.png" for k in ("curves", "roc")]  # one setting: no accuracy plot
    assert all((out.parent / link).is_file() for link in links)


# -------------------------------------------------------------------------------- sentences

BOOT = {"diff": 0.004, "ci_low": -0.006, "ci_high": 0.014, "p_value": 0.61, "n_boot": 2000, "n_seeds": 3,
        "n_images": 624}


def test_pair_sentence_no_evidence_when_p_at_least_alpha():
    s = report.pair_sentence("CE", "BCE", BOOT, 0.61)
    assert s == ("CE and BCE differ by 0.40 points of test accuracy (CE higher; 95% CI −0.60 to 1.40 points; "
                 "paired bootstrap, p = 0.610): no evidence of a difference at n = 3 seeds, 624 test images.")
    assert "no evidence of a difference" in report.pair_sentence("CE", "BCE", BOOT, 0.05)


def test_pair_sentence_evidence_when_p_below_alpha():
    boot = {**BOOT, "diff": -0.02, "ci_low": -0.03, "ci_high": -0.01, "p_value": 0.0005}
    s = report.pair_sentence("CE", "BCE", boot, 0.0005)
    assert s.startswith("BCE is more accurate than CE by 2.00 points of test accuracy "
                        "(95% CI 1.00 to 3.00 points")
    assert "p < 0.001" in s and "evidence of a difference at the 5% level" in s and "no evidence" not in s
    assert "evidence of a difference at the 5% level" in report.pair_sentence("CE", "BCE", boot, 0.0499)


def test_pair_sentence_names_holm_and_single_seed():
    s = report.pair_sentence("A", "B", {**BOOT, "n_seeds": 1}, 0.2, n_tests=2)
    assert "after Holm's adjustment for 2 tests" in s and "n = 1 seed," in s and "With one seed" in s
    assert "Holm" not in report.pair_sentence("A", "B", BOOT, 0.2)


def test_mcnemar_sentence_counts():
    rows = [{"seed": 0, "p_value": 0.01}, {"seed": 1, "p_value": 0.2}, {"seed": 2, "p_value": 0.04}]
    assert report.mcnemar_sentence(rows).endswith("p < 0.05 for 2 of 3 seeds (seeds 0, 2).")
    assert report.mcnemar_sentence(rows[1:2]).endswith("p ≥ 0.05 for the one seed.")
    assert report.mcnemar_sentence(rows[1:]).endswith("p < 0.05 for 1 of 2 seeds (seed 2).")


def _setting(label, accs, aurocs=None, statuses=None, values=(0.0,)):
    statuses = statuses or ["ok"] * len(accs)
    runs = tuple(record.RunRecord(id="x", seed=i, spec={}, spec_hash="0" * 16, status=st, environment={},
                                  history=({}, {})) for i, st in enumerate(statuses))
    ok = tuple(r for r in runs if r.ok)
    none = stats.mean_std_ci([])
    return report.Setting(values=values, label=label, runs=runs, ok=ok, accuracy=stats.mean_std_ci(accs),
                          auroc=stats.mean_std_ci(aurocs or [0.9] * len(accs)), sensitivity=none,
                          specificity=none, train_loss=none, train_seconds=none, images_per_second=none,
                          best_epochs="n/a", n_diverged=statuses.count("diverged"),
                          n_failed=statuses.count("failed"))


def test_best_sentences():
    a, b = _setting("BCE", [0.8, 0.82], [0.95, 0.95]), _setting("CE", [0.85, 0.85], [0.90, 0.90])
    assert report.best_sentences([a, b]) == [
        "Highest mean test accuracy: CE, 85.00% ± 0.00 over 2 seeds.",
        "The highest mean AUROC is BCE's (0.950), not the most accurate setting's: accuracy depends on the "
        "0.5 threshold, AUROC does not."]
    tie = report.best_sentences([_setting("A", [0.8]), _setting("B", [0.8])])
    assert tie == ["A and B tie for the highest mean test accuracy, 80.00%."]
    gone = _setting("lr 0.1", [], statuses=["diverged"] * 3)
    assert report.best_sentences([gone]) == [
        "No setting has a finished run, so there are no test metrics to compare."]
    assert report.best_sentences([a, gone]) == [
        "Only BCE has finished runs; the other settings have no test metrics."]


def test_status_and_trend_sentences():
    gone = _setting("learning rate 0.1", [], statuses=["diverged"] * 3)
    assert report.status_sentences(gone) == [
        "learning rate 0.1: all 3 runs diverged (stopped in epoch 2, 2, 2), so it has no test metrics."]
    mixed = _setting("bs 128", [0.8], statuses=["diverged", "ok", "failed"])
    assert report.status_sentences(mixed) == [
        "bs 128: 1 of 3 runs diverged (seed 0) and 1 of 3 runs failed (seed 2); its row averages the 1 run "
        "that finished."]
    assert report.status_sentences(_setting("x", [], statuses=["failed"] * 2)) == [
        "x: both runs failed, so it has no test metrics."]
    assert report.status_sentences(_setting("ok", [0.8])) == []
    falling = [_setting(f"lr {v}", [a], values=(v,)) for v, a in ((0.1, 0.6), (0.001, 0.9), (0.01, 0.8))]
    assert report.trend_sentence("lr", falling) == [
        "Mean test accuracy falls as learning rate grows: 90.00% (0.001), 80.00% (0.01), 60.00% (0.1)."]
    bumpy = [_setting("", [a], values=(v,)) for v, a in ((32, 0.8), (64, 0.9), (128, 0.85))]
    assert report.trend_sentence("batch_size", bumpy)[0].startswith("Mean test accuracy is not monotonic")
    assert report.trend_sentence("lr", falling[:2]) == []


def test_baseline_sentence_only_at_or_below_majority():
    test_set = {"n": 624, "normal": 234, "pneumonia": 390}
    low, high = _setting("lr 0.1", [0.625]), _setting("lr 0.001", [0.9])
    assert report.baseline_sentences([low, high], test_set) == [
        "lr 0.1: mean test accuracy 62.50% is no better than always predicting pneumonia (62.50%)."]
    assert report.baseline_sentences([high], None) == []


def test_formatting_filters():
    s = stats.mean_std_ci([0.87, 0.88, 0.86])
    assert report.pct(0.87662) == "87.66%" and report.pct(None) == "n/a"
    assert report.pct_ms(s) == "87.00 ± 1.00" and report.pct_ci(s) == "[84.52, 89.48]"
    one = stats.mean_std_ci([0.5])
    assert report.pct_ms(one) == "50.00 ± n/a" and report.pct_ci(one) == "n/a"
    assert report.pval(0.0004) == "< 0.001" and report.pval(0.61) == "0.610"
    assert report.pts(0.004) == "+0.40" and report.pts(-0.004) == "−0.40"
    assert report.duration(42) == "42.0 s" and report.duration(3900) == "1 h 05 min"


# ------------------------------------------------------------------------------- benchmarks

def test_benchmark_timings_table(tmp_path):
    bench = {"machine_info": {"cpu": {"brand_raw": "Fixture CPU"}, "python_version": "3.11.7"},
             "datetime": "2025-03-01T11:00:00", "version": "5.1.0",
             "benchmarks": [{"name": "test_run[loss-bce-lr0.001-bs32-seed0]",
                             "stats": {"mean": 12.34, "rounds": 1, "min": 12.34, "max": 12.34},
                             "extra_info": {"status": "ok", "train_seconds": 11.5,
                                            "images_per_second": 1234.5, "history": [1, 2]}},
                            {"name": "test_training_throughput[bs32]",
                             "stats": {"mean": 3.0, "rounds": 1},
                             "extra_info": {"batch_size": 32, "ratio": 7.3}}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    out = report.render(partial_suite(tmp_path / "results"), benchmark_json=path, figures=False)
    text = out.read_text()
    assert "From `bench.json`, measured 2025-03-01T11:00:00 on Fixture CPU, Python 3.11.7." in text
    assert "| Benchmark | Rounds | Wall time, s | status | train_seconds | images_per_second |" in text
    assert "| `test_run[loss-bce-lr0.001-bs32-seed0]` | 1 | 12.3 | ok | 11.5 | 1,234 |" in text
    # a benchmark with other extra_info keys gets its own table, not extra columns in the first
    assert "| Benchmark | Rounds | Wall time, s | batch_size | ratio |" in text
    assert text.count("| Benchmark | Rounds |") == 2
    path.write_text("{}")
    with pytest.raises(report.ReportError, match=r"bench.json: not a pytest-benchmark JSON file"):
        report.render(tmp_path / "results", benchmark_json=path, figures=False)


def test_templates_dir_holds_the_template():
    assert (report.templates_dir() / "report.md.j2").is_file()


def test_training_line_names_the_recipe_options_that_are_on():
    from cxr.spec import ExperimentSpec

    plain = report._training(ExperimentSpec().to_dict())
    assert plain == "adam, schedule none, weight decay 0, best epoch chosen on validation loss"
    recipe = report._training(ExperimentSpec(optimizer="adamw", schedule="onecycle", weight_decay=0.05,
                                             label_smoothing=0.1, augment_rotate=8, ema=0.99,
                                             select="auroc").to_dict())
    assert recipe == ("adamw, schedule onecycle, weight decay 0.05, label smoothing 0.1, augmentation "
                      "rotation 8°, weight EMA 0.99, best epoch chosen on validation auroc")


def test_pair_sentence_flags_an_unadjusted_interval_that_excludes_zero():
    boot = {**BOOT, "diff": 0.0315, "ci_low": 0.0053, "ci_high": 0.0609}
    s = report.pair_sentence("lr 0.01", "lr 0.001", boot, 0.052, n_tests=2)
    assert "no evidence of a difference" in s and "excludes 0: the difference is suggestive" in s
    assert "suggestive" not in report.pair_sentence("lr 0.01", "lr 0.001", boot, 0.052)  # one test: no Holm
    assert "suggestive" not in report.pair_sentence("a", "b", BOOT, 0.6, n_tests=2)  # interval holds 0
    assert "suggestive" not in report.pair_sentence("a", "b", boot, 0.01, n_tests=2)  # already evidence


# ------------------------------------------------------------------- records, data model, specs

V1 = FIXTURES / "v1"  # a result file as the code before cxr.record wrote it (schema version 1), unchanged


def test_schema_version_1_result_is_rendered(tmp_path):
    raw = json.loads((V1 / "runs/recipe-ce-lr0.002-bs64/seed-0.json").read_text())
    assert raw["schema_version"] == 1 and "reused_from" not in raw
    out = report.render(V1, tmp_path / "report.md")
    text = out.read_text()
    test = raw["metrics"]["test"]
    assert (f"| `recipe-ce-lr0.002-bs64` | 0 | ok | {report.pct(test['accuracy'])} | {report.num(test['auroc'])} | "
            f"{raw['best_epoch']} of 30 | {report.secs(raw['timing']['train_seconds'])} |  |") in text
    assert f"| recipe-ce-lr0.002-bs64 | 1 ok | {report.pct(test['accuracy'])[:-1]} ± n/a |" in text
    assert "| Training | adamw, schedule onecycle, weight decay 0.05, label smoothing 0.1" in text
    assert "| Commit | 31e96ba |" in text
    # written before spec titles: no section of its own, no grid to miss
    assert "## Other comparisons" in text and "- Other: `recipe`, 1 setting, 1 run (1 ok)." in text
    assert "Missing:" not in text and "not run" not in text
    assert "source `npz:pneumoniamnist-trainval.npz?holdout=0.5`" in text and "/work/" not in text
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"recipe-single-curves.png",
                                                                   "recipe-single-roc.png"}


def test_comparison_and_setting_are_immutable(tmp_path):
    runs = [fabricate(kw, TASK_A, s, n_test=40, epochs=2) for kw in TASK_A.settings for s in (0, 1)]
    (c,) = report.comparisons(results.load_all(write_runs(tmp_path, runs)))
    assert c.section == "Task A: BCE vs CE" and dict(c.grid) == {"loss": ("bce", "ce")}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.title = "changed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.settings[0].label = "changed"
    for field in ("sweep", "settings", "pairs", "not_ok", "missing", "sentences", "figures", "grid"):
        assert isinstance(getattr(c, field), tuple), field
    s = c.settings[0]
    assert isinstance(s.runs, tuple) and isinstance(s.ok, tuple) and isinstance(s.values, tuple)
    with pytest.raises(TypeError):
        s.accuracy["mean"] = 0.5  # summaries are read-only mappings
    with pytest.raises(TypeError):
        c.test_set["n"] = 1
    with pytest.raises(TypeError):
        c.pairs[0].boot["p_value"] = 0.0
    with pytest.raises(AttributeError):
        c.figures.append(None)
    # figures make a new comparison; the one drawn from is unchanged
    drawn = figures_mod.with_figures(c, tmp_path / "figures")
    assert c.figures == () and isinstance(drawn.figures, tuple) and len(drawn.figures) == len(report.FIGURE_KINDS)
    assert drawn.settings is c.settings and drawn.title == c.title


def test_figure_table_is_the_single_source(tmp_path, monkeypatch):
    runs = [fabricate(kw, TASK_A, s, n_test=40, epochs=2) for kw in TASK_A.settings for s in (0, 1)]
    results_dir = write_runs(tmp_path / "results", runs)
    out = report.render(results_dir, tmp_path / "site" / "report.md")
    text = out.read_text()
    names = {p.name for p in (out.parent / "figures").iterdir()}
    assert names == {f"loss-{kind.kind}.png" for kind in report.FIGURE_KINDS}
    for kind in report.FIGURE_KINDS:
        assert f"![loss: {kind.alt}](figures/loss-{kind.kind}.png)" in text
    # adding a figure is one entry in the table: file, link, alt text and caption follow from it
    def draw(c, path):
        return report.accuracy_figure(c, path) and "An extra figure."

    extra = report.FigureKind("extra", "an extra view", draw)
    monkeypatch.setattr(figures_mod, "FIGURE_KINDS", (*report.FIGURE_KINDS, extra))
    text = report.render(results_dir, tmp_path / "site2" / "report.md").read_text()
    assert "![loss: an extra view](figures/loss-extra.png)\n\n*An extra figure.*" in text
    assert (tmp_path / "site2" / "figures" / "loss-extra.png").read_bytes()[:4] == b"\x89PNG"


def test_spec_title_is_the_heading_and_its_grid_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "focal.toml").write_text('[experiment]\nname = "focal"\ntitle = "Focal loss or not"\nepochs = 2\n'
                                      'seeds = [0]\n\n[grid]\nloss = ["ce", "focal", "bce"]\n')
    (specs / "later.toml").write_text('[experiment]\nname = "later"\ntitle = "Planned: weight decay"\n\n'
                                      '[grid]\nweight_decay = [0.0, 0.05]\n')
    (specs / "untitled.toml").write_text('[experiment]\nname = "untitled"\n')
    task = from_spec_file(specs / "focal.toml", ({"name": "focal", "loss": "ce"}, {"name": "focal", "loss": "focal"}))
    assert task.title == "Focal loss or not" and task.grid == (("loss", ("ce", "focal", "bce")),)
    results_dir = write_runs(tmp_path / "results", [fabricate(kw, task, 0, epochs=2) for kw in task.settings])
    text = report.render(results_dir, figures=False, specs=[specs]).read_text()
    assert "\n## Focal loss or not\n\n### `focal`: CE vs focal\n" in text
    assert "- Focal loss or not: `focal`, 2 settings, 2 runs (2 ok); **incomplete** (1 gap listed below)." in text
    assert "**Missing:** Not run: BCE (the spec file's grid is CE, focal, BCE)." in text
    # a titled spec file without results: not run, named relative to the current directory
    assert ("- Planned: weight decay: **not run** (no results of a spec that sweeps `weight_decay`, e.g. "
            "`specs/later.toml`).") in text
    assert "**Not run.** There are no results of a spec that sweeps `weight_decay`; `cxr-bench run " \
           "specs/later.toml` produces them." in text
    assert text.index("## Focal loss or not") < text.index("## Planned: weight decay")  # spec file order
    assert "untitled" not in text and "Other" not in text and str(tmp_path) not in text
    # without the spec files the results still carry their title; nothing else is expected
    text = report.render(results_dir, figures=False).read_text()
    assert "\n## Focal loss or not\n" in text and "Planned" not in text
    assert "**Missing:** Not run: BCE (the spec file's grid is CE, focal, BCE)." in text


def test_loss_labels_come_from_the_loss_table():
    assert [report.value_text("loss", v) for v in ("bce", "ce", "focal")] == ["BCE", "CE", "focal"]
    assert report.setting_label(("loss",), ("focal",)) == "focal"
    assert report.setting_label(("lr", "loss"), (0.01, "bce")) == "learning rate 0.01, loss function BCE"


def test_missing_grid_points_of_a_two_key_grid():
    runs = (record.RunRecord(id="x", seed=0, spec={}, spec_hash="0" * 16, status="ok", environment={}),)
    none = stats.mean_std_ci([])
    settings = [report.Setting(values=v, label="", runs=runs, ok=runs, accuracy=none, auroc=none, sensitivity=none,
                               specificity=none, train_loss=none, train_seconds=none, images_per_second=none,
                               best_epochs="n/a", n_diverged=0, n_failed=0) for v in ((0.001, 32), (0.01, 64))]
    grid = {"lr": (0.001, 0.01), "batch_size": (32, 64)}
    assert report.missing_sentences(("lr", "batch_size"), grid, settings) == [
        "Not run: learning rate 0.001, batch size 64; learning rate 0.01, batch size 32 (the spec file's grid is "
        "learning rate 0.001, 0.01 × batch size 32, 64)."]
    assert report.missing_sentences(("lr", "batch_size"), {}, settings) == []  # written before grids


def test_report_error_is_a_cxr_error():
    from cxr.errors import CxrError

    assert issubclass(report.ReportError, CxrError)


def test_modules_stay_small():
    for path in Path(report.__file__).parent.glob("*.py"):
        assert len(path.read_text().splitlines()) < 400, path.name
