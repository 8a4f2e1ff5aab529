"""Run selection (cxr.selection): `--shard I/N` deals the selected runs into N deterministic slices for
job arrays (Slurm --array, Kubernetes Indexed Jobs) writing to one store."""

import pytest

from cxr import cli, results, selection
from cxr.spec import SpecError
from tests.conftest import learnable_npz


@pytest.mark.parametrize("n", [1, 2, 3, 5, 30])
def test_shards_partition_the_runs_and_keep_identical_recipes_together(n):
    specs = selection.select(["specs"])
    slices = [selection.shard(specs, i, n) for i in range(n)]
    ids = [s.run_id for part in slices for s in part]
    assert sorted(ids) == sorted(s.run_id for s in specs) and len(ids) == len(set(ids))  # each run exactly once
    for part in slices:  # a recipe stored under several ids is trained by one job, reused by the others
        hashes = {s.spec_hash() for s in part}
        assert all(s.spec_hash() not in hashes for other in slices if other is not part for s in other)
    assert slices == [selection.shard(specs, i, n) for i in range(n)]  # the same on every call


@pytest.mark.parametrize("text", ["1", "2/2", "-1/3", "a/b", "0/0", "1/2/3"])
def test_a_bad_shard_is_one_line(text):
    with pytest.raises(SpecError, match=r"--shard .*expected I/N with 0 <= I < N"):
        selection.parse_shard(text)
    assert selection.parse_shard("3/4") == (3, 4)


def test_two_shards_fill_one_store_without_training_a_run_twice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec_file = tmp_path / "s.toml"
    spec_file.write_text('[experiment]\nname = "s"\nwidth = 4\nepochs = 1\nseeds = [0]\n'
                         '[grid]\nlr = [0.001, 0.002, 0.003]\n')
    npz, out = learnable_npz(tmp_path / "d.npz"), tmp_path / "store"
    base = ["run", str(spec_file), "--data", f"npz:{npz}", "--out", str(out)]
    assert cli.main([*base, "--shard", "0/2"]) == 0
    first = {r.id for r in results.load_all(out)}
    assert cli.main([*base, "--shard", "1/2"]) == 0
    assert "stored" not in capsys.readouterr().out  # the second job trained only its own slice
    assert {r.id for r in results.load_all(out)} == first | {"s-ce-lr0.002-bs32"} and len(first) == 2
    assert cli.main([*base, "--shard", "2/2"]) == 2 and "--shard '2/2'" in capsys.readouterr().err
