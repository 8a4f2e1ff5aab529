"""How a setting's runs turned probabilities into calls: the decision line, the argmax accuracy beside the
rule's, balanced accuracy, and the seed ensemble (the mean probability of a setting's seeds).

A run's decision is the record's `decision` (cxr.decision.Decision.to_dict(): rule, threshold, prior, tta,
augment); records written before decision rules (schema version 1) have none and were read with the plain
argmax, without TTA. With a decision other than the plain argmax, the record's metrics hold "test" under the
rule and "test_plain" of the same weights under the plain argmax; its stored predictions are the rule's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxr import stats
from cxr.metrics import binary_metrics
from cxr.record import RunRecord
from cxr.report.format import num, pct, plural

UNIT = (0.0, 1.0)


def is_plain(r: RunRecord) -> bool:
    """The course's rule on the plain outputs: argmax without TTA (also every record without a decision)."""
    d = r.decision
    return d is None or (d.get("rule") == "argmax" and not d.get("tta"))


def decision_text(r: RunRecord) -> str:
    """"argmax (the course's rule); no TTA", "equal-prior (P(pneumonia) > 0.742, the train prevalence); TTA 8
    draws + identity", with "; class-balanced training loss" when the spec weighted the classes."""
    d = r.decision
    if d is None:
        text = "argmax (not recorded: an older result file); no TTA"
    else:
        if d.get("rule") == "equal-prior":
            rule = f"equal-prior (P(pneumonia) > {d['threshold']:.3f}, the train prevalence)"
        else:
            rule = "argmax (the course's rule)"
        text = rule + (f"; TTA {d['tta']} draws + identity (mean probability)" if d.get("tta") else "; no TTA")
    if (r.spec or {}).get("class_weight") == "balanced":
        text += "; class-balanced training loss (weights n / (2 n_c) from the train split)"
    return text


def setting_decision(runs: Sequence[RunRecord]) -> str:
    """The decision of a setting's runs (the finished ones when there are any); "" without runs. A setting
    holds one recipe and one data content, so its runs share one; several are listed, never hidden."""
    ok = [r for r in runs if r.ok] or list(runs)
    return "; or ".join(dict.fromkeys(decision_text(r) for r in ok))


def comparison_decisions(settings) -> tuple[tuple[str, str], ...]:
    """(("", text),) when every setting decided alike, else ((label, text), ...) one per setting."""
    texts = [(s.label, s.decision) for s in settings if s.decision]
    if len({t for _, t in texts}) <= 1:
        return (("", texts[0][1]),) if texts else ()
    return tuple(texts)


def argmax_accuracy(r: RunRecord) -> float | None:
    """Test accuracy of the run's weights under the plain argmax, without TTA: "test_plain" when the run
    decided otherwise, else its test accuracy; None when not recorded."""
    if is_plain(r):
        return r.test("accuracy")
    return ((r.metrics or {}).get("test_plain") or {}).get("accuracy")


def summaries(ok: Sequence[RunRecord]) -> dict:
    """mean_std_ci summaries over the finished runs: balanced accuracy (n/a in records without it) and the
    argmax accuracy."""
    return {"balanced_accuracy": stats.mean_std_ci([r.test("balanced_accuracy") for r in ok], bounds=UNIT),
            "argmax_accuracy": stats.mean_std_ci([argmax_accuracy(r) for r in ok], bounds=UNIT)}


def threshold(r: RunRecord) -> float:
    """P(pneumonia) above which the run's decision is pneumonia: the record's threshold, 0.5 when absent."""
    return float((r.decision or {}).get("threshold", 0.5))


def ensemble(ok: Sequence[RunRecord]) -> dict | None:
    """The seed ensemble of a setting: the mean of its finished runs' stored test probabilities (y_score,
    under their TTA when on), decided with their threshold. None unless two or more finished runs with
    predictions share the test set (equal test fingerprints, or, without fingerprints, equal y_true) and the
    threshold. {"n", "seeds", "threshold", "accuracy", "balanced_accuracy", "auroc", "text"}."""
    runs = [r for r in ok if r.predictions]
    if len(runs) < 2:
        return None
    prints = {(r.data_fingerprint or {}).get("test") for r in runs}
    ys = [r.predictions["y_true"] for r in runs]
    if len(prints) > 1 or any(y != ys[0] for y in ys[1:]) or len({threshold(r) for r in runs}) > 1:
        return None
    cut = threshold(runs[0])
    score = np.mean([np.asarray(r.predictions["y_score"], dtype=np.float64) for r in runs], axis=0)
    m = binary_metrics(ys[0], np.clip(score, 0.0, 1.0), (score > cut).astype(np.int64))
    out = {"n": len(runs), "seeds": tuple(r.seed for r in runs), "threshold": cut, "accuracy": m["accuracy"],
           "balanced_accuracy": m["balanced_accuracy"], "auroc": m["auroc"]}
    return {**out, "text": ensemble_text(out)}


def ensemble_text(e: dict) -> str:
    """"ensemble of 3 seeds (mean probability): accuracy 88.89%, balanced accuracy 87.50%, AUROC 0.971"."""
    return (f"ensemble of {plural(e['n'], 'seed')} (mean probability): accuracy {pct(e['accuracy'])}, "
            f"balanced accuracy {pct(e['balanced_accuracy'])}, AUROC {num(e['auroc'])}")
