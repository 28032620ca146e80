#!/usr/bin/env bash
# Sets up this machine and runs a whole nitrile cell on it (`nitrile up`).
# Arguments are passed to `nitrile up` (e.g. --state DIR); see `nitrile up --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec target/release/nitrile up "$@"
