"""The results store: one run record (cxr.record) per run under results/runs/<experiment-id>/seed-<n>.json.

Files are written atomically (temp file + rename), so a run killed at any moment leaves either
its complete result or nothing; `find` lets a rerun skip every run already done with the same
spec hash.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from cxr.record import DIVERGED, FAILED, OK, RecordError, RunRecord, loads
from cxr.spec import ExperimentSpec

STATUS_OK, STATUS_DIVERGED, STATUS_FAILED = OK, DIVERGED, FAILED
WEIGHTS_NAME = "model_weights.pth"
ResultError = RecordError  # the name this module's error had before cxr.record


def run_path(out: str | Path, spec: ExperimentSpec) -> Path:
    return Path(out) / "runs" / spec.id / f"seed-{spec.seed}.json"


def weights_path(out: str | Path, spec: ExperimentSpec) -> Path:
    return Path(out) / "runs" / spec.id / f"seed-{spec.seed}" / WEIGHTS_NAME


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(out: str | Path, record: RunRecord) -> Path:
    """Store a run record at runs/<id>/seed-<n>.json under out, atomically."""
    path = Path(out) / "runs" / record.id / f"seed-{record.seed}.json"
    data = record.to_json()
    _atomic_write_bytes(path, lambda f: f.write(data))
    return path


def save_weights(path: str | Path, state_dict: dict) -> Path:
    path = Path(path)
    cpu = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    _atomic_write_bytes(path, lambda f: torch.save(cpu, f))
    return path


def read(path: str | Path) -> RunRecord:
    """The run record in a file (schema version 2, or 1 upgraded), checked against the schema."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise RecordError(f"{path}: unreadable result file ({e.__class__.__name__}: {e.strerror or e})") from None
    return loads(text, str(path))


def find(out: str | Path, spec: ExperimentSpec) -> RunRecord | None:
    """The stored result of this exact run (same id, seed and spec hash), or None.

    A failed run is not a result: it is retried. A file that cannot be parsed (e.g. written by
    hand) is treated as absent and will be overwritten.
    """
    path = run_path(out, spec)
    if not path.exists():
        return None
    try:
        rec = read(path)
    except RecordError:
        return None
    if rec.spec_hash != spec.spec_hash() or rec.status == FAILED:
        return None
    return rec


def load_all(out: str | Path) -> list[RunRecord]:
    """Every result under out/runs, sorted by (id, seed). Unreadable files raise RecordError."""
    runs = Path(out) / "runs"
    records = [read(p) for p in sorted(runs.glob("*/seed-*.json"))]
    return sorted(records, key=lambda r: (r.id, r.seed))
