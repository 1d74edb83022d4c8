#!/usr/bin/env bash
# The chart's NodeClock admission policy on a real API server: an agent may create and update
# only the NodeClock named after its own node, with a pod-bound token; everything else is
# refused with the policy's message. (Issue 7, "must show" 2.)
#
# Usage:
#   KUBECONFIG=<admin kubeconfig> charts/stratum/tests/vap-e2e.sh [--namespace NS] [--no-setup] [NODE_A NODE_B]
#
#   --namespace NS  the release namespace (default stratum-system): agents are ServiceAccounts
#                   `<timeservice>-agent` there
#   --no-setup      the chart is already installed (helm install); otherwise the script applies
#                   the CRDs, the agent ClusterRole and the admission policy itself, rendered
#                   with `helm template` ($HELM or helm on PATH), and leaves them in place
#   NODE_A NODE_B   two node names; default the first two Nodes, else two made-up names (the
#                   API server puts the pod's node name in the token even if no Node exists)
#
# What it does, as a real agent would (no impersonation): creates ServiceAccount
# `vaptest-agent` in NS, binds it to ClusterRole `stratum-agent` as the operator does, creates
# one pod per node with that ServiceAccount (spec.nodeName set, so no scheduler is needed), asks
# the TokenRequest API for pod-bound tokens, and sends NodeClock writes with each token using a
# kubeconfig that holds only that token. Cleans up what it created on exit.
# Needs: kubectl, and a cluster whose kube-apiserver signs service-account tokens.
set -Eeuo pipefail

NS=stratum-system
SETUP=1
NODES=()
while (($#)); do
  case $1 in
  --namespace)
    NS=$2
    shift 2
    ;;
  --no-setup)
    SETUP=0
    shift
    ;;
  -h | --help)
    sed -n '2,22p' "$0"
    exit 0
    ;;
  *)
    NODES+=("$1")
    shift
    ;;
  esac
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHART=$(cd "$HERE/.." && pwd)
TS=vaptest
SA=$TS-agent
PASSED=0
FAILED=0
WORK=$(mktemp -d)

log() { printf '%s\n' "$*"; }
pass() {
  PASSED=$((PASSED + 1))
  log "  PASS $*"
}
flunk() {
  FAILED=$((FAILED + 1))
  log "  FAIL $*"
}
die() {
  log "vap-e2e: $*" >&2
  exit 1
}

