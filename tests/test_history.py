"""`cxr-bench history STORE --file history.jsonl` and the report's history section (`cxr-bench report --history`).

Stores are tests/test_compare.py's fabricated ones (five settings, three seeds, 300 test images); snapshots are
those stores appended under commit names given with --commit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from cxr import cli, history, report
from tests.test_compare import IDS, N_TEST, _runs, scaled_throughput, store, turned_wrong

VICTIM = IDS[1]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([*map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """c1: the runs; c2: the same runs (another commit that changed nothing); c3: 25 predictions wrong in every
    seed of VICTIM; c4: as c3, throughput 0.6x everywhere."""
    root = tmp_path_factory.mktemp("stores")
    return {"c1": store(root / "c1"), "c2": store(root / "c2"),
            "c3": store(root / "c3", lambda r: turned_wrong(r) if r.id == VICTIM else r),
            "c4": store(root / "c4", lambda r: scaled_throughput(0.6)(turned_wrong(r) if r.id == VICTIM else r))}


def test_one_line_per_setting_with_its_numbers(stores):
    lines = history.lines(stores["c1"])
    assert [line["id"] for line in lines] == IDS
    runs = {(r.id, r.seed): r for r in _runs()}
    for line in lines:
        assert line["commit"] == "abc1234" and line["n"] == 3 and line["seeds"] == [0, 1, 2]
        assert line["environment"] == ["x86_64, torch 2.13.0+cpu"] and line["date"] == "2025-03-01T10:39:30+00:00"
        acc = [runs[line["id"], s].test("accuracy") for s in (0, 1, 2)]
        assert line["accuracy"]["mean"] == pytest.approx(np.mean(acc))
        assert line["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
        assert (line["accuracy"]["min"], line["accuracy"]["max"]) == (min(acc), max(acc))
        assert line["images_per_second"]["median"] == runs[line["id"], 0].own_images_per_second()
        y_true, arrays = history.arrays(line)  # the packed predictions, unpacked
        first = runs[line["id"], 0].predictions
        assert y_true.tolist() == first["y_true"] and arrays["y_pred"][0].tolist() == first["y_pred"]
        assert np.abs(arrays["y_score"][0] - first["y_score"]).max() <= 0.5 / history.SCORE_STEPS + 1e-12
        assert arrays["y_score"].shape == (3, N_TEST)


def test_history_appends_and_refuses_the_same_commit_and_store_twice(stores, tmp_path, capsys):
    file = tmp_path / "history.jsonl"
    code, out, err = run_cli(capsys, "history", stores["c1"], "--file", file, "--commit", "c1")
    assert code == 0 and err == "" and out.startswith(f"{len(IDS)} lines (commit c1, store ")
    before = file.read_text()
    code, out, err = run_cli(capsys, "history", stores["c1"], "--file", file, "--commit", "c1")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"cxr-bench history: error: {file}: holds commit c1 of this store already (")
    assert file.read_text() == before  # nothing appended
    assert run_cli(capsys, "history", stores["c2"], "--file", file, "--commit", "c2")[0] == 0  # another commit
    assert run_cli(capsys, "history", stores["c3"], "--file", file, "--commit", "c1")[0] == 0  # another store
    assert len(history.read(file)) == 3 * len(IDS)


def test_the_commit_is_the_runs_own_or_asked_for(tmp_path, capsys):
    mixed = store(tmp_path / "mixed", lambda r: dataclasses.replace(
        r, environment={**r.environment, "git_commit": f"abc{r.seed}"}))
    code, _, err = run_cli(capsys, "history", mixed, "--file", tmp_path / "h.jsonl")
    assert code == 2 and err.count("\n") == 1 and "its runs have 3 commits (abc0, abc1, abc2)" in err \
        and "--commit" in err
    code, _, err = run_cli(capsys, "history", tmp_path / "nope", "--file", tmp_path / "h.jsonl")
    assert code == 2 and "no such results directory" in err


def test_a_bad_history_file_is_one_line(stores, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"history": 1}\nnot json\n')
    for args in (["report", stores["c1"], "--out", tmp_path / "r.md", "--history", bad],
                 ["history", stores["c1"], "--file", bad]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and f"{bad}:1: not a cxr-bench history line (missing commit" in err


@pytest.fixture(scope="module")
def history_file(stores, tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("history") / "history.jsonl"
    for commit in ("c1", "c2", "c3", "c4"):
        history.append(file, history.lines(stores[commit], commit=commit))
    return file


def test_flags_are_what_compare_would_say_against_the_point_before(stores, history_file, capsys):
    snaps = history.snapshots(history.read(history_file))
    assert [s["commit"] for s in snaps] == ["c1", "c2", "c3", "c4"]
    flags = history.flags(snaps)
    assert {k: row["verdict"] for k, row in flags.items() if row["verdict"] != "identical"} == {
        **{(3, i): "regression" for i in IDS},  # c4: slower everywhere
        (2, VICTIM): "regression",  # c3: 25 predictions wrong
    }
    assert flags[2, VICTIM]["verdicts"]["accuracy"] == "regression"
    assert flags[3, VICTIM]["verdicts"] == {"accuracy": "no change", "balanced_accuracy": "no change",
                                            "auroc": "no change", "throughput": "slower"}
    code, out, _ = run_cli(capsys, "compare", stores["c2"], stores["c3"], "--json")  # compare agrees
    assert code == 1 and json.loads(out)["regressions"] == [[VICTIM]]
    assert json.loads(out)["settings"][0]["metrics"]["accuracy"]["diff"] == \
        pytest.approx(flags[2, VICTIM]["metrics"]["accuracy"]["diff"])


def test_the_report_shows_the_history_with_a_figure_per_setting(stores, history_file, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "report", stores["c4"], "--out", tmp_path / "report.md", "--history", history_file)
    text = (tmp_path / "report.md").read_text()
    assert code == 0
    assert "## History across commits" in text
    assert "From `history.jsonl`: 4 snapshots (a commit measured into a results store each), 5 settings." in text
    rows = {line.split(" | ")[0][3:-1]: line for line in text.splitlines() if line.startswith("| `")
            and " | 4 | `c4` | " in line}
    assert sorted(rows) == IDS
    assert "▼ regression at `c3` (accuracy −8.33 points, balanced accuracy" in rows[VICTIM]
    assert "▼ regression at `c4` (throughput 0.60x)" in rows[VICTIM]
    assert all("at `c3`" not in rows[i] for i in IDS if i != VICTIM)
    for i in IDS:
        png = tmp_path / "figures" / f"history-{i}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"](figures/history-{i}.png)" in text
    assert not list((tmp_path / "figures").glob(".*"))  # no temp file left
    without = report.render(stores["c4"], out=tmp_path / "plain.md", figures=False)
    assert "History across commits" not in without.read_text()
