"""Declarative experiment specs: TOML files with defaults, an optional [grid], and seeds.

A file expands to one ExperimentSpec per (grid point, seed). Everything is validated here, once;
the rest of the package trusts an ExperimentSpec.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cxr import losses
from cxr.errors import CxrError


class SpecError(CxrError):
    """A spec file that cannot be used; the message is one line naming the file and the key."""


LOSSES = losses.NAMES
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "onecycle", "step")
SELECT_METRICS = ("loss", "accuracy", "auroc", "last")
CLASS_WEIGHTS = ("none", "balanced")
DECISIONS = ("argmax", "equal-prior")
PRECISIONS = ("auto", "fp32", "bf16")  # resolved on the device by cxr.env.resolve_precision
MODELS = ("cnn", "vgg", "resnet18")  # kept in step with cxr.models.MODELS (a test checks)


@dataclass(frozen=True)
class ExperimentSpec:
    """One training run's settings. `seed` is the run's seed; `seeds` in a file expands to many."""

    name: str = "experiment"
    dataset: str = "synthetic"
    image_size: int = 28
    model: str = "cnn"
    width: int = 16  # channels of the first conv block; the model doubles it per stage
    loss: str = "ce"  # a name in cxr.losses.LOSSES: "bce" (1 logit), "ce" (2 logits), "focal" (2 logits)
    focal_gamma: float = 2.0  # "focal" only: the focusing exponent (0 = cross-entropy)
    optimizer: str = "adam"
    lr: float = 0.001
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "none"
    warmup_epochs: float = 0.0  # linear warm-up before the schedule (cosine, step)
    step_epochs: int = 10  # "step": multiply lr by step_gamma every step_epochs
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    augment_shift: float = 0.0  # max shift as a fraction of the image side; 0 = off
    augment_rotate: float = 0.0  # max rotation in degrees; 0 = off
    augment_scale: float = 0.0  # max relative zoom (0.1 = 0.9..1.1); 0 = off
    batch_size: int = 32
    epochs: int = 10
    select: str = "loss"  # validation metric that picks the best epoch ("last": no selection)
    ema: float = 0.0  # decay per step of an exponential moving average of the weights, which is then
    #                   what is validated, selected and saved; 0 = off
    class_weight: str = "none"  # "balanced": each class weighs half of the training loss (n / (2 n_c), train split)
    decision: str = "argmax"  # "equal-prior": pneumonia when P(pneumonia) > the train split's prevalence, the
    #                           Bayes rule for equal priors (Saerens et al. 2002); fits nothing
    tta: int = 0  # test-time augmentation: the mean probability over the identity and `tta` fixed draws of
    #               the spec's own affine augmentation, for validation and test; 0 = off
    precision: str = "auto"  # training arithmetic: "bf16" autocast (losses, BatchNorm statistics and optimizer
    #                          state stay fp32), "fp32", or "auto": bf16 where the device computes it natively
    seed: int = 0
    # Bookkeeping, not part of the training recipe (excluded from spec_hash):
    fuse: bool = True  # may train together with the sweep's compatible runs as one batched model
    #                    (cxr.engine); false: always alone. How a run is executed, not what it learns
    title: str = ""  # the question the file answers, e.g. "Task A: BCE vs CE": the report's heading
    sweep: tuple[str, ...] = ()  # grid keys of the file this came from, e.g. ("lr",)
    grid: tuple[tuple[str, tuple], ...] = ()  # the file's whole [grid], e.g. (("lr", (0.001, 0.01, 0.1)),):
    #                                           what the report expects to find
    source: str = ""  # the spec file

    @property
    def id(self) -> str:
        """Stable, readable id, e.g. `lr-ce-lr0.01-bs32`; other swept keys are appended.

        It names a folder of the results store, so it is path-safe: letters, digits and `_.+=-` only
        (anything else in a swept string, such as a data path, becomes `_`), never `.` or `..`, and at
        most MAX_ID characters (a longer one keeps its start and a hash of the whole).
        """
        parts = [self.name, self.loss, f"lr{_fmt(self.lr)}", f"bs{self.batch_size}"]
        for key in self.sweep:
            if key not in ("loss", "lr", "batch_size"):
                parts.append(f"{_SHORT.get(key, key)}{_fmt(getattr(self, key))}")
        text = _UNSAFE.sub("_", "-".join(parts))
        if len(text) > MAX_ID:
            text = f"{text[:MAX_ID - 17]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        return text

    @property
    def run_id(self) -> str:
        return f"{self.id}-seed{self.seed}"

    @property
    def num_outputs(self) -> int:
        return losses.get(self.loss).outputs

    def recipe(self) -> dict:
        """The fields that decide what training does (what spec_hash covers).

        Fields added after result stores existed are left out at their default value, so that a
        spec that does not use them keeps the hash (and the stored results) it had before.
        """
        d = dataclasses.asdict(self)
        for key in _BOOKKEEPING:
            d.pop(key)
        for key, default in _ADDED_LATER.items():
            if d[key] == default:
                d.pop(key)
        return d

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sweep"] = list(self.sweep)
        d["grid"] = {key: list(values) for key, values in self.grid}
        d["id"] = self.id
        return d

    def spec_hash(self) -> str:
        blob = json.dumps(self.recipe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def setting_hash(self) -> str:
        """The recipe without the seed: what every seed of one setting shares (the report's rows)."""
        recipe = self.recipe()
        del recipe["seed"]
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


_BOOKKEEPING = ("name", "title", "sweep", "grid", "source", "fuse")
_ADDED_LATER = {"ema": 0.0, "focal_gamma": 2.0, "class_weight": "none", "decision": "argmax",
                "tta": 0, "precision": "auto"}  # field -> the default that is left out of spec_hash
_SHORT = {"epochs": "ep", "image_size": "px", "weight_decay": "wd", "label_smoothing": "ls",
          "optimizer": "", "schedule": "", "model": "", "dataset": "data-", "width": "w",
          "ema": "ema", "focal_gamma": "g", "class_weight": "cw-", "decision": "", "tta": "tta",
          "precision": ""}
_FIELDS = {f.name: f for f in dataclasses.fields(ExperimentSpec)}
_SETTABLE = [k for k in _FIELDS if k not in ("seed", "sweep", "grid", "source")] + ["seeds"]
_NOT_SWEPT = ("seeds", "name", "title", "fuse")
_CHOICES = {"loss": LOSSES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "select": SELECT_METRICS,
            "model": MODELS, "class_weight": CLASS_WEIGHTS, "decision": DECISIONS, "precision": PRECISIONS}
# (low, high, low inclusive, high inclusive)
_RANGES = {
    "image_size": (28, 512, True, True), "width": (1, 512, True, True),
    "lr": (0, 10, False, True), "weight_decay": (0, 1, True, True), "momentum": (0, 1, True, False),
    "warmup_epochs": (0, 1000, True, True), "step_epochs": (1, 10000, True, True),
    "step_gamma": (0, 1, False, True), "label_smoothing": (0, 1, True, False),
    "augment_shift": (0, 0.5, True, True), "augment_rotate": (0, 180, True, True),
    "augment_scale": (0, 0.5, True, True), "batch_size": (2, 65536, True, True),
    "epochs": (1, 10000, True, True), "ema": (0, 1, True, False), "focal_gamma": (0, 10, True, True),
    "tta": (0, 64, True, True),
}
DEFAULT_SEEDS = (0,)


MAX_ID = 120
MAX_RUNS = 10_000  # runs (grid points x seeds) per spec file: far above any study this suite runs on a
#                    few GPUs, and far below what makes expanding the grid itself a problem


def _check_model_size(path: Path, point: dict) -> None:
    """Refuse a model over cxr.models.MAX_PARAMETERS (counted without building it) in the spec, not later."""
    from cxr.models import MAX_PARAMETERS, parameter_count

    model = point.get("model", ExperimentSpec.model)
    width = point.get("width", ExperimentSpec.width)
    outputs = losses.get(point.get("loss", ExperimentSpec.loss)).outputs
    n = _parameters(parameter_count, model, outputs, width)
    if n > MAX_PARAMETERS:
        raise SpecError(f"{path}: model {model!r} at width {width} has {n:,} parameters; at most "
                        f"{MAX_PARAMETERS:,} (cxr.models.MAX_PARAMETERS)")


@functools.cache
def _parameters(count, model: str, outputs: int, width: int) -> int:
    return count(model, outputs, width)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=-]+")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _check_value(path: Path, key: str, value, where: str):
    """Return value coerced to the field's type, or raise SpecError naming file, key and what is allowed."""
    field = _FIELDS[key]
    default = field.default
    loc = f"{path}: {where}{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SpecError(f"{loc} = {value!r}: expected true or false")
        return value
    if isinstance(value, bool):
        raise SpecError(f"{loc} = {value!r}: expected a {type(default).__name__}")
    if isinstance(default, str):
        if not isinstance(value, str):
            raise SpecError(f"{loc} = {value!r}: expected a string")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise SpecError(f"{loc} = {value!r}: allowed values are {', '.join(_CHOICES[key])}")
        if key == "name" and (not value or len(value) > 40 or not all(c.isascii() and (c.isalnum() or c in "_.")
                                                                      for c in value)):
            raise SpecError(f"{loc} = {value!r}: use at most 40 ASCII letters, digits, '_' or '.' (it starts "
                            "every id, folder and figure name)")
        if key == "title" and (len(value) > 200 or not value.isprintable()):
            raise SpecError(f"{loc} = {value[:40]!r}...: a title is one printable line of at most 200 characters")
        if key == "dataset" and not value:
            raise SpecError(f"{loc}: must not be empty")
        return value
    if isinstance(default, int):
        if not isinstance(value, int):
            raise SpecError(f"{loc} = {value!r}: expected an integer")
    elif isinstance(default, float):
        if not isinstance(value, (int, float)):
            raise SpecError(f"{loc} = {value!r}: expected a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise SpecError(f"{loc} = {value!r}: expected a finite number")
    lo, hi, lo_in, hi_in = _RANGES[key]
    if (value < lo or (value == lo and not lo_in)) or (value > hi or (value == hi and not hi_in)):
        allowed = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
        raise SpecError(f"{loc} = {value!r}: must be in {allowed}")
    return value


def _check_seeds(path: Path, value) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in value)):
        raise SpecError(f"{path}: experiment.seeds = {value!r}: expected a non-empty list of integers in [0, 2^31)")
    if len(set(value)) != len(value):
        raise SpecError(f"{path}: experiment.seeds = {value!r}: seeds must be distinct")
    return tuple(value)


