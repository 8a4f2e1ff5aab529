#!/usr/bin/env bash
# Runs the benchmark suite through the pytest runner, then always renders the report.
#
#   CXR_OUT    output directory (default /out): runs/, benchmark.json, report.md, figures/
#   CXR_DATA   data source (default: pneumoniamnist when $CXR_DATA_DIR/pneumoniamnist.npz exists,
#              as in an image built with FETCH_PNEUMONIAMNIST=1; synthetic otherwise)
#   CXR_QUICK  quick mode (--epochs 1 --seeds 1 --throughput-images 128) when 1, true, yes or on;
#              off when 0, false, no, off or empty (any case); anything else is refused
#   arguments  passed to pytest, after the ones above (so they win): -k ce, --device cpu, ...
#              --out DIR, --benchmark-json FILE and --data SOURCE are taken by the entrypoint itself
#              (they override CXR_OUT, $CXR_OUT/benchmark.json and CXR_DATA), so that the report
#              renders the directory that pytest wrote; --specs PATH goes to both pytest and the report.
#
# Exits with pytest's status (the report is still written when some cases failed), or with the
# report's status when pytest passed and the report did not; 2 on a bad setting.
# SIGTERM (docker stop) or SIGINT (Ctrl-C): pytest is stopped with its workers (pytest-xdist -n N), the
# report of the runs that finished is rendered once they have all ended, and the exit status is 143 or
# 130. In the image this script runs under tini (PID 1), which passes the signals on: a shell that is
# PID 1 would ignore SIGTERM while it waits for pytest.
set -euo pipefail

project_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

fail() {
    echo "entrypoint: $*" >&2
    exit 2
}

absolute() {  # a path relative to the caller's directory, made absolute (it may not exist yet)
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

# SIGTERM/SIGINT are taken from here on: pytest runs in the background, in a process group of its own
# (with its pytest-xdist workers, which store runs too), so that this shell can take them while it runs,
# and stop() ends that group with SIGTERM (at once: SIGINT would let pytest end its session, but
# pytest-benchmark then fails to write its JSON over the interrupted case, after a long traceback).
# Each finished run is already stored, atomically, so the report below has every run that finished.
stop_status=0
pytest_pid=""  # also the id of its process group
# shellcheck disable=SC2329  # called by the traps below
stop() {  # $1: the signal received, $2: the exit status it means
    stop_status="$2"
    echo "entrypoint: SIG$1 received: stopping pytest; the runs that finished are kept and reported" >&2
    if [ -n "$pytest_pid" ]; then
        kill -TERM -- "-$pytest_pid" 2>/dev/null || true
    fi
}
trap 'stop TERM 143' TERM
trap 'stop INT 130' INT

group_runs() {  # whether a process of group $1 still runs (a zombie, ended but not yet reaped, does not)
    if [ ! -r /proc/self/stat ]; then
        kill -0 -- "-$1" 2>/dev/null
        return
    fi
    local stat line state pgrp
    for stat in /proc/[0-9]*/stat; do
        { read -r line < "$stat"; } 2>/dev/null || continue  # ended since the glob
        line="${line##*) }"  # after "pid (comm) ": state ppid pgrp ...
        state="${line%% *}"
        line="${line#* }"
        line="${line#* }"
        pgrp="${line%% *}"
        if [ "$pgrp" = "$1" ] && [ "$state" != Z ] && [ "$state" != X ]; then
            return 0
        fi
    done
    return 1
}

end_group() {  # $1: a process group; ends what still runs of it (SIGTERM, SIGKILL 5 s later), waits for that
    local waited=0
    while group_runs "$1"; do
        case "$waited" in
            0) kill -TERM -- "-$1" 2>/dev/null || true ;;
            50) echo "entrypoint: pytest's processes still run 5 s after SIGTERM: sending SIGKILL" >&2
                kill -KILL -- "-$1" 2>/dev/null || true ;;
        esac
        sleep 0.1
        waited=$((waited + 1))
    done
}

out="${CXR_OUT:-/out}"
data="${CXR_DATA:-}"
bench_json=""
specs=()
pytest_args=()
while [ "$#" -gt 0 ]; do
    arg="$1"
    shift
    case "$arg" in
        --out|--benchmark-json|--data|--specs)
            [ "$#" -gt 0 ] || fail "$arg needs a value"
            value="$1"
            shift
            ;;
        --out=*|--benchmark-json=*|--data=*|--specs=*)
            value="${arg#*=}"
            arg="${arg%%=*}"
            ;;
        *)
            pytest_args+=("$arg")
            continue
            ;;
    esac
    [ -n "$value" ] || fail "$arg needs a value"
    case "$arg" in
        --out) out="$value" ;;
        --benchmark-json) bench_json="$(absolute "$value")" ;;
        --data) data="$value" ;;
        --specs) specs+=("$(absolute "$value")") ;;
    esac
