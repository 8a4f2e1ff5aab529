"""A results store's history across commits: `history.jsonl`, one JSON line per setting (run id) and snapshot.

A snapshot is one store measured at one commit: `lines` makes its lines (commit, date, environment, n,
mean and spread of each test metric, throughput) and `append` adds them to the file, refusing a commit and
store (the content of its result files) that the file holds already. Each line also carries its runs'
test predictions, packed (labels as bits, scores as 16-bit fractions), so that `flags` can apply
`cxr-bench compare`'s gate (`cxr.gate`) to each snapshot against the one before it, as the report's history
section shows.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np

from cxr import gate as gate_mod
from cxr import results, stats
from cxr.errors import CxrError
from cxr.gate import environment
from cxr.record import DIVERGED, FAILED, OK, RunRecord

HISTORY_VERSION = 1
SCORE_STEPS = 65535  # scores are stored as round(score * 65535) / 65535
REQUIRED = ("history", "commit", "date", "store", "id", "environment", "n", "seeds")


class HistoryError(CxrError):
    """A history file or store `cxr-bench history` cannot use; one line naming it."""


def _bits(a) -> str:
    return base64.b64encode(np.packbits(np.asarray(a, dtype=np.uint8))).decode()


def _unbits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(np.int64)


def _scores(a) -> str:
    return base64.b64encode(np.round(np.asarray(a, dtype=np.float64) * SCORE_STEPS).astype("<u2").tobytes()).decode()


def _unscores(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<u2").astype(np.float64) / SCORE_STEPS


def _spread(values) -> dict:
    """{"mean", "std", "min", "max"} of the non-None values (None when there are none; std None below 2)."""
    s = stats.mean_std_ci(values)
    x = [v for v in values if v is not None]
    return {"mean": s["mean"], "std": s["std"], "min": min(x) if x else None, "max": max(x) if x else None}


def _one(values: set, what: str, store: Path, option: str) -> str:
    if len(values) != 1:
        raise HistoryError(f"{store}: its runs have {len(values)} {what}s ({', '.join(sorted(values))[:120]}); "
                           f"name the one to record with {option}")
    return next(iter(values))


def lines(store: str | Path, commit: str | None = None, date: str | None = None,
          skipped: list[str] | None = None) -> list[dict]:
    """One line per run id of the store (its ok runs' numbers; diverged and failed ones counted). commit:
    default the runs' environment.git_commit, date: default the last finished_at; either must be one value
    over the store, else HistoryError asks for --commit or --date. Unreadable result files are left out, their
    one-line reasons appended to `skipped`."""
    store = Path(store)
    if not store.is_dir():
        raise HistoryError(f"{store}: no such results directory")
    records = results.load_all(store, skipped=[] if skipped is None else skipped)
    if not records:
        raise HistoryError(f"{store}: no readable result files under runs/")
    commit = commit or _one({str(r.environment.get("git_commit")) for r in records}, "commit", store, "--commit")
    date = date or max(str(r.environment.get("finished_at") or r.environment.get("started_at")) for r in records)
    fingerprint = hashlib.sha256(b"".join(r.to_json() for r in records)).hexdigest()[:16]
    by_id: dict[str, list[RunRecord]] = {}
    for r in records:
        by_id.setdefault(r.id, []).append(r)
    out = []
    for run_id, runs in by_id.items():
        ok = [r for r in runs if r.status == OK and r.predictions]
        ok = [r for r in ok if r.predictions["y_true"] == ok[0].predictions["y_true"]]  # one test set
        line = {"history": HISTORY_VERSION, "commit": commit, "date": date, "store": fingerprint, "path": str(store),
                "id": run_id, "environment": sorted({environment(r) for r in ok or runs}),
                "n": len(ok), "seeds": [r.seed for r in ok],
                "runs": {s: sum(r.status == s for r in runs) for s in (OK, DIVERGED, FAILED)},
                "spec_hashes": [r.spec_hash for r in ok],
                "test_fingerprint": (ok[0].data_fingerprint or {}).get("test") if ok else None}
        for m in gate_mod.METRICS:
            line[m] = _spread([r.test(m) for r in ok])
        ips = [r.own_images_per_second() for r in ok]
        line["images_per_second"] = {**_spread(ips), "median": float(np.median([x for x in ips if x]))
                                     if any(ips) else None, "by_seed": ips}
        line["predictions"] = None if not ok else {
            "n_images": len(ok[0].predictions["y_true"]), "y_true": _bits(ok[0].predictions["y_true"]),
            "y_pred": [_bits(r.predictions["y_pred"]) for r in ok],
            "y_score": [_scores(r.predictions["y_score"]) for r in ok]}
        out.append(line)
    return out


def read(path: str | Path) -> list[dict]:
    """The lines of a history file, in file order; a line that is not one is a HistoryError naming path:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HistoryError(f"{path}: no such history file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HistoryError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as e:
            raise HistoryError(f"{path}:{number}: not a JSON line ({e})") from None
        missing = [k for k in REQUIRED if not isinstance(line, dict) or k not in line]
        if missing or line["history"] != HISTORY_VERSION:
            raise HistoryError(f"{path}:{number}: not a cxr-bench history line (missing {', '.join(missing)})"
                               if missing else f"{path}:{number}: history version {line['history']!r}, this "
                               f"version reads {HISTORY_VERSION}")
        out.append(line)
    return out


def append(path: str | Path, new: list[dict]) -> int:
    """Add the lines of one snapshot to the history file (created when absent), atomically; refuses (HistoryError)
    when the file holds lines of the same commit and store already. Returns the number of lines added."""
    path = Path(path)
    old = read(path) if path.exists() else []
    key = {(line["commit"], line["store"]) for line in new}
    seen = [line for line in old if (line["commit"], line["store"]) in key]
    if seen:
        raise HistoryError(f"{path}: holds commit {seen[0]['commit']} of this store already ({seen[0]['path']}, "
                           f"store {seen[0]['store']}, {seen[0]['date']}); not appended twice")
    text = "".join(json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n" for line in old + new)
    results.atomic_write(path, lambda f: f.write(text.encode()))
    return len(new)


def snapshots(history: list[dict]) -> list[dict]:
    """[{"commit", "date", "store", "environment", "lines": {id: line}}] in the order the file holds them."""
    out: dict[tuple, dict] = {}
    for line in history:
        snap = out.setdefault((line["commit"], line["store"]), {
            "commit": line["commit"], "date": line["date"], "store": line["store"], "lines": {}})
        snap["lines"][line["id"]] = line
    for snap in out.values():
        snap["environment"] = sorted({e for line in snap["lines"].values() for e in line["environment"]})
    return list(out.values())


def arrays(line: dict) -> tuple[np.ndarray, dict]:
    """(y_true, {"y_pred", "y_score" (S, N), "images_per_second"}) of a line, as `cxr.gate` takes them."""
    p = line["predictions"]
    n = p["n_images"]
    return _unbits(p["y_true"], n), {"y_pred": np.asarray([_unbits(t, n) for t in p["y_pred"]]),
                                     "y_score": np.asarray([_unscores(t) for t in p["y_score"]]),
                                     "images_per_second": line["images_per_second"]["by_seed"]}


def _pairable(a: dict, b: dict) -> bool:
    """Whether compare would test these two lines: finished runs of the same recipe on the same test images."""
    return bool(a.get("predictions") and b.get("predictions") and a["seeds"] == b["seeds"]
                and a["spec_hashes"] == b["spec_hashes"] and a["test_fingerprint"] == b["test_fingerprint"]
                and a["predictions"]["y_true"] == b["predictions"]["y_true"])


def flags(snaps: list[dict], gate: gate_mod.Gate = gate_mod.DEFAULT) -> dict[tuple[int, str], dict]:
    """{(snapshot index, id): gate.judge's row} of every setting of each snapshot tested against the snapshot
    before it, as `cxr-bench compare` would (ids holding the same runs in both tested once; the family of
    Holm's adjustment is one pair of snapshots). Recipe or test data changed, or seeds not the same: untested."""
    out = {}
    for k in range(1, len(snaps)):
        before, now = snaps[k - 1]["lines"], snaps[k]["lines"]
        groups: dict[str, list[str]] = {}
        for run_id in now:
            if run_id in before and _pairable(before[run_id], now[run_id]):
                blob = json.dumps([before[run_id]["predictions"], now[run_id]["predictions"],
                                   before[run_id]["images_per_second"]["by_seed"],
                                   now[run_id]["images_per_second"]["by_seed"]], sort_keys=True)
                groups.setdefault(hashlib.sha256(blob.encode()).hexdigest(), []).append(run_id)
        tests = []
        for ids in groups.values():
            y_true, b = arrays(before[ids[0]])
            _, n = arrays(now[ids[0]])
            t = gate_mod.paired_differences(y_true, b, n, gate)
            envs = before[ids[0]]["environment"], now[ids[0]]["environment"]
            t["throughput"] = gate_mod.throughput(b["images_per_second"], n["images_per_second"],
                                                  len(envs[0]) == 1 and envs[0] == envs[1])
            tests.append({"ids": ids, **t})
        for row in gate_mod.judge(tests, gate):
            for run_id in row["ids"]:
                out[k, run_id] = row
    return out
