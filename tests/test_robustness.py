"""cxr.robustness and cxr.report.robustness: MedMNIST-C's metrics, stored scores, their reuse, and bad input.

The metric definitions are held to a direct computation (hand-made balanced errors, sklearn's balanced accuracy)
and to medmnistc's own Evaluator where medmnistc is installed (skipped, saying so, where it is not). The store is
a real one: `cxr-bench run` of Task A (BCE and CE, 1 epoch, 1 seed) on a small learnable npz, built once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from cxr import cli, results
from cxr import corruptions as corr
from cxr import robustness as rb
from cxr.metrics import binary_metrics
from tests.conftest import learnable_npz

ROOT = Path(__file__).resolve().parents[1]
SPLITS = 1 + len(corr.CORRUPTIONS) * len(corr.SEVERITIES)  # the clean split and 13 x 5 corrupted copies


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two ok runs (loss-bce, loss-ce) with weights, scored once."""
    base = tmp_path_factory.mktemp("robustness")
    npz = learnable_npz(base / "data.npz")
    out = base / "store"
    assert cli.main(["run", str(ROOT / "specs" / "task-a-loss.toml"), "--data", f"npz:{npz}", "--epochs", "1",
                     "--seeds", "1", "--out", str(out), "--device", "cpu"]) == 0
    outcomes = rb.score_store(out, device="cpu")
    assert [o.status for _, o in outcomes] == ["scored", "scored"], [o.line for _, o in outcomes]
    return out


@pytest.fixture
def copy(store, tmp_path) -> Path:
    """A copy of the scored store that a test may change."""
    shutil.copytree(store, tmp_path / "store")
    return tmp_path / "store"


@pytest.fixture
def evaluations(monkeypatch) -> list:
    """Counts the model evaluations robustness makes (one per model and split)."""
    calls = []
    real = rb.evaluate_split

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rb, "evaluate_split", counting)
    return calls


def _rows(values: list[float]) -> list[dict]:
    return [{"accuracy": v, "balanced_accuracy": v} for v in values]


# --- metric definitions ----------------------------------------------------------------------------------------

def test_mce_of_hand_made_errors():
    """Every corruption's balanced error twice AlexNet's: mCE 2. Its excess over clean twice AlexNet's: rmCE 2."""
    clean_be = 0.05
    severities = {}
    for name, alexnet in rb.BASELINE.items():
        be = 2 * alexnet  # mean over severities; spread around it by -0.02 .. +0.02
        severities[name] = _rows([1 - be + d for d in (0.02, 0.01, 0.0, -0.01, -0.02)])
    per, summary = rb.summarize({"accuracy": 0.95, "balanced_accuracy": 1 - clean_be}, severities)
    assert summary["mce"] == pytest.approx(2.0)
    assert all(p["ce"] == pytest.approx(2.0) for p in per.values())
    assert per["contrast_up"]["relative_ce"] == pytest.approx((2 * 0.09529914529914527 - 0.05) /
                                                              (0.09529914529914527 - 0.10085470085470083))
    assert summary["mean_balanced_error"] == pytest.approx(2 * np.mean(list(rb.BASELINE.values())))
    assert summary["drop_balanced_accuracy"] == pytest.approx(summary["mean_balanced_error"] - clean_be)

    twice = {name: _rows([1 - (clean_be + 2 * (b - rb.BASELINE_CLEAN))] * 5) for name, b in rb.BASELINE.items()}
    assert rb.summarize({"accuracy": 0.95, "balanced_accuracy": 1 - clean_be}, twice)[1]["relative_mce"] == \
        pytest.approx(2.0)


def test_metrics_from_predictions_match_a_direct_computation():
    """Random decisions per split -> binary_metrics -> summarize equals sklearn's balanced accuracy, averaged by
    hand as MedMNIST-C defines mCE, relative mCE and the drops."""
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(30, int), np.ones(50, int)]

    def decide(flip: float) -> np.ndarray:
        return np.where(rng.random(len(y)) < flip, 1 - y, y)

    clean_pred = decide(0.1)
    preds = {name: [decide(0.1 + 0.06 * s) for s in corr.SEVERITIES] for name in corr.CORRUPTIONS}
    row = lambda p: binary_metrics(y, p.astype(float), p)  # noqa: E731
    per, summary = rb.summarize(row(clean_pred), {n: [row(p) for p in ps] for n, ps in preds.items()})
    clean_be = 1 - balanced_accuracy_score(y, clean_pred)
    be = {n: np.mean([1 - balanced_accuracy_score(y, p) for p in ps]) for n, ps in preds.items()}
    assert summary["clean_balanced_error"] == pytest.approx(clean_be)
    assert summary["mce"] == pytest.approx(np.mean([be[n] / rb.BASELINE[n] for n in be]))
    assert summary["relative_mce"] == pytest.approx(np.mean([(be[n] - clean_be) / (rb.BASELINE[n] - rb.BASELINE_CLEAN)
                                                             for n in be]))
    every = [p for ps in preds.values() for p in ps]
    assert summary["drop_accuracy"] == pytest.approx((clean_pred == y).mean() - np.mean([(p == y).mean()
                                                                                         for p in every]))
    assert per["pixelate"]["balanced_error"] == pytest.approx(be["pixelate"])


