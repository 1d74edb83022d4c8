#!/usr/bin/env bash
# Smoke test of the e2e control plane: real server version, readiness, kwok nodes with their own
# InternalIPs, DaemonSet pods Running with pod IPs (normal and hostNetwork), EndpointSlices (filled by
# the controller for a selector Service, manual ones for a selector-less Service), a TCP connection
# from the host to an agent in a node's network namespace at the address its EndpointSlice lists,
# helm install of a local chart, and namespace deletion (namespace + garbage collector controllers).
#
# Usage: e2e/scripts/smoke.sh   (brings the cluster up and down itself unless it is already up;
#                               needs root for the namespaces; ends with "N passed, N failed")
set -Eeuo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=netns.sh
source "$E2E_SCRIPTS_DIR/netns.sh"

BIN=$E2E_BIN_DIR
RUN=$E2E_RUN_DIR
S=$E2E_SCRIPTS_DIR
NODES=${E2E_SMOKE_NODES:-2}
NS=smoke
passed=0 failed=0
kc() { "$BIN/kubectl" --kubeconfig="$RUN/kubeconfig" "$@"; }
check() { # check DESCRIPTION CMD...
  local what=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
    e2e_log "PASS $what"
  else
    failed=$((failed + 1))
    e2e_log "FAIL $what"
  fi
}
eq() { [[ $1 == "$2" ]] || { e2e_log "     got '$1', want '$2'"; return 1; }; }

owned=0
if ! "$S/cluster.sh" status >/dev/null 2>&1; then
  "$S/cluster.sh" up
  owned=1
