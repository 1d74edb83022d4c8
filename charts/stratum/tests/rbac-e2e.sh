#!/usr/bin/env bash
# The chart's RBAC on a real API server, after `helm install`: the operator can do what its
# reconcilers need and nothing the design forbids (NodeClock writes, listing or writing
# tenants' secrets, binding roles
# other than stratum-agent, children outside its namespace), and the agents' ClusterRole is
# as narrow as documented. Uses impersonation (`--as`), so it needs an admin kubeconfig.
#
# Usage:
#   KUBECONFIG=<admin kubeconfig> charts/stratum/tests/rbac-e2e.sh [--namespace NS] [--release NAME]
#
# Creates and removes: namespace rbac-e2e-tenant (with a user's own Service and ConfigMap),
# ServiceAccount rbace2e-agent in NS, a ClusterRoleBinding rbace2e-agent (as admin) and the Role
# rbace2e-agent it makes as the operator. The operator's own writes that the admission policy
# `<release>-operator-writes` must refuse are tried for real; the allowed ones as dry runs, so
# nothing of the running operator's is changed.
set -Eeuo pipefail

NS=stratum-system
RELEASE=stratum
while (($#)); do
  case $1 in
  --namespace)
    NS=$2
    shift 2
    ;;
  --release)
    RELEASE=$2
    shift 2
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
  esac
done
TENANT_NS=rbac-e2e-tenant
PASSED=0
FAILED=0

