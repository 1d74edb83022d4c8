#!/usr/bin/env bash
# Runs every target of the given cargo-fuzz crates for a bounded time each and prints
# executions and crash artifacts; fails when a target finds a crash. `make fuzz` calls it.
# Usage: scripts/fuzz.sh SECONDS FUZZ_DIR...   e.g. scripts/fuzz.sh 120 agent/ntp/fuzz agent/fuzz
# Needs a nightly toolchain (libFuzzer); installs cargo-fuzz when absent. Builds go to
# $CARGO_TARGET_DIR/fuzz (default target/fuzz), one directory for every fuzz crate.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${1:?usage: scripts/fuzz.sh SECONDS FUZZ_DIR...}"
shift
[ "$#" -gt 0 ] || { echo "usage: scripts/fuzz.sh SECONDS FUZZ_DIR..." >&2; exit 2; }
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}/fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
status=0
for dir in "$@"; do
    dir="$(cd "$dir" && pwd)"
    for target in $(cd "$dir" && cargo +nightly fuzz list); do
        log="$(mktemp)"
        mkdir -p "$dir/corpus/$target"
        target_status=0
        (cd "$dir" && cargo +nightly fuzz run --target-dir "$target_dir" "$target" "corpus/$target" -- \
            -max_total_time="$seconds" -print_final_stats=1) >"$log" 2>&1 || target_status=1
        execs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -1)"
        crashes="$(ls "$dir/artifacts/$target" 2>/dev/null | grep -c -E '^(crash|oom|timeout|leak)-' || true)"
        echo "fuzz ${dir#"$ROOT"/} $target: ${execs:-?} executions in ${seconds}s, ${crashes} crash artifacts"
        if [ "$target_status" -ne 0 ]; then
            status=1
            tail -40 "$log"
        fi
        rm -f "$log"
    done
done
exit "$status"
