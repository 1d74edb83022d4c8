#!/usr/bin/env bash
# Fake kwok nodes with distinct InternalIPs in the test node range, for a cluster from cluster.sh.
#
# Usage:
#   e2e/scripts/nodes.sh create N [--netns]   nodes kwok-node-0..N-1 (N <= 240), wait until Ready;
#                                             --netns also gives each node a network namespace
#                                             e2e-kwok-node-<i> that owns its InternalIP (netns.sh)
#   e2e/scripts/nodes.sh delete [NAME...]     delete the named nodes, default all labelled type=kwok
#                                             (and their namespaces)
#   e2e/scripts/nodes.sh ip I                 print node I's InternalIP
#   e2e/scripts/nodes.sh list                 name, InternalIP, podCIDR, Ready of each fake node
#
# Node i: InternalIP 10.77.0.(10+i), Hostname kwok-node-<i>, spec.podCIDR 10.78.i.0/24 (kwok hands
# out pod IPs from it; hostNetwork pods get the InternalIP). The addresses are set when the node is
# created; kwok's node-initialize stage only fills addresses a node lacks, and cluster.sh runs kwok
# without --node-ip, so nothing replaces them (nodes.sh create checks that after Ready).
set -Eeuo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=netns.sh
source "$E2E_SCRIPTS_DIR/netns.sh"

BIN=$E2E_BIN_DIR
RUN=$E2E_RUN_DIR
E2E_NODE_PREFIX=${E2E_NODE_PREFIX:-kwok-node}
kc() { "$BIN/kubectl" --kubeconfig="$RUN/kubeconfig" "$@"; }

node_ip() { e2e_int2ip $(($(e2e_ip2int "${E2E_NODE_RANGE%/*}") + 10 + $1)); }
node_pod_cidr() { # 10.78.0.0/16 -> 10.78.<i>.0/24
  echo "$(e2e_int2ip $(($(e2e_ip2int "${E2E_POD_RANGE%/*}") + ($1 << 8))))/24"
}

cmd_create() {
  local n=$1 with_netns=${2:-} i name ip cidr got t0
  if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 1 || n > 240)); then e2e_die "nodes.sh create N: N must be 1..240"; fi
  [[ -f $RUN/kubeconfig ]] || e2e_die "no cluster in $RUN (run cluster.sh up)"
  t0=$(date +%s%N)
  for ((i = 0; i < n; i++)); do
    name=$E2E_NODE_PREFIX-$i
    ip=$(node_ip "$i")
    cidr=$(node_pod_cidr "$i")
    # Idempotent: an existing node (e.g. from an earlier `create`) is kept as it is.
    if kc get node "$name" >/dev/null 2>&1; then
      e2e_log "node $name exists; keeping it"
    else
      # The kubelet registers a node with its status in the create request, and the apiserver
      # keeps it; we do the same so the addresses exist before kwok first sees the node.
      kc create -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: $name
    stratum.e2e/node-index: "$i"
spec:
  podCIDR: $cidr
  podCIDRs: [$cidr]
status:
  addresses:
  - {type: InternalIP, address: $ip}
  - {type: Hostname, address: $name}
EOF
    fi
    # The namespace itself decides, not its state file: a file left by a run whose namespaces
    # went away (a crash, a reboot) must not leave the node's agents without their address.
    if [[ $with_netns == --netns ]] && ! netns_exists "e2e-$name"; then
      if [[ -f $E2E_NETNS_STATE/e2e-$name ]]; then netns_del "e2e-$name"; fi
      netns_add "e2e-$name" "$ip"
    fi
  done
  kc wait --for=condition=Ready node -l type=kwok --timeout=60s >/dev/null
  for ((i = 0; i < n; i++)); do
    name=$E2E_NODE_PREFIX-$i
    got=$(kc get node "$name" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
    [[ $got == "$(node_ip "$i")" ]] || e2e_die "node $name has InternalIP '$got', expected $(node_ip "$i")"
  done
  e2e_log "$n kwok node(s) Ready with their own InternalIPs in $((($(date +%s%N) - t0) / 1000000)) ms"
  cmd_list
}

cmd_delete() { # [NAME...]; default: every node labelled type=kwok
  local name names=("$@")
  if ((${#names[@]} == 0)); then
    mapfile -t names < <(kc get nodes -l type=kwok -o name 2>/dev/null | sed 's|^node/||')
  fi
  for name in "${names[@]}"; do
    kc delete node "$name" --wait=false >/dev/null
    if [[ -f $E2E_NETNS_STATE/e2e-$name ]]; then netns_del "e2e-$name"; fi
  done
}

cmd_list() {
  kc get nodes -l type=kwok -o custom-columns='NAME:.metadata.name,INTERNAL-IP:.status.addresses[?(@.type=="InternalIP")].address,POD-CIDR:.spec.podCIDR,READY:.status.conditions[?(@.type=="Ready")].status'
}

case "${1:-}" in
  create) cmd_create "${2:?usage: nodes.sh create N [--netns]}" "${3:-}" ;;
  delete) shift; cmd_delete "$@" ;;
  ip) node_ip "${2:?usage: nodes.sh ip I}" ;;
  list) cmd_list ;;
  *)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    [[ ${1:-} == -h || ${1:-} == --help ]] || exit 2
    ;;
esac
