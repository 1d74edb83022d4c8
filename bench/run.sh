#!/usr/bin/env bash
# `make bench`: builds what it measures (release builds only), then runs bench/bench.py, which
# compares stratum-agent, chronyd -x, ntpd-rs and a raw UDP echo on this host under the same
# load and policy. The method, the knobs (BENCH_* variables) and how to read the tables are in
# bench/bench.py's docstring and bench/README.md. ~10 minutes on 2 cores.
#
# BENCH_AGENT: another release build of the agent to measure (e.g. an older commit's, for a
# before/after on the same host); the load generator stays this tree's stratumctl.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export STRATUM_DENY_SYSTEM_CLOCK=1
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

eval "$(bench/setup.sh | grep '^NTPD_RS_BIN=')"
echo "bench: building the agent and stratumctl (release)" >&2
cargo build --quiet --release -p stratum-agent --bins
export NTPD_RS_BIN
export BENCH_AGENT="${BENCH_AGENT:-$TARGET_DIR/release/stratum-agent}"
export BENCH_CTL="$TARGET_DIR/release/stratumctl"
exec python3 bench/bench.py "$@"
