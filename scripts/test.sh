#!/usr/bin/env bash
# Sets up everything the tests need, then runs every check and test of nitrile:
# format, lints, dependency policy, unit, property and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

scripts/setup.sh --tests

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, warnings are errors)"
cargo clippy --locked --workspace --all-targets -- -D warnings

log "fuzz targets type-check (run them with scripts/fuzz.sh)"
# Shares the workspace target directory so common dependencies are reused.
CARGO_TARGET_DIR="$PWD/target" cargo check --locked --manifest-path fuzz/Cargo.toml --bins

log "fuzz smoke run: every target for a few seconds, seeds and past crashes first"
# A crash fails the run and leaves its input in fuzz/regressions/<target>/.
# On a machine that cannot fuzz this prints SKIPPED and why.
CARGO_TARGET_DIR="$PWD/target" scripts/fuzz.sh --smoke 5

log "cargo deny (licences, bans, sources)"
cargo deny --log-level error check licenses bans sources
if timeout 60 cargo deny --log-level error fetch >/dev/null 2>&1; then
    log "cargo deny (advisories)"
    cargo deny --log-level error check --disable-fetch advisories
else
    echo "SKIPPED: cargo deny advisories: the RustSec advisory database cannot be fetched from this machine"
fi

log "tests"
cargo nextest run --locked --workspace --no-fail-fast
# Doctests are not run by nextest.
cargo test --locked --workspace --doc

# The test attestation (claim 7): every check above passed, so the release
# bundle of this build (target/release/nitrile, the guest image, the
# entitlement schema) is made and its attestation signed with the CI key,
# a `nitrile release keygen` key the CI holds, named by NITRILE_CI_KEY;
# release signers then stage, sign and publish the bundle. The environment
# is NITRILE_RELEASE_ENV (default dev).
if [ -n "${NITRILE_CI_KEY:-}" ]; then
    version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
    bundle="target/release-bundle/$version"
    log "release bundle $version for ${NITRILE_RELEASE_ENV:-dev}, attested with $NITRILE_CI_KEY"
    rm -rf "$bundle"
    mkdir -p target/release-bundle
    target/release/nitrile release build "$version" \
        --env "${NITRILE_RELEASE_ENV:-dev}" --out "$bundle" --binary target/release/nitrile
    target/release/nitrile release attest --bundle "$bundle" --key "$NITRILE_CI_KEY"
else
    echo "SKIPPED: release attestation: no CI key (NITRILE_CI_KEY names a key made with nitrile release keygen)"
fi
