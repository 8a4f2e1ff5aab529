"""The pytest-driven benchmark runner: every run that the spec files describe is one benchmark case.

    pytest benchmarks                                  # every run of specs/*.toml, results in results/
    pytest benchmarks -k ce --epochs 1 --seeds 1       # the CE runs, one epoch, seed 0 only
    pytest benchmarks -m task_lr --benchmark-json=b.json
    pytest benchmarks/test_throughput.py               # the engine vs the course's DataLoader loop

Cases. One per (experiment, seed), with the run id as its pytest id, e.g.
`test_experiment[loss-ce-lr0.001-bs32-seed0]`. Each goes through `cxr.sweep.run`, the engine of
`cxr-bench run`, into the same results store (--out, default results/): a run already stored with
the same identity (recipe, data content, training version) is reported from the store (extra_info
"cached": true), not trained again, unless --rerun; a stored result of another recipe or data under
the same id fails the case with the store's one-line error (README "Results"). --specs, --data,
--epochs, --seeds and --device work as in `cxr-bench run`.

Selecting with -k. pytest's -k is a case-insensitive substring match over a case's names and
markers, and "ce" is inside "bce": plain pytest runs the BCE cases for `-k ce`. Here the words
`bce` and `ce` name a loss: on a case under benchmarks/ such a word is true exactly when the case
trains with that loss (it carries the marker of that name; the throughput cases carry none).
Every other word keeps pytest's meaning, and the grammar (and, or, not, parentheses) is pytest's
own. So `-k ce`, `-k bce`, `-k lr0.1`, `-k bs128`, `-k "ce and not lr0.1"` select the runs that
`cxr-bench run -k` selects (cxr.selection.matches), and `-k throughput` the throughput cases; nor can
another name on a case's chain that happens to hold "ce" (a folder named science, a spec named
trace) pull cases in, since a loss word is never matched as a substring there. How: a
tryfirst pytest_collection_modifyitems parses -k with cxr.keyword (pytest's grammar; the one
parser `cxr-bench run -k` uses too) and matches words with pytest's KeywordMatcher plus the loss
rule (what pytest's deselect_by_keyword does), reports what it deselects through
pytest_deselected, and then clears the option, so that pytest's substring pass, which runs after
it, does not filter again. Cases outside benchmarks/ (`pytest tests benchmarks -k ...`) are
matched exactly as pytest would. An expression cxr.keyword cannot parse is left to pytest's error.

Markers (registered here, so --strict-markers passes; for -m): `bce` / `ce` (the loss),
`task_<name>` (the spec's name, e.g. task_lr) and `sweep_<key>` (each swept key, e.g.
sweep_batch_size).

Outcomes. A run that trained (status ok) or diverged passes: the suite measures, and the status is
in extra_info. A run that crashed fails its case with its one-line error, bad data fails with the
DataError's message; the other cases go on. Timing: benchmark.pedantic(rounds=1, iterations=1)
around the run, which synchronizes CUDA before it returns; loading the data (once per process,
cxr.data caches it) is pedantic's untimed setup. For a case served from the store the wall time
is that of reading it; extra_info keeps the stored run's own train_seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _pytest.mark import KeywordMatcher  # pytest's -k matcher: used as is, only the loss words differ

from cxr import data as data_mod
from cxr import kernels, keyword, results, selection, sweep
from cxr import spec as spec_mod
from cxr.env import DEVICES, resolve_device
from cxr.errors import CxrError
from cxr.metrics import pct

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent


@dataclass(frozen=True)
class Settings:
    """The runner's command-line settings, resolved once per session."""

    specs: tuple[spec_mod.ExperimentSpec, ...]  # after --seeds, --data and --epochs
    spec_paths: tuple[Path, ...]
    out: Path
    device: torch.device
    rerun: bool
    fuse: bool  # train compatible runs as fused groups (cxr.engine); --no-fuse: each alone
    throughput_images: int | None  # None: the default of test_throughput.py
    throughput_rounds: int | None = None  # timed rounds of each fused-throughput case; None: its default