fi
# Nodes that exist already (a developer's) are reused and left alone; only new ones are deleted.
mapfile -t nodes_before < <(kc get nodes -l type=kwok -o name 2>/dev/null | sed 's|^node/||')
cleanup() {
  local n new=()
  kc delete namespace "$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  for ((n = 0; n < NODES; n++)); do
    [[ " ${nodes_before[*]} " == *" kwok-node-$n "* ]] || new+=("kwok-node-$n")
  done
  ((${#new[@]} == 0)) || "$S/nodes.sh" delete "${new[@]}" >/dev/null 2>&1 || true
  if ((owned)); then "$S/cluster.sh" down; fi
}
trap cleanup EXIT
T0=$(date +%s%N)

# --- versions and readiness
ver=$(kc version -o json)
server=$(sed -n '/serverVersion/,/}/s/.*"gitVersion": "\(.*\)".*/\1/p' <<<"$ver")
client=$(sed -n '/clientVersion/,/}/s/.*"gitVersion": "\(.*\)".*/\1/p' <<<"$ver")
check "kubectl version: server $server" eq "$server" "$E2E_K8S_VERSION"
check "kubectl version: client $client" eq "$client" "$E2E_K8S_VERSION"
check "/readyz" eq "$(kc get --raw=/readyz)" ok
check "/version gitVersion" grep -q "\"gitVersion\": \"$E2E_K8S_VERSION\"" <<<"$(kc get --raw=/version)"
hv=$("$BIN/helm" version --template '{{.Version}}')
check "helm version $hv" eq "$hv" "$E2E_HELM_VERSION"

# --- fake nodes, each with a namespace owning its InternalIP
"$S/nodes.sh" create "$NODES" --netns
for ((i = 0; i < NODES; i++)); do
  check "node kwok-node-$i Ready" eq "$(kc get node "kwok-node-$i" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" True
  check "node kwok-node-$i InternalIP" eq "$(kc get node "kwok-node-$i" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')" "$("$S/nodes.sh" ip "$i")"
done

# DaemonSets cover every node, including any that existed before.
ALL=$(kc get nodes -o name | grep -c .)

# --- DaemonSets (image never pulled: kwok fakes the containers)
kc create namespace "$NS" >/dev/null
e2e_wait_for "default ServiceAccount in $NS" 30 kc -n "$NS" get serviceaccount default
for mode in pod host; do
  hn=false
  [[ $mode == host ]] && hn=true
  kc -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent-$mode}
spec:
  selector: {matchLabels: {app: agent-$mode}}
  template:
    metadata: {labels: {app: agent-$mode}}
    spec:
      hostNetwork: $hn
      containers:
      - {name: agent, image: registry.invalid/stratum/agent:e2e, ports: [{containerPort: 123, protocol: UDP, name: ntp}]}
EOF
done
for mode in pod host; do
  check "DaemonSet agent-$mode rolled out" kc -n "$NS" rollout status ds/"agent-$mode" --timeout=60s
  check "DaemonSet agent-$mode numberReady=$ALL" eq "$(kc -n "$NS" get ds "agent-$mode" -o jsonpath='{.status.numberReady}')" "$ALL"
done
while read -r name phase node ip; do
  if [[ $name == agent-host-* ]]; then
    want=$(kc get node "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
  else want=""; fi
  check "pod $name Running on $node" eq "$phase" Running
  if [[ -n $want ]]; then
    check "hostNetwork pod $name has node IP $want" eq "$ip" "$want"
  else
    cidr=$(kc get node "$node" -o jsonpath='{.spec.podCIDR}')
    check "pod $name IP $ip in node podCIDR $cidr" e2e_in_cidr "$ip" "$cidr"
  fi
done < <(kc -n "$NS" get pods -o jsonpath='{range .items[*]}{.metadata.name} {.status.phase} {.spec.nodeName} {.status.podIP}{"\n"}{end}')

# --- EndpointSlices: controller-filled for a selector Service ...
kc -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: agents-auto}
spec:
  selector: {app: agent-host}
  ports: [{name: ntp, port: 123, protocol: UDP}]
EOF
count_ready() {
  kc -n "$NS" get endpointslices -l "kubernetes.io/service-name=$1" \
    -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{"\n"}{end}' | grep -c . || true
}
ready_count_is() { [[ $(count_ready "$1") == "$2" ]]; }
check "EndpointSlice of agents-auto filled by the controller with $ALL ready endpoints" \
  e2e_wait_for "EndpointSlice agents-auto has $ALL ready endpoints" 30 ready_count_is agents-auto "$ALL"
svcip=$(kc -n "$NS" get service agents-auto -o jsonpath='{.spec.clusterIP}')
check "ClusterIP $svcip in $E2E_SVC_RANGE" e2e_in_cidr "$svcip" "$E2E_SVC_RANGE"

# ... and manual ones for a selector-less Service (what the operator's own EndpointSlices look like).
addrs=""
for ((i = 0; i < NODES; i++)); do addrs+="  - {addresses: [\"$("$S/nodes.sh" ip "$i")\"], conditions: {ready: true}, nodeName: kwok-node-$i}"$'\n'; done
kc -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: agents-manual}
spec:
  ports: [{name: probe, port: 18123, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: agents-manual-1
  labels: {kubernetes.io/service-name: agents-manual, endpointslice.kubernetes.io/managed-by: stratum-e2e}
addressType: IPv4
ports: [{name: probe, port: 18123, protocol: TCP}]
endpoints:
$addrs
EOF
check "manual EndpointSlice of agents-manual lists $NODES endpoints" eq "$(count_ready agents-manual)" "$NODES"

# --- an agent in kwok-node-0's namespace, reached at the address its EndpointSlice lists
ep=$(kc -n "$NS" get endpointslice agents-manual-1 -o jsonpath='{.endpoints[0].addresses[0]}')
out=$RUN/smoke-nc.out
netns_exec e2e-kwok-node-0 nc -l "$ep" 18123 >"$out" &
ncpid=$!
e2e_wait_for "agent listening at $ep:18123" 5 netns_exec e2e-kwok-node-0 grep -qi "$(printf ':%04X ' 18123)" /proc/net/tcp
echo "hello-agent" | nc -N -w2 "$ep" 18123 || true
wait "$ncpid" || true
check "host -> agent at EndpointSlice address $ep:18123" eq "$(cat "$out")" hello-agent
rm -f "$out"

# --- helm: install a locally generated chart (no repository access)
tmp=$(mktemp -d)
"$BIN/helm" create "$tmp/hello" >/dev/null
check "helm install --wait of a local chart" "$BIN/helm" --kubeconfig "$RUN/kubeconfig" -n "$NS" install hello "$tmp/hello" \
  --set image.repository=registry.invalid/hello --set image.tag=e2e --wait --timeout 90s
check "helm list shows hello deployed" grep -q deployed <<<"$("$BIN/helm" --kubeconfig "$RUN/kubeconfig" -n "$NS" list)"
rm -rf "$tmp"

# --- namespace deletion (namespace controller, garbage collector)
kc delete namespace "$NS" --wait=false >/dev/null
check "namespace $NS deleted" kc wait --for=delete namespace/"$NS" --timeout=90s

e2e_log "smoke finished in $((($(date +%s%N) - T0) / 1000000)) ms"
echo "smoke: $passed passed, $failed failed"
((failed == 0))
