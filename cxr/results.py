"""The results store: one run record (cxr.record) per run under <out>/runs/<experiment-id>/seed-<n>.json,
its weights under <out>/runs/<experiment-id>/seed-<n>/model_weights.pth.

The rules (README "Results"):
- A stored result is served instead of training only when its identity (recipe, content of the data,
  training version: cxr.record.identity) is the run's. A result of another recipe or data under the
  same run id is never replaced silently: `cxr-bench run` refuses (StoreConflict) and says how to
  proceed; `--rerun` replaces it.
- A new attempt replaces an `ok` result only when it is itself `ok`; otherwise the attempt's record is
  kept beside it as seed-<n>.attempt.json and the good result stays.
- Files are written atomically (temp file, fsync, rename) with the user's umask, and every path the
  store writes resolves inside the store.
- A run being trained writes its state at the end of every epoch to seed-<n>.checkpoint.pt (atomically,
  under its claim; cxr.sweep.StoreCheckpoints), from which a later run of the same identity resumes; it is
  deleted once the run's result is written.
- A run being trained holds a claim (an flock'ed seed-<n>.lock naming host and pid; the kernel frees
  it when the process dies), so two processes never train the same run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from cxr.errors import CxrError
from cxr.record import DIVERGED, FAILED, OK, RecordError, RunRecord, loads
from cxr.spec import ExperimentSpec

STATUS_OK, STATUS_DIVERGED, STATUS_FAILED = OK, DIVERGED, FAILED
WEIGHTS_NAME = "model_weights.pth"
RESULT_FILE = re.compile(r"seed-(\d+)\.json")  # not seed-<n>.attempt.json
ResultError = RecordError  # the name this module's error had before cxr.record


class StoreError(CxrError):
    """A results directory that cannot be used, or a path that would leave it."""


class StoreConflict(CxrError):
    """A run id whose stored result has another identity (recipe, data or training version)."""


class Claimed(CxrError):
    """A run that another process is training right now."""


def file_mode() -> int:
    """0o666 & ~umask: the mode open(path, "w") gives a new file, with the umask in force now."""
    try:  # Linux: read the umask without changing it (os.umask would, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def inside(out: str | Path, path: Path) -> Path:
    """`path`, after checking that it resolves inside the store `out` (no `..`, no symlink out)."""
    root = Path(out).resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise StoreError(f"{path}: resolves to {resolved}, outside the results directory {root}")
    return path


def run_path(out: str | Path, spec: ExperimentSpec) -> Path:
    return inside(out, Path(out) / "runs" / spec.id / f"seed-{spec.seed}.json")


def attempt_path(out: str | Path, spec: ExperimentSpec) -> Path:
    """Where a failed or diverged attempt goes when an ok result is stored: beside it, not over it."""
    return inside(out, Path(out) / "runs" / spec.id / f"seed-{spec.seed}.attempt.json")


def weights_path(out: str | Path, spec: ExperimentSpec) -> Path:
    return inside(out, Path(out) / "runs" / spec.id / f"seed-{spec.seed}" / WEIGHTS_NAME)


def checkpoint_path(out: str | Path, spec: ExperimentSpec) -> Path:
    """Where a run being trained keeps its state at the end of its last epoch (cxr.sweep.StoreCheckpoints)."""
    return inside(out, Path(out) / "runs" / spec.id / f"seed-{spec.seed}.checkpoint.pt")


def check_writable(out: str | Path) -> Path:
    """Create the store if needed and check that files can be written there, before any training."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: not a directory (--out names the results directory)")
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out / "runs", prefix=".probe-"):
            pass
    except OSError as e:
        raise StoreError(f"{out}: cannot write results there ({e.strerror or e})") from None
    return out


def atomic_write(path: Path, write) -> None:
    """write(f) into a temp file beside path, fsync it, give it file_mode() and rename it over path: a
    crash or a full disk leaves the old file or none, never a truncated one, and no temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a shared results directory must stay readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(out: str | Path, record: RunRecord, path: Path | None = None) -> Path:
    """Store a run record at runs/<id>/seed-<n>.json under out (or at `path` inside out), atomically."""
    path = inside(out, path or Path(out) / "runs" / record.id / f"seed-{record.seed}.json")
    data = record.to_json()
    atomic_write(path, lambda f: f.write(data))
    return path


def save_weights(path: str | Path, state_dict: dict) -> Path:
    path = Path(path)
    cpu = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda f: torch.save(cpu, f))
    return path


def copy_file(out: str | Path, src: Path, dst: Path) -> Path:
    """Copy a file of the store to another place in it, atomically; both must lie inside out."""
    data = inside(out, src).read_bytes()
    atomic_write(inside(out, dst), lambda f: f.write(data))
    return dst


def read(path: str | Path) -> RunRecord:
    """The run record in a file (schema version 2, or 1 upgraded), checked against the schema."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise RecordError(f"{path}: unreadable result file ({e.__class__.__name__}: {e.strerror or e})") from None
    return loads(text, str(path))


def stored(out: str | Path, spec: ExperimentSpec) -> RunRecord | None:
    """Whatever result is stored for this run id and seed (any identity, any status), or None when there
    is none or the file cannot be read (it is then overwritten)."""
    path = run_path(out, spec)
    if not path.exists():
        return None
    try:
        return read(path)
    except RecordError:
        return None


def find(out: str | Path, spec: ExperimentSpec, identity: str | None = None) -> RunRecord | None:
    """The stored result of this exact run, or None: same id and seed, not failed, and the same identity
    (or, without `identity`, the same spec hash: what a caller that has not loaded the data can check)."""
    rec = stored(out, spec)
    if identity is not None:
        return rec if serves(rec, identity) else None
    return rec if rec is not None and rec.status != FAILED and rec.spec_hash == spec.spec_hash() else None


def serves(rec: RunRecord | None, identity: str) -> bool:
    """Whether a stored record is the result of a run of this identity (a failed one never is)."""
    return rec is not None and rec.status != FAILED and rec.identity == identity


def result_files(out: str | Path) -> list[Path]:
    """runs/<id>/seed-<n>.json under out, sorted (attempt files and temp files are not results)."""
    return sorted(p for p in (Path(out) / "runs").glob("*/seed-*.json") if RESULT_FILE.fullmatch(p.name))


def load_all(out: str | Path, skipped: list[str] | None = None) -> list[RunRecord]:
    """Every result under out/runs, sorted by (id, seed). An unreadable or invalid file raises
    RecordError, or, when a `skipped` list is given, its one-line error is appended there instead."""
    records = []
    for p in result_files(out):
        try:
            records.append(read(p))
        except RecordError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    return sorted(records, key=lambda r: (r.id, r.seed))


@contextlib.contextmanager
def claim(out: str | Path, spec: ExperimentSpec) -> Iterator[None]:
    """Hold the run's claim while training it; raise Claimed when another live process holds it.

    An flock on runs/<id>/seed-<n>.lock: the kernel releases it when its holder exits, however it
    exits, so a stale claim never blocks (the file's text, host and pid, only tells who holds it).
    flock works between processes of one machine and on most local file systems; on NFS it depends on
    the mount.
    """
    path = inside(out, Path(out) / "runs" / spec.id / f"seed-{spec.seed}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Claimed(f"{run_path(out, spec)}: being trained by {holder}; its result will be stored "
                          "there") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # the lock is on the file that is there now
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its holder had just removed: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # before unlocking: a waiter then takes a fresh file
    finally:
        os.close(fd)
