# shellcheck shell=bash disable=SC2034
# Shared settings and helpers for the e2e scripts; sourced, never run.
#
# Test address ranges (all RFC 1918, none used on this machine or reachable from it; host-side
# blackhole routes for all three are installed by `cluster.sh up` / `netns.sh host-up`, so a packet
# to any of them either reaches a network namespace our scripts created or is dropped right here):
#   10.77.0.0/16  fake node InternalIPs (node i -> 10.77.0.(10+i)); 10.77.255.254 is the host's own
#                 address on the test bridge, also the apiserver's advertise address
#   10.78.0.0/16  pod IPs (node i gets spec.podCIDR 10.78.i.0/24; kwok hands out IPs from it;
#                 10.78.255.0/24 serves nodes created without a podCIDR)
#   10.79.0.0/16  service ClusterIPs (--service-cluster-ip-range; 10.79.0.1 = kubernetes.default)
E2E_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$E2E_SCRIPTS_DIR/versions.env"

E2E_NODE_RANGE=${E2E_NODE_RANGE:-10.77.0.0/16}
E2E_POD_RANGE=${E2E_POD_RANGE:-10.78.0.0/16}
E2E_SVC_RANGE=${E2E_SVC_RANGE:-10.79.0.0/16}
E2E_TEST_RANGES="$E2E_NODE_RANGE $E2E_POD_RANGE $E2E_SVC_RANGE"
E2E_HOST_IP=${E2E_HOST_IP:-10.77.255.254}
E2E_BRIDGE=${E2E_BRIDGE:-e2ebr0}

# Run directory (PKI, data, logs, PID files, kubeconfig). Default: e2e/.run in the clone (git-ignored).
E2E_RUN_DIR=${E2E_RUN_DIR:-$(cd "$E2E_SCRIPTS_DIR/.." && pwd)/.run}

# Ports, all on 127.0.0.1 and away from the upstream defaults (2379/2380, 6443, 10257, 10259, 10250).
E2E_ETCD_PORT=${E2E_ETCD_PORT:-12379}
E2E_ETCD_PEER_PORT=${E2E_ETCD_PEER_PORT:-12380}
E2E_APISERVER_PORT=${E2E_APISERVER_PORT:-16443}
E2E_KCM_PORT=${E2E_KCM_PORT:-16257}
E2E_SCHEDULER_PORT=${E2E_SCHEDULER_PORT:-16259}
E2E_KWOK_PORT=${E2E_KWOK_PORT:-16250}

e2e_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
e2e_die() {
  e2e_log "ERROR: $*"
  exit 1
}

# e2e_wait_for DESCRIPTION TIMEOUT_SECONDS COMMAND...
# Polls COMMAND (quietly) until it succeeds; fails after the timeout. If E2E_WAIT_PIDFILE names a
# PID file, fails at once when that process has died (and shows its log, E2E_WAIT_LOG).
e2e_wait_for() {
  local what=$1 timeout=$2 t0 pid
  shift 2
  t0=$(date +%s%N)
  while ! "$@" >/dev/null 2>&1; do
    if [[ -n ${E2E_WAIT_PIDFILE:-} ]]; then
      pid=$(cat "$E2E_WAIT_PIDFILE" 2>/dev/null || true)
      if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
        e2e_log "ERROR: process of $E2E_WAIT_PIDFILE exited while waiting for: $what"
        [[ -n ${E2E_WAIT_LOG:-} && -f ${E2E_WAIT_LOG:-} ]] && tail -n 30 "$E2E_WAIT_LOG" | sed 's/^/    /' >&2
        return 1
      fi
    fi
    if (($(date +%s%N) - t0 > timeout * 1000000000)); then
      e2e_log "ERROR: timed out after ${timeout}s waiting for: $what"
      [[ -n ${E2E_WAIT_LOG:-} && -f ${E2E_WAIT_LOG:-} ]] && tail -n 30 "$E2E_WAIT_LOG" | sed 's/^/    /' >&2
      return 1
    fi
    sleep 0.2
  done
  e2e_log "    ready: $what ($((($(date +%s%N) - t0) / 1000000)) ms)"
}

# IPv4 helpers (pure bash).
e2e_ip2int() {
  local IFS=. a b c d
  read -r a b c d <<<"$1"
  echo $(((a << 24) | (b << 16) | (c << 8) | d))
}
e2e_int2ip() { echo "$((($1 >> 24) & 255)).$((($1 >> 16) & 255)).$((($1 >> 8) & 255)).$(($1 & 255))"; }
# e2e_in_cidr IP CIDR -> exit 0 if IP is inside CIDR
e2e_in_cidr() {
  local ip net len mask
  ip=$(e2e_ip2int "$1")
  net=$(e2e_ip2int "${2%/*}")
  len=${2#*/}
  mask=$(((0xffffffff << (32 - len)) & 0xffffffff))
  (((ip & mask) == (net & mask)))
}
# e2e_in_test_ranges IP -> exit 0 if IP is inside one of E2E_TEST_RANGES
e2e_in_test_ranges() {
  local r
  for r in $E2E_TEST_RANGES; do e2e_in_cidr "$1" "$r" && return 0; done
  return 1
}

# e2e_bridge_up -> exit 0 if the stack's bridge exists and holds E2E_HOST_IP. Only then is a packet
# to E2E_HOST_IP (the API server's address) ours: without the bridge, and with the blackholes gone
# after `down`, the main table would route it off this machine through the default gateway.
e2e_bridge_up() {
  ip -4 -o addr show dev "$E2E_BRIDGE" 2>/dev/null | grep -qF " $E2E_HOST_IP/"
}

# PKI of a run (openssl, ECDSA P-256, 30 days), shared by cluster.sh and node.sh.
# e2e_pki_cert DIR NAME SUBJECT EKU [SAN]: DIR/NAME.{key,crt} signed by DIR/${PKI_CA:-ca}.{crt,key}
# (client certs map to users: CN = user, O = groups).
e2e_pki_cert() {
  local dir=$1 name=$2 subj=$3 eku=$4 san=${5:-} ca=${PKI_CA:-ca}
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "$subj" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -z $san ]] || echo "subjectAltName=$san"
  } >"$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/$ca.crt" -CAkey "$dir/$ca.key" -CAcreateserial \
    -days 30 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
  chmod 600 "$dir/$name.key"
  openssl verify -CAfile "$dir/$ca.crt" "$dir/$name.crt" >/dev/null
}

# e2e_write_kubeconfig PKI_DIR SERVER FILE USER CERT: a kubeconfig (mode 600) for USER holding
# PKI_DIR/CERT.{crt,key} and the CA.
e2e_write_kubeconfig() {
  local pki=$1 server=$2 file=$3 user=$4 cert=$5
  (
    umask 077
    cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: stratum-e2e
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: "$user"
  user:
    client-certificate-data: $(base64 -w0 <"$pki/$cert.crt")
    client-key-data: $(base64 -w0 <"$pki/$cert.key")
contexts:
- name: stratum-e2e
  context: {cluster: stratum-e2e, user: "$user"}
current-context: stratum-e2e
EOF
  )
}
