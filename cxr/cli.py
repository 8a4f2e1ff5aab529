"""`cxr-bench`: run, evaluate, report, specs, compare, history. Exit status 0 ok, 1 some run failed (compare: a
regression), 2 bad input.

Every error meant for the user is a cxr.errors.CxrError (or an OSError from the file system): it is
printed as one line and the exit status is 2. Anything else is a bug and surfaces with its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cxr import data, losses, selection
from cxr import spec as spec_mod
from cxr.env import DEVICES
from cxr.errors import CxrError
from cxr.metrics import pct

USER_ERROR = 2


def _specs(args) -> list[spec_mod.ExperimentSpec]:
    return selection.select(args.paths or ["specs"], seeds=args.seeds, dataset=args.data, epochs=args.epochs,
                           keyword_expr=args.k)


def cmd_specs(args) -> int:
    for s in _specs(args):
        print(f"{s.run_id:<40} {s.source}  dataset={s.dataset} model={s.model} epochs={s.epochs}")
    return 0


def cmd_run(args) -> int:
    from cxr import results, sweep
    from cxr.data import load
    from cxr.env import resolve_device
    from cxr.unit import identity

    index, count = selection.parse_shard(args.shard) if args.shard else (0, 1)
    specs = _specs(args)
    if not specs:
        print("cxr-bench run: no experiments selected", file=sys.stderr)
        return USER_ERROR
    selected = len(specs)
    if args.shard:
        specs = selection.shard(specs, index, count)
    sweep.check_environment()  # CXR_FUSE_KERNEL, CXR_GRAPH_STEPS
    if args.gpus_per_task is not None and not args.ray:
        raise CxrError("--gpus-per-task: only with --ray (a local run uses one device, --device)")
    if args.jobs is not None and (args.jobs < 1 or args.ray):
        raise CxrError(f"--jobs {args.jobs}: give 1 or more" if args.jobs < 1 else
                       "--jobs: not with --ray (a Ray task asks for CPUs of its own; OMP_NUM_THREADS sets them)")
    if not specs:  # more shards than recipes: this job-array task has nothing to do, which is no failure
        print(f"cxr-bench run: shard {index}/{count} is empty ({selected} run{'s' * (selected > 1)} selected, "
              f"dealt to {count} shards by recipe); nothing to do")
        return 0
    if args.ray:  # --ray (cxr.cluster): refuse before any work when Ray is missing; the driver needs no GPU
        from cxr import cluster

        cluster.import_ray()
    device = resolve_device(args.device) if not args.ray else f"a Ray cluster ({args.ray})"
    results.check_writable(args.out)  # before any training
    if not args.rerun:  # a stored result of another recipe or data: refuse before training anything
        conflicts = [why for s in specs
                     if (why := sweep.conflict(args.out, s, identity(s, load(s.dataset, s.image_size))))]
        if conflicts:
            more = f" (and {len(conflicts) - 1} more run{'s' * (len(conflicts) > 2)})" if len(conflicts) > 1 else ""
            raise results.StoreConflict(conflicts[0] + more)
    units = sweep.groups(specs, fuse=not args.no_fuse)
    grouped = [u for u in units if len(u) > 1]
    how = (f"; {sum(map(len, grouped))} of them in {len(grouped)} fused group{'s' * (len(grouped) > 1)}"
           if grouped else "")
    print(f"{len(specs)} runs -> {args.out}/runs on {device}{how}", flush=True)
    t0, counts = time.perf_counter(), {"failed": 0, "busy": 0, "done": 0}

    def show(s, r) -> None:  # one finished run: count it and print its line
        counts["done"] += 1
        if isinstance(r, results.Claimed):
            counts["busy"] += 1
        elif r.status == "failed":
            counts["failed"] += 1
        print(_run_line(counts["done"], len(specs), s, r), flush=True)

    if args.ray:  # ---- --ray: the same units as Ray tasks (cxr.cluster); only this process writes the store
        cluster.run_on_ray(units, args.out, args.ray, args.gpus_per_task, rerun=args.rerun, device=args.device,
                           on_result=show, say=print)
    elif args.jobs and args.jobs > 1:  # ---- --jobs: N worker processes on this machine (cxr.jobs)
        from cxr import jobs

        print(f"{args.jobs} worker processes, {jobs.threads_per_job(args.jobs)} torch threads each", flush=True)
        jobs.run_in_jobs(units, args.out, args.jobs, args.device, rerun=args.rerun, on_result=show)
    else:
        for unit in units:
            for s, r in zip(unit, sweep.run_group(unit, args.out, args.device, rerun=args.rerun), strict=True):
                show(s, r)
    failed, busy = counts["failed"], counts["busy"]
    others = f"; {busy} being trained by another process" if busy else ""
    print(f"done in {time.perf_counter() - t0:.1f}s; {failed} failed{others}. Report: cxr-bench report {args.out}")
    if args.robustness:  # every ok run of this selection on the corrupted test splits (cxr.robustness)
        from cxr import robustness

        stored = [r for s in specs if (r := results.stored(args.out, s)) is not None and r.ok]
        t_scoring = time.perf_counter()
        if _robustness_lines(robustness.score_runs(args.out, stored, args.device if not args.ray else "auto"),
                             t_scoring):
            return 1
    return 1 if failed else 0


def _run_line(i: int, n: int, s: spec_mod.ExperimentSpec, r) -> str:
    """The line `cxr-bench run` prints for a finished run: `r` its RunRecord, or the Claimed error."""
    from cxr import results

    if isinstance(r, results.Claimed):  # another process trains it: its result lands in the same store
        return f"[{i}/{n}] {s.run_id:<36} {'busy':<8}  ({r})"
    where = ("reused" if r.reused_from else "stored") if r.cached else f"{r.own_train_seconds() or 0:.1f}s"
    line = f"[{i}/{n}] {s.run_id:<36} {r.status:<8} {where:>8}"
    if r.test("accuracy") is not None:
        auroc = r.test("auroc")
        line += (f"  test acc {pct(r.test('accuracy'))}  AUROC "
                 f"{'n/a' if auroc is None else format(auroc, '.4f')}  best epoch {r.best_epoch}")
    if not r.cached and r.timing_of("fused_with"):
        line += (f"  (fused with {len(r.timing_of('fused_with'))} other runs; its share of the group's "
                 f"{r.timing_of('train_seconds') or 0:.1f}s)")
    if r.error:
        line += f"  ({r.error})"
    return line


def cmd_evaluate(args) -> int:
    from cxr.evaluate import decision_from_options, evaluate_weights

    decision = decision_from_options(args.decision, args.prior, args.tta, args.augment_shift, args.augment_rotate,
                                     args.augment_scale)  # options first: refused before any file is read
    weights = args.weights[0] if len(args.weights) == 1 else args.weights
    r = evaluate_weights(weights, args.normal, args.pneumonia, model=args.model, loss=args.loss,
                         device=args.device, image_size=args.image_size, decision=decision)
    if args.json:
        keys = ("accuracy", "balanced_accuracy", "n", "sensitivity", "specificity", "auroc", "confusion", "model",
                "loss", "device", "decision", "plain_accuracy", "models")
        print(json.dumps({k: r[k] for k in keys}))
        return 0
    (tn, fp), (fn, tp) = r["confusion"]
    head = f"{losses.get(r['loss']).label}: {r['num_outputs']} output{'s' if r['num_outputs'] > 1 else ''}"
    if r["models"] == 1:
        print(f"weights      {weights} ({r['model']}, width {r['width']}, {head}) on {r['device']}")
    else:
        print(f"weights      ensemble of {r['models']} models ({head}; mean probability) on {r['device']}")
        for m in r["members"]:
            print(f"               {m['weights']} ({m['model']}, width {m['width']})")
    print(f"images       {r['n']} ({tn + fp} normal, {fn + tp} pneumonia), shape {tuple(r['image_shape'])}")
    d = r["decision"]
    ranges = "" if not d["tta"] else " (shift {:g}, rotate {:g} degrees, scale {:g})".format(*d["augment"])
    print(f"decision     {d['text']}{ranges}")
    plain = "" if decision.plain else f"; plain argmax {pct(r['plain_accuracy'])}"
    print(f"accuracy     {pct(r['accuracy'])} ({r['correct']}/{r['n']}){plain}")
    print(f"balanced acc {pct(r['balanced_accuracy'])} (mean of sensitivity and specificity)")
    print(f"sensitivity  {pct(r['sensitivity'])} (pneumonia found)")
    print(f"specificity  {pct(r['specificity'])} (normal cleared)")
    print(f"AUROC        {'n/a' if r['auroc'] is None else format(r['auroc'], '.4f')}")
    print("confusion    rows true, columns predicted: normal, pneumonia")
    print(f"             normal    {tn:>5} {fp:>5}\n             pneumonia {fn:>5} {tp:>5}")
    return 0


def cmd_report(args) -> int:
    from cxr import report

    specs = args.specs if args.specs is not None else (["specs"] if Path("specs").is_dir() else [])
    path = report.render(args.results, out=args.out, benchmark_json=args.benchmark_json, specs=specs,
                         history=args.history)
    print(f"report written to {path}")
    return 0


def cmd_robustness(args) -> int:
    from cxr import robustness

    if not Path(args.results).is_dir():
        raise CxrError(f"{args.results}: no such results directory")
    t0 = time.perf_counter()
    done = robustness.score_store(args.results, args.k, args.device, progress=lambda line: print(line, flush=True))
    return _robustness_lines(done, t0)


def _robustness_lines(done, t0: float) -> int:
    """Print each run's robustness outcome and the totals; 1 when a run could not be scored."""
    counts: dict[str, int] = {}
    for _, outcome in done:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
        print(outcome.line, flush=True)
    text = ", ".join(f"{n} {status}" for status, n in counts.items()) or "no runs"
    print(f"robustness: {text} in {time.perf_counter() - t0:.1f}s")
    return 1 if counts.get("failed") else 0


