# Sourced by scripts/compare-ref.sh and scripts/suite-abab.sh: a git ref checked out beside the working tree.
#
#   ref_worktree NAME REF DIR PREFIX
#
# cds to the repository's top level and sets `root` (that directory), `sha` (REF's commit), `work` (DIR, or a
# new directory $TMPDIR/PREFIX.XXXXXX when DIR is empty; absolute) and `tree` ($work/ref-$sha, REF checked out
# there as a detached worktree, removed again when the script exits). REF that is not a commit: one line
# "NAME: REF: not a commit of this repository" and exit status 2.
ref_worktree() {
    local name=$1 ref=$2 dir=$3 prefix=$4
    root=$(git rev-parse --show-toplevel)
    cd "$root"
    if ! sha=$(git rev-parse --verify --quiet "$ref^{commit}"); then
        echo "$name: $ref: not a commit of this repository" >&2
        exit 2
    fi
    work=${dir:-$(mktemp -d "${TMPDIR:-/tmp}/$prefix.XXXXXX")}
    mkdir -p "$work"
    work=$(cd "$work" && pwd)
    tree="$work/ref-$sha"
    trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || true' EXIT
    git worktree remove --force "$tree" >/dev/null 2>&1 || true  # one left by a killed run
    git worktree add --detach --quiet "$tree" "$sha"
}
