#!/usr/bin/env bash
# Start and stop a real Kubernetes control plane for the e2e tests, on loopback only:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake nodes and pods).
#
# Usage:
#   e2e/scripts/cluster.sh up        PKI, start all five, wait until each is ready (~20 s)
#   e2e/scripts/cluster.sh down      stop what `up` started (by PID file), remove namespaces/blackholes
#   e2e/scripts/cluster.sh down --purge   same, then delete the run directory
#   e2e/scripts/cluster.sh status    each component's PID and health
#   e2e/scripts/cluster.sh env       shell lines to use the cluster: eval "$(e2e/scripts/cluster.sh env)"
#
# Needs the binaries from build-bins.sh (fails with a hint otherwise) and root (blackhole routes).
# Run directory: $E2E_RUN_DIR (default e2e/.run in the clone): pki/, logs/<component>.log,
# pids/<component>.pid, etcd/ (data), kubeconfig (admin, system:masters), kwok-stages.yaml, env.
# Ports (127.0.0.1): etcd 12379/12380, KCM 16257, scheduler 16259, kwok 16250; the apiserver listens on
# the host's bridge address 10.77.255.254:16443, so the real node's namespace reaches it too;
# override with E2E_ETCD_PORT, E2E_ETCD_PEER_PORT, E2E_APISERVER_PORT, E2E_KCM_PORT,
# E2E_SCHEDULER_PORT, E2E_KWOK_PORT. Address ranges: see common.sh.
set -Eeuo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=netns.sh
source "$E2E_SCRIPTS_DIR/netns.sh"

BIN=$E2E_BIN_DIR
RUN=$E2E_RUN_DIR
PKI=$RUN/pki
LOGS=$RUN/logs
PIDS=$RUN/pids
KUBECONFIG_ADMIN=$RUN/kubeconfig
API=https://$E2E_HOST_IP:$E2E_APISERVER_PORT
# Start order; stop is the reverse.
COMPONENTS="etcd kube-apiserver kube-controller-manager kube-scheduler kwok"

kc() { "$BIN/kubectl" --kubeconfig="$KUBECONFIG_ADMIN" "$@"; }

# ---------------------------------------------------------------------------------------------------
# Processes: each component runs in its own session (setsid), so it outlives this script and a
# terminal hangup; its PID goes to pids/<name>.pid and the binary it must be to pids/<name>.exe.
pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }

