#!/usr/bin/env bash
# `make demo`: the whole system on a local control plane — the chart installed with helm (its
# operator pods run as real processes), three fake nodes with real agents, a real node (kubelet,
# containerd, kube-proxy, CoreDNS) running an agent container and a real pod per tenant, upstream NTP servers (one
# lying), a Prometheus scraping them, a TimeService and two tenants — then a short tour, and it
# keeps running until Ctrl-C, when it cleans up everything it started.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

sleeper=""
cleanup() {
  say "cleaning up"
  if [[ -n $sleeper ]]; then kill "$sleeper" 2>/dev/null || true; fi
  e2e/stack.sh down || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

e2e/stack.sh down >/dev/null 2>&1 || true
say "starting the control plane, nodes, upstreams, operator and agents (first run builds them: be patient)"
e2e/stack.sh up
eval "$(e2e/stack.sh env)"

say "creating a TimeService and two tenants"
# The production pod spec on a software clock (discipline.clock: Simulated): the real node's
# kubelet runs the agent image unchanged, and this machine's clock never moves.
kubectl apply -f - <<YAML
apiVersion: stratum.io/v1alpha1
kind: TimeService
metadata:
  name: cluster-time
spec:
  upstreams:
    - {host: 10.77.1.1, minPoll: 4, maxPoll: 6}
    - {host: 10.77.1.2, minPoll: 4, maxPoll: 6}
    - {host: 10.77.1.3, minPoll: 4, maxPoll: 6}
    - {host: 10.77.1.9, minPoll: 4, maxPoll: 6}   # runs 30 s fast: a falseticker
  selection: {minSources: 2}
  discipline:
    makeStep: {threshold: 128ms, limit: 3}
    clock: Simulated
    driftDirectory: $STRATUM_E2E_RUN_DIR/node/host/var/lib/stratum
  placement:
    nodeSelector: {kubernetes.io/os: linux}
    tolerations: [{key: stratum.e2e/real-node, operator: Exists, effect: NoSchedule}]
  agent: {image: "localhost/stratum/agent:dev", imagePullPolicy: Never}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-a, labels: {tenant: team-a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-b, labels: {tenant: team-b}}
---
apiVersion: stratum.io/v1alpha1
kind: TenantTimePolicy
metadata: {name: ntp, namespace: team-a}
spec:
  timezone: Europe/Berlin
  rateLimit: {kissOfDeath: true}
  # Closest: the real node's own agent, or another node's when it is not ready.
  service: {routing: Closest}
---
apiVersion: stratum.io/v1alpha1
kind: TenantTimePolicy
metadata: {name: ntp, namespace: team-b}
spec:
  rateLimit: {kissOfDeath: true}
---
apiVersion: v1
kind: Pod
metadata: {name: workload, namespace: team-a}
spec:
  nodeName: kwok-node-0
  containers: [{name: app, image: registry.example.invalid/app}]
---
apiVersion: v1
kind: Pod
metadata: {name: workload, namespace: team-b}
spec:
  nodeName: kwok-node-1
  containers: [{name: app, image: registry.example.invalid/app}]
YAML
# A real pod per tenant on the real node, from the ntp-client image (chrony, ntpsec's ntpdig).
for ns in team-a team-b; do
  kubectl apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: $ns}
spec:
  nodeName: $STRATUM_E2E_REAL_NODE
  tolerations: [{key: stratum.e2e/real-node, operator: Exists, effect: NoSchedule}]
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: localhost/stratum/ntp-client:dev, imagePullPolicy: Never, command: [sleep, "1000000"]}]
YAML
done

say "waiting for every node to synchronize and both tenants to be ready"
kubectl wait tsvc/cluster-time --for=condition=Ready --timeout=120s
kubectl -n team-a wait ttp/ntp --for=condition=Ready --timeout=120s
kubectl -n team-b wait ttp/ntp --for=condition=Ready --timeout=120s

say "the tour"
run kubectl get timeservices,nodeclocks
run kubectl get tenanttimepolicies -A
run kubectl -n team-a get service,endpointslices
run kubectl -n team-a get configmap time-config -o jsonpath='{.data}'
echo

