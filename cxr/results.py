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
import io
import os
import re
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from cxr.errors import CxrError, one_line
from cxr.record import DIVERGED, FAILED, OK, RecordError, RunRecord, loads
from cxr.spec import ExperimentSpec

STATUS_OK, STATUS_DIVERGED, STATUS_FAILED = OK, DIVERGED, FAILED
WEIGHTS_NAME = "model_weights.pth"
RESULT_FILE = re.compile(r"seed-(\d+)\.json")  # not seed-<n>.attempt.json
MAX_RECORD_BYTES = 64 << 20  # a record of 100,000 test images is ~10 MB; anything far larger is not one
ResultError = RecordError  # the name this module's error had before cxr.record


class StoreError(CxrError):
    """A results directory that cannot be used, or a path that would leave it."""


class StoreConflict(CxrError):
    """A run id whose stored result has another identity (recipe, data or training version)."""


class Claimed(CxrError):
    """A run that another process is training right now."""


class UnreadableResult(StoreConflict):
    """A stored result that cannot be read (corrupt, newer schema, no permission): it blocks its run, never
    replaced silently."""


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


def checkpoint_bytes(identity: str, run_id: str, state: dict) -> bytes:
    """A checkpoint file's content: the run's identity and id beside the engine's state (torch.save)."""
    buf = io.BytesIO()
    torch.save({"identity": identity, "run": run_id, "state": state}, buf)
    return buf.getvalue()


def load_checkpoint(data: bytes) -> tuple[str | None, dict]:
    """(identity, state) of a checkpoint file's content; raises (ValueError, torch's errors) when it is none."""
    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise ValueError("not a cxr-bench checkpoint")
    return saved.get("identity"), saved["state"]


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
    crash or a full disk leaves the old file or none, never a truncated one, and no temp file. Any
    failure to write (a full disk, `ulimit -f`, torch.save's own errors) is a StoreError naming path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a shared results directory must stay readable
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError | RuntimeError):  # torch.save reports a full disk as RuntimeError
            why = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
            raise StoreError(f"{path}: cannot write ({why})") from None
        raise


def remove_temp_files(out: str | Path, spec: ExperimentSpec) -> None:
    """Delete the temp files that writes of this run left when their process was killed mid-write
    (atomic_write's .<name>.*.tmp). Only the holder of the run's claim calls this: no write of it is live."""
    base = Path(out) / "runs" / spec.id
    for pattern in (f".seed-{spec.seed}.*.tmp", f"seed-{spec.seed}/.*.tmp"):
        for tmp in base.glob(pattern):
            with contextlib.suppress(OSError):
                inside(out, tmp).unlink()


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


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else (a FIFO, a device, a link to
    /dev/zero, a directory, a huge file) is refused without reading it: RecordError naming path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except OSError as e:
        raise RecordError(f"{path}: unreadable {what} ({e.__class__.__name__}: {e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        os.close(fd)
        if stat.S_ISREG(st.st_mode):
            raise RecordError(f"{path}: {st.st_size} bytes, more than a {what} can be ({limit}); skipped")
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "not a file"
        raise RecordError(f"{path}: not a regular file ({kind}); skipped")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RecordError(f"{path}: more than a {what} can be ({limit} bytes); skipped")
    return data


def read(path: str | Path) -> RunRecord:
    """The run record in a file (schema version 2, or 1 upgraded), checked against the schema. Only a
    regular file of at most MAX_RECORD_BYTES is read."""
    path = Path(path)
    return loads(read_regular(path, MAX_RECORD_BYTES, "result file"), str(path))


def matches_path(path: Path, rec: RunRecord) -> bool:
    """Whether a record lies where its id and seed put it (runs/<id>/seed-<n>.json): a copied run
    directory (runs/X.bak) holds records of X that are not its own."""
    return path.parent.name == rec.id and path.name == f"seed-{rec.seed}.json"


def stored(out: str | Path, spec: ExperimentSpec, strict: bool = False) -> RunRecord | None:
    """Whatever result is stored for this run id and seed (any identity, any status), or None when there
    is none. A file there that cannot be read: None, or with `strict` UnreadableResult (it blocks the
    run: an unreadable result is never replaced silently; --rerun replaces it)."""
    path = run_path(out, spec)
    if not os.path.lexists(path):
        return None
    try:
        return read(path)
    except RecordError as e:
        if strict:
            raise UnreadableResult(f"{e}; it is kept: fix or move it, or pass --rerun to replace it") from None
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
    """Every result under out/runs, sorted by (id, seed), each (id, seed) once. An unreadable or invalid
    file, or one that is not where its id and seed put it (a copied run directory), raises RecordError,
    or, when a `skipped` list is given, its one-line reason is appended there instead."""
    records: dict[tuple[str, int], RunRecord] = {}
    for p in result_files(out):
        try:
            rec = read(p)
            if not matches_path(p, rec):
                raise RecordError(f"{p}: holds the result of {rec.id} seed {rec.seed}, which belongs in "
                                  f"runs/{rec.id}/seed-{rec.seed}.json (a copied run directory?); not counted")
            if (rec.id, rec.seed) in records:  # e.g. a file system that folds case
                raise RecordError(f"{p}: a second result of {rec.id} seed {rec.seed}; not counted twice")
            records[rec.id, rec.seed] = rec
        except RecordError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    return sorted(records.values(), key=lambda r: (r.id, r.seed))


def _share_with_group(fd: int, directory: Path) -> None:
    """A lock file in a group-writable store (its runs/ directory) is group-writable, whatever the umask:
    a colleague's process must be able to open it to wait its turn."""
    try:
        if os.stat(directory).st_mode & stat.S_IWGRP and os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, os.fstat(fd).st_mode & 0o777 | stat.S_IRGRP | stat.S_IWGRP)
    except OSError:
        pass


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
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        except PermissionError as e:  # another user's lock file: theirs until they remove it
            raise Claimed(f"{run_path(out, spec)}: its claim {path.name} cannot be opened ({e.strerror}); taken "
                          "as held by someone else, this run is skipped") from None
        _share_with_group(fd, Path(out) / "runs")
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
