"""The Markdown report: golden files on fabricated results, figure links, sentences, benchmarks.

Result files are fabricated here as cxr.sweep writes them: cxr.spec for the spec and id (with the
title and grid of the shipped spec files), cxr.metrics for the metrics, cxr.record.RunRecord (schema
version 2, checked against its JSON Schema) stored with cxr.results.write, with fixed dates and commit,
so the rendered Markdown is byte-stable. Regenerate the golden files after an intended change:

    CXR_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
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


FINGERPRINT = {"train": "1111aaaa2222bbbb", "val": "3333cccc4444dddd", "test": "5555eeee6666ffff"}


PLAIN_DECISION = {"rule": "argmax", "threshold": 0.5, "prior": None, "tta": 0, "augment": None}
TRAIN_PREVALENCE = 0.75  # the fabricated train split: 300 pneumonia of 400


def decision_of(spec: ExperimentSpec) -> dict:
    """cxr.decision.Decision.of(spec, y_train).to_dict() for the fabricated train split."""
    prior = TRAIN_PREVALENCE if spec.decision == "equal-prior" else None
    return {"rule": spec.decision, "threshold": prior or 0.5, "prior": prior, "tta": spec.tta,
            "augment": [spec.augment_shift, spec.augment_rotate, spec.augment_scale] if spec.tta else None}


def fabricate(kw: dict, task: Task, seed: int, *, acc: float = 0.85, status: str = "ok",
              n_test: int = 60, epochs: int = 4, error: str | None = None, stop_epoch: int = 2,
              index: int = 0, fingerprint: dict | None = FINGERPRINT,
              training_version: int | None = 1, bias: float = 0.0, shared: float = 0.0) -> record.RunRecord:
    """One run record as cxr.sweep.run writes it; numbers are deterministic in (id, seed). Every run is
    trained on the same data (FINGERPRINT) by training version 1 unless told otherwise; fingerprint None
    is a record with no identity, as schema version 1 files are read. The decision follows the spec
    (decision, tta): predictions and "test" under it, "test_plain" of the plain outputs (argmax, no TTA)
    when it is not the plain argmax. bias shifts the logits towards pneumonia (> 0) or normal (< 0); shared is
    the weight of image noise common to every seed (hard images are hard for every seed), 0 = independent."""
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
        common = np.random.default_rng(n_test).normal(0, 1, n_test)
        noise = rng.normal(0, 1, n_test) * np.sqrt(1 - shared ** 2) + shared * common
        logit = ((2 * y - 1) * mu + noise) * 1.5 + bias
        y_score = np.round(1 / (1 + np.exp(-logit)), 6)
        test = {**binary_metrics(y, y_score), "loss": round(0.3 + rng.normal(0, 0.01), 4)}
        metrics = {"val": test, "test": test}
        d = decision_of(spec)
        if d["rule"] != "argmax" or d["tta"]:  # the rule's predictions; the plain outputs kept as test_plain
            plain = test
            if d["tta"]:  # the mean over augmented copies: smoother than the plain outputs
                y_score = np.round(1 / (1 + np.exp(-(logit * 0.8 + rng.normal(0, 0.3, n_test)))), 6)
            y_pred = (y_score > d["threshold"]).astype(int)
            test = {**binary_metrics(y, y_score, y_pred), "loss": plain["loss"]}
            metrics = {"val": test, "test": test, "val_plain": plain, "test_plain": plain}
        predictions = {"y_true": y.tolist(), "y_score": y_score.tolist(),
                       "y_pred": (y_score > d["threshold"]).astype(int).tolist()}
        best_epoch = max(1, int(epochs - rng.integers(0, 2)))
    minute = 10 + 2 * index
    n_normal = round(n_test * 0.375)
    return record.from_dict({
        "schema_version": 2, "id": spec.id, "seed": seed, "spec": spec.to_dict(),
        "spec_hash": spec.spec_hash(),
        "identity": record.identity(spec.spec_hash(), fingerprint, training_version) if fingerprint else None,
        "data_fingerprint": fingerprint, "training_version": training_version if fingerprint else None,
        "decision": decision_of(spec) if fingerprint else None,
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


TASK_RULE = Task(({"name": "rule", "decision": "argmax", "tta": 8, "augment_rotate": 8.0},
                  {"name": "rule", "decision": "equal-prior", "tta": 8, "augment_rotate": 8.0,
                   "class_weight": "balanced"}), ("decision",), "specs/rule.toml", "Decision rules",
                 (("decision", ("argmax", "equal-prior")),))


def decision_suite(out: Path) -> Path:
    """A sweep of the decision rule, both with TTA, 3 seeds; the model leans to pneumonia (as on PneumoniaMNIST's
    test split): argmax finds nearly every pneumonia but few normals, equal-prior (threshold 0.75) balances them."""
    runs = [fabricate(kw, TASK_RULE, s, acc=0.85, bias=2.0, shared=0.8, index=3 * i + s)
            for i, kw in enumerate(TASK_RULE.settings) for s in (0, 1, 2)]
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
                                            ("report-diverged.md", diverged_suite),
                                            ("report-decision.md", decision_suite)])
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


OTHER_TEST = {**FINGERPRINT, "test": "0000aaaa9999bbbb"}  # the same train and val, other test images


def test_different_test_sets_get_no_paired_test(tmp_path):
    runs = [fabricate(TASK_A.settings[0], TASK_A, s, n_test=60) for s in (0, 1)]
    runs += [fabricate(TASK_A.settings[1], TASK_A, s, n_test=40, fingerprint=OTHER_TEST) for s in (0, 1)]
    (c,) = report.comparisons(runs)
    assert c.pairs == () and c.test_set is None
    assert c.pair_scheme == "not paired: different test sets (test split fingerprint 5555eeee for BCE, " \
                            "0000aaaa for CE)"
    text = report.render(write_runs(tmp_path, runs), figures=False).read_text()
    assert ("Not paired: different test sets (test split fingerprint 5555eeee for BCE, 0000aaaa for CE). A paired "
            "test needs every run evaluated on the same test images.") in text
    assert "the same images for every run" not in text and "Test set:" not in text and "| Pair |" not in text
    assert c.sentences[0].startswith("The runs were evaluated on different test sets, so their test metrics")
    # equal labels do not make equal images: the fingerprints decide
    same_labels = [fabricate(kw, TASK_A, 0, fingerprint=fp)
                   for kw, fp in zip(TASK_A.settings, (FINGERPRINT, OTHER_TEST), strict=True)]
    assert same_labels[0].predictions["y_true"] == same_labels[1].predictions["y_true"]
    (c,) = report.comparisons(same_labels)
    assert c.pairs == () and c.pair_scheme.startswith("not paired: different test sets")


def test_runs_without_fingerprints_are_paired_by_labels(tmp_path):
    runs = [fabricate(kw, TASK_A, s, fingerprint=None) for kw in TASK_A.settings for s in (0, 1)]
    text = report.render(write_runs(tmp_path / "a", runs), figures=False).read_text()
    assert ("Test set: 60 images (22 normal, 38 pneumonia), the same labels for every run (test images not "
            "fingerprinted: results written by an older version).") in text
    assert "the same images" not in text and "the same test images;" not in text
    assert "Compared: the two settings on test sets with the same labels (test images not fingerprinted)." in text
    assert re.search(r"\| (BCE − CE|CE − BCE) \| 0, 1 \|", text)
    # without fingerprints, different labels still rule pairing out
    runs = [fabricate(TASK_A.settings[0], TASK_A, 0, n_test=60, fingerprint=None),
            fabricate(TASK_A.settings[1], TASK_A, 0, n_test=40, fingerprint=None)]
    text = report.render(write_runs(tmp_path / "b", runs), figures=False).read_text()
    assert "No paired test: the runs were not evaluated on the same test images (their y_true differ)." in text


# ----------------------------------------------------------- settings: one recipe, data, training version

def test_mixed_epochs_of_one_setting_are_two_rows_never_averaged(tmp_path):
    lr001, lr01 = TASK_LR.settings[:2]
    short = [fabricate(lr01, TASK_LR, 0, epochs=1, acc=0.70, index=0)]  # an old 1-epoch run under the same id
    long = [fabricate(lr01, TASK_LR, s, epochs=10, acc=0.90, index=s) for s in (1, 2)]
    base = [fabricate(lr001, TASK_LR, s, acc=0.85, index=3 + s) for s in (0, 1, 2)]
    assert {r.id for r in short + long} == {"lr-ce-lr0.01-bs32"}
    out = report.render(write_runs(tmp_path / "results", short + long + base), tmp_path / "site" / "report.md")
    text = out.read_text()
    (c,) = report.comparisons(results.load_all(tmp_path / "results"))
    assert [s.label for s in c.settings] == ["learning rate 0.001", "learning rate 0.01 [epochs 1]",
                                             "learning rate 0.01 [epochs 10]"]
    for runs, label in ((short, "learning rate 0.01 [epochs 1]"), (long, "learning rate 0.01 [epochs 10]"),
                        (base, "learning rate 0.001")):
        acc = stats.mean_std_ci([r.test("accuracy") for r in runs], bounds=(0, 1))
        assert f"| {label} | {len(runs)} ok | {report.pct_ms(acc)} | {report.pct_ci(acc)} |" in text
    mixed = stats.mean_std_ci([r.test("accuracy") for r in short + long], bounds=(0, 1))
    assert report.pct_ms(mixed) not in text and "| learning rate 0.01 |" not in text
    assert f"| learning rate 0.01 [epochs 1] | {report.num_ms(c.settings[1].train_loss, 4)} | " \
           f"{short[0].best_epoch} of 1 |" in text
    assert ("- The runs of learning rate 0.01 were trained with different recipes or data (epochs 1; epochs 10), "
            "so they are shown as separate rows, never averaged.") in text
    assert "### `lr`: learning rate 0.001 / 0.01\n" in text and "Mean test accuracy rises" not in text
    assert "has no result for" not in text  # seeds 0, 1, 2 of learning rate 0.01 are all there, over both rows
    assert "the same images for every run" in text  # the same data: the variants are still paired
    assert "learning rate 0.01 [epochs 10] − learning rate 0.001 |" in text
    assert len(re.findall(r"!\[[^\]]*\]\(figures/lr-(curves|roc|accuracy)\.png\)", text)) == 3


def test_variant_labels_name_the_data_and_the_training_version():
    def labels(runs):
        (c,) = report.comparisons(runs)
        return [s.label for s in c.settings], next(x for x in c.sentences if "separate rows" in x)

    bce = TASK_A.settings[0]
    data = [fabricate(bce, TASK_A, 0), fabricate(bce, TASK_A, 1, fingerprint=OTHER_TEST)]
    assert labels(data) == (["BCE [data 0000aaaa]", "BCE [data 5555eeee]"], "The runs of BCE were trained with "
                            "different recipes or data (data 0000aaaa; data 5555eeee), so they are shown as separate "
                            "rows, never averaged.")
    train = [fabricate(bce, TASK_A, 0), fabricate(bce, TASK_A, 1, fingerprint={**FINGERPRINT, "train": "0" * 16})]
    assert labels(train)[0] == ["BCE [train data 00000000]", "BCE [train data 1111aaaa]"]
    version = [fabricate(bce, TASK_A, 0), fabricate(bce, TASK_A, 1, training_version=2)]
    assert labels(version)[0] == ["BCE [training version 1]", "BCE [training version 2]"]
    both = [fabricate(bce, TASK_A, 0), fabricate(bce, TASK_A, 1, epochs=2, training_version=2)]
    assert labels(both)[0] == ["BCE [epochs 2, training version 2]", "BCE [epochs 4, training version 1]"]
    old = [fabricate(bce, TASK_A, 0), fabricate(bce, TASK_A, 1, fingerprint=None)]
    assert labels(old)[0] == ["BCE [data not fingerprinted, training version unknown]",
                              "BCE [data 5555eeee, training version 1]"]
    # one variant per value: the labels of today, no sentence
    (c,) = report.comparisons([fabricate(kw, TASK_A, s) for kw in TASK_A.settings for s in (0, 1)])
    assert [s.label for s in c.settings] == ["BCE", "CE"] and [s.note for s in c.settings] == ["", ""]
    assert not any("separate rows" in x for x in c.sentences)
    # without a sweep the run id is the label
    single = Task((), (), "specs/single.toml")
    runs = [fabricate({"name": "single"}, single, 0, epochs=2), fabricate({"name": "single", "ema": 0.9}, single, 1)]
    assert labels(runs)[0] == ["single-ce-lr0.001-bs32 [epochs 2, ema 0]", "single-ce-lr0.001-bs32 [epochs 4, ema 0.9]"]


# ----------------------------------------------------------------------- files: skipped, atomic, mode

def test_unreadable_result_files_are_skipped_and_listed(tmp_path):
    results_dir = partial_suite(tmp_path / "results")
    good = json.loads((results_dir / "runs/lr-ce-lr0.001-bs32/seed-0.json").read_text())
    (results_dir / "runs/broken-ce-lr0.01-bs32").mkdir()
    (results_dir / "runs/broken-ce-lr0.01-bs32/seed-0.json").write_text('{"schema_version": 2, "id": ')
    (results_dir / "runs/lr-ce-lr0.001-bs32/seed-1.json").write_text(json.dumps({**good, "seed": 1,
                                                                                 "status": "maybe"}))
    (results_dir / "runs/lr-ce-lr0.001-bs32/seed-0.attempt.json").write_text("kept beside an ok result")
    text = report.render(results_dir, figures=False).read_text()
    assert "\n## Skipped files\n\n2 result files could not be read as a run record and are left out of every " \
           "table, test and figure (paths relative to the results directory):\n\n" in text
    assert "\n- `runs/broken-ce-lr0.01-bs32/seed-0.json`: unreadable result file (JSONDecodeError: " in text
    assert "\n- `runs/lr-ce-lr0.001-bs32/seed-1.json`: status: 'maybe' is not one of " in text
    assert text.index("## Coverage") < text.index("## Skipped files") < text.index("## What was run")
    assert str(tmp_path) not in text and "/work/" not in text
    # the readable runs are all there, as without the broken files
    assert "from 2 result files." in text and "| learning rate 0.001 | 1 ok |" in text
    assert "| `lr-ce-lr0.001-bs32` | 1 |" not in text and "attempt" not in text
    # a results directory named relatively, and one whose every file is broken
    (results_dir / "runs/lr-ce-lr0.001-bs32/seed-0.json").write_bytes(b"\xff\xfe")
    (results_dir / "runs/lr-ce-lr0.01-bs32/seed-0.json").unlink()
    os.chdir(tmp_path)
    try:
        text = report.render("results", figures=False).read_text()
    finally:
        os.chdir(REPO)
    assert "**No results.** None of the result files under `runs/` of the results directory could be read" in text
    assert "\n3 result files could not be read" in text
    assert "\n- `runs/lr-ce-lr0.001-bs32/seed-0.json`: unreadable result file (JSONDecodeError: " in text


# --------------------------------------------- records that pass the schema yet the report cannot use

DROP = object()  # _spec(key=DROP) removes the key


def _spec(**changes):
    """A change to a record dict's spec."""
    def change(o):
        for key, value in changes.items():
            if value is DROP:
                del o["spec"][key]
            else:
                o["spec"][key] = value
    return change


