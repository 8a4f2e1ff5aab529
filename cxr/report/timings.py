"""pytest-benchmark's JSON as the report's "Timings" tables."""

from __future__ import annotations

import json
from pathlib import Path

from cxr.report.model import ReportError


def benchmarks(path: str | Path) -> dict:
    """pytest-benchmark's JSON as a table: name, rounds, mean seconds, then every scalar extra_info."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: unreadable benchmark JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise ReportError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    # One table per kind of benchmark (experiment runs, throughput, ...): benchmarks whose extra_info
    # has the same keys share a table, so no table is a patchwork of columns that are mostly empty.
    tables: dict[tuple, dict] = {}
    for b in doc["benchmarks"]:
        extra = b.get("extra_info") or {}
        columns = tuple(k for k, v in extra.items() if v is None or isinstance(v, (str, int, float, bool)))
        table = tables.setdefault(columns, {"columns": list(columns), "rows": []})
        table["rows"].append({"name": b.get("name", "?"), "rounds": (b.get("stats") or {}).get("rounds"),
                              "mean": (b.get("stats") or {}).get("mean"), "extra": [extra.get(k) for k in columns]})
    for table in tables.values():  # a column empty in every row (e.g. a CUDA-only figure on a CPU) says nothing
        keep = [i for i in range(len(table["columns"])) if any(r["extra"][i] is not None for r in table["rows"])]
        table["columns"] = [table["columns"][i] for i in keep]
        for r in table["rows"]:
            r["extra"] = [r["extra"][i] for i in keep]
    machine = doc.get("machine_info") or {}
    cpu = (machine.get("cpu") or {}).get("brand_raw") if isinstance(machine.get("cpu"), dict) else None
    return {"file": path.name, "datetime": doc.get("datetime"), "cpu": cpu,
            "python": machine.get("python_version"), "tables": list(tables.values())}
