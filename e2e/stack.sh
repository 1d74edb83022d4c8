#!/usr/bin/env bash
# The whole Stratum stack on a real control plane, for `make e2e` and `make demo`:
#
#   e2e/stack.sh up      build what is missing, start the control plane, 3 kwok nodes with network
#                        namespaces, one real node (scripts/node.sh: containerd, kubelet,
#                        kube-proxy, CoreDNS; tainted, so only pods that ask land there),
#                        upstream NTP servers (3 chronyd -x + 1 falseticker shifted by
#                        libfaketime) in namespaces of their own, `helm install` of the chart (CRDs,
#                        operator Deployment, RBAC, admission policy, monitoring objects), a real
#                        Prometheus configured from the installed monitoring objects, and the
#                        kubelet stand-in that runs the real operator for every operator pod (with
#                        its ServiceAccount's pod-bound token) and a real agent for every agent pod
#   e2e/stack.sh down    stop everything `up` started (by PID), then the control plane
#   e2e/stack.sh env     the variables tests and demos use (eval it)
#
# Nothing here can change this machine's clock: every process runs without CAP_SYS_TIME,
# agents use the simulated clock, chronyd runs with -x. All traffic stays on loopback and in
# namespaces on a bridge with no uplink; the test ranges are blackholed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPTS=$ROOT/e2e/scripts
# shellcheck source=scripts/common.sh
source "$SCRIPTS/common.sh"
# shellcheck source=scripts/netns.sh
source "$SCRIPTS/netns.sh"

STACK=$E2E_RUN_DIR/stack
NODES=${STRATUM_E2E_NODES:-3}
UPSTREAMS=(10.77.1.1 10.77.1.2 10.77.1.3)
FALSETICKER=10.77.1.9
# Where cargo puts binaries: ask cargo, so CARGO_TARGET_DIR and .cargo/config.toml both count.
TARGET=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug
RELEASE=stratum
RELEASE_NAMESPACE=stratum-system
REAL_NODE=${E2E_REAL_NODE_NAME:-node-real}
PROMETHEUS_PORT=${E2E_PROMETHEUS_PORT:-19090}
CHART_TOOLS=$ROOT/charts/stratum/tests/chart_tools.py
# Helm's caches and config stay in the run directory, not the user's home.
export HELM_CACHE_HOME=$E2E_RUN_DIR/helm/cache HELM_CONFIG_HOME=$E2E_RUN_DIR/helm/config HELM_DATA_HOME=$E2E_RUN_DIR/helm/data
NO_SYS_TIME=(setpriv --bounding-set=-sys_time --inh-caps=-sys_time)

log() { e2e_log "stack: $*"; }

start_bg() { # start_bg NAME CMD... — runs in the background, PID recorded for `down`
  local name=$1
  shift
  "$@" >"$STACK/$name.log" 2>&1 &
  echo $! >"$STACK/$name.pid"
}

