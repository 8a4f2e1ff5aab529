"""Robustness under acquisition shift: every trained model scored on MedMNIST-C's corrupted test splits.

`score_store(out, k)` scores every ok run of a results directory that has weights on the 13 x 5 corrupted
copies of its test split (cxr.corruptions), under the run's own decision rule, and stores the scores beside
the record as runs/<id>/seed-<n>.robustness.json (schema/robustness-score.schema.json, checked on write and
read). A stored score whose `identity` is the one the run has now (`identity`: the run's identity, its weights
file, the corruption set's name and version, METRICS_VERSION and the test data's fingerprint) is reused;
any other is computed again and replaced. The test split is loaded from the record's data source and must
have the record's fingerprint.

The metrics (`summarize`), as MedMNIST-C defines them (medmnistc 0.1.0, eval.py), with BE = balanced error
= 1 - balanced accuracy under the run's decision rule:

    BE_c          mean over the 5 severities of corruption c
    CE_c          BE_c / BE_c(AlexNet);            mCE = mean over c of CE_c
    rCE_c         (BE_c - BE_clean) / (BE_c(AlexNet) - BE_clean(AlexNet));   relative mCE = mean of rCE_c
    drop          clean balanced accuracy (accuracy) - the mean over severities (and over all 65 splits)

AlexNet's numbers are MedMNIST-C's published baseline for PneumoniaMNIST (medmnistc/utils/baselines.py; 224 px
images, AlexNet's clean BE 0.101). For contrast_up and gamma_corr_up AlexNet's corrupted BE is below its clean
one (0.0953 and 0.0961 vs 0.1009): their rCE denominators are small and negative, so they dominate the
relative mCE and flip its sign for a model that loses accuracy there; mCE has no such term. The clean split is
evaluated after the same 8-bit quantisation as the corrupted ones (a no-op for 8-bit data).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr import __version__, results, selection
from cxr import corruptions as corr
from cxr import data as data_mod
from cxr.decision import PLAIN, Decision
from cxr.env import now, provenance, resolve_device
from cxr.errors import CxrError, one_line
from cxr.evaluate import evaluate_split, load_state_dict
from cxr.models import infer_model
from cxr.record import OK, RecordError, RunRecord, schema_error
from cxr.record import schema as record_schema
from cxr.spec import from_dict as spec_from_dict

SCHEMA_VERSION = 1
METRICS_VERSION = 1  # bump when a stored number would change (the metrics, the evaluation): scores are redone
MAX_PREDICTION_IMAGES = 20_000  # per-image decisions are stored up to this test size (66 strings of N bytes)
MAX_SCORE_BYTES = 16 << 20
SUFFIX = ".robustness.json"
BASELINE_NAME = "AlexNet, MedMNIST-C PneumoniaMNIST (medmnistc 0.1.0 utils/baselines.py, 224 px)"
BASELINE_CLEAN = 0.10085470085470083
BASELINE = {  # AlexNet's balanced error per corruption, mean over severities
    "pixelate": 0.22102564102564104, "jpeg_compression": 0.2798290598290598,
    "gaussian_noise": 0.4414529914529915, "speckle_noise": 0.3457264957264957,
    "impulse_noise": 0.4581196581196581, "shot_noise": 0.4106837606837607,
    "gaussian_blur": 0.2730769230769231, "brightness_up": 0.14649572649572645,
    "brightness_down": 0.2782051282051282, "contrast_up": 0.09529914529914527,
    "contrast_down": 0.23743589743589744, "gamma_corr_up": 0.09606837606837607,
    "gamma_corr_down": 0.16641025641025642,
}
SEEDS_TEXT = "numpy RandomState / default_rng seeded with cxr.corruptions.seed(name, severity)"


class RobustnessError(CxrError):
    """A run that cannot be scored, or a score file that cannot be read; one line naming the file."""


@dataclass(frozen=True)
class Outcome:
    status: str  # "scored", "reused", "skipped" (nothing to score) or "failed"
    line: str  # one line naming the run's file and what happened


# --- metrics -------------------------------------------------------------------------------------------------

def summarize(clean: dict, severities: dict[str, list[dict]], baseline: dict[str, float] = BASELINE,
              baseline_clean: float = BASELINE_CLEAN) -> tuple[dict, dict]:
    """(per corruption, summary) from the clean split's and each corruption's 5 severities' metrics (dicts with
    "accuracy" and "balanced_accuracy"). See the module's docstring for the definitions."""
    clean_be = 1 - clean["balanced_accuracy"]
    per = {}
    for name, rows in severities.items():
        be = float(np.mean([1 - r["balanced_accuracy"] for r in rows]))
        per[name] = {"severities": rows, "balanced_error": be, "ce": be / baseline[name],
                     "relative_ce": (be - clean_be) / (baseline[name] - baseline_clean),
                     "drop_balanced_accuracy": clean["balanced_accuracy"] - float(np.mean(
                         [r["balanced_accuracy"] for r in rows])),
                     "drop_accuracy": clean["accuracy"] - float(np.mean([r["accuracy"] for r in rows]))}
    every = [r for rows in severities.values() for r in rows]
    summary = {"mce": float(np.mean([p["ce"] for p in per.values()])),
               "relative_mce": float(np.mean([p["relative_ce"] for p in per.values()])),
               "mean_balanced_error": float(np.mean([p["balanced_error"] for p in per.values()])),
               "clean_balanced_error": clean_be,
               "drop_balanced_accuracy": clean["balanced_accuracy"] - float(np.mean(
                   [r["balanced_accuracy"] for r in every])),
               "drop_accuracy": clean["accuracy"] - float(np.mean([r["accuracy"] for r in every]))}
    return per, summary


