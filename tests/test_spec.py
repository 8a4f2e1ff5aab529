"""Spec files: expansion, ids, validation errors, -k selection, and a property test over arbitrary TOML."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cxr import models, selection, spec
from cxr.spec import SpecError

SPECS = Path(__file__).resolve().parents[1] / "specs"

BASE = """
[experiment]
name = "lr"
loss = "ce"
lr = 0.001
batch_size = 32
epochs = 2
seeds = [0, 1]
"""


def test_grid_expands_to_one_spec_per_point_and_seed():
    specs = spec.parse(BASE + "[grid]\nlr = [0.001, 0.01, 0.1]\n", "x.toml")
    assert [s.run_id for s in specs] == [
        "lr-ce-lr0.001-bs32-seed0", "lr-ce-lr0.001-bs32-seed1",
        "lr-ce-lr0.01-bs32-seed0", "lr-ce-lr0.01-bs32-seed1",
        "lr-ce-lr0.1-bs32-seed0", "lr-ce-lr0.1-bs32-seed1",
    ]
    assert {s.sweep for s in specs} == {("lr",)}
    assert specs[2].lr == 0.01 and specs[2].epochs == 2


def test_other_swept_keys_appear_in_the_id():
    specs = spec.parse(BASE + "[grid]\nepochs = [1, 3]\nweight_decay = [0, 0.01]\n", "x.toml")
    assert specs[0].id == "lr-ce-lr0.001-bs32-ep1-wd0"
    assert len({s.run_id for s in specs}) == len(specs) == 8


def test_no_grid_gives_one_experiment_and_defaults_apply():
    (s0, s1) = spec.parse(BASE, "x.toml")
    assert s0.id == s1.id == "lr-ce-lr0.001-bs32" and (s0.seed, s1.seed) == (0, 1)
    assert s0.dataset == "synthetic" and s0.model == "cnn" and s0.optimizer == "adam"


def test_spec_hash_covers_the_recipe_not_the_bookkeeping():
    a = spec.ExperimentSpec(name="a", sweep=("lr",), source="a.toml")
    b = spec.ExperimentSpec(name="b", sweep=("loss",), source="b.toml")
    assert a.spec_hash() == b.spec_hash()
    assert a.spec_hash() != spec.ExperimentSpec(lr=0.01).spec_hash()
    assert a.spec_hash() != spec.ExperimentSpec(seed=1).spec_hash()


@pytest.mark.parametrize("text, fragment", [
    ("[experiment]\nlrr = 0.1\n", "unknown key experiment.lrr"),
    ("[experiment]\nlr = 'fast'\n", "experiment.lr = 'fast': expected a number"),
    ("[experiment]\nlr = -1.0\n", "experiment.lr = -1.0: must be in (0, 10]"),
    ("[experiment]\nloss = 'mse'\n", "allowed values are bce, ce"),
    ("[experiment]\nbatch_size = 0\n", "experiment.batch_size = 0: must be in [2, 65536]"),
    ("[experiment]\nbatch_size = 32.5\n", "expected an integer"),
    ("[experiment]\nepochs = true\n", "expected a int"),
    ("[experiment]\nseeds = []\n", "experiment.seeds"),
    ("[experiment]\nseeds = [1, 1]\n", "seeds must be distinct"),
    ("[experiment]\n[grid]\nlr = []\n", "grid.lr = []: expected a non-empty list"),
    ("[experiment]\n[grid]\nlr = 0.1\n", "expected a non-empty list"),
    ("[experiment]\n[grid]\nlr = [0.1, 0.1]\n", "values must be distinct"),
    ("[experiment]\n[grid]\ncolour = [1]\n", "unknown grid key grid.colour"),
    ("[experiment]\n[grid]\nlr = [0.1, 'x']\n", "grid.lr = 'x'"),
    ("[experiment\n", "not valid TOML"),
    ("[grid]\nlr = [0.1]\n", "missing [experiment]"),
    ("[experiment]\n[extra]\n", "unknown table(s) extra"),
    ("[experiment]\nmodel = 'vit'\n", "allowed values are cnn, vgg, resnet18"),
])
def test_bad_specs_give_one_line_errors_naming_file_and_key(text, fragment):
    with pytest.raises(SpecError) as e:
        spec.parse(text, "specs/bad.toml")
    msg = str(e.value)
    assert msg.startswith("specs/bad.toml: ") and fragment in msg and "\n" not in msg


def test_duplicate_ids_across_files_are_refused(tmp_path):
    (tmp_path / "a.toml").write_text(BASE)
    (tmp_path / "b.toml").write_text(BASE)
    with pytest.raises(SpecError, match="duplicate experiment id lr-ce-lr0.001-bs32-seed0"):
        spec.load([tmp_path])


def test_missing_file_and_empty_dir(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        spec.load([tmp_path / "nope.toml"])
    with pytest.raises(SpecError, match="no spec files"):
        spec.load([tmp_path])


def test_shipped_specs_cover_task_a_and_task_b():
    specs = spec.load([SPECS])
    ids = {s.id for s in specs}
    assert {"loss-bce-lr0.001-bs32", "loss-ce-lr0.001-bs32"} <= ids
    assert {f"lr-ce-lr{lr}-bs32" for lr in ("0.001", "0.01", "0.1")} <= ids
    assert {f"bs-ce-lr0.001-bs{b}" for b in (32, 64, 128)} <= ids
    assert all(len([s for s in specs if s.id == i]) == 3 for i in ids)  # 3 seeds each


def test_model_names_agree_with_models_module():
    assert set(spec.MODELS) == set(models.MODELS)


@pytest.mark.parametrize("expr, expected", [
    ("ce", {"lr-ce-lr0.001-bs32", "lr-ce-lr0.1-bs32", "loss-ce-lr0.001-bs32"}),
    ("bce", {"loss-bce-lr0.001-bs32"}),
    ("not bce", {"lr-ce-lr0.001-bs32", "lr-ce-lr0.1-bs32", "loss-ce-lr0.001-bs32"}),
    ("lr0.1", {"lr-ce-lr0.1-bs32"}),
    ("ce and lr0.1", {"lr-ce-lr0.1-bs32"}),
    ("bce or lr0.1", {"loss-bce-lr0.001-bs32", "lr-ce-lr0.1-bs32"}),
    ("loss- and (bce or ce)", {"loss-bce-lr0.001-bs32", "loss-ce-lr0.001-bs32"}),
])
def test_k_selection_treats_loss_names_exactly(expr, expected):
    specs = spec.parse(BASE.replace('seeds = [0, 1]', 'seeds = [0]') + "[grid]\nlr = [0.001, 0.1]\n", "a.toml")
    specs += spec.parse(BASE.replace('name = "lr"', 'name = "loss"').replace('seeds = [0, 1]', 'seeds = [0]')
                        + "[grid]\nloss = ['bce', 'ce']\n", "b.toml")
    assert {s.id for s in specs if selection.matches(s, expr)} == expected


def test_k_selection_rejects_garbage():
    with pytest.raises(SpecError):
        selection.matches(spec.ExperimentSpec(), "ce and and")
    with pytest.raises(SpecError):
        selection.matches(spec.ExperimentSpec(), "ce; import os")


def test_overrides_are_validated_and_seeds_resized():
    (s,) = spec.parse(BASE.replace("seeds = [0, 1]", "seeds = [5]"), "x.toml")
    assert spec.override(s, epochs=1, dataset=None).epochs == 1
    with pytest.raises(SpecError, match="--epochs"):
        spec.override(s, epochs=0)
    assert [x.seed for x in spec.with_seeds([s], 3)] == [0, 1, 2]


def test_seeds_option_keeps_max_runs_per_file_and_refuses_before_building_runs(tmp_path, monkeypatch):
    # --seeds N replaces each file's seeds: the limit holds for its grid points x N, as for the file's own seeds
    monkeypatch.setattr(spec, "MAX_RUNS", 12)
    grid = tmp_path / "grid.toml"
    grid.write_text(BASE + "[grid]\nlr = [0.001, 0.01, 0.1]\n")  # 3 points
    lone = tmp_path / "lone.toml"
    lone.write_text(BASE.replace('name = "lr"', 'name = "lone"'))  # 1 point
    assert len(selection.select([grid, lone], seeds=4)) == 3 * 4 + 4  # 12 runs in grid.toml: at the limit
    built = []
    real_replace = spec.dataclasses.replace
    monkeypatch.setattr(spec.dataclasses, "replace", lambda *a, **k: built.append(1) or real_replace(*a, **k))
    with pytest.raises(SpecError) as e:
        selection.select([lone, grid], seeds=5)  # also for pytest benchmarks --seeds, which calls select
    assert str(e.value) == (f"<command line>: --seeds 5: {grid} would expand to 15 runs (3 grid points x 5 seeds); "
                            "at most 12 per file (cxr.spec.MAX_RUNS)")
    assert not built  # refused before any run is made: --seeds 100000000 costs no memory
    with pytest.raises(SpecError, match=r"--seeds 100,000,000: .* 100,000,000 runs \(1 grid point x"):
        spec.with_seeds(spec.parse(BASE, "x.toml"), 100_000_000)


def test_from_dict_round_trips_a_stored_spec():
    (s, _) = spec.parse(BASE + "[grid]\nlr = [0.01]\n", "x.toml")
    assert spec.from_dict(s.to_dict()) == s


# Arbitrary TOML documents built from the spec's own keys and random values: the loader either
# returns valid specs or raises SpecError, never anything else.
_keys = st.sampled_from(sorted(spec._SETTABLE) + ["bogus", "name"])
_scalars = st.one_of(st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                     st.sampled_from(["ce", "bce", "adam", "sgd", "cnn", "cosine", "loss", "x", ""]),
                     st.lists(st.integers(-2, 5), max_size=3))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(v), repr(v))
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml_value, v)) + "]"
    return str(v)


@given(st.dictionaries(_keys, _scalars, max_size=6),
       st.dictionaries(_keys, st.lists(_scalars, max_size=3), max_size=2),
       st.booleans())
def test_arbitrary_toml_gives_specs_or_a_spec_error(experiment, grid, with_header):
    lines = ["[experiment]"] if with_header else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in experiment.items()]
    if grid:
        lines.append("[grid]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in grid.items()]
    try:
        specs = spec.parse("\n".join(lines), "p.toml")
    except SpecError as e:
        assert str(e).startswith("p.toml: ") and "\n" not in str(e)
        return
    assert specs and all(isinstance(s, spec.ExperimentSpec) for s in specs)
    assert len({s.run_id for s in specs}) == len(specs)


@given(st.text(max_size=200))
def test_arbitrary_text_gives_specs_or_a_spec_error(text):
    try:
        spec.parse(text, "p.toml")
    except SpecError:
        pass
