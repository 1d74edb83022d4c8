#!/usr/bin/env bash
# `make bench`: one run comparing NTP servers on this host under the same load.
#
# Each server runs pinned to one core (BENCH_SERVER_CPU, default 0) and the load generator
# (`stratumctl bench`) to another (BENCH_LOAD_CPU, default 1). For each server the rate is
# raised (doubling, then bisecting) to the highest rate answered with < 0.1% loss; p50/p99
# latency are reported at that rate and at one common rate for all. Latency runs from the
# generator's send time (taken right before each sendmmsg of at most 8 requests) to the
# kernel receive timestamp of the answer; the generator's receiver reads answers in batches,
# which does not move those timestamps. On loopback the kernel's receive path for a request
# runs on the sender's core, alike for every server. Servers:
#   stratum-agent  a tenant with a 10k-CIDR allow list (including the load's sources) and
#                  per-client rate limiting on (a limit the many-source load does not hit),
#                  synchronized to the chronyd below, simulated clock
#   chronyd        Debian's chrony, `-x` (never touches the clock), `allow`, serving
#   ntpd-rs        from crates.io, server only
#   udp-echo       a raw echo with the same batching: the practical ceiling on this host
# Nothing runs with CAP_SYS_TIME; all traffic is on loopback; every step is bounded in count
# and time (the whole run takes a few minutes). Benchmarks are not tests: nothing here fails
# on a number.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export STRATUM_DENY_SYSTEM_CLOCK=1
NO_SYS_TIME=(setpriv --bounding-set=-sys_time --inh-caps=-sys_time)
SERVER_CPU="${BENCH_SERVER_CPU:-0}"
LOAD_CPU="${BENCH_LOAD_CPU:-1}"
STEP_SECONDS="${BENCH_STEP_SECONDS:-2}"
MAX_RATE="${BENCH_MAX_RATE:-4000000}"
COMMON_RATE="${BENCH_COMMON_RATE:-20000}"
SOURCES="${BENCH_SOURCES:-127.0.0.0/16}"
SOURCE_COUNT="${BENCH_SOURCE_COUNT:-2048}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${BENCH_OUT:-$ROOT/bench/results.md}"

eval "$(bench/setup.sh | grep '^NTPD_RS_BIN=')"
cargo build --quiet --release -p stratum-agent --bins
# BENCH_AGENT: another build of the agent to measure (e.g. an older commit's release binary,
# for a before/after on the same host); the load generator stays this tree's stratumctl.
AGENT="${BENCH_AGENT:-$TARGET_DIR/release/stratum-agent}"
CTL="$TARGET_DIR/release/stratumctl"

WORK="$(mktemp -d /tmp/stratum-bench.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(("::",0)); print(s.getsockname()[1])'; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# Priorities: on a shared machine, builds running on the same cores would otherwise measure
# the scheduler rather than the servers. Each server gets real-time round-robin on its core
# (every server alike; the kernel's RT throttling still leaves 5% to everything else), the
# load generator a high CFS priority (its sender and receiver threads must share its core).
if chrt -r 10 true 2>/dev/null; then SERVER_PRIO=(chrt -r 10); else SERVER_PRIO=(); fi
if nice -n -19 true 2>/dev/null; then LOAD_PRIO=(nice -n -19); else LOAD_PRIO=(); fi
# `exec`, so `pinned CMD &` leaves $! = the server's own pid (a function in the background
# runs in a subshell).
pinned() { exec "${SERVER_PRIO[@]}" taskset -c "$SERVER_CPU" "${NO_SYS_TIME[@]}" "$@"; }

# One bounded load step; prints the JSON report.
load() { # PORT RATE
    local requests
    requests=$(python3 -c "print(int($2 * $STEP_SECONDS) + 1)")
    "${LOAD_PRIO[@]}" taskset -c "$LOAD_CPU" "${NO_SYS_TIME[@]}" "$CTL" --json bench --quiet \
        --target "127.0.0.1:$1" --rate "$2" --duration "$STEP_SECONDS" --max-requests "$requests" \
        --sources "$SOURCES" --source-count "$SOURCE_COUNT" --wait 1
}

passes() { # REPORT_JSON -> exit 0 when loss < 0.1% and the generator kept the rate
    [ "$(echo "$1" | json 'int(d["lossRatio"] < 0.001 and not d["generatorLimited"])')" = 1 ]
}

