#!/usr/bin/env bash
# Linters, offline: ruff on the Python code, hadolint on Dockerfile.cuda, and the workflow files
# against check-jsonschema's vendored GitHub workflow schema. Run from anywhere; exits non-zero if
# any of them fails, after running all of them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

failed=()
run() {
    echo "+ $*"
    "$@" || failed+=("$1")
}

run ruff check .
run hadolint Dockerfile.cuda
run check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

if [ "${#failed[@]}" -ne 0 ]; then
    echo "lint: failed: ${failed[*]}" >&2
    exit 1
fi
echo "lint: ok"