def _split_metrics(result: dict, severity: int) -> dict:
    m, y_pred = result["metrics"], result["predictions"]["y_pred"]
    return {"severity": severity, **{k: m[k] for k in ("accuracy", "balanced_accuracy", "auroc", "sensitivity",
                                                       "specificity")},
            "y_pred": "".join(map(str, y_pred)) if len(y_pred) <= MAX_PREDICTION_IMAGES else None}


# --- files and identity --------------------------------------------------------------------------------------

def score_path(out: str | Path, rec: RunRecord) -> Path:
    return results.inside(out, Path(out) / "runs" / rec.id / f"seed-{rec.seed}{SUFFIX}")


def weights_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def identity(run_identity: str, weights_hash: str, test_fingerprint: str) -> str:
    """A score's identity: the run, its weights, the corruption set and version, the metrics, the test data."""
    blob = json.dumps([run_identity, weights_hash, corr.NAME, corr.VERSION, METRICS_VERSION, test_fingerprint])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


SCHEMA_FILE = "robustness-score.schema.json"


def schema() -> dict:
    """The JSON Schema of a score file (a copy)."""
    return record_schema(SCHEMA_FILE)


def _check(obj, where: str) -> dict:
    found = schema_error(obj, SCHEMA_FILE)
    if found is not None:
        at, error = found
        raise RobustnessError(f"{where}: {at}: {error.message[:160]}")
    return obj


def read(path: str | Path) -> dict:
    """A stored score, checked against the schema (a regular file of at most MAX_SCORE_BYTES)."""
    path = Path(path)
    try:
        obj = json.loads(results.read_regular(path, MAX_SCORE_BYTES, "robustness score"))
    except RecordError as e:
        raise RobustnessError(str(e)) from None
    except (ValueError, RecursionError) as e:
        raise RobustnessError(f"{path}: unreadable robustness score ({one_line(e, 120)})") from None
    return _check(obj, str(path))


def write(out: str | Path, rec: RunRecord, score: dict) -> Path:
    path = score_path(out, rec)
    text = (json.dumps(_check(score, str(path)), indent=1, allow_nan=False) + "\n").encode()
    results.atomic_write(path, lambda f: f.write(text))
    return path


def check_test_split(x: torch.Tensor, y: torch.Tensor, where: str) -> None:
    """Refuse, in one line, a test split that cannot be scored: one class only (balanced error needs both), or
    images smaller than a corruption needs (cxr.corruptions.min_size)."""
    counts = [int((y == c).sum()) for c in (0, 1)]
    if min(counts) == 0:
        raise RobustnessError(f"{where} has {counts[0]} normal and {counts[1]} pneumonia images; balanced error "
                              "needs both classes")
    need, which = corr.required_size()
    if min(x.shape[-2:]) < need:
        raise corr.CorruptionError(f"{where} has {x.shape[-2]} x {x.shape[-1]} px images; {which} needs at least "
                                   f"{need} x {need}")