def load_file(path: str | Path) -> list[ExperimentSpec]:
    """Expand one spec file into ExperimentSpecs, one per (grid point, seed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read spec file ({e.__class__.__name__}: {e})") from None
    return parse(text, path)


def parse(text: str, path: str | Path = "<spec>") -> list[ExperimentSpec]:
    path = Path(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML ({e})") from None
    unknown = set(doc) - {"experiment", "grid"}
    if unknown:
        raise SpecError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; allowed: [experiment], [grid]")
    exp = doc.get("experiment")
    if not isinstance(exp, dict):
        raise SpecError(f"{path}: missing [experiment] table")
    grid = doc.get("grid", {})
    if not isinstance(grid, dict):
        raise SpecError(f"{path}: grid must be a table, e.g. [grid] lr = [0.001, 0.01]")

    values, seeds = {}, DEFAULT_SEEDS
    for key, value in exp.items():
        if key not in _SETTABLE:
            raise SpecError(f"{path}: unknown key experiment.{key}; allowed: {', '.join(sorted(_SETTABLE))}")
        if key == "seeds":
            seeds = _check_seeds(path, value)
        else:
            values[key] = _check_value(path, key, value, "experiment.")
    axes = []
    for key, options in grid.items():
        if key not in _SETTABLE or key in _NOT_SWEPT:
            allowed = ", ".join(sorted(k for k in _SETTABLE if k not in _NOT_SWEPT))
            raise SpecError(f"{path}: unknown grid key grid.{key}; allowed: {allowed}")
        if not isinstance(options, list) or not options:
            raise SpecError(f"{path}: grid.{key} = {options!r}: expected a non-empty list of values")
        checked = [_check_value(path, key, v, "grid.") for v in options]
        if len(set(checked)) != len(checked):
            raise SpecError(f"{path}: grid.{key} = {options!r}: values must be distinct")
        axes.append((key, checked))

    sweep = tuple(key for key, _ in axes)
    full_grid = tuple((key, tuple(values)) for key, values in axes)
    n_runs = math.prod(len(opts) for _, opts in axes) * len(seeds)
    if n_runs > MAX_RUNS:
        sizes = " x ".join(f"{len(opts)} {key}" for key, opts in axes) or "1 point"
        raise SpecError(f"{path}: the grid expands to {n_runs:,} runs ({sizes} x {len(seeds)} seeds); at most "
                        f"{MAX_RUNS:,} per file (cxr.spec.MAX_RUNS): split the file or shrink the grid")
    specs, seen = [], {}
    for combo in itertools.product(*(opts for _, opts in axes)):
        point = dict(values, **dict(zip(sweep, combo, strict=True)))
        _check_model_size(path, point)
        if point.get("tta") and not any(point.get(k) for k in ("augment_shift", "augment_rotate", "augment_scale")):
            raise SpecError(f"{path}: tta = {point['tta']} draws of the augmentation, but augment_shift, "
                            "augment_rotate and augment_scale are all 0: set the range to draw from")
        for seed in seeds:
            spec = ExperimentSpec(**point, seed=seed, sweep=sweep, grid=full_grid, source=str(path))
            if spec.run_id in seen:
                raise SpecError(f"{path}: duplicate experiment id {spec.run_id}")
            seen[spec.run_id] = spec
            specs.append(spec)
    return specs


def spec_files(paths: list[str | Path]) -> list[Path]:
    """Spec files named by paths: a file as is, a directory's *.toml (not recursive), sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.toml")))
        elif p.exists() or p.suffix == ".toml":
            files.append(p)
        else:
            raise SpecError(f"{p}: no such spec file or directory")
    return files