def cmd_compare(args) -> int:
    from cxr import compare, gate, results

    the_gate = gate.Gate(alpha=args.alpha, min_effect=args.min_effect, factor=args.factor)  # refused before reading
    result = compare.compare(compare.load_store(args.base, "BASE"), compare.load_store(args.new, "NEW"), the_gate)
    text = compare.markdown(result)
    if args.out:
        results.atomic_write(Path(args.out), lambda f: f.write(text.encode()))
    if args.json:
        print(json.dumps(compare.to_json(result)))
    elif args.out:
        named = "; ".join([", ".join(r["ids"]) for r in result.regressions]
                          + [f"{n['id']} no longer finishes" for n in result.unfinished])
        print(f"{result.verdict}{f' ({named})' if named else ''}; table written to {args.out}")
    else:
        print(text, end="")
    return result.exit_status


def cmd_history(args) -> int:
    from cxr import history

    skipped: list[str] = []
    lines = history.lines(args.store, commit=args.commit, date=args.date, skipped=skipped)
    n = history.append(args.file, lines)
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"{n} line{'s' * (n != 1)} (commit {lines[0]['commit']}, store {lines[0]['store']}) appended to {args.file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def selection(sp):
        sp.add_argument("paths", nargs="*", metavar="SPEC_OR_DIR", help="spec files or directories (default: specs/)")
        sp.add_argument("--data", metavar="SOURCE", help=f"data source for every run: {data.usage_line()}")
        sp.add_argument("--epochs", type=int, help="override every spec's epochs")
        sp.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the specs' seeds")
        sp.add_argument("-k", metavar="EXPR", help="select run ids like pytest -k (loss names match exactly)")

    sp = sub.add_parser("run", help="train and evaluate the selected experiments")
    selection(sp)
    sp.add_argument("--out", default="results", help="results directory (default: results)")
    sp.add_argument("--device", default="auto", choices=DEVICES)
    sp.add_argument("--rerun", action="store_true", help="train again even if a result is stored")
    sp.add_argument("--no-fuse", action="store_true",
                    help="train every run alone (default: runs that can share a step train together as one "
                         "batched model, cxr.engine; a spec's `fuse = false` keeps its runs alone)")
    sp.add_argument("--shard", metavar="I/N", help="run only the I-th of N deterministic slices (0 <= I < N) of the "
                                                  "selected runs, e.g. $SLURM_ARRAY_TASK_ID/4, into a shared --out")
    sp.add_argument("--robustness", action="store_true",
                    help="then score the selected runs on MedMNIST-C's corrupted test splits (cxr-bench robustness)")
    sp.add_argument("--jobs", type=int, metavar="N",
                    help="train N units side by side in worker processes, each with 1/N of the torch threads "
                         "(cxr.jobs; for a machine with more cores than one training uses; default 1)")
    # --ray (cxr.cluster; pip install -e ".[ray]")
    sp.add_argument("--ray", metavar="ADDRESS",
                    help="spread the runs over a Ray cluster: local (start one on this machine for this command), "
                         "auto (join the cluster this node is part of) or ray://HOST:PORT; this process alone "
                         "writes --out")
    sp.add_argument("--gpus-per-task", type=float, metavar="F",
                    help="with --ray: GPUs each training unit asks for (default 1 when the cluster has GPUs and "
                         "--device is not cpu, else 0; 0.5 packs two units on one GPU); a task trains on cuda when "
                         "given a GPU, unless --device cpu")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("specs", help="list the expanded experiment runs")
    selection(sp)
    sp.set_defaults(func=cmd_specs)

    from cxr.evaluate import AUGMENT_OPTIONS, MAX_TTA

    sp = sub.add_parser("evaluate", help="accuracy of saved weights on test_normal.npy / test_pneumonia.npy")
    sp.add_argument("--weights", required=True, action="append", metavar="PTH",
                    help="state dict (.pth), e.g. results/runs/ID/seed-0/model_weights.pth; give it several times "
                         "for a seed ensemble (the models' class probabilities are averaged)")
    sp.add_argument("--normal", required=True, help=".npy (or a folder of images) of normal cases (label 0)")
    sp.add_argument("--pneumonia", required=True, help=".npy (or a folder of images) of pneumonia cases (label 1)")
    sp.add_argument("--image-size", type=int, help="resize images to this size (default: keep the arrays' size)")
    sp.add_argument("--model", help="model name (default: inferred from the weights)")
    sp.add_argument("--loss", choices=losses.NAMES, help="default: inferred (1 output = bce, 2 = ce)")
    sp.add_argument("--device", default="auto", choices=DEVICES)
    sp.add_argument("--json", action="store_true", help="print one JSON object (fractions, not percent)")
    # The decision's options are read as text and checked by cxr.evaluate.decision_from_options, so
    # that a bad value is one line naming the option, like every other refusal.
    sp.add_argument("--decision", metavar="RULE", help="argmax (default: the course's rule) or equal-prior: "
                    "pneumonia when P(pneumonia) > --prior")
    sp.add_argument("--prior", metavar="P", help="equal-prior: the train split's prevalence of pneumonia, in (0, 1) "
                    "(PneumoniaMNIST: 0.742)")
    sp.add_argument("--tta", metavar="N", help=f"test-time augmentation: mean probability over the identity and N "
                    f"fixed affine draws, 0..{MAX_TTA} (default 0: off)")
    for option, default, high in AUGMENT_OPTIONS:
        sp.add_argument(option, metavar="X", help=f"--tta's range: as the spec key augment_{option[10:]}, "
                        f"0..{high:g} (default {default:g}, the real-data recipe's)")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("report", help="render the Markdown report from a results directory")
    sp.add_argument("results", nargs="?", default="results", help="results directory (default: results)")
    sp.add_argument("--out", help="report file (default: RESULTS/report.md)")
    sp.add_argument("--benchmark-json", help="pytest-benchmark JSON to add its timings")
    sp.add_argument("--specs", action="append", metavar="SPEC_OR_DIR",
                    help="spec files whose titled experiments the report expects (default: specs/ if present)")
    sp.add_argument("--history", metavar="FILE", help="a history file (cxr-bench history) whose section, each "
                    "setting across commits, is added")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("robustness", help="score stored runs on MedMNIST-C's 13 corruptions x 5 severities of their "
                        "test split (seed-<n>.robustness.json beside each record; the report shows them)")
    sp.add_argument("results", nargs="?", default="results", help="results directory (default: results)")
    sp.add_argument("-k", metavar="EXPR", help="select run ids like pytest -k")
    sp.add_argument("--device", default="auto", choices=DEVICES)
    sp.set_defaults(func=cmd_robustness)

    from cxr.gate import Gate

    sp = sub.add_parser("compare", help="compare two results directories: exit 1 on a regression, 2 on bad input")
    sp.add_argument("base", metavar="BASE", help="results directory of the baseline")
    sp.add_argument("new", metavar="NEW", help="results directory of the change")
    sp.add_argument("--out", metavar="FILE", help="write the Markdown table there (for $GITHUB_STEP_SUMMARY)")
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    sp.add_argument("--alpha", type=float, default=Gate.alpha, help="family-wise level of the Holm-adjusted "
                    "tests (default %(default)s)")
    sp.add_argument("--min-effect", type=float, default=Gate.min_effect, metavar="POINTS",
                    help="smallest drop that counts, in points: accuracies in percentage points, AUROC in "
                         "hundredths (default %(default)s: 1 point, AUROC 0.01)")
    sp.add_argument("--factor", type=float, default=Gate.factor, help="throughput regression: NEW / BASE below "
                    "1 / FACTOR, on the same device name and torch build (default %(default)s)")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("history", help="append a results directory's settings to a history file, one line each")
    sp.add_argument("store", metavar="STORE", help="results directory")
    sp.add_argument("--file", required=True, help="the history file (JSON lines), created when absent")
    sp.add_argument("--commit", help="the commit measured (default: the runs' git commit, when they agree)")
    sp.add_argument("--date", help="when (default: the last finished_at of the runs)")
    sp.set_defaults(func=cmd_history)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CxrError as e:
        print(f"cxr-bench {args.command}: error: {e}", file=sys.stderr)
        return USER_ERROR
    except OSError as e:  # the file system: a full disk, a directory that cannot be written
        where = f"{e.filename}: " if e.filename else ""
        print(f"cxr-bench {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:  # a run's checkpoint (seed-<n>.checkpoint.pt) holds its last complete epoch
        print("interrupted; finished runs are stored, and runs cut short resume from their last complete epoch "
              "at the next cxr-bench run" if args.command == "run" else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
