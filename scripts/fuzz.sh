#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS seconds each (default 30).
#
#   scripts/fuzz.sh             # 30 s per target
#   scripts/fuzz.sh 600         # 10 min per target
#   scripts/fuzz.sh 60 journal  # only the named targets
#
# Each target starts from its committed seeds (fuzz/seeds/<target>) and past
# crash inputs (fuzz/regressions/<target>), which are replayed first, and
# grows a local corpus in fuzz/corpus/<target> (not committed). An input
# that crashes a target is copied to fuzz/regressions/<target>/ to be
# committed with the fix; the script then fails.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

seconds="${1:-30}"
shift || true
case "$seconds" in
    ''|*[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, not $seconds" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (one time, a few minutes)"
    cargo install --locked cargo-fuzz
fi

# cargo-fuzz builds with unstable compiler flags (-Zsanitizer=address and the
# sanitizer-coverage passes libFuzzer needs), which only a nightly compiler
# accepts. The machine has one stable toolchain and no other can be fetched;
# RUSTC_BOOTSTRAP=1 lets this stable rustc accept those flags. It is set for
# fuzzing only, never for the builds that ship.
export RUSTC_BOOTSTRAP=1

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

failed=()
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    seeds="fuzz/seeds/$target"
    regressions="fuzz/regressions/$target"
    artifacts="fuzz/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    for d in "$seeds" "$regressions"; do
        [ -d "$d" ] && dirs+=("$d")
    done
    log "fuzzing $target for ${seconds}s"
    if ! cargo fuzz run "$target" "${dirs[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1; then
        failed+=("$target")
        mkdir -p "$regressions"
        for f in "$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-* "$artifacts"/leak-*; do
            [ -e "$f" ] || continue
            cp -n "$f" "$regressions/"
            echo "fuzz.sh: $target: kept $(basename "$f") in $regressions" >&2
        done
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: crashed: ${failed[*]} (inputs kept under fuzz/regressions/)" >&2
    exit 1
fi
log "all ${#targets[@]} targets ran ${seconds}s without a crash"
