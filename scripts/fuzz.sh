#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS seconds each (default 30).
#
#   scripts/fuzz.sh                  # 30 s per target
#   scripts/fuzz.sh 600              # 10 min per target
#   scripts/fuzz.sh 60 journal       # only the named targets
#   scripts/fuzz.sh --smoke 5        # CI's smoke run: an unoptimized build
#                                    # (quicker to build, slower to fuzz), and
#                                    # SKIPPED, not a failure, on a machine
#                                    # that cannot fuzz
#
# Each target starts from its committed seeds (fuzz/seeds/<target>) and past
# crash inputs (fuzz/regressions/<target>), which are replayed first, and
# grows a local corpus in fuzz/corpus/<target> (not committed). Targets run
# side by side, one per core (FUZZ_JOBS overrides), each logging to
# fuzz/artifacts/<target>/fuzz.log. An input that crashes a target (a panic,
# a failed assertion, an overflow: targets are built with debug assertions,
# under AddressSanitizer) is copied to fuzz/regressions/<target>/ to be
# committed with the fix; the script then fails.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

smoke=0
if [ "${1:-}" = "--smoke" ]; then
    smoke=1
    shift
fi
seconds="${1:-30}"
shift || true
case "$seconds" in
    ''|*[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, not $seconds" >&2; exit 2 ;;
esac

# Why this machine cannot fuzz, if it cannot: libFuzzer and the sanitizer
# runtimes exist for Linux on x86_64 and aarch64 only, and libFuzzer is
# C++ built from source.
cannot_fuzz() {
    case "$(uname -s)/$(uname -m)" in
        Linux/x86_64|Linux/aarch64) ;;
        *) echo "libFuzzer does not run on $(uname -s)/$(uname -m)"; return ;;
    esac
    command -v c++ >/dev/null 2>&1 || { echo "no C++ compiler to build libFuzzer (build-essential)"; return; }
    cargo fuzz --version >/dev/null 2>&1 || echo "cargo-fuzz is not installed (scripts/setup.sh --tests installs it)"
}

if ! cargo fuzz --version >/dev/null 2>&1 && [ "$smoke" -eq 0 ]; then
    log "installing cargo-fuzz (one time, a few minutes)"
    cargo install --locked cargo-fuzz@0.13.2
fi
why="$(cannot_fuzz)"
if [ -n "$why" ]; then
    if [ "$smoke" -eq 1 ]; then
        echo "SKIPPED: fuzz smoke run: $why"
        exit 0
    fi
    echo "fuzz.sh: cannot fuzz here: $why" >&2
    exit 1
fi

# cargo-fuzz builds with unstable compiler flags (-Zsanitizer=address and the
# sanitizer-coverage passes libFuzzer needs), which only a nightly compiler
# accepts. The machine has one stable toolchain and no other can be fetched;
# RUSTC_BOOTSTRAP=1 lets this stable rustc accept those flags. It is set for
# fuzzing only, never for the builds that ship.
export RUSTC_BOOTSTRAP=1
# The workspace's target directory, not one of fuzz/'s own: the sanitizer
# builds sit beside the others (under target/<triple>/).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

# The journal and bundle targets write a small directory per input, and
# repairing a torn journal tail fsyncs: on a disk that caps them near 100
# inputs a second. A memory file system (when there is one and TMPDIR is not
# set) makes them about ten times faster.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
    export TMPDIR=/dev/shm
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Debug assertions (and so overflow checks) on: an arithmetic overflow on
# untrusted input is a crash too. Every target is built in one go, then run.
if [ "$smoke" -eq 1 ]; then
    build_flags=(--dev)
else
    build_flags=(--release --debug-assertions)
fi
log "building ${#targets[@]} fuzz targets (${build_flags[*]})"
if [ "$#" -gt 0 ]; then
    for target in "${targets[@]}"; do
        cargo fuzz build "${build_flags[@]}" "$target"
    done
else
    cargo fuzz build "${build_flags[@]}"
fi

status="$(mktemp -d)"
trap 'rm -rf "$status"' EXIT

# Fuzzes one target; on a crash keeps the input and notes the target.
fuzz_one() {
    local target="$1"
    local corpus="fuzz/corpus/$target" seeds="fuzz/seeds/$target"
    local regressions="fuzz/regressions/$target" artifacts="fuzz/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    local dirs=("$corpus") d f
    for d in "$seeds" "$regressions"; do
        [ -d "$d" ] && dirs+=("$d")
    done
    # -timeout: one input running this long is a hang, and a crash.
    if cargo fuzz run "${build_flags[@]}" "$target" "${dirs[@]}" -- \
        -max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
        >"$artifacts/fuzz.log" 2>&1; then
        log "$target: $(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$artifacts/fuzz.log" |
            grep -o '[0-9]*$' || echo '?') inputs in ${seconds}s, no crash"
        return
    fi
    touch "$status/$target"
    tail -n 60 "$artifacts/fuzz.log" >&2
    mkdir -p "$regressions"
    for f in "$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-* "$artifacts"/leak-*; do
        [ -e "$f" ] || continue
        cp -n "$f" "$regressions/"
        echo "fuzz.sh: $target: kept $(basename "$f") in $regressions" >&2
    done
}

jobs_max="${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}"
log "fuzzing ${#targets[@]} targets for ${seconds}s each, $jobs_max at a time"
for target in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do
        wait -n || true
    done
    fuzz_one "$target" &
done
wait

failed=()
for target in "${targets[@]}"; do
    [ -e "$status/$target" ] && failed+=("$target")
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: crashed: ${failed[*]} (inputs kept under fuzz/regressions/, logs under fuzz/artifacts/)" >&2
    exit 1
fi
log "all ${#targets[@]} targets ran ${seconds}s without a crash"