SETTINGS = pytest.StashKey[Settings]()
EXPERIMENT_ROWS = pytest.StashKey[list]()  # one dict per experiment case, for the terminal summary
THROUGHPUT_ROWS = pytest.StashKey[list]()  # one dict per throughput case
FUSED_ROWS = pytest.StashKey[list]()  # one dict per fused-throughput case
BENCHMARK_DICTS = pytest.StashKey[list]()  # pytest-benchmark dicts sent by xdist workers, for --benchmark-json
UNITS = pytest.StashKey[dict]()  # run id -> the selected runs it trains with (its fused group, or itself)
UNIT_RESULTS = pytest.StashKey[dict]()  # run id -> (record, case that trained it, runs in its group)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cxr-bench", "cxr-bench runner (pytest benchmarks)")
    group.addoption("--specs", action="append", metavar="PATH",
                    help="spec file or directory, repeatable (default: the checkout's specs/)")
    group.addoption("--data", metavar="SOURCE", help=f"data of every run: {data_mod.usage_line()}")
    group.addoption("--epochs", type=int, metavar="N", help="override every spec's epochs")
    group.addoption("--seeds", type=int, metavar="N", help="run seeds 0..N-1 instead of the specs' seeds")
    group.addoption("--out", default="results", metavar="DIR", help="results directory (default: results)")
    group.addoption("--device", default="auto", choices=DEVICES,
                    help="training device (default: auto, the GPU when there is one)")
    group.addoption("--rerun", action="store_true", help="train again even where a result is stored")
    group.addoption("--no-fuse", action="store_true",
                    help="train every run alone (default: compatible runs train as one fused group, cxr.engine)")
    group.addoption("--throughput-images", type=int, metavar="N",
                    help="images per timed throughput pass (default: 2048 on CPU, 16384 on CUDA)")
    group.addoption("--throughput-rounds", type=int, metavar="N",
                    help="timed rounds of each fused-throughput case (default 3); from 5 on, the median "
                         "round's fused/sequential ratio gets a bootstrap 95%% interval")


def _settings(config: pytest.Config) -> Settings:
    here = config.invocation_params.dir
    paths = tuple(here / p for p in config.getoption("specs") or [REPO / "specs"])
    seeds, images = config.getoption("seeds"), config.getoption("throughput_images")
    try:
        specs = selection.select(list(paths), seeds=seeds, dataset=config.getoption("data"),
                                epochs=config.getoption("epochs"))  # -k: pytest's option, applied below
        device = resolve_device(config.getoption("device"))
        sweep.check_environment()  # CXR_FUSE_KERNEL, CXR_GRAPH_STEPS
    except CxrError as e:
        raise pytest.UsageError(str(e)) from None
    if images is not None and images < 2:
        raise pytest.UsageError(f"--throughput-images {images}: expected an integer >= 2")
    rounds = config.getoption("throughput_rounds")
    if rounds is not None and rounds < 1:
        raise pytest.UsageError(f"--throughput-rounds {rounds}: expected an integer >= 1")
    out = here / config.getoption("out")
    if not config.option.collectonly:  # fail before any case trains, not at the first store
        try:
            results.check_writable(out)
        except CxrError as e:
            raise pytest.UsageError(str(e)) from None
    return Settings(tuple(specs), paths, out, device, config.getoption("rerun"), not config.getoption("no_fuse"),
                    images, rounds)


_CONFIG: dict = {}  # the session's config, for pytest_runtest_logreport (which is not given it)


def _xdist_worker() -> str | None:
    """This process's pytest-xdist worker id (gw0, gw1, ...), or None when it is not a worker."""
    return os.environ.get("PYTEST_XDIST_WORKER")


def worker_gpu(worker: str, visible: list[str]) -> str | None:
    """The GPU an xdist worker trains on: worker gw<i> takes visible[i % len(visible)]; None without GPUs."""
    return visible[int(worker.removeprefix("gw")) % len(visible)] if visible else None


def _visible_gpus() -> list[str]:
    """The GPUs this process may use, without initialising CUDA (so that CUDA_VISIBLE_DEVICES set after
    this still counts): CUDA_VISIBLE_DEVICES when set, else the GPUs nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [v.strip() for v in env.split(",") if v.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def _pin_worker_gpu() -> None:
    """`pytest benchmarks -n N`: pin each worker to one GPU before anything starts CUDA."""
    worker = _xdist_worker()
    gpu = worker_gpu(worker, _visible_gpus()) if worker else None
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def _xdist_setup(config: pytest.Config) -> None:
    """Under pytest-xdist, let the workers time their cases, which pytest-benchmark would turn off: the
    controller (which runs none) writes --benchmark-json from what they send."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.xdist_warning:  # not under xdist, or benchmarks skipped or disabled by the user
        return
    bs.xdist_warning = False
    if _xdist_worker():
        bs.disabled, bs.json = False, None  # time as without xdist; the controller writes the one file