def load(paths: list[str | Path]) -> list[ExperimentSpec]:
    """Every ExperimentSpec from the given files/directories; run ids must be unique across files."""
    specs, origin = [], {}
    files = spec_files(paths)
    if not files:
        raise SpecError(f"{', '.join(map(str, paths))}: no spec files (*.toml) found")
    for f in files:
        for spec in load_file(f):
            if spec.run_id in origin:
                raise SpecError(f"{f}: duplicate experiment id {spec.run_id} (also in {origin[spec.run_id]})")
            origin[spec.run_id] = f
            specs.append(spec)
    return specs


def override(spec: ExperimentSpec, **changes) -> ExperimentSpec:
    """Apply command-line overrides (None means keep), validated like the file."""
    changes = {k: v for k, v in changes.items() if v is not None}
    for key, value in changes.items():
        if key in _RANGES or key in _CHOICES or key == "dataset":
            changes[key] = _check_value(Path("<command line>"), key, value, "--")
    return dataclasses.replace(spec, **changes)


def with_seeds(specs: list[ExperimentSpec], n: int) -> list[ExperimentSpec]:
    """`--seeds N`: every experiment with seeds 0..N-1 instead of the file's seeds. MAX_RUNS per file holds
    for the runs this makes (grid points x N), checked before any is made."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SpecError(f"<command line>: --seeds {n!r}: expected an integer >= 1")
    points: dict[str, ExperimentSpec] = {}  # id -> its first spec: one per grid point
    for spec in specs:
        points.setdefault(spec.id, spec)
    per_file = collections.Counter(spec.source for spec in points.values())
    if per_file:
        source, k = per_file.most_common(1)[0]
        if k * n > MAX_RUNS:
            raise SpecError(f"<command line>: --seeds {n:,}: {source or '<spec>'} would expand to {k * n:,} runs "
                            f"({k:,} grid point{'s' * (k > 1)} x {n:,} seeds); at most {MAX_RUNS:,} per file "
                            "(cxr.spec.MAX_RUNS)")
    return [dataclasses.replace(spec, seed=s) for spec in points.values() for s in range(n)]


def from_dict(d: dict) -> ExperimentSpec:
    """Rebuild a spec saved in a result file."""
    d = {k: v for k, v in d.items() if k in _FIELDS}
    d["sweep"] = tuple(d.get("sweep", ()))
    d["grid"] = tuple((key, tuple(values)) for key, values in (d.get("grid") or {}).items())
    return ExperimentSpec(**d)