BAD = "runs/lr-ce-lr0.001-bs32/seed-1.json"  # where with_bad_record writes the bad record
# (what, change to a good record's dict, its "Skipped files" reason or the start of it). Each crashed the whole
# report before (KeyError, TypeError, ValueError, ...), or passed as a wrong grid.
UNUSABLE = [
    ("sweep names a key the spec lacks", _spec(sweep=["lr", "gamma"]),
     "spec/sweep: 'gamma' is not a key of the spec"),
    ("sweep names an empty key", _spec(sweep=[""]), "spec/sweep/0: "),
    ("sweep names a key twice", _spec(sweep=["lr", "lr"]), "spec/sweep: "),
    ("grid values a scalar", _spec(grid={"lr": 0.01}), "spec/grid/lr: 0.01 is not of type 'array'"),
    ("grid values a string", _spec(grid={"lr": "0.01"}), "spec/grid/lr: '0.01' is not of type 'array'"),
    ("grid key without values", _spec(grid={"lr": []}), "spec/grid/lr: "),
    ("grid values not scalars", _spec(grid={"lr": [[0.01]]}), "spec/grid/lr/0: "),
    ("grid not a table", _spec(grid=["lr"]), "spec/grid: ['lr'] is not of type 'object'"),
    ("swept value not a scalar", _spec(sweep=["lr", "grid"]),
     "spec/grid: {'lr': [0.001, 0.01, 0.1]} is swept, so it must be a string or a number"),
    ("swept value null", _spec(sweep=["lr", "extra"], extra=None),
     "spec/extra: None is swept, so it must be a string or a number"),
    ("spec lacks a key the report shows", _spec(width=DROP), "spec: 'width' is missing (the report shows it)"),
    ("spec value of the wrong type", _spec(weight_decay="0.05"), "spec/weight_decay: '0.05' is not of type 'number'"),
    ("spec source not a string", _spec(source=5), "spec/source: 5 is not of type 'string'"),
    ("spec title a list", _spec(title=["Task B"]), "spec/title: ['Task B'] is not of type 'string'"),
    ("NaN accuracy", lambda o: o["metrics"]["test"].update(accuracy=float("nan")),
     "metrics/test/accuracy: nan is not a finite number (JSON has no NaN or Infinity)"),
    ("NaN probability", lambda o: o["predictions"]["y_score"].__setitem__(3, float("nan")),
     "predictions/y_score/3: nan is not a finite number (JSON has no NaN or Infinity)"),
    ("Infinity train time", lambda o: o["timing"].update(train_seconds=float("inf")),
     "timing/train_seconds: inf is not a finite number (JSON has no NaN or Infinity)"),
    ("predictions of unequal lengths", lambda o: o["predictions"]["y_pred"].pop(),
     "predictions: y_true has 60, y_score has 60, y_pred has 59 values; one per test image"),
    ("predictions of no image", lambda o: o["predictions"].update(y_true=[], y_score=[], y_pred=[]),
     "predictions: no test image"),
    ("ok run without test accuracy", lambda o: o["metrics"]["test"].update(accuracy=None),
     "metrics/test/accuracy: null in a run with status ok"),
]