def _unscorable(out: Path, rec: RunRecord) -> str | None:
    """Why a run has nothing to score, or None."""
    if rec.status != OK:
        return f"status {rec.status}, no model to score"
    if not rec.weights or not (out / rec.weights).is_file():
        return f"no weights file ({rec.weights or 'none recorded'}); retrain it to score it"
    try:
        results.inside(out, out / rec.weights)
    except results.StoreError as e:
        return str(e)
    if not rec.data_fingerprint or not rec.identity or not rec.dataset:
        return "a schema version 1 record (no data fingerprint); retrain it with --rerun to score it"
    return None


def current(out: str | Path, rec: RunRecord) -> dict | None:
    """The stored score of a run when it is the score of the run as it is now (same identity), else None."""
    out = Path(out)
    path = score_path(out, rec)
    if _unscorable(out, rec) or not path.is_file():
        return None
    try:
        score = read(path)
    except RobustnessError:
        return None
    want = identity(rec.identity, weights_sha256(out / rec.weights), rec.data_fingerprint["test"])
    return score if score["identity"] == want else None


# --- scoring -------------------------------------------------------------------------------------------------

def score_store(out: str | Path, k: str | None = None, device: str = "auto",
                progress: Callable[[str], None] | None = None) -> list[tuple[RunRecord, Outcome]]:
    """Score every run of the results directory `out` (those `-k EXPR` selects); see score_runs."""
    skipped: list[str] = []
    records = results.load_all(out, skipped)
    for line in skipped:
        (progress or (lambda _: None))(f"{line}; not scored")
    if k:
        records = [r for r in records if selection.matches(spec_from_dict(r.spec), k)]
    return score_runs(out, records, device, progress)


def score_runs(out: str | Path, records: Iterable[RunRecord], device: str = "auto",
               progress: Callable[[str], None] | None = None) -> list[tuple[RunRecord, Outcome]]:
    """Score these runs of the store `out` and store the scores; one Outcome per run, in order.

    A run not ok or without weights is skipped; a stored score of the run's identity is reused; the rest are
    scored together per data set, each corrupted split made once for all of them. A run that cannot be scored
    (its data changed, unloadable weights) is failed with one line; the others go on."""
    out, say = Path(out), progress or (lambda _: None)
    outcomes: dict[int, Outcome] = {}
    todo: dict[tuple[str, int], list[tuple[int, RunRecord, str, str]]] = {}
    records = list(records)
    for i, rec in enumerate(records):
        path = score_path(out, rec)
        why = _unscorable(out, rec)
        if why:
            outcomes[i] = Outcome("skipped", f"{results.run_path(out, spec_from_dict(rec.spec))}: skipped: {why}")
            continue
        whash = weights_sha256(out / rec.weights)
        want = identity(rec.identity, whash, rec.data_fingerprint["test"])
        try:
            stored = read(path) if path.is_file() else None
        except RobustnessError as e:
            stored = None
            say(f"{e}; scored again")
        if stored is not None and stored["identity"] == want:
            outcomes[i] = Outcome("reused", f"{path}: reused (mCE {stored['summary']['mce']:.3f})")
        else:
            todo.setdefault((rec.dataset["source"], rec.dataset["image_size"]), []).append((i, rec, want, whash))
    dev = resolve_device(device)
    for (source, size), group in todo.items():
        for i, outcome in _score_group(out, source, size, group, dev, say).items():
            outcomes[i] = outcome
    return [(rec, outcomes[i]) for i, rec in enumerate(records)]


def _failed(out: Path, rec: RunRecord, e: Exception) -> Outcome:
    return Outcome("failed", f"{score_path(out, rec)}: not scored: {_why(e)}")


def _why(e: Exception) -> str:
    """A failure as one line: a CxrError's own message (it names its file), else the exception's class too."""
    return " ".join(str(e).split())[:300] if isinstance(e, CxrError) else one_line(e, 240)


def _decision(rec: RunRecord) -> Decision:
    d = rec.decision
    if not d:
        return PLAIN
    return Decision(d["rule"], d.get("prior"), d.get("tta") or 0, tuple(d.get("augment") or (0.0, 0.0, 0.0)))