stop_pid() { # stop_pid NAME
  local f=$STACK/$1.pid pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

chronyd_in_netns() { # chronyd_in_netns NAME ADDR [FAKETIME_OFFSET]
  local name=$1 addr=$2 fake=${3:-} conf
  conf=$STACK/$name.conf
  cat >"$conf" <<CONF
port 123
bindaddress $addr
cmdport 0
local stratum 1
allow 10.77.0.0/16
allow 10.78.0.0/16
pidfile $STACK/$name.chronyd.pid
driftfile $STACK/$name.drift
CONF
  netns_add "$name" "$addr"
  if [[ -n $fake ]]; then
    # Preloaded directly: the faketime wrapper forks, and stopping it would orphan chronyd.
    start_bg "$name" ip netns exec "$name" "${NO_SYS_TIME[@]}" env \
      LD_PRELOAD=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 FAKETIME="$fake" DONT_FAKE_MONOTONIC=1 \
      chronyd -x -d -f "$conf"
  else
    start_bg "$name" ip netns exec "$name" "${NO_SYS_TIME[@]}" chronyd -x -d -f "$conf"
  fi
}

# Network state a killed run (of this or another clone) left behind: namespaces, veths, the
# bridge and the blackholes are kernel objects that outlive their processes. Only touched when
# no cluster of ours answers, so a running stack is never disturbed.
reset_stale() {
  if e2e_bridge_up && curl -sk --max-time 2 "https://$E2E_HOST_IP:$E2E_APISERVER_PORT/readyz" >/dev/null 2>&1; then
    return 0
  fi
  local ns link r
  # The real node's processes, mounts and cgroups (its PID files tell which are ours).
  "$SCRIPTS/node.sh" down || true
  for ns in $(ip netns list | awk '$1 ~ /^e2e-/ {print $1}'); do
    log "removing stale network namespace $ns"
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  for link in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^e2e[0-9a-f]{8}$' || true); do
    ip link del "$link" 2>/dev/null || true
  done
  if ip link show "$E2E_BRIDGE" >/dev/null 2>&1; then ip link del "$E2E_BRIDGE" 2>/dev/null || true; fi
  for r in $E2E_TEST_RANGES; do
    if ip -4 route show exact "$r" table main | grep -q '^blackhole'; then
      ip route del blackhole "$r" 2>/dev/null || true
    fi
  done
  rm -rf "$E2E_NETNS_STATE"
}

# The real node's kubelet evicts and refuses pods under DiskPressure (evictionHard
# nodefs.available 1%, node.sh), and etcd, containerd and pod logs all write under the run
# dir. Say so up front rather than as a pod that never becomes Ready twenty minutes later.
check_free_disk() {
  local need_mib=4096 avail_mib
  avail_mib=$(df -Pm "$E2E_RUN_DIR" | awk 'NR==2{print $4}')
  ((avail_mib >= need_mib)) ||
    e2e_die "only ${avail_mib} MiB free under $E2E_RUN_DIR; the stack needs ${need_mib} MiB (etcd, images, pod logs) and the real node's kubelet refuses pods under disk pressure"
}

cmd_up() {
  mkdir -p "$STACK"
  reset_stale
  check_free_disk
  log "building the control plane binaries if missing (cold: ~10 min on 2 quiet cores, progress below)"
  "$SCRIPTS/deps.sh"
  BIN=$("$SCRIPTS/build-bins.sh" | sed -n 's/^BIN=//p' | tail -1)
  [[ -x $BIN/kube-apiserver ]] || e2e_die "build-bins.sh did not produce kube-apiserver"
  echo "$BIN" >"$STACK/bin"
  log "building stratum-agent, stratum-operator, stratumctl and the kubelet stand-in"
  (cd "$ROOT" && cargo build -q -p stratum-agent -p stratum-operator -p stratum-e2e --bins)

  "$SCRIPTS/cluster.sh" up
  "$SCRIPTS/nodes.sh" create "$NODES" --netns
  log "the real node (containerd, kubelet, kube-proxy, CoreDNS)"
  "$SCRIPTS/node.sh" up
  local kubectl=("$BIN/kubectl" --kubeconfig "$E2E_RUN_DIR/kubeconfig")
  for i in $(seq 0 $((NODES - 1))); do
    "${kubectl[@]}" label node "kwok-node-$i" kubernetes.io/os=linux --overwrite >/dev/null
  done

  log "upstreams: chronyd -x at ${UPSTREAMS[*]}, falseticker (+30 s) at $FALSETICKER"
  local i=1
  for addr in "${UPSTREAMS[@]}"; do
    chronyd_in_netns "e2e-upstream-$i" "$addr"
    i=$((i + 1))
  done
  chronyd_in_netns e2e-falseticker "$FALSETICKER" "+30s"

  log "prometheus-operator's monitoring kinds (stand-in CRDs, e2e/chart/monitoring-crds.yaml)"
  "${kubectl[@]}" apply --server-side -f "$ROOT/e2e/chart/monitoring-crds.yaml" >/dev/null
  "${kubectl[@]}" wait --for=condition=Established crd --all --timeout=60s >/dev/null

  log "helm install $RELEASE (the chart's CRDs, operator, RBAC, admission policy, monitoring)"
  local t0
  t0=$(date +%s%N)
  "$BIN/helm" install "$RELEASE" "$ROOT/charts/stratum" --kubeconfig "$E2E_RUN_DIR/kubeconfig" \
    --namespace "$RELEASE_NAMESPACE" --create-namespace -f "$ROOT/e2e/chart/values.yaml" >"$STACK/helm-install.log"
  echo $((($(date +%s%N) - t0) / 1000000)) >"$STACK/helm-install.ms"
  log "installed in $(cat "$STACK/helm-install.ms") ms"
  "${kubectl[@]}" wait --for=condition=Established crd --all --timeout=60s >/dev/null

  log "Prometheus on 127.0.0.1:$PROMETHEUS_PORT, configured from the installed monitors and rules"
  local prom=$STACK/prometheus
  # A fresh TSDB and no stand-in files of an earlier run's pods: figures are this run's.
  rm -rf "$prom" "$STACK/pods"
  mkdir -p "$prom"
  echo '[]' >"$prom/targets.json"
  "${kubectl[@]}" -n "$RELEASE_NAMESPACE" get podmonitors,servicemonitors,prometheusrules,services -o yaml >"$prom/monitoring.yaml"
  python3 "$CHART_TOOLS" prometheus-config "$prom/monitoring.yaml" "$prom/targets.json" "$prom/rules.yaml" "$prom/prometheus.yml" >/dev/null
  promtool check config "$prom/prometheus.yml" >/dev/null
  start_bg prometheus "${NO_SYS_TIME[@]}" prometheus --config.file="$prom/prometheus.yml" \
    --storage.tsdb.path="$prom/data" --web.listen-address="127.0.0.1:$PROMETHEUS_PORT"

  log "kubelet stand-in: the operator for every operator pod, an agent for every agent pod"
  start_bg kubelet env KUBECONFIG="$E2E_RUN_DIR/kubeconfig" "$TARGET/stratum-e2e-kubelet" \
    --agent-bin "$TARGET/stratum-agent" --operator-bin "$TARGET/stratum-operator" \
    --netns-script "$SCRIPTS/netns.sh" --targets-file "$prom/targets.json" \
    --run-dir "$STACK" --ca-file "$E2E_RUN_DIR/pki/ca.crt" \
    --apiserver "$E2E_HOST_IP:$E2E_APISERVER_PORT" --apiserver-proxy "$E2E_HOST_IP:$E2E_APISERVER_PORT" \
    --real-node "$REAL_NODE"
  E2E_WAIT_PIDFILE=$STACK/prometheus.pid e2e_wait_for "Prometheus /-/ready" 60 \
    curl -sf "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"
  E2E_WAIT_PIDFILE=$STACK/kubelet.pid e2e_wait_for "every operator pod ready and a leader elected" 120 operators_ready
  log "stack up; logs in $STACK"
}

# Every replica of the operator Deployment answers /readyz on its pod IP, and one of them holds
# the leader Lease.
operators_ready() {
  local kubectl=("$BIN/kubectl" --kubeconfig "$E2E_RUN_DIR/kubeconfig" -n "$RELEASE_NAMESPACE") want ips ip holder
  want=$("${kubectl[@]}" get deployment "$RELEASE-operator" -o jsonpath='{.spec.replicas}')
  ips=$("${kubectl[@]}" get pods -l app.kubernetes.io/name=stratum-operator -o jsonpath='{.items[*].status.podIP}')
  [[ $(wc -w <<<"$ips") == "$want" ]] || return 1
  for ip in $ips; do curl -sf --max-time 2 "http://$ip:8080/readyz" >/dev/null || return 1; done
  holder=$("${kubectl[@]}" get lease stratum-operator-leader -o jsonpath='{.spec.holderIdentity}')
  [[ -n $holder ]]
}

cmd_down() {
  stop_pid kubelet
  # Mount targets the stand-in kubelet had to create for Secret volumes (their mounts lived
  # in the agents' own mount namespaces, gone with them): removed while still empty.
  if [[ -f $STACK/mount-points ]]; then
    while read -r top; do
      [[ -d $top ]] && find "$top" -depth -type d -empty -delete
    done <"$STACK/mount-points"
    rm -f "$STACK/mount-points"
  fi
  stop_pid prometheus
  for name in e2e-falseticker e2e-upstream-1 e2e-upstream-2 e2e-upstream-3; do
    stop_pid "$name"
    if [[ -f $E2E_NETNS_STATE/$name ]]; then netns_del "$name"; fi
  done
  "$SCRIPTS/node.sh" down
  "$SCRIPTS/cluster.sh" down
}

cmd_env() {
  local bin
  bin=$(cat "$STACK/bin" 2>/dev/null || "$SCRIPTS/build-bins.sh" --print-bin-dir)
  cat <<ENV
export KUBECONFIG=$E2E_RUN_DIR/kubeconfig
export PATH=$bin:\$PATH
export STRATUM_E2E_RUN_DIR=$E2E_RUN_DIR
export STRATUM_E2E_STACK=$STACK
export STRATUM_E2E_BIN=$bin
export STRATUM_E2E_UPSTREAMS="${UPSTREAMS[*]}"
export STRATUM_E2E_FALSETICKER=$FALSETICKER
export STRATUM_E2E_TARGET=$TARGET
export STRATUM_E2E_PROMETHEUS=http://127.0.0.1:$PROMETHEUS_PORT
export STRATUM_E2E_RELEASE=$RELEASE
export HELM_CACHE_HOME=$HELM_CACHE_HOME HELM_CONFIG_HOME=$HELM_CONFIG_HOME HELM_DATA_HOME=$HELM_DATA_HOME
export STRATUM_E2E_SCRIPTS=$SCRIPTS
ENV
  "$SCRIPTS/node.sh" env
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  *) echo "usage: e2e/stack.sh up|down|env" >&2; exit 2 ;;
esac
