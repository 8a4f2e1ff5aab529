#!/usr/bin/env bash
# What CI's regression gate does, locally (`asv continuous` for this project): the quick suite at REF, checked
# out as a git worktree, and at the working tree, each into its own results store, then
# `cxr-bench compare BASE NEW` of the two.
#
#   scripts/compare-ref.sh REF [cxr-bench run options...]      e.g. scripts/compare-ref.sh HEAD~1
#                                                                    scripts/compare-ref.sh main -k ce --device cpu
#
# The quick suite: `cxr-bench run --epochs 1 --seeds 2` over specs/ (CXR_QUICK_ARGS replaces those options;
# the options after REF are added, for both sides). REF's suite runs REF's code on REF's specs/; the working
# tree's runs its own. CXR_COMPARE_ARGS adds options to `cxr-bench compare` (default "--factor 2.5" without a
# CUDA GPU: a shared CPU's throughput moves 2x between back-to-back runs; set it empty for compare's 1.25).
# Stores and the table go to CXR_COMPARE_DIR (default: a new directory under /tmp): base/, new/ and compare.md.
# Exit status: compare's (0 no regression, 1 a regression, 2 bad input), or 2 when REF is not a commit or a
# suite could not run at all.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -ge 1 ] && exit 0 || exit 2
fi
ref=$1
shift
# shellcheck source=scripts/ref-worktree.sh
source "$(dirname "${BASH_SOURCE[0]}")/ref-worktree.sh"
ref_worktree compare-ref "$ref" "${CXR_COMPARE_DIR:-}" cxr-compare
read -r -a quick <<< "${CXR_QUICK_ARGS:---epochs 1 --seeds 2}"
python=${PYTHON:-python3}
if [ -z "${CXR_COMPARE_ARGS+set}" ] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
        2>/dev/null; then
    # No GPU: one-epoch runs on a shared CPU moved 0.65x to 2.18x in throughput between back-to-back runs of the
    # same code (2-core machine of this repository), so the default --factor 1.25 would report the load.
    CXR_COMPARE_ARGS="--factor 2.5"
    echo "compare-ref: no CUDA GPU here: throughput gate at --factor 2.5 (set CXR_COMPARE_ARGS to change it)" >&2
fi
read -r -a gate <<< "${CXR_COMPARE_ARGS:-}"

suite() {  # suite DIR OUT: `cxr-bench run` with DIR's code and specs; a run that failed (exit 1) is in the table
    local dir=$1 out=$2 status=0
    echo "+ (cd $dir && cxr-bench run ${quick[*]} ${*:3} --out $out)" >&2
    (cd "$dir" && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" "$python" -m cxr.cli run "${quick[@]}" "${@:3}" \
        --out "$out") || status=$?
    if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
        echo "compare-ref: the suite in $dir stopped with exit status $status" >&2
        exit 2
    fi
}

rm -rf "$work/base" "$work/new"
suite "$tree" "$work/base" "$@"
suite "$root" "$work/new" "$@"
status=0
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" -m cxr.cli compare "$work/base" "$work/new" \
    --out "$work/compare.md" ${gate[@]+"${gate[@]}"} || status=$?
cat "$work/compare.md" 2>/dev/null || true
echo "compare-ref: BASE $ref ($sha) -> NEW the working tree; stores and compare.md in $work" >&2
exit "$status"