def with_bad_record(results_dir: Path, change, seed: int = 1) -> Path:
    """partial_suite plus a record of learning rate 0.001, seed `seed`, changed by change(dict), written as
    Python's json writes it (NaN and Infinity included)."""
    if not (results_dir / "runs").is_dir():
        partial_suite(results_dir)
    o = fabricate(TASK_LR.settings[0], TASK_LR, seed, index=5 + seed).to_dict()
    change(o)
    path = results_dir / "runs" / o["id"] / f"seed-{seed}.json"
    path.write_text(json.dumps(o))
    return results_dir


@pytest.mark.parametrize(("what", "change", "reason"), UNUSABLE, ids=[u[0] for u in UNUSABLE])
def test_a_record_the_report_cannot_use_is_skipped_with_its_reason(tmp_path, what, change, reason):
    text = report.render(with_bad_record(tmp_path, change), figures=False).read_text()
    assert "\n## Skipped files\n\n1 result file could not be read as a run record" in text
    assert f"\n- `{BAD}`: {reason}" in text
    # the report renders from the rest, as without the bad file
    assert "from 2 result files." in text and "| learning rate 0.001 | 1 ok |" in text
    assert "| learning rate 0.01 | 1 ok |" in text and "| `lr-ce-lr0.001-bs32` | 1 |" not in text


