"""The run record (cxr.record): one definition, a writer and a reader of versions 1 and 2, and the
JSON Schema shipped with the package that every file read is checked against."""

import json
import subprocess
import sys
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

from cxr import env, record, results
from cxr.record import RunRecord

ROOT = Path(__file__).resolve().parents[1]
# written by the code of commit 31e96ba (schema version 1)
V1_FILE = ROOT / "tests" / "fixtures" / "v1" / "runs" / "recipe-ce-lr0.002-bs64" / "seed-0.json"


def _v2(**changes) -> dict:
    rec = record.from_dict(json.loads(V1_FILE.read_text()), str(V1_FILE))
    d = rec.to_dict()
    d.update(changes)
    return d


def test_a_version_1_file_is_read_and_upgraded():
    rec = results.read(V1_FILE)
    assert rec.schema_version == 2 and rec.id == "recipe-ce-lr0.002-bs64" and rec.seed == 0
    assert rec.test("accuracy") == pytest.approx(0.9809160305343512) and rec.ok
    assert rec.environment["git_commit"] == "31e96ba" and rec.environment["git_dirty"] is None
    assert rec.reused_from is None and rec.best_epoch == 28 and len(rec.history) == 30
    assert rec.timing_of("train_seconds") == 64.73 and rec.final("epoch") == 30


def test_write_then_read_round_trips_and_the_file_is_version_2(tmp_path):
    rec = results.read(V1_FILE)
    path = results.write(tmp_path, rec)
    assert path == tmp_path / "runs" / rec.id / "seed-0.json"
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 2 and list(raw) == list(rec.to_dict())
    assert results.read(path) == rec
    assert "cached" not in raw  # a runtime flag, not part of the file


def test_the_schema_describes_every_field_of_the_dataclass():
    schema = record.schema()
    stored = {f.name for f in fields(RunRecord)} - {"cached"}
    assert set(schema["properties"]) == stored == set(schema["required"])
    assert schema["properties"]["schema_version"]["const"] == record.SCHEMA_VERSION


def test_the_record_is_immutable():
    rec = results.read(V1_FILE)
    with pytest.raises(FrozenInstanceError):
        rec.status = "failed"


@pytest.mark.parametrize(("change", "fragment"), [
    ({"status": "done"}, "status: 'done' is not one of"),
    ({"spec_hash": "xyz"}, "spec_hash: 'xyz' does not match"),
    ({"seed": -1}, "seed: -1 is less than the minimum"),
    ({"surprise": 1}, "Additional properties are not allowed"),
    ({"schema_version": 3}, "schema_version 3"),
    ({"id": ""}, "id: '' should be non-empty"),
])
def test_a_file_that_breaks_the_schema_gets_one_line_naming_it(tmp_path, change, fragment):
    path = tmp_path / "runs" / "x" / "seed-0.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_v2(**change)))
    with pytest.raises(record.RecordError) as e:
        results.read(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and fragment in msg and "\n" not in msg


def test_metrics_out_of_range_are_refused(tmp_path):
    d = _v2()
    d["metrics"]["test"]["accuracy"] = 1.5
    with pytest.raises(record.RecordError, match="metrics/test/accuracy"):
        record.from_dict(d, "f.json")


def test_unreadable_and_non_json_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(record.RecordError, match="unreadable result file"):
        results.read(bad)
    with pytest.raises(record.RecordError, match="no-such.json: unreadable"):
        results.read(tmp_path / "no-such.json")


def test_result_files_validate_with_check_jsonschema_outside_python(tmp_path):
    """The shipped schema works for tools that are not this package (here the check-jsonschema CLI)."""
    path = results.write(tmp_path, results.read(V1_FILE))
    exe = Path(sys.executable).with_name("check-jsonschema")  # in the test extra: the README's test command has it
    assert exe.exists(), "check-jsonschema missing: pip install -e '.[test]'"
    schema = ROOT / "cxr" / "schema" / "run-record.schema.json"
    ok = subprocess.run([str(exe), "--schemafile", str(schema), str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    d = json.loads(path.read_text())
    d["status"] = "maybe"
    path.write_text(json.dumps(d))
    bad = subprocess.run([str(exe), "--schemafile", str(schema), str(path)], capture_output=True, text=True)
    assert bad.returncode == 1


def test_provenance_names_the_commit_and_whether_the_tree_was_dirty(monkeypatch):
    monkeypatch.delenv("CXR_GIT_COMMIT", raising=False)
    p = env.provenance()
    assert p["version"]
    if p["git_commit"] is not None:  # a checkout (CI and development); outside one it is None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip() != ""
        assert p["git_dirty"] == dirty and p["git_commit"].endswith("-dirty") == dirty
    monkeypatch.setenv("CXR_GIT_COMMIT", "abc1234-dirty")
    assert env.provenance()["git_commit"] == "abc1234-dirty" and env.provenance()["git_dirty"] is True
