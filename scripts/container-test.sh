#!/usr/bin/env bash
# The container, built and run for real: builds Dockerfile.cuda on a stand-in base (no CUDA) with
# rootful podman, runs it as a user would, and stops it with `podman stop` during a run.
#
#   scripts/container-test.sh        (as root; re-runs itself with sudo otherwise)
#
# 1. Installs what is missing: podman, runc, mmdebstrap (apt), and writes /etc/containers/containers.conf
#    (runtime runc, cgroupfs, file events, host network, nofile = this shell's hard limit), so that
#    afterwards a plain `podman run ... cxr-bench` works in any shell, as `docker run cxr-bench` would.
# 2. The stand-in base (docker/test-base.Dockerfile on a Debian bookworm minbase made by mmdebstrap,
#    torch from the local wheelhouse when there is one): tagged by a hash of its inputs and reused,
#    so only the first run pays for it. CXR_REBUILD_BASE=1 makes it again.
# 3. podman build -f Dockerfile.cuda --build-arg BASE_IMAGE=<stand-in> -t cxr-bench .
# 4. Quick mode as uid 1000 with -v out:/out: checks report.md, figures/*.png, runs/, benchmark.json.
# 5. A longer run (-k loss-bce --epochs 3 --no-fuse: three runs, one after another, where fusion would
#    train and store them at once), `podman stop` (grace period 10 s, Docker's default) once the first
#    result is stored: it must end within the grace period with exit status
#    143 and a report of the runs that finished.
# Both runs get OMP_NUM_THREADS=1 (unless set): on a shared, loaded 2-core machine torch's OpenMP threads
# stall (the quick run took 422 s with them and 60 s without, under the same load); this checks the
# container, not the CPU's speed. Prints the time of each phase and the image sizes.
# CXR_CONTAINER_TEST_KEEP=1 keeps the outputs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo --preserve-env=CXR_REBUILD_BASE,CXR_CONTAINER_TEST_KEEP,CXR_WHEELHOUSE,PIP_FIND_LINKS \
            "$0" "$@"
    fi
    echo "container-test: needs root (rootful podman, apt, /etc/containers)" >&2
    exit 2
fi

