#!/usr/bin/env bash
# Runs the agent's fuzz targets for a bounded time and prints executions and crashes.
# Usage: agent/fuzz/run.sh [seconds-per-target]   (needs nightly; installs cargo-fuzz if absent)
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-${FUZZ_SECONDS:-60}}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
status=0
for target in server_packet; do
    log="$(mktemp)"
    mkdir -p "corpus/$target"
    if ! cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        status=1
    fi
    execs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -1)"
    crashes="$(ls artifacts/"$target" 2>/dev/null | grep -c -E '^(crash|oom|timeout)-' || true)"
    echo "fuzz $target: ${execs:-?} executions in ${seconds}s, ${crashes} crash artifacts"
    [ "$status" -eq 0 ] || tail -40 "$log"
    rm -f "$log"
done
exit "$status"
