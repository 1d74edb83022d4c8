#!/usr/bin/env bash
# Network namespaces that own test addresses, so node agents can run as real processes at the IPs
# the cluster lists (node InternalIPs, pod IPs), plus host-side blackholes for the test ranges.
#
# Usage (as root; also usable as a library: `source e2e/scripts/netns.sh` then call netns_*):
#   netns.sh host-up               bridge e2ebr0 (host 10.77.255.254/32) + blackhole routes for
#                                  10.77.0.0/16, 10.78.0.0/16, 10.79.0.0/16 (idempotent)
#   netns.sh add NAME ADDR         namespace NAME owning ADDR (must be in a test range); calls host-up
#   netns.sh add-addr NAME ADDR    a second address for NAME (e.g. a node with two addresses)
#   netns.sh del-addr NAME ADDR    remove it again (netns.sh del removes it too)
#   netns.sh exec NAME CMD...      run CMD inside NAME (same as `ip netns exec NAME CMD...`)
#   netns.sh del NAME              remove namespace NAME, its veth and its host route
#   netns.sh list                  namespaces created by these scripts (state in $E2E_RUN_DIR/netns)
#   netns.sh down-all              remove all of them, then host-down
#   netns.sh host-down             remove bridge and blackholes (refuses while namespaces remain)
#   netns.sh selftest              two namespaces, ping + nc between them, blackhole check, cleanup
#
# Layout:
#   host:  blackhole 10.77.0.0/16, 10.78.0.0/16, 10.79.0.0/16     (nothing in the ranges leaves)
#          e2ebr0 (bridge, no uplink; 10.77.255.254/32)            (L2 only between our veths)
#          ADDR/32 dev e2ebr0 src 10.77.255.254, one per namespace (more specific than the blackhole)
#   NAME:  lo up; eth0 (veth peer of host-side e2e<hex addr>, enslaved to e2ebr0) with ADDR/32 and
#          one on-link route per test range; NO default route, so a process in a namespace can
#          reach only the host's 10.77.255.254 and the other namespaces, nothing else.
# No sysctl is changed (no ip_forward): the host never routes between the bridge and eth0.
set -Eeuo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

E2E_NETNS_STATE=${E2E_NETNS_STATE:-$E2E_RUN_DIR/netns}

_netns_need_root() {
  [[ $(id -u) == 0 ]] || e2e_die "netns.sh needs root (ip netns, veth, routes)"
  command -v ip >/dev/null || e2e_die "'ip' not found (apt-get install -y iproute2)"
}

# Blackhole routes and bridge. Refuses a range that already has a route of its own here (it would
# mean the range is a real network on this machine, and our traffic could reach it).
netns_host_up() {
  _netns_need_root
  local r existing
  for r in $E2E_TEST_RANGES; do
    existing=$(ip -4 route show exact "$r" table main)
    if [[ -z $existing ]]; then
      ip route add blackhole "$r"
    elif [[ $existing != blackhole* ]]; then
      e2e_die "test range $r already has a route here ('$existing'); pick other ranges (E2E_NODE_RANGE etc.)"
    fi
    # Any more specific route into the range that is not ours would also be a leak.
    existing=$(ip -4 route show root "$r" table main | grep -v -e '^blackhole' -e "dev $E2E_BRIDGE " || true)
    [[ -z $existing ]] || e2e_die "routes into test range $r that are not ours: $existing"
  done
  if ! ip link show "$E2E_BRIDGE" >/dev/null 2>&1; then
    ip link add "$E2E_BRIDGE" type bridge
    # Keep the bridge quiet: no IPv6 autoconf/ND on it (a sysctl of our own interface only).
    sysctl -qw "net.ipv6.conf.$E2E_BRIDGE.disable_ipv6=1" 2>/dev/null || true
    ip addr add "$E2E_HOST_IP/32" dev "$E2E_BRIDGE"
    ip link set "$E2E_BRIDGE" up
  fi
}

netns_host_down() {
  _netns_need_root
  local r
  if ip link show "$E2E_BRIDGE" >/dev/null 2>&1; then
    if [[ -n $(ls "/sys/class/net/$E2E_BRIDGE/brif" 2>/dev/null) ]]; then
      e2e_log "netns: $E2E_BRIDGE still has ports; keeping it and the blackholes"
      return 0
    fi
    ip link del "$E2E_BRIDGE"
  fi
  for r in $E2E_TEST_RANGES; do
    if ip -4 route show exact "$r" table main | grep -q '^blackhole'; then
      ip route del blackhole "$r"
    fi
  done
}

# Host-side veth name for an address: e2e + 8 hex digits (fits IFNAMSIZ, unique per address).
_netns_veth() { printf 'e2e%08x' "$(e2e_ip2int "$1")"; }