# Each tenant pod's address becomes a network namespace, so a query really comes from it.
# shellcheck source=scripts/common.sh
source e2e/scripts/common.sh
# shellcheck source=scripts/netns.sh
source e2e/scripts/netns.sh
ip_a=$(kubectl -n team-a get pod workload -o jsonpath='{.status.podIP}')
ip_b=$(kubectl -n team-b get pod workload -o jsonpath='{.status.podIP}')
netns_add e2e-demo-team-a "$ip_a"
netns_add e2e-demo-team-b "$ip_b"
port_a=$(kubectl -n team-a get ttp ntp -o jsonpath='{.status.port}')
node_ip=$(kubectl get node kwok-node-0 -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')

say "team-a's workload ($ip_a) asks the agent on its node ($node_ip:$port_a): served"
run ip netns exec e2e-demo-team-a "$STRATUM_E2E_TARGET/stratumctl" query "$node_ip:$port_a" || true
say "team-b's workload ($ip_b) asks team-a's port: refused (Kiss-o'-Death DENY, or no answer)"
run ip netns exec e2e-demo-team-b "$STRATUM_E2E_TARGET/stratumctl" query --timeout 1 "$node_ip:$port_a" || true
kubectl -n team-a wait pod/client --for=condition=Ready --timeout=60s
kubectl -n team-b wait pod/client --for=condition=Ready --timeout=60s
say "team-a's real pod on $STRATUM_E2E_REAL_NODE asks ntp.team-a.svc.cluster.local (CoreDNS, kube-proxy): served"
run kubectl -n team-a get service ntp
run kubectl -n team-a exec client -- cat /etc/resolv.conf
e2e_wait_for "team-a's real pod in team-a's allow list" 30 \
  kubectl -n team-a exec client -- ntpdig -t 1 ntp.team-a.svc.cluster.local || true
run kubectl -n team-a exec client -- ntpdig -t 2 ntp.team-a.svc.cluster.local || true
run kubectl -n team-a exec client -- chronyd -d -Q -t 10 -u root \
  "server ntp.team-a.svc.cluster.local iburst maxsamples 4" "pidfile /tmp/chronyd.pid" "cmdport 0" || true
say "team-b's real pod asks team-a's Service by name: refused (Kiss-o'-Death DENY)"
run kubectl -n team-b exec client -- ntpdig -t 2 ntp.team-a.svc.cluster.local || true
say "the agent container on $STRATUM_E2E_REAL_NODE (the image of make images, run by its kubelet)"
run kubectl -n stratum-system get pods -l app.kubernetes.io/name=stratum-agent \
  --field-selector spec.nodeName="$STRATUM_E2E_REAL_NODE" -o wide
say "the agent on kwok-node-0, as stratumctl sees it"
run ip netns exec e2e-kwok-node-0 "$STRATUM_E2E_TARGET/stratumctl" sources || true

say "Prometheus (configured from the chart's PodMonitor, ServiceMonitor and PrometheusRule): $STRATUM_E2E_PROMETHEUS"
e2e_wait_for "Prometheus to have scraped the agents and operators" 60 bash -c \
  "promtool query instant '$STRATUM_E2E_PROMETHEUS' 'count(up == 1) >= 6' | grep -q ." || true
run promtool query instant "$STRATUM_E2E_PROMETHEUS" \
  'stratum_agent_offset_seconds * on(job, instance) group_left(node) stratum_agent_info' || true
run promtool query instant "$STRATUM_E2E_PROMETHEUS" 'stratum_operator_leader' || true
say "the release"
run helm list -n stratum-system
run kubectl -n stratum-system get pods -o wide

say "running; Ctrl-C stops and cleans up everything (logs: $STRATUM_E2E_STACK)"
# `wait` returns as soon as a signal arrives (a foreground sleep would delay the trap, and
# so the cleanup, until it ended).
while true; do
  sleep 3600 &
  sleeper=$!
  wait "$sleeper" || true
done
