#!/usr/bin/env bash
# One real Kubernetes node for the e2e stack: containerd 2.x + runc + the CNI bridge plugin, a
# kubelet and kube-proxy of the control plane's release, and CoreDNS for cluster.local, all in a
# network namespace of their own on the test bridge. Needs a cluster from cluster.sh and root.
#
# Usage:
#   e2e/scripts/node.sh up              start the node, wait until it is Ready, import images
#   e2e/scripts/node.sh down            stop every process, remove mounts, cgroups, routes, namespace
#   e2e/scripts/node.sh import FILE...  import OCI archives into the node's containerd
#   e2e/scripts/node.sh exec CMD...     run CMD inside the node (its network and mount namespaces)
#   e2e/scripts/node.sh env             the variables tests use (eval it)
#   e2e/scripts/node.sh ctr ARGS...     ctr against the node's containerd, CRI namespace (k8s.io),
#                                       e.g. `node.sh ctr tasks ls`
#   e2e/scripts/node.sh pod-exec NS POD CMD...  CMD from this machine as a client in a pod of the
#                                       node (its network namespace and resolv.conf), e.g.
#                                       `node.sh pod-exec team-a client ntpdig ntp.team-a.svc.cluster.local`
#   e2e/scripts/node.sh status          each process's PID and health
#
# Layout (node range offsets keep clear of nodes.sh's kwok nodes, 10.77.0.10-249, 10.78.0-239.0/24):
#   netns e2e-node-real: eth0 10.77.0.250/32 (InternalIP) and 10.77.0.251/32 (a second address),
#     cni0 10.78.250.1/24 (the pod CIDR, bridge plugin), ip_forward on (in this namespace only),
#     no default route. Routes to 10.78.250.0/24 via 10.77.0.250 in the root namespace and in every
#     kwok node's namespace, so replies reach pods; the root namespace keeps its blackholes.
#   A long-lived holder process (`unshare --mount --propagation slave` inside the namespace, with
#     private tmpfs over /run and /var/log) owns the node's mount namespace; containerd, kubelet,
#     kube-proxy and CoreDNS are entered into it with nsenter, so kubelet's volume mounts are
#     visible to runc and vanish with the holder. Every state directory is under
#     $E2E_RUN_DIR/node; the shim sockets are in the private /run (their path is limited to 42
#     characters).
#   cgroups (v1 here): pods under /stratum-e2e-node in every hierarchy, removed by `down`.
#
# The clock rule: containerd, kubelet and therefore every container start without CAP_SYS_TIME in
# their bounding set (setpriv). A pod that adds SYS_TIME (the agent DaemonSet) runs its real spec:
# containerd's runc is e2e/node/runc_drop_sys_time.py, which removes SYS_TIME from the OCI spec and
# logs it ($E2E_RUN_DIR/node/logs/runtime-wrapper.log).
#
# The node is tainted stratum.e2e/real-node=true:NoSchedule and labelled stratum.e2e/real-node=true,
# so only pods that ask for it land here (the kwok nodes keep the existing tests' pods).
#
# Images: the sandbox ("pause") image is built here from e2e/node/pause.c (musl, static) with umoci:
# localhost/stratum-e2e/pause:1. Every *.oci.tar in $STRATUM_IMAGES_DIR (default target/images,
# what `make images` writes) is imported into containerd's k8s.io namespace on `up`.
#
# DNS: CoreDNS runs as a process of the node at 10.77.0.250:53 (kubernetes plugin, cluster.local
# only, nothing forwarded anywhere), behind Service kube-system/kube-dns at 10.79.0.10, the
# kubelet's clusterDNS. kube-proxy runs in nftables mode, conntrack sysctls left alone.
set -Eeuo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=netns.sh
source "$E2E_SCRIPTS_DIR/netns.sh"

