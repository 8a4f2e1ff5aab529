"""The run record: what one run of one experiment leaves in results/runs/<id>/seed-<n>.json.

`RunRecord` defines every field; `to_dict`/`from_dict` are its writer and reader. The reader takes
the current schema version and the one before it (version 1, written before this module existed,
is upgraded on reading), and checks every file against the JSON Schema shipped beside this module
(cxr/schema/run-record.schema.json), so tools outside Python can check result files too:

    check-jsonschema --schemafile cxr/schema/run-record.schema.json results/runs/*/seed-*.json

Version 2 over version 1: a result's identity (`identity`, from the recipe's `spec_hash`, the
content `data_fingerprint` of the loaded splits and the `training_version` of the code); `environment`
gains `git_dirty` (uncommitted changes in the checkout) and `version` (the package's), and
`git_commit` is `git describe --always --dirty`; `reused_from` is always present (null when the run
was trained, not copied); a spec may name the loss `focal` and carry `focal_gamma`, `title` and
`grid`. A version 1 file has no identity (null): the store never serves it as a match, and the
report pairs its runs by labels only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypedDict

from cxr.errors import CxrError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # the current one and the one before it
OK, DIVERGED, FAILED = "ok", "diverged", "failed"
STATUSES = (OK, DIVERGED, FAILED)


class RecordError(CxrError):
    """A result file that is not a readable run record; the message names the file."""


class Metrics(TypedDict, total=False):
    """Metrics of one split (cxr.metrics.binary_metrics plus the loss); fractions in [0, 1]."""

    n: int  # images
    accuracy: float  # correct / n
    balanced_accuracy: float | None  # (sensitivity + specificity) / 2
    sensitivity: float | None  # pneumonia found: tp / (tp + fn)
    specificity: float | None  # normal cleared: tn / (tn + fp)
    precision: float | None
    f1: float | None
    auroc: float | None  # None when the split has one class only
    ece: float  # expected calibration error, 10 bins
    loss: float  # mean negative log-likelihood under the head (cxr.losses.Loss.nll)
    confusion: list[list[int]]  # [[tn, fp], [fn, tp]]


class Epoch(TypedDict, total=False):
    """One row of `history`: the epoch's training and validation numbers."""

    epoch: int  # from 1
    lr: float  # at the epoch's first step
    train_loss: float | None  # mean over the epoch's images; None when not finite (diverged)
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_auroc: float | None
    seconds: float  # wall time of the epoch, validation included


class Timing(TypedDict, total=False):
    train_seconds: float  # the training loop, data already on the device
    images_per_second: float  # training images / train_seconds
    eval_seconds: float | None  # the final val and test evaluation
    setup_seconds: float  # CUDA graph capture and the like, outside train_seconds
    cuda_graph: bool  # whether the train step was replayed as a CUDA graph
    cuda_graph_error: str  # why capture failed, when it did
    graph_steps: int  # optimizer steps per graph replay (cxr.graphs, CXR_GRAPH_STEPS), when graphed
    fused_with: list[str]  # run ids trained at once with this one, as one fused group (cxr.engine); then
    #                        train_seconds is the group's time while this run took part
    fused_kernel: str  # how the group's step ran: "grouped" (one grouped convolution per layer) or "loop"
    fused_error: str  # why this run's fused group failed, so that it trained alone instead
    precision: str  # the training arithmetic: "bf16" (autocast) or "fp32" (spec precision, resolved on the device)
    checkpoint_seconds: float  # writing its end-of-epoch checkpoints (cxr.sweep.StoreCheckpoints)
    resumed_after_epoch: int  # the last epoch of the checkpoint it resumed from (a killed run, continued)


