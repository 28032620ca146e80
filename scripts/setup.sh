#!/usr/bin/env bash
# Installs everything nitrile needs on a fresh Debian machine, idempotently:
# Debian packages, cargo tools, and builds the workspace. Safe to run again.
#
#   scripts/setup.sh            # build tools and a release build of `nitrile`
#   scripts/setup.sh --tests    # also what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
for arg in "$@"; do
    case "$arg" in
        --tests) want_tests=1 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages: only what is missing is installed.
debian_packages=(build-essential pkg-config ca-certificates)
missing=()
for p in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

command -v cargo >/dev/null || { echo "setup.sh: cargo is required (a Rust toolchain >= 1.89)" >&2; exit 1; }

if [ "$want_tests" -eq 1 ]; then
    if ! cargo deny --version >/dev/null 2>&1; then
        log "installing cargo-deny (one time, a few minutes)"
        cargo install --locked cargo-deny@0.20.2
    fi
    if ! cargo nextest --version >/dev/null 2>&1; then
        log "installing cargo-nextest (one time, a few minutes)"
        cargo install --locked cargo-nextest
    fi
fi

log "building nitrile (release)"
cargo build --release --locked -p nitrile-cli
