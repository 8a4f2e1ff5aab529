"""The results store: one JSON per run under results/runs/<experiment-id>/seed-<n>.json.

Files are written atomically (temp file + rename), so a run killed at any moment leaves either
its complete result or nothing; `find` lets a rerun skip every run already done with the same
spec hash.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from cxr.spec import ExperimentSpec

SCHEMA_VERSION = 1
STATUS_OK, STATUS_DIVERGED, STATUS_FAILED = "ok", "diverged", "failed"
WEIGHTS_NAME = "model_weights.pth"


class ResultError(ValueError):
    """A result file that cannot be read; the message names the file."""


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


def write_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    data = (json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n").encode()
    _atomic_write_bytes(path, lambda f: f.write(data))
    return path


def save_weights(path: str | Path, state_dict: dict) -> Path:
    path = Path(path)
    cpu = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    _atomic_write_bytes(path, lambda f: torch.save(cpu, f))
    return path


def read(path: str | Path) -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultError(f"{path}: unreadable result file ({e.__class__.__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("schema_version") != SCHEMA_VERSION:
        raise ResultError(f"{path}: not a cxr-bench result (schema_version {SCHEMA_VERSION} expected)")
    return obj


def find(out: str | Path, spec: ExperimentSpec) -> dict | None:
    """The stored result of this exact run (same id, seed and spec hash), or None.

    A failed run is not a result: it is retried. A file that cannot be parsed (e.g. written by
    hand) is treated as absent and will be overwritten.
    """
    path = run_path(out, spec)
    if not path.exists():
        return None
    try:
        obj = read(path)
    except ResultError:
        return None
    if obj.get("spec_hash") != spec.spec_hash() or obj.get("status") == STATUS_FAILED:
        return None
    return obj


def load_all(out: str | Path) -> list[dict]:
    """Every result under out/runs, sorted by (id, seed). Unreadable files raise ResultError."""
    runs = Path(out) / "runs"
    results = [read(p) for p in sorted(runs.glob("*/seed-*.json"))]
    return sorted(results, key=lambda r: (r["id"], r["seed"]))