def fusion_group(spec: spec_mod.ExperimentSpec) -> str:
    """The name of the fused group a case may train with (its cxr.kernels.fusion_key), or its own run id."""
    key = kernels.fusion_key(spec)
    return f"fuse-{hashlib.sha256(repr(key).encode()).hexdigest()[:12]}" if key else spec.run_id


def _check_dist(config: pytest.Config, settings: Settings) -> None:
    """`-n N` with a --dist mode that would split a fused group (or run a case in several workers) is a
    usage error: the workers would then find each other's runs claimed and skip them."""
    dist = config.getoption("dist", "no")
    if dist == "no" or not config.getoption("tx", None):  # not distributing (an xdist worker runs as "no")
        return
    if dist == "each":
        raise pytest.UsageError("--dist each runs every case in every worker, so they would train the same "
                                "runs; use --dist load (the default here)")
    if dist == "worksteal" and settings.fuse:  # it moves single cases between workers; --no-fuse has no groups
        raise pytest.UsageError("--dist worksteal cannot keep a fused group on one worker; use --dist load "
                                "(the default here) or --no-fuse")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`pytest benchmarks -n N` (xdist's load and loadgroup modes): hand out whole fused groups, so that a group's
    cases run in one worker and train there as one group (xdist's own loadgroup would need marks, and with
    pytest 9.2 it does not group at all: pytest-dev/pytest-xdist#1386). Other cases go out one by one, or by
    their xdist_group mark under loadgroup. loadscope and loadfile keep xdist's schedulers: every experiment
    case is in one module, so its group is too; each and worksteal are refused (_check_dist)."""
    if config.getvalue("dist") not in ("load", "loadgroup") or SETTINGS not in config.stash:
        return None
    from xdist.scheduler import LoadGroupScheduling

    groups = {s.run_id: fusion_group(s) for s in config.stash[SETTINGS].specs}

    class FusedGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            case = nodeid.rpartition("::")[2]
            if case.startswith("test_experiment[") and case.endswith("]"):
                return groups.get(case[len("test_experiment["):-1], nodeid)
            return super()._split_scope(nodeid)  # under load a nodeid has no @group: the case alone

    return FusedGroupScheduling(config, log)


def pytest_sessionstart(session: pytest.Session) -> None:
    _xdist_setup(session.config)  # after every plugin's pytest_configure (pytest-benchmark's is trylast)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under xdist, write --benchmark-json from the workers' cases, as pytest-benchmark writes it without."""
    config = session.config
    bs = getattr(config, "_benchmarksession", None)
    sent = config.stash.get(BENCHMARK_DICTS, [])
    if bs is None or _xdist_worker() or not bs.json or not sent:
        return
    output = config.hook.pytest_benchmark_generate_json(
        config=config, benchmarks=[], include_data=True, machine_info=bs.get_machine_info(),
        commit_info=config.hook.pytest_benchmark_generate_commit_info(config=config))
    output["benchmarks"] = sorted(sent, key=lambda b: b["fullname"])
    bs.save_json(output)


def pytest_configure(config: pytest.Config) -> None:
    _pin_worker_gpu()  # first: resolving --device below may start CUDA
    for loss in spec_mod.LOSSES:
        config.addinivalue_line("markers", f"{loss}: a run trained with the {loss.upper()} loss "
                                           f"(-k {loss} selects exactly these, see benchmarks/conftest.py)")
    if config.getoption("help"):
        return  # --help works even with broken spec files
    settings = _settings(config)
    _check_dist(config, settings)
    config.stash[SETTINGS] = settings
    config.stash[EXPERIMENT_ROWS] = []
    config.stash[THROUGHPUT_ROWS] = []
    config.stash[UNITS] = {}
    config.stash[FUSED_ROWS] = []
    config.stash[BENCHMARK_DICTS] = []
    _CONFIG["config"] = config
    config.stash[UNIT_RESULTS] = {}
    for name in sorted({s.name for s in settings.specs}):
        config.addinivalue_line("markers", f"task_{name}: runs of the spec named {name!r}")
    for key in sorted({k for s in settings.specs for k in s.sweep}):
        config.addinivalue_line("markers", f"sweep_{key}: runs of a spec that sweeps {key}")


def pytest_report_header(config: pytest.Config) -> str | None:
    s = config.stash.get(SETTINGS, None)
    if s is None:
        return None
    where = ", ".join(_shown(p, config) for p in s.spec_paths)
    return (f"cxr-bench: {len(s.specs)} runs from {where} -> {_shown(s.out, config)} on {s.device}"
            f"{' (--rerun)' if s.rerun else ''}; -k bce / -k ce match the loss exactly")


def _shown(path: Path, config: pytest.Config) -> str:
    try:
        return str(path.relative_to(config.invocation_params.dir)) or "."
    except ValueError:
        return str(path)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "spec" in metafunc.fixturenames:
        specs = metafunc.config.stash[SETTINGS].specs
        metafunc.parametrize("spec", [pytest.param(s, id=s.run_id, marks=_marks(s)) for s in specs])


def _marks(spec: spec_mod.ExperimentSpec) -> list[pytest.MarkDecorator]:
    return [getattr(pytest.mark, spec.loss), getattr(pytest.mark, f"task_{spec.name}"),
            *(getattr(pytest.mark, f"sweep_{key}") for key in spec.sweep)]


# ----------------------------------------------------------------------------------------- -k

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    text = config.option.keyword.lstrip()
    if not text:
        return
    try:
        evaluate = keyword.compile(text)
    except keyword.KeywordError:
        return  # pytest's own -k pass reports the error
    remaining, deselected = [], []
    for item in items:
        (remaining if evaluate(_matcher(item)) else deselected).append(item)
    config.option.keyword = ""  # done: pytest's substring pass would find "ce" in "bce" again
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = remaining


def _matcher(item: pytest.Item):
    """pytest's KeywordMatcher for the item, except that under benchmarks/ `bce`/`ce` match the loss."""
    names = KeywordMatcher.from_item(item)
    ours = item.path.is_relative_to(BENCHMARKS)

    def match(word: str, /, **kwargs) -> bool:
        loss = selection.loss_word(word) if ours and not kwargs else None
        if loss:
            return item.get_closest_marker(loss) is not None
        return names(word, **kwargs)

    return match


def pytest_collection_finish(session: pytest.Session) -> None:
    """The fused groups of exactly the selected cases (after -k and -m): a selection that takes part of a
    group fuses only what it took."""
    settings = session.config.stash.get(SETTINGS, None)
    if settings is None:
        return
    selected = [item.callspec.params["spec"] for item in session.items
                if hasattr(item, "callspec") and "spec" in item.callspec.params]
    units = session.config.stash[UNITS]
    for unit in sweep.groups(selected, fuse=settings.fuse):
        units.update({s.run_id: unit for s in unit})


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def cxr_settings(pytestconfig: pytest.Config) -> Settings:
    return pytestconfig.stash[SETTINGS]


@pytest.fixture(scope="session")
def fusion_units(pytestconfig: pytest.Config) -> dict:
    return pytestconfig.stash[UNITS]


@pytest.fixture(scope="session")
def unit_results(pytestconfig: pytest.Config) -> dict:
    return pytestconfig.stash[UNIT_RESULTS]


class _Rows:
    """A case's rows for a summary table. They travel on the case's report (user_properties), so that
    the process that prints the tables gets them whether the case ran there or in a pytest-xdist worker."""

    def __init__(self, node: pytest.Item, kind: str):
        self.node, self.kind = node, kind

    def append(self, row: dict) -> None:
        self.node.user_properties.append((ROW_PROPERTY, self.kind, _plain(row)))


@pytest.fixture
def experiment_rows(request: pytest.FixtureRequest) -> _Rows:
    return _Rows(request.node, "experiment")


@pytest.fixture
def throughput_rows(request: pytest.FixtureRequest) -> _Rows:
    return _Rows(request.node, "throughput")


@pytest.fixture
def fused_rows(request: pytest.FixtureRequest) -> _Rows:
    return _Rows(request.node, "fused")


def _plain(obj):
    """obj as plain JSON types (what xdist can send between processes)."""
    return json.loads(json.dumps(obj, default=str))


ROW_PROPERTY = "cxr_bench_row"
BENCHMARK_PROPERTY = "cxr_bench_benchmark"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """In a pytest-xdist worker, a case's pytest-benchmark result rides on its report to the controller,
    which writes --benchmark-json (pytest-benchmark itself turns benchmarks off under xdist)."""
    outcome = yield
    report = outcome.get_result()
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if call.when == "call" and _xdist_worker() and fixture is not None and getattr(fixture, "stats", None):
        from pytest_benchmark.utils import safe_dumps

        report.user_properties.append((BENCHMARK_PROPERTY, json.loads(safe_dumps(fixture.stats.as_dict()))))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect the rows and benchmarks of finished cases (run here, or sent by an xdist worker)."""
    config = _CONFIG.get("config")
    if report.when != "call" or config is None or SETTINGS not in config.stash:
        return
    tables = {"experiment": EXPERIMENT_ROWS, "throughput": THROUGHPUT_ROWS, "fused": FUSED_ROWS}
    for prop in report.user_properties:
        if prop[0] == ROW_PROPERTY:
            config.stash[tables[prop[1]]].append(prop[2])
        elif prop[0] == BENCHMARK_PROPERTY:
            config.stash[BENCHMARK_DICTS].append(prop[1])


# ------------------------------------------------------------------------------ summary tables

def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = config.stash.get(EXPERIMENT_ROWS, [])
    if rows:
        _experiment_table(terminalreporter, rows, config.stash[SETTINGS])
    rows = config.stash.get(THROUGHPUT_ROWS, [])
    if rows:
        _throughput_table(terminalreporter, rows)
    rows = config.stash.get(FUSED_ROWS, [])
    if rows:
        _fused_table(terminalreporter, rows)


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _experiment_table(tr, rows: list[dict], settings: Settings) -> None:
    stored = sum(r["cached"] for r in rows)
    tr.write_sep("-", f"cxr-bench: {len(rows)} runs, {len(rows) - stored} trained, {stored} from the store "
                      f"({settings.out})")
    width = max(len(r["run_id"]) for r in rows)
    tr.write_line(f"{'run':<{width}}  {'status':<8} {'source':<7} {'test acc':>8} {'AUROC':>7} "
                  f"{'best ep':>7} {'train s':>8} {'img/s':>8}")
    for r in rows:
        source = "stored" if r["cached"] else "fused" if r.get("fused_with") else "trained"
        tr.write_line(f"{r['run_id']:<{width}}  {r['status']:<8} {source:<7} "
                      f"{pct(r['test_accuracy']):>8} {_num(r['test_auroc'], '.4f'):>7} "
                      f"{_num(r['best_epoch'], 'd'):>7} {_num(r['train_seconds'], '.1f'):>8} "
                      f"{_num(r['images_per_second'], '.0f'):>8}")
    if any(r.get("fused_with") and not r["cached"] for r in rows):
        tr.write_line("fused: trained with the other runs of its group at once (cxr.engine); the group's benchmark "
                      "time is on its first case, and train s is the group's time while the run took part")


def _throughput_table(tr, rows: list[dict]) -> None:
    first = rows[0]
    tr.write_sep("-", "cxr-bench throughput: engine (cxr.engine.fit) vs the course loop (DataLoader)")
    peak = first["peak_gflops"]
    peak = f"{peak / 1000:.1f} TFLOP/s" if peak >= 1000 else f"{peak:.1f} GFLOP/s"
    tr.write_line(f"{first['device_name']}; peak {peak} ({first['peak_matmul']})")
    tr.write_line(f"model cnn, {first['model_mflops']:.2f} MFLOP per 28 px image forward; "
                  f"{first['images']} images per timed pass, best of {first['rounds']}")
    tr.write_line(f"{'':5}  {'training, images/s':<26}  {'evaluation, images/s':<26}  training MFU")
    head = f"{'engine':>8} {'course':>8} {'ratio':>8}"
    tr.write_line(f"{'batch':>5}  {head}  {head}  {'engine':>7} {'course':>7}")
    for r in rows:
        train = f"{r['engine_train_ips']:>8.0f} {r['course_train_ips']:>8.0f} {r['train_ratio']:>7.2f}x"
        evaluation = f"{r['engine_eval_ips']:>8.0f} {r['course_eval_ips']:>8.0f} {r['eval_ratio']:>7.2f}x"
        mfu = " ".join(f"{100 * r[k]:.3g}%".rjust(7) for k in ("engine_train_mfu", "course_train_mfu"))
        tr.write_line(f"{r['batch_size']:>5}  {train}  {evaluation}  {mfu}")
    if first.get("engine_precision"):
        tr.write_line(f"engine precision {first['engine_precision']} (spec precision auto); training MFU against the "
                      f"peak of its precision (bf16 matmul: {first['peak_bf16_gflops']:.0f} GFLOP/s); the course "
                      "loop is fp32, NCHW, DataLoader")
        tr.write_line("engine in fp32 (precision = fp32), training: " + "; ".join(
            f"batch {r['batch_size']}: {r['engine_fp32_train_ips']:.0f} images/s, {r['fp32_ratio']:.2f}x the course, "
            f"MFU {100 * r['engine_fp32_train_mfu']:.3g}%" for r in rows))
    if any(r.get("engine_epoch_graph_train_ips") for r in rows):
        tr.write_line("engine with a whole epoch per CUDA graph replay (CXR_GRAPH_STEPS=epoch), training: "
                      + "; ".join(f"batch {r['batch_size']}: {r['engine_epoch_graph_train_ips']:.0f} images/s, "
                                  f"{r['epoch_graph_ratio']:.2f}x the course" for r in rows))


def _fused_table(tr, rows: list[dict]) -> None:
    first = rows[0]
    tr.write_sep("-", "cxr-bench fused training: a group at once (cxr.engine) vs its runs one after another")
    tr.write_line(f"{first['device_name']}; {first['images_per_member']} images per member and pass, best of "
                  f"{first['rounds']}; aggregate training images/s; 'default': the kernel cxr-bench run picks "
                  "(cxr.kernels.default_kernel)")
    tr.write_line(f"memory roofline: {first['bandwidth_gbs']} GB/s measured / {first['bytes_per_training_image']:,} "
                  "bytes per training image (5 x the activations)")
    tr.write_line(f"{'members':>7} {'batch':>5}  {'sequential':>10} {'grouped':>9} {'loop':>9} {'vmap':>9} "
                  f"{'course':>9}  {'grouped/seq':>11} {'loop/seq':>8} {'vmap/seq':>8} {'default':>8} "
                  f"{'default/course':>14} {'roofline':>8}")
    for r in rows:
        tr.write_line(f"{r['members']:>7} {r['batch_size']:>5}  {r['sequential_ips']:>10.0f} {r['grouped_ips']:>9.0f} "
                      f"{r['loop_ips']:>9.0f} {r['vmap_ips']:>9.0f} {r['course_ips']:>9.0f}  "
                      f"{r['grouped_vs_sequential']:>10.2f}x {r['loop_vs_sequential']:>7.2f}x "
                      f"{r['vmap_vs_sequential']:>7.2f}x {r['default_kernel']:>8} {r['fused_vs_course']:>13.2f}x "
                      f"{100 * r['roofline_fraction']:>7.2f}%")
    tr.write_line("vmap: torch.func's stacked models (one vmap of functional_call, one Adam over the stacked "
                  "parameters, eager), measured beside the engine's kernels")
    if any(r.get("fused_vs_sequential_ci_low") is not None for r in rows):
        tr.write_line(f"default kernel / sequential, round by round (the two side by side in each of "
                      f"{first['rounds']} rounds): median and bootstrap 95% interval of the median")
        for r in rows:
            tr.write_line(f"{r['members']:>7} {r['batch_size']:>5}  {r['fused_vs_sequential_median_of_rounds']:.3f}x "
                          f"[{r['fused_vs_sequential_ci_low']:.3f}, {r['fused_vs_sequential_ci_high']:.3f}]")
    if any(r.get("epoch_graph_ips") for r in rows):
        tr.write_line("default kernel with a whole epoch per CUDA graph replay (CXR_GRAPH_STEPS=epoch): "
                      + "; ".join(f"{r['members']}x bs{r['batch_size']}: {r['epoch_graph_ips']:.0f} images/s, "
                                  f"{r['epoch_graph_vs_sequential']:.2f}x seq, "
                                  f"{100 * r['epoch_graph_roofline_fraction']:.2f}% roofline" for r in rows))