# Finds the highest rate with < 0.1% loss; sets BEST (JSON of that step) and LIMIT_NOTE.
find_max() { # NAME PORT
    local name=$1 port=$2 rate=25000 lo=0 hi=0 report
    BEST="" LIMIT_NOTE=""
    while :; do
        report="$(load "$port" "$rate")"
        echo "  $name @ $rate/s: $(echo "$report" | json '"sent %d, lost %d (%.3f%%), p99 %.1f us%s" % (d["sent"], d["lost"], 100*d["lossRatio"], d["latency"]["p99Ns"]/1000, ", GENERATOR-LIMITED" if d["generatorLimited"] else "")')" >&2
        if passes "$report"; then
            lo=$rate BEST="$report"
            [ "$rate" -ge "$MAX_RATE" ] && { LIMIT_NOTE=" (cap)"; return; }
            rate=$((rate * 2))
        else
            if [ "$(echo "$report" | json 'int(d["generatorLimited"] and d["lossRatio"] < 0.001)')" = 1 ]; then
                # No loss at the most the generator could send: a lower bound on the server.
                LIMIT_NOTE=" (generator-limited)" BEST="$report"
                return
            fi
            hi=$rate
            break
        fi
    done
    local step
    for step in 1 2 3 4; do
        rate=$(((lo + hi) / 2))
        [ $((hi - lo)) -le $((hi / 20)) ] && break
        report="$(load "$port" "$rate")"
        echo "  $name @ $rate/s: $(echo "$report" | json '"lost %.3f%%, p99 %.1f us" % (100*d["lossRatio"], d["latency"]["p99Ns"]/1000)')" >&2
        if passes "$report"; then lo=$rate BEST="$report"; else hi=$rate; fi
    done
}

declare -A MAX P50 P99 C50 C99 NOTE
bench_server() { # NAME PORT
    local name=$1 port=$2
    echo "== $name (port $port)" >&2
    # Wait (bounded) until the server answers at all.
    for _ in $(seq 1 50); do
        if "$CTL" --json bench --quiet --target "127.0.0.1:$port" --rate 100 --duration 0.2 \
            --max-requests 5 --sources 127.0.0.1/32 --source-count 1 --wait 0.3 2>/dev/null |
            json 'int(d["answered"] > 0)' | grep -q 1; then break; fi
        sleep 0.2
    done
    local common
    common="$(load "$port" "$COMMON_RATE")"
    C50[$name]=$(echo "$common" | json 'd["latency"]["p50Ns"]/1000')
    C99[$name]=$(echo "$common" | json 'd["latency"]["p99Ns"]/1000')
    find_max "$name" "$port"
    if [ -z "$BEST" ]; then
        MAX[$name]=0 P50[$name]=0 P99[$name]=0
    else
        MAX[$name]=$(echo "$BEST" | json 'int(d["sentRate"])')
        P50[$name]=$(echo "$BEST" | json 'd["latency"]["p50Ns"]/1000')
        P99[$name]=$(echo "$BEST" | json 'd["latency"]["p99Ns"]/1000')
    fi
    NOTE[$name]="$LIMIT_NOTE"
}

# --- raw echo: the ceiling -----------------------------------------------------------------
ECHO_PORT=$(free_port)
pinned "$CTL" echo-server --listen "127.0.0.1:$ECHO_PORT" --workers 1 --duration 900 2>/dev/null &
PIDS+=($!)
bench_server udp-echo "$ECHO_PORT"
kill "${PIDS[-1]}"

# --- chronyd -x (also the agent's upstream afterwards) --------------------------------------
CHRONY_PORT=$(free_port)
cat >"$WORK/chrony.conf" <<EOF
port $CHRONY_PORT
local stratum 2
allow all
cmdport 0
pidfile $WORK/chronyd.pid
EOF
pinned chronyd -x -d -u root -f "$WORK/chrony.conf" >"$WORK/chronyd.log" 2>&1 &
PIDS+=($!)
bench_server chronyd "$CHRONY_PORT"

# --- ntpd-rs, server only ---------------------------------------------------------------------
if [ -x "${NTPD_RS_BIN:-}/ntp-daemon" ]; then
    NTPDRS_PORT=$(free_port)
    cat >"$WORK/ntp.toml" <<EOF
[observability]
log-level = "warn"

[[server]]
listen = "127.0.0.1:$NTPDRS_PORT"
EOF
    pinned "$NTPD_RS_BIN/ntp-daemon" -c "$WORK/ntp.toml" >"$WORK/ntpd-rs.log" 2>&1 &
    PIDS+=($!)
    bench_server ntpd-rs "$NTPDRS_PORT"
    kill "${PIDS[-1]}"
