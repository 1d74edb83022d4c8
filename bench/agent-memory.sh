#!/usr/bin/env bash
# What one agent needs in memory: the figure the agent container's default requests and memory
# limit are set from (`operator/src/build/daemonset.rs`, README "Placement").
#
#   bench/agent-memory.sh [AGENT_BIN] [TENANTS] [PREFIXES] [SECONDS]
#
# TENANTS (default 100) tenant ports from 40000 up, each allowing PREFIXES (default 100)
# distinct /24s of 10.0.0.0/8 plus 127.0.0.0/8, synchronized to a loopback `chronyd -x` (which
# never touches the clock) on the simulated clock. Then `stratumctl bench` asks every tenant
# port in turn (2000 requests/s for 0.25 s, at most 501 requests a port, from loopback sources),
# so every port's rate table and client log are made (a port makes them on its first request);
# half way, a new revision of the config changes every tenant's allow list. After SECONDS
# (default 60, or when the load is done) prints VmHWM (the peak RSS) and VmRSS of the agent,
# and its CPU time.
#
# Run it without CAP_SYS_TIME (`make bench-memory` does): nothing here may change the clock.
# All traffic stays on 127.0.0.0/8; every step is bounded in count and time.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
AGENT=${1:-$TARGET_DIR/release/stratum-agent}
CTL="$(dirname "$AGENT")/stratumctl"
TENANTS=${2:-100}
PREFIXES=${3:-100}
WINDOW=${4:-60}
BASE_PORT=40000
export STRATUM_DENY_SYSTEM_CLOCK=1

WORK=$(mktemp -d /tmp/stratum-agent-memory.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

CHRONY_PORT=$(free_port)
cat >"$WORK/chrony.conf" <<EOF
port $CHRONY_PORT
bindaddress 127.0.0.1
local stratum 2
allow 127.0.0.0/8
cmdport 0
pidfile $WORK/chronyd.pid
EOF
chronyd -x -d -u root -f "$WORK/chrony.conf" >"$WORK/chronyd.log" 2>&1 &
PIDS+=($!)

# write_config REVISION SHIFT: every tenant's ranges moved by SHIFT, so a new revision changes
# every tenant's allow list. Written aside and renamed: the agent never reads half a file.
write_config() {
PYTHONPATH="$(dirname "$0")" python3 - "$WORK/agent.json.new" "$TENANTS" "$PREFIXES" "$BASE_PORT" "$CHRONY_PORT" "$1" "$2" <<'PY'
import json, sys
from agent_config import agent_config, tenant
path, revision = sys.argv[1], sys.argv[6]
n, prefixes, base, upstream, shift = map(int, sys.argv[2:6] + sys.argv[7:8])
def allowed(i):
    # Distinct ranges per tenant, as pods of different namespaces would give.
    first = i * prefixes + shift
    return [f"10.{(first + k) // 256 % 256}.{(first + k) % 256}.0/24" for k in range(prefixes)] + ["127.0.0.0/8"]
tenants = [tenant(f"ns{i}/ntp", base + i, allowed(i)) for i in range(n)]
json.dump(agent_config(revision, upstream, tenants), open(path, "w"))
PY
mv "$WORK/agent.json.new" "$WORK/agent.json"
}
write_config memory-1 0

STATUS_PORT=$(free_port)
METRICS_PORT=$(free_port)
"$AGENT" run --node-name bench --clock simulated --no-report \
    --config "$WORK/agent.json" --state-dir "$WORK" --log-format text \
    --metrics-addr "127.0.0.1:$METRICS_PORT" --status-addr "127.0.0.1:$STATUS_PORT" \
    >"$WORK/agent.log" 2>&1 &
PID=$!
PIDS+=("$PID")
start=$(date +%s)

# Wait (bounded) until every tenant port is served and the clock is synchronized.
served=0 synced=0
for _ in $(seq 1 300); do
    served=$(curl -sf "http://127.0.0.1:$STATUS_PORT/serverstats" 2>/dev/null |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["tenants"]))' 2>/dev/null || echo 0)
    synced=$("$CTL" --agent "127.0.0.1:$STATUS_PORT" --json tracking 2>/dev/null |
        python3 -c 'import json,sys; print(int(json.load(sys.stdin)["synchronized"]))' 2>/dev/null || echo 0)
    [ "$served" = "$TENANTS" ] && [ "$synced" = 1 ] && break
    sleep 0.2
done
[ "$served" = "$TENANTS" ] || { echo "only $served of $TENANTS ports served"; tail "$WORK/agent.log"; exit 1; }
[ "$synced" = 1 ] || { echo "the agent did not synchronize to chronyd"; tail "$WORK/agent.log"; exit 1; }

revision() { "$CTL" --agent "127.0.0.1:$STATUS_PORT" --json tracking 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin).get("configRevision") or "")' 2>/dev/null || true; }

answered=0 sent=0 reloaded=no
for ((i = 0; i < TENANTS; i++)); do
    if ((i == TENANTS / 2)); then
        # Half way: a new revision of the whole config, as a pod rollout in every tenant
        # namespace would bring; the old tables and the new ones exist together for a moment.
        write_config memory-2 1
        for _ in $(seq 1 100); do
            [ "$(revision)" = memory-2 ] && { reloaded=yes; break; }
            sleep 0.1
        done
    fi
    report=$("$CTL" --json bench --quiet --target "127.0.0.1:$((BASE_PORT + i))" --rate 2000 \
        --duration 0.25 --max-requests 501 --sources 127.0.0.0/16 --source-count 2048 --wait 0.1)
    sent=$((sent + $(echo "$report" | python3 -c 'import json,sys; print(json.load(sys.stdin)["sent"])')))
    answered=$((answered + $(echo "$report" | python3 -c 'import json,sys; print(json.load(sys.stdin)["answered"])')))
done
rest=$((WINDOW - ($(date +%s) - start)))
[ "$rest" -le 0 ] || sleep "$rest"
elapsed=$(($(date +%s) - start))

kill -0 "$PID" || { echo "the agent exited"; tail "$WORK/agent.log"; exit 1; }
hwm_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$PID/status")
rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$PID/status")
ticks=$(awk '{print $14 + $15}' "/proc/$PID/stat")
threads=$(find "/proc/$PID/task" -mindepth 1 -maxdepth 1 | wc -l)
echo "MEMORY: $TENANTS tenants x $PREFIXES prefixes, $(nproc) cores, ${elapsed} s:" \
    "VmHWM $((hwm_kb / 1024)) MiB ($hwm_kb kB), VmRSS $((rss_kb / 1024)) MiB ($rss_kb kB)," \
    "CPU $((ticks / 100)).$((ticks % 100)) s, $threads threads; load: $answered of $sent requests answered;" \
    "config reloaded mid-window: $reloaded"
