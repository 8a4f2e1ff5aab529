"""The report's files on disk: read the result files (an unreadable one is skipped, not fatal) and write
the report and its figures atomically (a temp file in the same directory, then os.replace), with the
permissions a plain open(path, "w") gives, so a full disk or a crash leaves the previous file or none,
never a truncated one.

A record can pass the JSON Schema and still not be one the report can use: a swept key its spec lacks, a
NaN (Python's json reads it, JSON has none), predictions of unequal lengths. `why_unusable` says what
the report needs beyond the schema; such a record is skipped like an unreadable file, with its reason.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from cxr import results as results_mod
from cxr import spec as spec_mod
from cxr.record import OK, RunRecord


def write_text(path: Path, text: str) -> None:
    """Write text (UTF-8) to path atomically, with the mode of a plain open(path, "w")."""
    data = text.encode("utf-8")
    results_mod.atomic_write(path, lambda f: f.write(data))


def draw_atomically(path: Path, draw: Callable[[Path], str | None]) -> str | None:
    """draw(temp path) saves a PNG there and returns its caption, or None (nothing to show: no file).
    With a caption the figure replaces path complete, with results_mod.file_mode(); the temp file never stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.png")
    os.close(fd)
    tmp = Path(name)
    try:
        caption = draw(tmp)
        if caption:
            os.chmod(tmp, results_mod.file_mode())
            os.replace(tmp, path)
        return caption
    finally:
        tmp.unlink(missing_ok=True)


def load(results_dir: Path) -> tuple[list[RunRecord], list[str]]:
    """(every readable run record under results_dir/runs that the report can use, sorted by (id, seed)
    (cxr.results.load_all); one line per result file that is not a readable record, then per record the
    report cannot use (why_unusable): "`runs/<id>/seed-<n>.json`: <problem>", the path relative to results_dir)."""
    skipped: list[str] = []
    records = []
    for r in results_mod.load_all(results_dir, skipped=skipped):
        why = why_unusable(r)
        if why:  # its file is runs/<id>/seed-<n>.json: load_all takes no record from elsewhere
            path = Path(results_dir) / "runs" / r.id / f"seed-{r.seed}.json"
            skipped.append(f"{path}: {' '.join(why.split())}")  # one line, whatever a key holds
        else:
            records.append(r)
    return records, [skipped_line(line, results_dir) for line in skipped]


# Spec keys the "What was run" rows read (cxr.report.info) besides those the schema requires; every version
# of cxr.spec wrote them.
REPORTED = ("model", "width", "image_size", "optimizer", "schedule", "weight_decay", "select")
_TYPES = {bool: "boolean", str: "string", int: "integer", float: "number"}  # ExperimentSpec's field types in JSON


def why_unusable(r: RunRecord) -> str | None:
    """What in a schema-valid record the report cannot use, as one line "<where>: <problem>"; None when
    it can render it."""
    at = _not_finite({f.name: getattr(r, f.name) for f in dataclasses.fields(r)})  # no copy
    if at is not None:
        return f"{at[0]}: {_short(at[1])} is not a finite number (JSON has no NaN or Infinity)"
    spec = r.spec
    for key in REPORTED:
        if key not in spec:
            return f"spec: {key!r} is missing (the report shows it)"
    for f in dataclasses.fields(spec_mod.ExperimentSpec):
        kind = type(f.default)
        if f.name in spec and kind in _TYPES and not _is(spec[f.name], kind):
            return f"spec/{f.name}: {_short(spec[f.name])} is not of type {_TYPES[kind]!r}"
    for key in spec["sweep"]:  # the schema cannot say that each names a key of the spec
        if key not in spec:
            return f"spec/sweep: {key!r} is not a key of the spec"
        if not (_is(spec[key], str) or _is(spec[key], float)):
            return f"spec/{key}: {_short(spec[key])} is swept, so it must be a string or a number"
    if r.predictions:
        n = {k: len(r.predictions[k]) for k in ("y_true", "y_score", "y_pred")}
        if len(set(n.values())) > 1:
            return f"predictions: {', '.join(f'{k} has {v}' for k, v in n.items())} values; one per test image"
        if not n["y_true"]:
            return "predictions: no test image"
    if r.status == OK and r.test("accuracy") is None:
        return "metrics/test/accuracy: null in a run with status ok"
    return None


def _is(value, kind: type) -> bool:
    """Whether a JSON value has the type of an ExperimentSpec field (an integral float is an integer, as in
    JSON Schema; a boolean is no number)."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is int:
        return isinstance(value, int) or isinstance(value, float) and value.is_integer()
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _not_finite(obj) -> tuple[str, object] | None:
    """(path, value) of the first number that is no finite float (NaN, Infinity, an integer beyond 1e308) in
    nested dicts and lists; iterative, so nesting as deep as json reads is fine."""
    stack = [((), obj)]
    while stack:
        at, v = stack.pop()
        if isinstance(v, dict):
            stack.extend(((*at, k), x) for k, x in reversed(v.items()))
        elif isinstance(v, (list, tuple)):
            stack.extend(((*at, i), x) for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, float) and not math.isfinite(v) or \
                isinstance(v, int) and not isinstance(v, bool) and abs(v) > sys.float_info.max:
            return "/".join(map(str, at)) or "(top level)", v
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def skipped_line(error: str, results_dir: Path) -> str:
    """A one-line "<path>: <problem>" error with the path relative to results_dir, never absolute."""
    m = re.match(r"(.*?\.json): (.*)\Z", error, re.S)
    if not m:
        return error
    try:
        where = Path(os.path.relpath(m.group(1), results_dir))
    except ValueError:  # another drive
        where = Path(m.group(1))
    shown = where.name if where.is_absolute() or ".." in where.parts else where.as_posix()
    return f"`{shown}`: {m.group(2)}"