def test_every_unusable_record_at_once_with_figures(tmp_path):
    """Some crashed only in the figures (a null accuracy) or only beside others (a null swept value)."""
    for i, (_, change, _) in enumerate(UNUSABLE):
        with_bad_record(tmp_path / "results", change, seed=10 + i)
    out = report.render(tmp_path / "results", tmp_path / "site" / "report.md")
    text = out.read_text()
    assert f"\n{len(UNUSABLE)} result files could not be read as a run record" in text
    for i, (what, _, reason) in enumerate(UNUSABLE):
        assert f"\n- `runs/lr-ce-lr0.001-bs32/seed-{10 + i}.json`: {reason}" in text, what
    assert "from 2 result files." in text and "| learning rate 0.01 | 1 ok |" in text
    assert {p.name for p in (out.parent / "figures").iterdir()} == {f"lr-{k.kind}.png" for k in report.FIGURE_KINDS}


def test_the_schema_states_the_rules_of_sweep_and_grid():
    good = fabricate(TASK_LR.settings[0], TASK_LR, 0).to_dict()
    record.from_dict(good)  # the shipped spec files' sweep and grid pass
    spec = record.schema()["properties"]["spec"]["properties"]
    assert spec["grid"]["additionalProperties"]["type"] == "array" and spec["grid"]["additionalProperties"]["minItems"]
    assert spec["sweep"]["uniqueItems"] and spec["sweep"]["items"]["minLength"] == 1
    for change in (_spec(grid={"lr": 0.1}), _spec(grid={"lr": []}), _spec(sweep=[""]), _spec(sweep=["lr", "lr"]),
                   _spec(grid={"lr": [0.1, 0.1]})):
        o = json.loads(json.dumps(good))
        change(o)
        with pytest.raises(record.RecordError, match=r"^where\.json: spec/(grid|sweep)"):
            record.from_dict(o, "where.json")
    # what JSON Schema cannot say, the report checks: a swept key the spec has
    assert report.why_unusable(record.from_dict(good)) is None
    o = json.loads(json.dumps(good))
    _spec(sweep=["lr", "gamma"])(o)
    assert report.why_unusable(record.from_dict(o)) == "spec/sweep: 'gamma' is not a key of the spec"