def test_metrics_match_medmnistc_evaluator(tmp_path):
    """medmnistc's Evaluator on the same probabilities (threshold 0.5): its "be" is our mCE, its "rbe" our relative
    mCE, its raw scores our per-corruption balanced errors."""
    evaluator = pytest.importorskip("medmnistc.eval", reason="medmnistc not installed: the comparison with its "
                                    "Evaluator needs it (see scripts/make_corruption_fixture.py)")
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(40, int), np.ones(60, int)]

    def probabilities(noise: float) -> np.ndarray:
        p = np.clip(y * 0.7 + 0.15 + rng.normal(0, noise, len(y)), 0.001, 0.999)
        return np.stack([1 - p, p], 1)

    ev = evaluator.Evaluator("pneumoniamnist", y[:, None].tolist(), list(corr.CORRUPTIONS), str(tmp_path), "x",
                             "binary-class")
    clean = probabilities(0.3)
    ev.evaluate_clean(clean)
    severities = {}
    for name in corr.CORRUPTIONS:
        ps = [probabilities(0.3 + 0.05 * s) for s in corr.SEVERITIES]
        ev.evaluate(np.concatenate(ps), name)
        severities[name] = [binary_metrics(y, p[:, 1], (p[:, 1] > 0.5).astype(int)) for p in ps]
    ev.output_log = {}
    ev.populate_summary()
    per, summary = rb.summarize(binary_metrics(y, clean[:, 1], (clean[:, 1] > 0.5).astype(int)), severities)
    assert summary["mce"] == pytest.approx(ev.output_log["metrics"]["be"])
    assert summary["relative_mce"] == pytest.approx(ev.output_log["metrics"]["rbe"])
    assert {n: p["balanced_error"] for n, p in per.items()} == pytest.approx(ev.output_log["raw_scores"])


def test_the_baseline_is_medmnistc_published_one():
    baselines = pytest.importorskip("medmnistc.utils.baselines", reason="medmnistc not installed")
    assert baselines.BASELINES["pneumoniamnist"] == {"clean_score": rb.BASELINE_CLEAN, "raw_scores": rb.BASELINE}


# --- the store -------------------------------------------------------------------------------------------------

def test_a_score_is_stored_beside_its_record_and_checked(store):
    for rec in results.load_all(store):
        path = store / "runs" / rec.id / f"seed-{rec.seed}.robustness.json"
        score = rb.read(path)  # schema-checked
        assert (score["corruptions"]["name"], score["corruptions"]["version"]) == (corr.NAME, corr.VERSION)
        assert score["data_fingerprint_test"] == rec.data_fingerprint["test"]
        assert score["run_identity"] == rec.identity and score["decision"] == rec.decision
        assert list(score["corruption_scores"]) == list(corr.CORRUPTIONS)
        assert all(len(s["y_pred"]) == score["n"] == 48 for c in score["corruption_scores"].values()
                   for s in c["severities"])
        assert score["clean"]["y_pred"] == "".join(map(str, rec.predictions["y_pred"]))  # the record's decisions
        assert rb.current(store, rec) == score
    assert results.load_all(store)  # the score files are not taken for records


def test_a_stored_score_is_reused_without_evaluating(store, evaluations):
    outcomes = rb.score_store(store, device="cpu")
    assert [o.status for _, o in outcomes] == ["reused", "reused"]
    assert evaluations == []


def test_k_selects_runs(store, evaluations):
    assert [r.id for r, _ in rb.score_store(store, k="bce", device="cpu")] == ["loss-bce-lr0.001-bs32"]


def test_another_corruption_version_is_scored_again(copy, evaluations, monkeypatch):
    monkeypatch.setattr(corr, "VERSION", corr.VERSION + 1)
    outcomes = rb.score_store(copy, k="bce", device="cpu")
    assert [o.status for _, o in outcomes] == ["scored"] and len(evaluations) == SPLITS
    assert rb.read(copy / "runs" / "loss-bce-lr0.001-bs32" / "seed-0.robustness.json")["corruptions"]["version"] \
        == corr.VERSION