else
    echo "ntpd-rs not installed; skipped" >&2
fi

# --- stratum-agent ----------------------------------------------------------------------------
AGENT_PORT=$(free_port)
STATUS_PORT=$(free_port)
METRICS_PORT=$(free_port)
python3 - "$WORK/agent.json" "$AGENT_PORT" "$CHRONY_PORT" <<'EOF'
import json, sys
path, port, upstream = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# 10,000 CIDRs: 9,999 /24s in 10.0.0.0/8 plus the load's source range.
allowed = [f"10.{i // 256}.{i % 256}.0/24" for i in range(9999)] + ["127.0.0.0/16"]
config = {
    "version": 1, "revision": "bench", "timeService": "bench",
    "clock": {"backend": "simulated"},
    "upstreams": [{"host": "127.0.0.1", "kind": "server", "port": upstream, "iburst": True,
                   "minPoll": 4, "maxPoll": 4, "maxSources": 1}],
    "selection": {"minSources": 1, "maxDistanceSeconds": 1.5},
    "discipline": {"makeStepThresholdSeconds": 0.1, "makeStepLimit": 3, "maxSlewPpm": 500,
                   "panicStartupSeconds": 86400, "panicRuntimeSeconds": 1000, "rtcSync": False,
                   "driftFile": "/tmp/stratum-bench-drift.json"},
    "leap": {"mode": "kernel", "smearWindowSeconds": 86400},
    "serving": {"holdoverSeconds": 0, "tenants": [{
        "id": "bench/ntp", "port": port, "allowed": allowed,
        # Rate limiting on: 1000 requests/s per client, burst 1000. The load spreads over
        # 2048 sources, so at even 1M requests/s each stays under 500/s.
        "rateLimit": {"clientIntervalSeconds": 0.001, "clientBurst": 1000, "kissOfDeath": True},
    }]},
    "reporting": {"heartbeatSeconds": 60},
}
json.dump(config, open(path, "w"))
EOF
pinned "$AGENT" run --config "$WORK/agent.json" --node-name bench --clock simulated \
    --metrics-addr "127.0.0.1:$METRICS_PORT" --status-addr "127.0.0.1:$STATUS_PORT" \
    --state-dir "$WORK" --no-report --log-format text >"$WORK/agent.log" 2>&1 &
PIDS+=($!)
SYNCED=no
for _ in $(seq 1 120); do
    if "$CTL" --agent "127.0.0.1:$STATUS_PORT" --json tracking 2>/dev/null | json 'int(d["synchronized"])' 2>/dev/null | grep -q 1; then
        SYNCED=yes
        break
    fi
    sleep 0.5
done
echo "stratum-agent synchronized to chronyd: $SYNCED" >&2
bench_server stratum-agent "$AGENT_PORT"
"$CTL" --agent "127.0.0.1:$STATUS_PORT" serverstats >&2 || true

# --- table ------------------------------------------------------------------------------------
ratio() { python3 -c "a, b = float('$1'), float('$2'); print(f'{a / b:.2f}x' if b > 0 else 'n/a')"; }
{
    echo "Host: $(nproc) cores, $(uname -r); server on CPU $SERVER_CPU, load generator on CPU $LOAD_CPU;"
    echo "$SOURCE_COUNT sources in $SOURCES; ${STEP_SECONDS}s steps; loss bound 0.1%; common load $COMMON_RATE/s."
    echo
    echo "| server | max rate < 0.1% loss | p50 / p99 at max (µs) | p50 / p99 at $COMMON_RATE/s (µs) | agent ÷ this |"
    echo "|---|---:|---:|---:|---:|"
    for name in stratum-agent chronyd ntpd-rs udp-echo; do
        [ -n "${MAX[$name]:-}" ] || continue
        printf '| %s | %s/s%s | %.1f / %.1f | %.1f / %.1f | %s |\n' "$name" "${MAX[$name]}" "${NOTE[$name]}" \
            "${P50[$name]}" "${P99[$name]}" "${C50[$name]}" "${C99[$name]}" \
            "$(ratio "${MAX[stratum-agent]:-0}" "${MAX[$name]}")"
    done
    echo
    echo "Goals: ≥ 2x chronyd, ≥ 3x ntpd-rs, ≥ 60% of udp-echo, p99 ≤ 20 µs (agent synchronized: $SYNCED)."
} | tee "$OUT"
