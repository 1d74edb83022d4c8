#!/usr/bin/env bash
# A real Prometheus (Debian package `prometheus`) scraping live agents and the operator, for
# the e2e issue's "must show" 4, plus `promtool check metrics` on their real /metrics output:
#
#   1. promtool check metrics on http://<target>/metrics of every agent and the operator
#   2. Prometheus on 127.0.0.1:<port> (loopback only), jobs `stratum-agent` and
#      `stratum-operator` (the job names the alerts and the dashboard use), loading the chart's
#      files/alerts.yaml, scrape interval 5s
#   3. once every target was scraped at least three times: every dashboard query returns data
#   4. prints the alerts Prometheus evaluates (pending/firing) for information
#
# Usage:
#   charts/stratum/tests/prometheus-e2e.sh --agent 10.77.0.10:9123 --agent 10.77.0.11:9123 \
#       [--operator 127.0.0.1:8080] [--port 19090] [--keep]
#
#   --agent ADDR     an agent's metrics address (repeat; at least one)
#   --operator ADDR  the operator's metrics address (the operator panels need it)
#   --port PORT      Prometheus' port on 127.0.0.1 (default: a free one)
#   --keep           leave Prometheus running and print its PID and URL (stop it with kill PID)
#
# The dashboard's tenant panels need at least one TenantTimePolicy with traffic (or agents that
# export their per-tenant counters at 0 from the start); the operator panels need --operator.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHART=$(cd "$HERE/.." && pwd)
ROOT=$(cd "$CHART/../.." && pwd)
AGENTS=()
OPERATOR=
PORT=
KEEP=0
while (($#)); do
  case $1 in
  --agent)
    AGENTS+=("$2")
    shift 2
    ;;
  --operator)
    OPERATOR=$2
    shift 2
    ;;
  --port)
    PORT=$2
    shift 2
    ;;
  --keep)
    KEEP=1
    shift
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
  esac
done
((${#AGENTS[@]} > 0)) || {
  echo "prometheus-e2e: give at least one --agent ADDR" >&2
  exit 2
}
command -v prometheus >/dev/null || {
  echo "prometheus-e2e: prometheus not found (apt-get install prometheus, service start blocked)" >&2
  exit 1
}
[[ -n $PORT ]] || PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

WORK=$(mktemp -d)
PROM_PID=
cleanup() {
  if ((KEEP == 0)); then
    [[ -z $PROM_PID ]] || kill "$PROM_PID" 2>/dev/null || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

echo "==> promtool check metrics on the live targets"
urls=()
for a in "${AGENTS[@]}" ${OPERATOR:+"$OPERATOR"}; do urls+=("http://$a/metrics"); done
"$ROOT/scripts/chart-check.sh" metrics "${urls[@]}"

echo "==> Prometheus on 127.0.0.1:$PORT (data and config in $WORK)"
{
  echo "global: {scrape_interval: 5s, scrape_timeout: 4s, evaluation_interval: 5s}"
  echo "rule_files: ['$CHART/files/alerts.yaml']"
  echo "scrape_configs:"
  echo "  - job_name: stratum-agent"
  echo "    static_configs:"
  echo "      - targets: [$(printf "'%s'," "${AGENTS[@]}" | sed 's/,$//')]"
  if [[ -n $OPERATOR ]]; then
    echo "  - job_name: stratum-operator"
    echo "    static_configs:"
    echo "      - targets: ['$OPERATOR']"
  fi
} >"$WORK/prometheus.yml"
promtool check config "$WORK/prometheus.yml"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!

want=$((${#AGENTS[@]} + ${OPERATOR:+1}))
query() { curl -fsS --max-time 3 "http://127.0.0.1:$PORT/api/v1/query" --data-urlencode "query=$1" 2>/dev/null || true; }
scalar() { python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)' 2>/dev/null || echo 0; }
for ((i = 0; i < 120; i++)); do
  kill -0 "$PROM_PID" 2>/dev/null || {
    tail -20 "$WORK/prometheus.log" >&2
    exit 1
  }
  ready=$(query 'count(count_over_time(up[2m]) >= 3 and up == 1)' | scalar)
  [[ $ready == "$want" ]] && break
  sleep 1
done
if [[ $ready != "$want" ]]; then
  echo "prometheus-e2e: only $ready of $want targets up; target health:" >&2
  curl -fsS "http://127.0.0.1:$PORT/api/v1/targets" | python3 -c '
import json, sys
for t in json.load(sys.stdin)["data"]["activeTargets"]:
    print("  ", t["labels"]["job"], t["scrapeUrl"], t["health"], t.get("lastError", ""))' >&2
  exit 1
fi
echo "    $ready targets up"

echo "==> every dashboard query returns data"
"$ROOT/scripts/chart-check.sh" dashboard-queries "http://127.0.0.1:$PORT"

echo "==> alerts evaluated by Prometheus (for information)"
curl -fsS "http://127.0.0.1:$PORT/api/v1/alerts" | python3 -c '
import json, sys
alerts = json.load(sys.stdin)["data"]["alerts"]
for a in alerts:
    print("   ", a["state"], a["labels"]["alertname"], {k: v for k, v in a["labels"].items() if k != "alertname"})
print("    %d alert(s) pending or firing" % len(alerts))'

if ((KEEP)); then
  echo "prometheus-e2e: Prometheus keeps running: pid $PROM_PID, http://127.0.0.1:$PORT (files in $WORK)"
fi