# netns_exists NAME -> exit 0 if network namespace NAME exists.
netns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

# netns_add NAME ADDR
netns_add() {
  _netns_need_root
  local name=$1 addr=$2 hv r
  [[ $name =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || e2e_die "netns: bad namespace name '$name'"
  [[ $addr =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || e2e_die "netns: '$addr' is not an IPv4 address"
  e2e_in_test_ranges "$addr" || e2e_die "netns: $addr is outside the test ranges ($E2E_TEST_RANGES)"
  [[ $addr != "$E2E_HOST_IP" ]] || e2e_die "netns: $addr is the host's own bridge address"
  if netns_exists "$name"; then
    e2e_die "netns: namespace $name already exists"
  fi
  if ip -4 route show exact "$addr/32" table main | grep -q .; then
    e2e_die "netns: $addr is already owned by another namespace"
  fi
  netns_host_up
  hv=$(_netns_veth "$addr")
  mkdir -p "$E2E_NETNS_STATE"
  printf 'addr=%s\nveth=%s\n' "$addr" "$hv" >"$E2E_NETNS_STATE/$name"
  ip netns add "$name"
  ip -n "$name" link set lo up
  ip link add "$hv" type veth peer name eth0 netns "$name"
  sysctl -qw "net.ipv6.conf.$hv.disable_ipv6=1" 2>/dev/null || true
  ip netns exec "$name" sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1 2>/dev/null || true
  ip link set "$hv" master "$E2E_BRIDGE" up
  ip -n "$name" addr add "$addr/32" dev eth0
  ip -n "$name" link set eth0 up
  for r in $E2E_TEST_RANGES; do
    ip -n "$name" route add "$r" dev eth0 scope link src "$addr"
  done
  ip route add "$addr/32" dev "$E2E_BRIDGE" src "$E2E_HOST_IP"
}

# netns_add_addr NAME ADDR: a second address for namespace NAME (on its eth0, with its host route),
# e.g. a node with two addresses; removed by netns_del.
netns_add_addr() {
  _netns_need_root
  local name=$1 addr=$2 f=$E2E_NETNS_STATE/$1
  [[ -f $f ]] || e2e_die "netns: $name was not made by netns_add"
  [[ $addr =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || e2e_die "netns: '$addr' is not an IPv4 address"
  e2e_in_test_ranges "$addr" || e2e_die "netns: $addr is outside the test ranges ($E2E_TEST_RANGES)"
  if ip -4 route show exact "$addr/32" table main | grep -q .; then
    e2e_die "netns: $addr is already owned by another namespace"
  fi
  echo "extra=$addr" >>"$f"
  ip -n "$name" addr add "$addr/32" dev eth0
  ip route add "$addr/32" dev "$E2E_BRIDGE" src "$E2E_HOST_IP"
}

# netns_del_addr NAME ADDR: undo netns_add_addr.
netns_del_addr() {
  _netns_need_root
  local name=$1 addr=$2 f=$E2E_NETNS_STATE/$1
  [[ -f $f ]] && sed -i "/^extra=${addr//./\\.}\$/d" "$f"
  ip -n "$name" addr del "$addr/32" dev eth0 2>/dev/null || true
  if ip -4 route show exact "$addr/32" table main | grep -q "dev $E2E_BRIDGE"; then
    ip route del "$addr/32" dev "$E2E_BRIDGE"
  fi
}

netns_exec() {
  local name=$1
  shift
  ip netns exec "$name" "$@"
}

netns_del() {
  _netns_need_root
  local name=$1 addr="" veth="" f=$E2E_NETNS_STATE/$1
  if [[ -f $f ]]; then
    addr=$(sed -n 's/^addr=//p' "$f")
    veth=$(sed -n 's/^veth=//p' "$f")
  fi
  for addr in $addr $(sed -n 's/^extra=//p' "$f" 2>/dev/null); do
    if ip -4 route show exact "$addr/32" table main | grep -q "dev $E2E_BRIDGE"; then
      ip route del "$addr/32" dev "$E2E_BRIDGE"
    fi
  done
  # Processes still running inside would keep the namespace's network alive; end them first.
  if ip netns pids "$name" >/dev/null 2>&1; then
    local p
    for p in $(ip netns pids "$name"); do kill "$p" 2>/dev/null || true; done
  fi
  if netns_exists "$name"; then ip netns del "$name"; fi
  # Deleting the namespace removes its veth pair asynchronously: tolerate it being gone.
  if [[ -n $veth ]] && ip link show "$veth" >/dev/null 2>&1; then ip link del "$veth" 2>/dev/null || true; fi
  rm -f "$f"
}

netns_list() {
  local f
  [[ -d $E2E_NETNS_STATE ]] || return 0
  for f in "$E2E_NETNS_STATE"/*; do
    [[ -f $f ]] || continue
    printf '%-20s %s\n' "$(basename "$f")" "$(sed -n 's/^addr=//p' "$f")"
  done
}

netns_down_all() {
  local f
  if [[ -d $E2E_NETNS_STATE ]]; then
    for f in "$E2E_NETNS_STATE"/*; do
      [[ -f $f ]] && netns_del "$(basename "$f")"
    done
  fi
  netns_host_down
}

# Two namespaces, traffic between them and from the host, and a blackholed address in the range.
# Only addresses created here are ever sent to.
_netns_check() {
  local what=$1
  shift
  if "$@"; then e2e_log "  ok: $what"; else
    e2e_log "  FAIL: $what"
    _netns_selftest_ok=0
  fi
}
netns_selftest() {
  local a=e2e-selftest-a b=e2e-selftest-b ipa=10.77.250.1 ipb=10.77.250.2 dead=10.77.250.3 out ncpid
  _netns_selftest_ok=1
  command -v ping >/dev/null || e2e_die "ping missing (apt-get install -y iputils-ping)"
  command -v nc >/dev/null || e2e_die "nc missing (apt-get install -y netcat-openbsd)"
  netns_add "$a" "$ipa"
  netns_add "$b" "$ipb"
  e2e_log "selftest: $a=$ipa $b=$ipb (host $E2E_HOST_IP)"
  _netns_check "ping $a -> $b" netns_exec "$a" ping -c1 -W2 -q "$ipb" >/dev/null
  _netns_check "ping host($E2E_HOST_IP) -> $a" ping -c1 -W2 -q -I "$E2E_HOST_IP" "$ipa" >/dev/null
  netns_exec "$b" nc -l "$ipb" 18080 >"$E2E_NETNS_STATE/.selftest.out" &
  ncpid=$!
  e2e_wait_for "nc listening in $b" 5 netns_exec "$b" grep -qi "$(printf ':%04X ' 18080)" /proc/net/tcp
  echo "hello-from-$a" | netns_exec "$a" nc -N -w2 "$ipb" 18080 || true
  wait "$ncpid" || true
  out=$(cat "$E2E_NETNS_STATE/.selftest.out")
  rm -f "$E2E_NETNS_STATE/.selftest.out"
  _netns_check "tcp $a -> $b:18080 delivered '$out'" test "$out" = "hello-from-$a"
  # A namespace has no default route: anything outside the test ranges is unreachable from inside
  # (route lookup only, nothing is sent).
  out=$(netns_exec "$a" ip route get 192.0.2.1 2>&1 || true)
  _netns_check "no route out of $a to 192.0.2.1 ($out)" grep -q unreachable <<<"$out"
  # The host's most specific route for an unowned address in the range is the blackhole: route
  # lookup fails with EINVAL and a send fails locally before any packet exists.
  out=$(ip -4 route show match "$dead" table main | grep -v '^default' | tail -n1)
  _netns_check "longest host route for unowned $dead is '$out'" grep -q '^blackhole' <<<"$out"
  out=$(ip route get "$dead" 2>&1 || true)
  _netns_check "ip route get $dead -> '$out'" grep -q 'Invalid argument' <<<"$out"
  out=$(ping -c1 -W1 "$dead" 2>&1 || true)
  _netns_check "ping $dead refused locally ('$(tail -n1 <<<"$out")')" grep -q 'Invalid argument' <<<"$out"
  netns_del "$a"
  netns_del "$b"
  netns_host_down
  ((_netns_selftest_ok)) || e2e_die "netns selftest failed"
  e2e_log "netns selftest passed (namespaces, routes and blackholes removed)"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  cmd=${1:-}
  shift || true
  case "$cmd" in
    host-up) netns_host_up ;;
    host-down) netns_host_down ;;
    add) (($# == 2)) || e2e_die "usage: netns.sh add NAME ADDR"; netns_add "$@" ;;
    del) (($# == 1)) || e2e_die "usage: netns.sh del NAME"; netns_del "$1" ;;
    add-addr) (($# == 2)) || e2e_die "usage: netns.sh add-addr NAME ADDR"; netns_add_addr "$@" ;;
    del-addr) (($# == 2)) || e2e_die "usage: netns.sh del-addr NAME ADDR"; netns_del_addr "$@" ;;
    exec) (($# >= 2)) || e2e_die "usage: netns.sh exec NAME CMD..."; netns_exec "$@" ;;
    list) netns_list ;;
    down-all) netns_down_all ;;
    selftest) netns_selftest ;;
    *) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; [[ $cmd == -h || $cmd == --help ]] || exit 2 ;;
  esac
fi