def test_json_that_python_cannot_read_is_skipped(tmp_path):
    """Nested deeper than json's recursion limit, or an integer of more digits than Python converts: not a
    JSONDecodeError, but unreadable all the same (they stopped the report)."""
    results_dir = partial_suite(tmp_path)
    good = json.loads((results_dir / "runs/lr-ce-lr0.001-bs32/seed-0.json").read_text())
    deep = json.dumps({**good, "seed": 1, "spec": {**good["spec"], "extra": 0}})
    (results_dir / "runs/lr-ce-lr0.001-bs32/seed-1.json").write_text(
        deep.replace('"extra": 0', '"extra": ' + "[" * 5000 + "]" * 5000))
    (results_dir / "runs/lr-ce-lr0.001-bs32/seed-2.json").write_text(
        json.dumps({**good, "seed": 2}).replace('"seed": 2', '"seed": ' + "2" * 5000, 1))
    text = report.render(results_dir, figures=False).read_text()
    assert f"\n- `{BAD}`: unreadable result file (RecursionError: " in text
    assert "\n- `runs/lr-ce-lr0.001-bs32/seed-2.json`: unreadable result file (ValueError: " in text
    assert "from 2 result files." in text


def test_times_without_a_utc_offset_are_left_out(tmp_path):
    """A naive time beside aware ones cannot be ordered (it raised TypeError): it counts as unknown."""
    def naive(o):
        o["environment"].update(started_at="2025-03-01T09:00:00", finished_at="2025-03-01T12:00:00")

    text = report.render(with_bad_record(tmp_path, naive), figures=False).read_text()
    assert "Skipped files" not in text and "| learning rate 0.001 | 2 ok |" in text
    assert "| Started / finished | 2025-03-01 10:10 UTC / 2025-03-01 10:13 UTC |" in text


def test_a_total_time_beyond_float_range_reads_na(tmp_path):
    """Train times that the schema allows (numbers >= 0) but whose sum overflows to inf (it raised OverflowError)."""
    runs = [fabricate(kw, TASK_LR, 0, index=i) for i, kw in enumerate(TASK_LR.settings[:2])]
    runs = [dataclasses.replace(r, timing={**r.timing, "train_seconds": 1.7e308}) for r in runs]
    text = report.render(write_runs(tmp_path, runs), figures=False).read_text()
    assert "| Total time | n/a of training and evaluation over 2 runs;" in text
    assert report.duration(float("inf")) == "n/a" and report.duration(90.0) == "2 min"