ROOT=$(cd "$E2E_SCRIPTS_DIR/../.." && pwd)
BIN=$E2E_BIN_DIR
RUN=$E2E_RUN_DIR
PKI=$RUN/pki
NODE_NAME=${E2E_REAL_NODE_NAME:-node-real}
NODE_NS=e2e-$NODE_NAME
NODE_DIR=$RUN/node
NODE_IP=$(e2e_int2ip $(($(e2e_ip2int "${E2E_NODE_RANGE%/*}") + 250)))
NODE_IP2=$(e2e_int2ip $(($(e2e_ip2int "${E2E_NODE_RANGE%/*}") + 251)))
POD_CIDR=$(e2e_int2ip $(($(e2e_ip2int "${E2E_POD_RANGE%/*}") + (250 << 8))))/24
DNS_IP=$(e2e_int2ip $(($(e2e_ip2int "${E2E_SVC_RANGE%/*}") + 10)))
CLUSTER_DOMAIN=cluster.local
CGROUP_ROOT=/stratum-e2e-node
PAUSE_IMAGE=localhost/stratum-e2e/pause:1
IMAGES_DIR=${STRATUM_IMAGES_DIR:-$ROOT/target/images}
API=https://$E2E_HOST_IP:$E2E_APISERVER_PORT
PIDS=$NODE_DIR/pids
LOGS=$NODE_DIR/logs
# Start order; stop is the reverse (the holder last: its end removes the node's mounts).
PROCS="holder containerd kubelet kube-proxy coredns"
NO_SYS_TIME=(setpriv --bounding-set=-sys_time --inh-caps=-sys_time)

log() { e2e_log "node: $*"; }
kc() { "$BIN/kubectl" --kubeconfig="$RUN/kubeconfig" "$@"; }

pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }
# running NAME: its PID is alive and still the binary we started (PIDs get reused).
running() {
  local pid exe
  pid=$(pid_of "$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  [[ ${exe% (deleted)} == "$(cat "$PIDS/$1.exe" 2>/dev/null)" ]]
}

# in_node CMD...: CMD in the node's network and mount namespaces, without CAP_SYS_TIME.
in_node() {
  local holder
  holder=$(pid_of holder)
  if [[ -z $holder ]] || ! running holder; then e2e_die "the node is not up (no holder process)"; fi
  nsenter --target "$holder" --mount --net -- "${NO_SYS_TIME[@]}" env PATH="$BIN:$PATH" "$@"
}

# start_in_node NAME EXE ARGS...: a long-running process of the node, in its own session.
start_in_node() {
  local name=$1 exe=$2 holder
  shift 2
  holder=$(pid_of holder)
  log "starting $name (log: $LOGS/$name.log)"
  # setsid, nsenter, setpriv and env all exec: the recorded PID is the binary's. containerd finds
  # its shim on PATH.
  setsid nsenter --target "$holder" --mount --net -- "${NO_SYS_TIME[@]}" env PATH="$BIN:$PATH" "$exe" "$@" \
    </dev/null >"$LOGS/$name.log" 2>&1 &
  echo $! >"$PIDS/$name.pid"
  echo "$exe" >"$PIDS/$name.exe"
}

wait_ready() { # NAME WHAT TIMEOUT CMD...
  local name=$1 what=$2 timeout=$3
  shift 3
  E2E_WAIT_PIDFILE=$PIDS/$name.pid E2E_WAIT_LOG=$LOGS/$name.log e2e_wait_for "$what" "$timeout" "$@"
}

# ---------------------------------------------------------------------------------------------------
# Configuration files.
node_pki() {
  local d=$NODE_DIR/pki
  mkdir -p "$d"
  cp "$PKI/ca.crt" "$PKI/ca.key" "$d/"
  e2e_pki_cert "$d" kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  e2e_pki_cert "$d" kubelet-serving "/CN=$NODE_NAME" serverAuth "IP:$NODE_IP,DNS:$NODE_NAME"
  e2e_pki_cert "$d" kube-proxy "/CN=system:kube-proxy" clientAuth
  e2e_pki_cert "$d" coredns "/CN=system:coredns" clientAuth
  rm -f "$d/ca.key" "$d/ca.srl"
  e2e_write_kubeconfig "$d" "$API" "$NODE_DIR/kubelet.kubeconfig" "system:node:$NODE_NAME" kubelet
  e2e_write_kubeconfig "$d" "$API" "$NODE_DIR/kube-proxy.kubeconfig" system:kube-proxy kube-proxy
  e2e_write_kubeconfig "$d" "$API" "$NODE_DIR/coredns.kubeconfig" system:coredns coredns
}

write_configs() {
  mkdir -p "$NODE_DIR/bin" "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam" "$NODE_DIR/containerd" \
    "$NODE_DIR/kubelet" "$NODE_DIR/pod-logs" "$NODE_DIR/volume-plugins"
  # The runtime wrapper containerd runs instead of runc (see the header).
  cat >"$NODE_DIR/bin/runc" <<EOF
#!/bin/sh
exec /usr/bin/python3 '$ROOT/e2e/node/runc_drop_sys_time.py' '$LOGS/runtime-wrapper.log' '$(command -v runc)' "\$@"
EOF
  chmod +x "$NODE_DIR/bin/runc"

  # containerd 2.x, config version 3. Plugins this node cannot or need not use are disabled
  # (btrfs/zfs/devmapper need kernel features or cgo; `opt` would create /opt/containerd).
  cat >"$NODE_DIR/containerd/config.toml" <<EOF
version = 3
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs", "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing", "io.containerd.nri.v1.nri"]

[grpc]
  address = "$NODE_DIR/containerd/containerd.sock"

[plugins.'io.containerd.shim.v1.manager']
  socket_dir = "/run/containerd/s"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"

[plugins.'io.containerd.cri.v1.runtime']
  # No CAP_SYS_RESOURCE here, even for root: containers may only raise their oom_score_adj.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$NODE_DIR/bin/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$NODE_DIR/cni/net.d"
    max_conf_num = 1
EOF

  # Pod network: one bridge, the node's pod CIDR, the node as gateway; no masquerading, so the
  # agents see pods' own addresses (their allow lists are pod CIDRs).
  cat >"$NODE_DIR/cni/net.d/10-stratum-e2e.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "stratum-e2e",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$NODE_DIR/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

  # kubelet. failCgroupV1: false because this machine has cgroup v1 (kubelet 1.36 refuses it
  # otherwise). cgroupRoot keeps every pod cgroup in one subtree that `down` removes.
  cat >"$NODE_DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
containerRuntimeEndpoint: unix://$NODE_DIR/containerd/containerd.sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $NODE_DIR/pki/kubelet-serving.crt
tlsPrivateKeyFile: $NODE_DIR/pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $NODE_DIR/pki/ca.crt}
authorization:
  mode: Webhook
clusterDNS: [$DNS_IP]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: ""
podLogsDir: $NODE_DIR/pod-logs
volumePluginDir: $NODE_DIR/volume-plugins
failSwapOn: false
protectKernelDefaults: true
serializeImagePulls: false
maxPods: 50
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerWithTaints:
- {key: stratum.e2e/real-node, value: "true", effect: NoSchedule}
EOF

  # kube-proxy in nftables mode. clusterCIDR: traffic from pods is not masqueraded, so agents
  # see a pod's own address. conntrack values 0 leave the machine's sysctls alone.
  cat >"$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $NODE_DIR/kube-proxy.kubeconfig
hostnameOverride: $NODE_NAME
mode: nftables
clusterCIDR: ${E2E_POD_RANGE}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary]
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
EOF

  # CoreDNS: the cluster's zone only; any other name is refused (there is no forwarder: no
  # query ever leaves the test ranges).
  cat >"$NODE_DIR/Corefile" <<EOF