# running NAME -> exit 0 if the PID in the PID file is alive AND is still our binary (PIDs get reused).
running() {
  local pid exe
  pid=$(pid_of "$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  [[ ${exe% (deleted)} == "$(cat "$PIDS/$1.exe" 2>/dev/null)" ]]
}

start_proc() {
  local name=$1 exe=$2
  shift 2
  e2e_log "starting $name (log: $LOGS/$name.log)"
  setsid "$exe" "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
  echo $! >"$PIDS/$name.pid"
  echo "$exe" >"$PIDS/$name.exe"
}

# stop_procs NAME... : SIGTERM to each (only if still our binary), wait for all, SIGKILL after 15 s.
stop_procs() {
  local name pid i alive
  local -a pids=() names=()
  for name in "$@"; do
    pid=$(pid_of "$name")
    [[ -n $pid ]] || continue
    if running "$name"; then
      kill -TERM "$pid"
      pids+=("$pid")
      names+=("$name")
    elif kill -0 "$pid" 2>/dev/null; then
      e2e_log "  $name: pid $pid is alive but is not $(cat "$PIDS/$name.exe" 2>/dev/null); PID reused, leaving it alone"
    fi
    rm -f "$PIDS/$name.pid" "$PIDS/$name.exe"
  done
  for ((i = 0; i < 150; i++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      e2e_log "  ${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for 15s; sending SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
    e2e_log "  stopped ${names[$i]} (pid ${pids[$i]})"
  done
}

# wait_ready NAME WHAT TIMEOUT CMD... : poll CMD, failing fast (with the log tail) if NAME dies.
wait_ready() {
  local name=$1 what=$2 timeout=$3
  shift 3
  E2E_WAIT_PIDFILE=$PIDS/$name.pid E2E_WAIT_LOG=$LOGS/$name.log e2e_wait_for "$what" "$timeout" "$@"
}

# ---------------------------------------------------------------------------------------------------
# PKI: one CA (ECDSA P-256, 30 days) signs the apiserver's serving cert and every client cert
# (client certs map to users: CN = user, O = groups). A separate key pair signs service-account tokens.
pki_cert() { e2e_pki_cert "$PKI" "$@"; }
write_kubeconfig() { e2e_write_kubeconfig "$PKI" "$API" "$@"; }

make_pki() {
  local svc_ip
  rm -rf "$PKI"
  mkdir -p "$PKI"
  # First address of the service range is the `kubernetes` Service's ClusterIP; it must be in the SANs.
  svc_ip=$(e2e_int2ip $(($(e2e_ip2int "${E2E_SVC_RANGE%/*}") + 1)))
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 30 \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -subj "/CN=stratum-e2e-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  pki_cert apiserver "/CN=kube-apiserver" serverAuth \
    "IP:127.0.0.1,IP:$svc_ip,IP:$E2E_HOST_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # Serving certs for KCM/scheduler, so their /healthz is checked against our CA.
  pki_cert kcm-serving "/CN=kube-controller-manager" serverAuth "IP:127.0.0.1,DNS:localhost"
  pki_cert scheduler-serving "/CN=kube-scheduler" serverAuth "IP:127.0.0.1,DNS:localhost"
  pki_cert admin "/O=system:masters/CN=stratum-e2e-admin" clientAuth
  # The identities the built-in RBAC bindings expect (system:kube-controller-manager etc.).
  pki_cert kcm "/CN=system:kube-controller-manager" clientAuth
  pki_cert scheduler "/CN=system:kube-scheduler" clientAuth
  # kwok writes node/pod status, leases and events for every fake node: full access keeps it simple.
  pki_cert kwok "/O=system:masters/CN=kwok-controller" clientAuth
  # The apiserver's identity towards kubelets (logs, exec on the real node), as kubeadm's
  # apiserver-kubelet-client.
  pki_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  # Front proxy (request-header authn, as kubeadm sets up): a CA of its own and the apiserver's client
  # cert. Without it KCM/scheduler log "missing content for CA bundle ... requestheader-client-ca-file"
  # over and over, and aggregated APIs could not work.
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 30 \
    -keyout "$PKI/front-proxy-ca.key" -out "$PKI/front-proxy-ca.crt" -subj "/CN=stratum-e2e-front-proxy-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  PKI_CA=front-proxy-ca pki_cert front-proxy-client "/CN=front-proxy-client" clientAuth
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/sa.key" 2>/dev/null
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 600 "$PKI"/*.key
  write_kubeconfig "$KUBECONFIG_ADMIN" stratum-e2e-admin admin
  write_kubeconfig "$RUN/kcm.kubeconfig" system:kube-controller-manager kcm
  write_kubeconfig "$RUN/scheduler.kubeconfig" system:kube-scheduler scheduler
  write_kubeconfig "$RUN/kwok.kubeconfig" kwok-controller kwok
}

# kwok's standalone binary has no built-in stages (it exits "no stages found"); feed it the ones
# kwokctl uses by default, copied from the kwok module by build-bins.sh. The lease heartbeat keeps
# nodes Ready cheaply; node-initialize keeps any status.addresses the node was created with.
write_kwok_config() {
  local f src=$E2E_KWOK_STAGES_DIR
  : >"$RUN/kwok-stages.yaml"
  for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
    pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    [[ -f $src/$f.yaml ]] || e2e_die "kwok stage $src/$f.yaml missing (re-run build-bins.sh)"
    { cat "$src/$f.yaml"; echo "---"; } >>"$RUN/kwok-stages.yaml"
  done
}

curl_ok() { curl -fsS --max-time 2 "$@"; }

# ---------------------------------------------------------------------------------------------------
cmd_up() {
  local t0 c any=0 all=1 svc_ip
  t0=$(date +%s%N)
  "$E2E_SCRIPTS_DIR/build-bins.sh" --check ||
    e2e_die "binaries for $E2E_CACHE_KEY are not in $BIN; run e2e/scripts/build-bins.sh first (cold: ~30-45 min)"
  command -v openssl >/dev/null || e2e_die "openssl missing (apt-get install -y openssl)"
  command -v curl >/dev/null || e2e_die "curl missing (apt-get install -y curl)"
  for c in $COMPONENTS; do
    if running "$c"; then any=1; else all=0; fi
  done
  if ((all)); then
    e2e_log "cluster already up in $RUN"
    cmd_status
    return 0
  fi
  ((any == 0)) || e2e_die "some components of $RUN are running and some not; run 'cluster.sh down' first"
  local p
  for p in $E2E_ETCD_PORT $E2E_ETCD_PEER_PORT $E2E_APISERVER_PORT $E2E_KCM_PORT $E2E_SCHEDULER_PORT $E2E_KWOK_PORT; do
    [[ -z $(ss -Hltn "sport = :$p") ]] || e2e_die "TCP port $p is already in use (another cluster? set E2E_*_PORT; see common.sh)"
  done

  e2e_log "cluster up: $E2E_CACHE_KEY, run dir $RUN"
  # From here on, a failure stops whatever this `up` started (the logs stay in $LOGS).
  UP_DONE=0
  trap 'if ((UP_DONE == 0)); then e2e_log "cluster up FAILED; stopping what it started (logs: $LOGS)"; cmd_down; fi' EXIT
  mkdir -p "$RUN" "$LOGS" "$PIDS"
  touch "$RUN/.stratum-e2e-run"
  rm -rf "$RUN/etcd" "$LOGS"/*.log
  # Blackhole the test ranges before anything can hand out or dial an address in them.
  netns_host_up
  make_pki
  write_kwok_config
  svc_ip=$(e2e_int2ip $(($(e2e_ip2int "${E2E_SVC_RANGE%/*}") + 1)))

  start_proc etcd "$BIN/etcd" --name=stratum-e2e --data-dir="$RUN/etcd" --unsafe-no-fsync \
    --listen-client-urls="http://127.0.0.1:$E2E_ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$E2E_ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$E2E_ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$E2E_ETCD_PEER_PORT" \
    --initial-cluster="stratum-e2e=http://127.0.0.1:$E2E_ETCD_PEER_PORT" \
    --quota-backend-bytes=$((2 * 1024 * 1024 * 1024))
  wait_ready etcd "etcd /health" 30 sh -c "curl -fsS --max-time 2 http://127.0.0.1:$E2E_ETCD_PORT/health | grep -q '\"health\":\"true\"'"

  # --bind-address: the host's address on the test bridge (in the serving cert), reachable from the
  # host itself and from every namespace on the bridge: the real node's kubelet, kube-proxy and
  # CoreDNS, and pods through the `kubernetes` Service. Never a real interface's address.
  # --audit-policy-file: the chart's policy, as users install it (issue 18); the log is
  # $RUN/logs/audit.log, which e2e/tests/compliance.rs reads through `stratumctl report`.
  # --advertise-address: the apiserver wants a non-loopback address for the `kubernetes` Service's
  # endpoints; the host's own bridge address in the (blackholed) node range keeps that inside the
  # test ranges and makes the apiserver independent of a default route.
  start_proc kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$E2E_ETCD_PORT" \
    --bind-address="$E2E_HOST_IP" --secure-port="$E2E_APISERVER_PORT" --advertise-address="$E2E_HOST_IP" \
    --cert-dir="$PKI/generated" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" \
    --kubelet-preferred-address-types=InternalIP \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range="$E2E_SVC_RANGE" \
    --authorization-mode=Node,RBAC --allow-privileged=true --profiling=false \
    --audit-policy-file="$E2E_SCRIPTS_DIR/../../charts/stratum/files/audit-policy.yaml" \
    --audit-log-path="$RUN/logs/audit.log" --audit-log-maxsize=200 --audit-log-maxbackup=1
  wait_ready kube-apiserver "kube-apiserver /readyz" 90 kc get --raw=/readyz

  local common=(--bind-address=127.0.0.1 --leader-elect=false --profiling=false)
  start_proc kube-controller-manager "$BIN/kube-controller-manager" "${common[@]}" \
    --kubeconfig="$RUN/kcm.kubeconfig" --authentication-kubeconfig="$RUN/kcm.kubeconfig" \
    --authorization-kubeconfig="$RUN/kcm.kubeconfig" \
    --secure-port="$E2E_KCM_PORT" --tls-cert-file="$PKI/kcm-serving.crt" --tls-private-key-file="$PKI/kcm-serving.key" \
    --controllers='*' --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$E2E_SVC_RANGE" \
    --flex-volume-plugin-dir="$RUN/flexvolume"
  start_proc kube-scheduler "$BIN/kube-scheduler" "${common[@]}" \
    --kubeconfig="$RUN/scheduler.kubeconfig" --authentication-kubeconfig="$RUN/scheduler.kubeconfig" \
    --authorization-kubeconfig="$RUN/scheduler.kubeconfig" \
    --secure-port="$E2E_SCHEDULER_PORT" --tls-cert-file="$PKI/scheduler-serving.crt" --tls-private-key-file="$PKI/scheduler-serving.key"
  wait_ready kube-controller-manager "kube-controller-manager /healthz" 60 curl_ok --cacert "$PKI/ca.crt" "https://127.0.0.1:$E2E_KCM_PORT/healthz"
  wait_ready kube-scheduler "kube-scheduler /healthz" 60 curl_ok --cacert "$PKI/ca.crt" "https://127.0.0.1:$E2E_SCHEDULER_PORT/healthz"

  # kwok: manages only nodes annotated kwok.x-k8s.io/node=fake (nodes.sh creates those).
  # No --node-ip: nodes.sh gives every node its own InternalIP and kwok keeps it; a node created
  # without addresses simply gets none, instead of some shared address. Pod IPs come from each
  # node's spec.podCIDR (nodes.sh: 10.78.<i>.0/24, i < 240). --cidr is the pool for nodes created
  # without a podCIDR: the last /24 of the pod range, so it never overlaps a nodes.sh node.
  # (KCM's node IPAM stays off, the upstream default: its allocations would collide with those.)
  start_proc kwok "$BIN/kwok" --kubeconfig="$RUN/kwok.kubeconfig" --config="$RUN/kwok-stages.yaml" \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --cidr="$(e2e_int2ip $(($(e2e_ip2int "${E2E_POD_RANGE%/*}") + (255 << 8))))/24" --node-lease-duration-seconds=40 \
    --server-address="127.0.0.1:$E2E_KWOK_PORT"
  wait_ready kwok "kwok /healthz" 30 curl_ok "http://127.0.0.1:$E2E_KWOK_PORT/healthz"

  # Objects the controllers create asynchronously, which pods and tests depend on.
  wait_ready kube-controller-manager "serviceaccount default/default" 60 kc -n default get serviceaccount default
  wait_ready kube-controller-manager "configmap default/kube-root-ca.crt" 60 kc -n default get configmap kube-root-ca.crt
  wait_ready kube-apiserver "service default/kubernetes at $svc_ip" 30 sh -c "'$BIN/kubectl' --kubeconfig='$KUBECONFIG_ADMIN' -n default get service kubernetes -o jsonpath='{.spec.clusterIP}' | grep -qx '$svc_ip'"

  write_env
  # shellcheck disable=SC2034 # read by the EXIT trap above
  UP_DONE=1
  e2e_log "cluster up in $((($(date +%s%N) - t0) / 1000000)) ms; server $(kc version -o json | sed -n 's/.*"gitVersion": "\(.*\)".*/\1/p' | tail -n1)"
  e2e_log "use it: eval \"\$($0 env)\"   (KUBECONFIG=$KUBECONFIG_ADMIN)"
}

write_env() {
  cat >"$RUN/env" <<EOF
export KUBECONFIG='$KUBECONFIG_ADMIN'
export E2E_BIN_DIR='$BIN'
export E2E_RUN_DIR='$RUN'
export PATH='$BIN':"\$PATH"
EOF
}

cmd_down() {
  local purge=${1:-}
  e2e_log "cluster down: $RUN"
  if [[ -d $PIDS ]]; then
    # Clients first (together), then the apiserver, then its storage.
    stop_procs kwok kube-scheduler kube-controller-manager
    stop_procs kube-apiserver
    stop_procs etcd
  fi
  # Namespaces made for this run (their agents get ended), then bridge and blackholes.
  if [[ $(id -u) == 0 ]]; then
    E2E_NETNS_STATE=$RUN/netns netns_down_all
  fi
  rm -rf "$RUN/etcd"
  if [[ $purge == --purge ]]; then
    if [[ -f $RUN/.stratum-e2e-run ]]; then
      rm -rf "$RUN"
      e2e_log "  removed $RUN"
    else
      e2e_log "  $RUN has no .stratum-e2e-run marker; not deleting it"
    fi
  fi
}

cmd_status() {
  local c rc=0 health
  for c in $COMPONENTS; do
    if running "$c"; then
      case $c in
        etcd) health=$(curl_ok "http://127.0.0.1:$E2E_ETCD_PORT/health" 2>&1 || true) ;;
        kube-apiserver) health=$(kc get --raw=/readyz 2>&1 || true) ;;
        kube-controller-manager) health=$(curl_ok --cacert "$PKI/ca.crt" "https://127.0.0.1:$E2E_KCM_PORT/healthz" 2>&1 || true) ;;
        kube-scheduler) health=$(curl_ok --cacert "$PKI/ca.crt" "https://127.0.0.1:$E2E_SCHEDULER_PORT/healthz" 2>&1 || true) ;;
        kwok) health=$(curl_ok "http://127.0.0.1:$E2E_KWOK_PORT/healthz" 2>&1 || true) ;;
      esac
      printf '%-24s running  pid %-8s %s\n' "$c" "$(pid_of "$c")" "$health"
    else
      printf '%-24s stopped\n' "$c"
      rc=1
    fi
  done
  printf 'run dir %s\nkubeconfig %s\n' "$RUN" "$KUBECONFIG_ADMIN"
  return $rc
}

cmd_env() {
  [[ -f $RUN/env ]] || e2e_die "no cluster env in $RUN (run 'cluster.sh up')"
  cat "$RUN/env"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down "${2:-}" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    [[ ${1:-} == -h || ${1:-} == --help ]] || exit 2
    ;;
esac