@dataclass(frozen=True)
class RunRecord:
    """One run: one experiment (a grid point of a spec file) with one seed."""

    id: str  # experiment id, e.g. "lr-ce-lr0.01-bs32"; the file is runs/<id>/seed-<seed>.json
    seed: int
    spec: dict  # the resolved spec, cxr.spec.ExperimentSpec.to_dict()
    spec_hash: str  # what identifies the recipe (cxr.spec.ExperimentSpec.spec_hash)
    status: str  # "ok" | "diverged" (non-finite loss; stopped) | "failed" (crashed; retried next time)
    environment: dict  # python, torch, cuda, device, device_name, cpu, hostname, git_commit, git_dirty,
    #                    version, started_at, finished_at (cxr.env.environment)
    error: str | None = None  # one line, for diverged and failed runs
    history: tuple[Epoch, ...] = ()
    best_epoch: int | None = None  # chosen on validation; the test split is evaluated once, with its weights
    metrics: dict[str, Metrics] | None = None  # {"val", "test"} under the run's decision, for status ok; with a
    #                                            decision other than plain argmax also "val_plain", "test_plain"
    predictions: dict | None = None  # test split: {"y_true", "y_score", "y_pred"}, image by image
    timing: Timing | None = None
    dataset: dict | None = None  # cxr.data.Dataset.summary(): source, name, synthetic, image_size, splits
    weights: str | None = None  # model_weights.pth, relative to the results directory
    reused_from: str | None = None  # the id whose identical run this result copies
    schema_version: int = SCHEMA_VERSION
    identity: str | None = None  # identity(spec_hash, data_fingerprint, training_version): what the store
    #                              matches before it serves this result instead of training; None in version 1
    data_fingerprint: dict[str, str] | None = None  # {"train", "val", "test"}: content hashes of the splits
    training_version: int | None = None  # cxr.unit.TRAINING_VERSION of the code that trained it
    decision: dict | None = None  # cxr.decision.Decision.to_dict(): rule, threshold, prior (the train split's
    #                              prevalence of pneumonia, for equal-prior), tta, augment; None in version 1
    cached: bool = dataclasses.field(default=False, compare=False)  # served from the store; not written

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def run_id(self) -> str:
        return f"{self.id}-seed{self.seed}"

    def test(self, key: str) -> Any:
        """A test-split metric, or None when the run has none (not ok, or no such metric)."""
        return ((self.metrics or {}).get("test") or {}).get(key)

    def timing_of(self, key: str) -> Any:
        return (self.timing or {}).get(key)

    @property
    def group_size(self) -> int:
        """How many runs trained at once with this one, itself included (1 unless fused: timing.fused_with)."""
        return 1 + len(self.timing_of("fused_with") or [])

    def own_train_seconds(self) -> float | None:
        """This run's training time: a fused run's equal share of its group's time, which its
        timing.train_seconds holds; None when not recorded."""
        seconds = self.timing_of("train_seconds")
        return None if seconds is None else seconds / self.group_size

    def own_images_per_second(self) -> float | None:
        """Training images/s over own_train_seconds: comparable between fused and lone runs."""
        rate = self.timing_of("images_per_second")
        return None if rate is None else rate * self.group_size

    def final(self, key: str) -> Any:
        """`key` of the last epoch in `history`, or None."""
        return self.history[-1].get(key) if self.history else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["cached"]
        d["history"] = list(self.history)
        order = ("schema_version", "id", "seed", "spec", "spec_hash", "identity", "data_fingerprint",
                 "training_version", "decision", "status", "error", "history", "best_epoch", "metrics", "predictions",
                 "timing", "environment", "dataset", "weights", "reused_from")
        return {k: d[k] for k in order}

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n").encode()


def identity(spec_hash: str, data_fingerprint: dict[str, str], training_version: int) -> str:
    """The identity of a result: the same recipe, on data of the same content, trained by code of the
    same training version. The store serves a stored result only when its identity is this one."""
    blob = json.dumps([spec_hash, [data_fingerprint[s] for s in ("train", "val", "test")], training_version])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


SCHEMA_FILE = "run-record.schema.json"


def schema(name: str = SCHEMA_FILE) -> dict:
    """A JSON Schema shipped in cxr/schema/ (a copy): by default the run record's current version."""
    return json.loads(_schema_text(name))


@functools.cache
def _schema_text(name: str) -> str:
    return resources.files("cxr").joinpath("schema", name).read_text(encoding="utf-8")


@functools.cache
def _validator(name: str):
    import jsonschema

    return jsonschema.Draft202012Validator(schema(name))


def schema_error(obj: Any, name: str = SCHEMA_FILE):
    """(where in obj, the error) of obj's most relevant violation of the schema `name`, or None."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator(name).iter_errors(obj))
    if error is None:
        return None
    return "/".join(map(str, error.absolute_path)) or "(top level)", error


def upgrade(obj: dict) -> dict:
    """A record dict of a readable version as the current version's dict (a new dict)."""
    if obj.get("schema_version") == 1:
        env = dict(obj.get("environment") or {})
        env.setdefault("git_dirty", None)
        env.setdefault("version", None)
        obj = {**obj, "schema_version": 2, "environment": env, "reused_from": obj.get("reused_from"),
               "identity": None, "data_fingerprint": None, "training_version": None, "decision": None}
    return obj


def from_dict(obj: Any, where: str = "<record>") -> RunRecord:
    """Read a record dict (current or previous version), checked against the schema."""
    if not isinstance(obj, dict) or obj.get("schema_version") not in READABLE_VERSIONS:
        got = obj.get("schema_version") if isinstance(obj, dict) else type(obj).__name__
        raise RecordError(f"{where}: not a cxr-bench run record (schema_version {got!r}; this version reads "
                          f"{' and '.join(map(str, READABLE_VERSIONS))})")
    obj = upgrade(obj)
    found = schema_error(obj)
    if found is not None:
        at, error = found
        why = error.message if len(error.message) <= 160 else \
            f"the value does not satisfy {error.validator} {json.dumps(error.validator_value)[:80]}"
        raise RecordError(f"{where}: {at}: {why}")
    fields = {f.name for f in dataclasses.fields(RunRecord)}
    return RunRecord(**{k: (tuple(v) if k == "history" else v) for k, v in obj.items() if k in fields})


def loads(text: str | bytes, where: str = "<record>") -> RunRecord:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an int of too many digits; nested too deep
        raise RecordError(f"{where}: unreadable result file ({e.__class__.__name__}: {e})") from None
    return from_dict(obj, where)
