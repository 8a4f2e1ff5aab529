#!/usr/bin/env bash
# Wall time of the default suite at REF and at the working tree, alternated (REF, tree, REF, tree, ...), each
# pass into a fresh results store: on a shared machine whose speed drifts, alternating is what makes the two
# comparable. One line per pass: its wall time, cxr-bench run's own line, and scripts/suite-split.py's split.
#
#   scripts/suite-abab.sh REF [ROUNDS] [cxr-bench run options...]     e.g. scripts/suite-abab.sh HEAD~1 2
#
# REF's code runs on the working tree's specs/ (the same experiments both sides), from a git worktree, with
# PYTHONPATH pointing at it (an editable install would otherwise run the working tree's code). ROUNDS: 2 by
# default. Stores go under CXR_ABAB_DIR (default: a new directory under /tmp). Nothing is asserted.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -ge 1 ] && exit 0 || exit 2
fi
ref=$1
shift
rounds=2
if [ $# -ge 1 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    rounds=$1
    shift
fi
# shellcheck source=scripts/ref-worktree.sh
source "$(dirname "${BASH_SOURCE[0]}")/ref-worktree.sh"
ref_worktree suite-abab "$ref" "${CXR_ABAB_DIR:-}" cxr-abab
python=${PYTHON:-python3}
echo "# default suite, $ref ($(git rev-parse --short "$sha")) against the working tree ($(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo -dirty)), $rounds rounds, $(date -u '+%F %H:%M') UTC, $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg) before"
for round in $(seq 1 "$rounds"); do
    for side in ref tree; do
        code=$root
        [ "$side" = ref ] && code=$tree
        store="$work/$side-$round"
        rm -rf "$store"
        start=$EPOCHREALTIME
        # from inside $code: `python -m` puts the current directory first on sys.path
        (cd "$code" && PYTHONPATH=$code "$python" -m cxr.cli run "$root/specs" --out "$store" "$@") > "$store.log" 2>&1 || {
            echo "suite-abab: the $side suite failed; see $store.log" >&2
            exit 1
        }
        end=$EPOCHREALTIME
        split=$("$python" "$root/scripts/suite-split.py" "$store" | cut -d';' -f2-)
        printf '%-4s round %d: %.1f s wall, code %s; %s;%s\n' "$side" "$round" "$(awk "BEGIN { print $end - $start }")" \
            "$(cd "$code" && PYTHONPATH=$code "$python" -c 'import cxr, os; print(os.path.dirname(os.path.dirname(cxr.__file__)))')" \
            "$(tail -n 1 "$store.log" | cut -d';' -f1)" "$split"
    done
done