def test_history_rows_without_optional_keys_render(tmp_path):
    """lr, val_loss, val_accuracy, val_auroc and seconds are optional in a history row: curves draw what is there."""
    runs = [fabricate(kw, TASK_LR, s, index=2 * i + s) for i, kw in enumerate(TASK_LR.settings[:2]) for s in (0, 1)]
    bare = [{k: row[k] for k in ("epoch", "train_loss", "train_accuracy")} for row in runs[0].history]
    half = [row if row["epoch"] % 2 else {k: row[k] for k in ("epoch", "train_loss", "train_accuracy")}
            for row in runs[2].history]
    runs[0] = dataclasses.replace(runs[0], history=tuple(bare))
    runs[2] = dataclasses.replace(runs[2], history=tuple(half))
    out = report.render(write_runs(tmp_path / "results", runs), tmp_path / "site" / "report.md")
    text = out.read_text()
    assert "Skipped files" not in text and "| learning rate 0.001 | 2 ok |" in text
    assert (out.parent / "figures" / "lr-curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_write_leaves_the_previous_report(tmp_path, monkeypatch):
    results_dir = partial_suite(tmp_path)
    out = report.render(results_dir, figures=False)
    before = out.read_bytes()
    entries = sorted(p.name for p in tmp_path.iterdir())
    write_runs(results_dir, [fabricate(TASK_LR.settings[0], TASK_LR, 1)])  # the next report would differ

    def full_disk(fd):  # the text is in the temp file; the disk fills before it is safe
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises((OSError, results.StoreError), match="No space left"):  # cxr.results may name the file
        report.render(results_dir, figures=False)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == entries  # no temp file left
    monkeypatch.undo()
    assert report.render(results_dir, figures=False).read_bytes() != before


def test_a_failed_figure_leaves_the_previous_figure(tmp_path, monkeypatch):
    runs = [fabricate(kw, TASK_A, s, n_test=40, epochs=2) for kw in TASK_A.settings for s in (0, 1)]
    out = report.render(write_runs(tmp_path / "results", runs), tmp_path / "site" / "report.md")
    fig_dir = out.parent / "figures"
    (fig_dir / "loss-broken.png").write_bytes(b"the previous figure")
    before = {p.name: p.read_bytes() for p in fig_dir.iterdir()} | {"report.md": out.read_bytes()}

    def draw(c, path):
        path.write_bytes(b"\x89PNG\r\n\x1a\n half a figure")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(figures_mod, "FIGURE_KINDS", (*report.FIGURE_KINDS, report.FigureKind("broken", "x", draw)))
    with pytest.raises(OSError, match="No space left"):
        report.render(tmp_path / "results", out)
    assert {p.name: p.read_bytes() for p in fig_dir.iterdir()} | {"report.md": out.read_bytes()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["figures", "report.md"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_report_and_figures_get_the_users_normal_mode(tmp_path):
    runs = [fabricate(kw, TASK_A, 0, n_test=40, epochs=2) for kw in TASK_A.settings]
    results_dir = write_runs(tmp_path / "results", runs)
    for umask, mode in ((0o027, 0o640), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            assert results.file_mode() == mode
            out = report.render(results_dir)
        finally:
            os.umask(old)
        files = [out, *(out.parent / "figures").iterdir()]
        assert len(files) == 1 + len(report.FIGURE_KINDS)
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(mode) for p in files}


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


def _setting(label, accs, aurocs=None, statuses=None, values=(0.0,), sens=(), spec=()):
    statuses = statuses or ["ok"] * len(accs)
    runs = tuple(record.RunRecord(id="x", seed=i, spec={}, spec_hash="0" * 16, status=st, environment={},
                                  history=({}, {})) for i, st in enumerate(statuses))
    ok = tuple(r for r in runs if r.ok)
    none = stats.mean_std_ci([])
    return report.Setting(values=values, label=label, runs=runs, ok=ok, accuracy=stats.mean_std_ci(accs),
                          auroc=stats.mean_std_ci(aurocs or [0.9] * len(accs)), sensitivity=stats.mean_std_ci(sens),
                          specificity=stats.mean_std_ci(spec), train_loss=none, train_seconds=none,
                          images_per_second=none,
                          best_epochs="n/a", n_diverged=statuses.count("diverged"),
                          n_failed=statuses.count("failed"))


def test_best_sentences():
    a, b = _setting("BCE", [0.8, 0.82], [0.95, 0.95]), _setting("CE", [0.85, 0.85], [0.90, 0.90])
    assert report.best_sentences([a, b]) == [
        "Highest mean test accuracy: CE, 85.00% ± 0.00 over 2 seeds.",
        "The highest mean AUROC is BCE's (0.950), not the most accurate setting's: accuracy depends on the "
        "decision threshold, AUROC does not."]
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
                             "extra_info": {"batch_size": 32, "ratio": 7.3, "cuda_only": None}},
                            {"name": "test_training_throughput[bs64]",
                             "stats": {"mean": 2.0, "rounds": 1},
                             "extra_info": {"batch_size": 64, "ratio": 7.9, "cuda_only": None}}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    out = report.render(partial_suite(tmp_path / "results"), benchmark_json=path, figures=False)
    text = out.read_text()
    assert "From `bench.json`, measured 2025-03-01T11:00:00 on Fixture CPU, Python 3.11.7." in text
    assert "| Benchmark | Rounds | Wall time, s | status | train_seconds | images_per_second |" in text
    assert "| `test_run[loss-bce-lr0.001-bs32-seed0]` | 1 | 12.3 | ok | 11.5 | 1,234 |" in text
    # a benchmark with other extra_info keys gets its own table, not extra columns in the first
    assert "| Benchmark | Rounds | Wall time, s | batch_size | ratio |" in text  # cuda_only: None in every row
    assert "cuda_only" not in text
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
    assert ("the same labels for every run (test images not fingerprinted: results written by an older "
            "version).") in text and "the same images" not in text
    # written before spec titles: no section of its own, no grid to miss
    assert "## Other comparisons" in text and "- Other: `recipe`, 1 setting, 1 run (1 ok)." in text
    assert "Missing:" not in text and "not run" not in text
    assert "source `npz:pneumoniamnist-trainval.npz?holdout=0.5`" in text and "/work/" not in text
    # no decision recorded: read with the plain argmax; no balanced accuracy in the file: n/a, never invented
    assert "balanced_accuracy" not in test
    assert "\nDecision: argmax (not recorded: an older result file); no TTA.\n" in text
    assert (f"| recipe-ce-lr0.002-bs64 | 1 ok | {report.pct(test['accuracy'])[:-1]} ± n/a | n/a | n/a | "
            f"{report.num(test['auroc'])} ± n/a |") in text
    assert "Argmax accuracy" not in text and "ensemble of" not in text
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


def test_names_that_share_a_slug_get_distinct_figure_files(tmp_path):
    """Result files of older versions may hold names with non-ASCII letters, which a slug drops."""
    a, b = (fabricate({"name": n, "loss": "ce"}, TASK_A, 0) for n in ("lossx", "lossy"))
    a = dataclasses.replace(a, spec={**a.spec, "name": "lossé"}, id="lossé-ce-lr0.001-bs32")
    b = dataclasses.replace(b, spec={**b.spec, "name": "lossè"}, id="lossè-ce-lr0.001-bs32")
    slugs = [c.slug for c in report.comparisons([a, b])]
    assert len(set(slugs)) == 2 and all(s.startswith("loss-") for s in slugs)


# ------------------------------------------------------------------- decisions (issue 15)

EQUAL_PRIOR_TTA = {"name": "rule", "decision": "equal-prior", "tta": 8, "augment_rotate": 8.0,
                   "class_weight": "balanced"}


def _row(text: str, label: str) -> list[str]:
    """The cells of the first table row of `label`."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} | "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_decision_line_and_training_row_of_an_equal_prior_tta_run(tmp_path):
    runs = [fabricate(EQUAL_PRIOR_TTA, TASK_RULE, s, bias=2.0) for s in (0, 1)]
    assert runs[0].decision == {"rule": "equal-prior", "threshold": 0.75, "prior": 0.75, "tta": 8,
                                "augment": [0.0, 8.0, 0.0]}
    assert set(runs[0].metrics) == {"val", "test", "val_plain", "test_plain"}
    assert runs[0].predictions["y_pred"] == [int(p > 0.75) for p in runs[0].predictions["y_score"]]
    text = report.render(write_runs(tmp_path, runs), figures=False).read_text()
    assert ("\nDecision: equal-prior (P(pneumonia) > 0.750, the train prevalence); TTA 8 draws + identity (mean "
            "probability); class-balanced training loss (weights n / (2 n_c) from the train split).\n") in text
    assert ("| Training | adam, schedule none, weight decay 0, augmentation rotation 8°, class-balanced loss "
            "(n / (2 n_c)), decision equal-prior (P(pneumonia) > the train prevalence), TTA 8 draws + identity, "
            "best epoch chosen on validation loss |") in text
    # a plain run says so
    plain = report.comparisons([fabricate(TASK_A.settings[0], TASK_A, 0)])[0]
    assert plain.decisions == (("", "argmax (the course's rule); no TTA"),) and not plain.shows_argmax


def test_settings_that_decide_differently_each_name_their_rule():
    (c,) = report.comparisons([fabricate(kw, TASK_RULE, 0) for kw in TASK_RULE.settings])
    assert c.decisions == (
        ("decision argmax", "argmax (the course's rule); TTA 8 draws + identity (mean probability)"),
        ("decision equal-prior", "equal-prior (P(pneumonia) > 0.750, the train prevalence); TTA 8 draws + identity "
                                 "(mean probability); class-balanced training loss (weights n / (2 n_c) from the "
                                 "train split)"))
    assert c.shows_argmax and not any(s.plain for s in c.settings)  # argmax with TTA is not the plain argmax


def test_argmax_and_balanced_accuracy_columns_are_the_means_of_the_runs(tmp_path):
    text = report.render(decision_suite(tmp_path), figures=False).read_text()
    assert ("| Setting | Runs | Test accuracy, % (mean ± std) | 95% CI, % | Argmax accuracy, % | Balanced accuracy, % "
            "| AUROC (mean ± std) |") in text
    runs = results.load_all(tmp_path)
    for kw, label in zip(TASK_RULE.settings, ("decision argmax", "decision equal-prior"), strict=True):
        mine = [r for r in runs if r.spec["decision"] == kw["decision"]]
        assert len(mine) == 3
        plain = [r.metrics["test_plain"]["accuracy"] for r in mine]
        balanced = [(r.test("sensitivity") + r.test("specificity")) / 2 for r in mine]
        assert balanced == pytest.approx([r.test("balanced_accuracy") for r in mine])
        cells = _row(text, label)
        assert cells[2] == report.pct_ms(stats.mean_std_ci([r.test("accuracy") for r in mine]))
        assert cells[4] == report.pct_ms(stats.mean_std_ci(plain))
        assert cells[5] == report.pct_ms(stats.mean_std_ci(balanced))
    # the rule's accuracy and the argmax accuracy of the same weights differ here
    assert _row(text, "decision equal-prior")[2] != _row(text, "decision equal-prior")[4]
    # plain argmax everywhere: no argmax column, balanced accuracy beside accuracy
    text = report.render(full_suite(tmp_path / "plain"), figures=False).read_text()
    assert "Argmax accuracy" not in text
    bce = [r for r in results.load_all(tmp_path / "plain") if r.id == "loss-bce-lr0.001-bs32"]
    assert _row(text, "BCE")[4] == report.pct_ms(stats.mean_std_ci([r.test("balanced_accuracy") for r in bce]))


def test_sensitivity_specificity_gap_sentence():
    wide = _setting("BCE", [0.85, 0.86], sens=[0.97, 0.98], spec=[0.77, 0.78])  # 20 points apart
    assert report.balance_sentences([wide]) == [
        "BCE: sensitivity 97.5% but specificity 77.5% (20.0 points apart): the model calls pneumonia on many "
        "normal images."]
    mirror = _setting("CE", [0.8], sens=[0.70], spec=[0.90])
    assert report.balance_sentences([mirror]) == [
        "CE: specificity 90.0% but sensitivity 70.0% (20.0 points apart): the model calls many pneumonia images "
        "normal."]
    close = _setting("CE", [0.85], sens=[0.90], spec=[0.80])  # 10 points: nothing to say
    assert report.balance_sentences([close]) == []
    assert report.balance_sentences([_setting("x", [], statuses=["diverged"])]) == []  # no numbers
    sentences = report.analysis_sentences(("loss",), [wide, close], None)
    assert sum("points apart" in x for x in sentences) == 1


def test_seed_ensemble_is_the_mean_probability_of_the_seeds(tmp_path):
    from sklearn.metrics import roc_auc_score

    runs = [fabricate(EQUAL_PRIOR_TTA, TASK_RULE, s, bias=2.0, shared=0.8) for s in (0, 1, 2)]
    runs.append(fabricate(EQUAL_PRIOR_TTA, TASK_RULE, 3, status="diverged", error="non-finite"))
    (c,) = report.comparisons(runs)
    y = np.asarray(runs[0].predictions["y_true"])
    score = np.mean([r.predictions["y_score"] for r in runs[:3]], axis=0)
    accuracy = float(np.mean((score > 0.75) == y))  # the runs' threshold: the train prevalence
    e = c.settings[0].ensemble
    assert e["n"] == 3 and e["seeds"] == (0, 1, 2) and e["threshold"] == 0.75
    assert e["accuracy"] == pytest.approx(accuracy) and e["auroc"] == pytest.approx(roc_auc_score(y, score))
    assert accuracy != pytest.approx(float(np.mean((score > 0.5) == y)))  # the threshold matters here
    text = report.render(write_runs(tmp_path, runs), figures=False).read_text()
    assert (f"\n- decision equal-prior: ensemble of 3 seeds (mean probability): accuracy {report.pct(accuracy)}, "
            f"balanced accuracy {report.pct(e['balanced_accuracy'])}, AUROC {report.num(e['auroc'])}.\n") in text
    # one finished seed, or seeds on different test images: no ensemble
    assert report.comparisons(runs[:1] + runs[3:])[0].settings[0].ensemble is None
    old = [fabricate(TASK_A.settings[0], TASK_A, s, n_test=n, fingerprint=None) for s, n in ((0, 60), (1, 40))]
    (c,) = report.comparisons(old)
    assert len(c.settings) == 1 and c.settings[0].ensemble is None
    # records without fingerprints but with the same labels: threshold 0.5 (no decision recorded)
    old = [fabricate(TASK_A.settings[0], TASK_A, s, fingerprint=None) for s in (0, 1)]
    e = report.comparisons(old)[0].settings[0].ensemble
    score = np.mean([r.predictions["y_score"] for r in old], axis=0)
    assert e["threshold"] == 0.5 and e["accuracy"] == pytest.approx(float(np.mean((score > 0.5) == y)))


def test_a_single_setting_with_finished_runs_is_not_called_unfinished(tmp_path):
    runs = [fabricate({"name": "solo"}, TASK_A, s) for s in (0, 1)]  # then made a file without a grid:
    runs = [dataclasses.replace(r, spec={**r.spec, "sweep": [], "grid": {}}) for r in runs]
    text = report.render(write_runs(tmp_path, runs), figures=False).read_text()
    assert "One setting only: nothing to compare it with" in text and "no setting has a finished run" not in text


def test_a_fused_group_counts_its_training_time_once():
    """Runs trained as one fused group each carry the group's train_seconds: the report's total counts the
    group once (its longest member), not once per member."""
    import dataclasses

    from cxr.report.info import run_info

    runs = [fabricate({"name": "lr", "lr": lr}, TASK_LR, 0, index=i) for i, lr in enumerate((0.001, 0.01, 0.1))]
    alone = dict(run_info(runs)["rows"])["Total time"]
    assert alone.startswith("18.6 s of training and evaluation over 3 runs")  # 3 x (6.0 train + 0.2 eval)
    ids = [r.run_id for r in runs]
    fused = [dataclasses.replace(r, timing={**r.timing, "train_seconds": 7.0,
                                            "fused_with": [i for i in ids if i != r.run_id]}) for r in runs]
    rows = dict(run_info(fused)["rows"])
    assert rows["Total time"].startswith("7.6 s of training and evaluation over 3 runs")  # 7.0 once + 3 x 0.2
    assert rows["Runs"].endswith("; 3 trained in 1 fused group")


def test_a_fused_run_shows_its_share_of_the_group_time(tmp_path):
    """A fused run's timing.train_seconds is its group's time: the setting tables show each run's equal
    share, and images/s over that share, comparable with lone runs; the text says so."""
    import dataclasses

    runs = [fabricate({"name": "lr", "lr": lr}, TASK_LR, 0, index=i) for i, lr in enumerate((0.001, 0.01, 0.1))]
    ids = [r.run_id for r in runs]
    lone_rate = runs[0].timing_of("images_per_second")
    fused = [dataclasses.replace(r, timing={**r.timing, "train_seconds": 18.0, "images_per_second": lone_rate / 3,
                                            "fused_with": [i for i in ids if i != r.run_id]}) for r in runs]
    assert [r.own_train_seconds() for r in fused] == [6.0] * 3 and fused[0].group_size == 3
    assert fused[0].own_images_per_second() == pytest.approx(lone_rate)
    text = report.render(write_runs(tmp_path / "fused", fused), figures=False).read_text()
    assert "counts an equal share of its group's training time" in text
    assert "| 18.0 |" not in text and "trained in a fused group of 3" in text
    lone = report.render(write_runs(tmp_path / "lone", runs), figures=False).read_text()
    assert "equal share" not in lone and "fused group" not in lone
    # the same setting rows (train time and images/s) as the lone runs that took as long each
    def timing_rows(doc):
        return [line for line in doc.splitlines() if line.startswith("| learning rate ") and " of 4 |" in line]

    assert len(timing_rows(text)) == 3 and timing_rows(text) == timing_rows(lone)
    assert timing_rows(text)[0].endswith("| 6.0 | 900 |")


def test_what_was_run_says_the_training_arithmetic(tmp_path, monkeypatch):
    """timing.precision of the records; before it was recorded, bf16 autocast on CUDA and fp32 elsewhere."""
    monkeypatch.chdir(REPO)
    results_dir = full_suite(tmp_path / "results")
    paths = sorted(results_dir.glob("runs/*/seed-*.json"))
    for i, path in enumerate(paths):
        obj = json.loads(path.read_text())
        if obj["timing"] is None:  # a failed run
            continue
        if i % 2:
            obj["timing"]["precision"] = "bf16"
        else:
            obj["timing"].pop("precision", None)
            obj["environment"]["device"] = "cuda" if i % 4 == 0 else "cpu"
        path.write_text(json.dumps(obj))
    text = report.render(results_dir, figures=False, specs=[REPO / "specs"]).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Training arithmetic |"))
    assert row == "| Training arithmetic | bf16 autocast (losses, BatchNorm statistics, optimizer state fp32); fp32 |"
