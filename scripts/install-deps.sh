#!/usr/bin/env bash
# Installs what a fresh machine lacks for `make test`, `make demo` and `make bench`; quick and
# silent when everything is there. Debian packages are installed with service start blocked
# (a policy-rc.d that exits 101), so chronyd and prometheus never start as system services
# and nothing here can discipline this machine's clock.
set -euo pipefail

log() { printf '[deps] %s\n' "$*"; }

# Rust components.
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    log "rustup component add $component"
    rustup component add "$component"
  fi
done

# Debian packages: binary -> package.
declare -A packages=(
  [chronyd]=chrony
  [ntpdig]=ntpsec-ntpdig
  [promtool]=prometheus
  [shellcheck]=shellcheck
  [ip]=iproute2
  [setpriv]=util-linux
  [openssl]=openssl
  [curl]=curl
  [taskset]=util-linux
  [faketime]=faketime
)
missing=()
for binary in "${!packages[@]}"; do
  command -v "$binary" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$binary" >/dev/null 2>&1 || missing+=("${packages[$binary]}")
done
python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  log "installing Debian packages: ${missing[*]}"
  if [[ ! -x /usr/sbin/policy-rc.d ]] || ! grep -q 'exit 101' /usr/sbin/policy-rc.d; then
    printf '#!/bin/sh\n# Stratum: never start services on install (no chronyd, no prometheus).\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