say() { echo "container-test: $*"; }
die() {
    echo "container-test: FAILED: $*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
declare -A took=()

IMAGE=cxr-bench
STOP_GRACE=10
threads="OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"
work="$(mktemp -d /tmp/cxr-container-test.XXXXXX)"
stop_name="cxr-bench-stop-test-$$"
cleanup() {
    podman rm -f "$stop_name" >/dev/null 2>&1 || true
    if [ "${CXR_CONTAINER_TEST_KEEP:-0}" = 1 ]; then
        say "outputs kept in $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# --- 1. tools and podman's configuration ------------------------------------------------------------
t0="$(now)"
export DEBIAN_FRONTEND=noninteractive
missing=()
for pair in podman:podman runc:runc mmdebstrap:mmdebstrap update-ca-certificates:ca-certificates; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
if [ "${#missing[@]}" -ne 0 ]; then
    say "installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]}"
fi

# crun (podman's default runtime) fails here on rlimits and hybrid cgroups, and podman's default
# nofile limit is above what may be raised here: runc, cgroupfs, and this shell's hard limit.
conf=/etc/containers/containers.conf
marker="# Written by cxr-bench scripts/container-test.sh"
nofile="$(ulimit -Hn)"
[ "$nofile" = unlimited ] && nofile=1048576
wanted="$marker (rewritten on each run; a file without this line is kept as containers.conf.orig).
[containers]
netns = \"host\"
default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=32768:32768\"]

[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\""
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$wanted" ]; then
    mkdir -p /etc/containers
    if [ -f "$conf" ] && ! grep -qF "$marker" "$conf" && [ ! -e "$conf.orig" ]; then
        cp -p "$conf" "$conf.orig"
    fi
    printf '%s\n' "$wanted" > "$conf"
    say "wrote $conf"
fi
took[setup]="$(since "$t0")"
say "podman $(podman version --format '{{.Client.Version}}'), $(runc --version | head -1), mmdebstrap $(mmdebstrap --version | awk '{print $2}')"

# --- 2. the stand-in base, reused while its inputs are the same --------------------------------------
t0="$(now)"
suite=bookworm
mirrors=(
    "deb http://deb.debian.org/debian bookworm main"
    "deb http://deb.debian.org/debian bookworm-updates main"
    "deb http://deb.debian.org/debian-security bookworm-security main"
)
certs=/usr/local/share/ca-certificates  # a proxy's own CA, where outbound HTTPS goes through one
hooks=()
if [ -d "$certs" ]; then
    hooks+=(--customize-hook="sync-in $certs $certs")
fi
# shellcheck disable=SC2016  # $1 is the root directory, expanded by mmdebstrap's hook
hooks+=(--customize-hook='chroot "$1" update-ca-certificates')
debian_inputs="$(
    printf '%s\n' "mmdebstrap --variant=minbase --include=ca-certificates $suite" "${mirrors[@]}" "${hooks[@]}"
    if [ -d "$certs" ]; then (cd "$certs" && find . -type f -print0 | sort -z | xargs -0r sha256sum); fi
)"
debian_hash="$(printf '%s' "$debian_inputs" | sha256sum | cut -c1-12)"
debian_image="localhost/cxr-debian:$suite-$debian_hash"

# torch: the CPU wheel from a local wheelhouse when there is one (bind-mounted read-only into the
# build: nothing multi-GB is downloaded), else PyTorch's CPU index.
torch=torch==2.13.0+cpu
wheelhouse=""
for dir in ${CXR_WHEELHOUSE:-} ${PIP_FIND_LINKS:-} \
    $(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p"); do
    dir="${dir#file://}"
    if compgen -G "$dir/torch-2.13.0+cpu-cp311-cp311-*x86_64.whl" >/dev/null; then
        wheelhouse="$dir"
        break
    fi
done
build_volumes=()
if [ -n "$wheelhouse" ]; then
    torch_pip_args="--find-links $wheelhouse"
    build_volumes=(-v "$wheelhouse:$wheelhouse:ro")
    torch_source="$(cd "$wheelhouse" && ls -l torch-2.13.0+cpu-cp311-cp311-*x86_64.whl)"
else
    torch_pip_args="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
    torch_source="$torch_pip_args"
fi
base_hash="$(printf '%s\n' "$debian_hash" "$torch" "$torch_source" | cat - docker/test-base.Dockerfile \
    | sha256sum | cut -c1-12)"
base_image="localhost/cxr-test-base:$base_hash"

if [ "${CXR_REBUILD_BASE:-0}" = 1 ]; then
    podman rmi -f "$base_image" "$debian_image" >/dev/null 2>&1 || true
fi
if podman image exists "$base_image"; then
    say "stand-in base $base_image: reused (inputs unchanged)"
else
    if ! podman image exists "$debian_image"; then
        say "mmdebstrap: Debian $suite minbase -> $debian_image"
        mmdebstrap --quiet --variant=minbase --include=ca-certificates "${hooks[@]}" \
            "$suite" "$work/debian.tar" "${mirrors[@]}" || die "mmdebstrap"
        podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            "$work/debian.tar" "$debian_image" >/dev/null || die "podman import"
        rm -f "$work/debian.tar"
    fi
    say "building the stand-in base $base_image (torch from ${wheelhouse:-the PyTorch CPU index})"
    podman build --quiet --pull=never --format docker -f docker/test-base.Dockerfile \
        ${build_volumes[@]+"${build_volumes[@]}"} \
        --build-arg DEBIAN_IMAGE="$debian_image" --build-arg TORCH="$torch" \
        --build-arg TORCH_PIP_ARGS="$torch_pip_args" -t "$base_image" docker/ >/dev/null \
        || die "podman build of docker/test-base.Dockerfile"
fi
# Older stand-ins (other inputs) go; one still used by an image stays.
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep -E '^localhost/cxr-(test-base|debian):' \
        | grep -vxF -e "$base_image" -e "$debian_image"); do
    podman rmi "$old" >/dev/null 2>&1 || true
done
took[base]="$(since "$t0")"

# --- 3. the image, from Dockerfile.cuda ---------------------------------------------------------------
t0="$(now)"
commit="$(git describe --always --dirty 2>/dev/null || echo unknown)"
say "podman build -f Dockerfile.cuda --build-arg BASE_IMAGE=$base_image -t $IMAGE ."
podman build --pull=never --format docker -f Dockerfile.cuda --build-arg BASE_IMAGE="$base_image" \
    --build-arg GIT_COMMIT="$commit" -t "$IMAGE" . > "$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; die "podman build of Dockerfile.cuda (log above)"; }
podman image prune -f >/dev/null  # the images of earlier builds, untagged by this one
took[build]="$(since "$t0")"
size() { podman image inspect --format '{{.Size}}' "$1" | awk '{ printf "%.0f MB", $1 / 1e6 }'; }
in_image() { podman run --rm --entrypoint "$1" "$IMAGE" "${@:2}"; }
[ "$(in_image id -u)" = 1000 ] || die "the image does not run as uid 1000"
for tool in hadolint check-jsonschema; do
    if in_image bash -c "command -v $tool" >/dev/null 2>&1; then
        die "the runtime image carries the test-only tool $tool"
    fi
done

# --- 4. quick mode, as uid 1000, -v out:/out --------------------------------------------------------
t0="$(now)"
out="$work/out"
mkdir -p "$out"
chown 1000:1000 "$out"
say "podman run --rm --user 1000:1000 -v out:/out -e CXR_QUICK=1 -e $threads $IMAGE"
status=0
podman run --rm --user 1000:1000 -v "$out:/out" -e CXR_QUICK=1 -e "$threads" "$IMAGE" > "$work/run.log" 2>&1 \
    || status=$?
took[run]="$(since "$t0")"
if [ "$status" -ne 0 ]; then
    tail -40 "$work/run.log" >&2
    die "the quick run exited $status (log above)"
fi
grep -q "^entrypoint: report written to /out/report.md" "$work/run.log" || die "no 'report written' line in the log"
[ -s "$out/report.md" ] || die "no out/report.md"
grep -qi synthetic "$out/report.md" || die "out/report.md does not say that the data are synthetic"
compgen -G "$out/figures/*.png" >/dev/null || die "no out/figures/*.png"
runs=$(find "$out/runs" -name 'seed-*.json' ! -name '*.attempt.json' | wc -l)
[ "$runs" -ge 1 ] || die "no out/runs/*/seed-*.json"
python3 -c 'import json, sys; assert json.load(open(sys.argv[1]))["benchmarks"]' "$out/benchmark.json" \
    || die "out/benchmark.json has no benchmarks"
[ "$(stat -c %u "$out/report.md")" = 1000 ] || die "out/report.md is not owned by uid 1000"
say "quick run: $runs result files, $(find "$out/figures" -name '*.png' | wc -l) figures, report.md, benchmark.json"

# --- 5. podman stop during a run ----------------------------------------------------------------------
t0="$(now)"
out2="$work/stop-out"
mkdir -p "$out2"
chown 1000:1000 "$out2"
say "podman run -d --user 1000:1000 -v out:/out $IMAGE -k loss-bce --epochs 3 --no-fuse; podman stop after the first result"
podman run -d --name "$stop_name" --user 1000:1000 -v "$out2:/out" -e "$threads" "$IMAGE" \
    -k loss-bce --epochs 3 --no-fuse >/dev/null
first=""
for _ in $(seq 1500); do  # up to 5 minutes
    first="$(find "$out2/runs" -name 'seed-*.json' 2>/dev/null | head -1 || true)"
    [ -n "$first" ] && break
    [ "$(podman inspect --format '{{.State.Running}}' "$stop_name")" = true ] || break
    sleep 0.2
done
if [ -z "$first" ]; then
    podman logs "$stop_name" 2>&1 | tail -30 >&2
    die "no result file appeared before the container ended (log above)"
fi
t_stop="$(now)"
touch "$work/stop-sent"
podman stop -t "$STOP_GRACE" "$stop_name" >/dev/null
took[stop]="$(since "$t_stop")"
code="$(podman inspect --format '{{.State.ExitCode}}' "$stop_name")"
podman logs "$stop_name" > "$work/stop.log" 2>&1 || true
took[stop_test]="$(since "$t0")"
if [ "$code" != 143 ]; then
    tail -30 "$work/stop.log" >&2
    die "podman stop: exit status $code, not 143 (137 = killed after the grace period; log above)"
fi
awk -v s="${took[stop]}" -v g="$STOP_GRACE" 'BEGIN { exit !(s < g) }' \
    || die "podman stop took ${took[stop]} s, not within the grace period of $STOP_GRACE s"
grep -q "SIGTERM received" "$work/stop.log" || die "the entrypoint did not log the SIGTERM"
[ "$out2/report.md" -nt "$work/stop-sent" ] || die "no report written after the stop"
finished=$(find "$out2/runs" -name 'seed-*.json' ! -name '*.attempt.json' | wc -l)
[ "$finished" -ge 1 ] && [ "$finished" -lt 3 ] || die "$finished of 3 runs stored: the stop came too late to test"
grep -q "loss-bce-lr0.001-bs32" "$out2/report.md" || die "the report after the stop does not list the finished run"
say "podman stop: exit 143 in ${took[stop]} s (grace $STOP_GRACE s), report of $finished finished run(s) of 3"

# --- summary ------------------------------------------------------------------------------------------
say "image $IMAGE $(size "$IMAGE") (stand-in base $(size "$base_image"), Debian minbase $(size "$debian_image"))"
say "times: setup ${took[setup]} s, base ${took[base]} s, build ${took[build]} s, quick run ${took[run]} s," \
    "stop test ${took[stop_test]} s (stop itself ${took[stop]} s)"
say "ok"