cleanup() {
  kubectl delete nodeclock "${NODES[@]}" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  kubectl -n "$NS" delete pod "$TS-a" "$TS-b" --ignore-not-found --force --grace-period=0 --wait=false >/dev/null 2>&1 || true
  kubectl delete clusterrolebinding "stratum-agent-$TS" --ignore-not-found >/dev/null 2>&1 || true
  kubectl -n "$NS" delete serviceaccount "$SA" --ignore-not-found >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v kubectl >/dev/null || die "kubectl not found"
kubectl get --raw /readyz >/dev/null || die "no API server (KUBECONFIG=${KUBECONFIG:-unset})"

if ((${#NODES[@]} == 0)); then
  mapfile -t NODES < <(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | head -2)
  ((${#NODES[@]} == 2)) || NODES=(vap-node-a vap-node-b)
fi
((${#NODES[@]} == 2)) || die "give exactly two node names"
A=${NODES[0]}
B=${NODES[1]}
log "vap-e2e: namespace $NS, nodes $A and $B"

# --------------------------------------------------------------------------------------------
if ((SETUP)); then
  helm=${HELM:-$(command -v helm || true)}
  [[ -n $helm ]] || die "helm not found (set HELM), or install the chart and pass --no-setup"
  log "setup: CRDs, ClusterRole stratum-agent and the admission policy from the chart"
  kubectl get namespace "$NS" >/dev/null 2>&1 || kubectl create namespace "$NS" >/dev/null
  kubectl apply --server-side -f "$CHART/crds/" >/dev/null
  kubectl wait --for=condition=Established crd/nodeclocks.stratum.io --timeout=30s >/dev/null
  server_version=$(kubectl get --raw /version | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p')
  "$helm" template stratum "$CHART" --namespace "$NS" --kube-version "$server_version" \
    --show-only templates/agent-rbac.yaml --show-only templates/admission-policy.yaml >"$WORK/policy.yaml"
  kubectl apply --server-side -f "$WORK/policy.yaml" >/dev/null
fi
POLICY=$(kubectl get validatingadmissionpolicies -o name | grep -- '-nodeclock-own-node$' | head -1 || true)
[[ -n $POLICY ]] || die "no ValidatingAdmissionPolicy *-nodeclock-own-node (install the chart)"
log "policy: $POLICY"

# What the operator does per TimeService: the agents' ServiceAccount, bound to stratum-agent.
kubectl -n "$NS" create serviceaccount "$SA" >/dev/null
kubectl create clusterrolebinding "stratum-agent-$TS" --clusterrole=stratum-agent \
  --serviceaccount="$NS:$SA" >/dev/null
for side in a b; do
  node=$A
  [[ $side == a ]] || node=$B
  kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $TS-$side, namespace: $NS, labels: {app.kubernetes.io/name: vaptest}}
spec:
  nodeName: $node
  serviceAccountName: $SA
  automountServiceAccountToken: false
  tolerations: [{operator: Exists}]
  containers: [{name: agent, image: registry.example.invalid/stratum/stratum-agent:vaptest}]
EOF
done

# A kubeconfig holding nothing but one bearer token, so no client certificate of the admin
# kubeconfig can authenticate the request instead.
server=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' |
  base64 -d >"$WORK/ca.crt"
token_kubeconfig() { # name token
  local f=$WORK/$1.kubeconfig
  kubectl --kubeconfig="$f" config set-cluster c --server="$server" \
    --certificate-authority="$WORK/ca.crt" --embed-certs=true >/dev/null
  kubectl --kubeconfig="$f" config set-credentials u --token="$2" >/dev/null
  kubectl --kubeconfig="$f" config set-context c --cluster=c --user=u >/dev/null
  kubectl --kubeconfig="$f" config use-context c >/dev/null
  echo "$f"
}
KA=$(token_kubeconfig a "$(kubectl -n "$NS" create token "$SA" --bound-object-kind=Pod --bound-object-name="$TS-a")")
KB=$(token_kubeconfig b "$(kubectl -n "$NS" create token "$SA" --bound-object-kind=Pod --bound-object-name="$TS-b")")
# Not bound to a pod: no node claim.
KN=$(token_kubeconfig none "$(kubectl -n "$NS" create token "$SA")")

claim() { kubectl --kubeconfig="$1" auth whoami -o jsonpath='{.status.userInfo.extra.authentication\.kubernetes\.io/node-name[0]}' 2>/dev/null || true; }
log "token node claims: pod a -> '$(claim "$KA")', pod b -> '$(claim "$KB")', unbound -> '$(claim "$KN")'"
[[ $(claim "$KA") == "$A" ]] || die "the pod-bound token carries no node claim for $A (ServiceAccountTokenPodNodeInfo off?)"

nodeclock() { # name timeService
  printf 'apiVersion: stratum.io/v1alpha1\nkind: NodeClock\nmetadata: {name: %s}\nspec: {timeService: %s}\n' "$1" "$2"
}
status_patch() { # name
  printf 'apiVersion: stratum.io/v1alpha1\nkind: NodeClock\nmetadata: {name: %s}\nstatus: {synchronized: true, offsetNanos: 1200, stratum: 3}\n' "$1"
}
# agent_apply KUBECONFIG NAME TIMESERVICE [status]: server-side apply as the agent does it.
agent_apply() {
  local kc=$1 name=$2 ts=$3 sub=${4:-}
  if [[ $sub == status ]]; then
    status_patch "$name" | kubectl --kubeconfig="$kc" apply --server-side --field-manager=stratum-agent \
      --subresource=status -f - 2>&1
  else
    nodeclock "$name" "$ts" | kubectl --kubeconfig="$kc" apply --server-side --field-manager=stratum-agent -f - 2>&1
  fi
}
expect_allowed() { # description command...
  local desc=$1 out
  shift
  if out=$("$@"); then pass "$desc"; else flunk "$desc: $out"; fi
}
expect_denied() { # description message-fragment command...
  local desc=$1 want=$2 out
  shift 2
  if out=$("$@"); then
    flunk "$desc: was allowed"
  elif [[ $out == *"$POLICY_NAME"* && $out == *"$want"* ]]; then
    pass "$desc: $(grep -o 'denied request: .*' <<<"$out" | head -1)"
  else
    flunk "$desc: refused, but not by the policy with \"$want\": $out"
  fi
}
POLICY_NAME=${POLICY#*/}

# The API server loads a new policy asynchronously: wait until a dry-run write of the other
# node's NodeClock is refused by it (dry-run requests run admission but store nothing).
for ((i = 0; i < 60; i++)); do
  out=$(nodeclock "$B" "$TS" | kubectl --kubeconfig="$KA" create --dry-run=server -f - 2>&1 || true)
  [[ $out == *"$POLICY_NAME"* ]] && break
  sleep 0.5
done
[[ $out == *"$POLICY_NAME"* ]] || die "the policy never refused a foreign write: $out"
kubectl get "$POLICY" -o jsonpath='{.status.typeChecking}' | grep -q . &&
  log "policy type-checking warnings: $(kubectl get "$POLICY" -o jsonpath='{.status.typeChecking}')"

log "agent on $A (pod-bound token):"
expect_allowed "creates NodeClock $A" agent_apply "$KA" "$A" "$TS"
expect_allowed "updates NodeClock $A" agent_apply "$KA" "$A" "$TS"
expect_allowed "updates NodeClock $A status" agent_apply "$KA" "$A" "$TS" status
expect_denied "creates NodeClock $B" "may only write NodeClock $A, not $B" agent_apply "$KA" "$B" "$TS"
expect_denied "claims NodeClock $A for another TimeService" "may not report NodeClock $A for TimeService other" \
  agent_apply "$KA" "$A" other

log "agent on $B (pod-bound token):"
expect_allowed "creates NodeClock $B" agent_apply "$KB" "$B" "$TS"
expect_denied "updates NodeClock $A" "may only write NodeClock $B, not $A" agent_apply "$KB" "$A" "$TS"
expect_denied "updates NodeClock $A status" "may only write NodeClock $B, not $A" agent_apply "$KB" "$A" "$TS" status

log "agent token not bound to a pod (no node claim):"
expect_denied "updates NodeClock $A" "has no node claim" agent_apply "$KN" "$A" "$TS"

# Events, as the agent records them (events.k8s.io/v1 about its Node), and in the core form.
EVENTS_POLICY=$(kubectl get validatingadmissionpolicies -o name | grep -- '-agent-events-own-node$' | head -1 || true)
event() { # name kind about [core]
  if [[ ${4:-} == core ]]; then
    printf 'apiVersion: v1\nkind: Event\nmetadata: {name: %s, namespace: default}\ninvolvedObject: {apiVersion: v1, kind: %s, name: %s}\nreason: Stepped\nmessage: vaptest\ntype: Normal\n' "$1" "$2" "$3"
  else
    printf 'apiVersion: events.k8s.io/v1\nkind: Event\nmetadata: {name: %s, namespace: default}\nregarding: {apiVersion: v1, kind: %s, name: %s}\nreason: Stepped\nnote: vaptest\ntype: Normal\naction: Disciplined\nreportingController: stratum-agent\nreportingInstance: vaptest\neventTime: "2026-01-01T00:00:00.000000Z"\n' "$1" "$2" "$3"
  fi
}
agent_event() { # kubeconfig name kind about [core]: dry run, so nothing is left behind
  event "$2" "$3" "$4" "${5:-}" | kubectl --kubeconfig="$1" create --dry-run=server -f - 2>&1
}
if [[ -n $EVENTS_POLICY ]]; then
  POLICY_NAME=${EVENTS_POLICY#*/}
  for ((i = 0; i < 60; i++)); do
    out=$(agent_event "$KA" vaptest-wait Node "$B" || true)
    [[ $out == *"$POLICY_NAME"* ]] && break
    sleep 0.5
  done
  log "agent Events ($EVENTS_POLICY):"
  expect_allowed "agent on $A records an Event about Node $A" agent_event "$KA" vaptest-a1 Node "$A"
  expect_allowed "agent on $A records a core Event about NodeClock $A" agent_event "$KA" vaptest-a2 NodeClock "$A" core
  expect_denied "agent on $A records an Event about Node $B" "may record Events only about Node or NodeClock $A" \
    agent_event "$KA" vaptest-a3 Node "$B"
  expect_denied "agent on $A records a core Event about a Pod" "may record Events only about Node or NodeClock $A" \
    agent_event "$KA" vaptest-a4 Pod "$A" core
  expect_denied "unbound agent token records an Event about Node $A" "may record Events only" \
    agent_event "$KN" vaptest-n1 Node "$A"
  POLICY_NAME=${POLICY#*/}
else
  flunk "no ValidatingAdmissionPolicy *-agent-events-own-node (install the chart)"
fi

log "administrator (not matched by the policy):"
admin_status() { status_patch "$1" | kubectl apply --server-side --field-manager=admin --subresource=status -f - 2>&1; }
expect_allowed "updates NodeClock $A status" admin_status "$A"

log "vap-e2e: $PASSED passed, $FAILED failed"
((FAILED == 0))