def test_a_score_of_other_test_data_or_weights_is_scored_again(copy, evaluations):
    path = copy / "runs" / "loss-bce-lr0.001-bs32" / "seed-0.robustness.json"
    score = json.loads(path.read_text())
    score["data_fingerprint_test"] = "0123456789abcdef"
    score["identity"] = rb.identity(score["run_identity"], score["weights_sha256"], "0123456789abcdef")
    path.write_text(json.dumps(score))
    assert [o.status for _, o in rb.score_store(copy, k="bce", device="cpu")] == ["scored"]
    assert len(evaluations) == SPLITS
    assert rb.read(path)["data_fingerprint_test"] != "0123456789abcdef"

    weights = copy / "runs" / "loss-bce-lr0.001-bs32" / "seed-0" / results.WEIGHTS_NAME  # retrained, say
    state = torch.load(weights, weights_only=True)
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    assert rb.current(copy, results.load_all(copy)[0]) is None
    assert [o.status for _, o in rb.score_store(copy, device="cpu")] == ["scored", "reused"]
    assert len(evaluations) == 2 * SPLITS


def test_runs_of_the_same_weights_are_evaluated_once(copy, evaluations):
    """A run copied under another id (reused_from) has its twin's weights: one evaluation per split for both."""
    import dataclasses

    rec = results.load_all(copy)[0]
    twin = dataclasses.replace(rec, id="twin-" + rec.id)
    (copy / "runs" / rec.id / f"seed-{rec.seed}.robustness.json").unlink()
    outcomes = rb.score_runs(copy, [rec, twin], device="cpu")
    assert [o.status for _, o in outcomes] == ["scored", "scored"] and len(evaluations) == SPLITS
    a, b = (rb.read(copy / "runs" / r.id / f"seed-{r.seed}.robustness.json") for r in (rec, twin))
    assert a["corruption_scores"] == b["corruption_scores"] and b["id"] == twin.id


def test_an_unreadable_score_is_scored_again(copy, evaluations):
    path = copy / "runs" / "loss-ce-lr0.001-bs32" / "seed-0.robustness.json"
    path.write_text('{"schema_version": 1}')
    lines = []
    outcomes = rb.score_store(copy, k="ce", device="cpu", progress=lines.append)
    assert [o.status for _, o in outcomes] == ["scored"]
    assert any(f"{path}: (top level): 'id' is a required property; scored again" == line for line in lines), lines


# --- bad input: one line each ----------------------------------------------------------------------------------

def test_a_run_without_weights_is_skipped(copy, evaluations):
    (copy / "runs" / "loss-ce-lr0.001-bs32" / "seed-0" / results.WEIGHTS_NAME).unlink()
    (copy / "runs" / "loss-ce-lr0.001-bs32" / "seed-0.robustness.json").unlink()
    outcomes = dict((r.id, o) for r, o in rb.score_store(copy, device="cpu"))
    skipped = outcomes["loss-ce-lr0.001-bs32"]
    assert skipped.status == "skipped" and "\n" not in skipped.line
    assert skipped.line == (f"{copy}/runs/loss-ce-lr0.001-bs32/seed-0.json: skipped: no weights file "
                            "(runs/loss-ce-lr0.001-bs32/seed-0/model_weights.pth); retrain it to score it")
    assert outcomes["loss-bce-lr0.001-bs32"].status == "reused" and evaluations == []


def test_changed_test_data_is_refused(copy, evaluations):
    path = copy / "runs" / "loss-bce-lr0.001-bs32" / "seed-0.json"
    rec = json.loads(path.read_text())
    real = rec["data_fingerprint"]["test"]
    rec["data_fingerprint"]["test"] = "0123456789abcdef"
    path.write_text(json.dumps(rec))
    (outcome,) = [o for _, o in rb.score_store(copy, k="bce", device="cpu")]
    assert outcome.status == "failed" and "\n" not in outcome.line
    assert outcome.line.endswith(f"seed-0.robustness.json: not scored: the test split of {rec['dataset']['source']} "
                                 f"has fingerprint {real}, the record's is 0123456789abcdef: the data changed "
                                 "since training")
    assert evaluations == []


@pytest.mark.parametrize(("x", "y", "words"), [
    (torch.zeros(4, 1, 5, 5), torch.tensor([0, 1, 0, 1]),
     "the test split has 5 x 5 px images; gaussian_blur severity 5 needs at least 6 x 6"),
    (torch.zeros(4, 1, 28, 28), torch.ones(4, dtype=torch.int64),
     "the test split has 0 normal and 4 pneumonia images; balanced error needs both classes"),
])
def test_a_test_split_too_small_for_a_corruption_is_refused(x, y, words):
    with pytest.raises(rb.CxrError) as e:
        rb.check_test_split(x, y, "the test split")
    assert str(e.value) == words


