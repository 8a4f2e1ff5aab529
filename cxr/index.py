"""The store's index: which result files hold a result of a given identity, so that finding an identical
run stored under another id (cxr.sweep's reuse) reads one small file, not every record of the store.

The files are the truth; the index only says where to look. It lives in runs/.index.json and notes,
for every run directory, its mtime when its records were read and, for every result file there, its
identity and status. A lookup lists runs/ and stats each run directory (no file is read): a directory
that is new or changed since (an atomic write renames into it, so any result written there changes
its mtime) has its records read again and the index is rewritten (best effort: a read-only store is
still searched). Every candidate the index names is read and checked by the caller before it is
used, so a stale or hand-edited index can cost a missed reuse, never a wrong one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from cxr import results
from cxr.record import RecordError

INDEX_NAME = ".index.json"
VERSION = 1


def _load(path: Path) -> dict:
    try:
        data = json.loads(results.read_regular(path, results.MAX_RECORD_BYTES, "index"))
        if isinstance(data, dict) and data.get("version") == VERSION and isinstance(data.get("dirs"), dict):
            return data["dirs"]
    except (RecordError, ValueError):
        pass
    return {}  # missing, corrupt or of another version: rebuilt from the files


def _scan(directory: Path) -> dict[str, dict]:
    """{file name: {"identity", "status", "seed"}} of the readable result files of one run directory."""
    entries = {}
    for path in sorted(directory.glob("seed-*.json")):
        if not results.RESULT_FILE.fullmatch(path.name):
            continue
        try:
            rec = results.read(path)
        except RecordError:
            continue
        if results.matches_path(path, rec):
            entries[path.name] = {"identity": rec.identity, "status": rec.status, "seed": rec.seed}
    return entries


def refresh(out: str | Path) -> dict[str, dict]:
    """The index of the store `out`, brought up to date with its run directories: {dir name: {"mtime_ns",
    "files": {file name: entry}}}."""
    runs = Path(out) / "runs"
    path = runs / INDEX_NAME
    old = _load(path)
    new, changed = {}, False
    try:
        listing = list(os.scandir(runs))
    except OSError:
        return {}
    for entry in listing:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
        except OSError:
            continue
        known = old.get(entry.name)
        if known is not None and known.get("mtime_ns") == mtime:
            new[entry.name] = known
        else:  # new or changed since: read its records (mtime taken before, so a change during is seen later)
            new[entry.name] = {"mtime_ns": mtime, "files": _scan(Path(entry.path))}
            changed = True
    if changed or new.keys() != old.keys():
        text = json.dumps({"version": VERSION, "dirs": new}, separators=(",", ":")).encode()
        with contextlib.suppress(results.StoreError, OSError):  # a read-only store: searched, not indexed
            results.atomic_write(path, lambda f: f.write(text))
    return new


def candidates(out: str | Path, identity: str, seed: int) -> list[Path]:
    """The result files that the index says hold a result of `identity` and `seed` that is not failed,
    sorted; the caller reads and checks each one."""
    found = []
    for name, d in refresh(out).items():
        for file, e in d.get("files", {}).items():
            if e.get("identity") == identity and e.get("seed") == seed and e.get("status") != results.FAILED:
                found.append(Path(out) / "runs" / name / file)
    return sorted(found)