done

quick_setting="${CXR_QUICK:-}"
case "${quick_setting,,}" in
    1|true|yes|on) quick=(--epochs 1 --seeds 1 --throughput-images 128) ;;
    0|false|no|off|"") quick=() ;;
    *) fail "CXR_QUICK=$quick_setting: use 1, true, yes or on for quick mode; 0, false, no, off or unset for the full suite" ;;
esac

if ! mkdir -p -- "$out" || [ ! -w "$out" ] || [ ! -d "$out" ]; then
    echo "entrypoint: cannot write to output directory $out (as uid $(id -u)); mount a writable" \
        "directory, e.g. mkdir -p out && docker run --user \"\$(id -u):\$(id -g)\" -v \"\$PWD/out:/out\" ..." >&2
    exit 2
fi
out="$(cd -- "$out" && pwd)"  # absolute: pytest and the report run from the project directory
bench_json="${bench_json:-$out/benchmark.json}"

# cxr.data's default directory, ~/.cache/cxr; without HOME, ~ is the user's passwd entry (as in Python)
home="${HOME:-$(getent passwd "$(id -u)" 2>/dev/null | cut -d: -f6 || true)}"
data_dir="${CXR_DATA_DIR:-${home:+$home/.cache/cxr}}"
if [ -z "$data" ]; then
    if [ -n "$data_dir" ] && [ -f "$data_dir/pneumoniamnist.npz" ]; then
        data=pneumoniamnist
    else
        data=synthetic
    fi
fi

device="$(python3 -c 'import torch; print(f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
    else "CPU (no CUDA GPU visible to torch)")')" || device="unknown (python3 could not import torch)"
echo "entrypoint: device $device"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
echo "entrypoint: data $data, output $out${quick[*]:+, quick mode (${quick[*]})}"

spec_args=()
for s in ${specs[@]+"${specs[@]}"}; do
    spec_args+=(--specs "$s")
done

cd "$project_dir"

pytest_status=0
if [ "$stop_status" -eq 0 ]; then
    set -m  # job control for this job only: pytest leads a process group of its own, which its workers join
    # stdin as for a background job without job control (on a terminal, this job would stop reading it)
    pytest benchmarks -p no:cacheprovider "--out=$out" "--data=$data" "--benchmark-json=$bench_json" \
        ${quick[@]+"${quick[@]}"} ${spec_args[@]+"${spec_args[@]}"} ${pytest_args[@]+"${pytest_args[@]}"} \
        </dev/null &
    pytest_pid=$!
    set +m
    if [ "$stop_status" -ne 0 ]; then  # the signal came before pytest_pid was set
        kill -TERM -- "-$pytest_pid" 2>/dev/null || true
    fi
    while :; do
        wait "$pytest_pid" && pytest_status=0 || pytest_status=$?
        kill -0 "$pytest_pid" 2>/dev/null || break  # wait was cut short by a signal: pytest still runs
    done
    wait "$pytest_pid" && pytest_status=0 || pytest_status=$?  # its own status, kept by the shell
    # Its workers can outlive it (a stopped controller leaves them training and storing runs): the report
    # waits until none of the group runs
    end_group "$pytest_pid"
fi
trap - TERM INT

report_args=()
if [ "$stop_status" -eq 0 ] && [ -f "$bench_json" ]; then  # a stopped pytest writes none: any is older
    report_args=(--benchmark-json "$bench_json")
fi
report_status=0
cxr-bench report "$out" --out "$out/report.md" ${report_args[@]+"${report_args[@]}"} \
    ${spec_args[@]+"${spec_args[@]}"} || report_status=$?

if [ "$report_status" -eq 0 ] && [ -f "$out/report.md" ]; then
    echo "entrypoint: report written to $out/report.md (ran on $device)"
else
    echo "entrypoint: no report written (cxr-bench report exited $report_status; ran on $device)" >&2
fi
if [ "$stop_status" -ne 0 ]; then
    echo "entrypoint: stopped by a signal (pytest exited $pytest_status)" >&2
    exit "$stop_status"
fi
if [ "$pytest_status" -ne 0 ]; then
    echo "entrypoint: pytest exited $pytest_status" >&2
    exit "$pytest_status"
fi
exit "$report_status"