$CLUSTER_DOMAIN:53 in-addr.arpa:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:18080
    ready 127.0.0.1:18181
    kubernetes $CLUSTER_DOMAIN in-addr.arpa {
        kubeconfig $NODE_DIR/coredns.kubeconfig stratum-e2e
    }
    cache 5
}
EOF
}

# CoreDNS' read access (the rules of upstream's system:coredns ClusterRole) and the kube-dns
# Service at the kubelet's clusterDNS address, with the node's CoreDNS as its one endpoint.
apply_dns_objects() {
  kc apply --server-side --field-manager=stratum-e2e-node -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  clusterIP: $DNS_IP
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-$NODE_NAME
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: stratum-e2e-node
addressType: IPv4
endpoints:
- addresses: [$NODE_IP]
  nodeName: $NODE_NAME
  conditions: {ready: true}
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
EOF
}

# ---------------------------------------------------------------------------------------------------
# The pause image: a 13 KiB static binary in an OCI layout made with umoci, as an archive that
# `ctr images import` reads. Rebuilt only when pause.c changes.
pause_image() {
  local out=$NODE_DIR/images/pause.oci.tar work src=$ROOT/e2e/node/pause.c sum
  sum=$(sha256sum "$src" | cut -c1-16)
  if [[ -f $out && -f $out.src && $(cat "$out.src") == "$sum" ]]; then
    echo "$out"
    return 0
  fi
  work=$NODE_DIR/images/pause.work
  rm -rf "$work"
  mkdir -p "$work"
  musl-gcc -static -Os -s -Wall -Wextra -Werror -o "$work/pause" "$src"
  umoci init --layout "$work/layout" >/dev/null
  umoci new --image "$work/layout:1" >/dev/null
  umoci unpack --image "$work/layout:1" "$work/bundle" >/dev/null
  install -m 0755 "$work/pause" "$work/bundle/rootfs/pause"
  umoci repack --image "$work/layout:1" "$work/bundle" >/dev/null
  umoci config --image "$work/layout:1" --config.entrypoint /pause --config.user 65535:65535 \
    --architecture amd64 --os linux \
    --config.label "org.opencontainers.image.title=stratum-e2e pause" \
    --config.label "org.opencontainers.image.source=e2e/node/pause.c" >/dev/null
  umoci gc --layout "$work/layout" >/dev/null
  # The index names the image by tag only; containerd wants the full reference.
  python3 - "$work/layout/index.json" "$PAUSE_IMAGE" <<'PY'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
with open(path) as f:
    index = json.load(f)
for m in index["manifests"]:
    m.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = ref
    m["annotations"]["io.containerd.image.name"] = ref
with open(path, "w") as f:
    json.dump(index, f)
PY
  tar -C "$work/layout" -cf "$out.tmp" .
  mv "$out.tmp" "$out"
  echo "$sum" >"$out.src"
  rm -rf "$work"
  echo "$out"
}