def _score_group(out: Path, source: str, size: int, group: list, dev: torch.device, say) -> dict[int, Outcome]:
    """Score the runs of one data set: each corrupted split is made once and every distinct model (weights and
    decision; a run copied under another id has its twin's weights) is evaluated on it once."""
    outcomes: dict[int, Outcome] = {}
    try:
        ds = data_mod.load(source, size)
    except CxrError as e:
        return {i: _failed(out, rec, e) for i, rec, *_ in group}
    test = ds.test
    try:
        check_test_split(test.x, test.y, f"the test split of {source}")
    except CxrError as e:
        return {i: _failed(out, rec, e) for i, rec, *_ in group}
    counts = [int((test.y == c).sum()) for c in (0, 1)]
    runs, models = [], {}
    for i, rec, ident, whash in group:
        try:
            if ds.fingerprint["test"] != rec.data_fingerprint["test"]:
                raise RobustnessError(f"the test split of {source} has fingerprint {ds.fingerprint['test']}, the "
                                      f"record's is {rec.data_fingerprint['test']}: the data changed since training")
            decision = _decision(rec)
            key = (whash, decision)
            if key not in models:
                spec = spec_from_dict(rec.spec)
                _, _, _, net = infer_model(load_state_dict(out / rec.weights), spec.model, spec.num_outputs,
                                           source=str(out / rec.weights))
                models[key] = net.to(dev)
            runs.append((i, rec, ident, whash, key))
        except CxrError as e:
            outcomes[i] = _failed(out, rec, e)
    if not runs:
        return outcomes
    start = time.perf_counter()
    images = corr.to_uint8(test.x[:, 0].numpy())
    rows: dict[tuple, dict] = {key: {"clean": None, "severities": {}} for key in models}
    splits = [("clean", 0)] + [(name, s) for name in corr.CORRUPTIONS for s in corr.SEVERITIES]
    try:
        for name, severity in splits:
            x = images if name == "clean" else corr.corrupt(images, name, severity)
            xt = torch.from_numpy(x.astype(np.float32) / 255).unsqueeze(1)
            for key, net in models.items():
                m = _split_metrics(evaluate_split(net, xt, test.y, dev, key[1]), severity)
                if name == "clean":
                    rows[key]["clean"] = m
                else:
                    rows[key]["severities"].setdefault(name, []).append(m)
            if severity == 5:
                say(f"{source}: {name} scored ({len(models)} model{'s' * (len(models) > 1)})")
    except (CxrError, FloatingPointError) as e:
        return outcomes | {i: _failed(out, rec, e) for i, rec, *_ in runs}
    seconds = (time.perf_counter() - start) / len(runs)
    for i, rec, ident, whash, key in runs:
        per, summary = summarize(rows[key]["clean"], rows[key]["severities"])
        score = {
            "schema_version": SCHEMA_VERSION, "id": rec.id, "seed": rec.seed, "identity": ident,
            "run_identity": rec.identity, "weights_sha256": whash,
            "corruptions": {"name": corr.NAME, "version": corr.VERSION, "reference": corr.REFERENCE,
                            "seeds": SEEDS_TEXT},
            "metrics_version": METRICS_VERSION, "data_fingerprint_test": rec.data_fingerprint["test"],
            "image_size": int(images.shape[-1]), "n": len(images), "normal": counts[0], "pneumonia": counts[1],
            "decision": rec.decision, "baseline": {"name": BASELINE_NAME, "clean_balanced_error": BASELINE_CLEAN,
                                                   "balanced_error": BASELINE},
            "clean": rows[key]["clean"], "corruption_scores": per, "summary": summary,
            "environment": {"device": str(dev), "seconds": round(seconds, 3), **provenance(), "version": __version__,
                            "scored_at": now()},
        }
        try:
            path = write(out, rec, score)
        except CxrError as e:
            outcomes[i] = Outcome("failed", _why(e))
            continue
        outcomes[i] = Outcome("scored", f"{path}: scored (mCE {summary['mce']:.3f}, relative mCE "
                                        f"{summary['relative_mce']:.2f}, clean balanced error "
                                        f"{summary['clean_balanced_error']:.3f})")
    return outcomes
