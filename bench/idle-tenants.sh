#!/usr/bin/env bash
# What an agent with many tenants and no traffic costs: threads, CPU over a quiet window,
# and RSS of the real binary (build it with `cargo build --release -p stratum-agent`).
#
#   bench/idle-tenants.sh [AGENT_BIN] [TENANTS] [SECONDS]
#
# Tenants listen on 127.0.0.1-reachable ports from 40000 up (all of them must be free);
# the upstream is 127.0.0.1:9 (discard: nothing answers, so the agent stays unsynchronized
# and only its own timers run). The simulated clock is used: nothing touches the host
# clock. Nothing is sent to the tenant ports during the window.
set -euo pipefail

BIN=${1:-${CARGO_TARGET_DIR:-target}/release/stratum-agent}
TENANTS=${2:-1000}
SECONDS_IDLE=${3:-10}
BASE_PORT=40000
WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT

PYTHONPATH="$(dirname "$0")" python3 - "$WORK/agent.json" "$TENANTS" "$BASE_PORT" <<'PY'
import json, sys
from agent_config import agent_config, tenant
path, n, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tenants = [tenant(f"ns/t{i}", base + i, ["127.0.0.0/8"], interval=2.0, burst=8) for i in range(n)]
# Upstream 127.0.0.1:9 (discard): nothing answers, only the agent's own timers run.
json.dump(agent_config("idle-1", 9, tenants, poll=(4, 6)), open(path, "w"))
PY

STATUS_PORT=$((BASE_PORT - 1))
METRICS_PORT=$((BASE_PORT - 2))
STRATUM_DENY_SYSTEM_CLOCK=1 "$BIN" run --node-name bench --clock simulated --no-report \
    --config "$WORK/agent.json" --state-dir "$WORK" \
    --metrics-addr "127.0.0.1:$METRICS_PORT" --status-addr "127.0.0.1:$STATUS_PORT" \
    >"$WORK/agent.log" 2>&1 &
PID=$!

# Wait (bounded) until every tenant port is served.
for _ in $(seq 1 300); do
    served=$(curl -sf "http://127.0.0.1:$STATUS_PORT/serverstats" 2>/dev/null |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["tenants"]))' 2>/dev/null || echo 0)
    [ "$served" = "$TENANTS" ] && break
    sleep 0.1
done
[ "$served" = "$TENANTS" ] || { echo "only $served of $TENANTS ports served"; tail "$WORK/agent.log"; exit 1; }
sleep 1

ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
before=$(ticks)
sleep "$SECONDS_IDLE"
after=$(ticks)
threads=$(ls "/proc/$PID/task" | wc -l)
workers=$(cat /proc/"$PID"/task/*/comm | grep -c '^ntp-worker-' || true)
rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$PID/status")
# USER_HZ is 100 on Linux: ticks per second of one core.
cpu=$(python3 -c "print(f'{($after - $before) / $SECONDS_IDLE:.2f}')")
echo "IDLE: $TENANTS tenants, $(nproc) cores: $threads threads ($workers server workers)," \
    "CPU $cpu % of one core over ${SECONDS_IDLE} s, RSS $((rss_kb / 1024)) MiB"

# One request per port (1000 datagrams on loopback): each port's tables get made.
python3 - "$TENANTS" "$BASE_PORT" <<'PY'
import socket, sys
n, base = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
request = bytes([0x23]) + bytes(47)
answered = 0
for i in range(n):
    s.sendto(request, ("127.0.0.1", base + i))
    try:
        s.recvfrom(1024)
        answered += 1
    except socket.timeout:
        pass
print(f"ASKED: {answered} of {n} ports answered", end="; ")
PY
sleep 1
rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$PID/status")
echo "RSS $((rss_kb / 1024)) MiB with every port's tables made"