import_images() { # FILE...
  local f
  for f in "$@"; do
    log "importing $(basename "$f")"
    in_node "$BIN/ctr" --address "$NODE_DIR/containerd/containerd.sock" -n k8s.io images import \
      --local --all-platforms "$f" >>"$LOGS/import.log" 2>&1 ||
      { tail -n 5 "$LOGS/import.log" >&2; e2e_die "importing $f failed (log: $LOGS/import.log)"; }
  done
}

# ---------------------------------------------------------------------------------------------------
cgroup_controllers() { # every v1 hierarchy mounted under /sys/fs/cgroup (not the unified one)
  local d
  for d in /sys/fs/cgroup/*/; do
    d=${d%/}
    [[ $(basename "$d") == unified ]] && continue
    mountpoint -q "$d" && echo "$d"
  done
}

cgroups_up() {
  local d
  for d in $(cgroup_controllers); do
    mkdir -p "$d$CGROUP_ROOT"
    # A new cpuset cgroup has no CPUs or memory nodes: inherit the parent's.
    if [[ -f $d$CGROUP_ROOT/cpuset.cpus ]]; then
      [[ -n $(cat "$d$CGROUP_ROOT/cpuset.cpus") ]] || cat "$d/cpuset.cpus" >"$d$CGROUP_ROOT/cpuset.cpus"
      [[ -n $(cat "$d$CGROUP_ROOT/cpuset.mems") ]] || cat "$d/cpuset.mems" >"$d$CGROUP_ROOT/cpuset.mems"
    fi
  done
}

cgroups_down() {
  local d
  # Every hierarchy: runc also makes the pods' cgroups in the unified one of a hybrid layout.
  for d in $(cgroup_controllers) /sys/fs/cgroup/unified; do
    [[ -d $d$CGROUP_ROOT ]] || continue
    # Deepest first; a cgroup with processes left would refuse (they were all stopped above).
    find "$d$CGROUP_ROOT" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [[ -d $d$CGROUP_ROOT ]] && log "WARNING: could not remove $d$CGROUP_ROOT (processes left in it?)"
  done
  return 0
}

# Routes back to the node's pods from the root namespace and every kwok node's namespace.
pod_routes() { # add|del
  local op=$1 f name
  if [[ $op == add ]]; then
    ip route replace "$POD_CIDR" via "$NODE_IP" dev "$E2E_BRIDGE"
  elif ip -4 route show exact "$POD_CIDR" table main | grep -q "via $NODE_IP"; then
    ip route del "$POD_CIDR" via "$NODE_IP" dev "$E2E_BRIDGE"
  fi
  [[ -d $E2E_NETNS_STATE ]] || return 0
  for f in "$E2E_NETNS_STATE"/*; do
    [[ -f $f ]] || continue
    name=$(basename "$f")
    [[ $name == "$NODE_NS" ]] && continue
    if [[ $op == add ]]; then
      ip -n "$name" route replace "$POD_CIDR" via "$NODE_IP" dev eth0 2>/dev/null || true
    else
      ip -n "$name" route del "$POD_CIDR" 2>/dev/null || true
    fi
  done
}

# The holder's shell script.
# - Private tmpfs over /run, /var/log and /var/lib: what the node's programs write to their
#   default places (libcni's result cache in /var/lib/cni, runc state, the pods' network
#   namespace files in /run/netns) never reaches the host and goes with the holder.
# - kubelet wants six kernel tunables (vm.overcommit_memory=1, kernel.panic=10,
#   kernel.panic_on_oops=1, ...) and by default writes them machine-wide. It runs with
#   protectKernelDefaults (only checks them), and here reads files holding the values it wants,
#   bound over those /proc/sys entries: the machine's own settings stay as they are.
# - `ip netns exec` mounted a sysfs of the node's network namespace over /sys (so
#   /sys/class/net shows the node's interfaces), which hides the host's cgroup mounts under it:
#   mount the same hierarchies again (the same trees, as the host has them).
holder_script() {
  local mp fstype opts o k v
  echo "set -e"
  echo "mount -t tmpfs -o mode=0755,size=256m stratum-e2e-run /run"
  echo "mount -t tmpfs -o mode=0755,size=64m stratum-e2e-log /var/log"
  echo "mount -t tmpfs -o mode=0755,size=64m stratum-e2e-lib /var/lib"
  echo "mkdir -p /run/stratum-e2e-sysctl"
  for k in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
    kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    v=${k#*=} k=${k%%=*}
    echo "echo $v >/run/stratum-e2e-sysctl/${k//\//.} && mount --bind -o ro /run/stratum-e2e-sysctl/${k//\//.} /proc/sys/$k"
  done
  echo "mount -t tmpfs -o mode=0755 stratum-e2e-cgroup /sys/fs/cgroup"
  while read -r mp fstype opts; do
    if [[ $fstype == cgroup2 ]]; then
      echo "mkdir -p '$mp' && mount -t cgroup2 cgroup2 '$mp'"
    else
      o=$(tr , '\n' <<<"$opts" | grep -vx -e rw -e ro | paste -sd, -)
      [[ $o == name=* ]] && o=none,$o
      echo "mkdir -p '$mp' && mount -t cgroup -o '$o' cgroup '$mp'"
    fi
  done < <(awk '{ for (i = 7; $i != "-"; i++); if (($(i+1) == "cgroup" || $(i+1) == "cgroup2") && $5 ~ "^/sys/fs/cgroup/") print $5, $(i+1), $(i+3) }' /proc/self/mountinfo)
  echo "exec sleep infinity"
}

holder_ready() {
  local pid
  pid=$(pid_of holder)
  grep -q stratum-e2e-cgroup "/proc/$pid/mountinfo" && [[ $(readlink "/proc/$pid/exe") == "$(cat "$PIDS/holder.exe")" ]]
}

node_ready() {
  [[ $(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

cmd_up() {
  local t0 t_ready p
  t0=$(date +%s%N)
  [[ -f $RUN/kubeconfig ]] || e2e_die "no cluster in $RUN (run cluster.sh up)"
  for p in kubelet kube-proxy containerd containerd-shim-runc-v2 ctr coredns; do
    [[ -x $BIN/$p ]] || e2e_die "$BIN/$p missing (run e2e/scripts/build-bins.sh)"
  done
  if running holder; then
    log "already up"
    return 0
  fi
  mkdir -p "$PIDS" "$LOGS" "$NODE_DIR/images"
  rm -f "$LOGS"/*.log
  UP_DONE=0
  trap 'if ((UP_DONE == 0)); then log "up FAILED; stopping what it started (logs: $LOGS)"; cmd_down; fi' EXIT

  log "network namespace $NODE_NS: $NODE_IP (+ $NODE_IP2), pods $POD_CIDR"
  netns_add "$NODE_NS" "$NODE_IP"
  netns_add_addr "$NODE_NS" "$NODE_IP2"
  ip netns exec "$NODE_NS" sysctl -qw net.ipv4.ip_forward=1
  pod_routes add
  cgroups_up

  node_pki
  write_configs
  apply_dns_objects

  # The holder: its own mount namespace (slave: the host's mounts reach it, its own never leave)
  # with private /run and /var/log.
  setsid ip netns exec "$NODE_NS" unshare --mount --propagation slave -- /bin/sh -c "$(holder_script)" \
    </dev/null >"$LOGS/holder.log" 2>&1 &
  echo $! >"$PIDS/holder.pid"
  readlink -f "$(command -v sleep)" >"$PIDS/holder.exe"
  wait_ready holder "mount namespace holder" 10 holder_ready

  start_in_node containerd "$BIN/containerd" --config "$NODE_DIR/containerd/config.toml"
  wait_ready containerd "containerd" 30 in_node "$BIN/ctr" --address "$NODE_DIR/containerd/containerd.sock" version
  import_images "$(pause_image)"
  local images=()
  if [[ -d $IMAGES_DIR ]]; then mapfile -t images < <(find "$IMAGES_DIR" -maxdepth 1 -name '*.oci.tar' | sort); fi
  if ((${#images[@]})); then import_images "${images[@]}"; else log "no *.oci.tar in $IMAGES_DIR (make images); only the pause image"; fi

  start_in_node kubelet "$BIN/kubelet" --config="$NODE_DIR/kubelet/config.yaml" \
    --kubeconfig="$NODE_DIR/kubelet.kubeconfig" --root-dir="$NODE_DIR/kubelet" \
    --cert-dir="$NODE_DIR/pki" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    --node-labels="stratum.e2e/real-node=true" --v=1
  wait_ready kubelet "node $NODE_NAME Ready" 90 node_ready
  t_ready=$((($(date +%s%N) - t0) / 1000000))
  # The pod CIDR, for kube-proxy and for readers; KCM's node IPAM is off (see cluster.sh).
  kc patch node "$NODE_NAME" --type=merge -p "{\"spec\":{\"podCIDR\":\"$POD_CIDR\",\"podCIDRs\":[\"$POD_CIDR\"]}}" >/dev/null

  start_in_node kube-proxy "$BIN/kube-proxy" --config="$NODE_DIR/kube-proxy.yaml" --v=1
  wait_ready kube-proxy "kube-proxy /healthz" 30 in_node curl -fsS --max-time 2 http://127.0.0.1:10256/healthz
  start_in_node coredns "$BIN/coredns" -conf "$NODE_DIR/Corefile"
  wait_ready coredns "CoreDNS /ready" 30 in_node curl -fsS --max-time 2 http://127.0.0.1:18181/ready

  echo "$t_ready" >"$NODE_DIR/ready.ms"
  # shellcheck disable=SC2034 # read by the EXIT trap above
  UP_DONE=1
  log "node $NODE_NAME Ready in $t_ready ms; all up in $((($(date +%s%N) - t0) / 1000000)) ms"
}

# stop NAME...: SIGTERM (only if still our binary), wait up to 15 s, then SIGKILL.
stop() {
  local name pid i
  for name in "$@"; do
    pid=$(pid_of "$name")
    [[ -n $pid ]] || continue
    if running "$name"; then
      kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for 15 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    rm -f "$PIDS/$name.pid" "$PIDS/$name.exe"
  done
}

cmd_down() {
  local holder p
  [[ -d $NODE_DIR ]] || return 0
  log "down"
  holder=$(pid_of holder)
  # kubelet first, so it restarts nothing; then every container: their processes are exactly
  # those in the node's pod cgroups (also after a crashed run, when no PID file is left).
  stop kubelet kube-proxy coredns
  kill_pod_processes
  stop containerd
  # Shims (and anything else of the node) live on in the node's network namespace; end them.
  if [[ -f /run/netns/$NODE_NS ]]; then
    for p in $(ip netns pids "$NODE_NS" 2>/dev/null); do
      [[ $p == "$holder" ]] && continue
      kill -KILL "$p" 2>/dev/null || true
    done
  fi
  # The holder's end takes the node's mount namespace (its tmpfs, kubelet's volume mounts, the
  # pods' network namespace files) with it.
  stop holder
  pod_routes del
  # nftables rules, cni0 and the pods' veths lived in the node's namespaces and go with them.
  if [[ -f $E2E_NETNS_STATE/$NODE_NS ]]; then netns_del "$NODE_NS"; fi
  cgroups_down
  if [[ -f $RUN/kubeconfig ]] && e2e_bridge_up && kc get --raw=/readyz >/dev/null 2>&1; then
    kc delete node "$NODE_NAME" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  fi
  # Nothing of a run carries over: containers, snapshots, pod and IPAM state (images are
  # imported again on `up`; the snapshots were only ever mounted in the holder's namespace).
  rm -rf "$NODE_DIR/containerd/root" "$NODE_DIR/containerd/state" "$NODE_DIR/kubelet" "$NODE_DIR/cni/ipam"
  return 0
}

# SIGKILL to every process in the node's pod cgroups, until none is left (at most 10 s).
kill_pod_processes() {
  local d i pids
  for ((i = 0; i < 50; i++)); do
    # Every hierarchy may lack the node's cgroup (a down after a down, a crashed up): that is
    # no process, not a failure (pipefail would otherwise end `down` here).
    pids=$(for d in $(cgroup_controllers) /sys/fs/cgroup/unified; do
      if [[ -d $d$CGROUP_ROOT ]]; then find "$d$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null || true; fi
    done | sort -u)
    [[ -n $pids ]] || return 0
    # shellcheck disable=SC2086 # a list of PIDs
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  log "WARNING: processes left in the pod cgroups: $pids"
}

# pod_exec NAMESPACE POD CMD...: CMD from this machine inside a pod of the node: in the network
# namespace of its first container, seeing the pod's /etc/resolv.conf (in a private mount
# namespace), without CAP_SYS_TIME. So a host program (ntpdig, chronyd -Q) acts as a client in
# the pod: names resolve through the pod's cluster DNS, packets take the pod's path.
pod_exec() {
  local ns=$1 pod=$2 id pid resolv
  shift 2
  id=$(kc -n "$ns" get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}')
  id=${id#containerd://}
  [[ -n $id ]] || e2e_die "pod $ns/$pod has no running container"
  pid=$(in_node "$BIN/ctr" --address "$NODE_DIR/containerd/containerd.sock" -n k8s.io tasks ls 2>/dev/null |
    awk -v id="$id" '$1 == id {print $2}')
  [[ -n $pid ]] || e2e_die "no task for container $id of $ns/$pod"
  resolv=$(mktemp)
  cat "/proc/$pid/root/etc/resolv.conf" >"$resolv"
  # shellcheck disable=SC2016 # $0 and $@ are the inner shell's
  nsenter --target "$pid" --net -- "${NO_SYS_TIME[@]}" unshare --mount --propagation private -- \
    sh -c 'mount --bind "$0" /etc/resolv.conf && exec "$@"' "$resolv" "$@" || { rm -f "$resolv"; return 1; }
  rm -f "$resolv"
}

cmd_status() {
  local p rc=0
  for p in $PROCS; do
    if running "$p"; then printf '%-12s running  pid %s\n' "$p" "$(pid_of "$p")"; else
      printf '%-12s stopped\n' "$p"
      rc=1
    fi
  done
  if e2e_bridge_up; then kc get node "$NODE_NAME" -o wide 2>/dev/null || true; fi
  return $rc
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    import) shift; import_images "$@" ;;
    exec) shift; in_node "$@" ;;
    ctr) shift; in_node "$BIN/ctr" --address "$NODE_DIR/containerd/containerd.sock" -n k8s.io "$@" ;;
    pod-exec) shift; (($# >= 3)) || e2e_die "usage: node.sh pod-exec NAMESPACE POD CMD..."; pod_exec "$@" ;;
    status) cmd_status ;;
    env)
      cat <<EOF
export STRATUM_E2E_REAL_NODE=$NODE_NAME
export STRATUM_E2E_REAL_NODE_IP=$NODE_IP
export STRATUM_E2E_REAL_NODE_IP2=$NODE_IP2
export STRATUM_E2E_REAL_NODE_POD_CIDR=$POD_CIDR
export STRATUM_E2E_DNS_IP=$DNS_IP
export STRATUM_E2E_NODE_SCRIPT=$E2E_SCRIPTS_DIR/node.sh
EOF
      ;;
    *)
      sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
      [[ ${1:-} == -h || ${1:-} == --help ]] || exit 2
      ;;
  esac
fi
