"""The report's files on disk: read the result files (an unreadable one is skipped, not fatal) and write
the report and its figures atomically (a temp file in the same directory, then os.replace), with the
permissions a plain open(path, "w") gives, so a full disk or a crash leaves the previous file or none,
never a truncated one.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from cxr import results as results_mod
from cxr.record import RunRecord


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
    """(every readable run record under results_dir/runs, sorted by (id, seed) (cxr.results.load_all);
    one line per result file that is not a readable record: "`runs/<id>/seed-<n>.json`: <problem>",
    the path relative to results_dir)."""
    skipped: list[str] = []
    records = results_mod.load_all(results_dir, skipped=skipped)
    return records, [skipped_line(line, results_dir) for line in skipped]


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