cleanup() {
  kubectl delete clusterrolebinding rbace2e-agent stratum-agent-rbace2e-escalate --ignore-not-found >/dev/null 2>&1 || true
  kubectl -n "$NS" delete role rbace2e-agent rbace2e-escalate --ignore-not-found >/dev/null 2>&1 || true
  kubectl -n "$NS" delete serviceaccount rbace2e-agent --ignore-not-found >/dev/null 2>&1 || true
  kubectl delete namespace "$TENANT_NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT

# The operator's ServiceAccount: the one the chart's Deployment runs as.
OP_SA=$(kubectl -n "$NS" get deploy "$RELEASE-operator" -o jsonpath='{.spec.template.spec.serviceAccountName}' 2>/dev/null ||
  true)
[[ -n $OP_SA ]] || {
  echo "rbac-e2e: no Deployment $RELEASE-operator in $NS (install the chart first)" >&2
  exit 1
}
OP=system:serviceaccount:$NS:$OP_SA
AGENT=system:serviceaccount:$NS:rbace2e-agent
echo "rbac-e2e: operator $OP, release namespace $NS"

check() { # expected(yes|no) as verb resource [flags...]
  local want=$1 who=$2 got
  shift 2
  got=$(kubectl auth can-i "$@" --as="$who" 2>/dev/null || true)
  if [[ $got == "$want" ]]; then
    PASSED=$((PASSED + 1))
    printf '  PASS %-3s %s\n' "$want" "$*"
  else
    FAILED=$((FAILED + 1))
    printf '  FAIL want %s, got %s: %s\n' "$want" "${got:-error}" "$*"
  fi
}
outcome() { # expected(allowed|forbidden) description command...
  local want=$1 desc=$2 out got=allowed
  shift 2
  out=$("$@" 2>&1) || got=forbidden
  [[ $got == forbidden && $out != *orbidden* ]] && got="error ($out)"
  if [[ $got == "$want" ]]; then
    PASSED=$((PASSED + 1))
    printf '  PASS %-9s %s\n' "$want" "$desc"
  else
    FAILED=$((FAILED + 1))
    printf '  FAIL want %s, got %s: %s\n' "$want" "$got" "$desc"
  fi
}

kubectl get namespace "$TENANT_NS" >/dev/null 2>&1 || kubectl create namespace "$TENANT_NS" >/dev/null
kubectl -n "$NS" create serviceaccount rbace2e-agent >/dev/null

echo "operator, custom resources:"
check yes "$OP" list timeservices
check yes "$OP" watch tenanttimepolicies -A
check yes "$OP" watch nodeclocks
check yes "$OP" patch timeservices --subresource=status
check yes "$OP" patch tenanttimepolicies --subresource=status -n "$TENANT_NS"
check no "$OP" patch timeservices
check no "$OP" patch tenanttimepolicies -n "$TENANT_NS"
check no "$OP" patch nodeclocks
check no "$OP" patch nodeclocks --subresource=status
check yes "$OP" delete nodeclocks # NodeClocks of vanished Nodes (the agents write them)
echo "operator, cluster-wide reads and tenant children:"
check yes "$OP" watch pods -A
check yes "$OP" watch namespaces
check yes "$OP" watch nodes
check yes "$OP" create services -n "$TENANT_NS"
check yes "$OP" patch endpointslices.discovery.k8s.io -n "$TENANT_NS"
check yes "$OP" patch configmaps -n "$TENANT_NS"
# NTS tenants' kubernetes.io/tls Secrets, read by name only (rbac.readTenantCertificates):
# never listed, watched or written outside the operator's namespace.
check yes "$OP" get secrets -n "$TENANT_NS"
check no "$OP" list secrets -n "$TENANT_NS"
check no "$OP" watch secrets -A
check no "$OP" create secrets -n "$TENANT_NS"
check no "$OP" patch secrets -n "$TENANT_NS"
check no "$OP" delete secrets -n "$TENANT_NS"
check no "$OP" patch nodes
check no "$OP" delete pods -n "$TENANT_NS"
echo "operator, agent children only in its namespace:"
check yes "$OP" create daemonsets.apps -n "$NS"
check yes "$OP" create networkpolicies.networking.k8s.io -n "$NS"
check yes "$OP" create roles.rbac.authorization.k8s.io -n "$NS"
check no "$OP" create daemonsets.apps -n "$TENANT_NS"
check no "$OP" create networkpolicies.networking.k8s.io -n "$TENANT_NS"
check no "$OP" create roles.rbac.authorization.k8s.io -n "$TENANT_NS"
# Each TimeService's NTS key material Secret: written by server-side apply, never deleted
# (its owner reference does that) or listed.
check yes "$OP" get secrets -n "$NS"
check yes "$OP" patch secrets -n "$NS"
check no "$OP" delete secrets -n "$NS"
check no "$OP" list secrets -n "$NS"
check no "$OP" create clusterroles
check yes "$OP" patch clusterrolebindings/stratum-agent
check no "$OP" create clusterrolebindings
check no "$OP" patch clusterrolebindings/cluster-admin
check no "$OP" delete clusterrolebindings/stratum-agent
check no "$OP" list clusterrolebindings
check yes "$OP" bind clusterroles/stratum-agent
check no "$OP" bind clusterroles/cluster-admin
check no "$OP" escalate clusterroles
echo "operator, leader election:"
check yes "$OP" create leases.coordination.k8s.io -n "$NS"
check yes "$OP" update leases.coordination.k8s.io/stratum-operator-leader -n "$NS"
check no "$OP" update leases.coordination.k8s.io/kube-scheduler -n kube-system
echo "operator, granting rights (the API server's escalation check):"
outcome allowed "adds its agents to the chart's binding stratum-agent (dry run)" \
  kubectl --as="$OP" patch clusterrolebinding stratum-agent --dry-run=server --type=json \
  -p "[{\"op\":\"add\",\"path\":\"/subjects\",\"value\":[{\"kind\":\"ServiceAccount\",\"name\":\"rbace2e-agent\",\"namespace\":\"$NS\"}]}]"
outcome forbidden "binds its agents to cluster-admin" \
  kubectl --as="$OP" create clusterrolebinding stratum-agent-rbace2e-escalate --clusterrole=cluster-admin \
  --serviceaccount="$NS:rbace2e-agent"
outcome allowed "creates the agents' Role to read their ConfigMap" \
  kubectl --as="$OP" -n "$NS" create role rbace2e-agent --verb=get,list,watch --resource=configmaps \
  --resource-name=rbace2e-agent-config
# It may read a Secret by name, so it could grant that; never listing them, it cannot grant it.
outcome forbidden "creates a Role granting a list of secrets" \
  kubectl --as="$OP" -n "$NS" create role rbace2e-escalate --verb=list --resource=secrets

echo "operator, tenant objects (admission policy $RELEASE-operator-writes):"
# The policy is loaded asynchronously after install: wait until it refuses a system namespace.
labelled() { # kind name namespace: a Stratum-labelled object, for kubectl create -f -
  printf 'apiVersion: v1\nkind: %s\nmetadata: {name: %s, namespace: %s, labels: {app.kubernetes.io/managed-by: stratum-operator}}\n' "$@"
}
for ((i = 0; i < 60; i++)); do
  out=$(labelled ConfigMap rbace2e kube-system | kubectl --as="$OP" create --dry-run=server -f - 2>&1 || true)
  [[ $out == *operator-writes* ]] && break
  sleep 0.5
done
kubectl -n "$TENANT_NS" create service clusterip ntp --tcp=123:123 >/dev/null
kubectl -n "$TENANT_NS" create configmap time-config --from-literal=owner=user >/dev/null
outcome forbidden "writes a ConfigMap in kube-system" \
  bash -c "$(declare -f labelled); labelled ConfigMap rbace2e kube-system | kubectl --as='$OP' create -f -"
outcome forbidden "creates an unlabelled Service in a tenant namespace" \
  kubectl --as="$OP" -n "$TENANT_NS" create service clusterip rbace2e --tcp=123:123
outcome allowed "creates a Stratum-labelled ConfigMap in a tenant namespace (dry run)" \
  bash -c "$(declare -f labelled); labelled ConfigMap rbace2e '$TENANT_NS' | kubectl --as='$OP' create --dry-run=server -f -"
outcome forbidden "labels (adopts) a user's Service named ntp" \
  kubectl --as="$OP" -n "$TENANT_NS" label service ntp app.kubernetes.io/managed-by=stratum-operator
outcome forbidden "patches a user's ConfigMap named time-config" \
  kubectl --as="$OP" -n "$TENANT_NS" patch configmap time-config -p '{"data":{"NTP_SERVER":"x"}}'
outcome forbidden "deletes a user's Service named ntp" \
  kubectl --as="$OP" -n "$TENANT_NS" delete service ntp
if [[ $(kubectl -n "$TENANT_NS" get configmap time-config -o jsonpath='{.data.owner}') == user ]] &&
  kubectl -n "$TENANT_NS" get service ntp >/dev/null; then
  PASSED=$((PASSED + 1))
  echo "  PASS the user's Service and ConfigMap are unchanged"
else
  FAILED=$((FAILED + 1))
  echo "  FAIL the user's Service or ConfigMap changed"
fi

kubectl create clusterrolebinding rbace2e-agent --clusterrole=stratum-agent \
  --serviceaccount="$NS:rbace2e-agent" >/dev/null
echo "agent (ClusterRole stratum-agent, bound above):"
check yes "$AGENT" create nodeclocks
check yes "$AGENT" patch nodeclocks
check yes "$AGENT" patch nodeclocks --subresource=status
check no "$AGENT" list nodeclocks
check no "$AGENT" delete nodeclocks
check yes "$AGENT" create events.events.k8s.io -n default
check no "$AGENT" list timeservices
check no "$AGENT" get secrets -n "$NS"
check no "$AGENT" get configmaps -n "$TENANT_NS"

echo "rbac-e2e: $PASSED passed, $FAILED failed"
((FAILED == 0))
