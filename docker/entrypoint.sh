#!/usr/bin/env bash
# Runs the benchmark suite through the pytest runner, then always renders the report.
#
#   CXR_OUT    output directory (default /out): runs/, benchmark.json, report.md, figures/
#   CXR_DATA   data source (default: pneumoniamnist when $CXR_DATA_DIR/pneumoniamnist.npz exists,
#              as in an image built with FETCH_PNEUMONIAMNIST=1; synthetic otherwise)
#   CXR_QUICK  1 = quick mode: --epochs 1 --seeds 1
#   arguments  passed to pytest, after the ones above (so they win): -k ce, --device cpu, ...
#
# Exits with pytest's status (the report is still written when some cases failed), or with the
# report's status when pytest passed and the report did not.
set -euo pipefail

project_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

out="${CXR_OUT:-/out}"
if ! mkdir -p "$out" || [ ! -w "$out" ]; then
    echo "entrypoint: cannot write to output directory $out (as uid $(id -u)); mount a writable" \
        "directory, e.g. mkdir -p out && docker run --user \"\$(id -u):\$(id -g)\" -v \"\$PWD/out:/out\" ..." >&2
    exit 2
fi
out="$(cd "$out" && pwd)"  # absolute: pytest and the report run from the project directory

data_file="${CXR_DATA_DIR:-$HOME/.cache/cxr}/pneumoniamnist.npz"
if [ -n "${CXR_DATA:-}" ]; then
    data="$CXR_DATA"
elif [ -f "$data_file" ]; then
    data=pneumoniamnist
else
    data=synthetic
fi

quick=()
if [ "${CXR_QUICK:-0}" = 1 ]; then
    quick=(--epochs 1 --seeds 1)
fi

device="$(python3 -c 'import torch; print(f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
    else "CPU (no CUDA GPU visible to torch)")')" || device="unknown (python3 could not import torch)"
echo "entrypoint: device $device"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
echo "entrypoint: data $data, output $out${quick[*]:+, quick mode (${quick[*]})}"

cd "$project_dir"
pytest_status=0
pytest benchmarks -p no:cacheprovider --out "$out" --data "$data" \
    --benchmark-json "$out/benchmark.json" "${quick[@]}" "$@" || pytest_status=$?

bench_json=()
if [ -f "$out/benchmark.json" ]; then
    bench_json=(--benchmark-json "$out/benchmark.json")
fi
report_status=0
cxr-bench report "$out" --out "$out/report.md" "${bench_json[@]}" || report_status=$?

if [ -f "$out/report.md" ]; then
    echo "entrypoint: report written to $out/report.md (ran on $device)"
else
    echo "entrypoint: no report written (cxr-bench report exited $report_status; ran on $device)" >&2
fi
if [ "$pytest_status" -ne 0 ]; then
    echo "entrypoint: pytest exited $pytest_status" >&2
    exit "$pytest_status"
fi
exit "$report_status"
