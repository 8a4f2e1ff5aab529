#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU and the project installed (pip install -e ".[test]"):
# the device names, the CUDA-marked tests, one quick pass of the suite on CUDA with its report,
# the default suite (`cxr-bench run`, all shipped specs, 3 seeds) fused and with --no-fuse on fresh
# stores, and the throughput benchmarks (the engine vs the course loop; fused groups of 3, 9 and 18
# vs sequential runs, with the memory-roofline fraction). Under 10 minutes on one modern GPU. Every step runs even when an
# earlier one fails; the exit status is non-zero when any step failed.
#   scripts/gpu-check.sh [OUT_DIR]        (default: a fresh temporary directory)
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
    "$@" || status=$?
    echo "=== $name: exit $status, $((SECONDS - start)) s"
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
step suite-fused cxr-bench run --device cuda --out "$out/default-fused"
step suite-alone cxr-bench run --device cuda --no-fuse --out "$out/default-alone"
step suite-times python3 - "$out/default-fused" "$out/default-alone" <<'PY'
import json, sys
from pathlib import Path
for store in sys.argv[1:]:  # training + evaluation wall time, a fused group's training counted once
    recs = [json.loads(p.read_text()) for p in Path(store).glob("runs/*/seed-*.json")]
    fresh = [r for r in recs if not r["reused_from"]]
    groups = {}
    for r in fresh:
        t = r["timing"] or {}
        key = frozenset([f"{r['id']}-seed{r['seed']}", *(t.get("fused_with") or [])])
        groups[key] = max(groups.get(key, 0), t.get("train_seconds") or 0)
    total = sum(groups.values()) + sum((r["timing"] or {}).get("eval_seconds") or 0 for r in fresh)
    print(f"{store}: {len(recs)} runs, {len(fresh)} trained in {len(groups)} units; "
          f"training + evaluation {total:.1f} s")
PY
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
