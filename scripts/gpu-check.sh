#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU and the project installed (pip install -e ".[test]"):
# the device names, the CUDA-marked tests, one quick pass of the suite on CUDA with its report,
# the default suite (`cxr-bench run`, all shipped specs, 3 seeds) fused and with --no-fuse on fresh
# stores, and the throughput benchmarks (the engine vs the course loop; fused groups of 3, 9 and 18
# vs sequential runs, with the memory-roofline fraction), each also with a whole epoch per CUDA graph
# replay (CXR_GRAPH_STEPS=epoch), and where a run's time goes. Under 10 minutes on one modern GPU.
# Every step runs even when an earlier one fails; the exit status is non-zero when any step failed.
#   scripts/gpu-check.sh [OUT_DIR]        (default: a fresh temporary directory)
#   STEP_TIMEOUT=240                      seconds any one step may take
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out="${1:-$(mktemp -d -t cxr-gpu-check.XXXXXX)}"
mkdir -p "$out/suite" "$out/throughput"  # pytest-benchmark does not create the JSON's folder
steps=()
statuses=()

step() {
    local name="$1" status=0 start=$SECONDS
    shift
    echo
    echo "=== $name: $*"
    timeout "${STEP_TIMEOUT:-240}" "$@" || status=$?  # a hung step must not take the others' time
    echo "=== $name: exit $status$([ "$status" = 124 ] && echo " (timed out)"), $((SECONDS - start)) s"
    steps+=("$name")
    statuses+=("$status")
}

step nvidia-smi nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step torch python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda);
print("cuda device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE (torch sees no GPU)");
raise SystemExit(0 if torch.cuda.is_available() else 1)'
step cuda-tests pytest tests -m cuda -p no:cacheprovider -q
step suite pytest benchmarks/test_experiments.py -p no:cacheprovider -q --device cuda --epochs 1 --seeds 1 \
    --out "$out/suite" --benchmark-json "$out/suite/benchmark.json"
step cuda-start python3 -c 'import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
torch.zeros(1, device="cuda"); torch.cuda.synchronize(); t2 = time.perf_counter()
print(f"import torch {t1 - t0:.2f} s, CUDA context {t2 - t1:.2f} s")'
step suite-fused cxr-bench run --device cuda --out "$out/default-fused"
step suite-alone cxr-bench run --device cuda --no-fuse --out "$out/default-alone"
step suite-epoch-graphs env CXR_GRAPH_STEPS=epoch cxr-bench run --device cuda --out "$out/default-epoch-graphs"
step suite-times python3 scripts/suite-split.py "$out/default-fused" "$out/default-alone" "$out/default-epoch-graphs"
step report cxr-bench report "$out/suite" --out "$out/suite/report.md" \
    --benchmark-json "$out/suite/benchmark.json"
step throughput pytest benchmarks/test_throughput.py -p no:cacheprovider --device cuda \
    --out "$out/throughput" --benchmark-json "$out/throughput/benchmark.json"
step figures python3 - "$out/throughput/benchmark.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    extra = ", ".join(f"{k}={v}" for k, v in b.get("extra_info", {}).items())
    print(f"{b['name']}: mean {b['stats']['mean'] * 1e3:.2f} ms over {b['stats']['rounds']} rounds; {extra}")
PY

echo
echo "=== summary (output in $out)"
failed=0
for i in "${!steps[@]}"; do
    printf '%-12s %s\n' "${steps[$i]}" "$([ "${statuses[$i]}" = 0 ] && echo ok || echo "FAILED (exit ${statuses[$i]})")"
    [ "${statuses[$i]}" = 0 ] || failed=1
done
exit "$failed"
