"""`cxr-bench run` at its edges: `--seeds` within cxr.spec.MAX_RUNS, an empty `--shard` (nothing to do, not an
error) and what Ctrl-C says. Nothing here trains."""

from __future__ import annotations

import pytest

from cxr import cli, selection

SPEC = """
[experiment]
name = "edge"
loss = "ce"
epochs = 1
seeds = [0]

[grid]
lr = [0.001, 0.01, 0.1]
"""  # 3 runs, 3 recipes


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text(SPEC)
    return path


def test_seeds_over_max_runs_are_refused_in_one_line_before_any_run_is_built(spec_file, tmp_path, capsys):
    assert cli.main(["specs", str(spec_file), "--seeds", "3334"]) == 2  # 3 points x 3334 seeds = 10,002 runs
    assert capsys.readouterr().err == (
        f"cxr-bench specs: error: <command line>: --seeds 3,334: {spec_file} would expand to 10,002 runs "
        "(3 grid points x 3,334 seeds); at most 10,000 per file (cxr.spec.MAX_RUNS)\n")
    out = tmp_path / "out"
    # was a 3.5 GB list and a MemoryError; --shard does not change what is selected first
    assert cli.main(["run", str(spec_file), "--seeds", "100000000", "--shard", "0/4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seeds 100,000,000" in err and "cxr.spec.MAX_RUNS" in err
    assert not out.exists()
    assert cli.main(["specs", str(spec_file), "--seeds", "3333"]) == 0  # 9,999 runs: within the limit
    assert len(capsys.readouterr().out.splitlines()) == 9999


def test_an_empty_shard_exits_0_with_one_line_and_touches_nothing(spec_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", str(spec_file), "--shard", "3/4", "--out", str(out)]) == 0  # a job-array task succeeds
    captured = capsys.readouterr()
    assert captured.out == ("cxr-bench run: shard 3/4 is empty (3 runs selected, dealt to 4 shards by recipe); "
                            "nothing to do\n")
    assert captured.err == ""
    assert not out.exists()


def test_an_empty_shard_still_refuses_bad_input(spec_file, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    assert cli.main(["run", str(spec_file), "--shard", "3/4", "--gpus-per-task", "1", "--out", out]) == 2
    assert capsys.readouterr().err.startswith("cxr-bench run: error: --gpus-per-task: only with --ray")
    monkeypatch.setenv("CXR_GRAPH_STEPS", "all")
    assert cli.main(["run", str(spec_file), "--shard", "3/4", "--out", out]) == 2
    assert capsys.readouterr().err == ("cxr-bench run: error: CXR_GRAPH_STEPS='all': expected a positive integer "
                                       "or 'epoch'\n")


@pytest.mark.parametrize("shard", [[], ["--shard", "0/4"]])
def test_no_experiments_selected_stays_an_error_with_or_without_shard(spec_file, tmp_path, capsys, shard):
    assert cli.main(["run", str(spec_file), "-k", "bs999", *shard, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "cxr-bench run: no experiments selected\n"


def test_ctrl_c_says_that_runs_cut_short_resume_from_their_last_complete_epoch(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selection, "select", interrupted)
    assert cli.main(["run", "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == ("interrupted; finished runs are stored, and runs cut short resume from their "
                                       "last complete epoch at the next cxr-bench run\n")
    assert cli.main(["specs"]) == 130  # no run was under way: nothing to say about runs
    assert capsys.readouterr().err == "interrupted\n"
