"""One error base: every error meant for the user is a CxrError, which the CLI prints as one line with
exit status 2; an OSError from the file system too; anything else is a bug and keeps its traceback."""

import pytest

from cxr import cli, data, env, keyword, models, record, report, spec, sweep
from cxr.errors import CxrError, one_line


def test_every_user_error_derives_from_the_one_base():
    for cls in (spec.SpecError, data.DataError, models.WeightsError, record.RecordError, report.ReportError,
                keyword.KeywordError, env.DeviceError):
        assert issubclass(cls, CxrError), cls


def test_one_line_folds_whitespace_and_names_the_class():
    assert one_line(RuntimeError("out of memory.\n  Tried  2 GiB")) == "RuntimeError: out of memory. Tried 2 GiB"
    assert one_line(KeyError()) == "KeyError"
    assert len(one_line(ValueError("x" * 1000))) == len("ValueError: ") + 300


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[experiment]\nloss = "mse"\n')
    assert cli.main(["specs", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cxr-bench specs: error: {bad}: experiment.loss")
    assert cli.main(["specs", "-k", "a and", str(tmp_path / "none.toml")]) == 2


def test_a_file_system_error_is_one_line_and_exit_2(capsys, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert cli.main(["report", str(tmp_path), "--out", str(not_a_dir / "report.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxr-bench report: error: ") and err.count("\n") == 1


def test_a_bug_is_not_reported_as_bad_input(monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        raise ValueError("a programming error deep inside")

    monkeypatch.setattr(sweep, "run_group", bug)
    with pytest.raises(ValueError, match="programming error"):
        cli.main(["run", "specs/task-a-loss.toml", "-k", "bce", "--seeds", "1", "--out", str(tmp_path)])
