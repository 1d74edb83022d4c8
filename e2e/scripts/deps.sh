#!/usr/bin/env bash
# Install the Debian packages the e2e scripts use, if any is missing (a fresh machine of this kind
# lacks ping and nc). Needs root. Go itself (>= 1.26) is expected on the machine already.
# The real node (node.sh) adds runc and the CNI plugins (containerd's runtime and pod network),
# nftables (kube-proxy's nftables mode runs `nft`), umoci and musl-tools (its pause image).
#
# Usage: e2e/scripts/deps.sh [--with-shellcheck]
set -euo pipefail

want=(openssl:openssl curl:curl ip:iproute2 ping:iputils-ping nc:netcat-openbsd flock:util-linux setsid:util-linux ss:iproute2
  nsenter:util-linux unshare:util-linux runc:runc nft:nftables umoci:umoci musl-gcc:musl-tools)
[[ ${1:-} == --with-shellcheck ]] && want+=(shellcheck:shellcheck)

missing=()
for pair in "${want[@]}"; do
  cmd=${pair%%:*} pkg=${pair#*:}
  PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null || missing+=("$pkg")
done
# The CNI plugins are not on PATH (Debian puts them in /usr/lib/cni).
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] || missing+=(containernetworking-plugins)
# nc must be the OpenBSD one (the scripts use `nc -N` and `nc -l ADDR PORT`).
if command -v nc >/dev/null && ! nc -h 2>&1 | grep -q -- '[[:space:]]-N[[:space:]]'; then missing+=(netcat-openbsd); fi

if ((${#missing[@]} == 0)); then
  echo "e2e deps: all present"
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
[[ $(id -u) == 0 ]] || { echo "e2e deps: missing ${missing[*]}; run as root to install" >&2; exit 1; }
echo "e2e deps: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
echo "e2e deps: installed ${missing[*]}"