def test_a_bad_score_is_not_written(store, tmp_path):
    rec = results.load_all(store)[0]
    score = rb.read(store / "runs" / rec.id / f"seed-{rec.seed}.robustness.json")
    del score["summary"]["mce"]
    with pytest.raises(rb.RobustnessError, match=r"summary: 'mce' is a required property$"):
        rb.write(tmp_path, rec, score)
    assert not list(tmp_path.rglob("*.json"))


# --- the report's numbers --------------------------------------------------------------------------------------

def test_report_section(store, tmp_path):
    from cxr.report import files, model
    from cxr.report import robustness as report

    records, _ = files.load(store)
    scores = report.scores(store, records)
    assert len(scores) == 2
    (c,) = model.comparisons(records)
    sec = report.section(c, scores, tmp_path / "figures")
    assert [r["label"] for r in sec["rows"]] == ["BCE", "CE"] and sec["pairs"] == []  # 1 seed: no paired test
    bce = scores["loss-bce-lr0.001-bs32", 0]
    assert sec["rows"][0]["mce"]["mean"] == bce["summary"]["mce"]
    assert sec["rows"][0]["families"]["noise"]["mean"] == pytest.approx(np.mean(
        [bce["corruption_scores"][n]["balanced_error"] for n in corr.FAMILIES["noise"]]))
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["loss-robustness-heatmap.png",
                                                                       "loss-robustness-severity.png"]


def test_paired_t_over_seeds():
    from scipy.stats import ttest_rel

    from cxr.report.robustness import paired_t

    a, b = {0: 1.10, 1: 1.25, 2: 1.18, 3: 0.5}, {0: 1.30, 1: 1.31, 2: 1.42}
    t = paired_t(a, b)
    want = ttest_rel([1.10, 1.25, 1.18], [1.30, 1.31, 1.42])
    assert (t["n"], t["df"], t["seeds"]) == (3, 2, (0, 1, 2))
    assert t["diff"] == pytest.approx(np.mean([-0.2, -0.06, -0.24]))
    assert (t["t"], t["p_value"]) == pytest.approx((want.statistic, want.pvalue))
    assert paired_t({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})["p_value"] == 1.0  # the same models
    assert paired_t({0: 1.0}, {0: 2.0}) is None


# ------------------------------------------------------------------------------ the command and the report

def test_the_command_reuses_stored_scores_and_says_so_per_run(copy, capsys, evaluations):
    assert cli.main(["robustness", str(copy), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum("reused (mCE " in line for line in out) == 2 and out[-1].startswith("robustness: 2 reused in ")
    assert evaluations == []
    assert cli.main(["robustness", str(copy), "-k", "bce", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("robustness: 1 reused in ")


def test_the_command_refuses_a_missing_directory_in_one_line(tmp_path, capsys):
    assert cli.main(["robustness", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere: no such results directory" in err


def test_run_with_robustness_scores_what_it_trained(tmp_path, capsys):
    npz = learnable_npz(tmp_path / "data.npz")
    out = tmp_path / "store"
    assert cli.main(["run", str(ROOT / "specs" / "task-a-loss.toml"), "-k", "ce", "--data", f"npz:{npz}",
                     "--epochs", "1", "--seeds", "1", "--out", str(out), "--device", "cpu", "--robustness"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("robustness: 1 scored in ")
    (score,) = out.glob("runs/*/seed-0.robustness.json")
    assert rb.read(score)["summary"]["mce"] > 0


def test_the_report_shows_the_robustness_section_with_its_figures_only_where_scores_are(copy):
    from cxr import report

    path = report.render(copy, specs=[])
    text = path.read_text()
    assert text.count("#### Robustness under acquisition shift") == 1
    section = text.split("#### Robustness under acquisition shift")[1].split("\n#### ")[0]
    assert "| BCE |" in section and "| CE |" in section and "mCE" in section and "at 28 px" in section
    pngs = [line.split("](")[1].rstrip(")") for line in section.splitlines() if line.startswith("![")]
    assert len(pngs) == 2 and all((copy / p).stat().st_size > 5000 for p in pngs)
    for f in copy.glob("runs/*/seed-*.robustness.json"):
        f.unlink()
    assert "Robustness under acquisition shift" not in report.render(copy, specs=[]).read_text()
