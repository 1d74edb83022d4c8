#!/usr/bin/env bash
# Installs what the server tests and `make bench` compare against, on a fresh Debian machine:
# chrony (chronyd -x / -Q), ntpsec's ntpdig, and ntpd-rs from crates.io into a cache directory
# outside the clone. Idempotent; safe to re-run. Never starts a time service: a policy-rc.d
# that exits 101 stops the packages' maintainer scripts from starting chronyd.
#
# NTPD_RS_PROFILE=release (default, what the benchmark measures) or debug: the tests only use
# ntpd-rs as a client, and its debug build takes a fraction of the release build's time on a
# fresh machine (`make deps` asks for debug; a release build, when present, serves both).
#
# Prints the ntpd-rs binary directory last, e.g.:  NTPD_RS_BIN=/root/.cache/stratum/ntpd-rs-1.9.0/bin
set -euo pipefail

NTPD_RS_VERSION="${NTPD_RS_VERSION:-1.9.0}"
NTPD_RS_PROFILE="${NTPD_RS_PROFILE:-release}"
CACHE="${STRATUM_CACHE:-$HOME/.cache/stratum}"
NTPD_RS_ROOT="$CACHE/ntpd-rs-$NTPD_RS_VERSION"
install_flags=()
case $NTPD_RS_PROFILE in
  release) ;;
  debug)
    if [ ! -x "$NTPD_RS_ROOT/bin/ntp-daemon" ]; then
      NTPD_RS_ROOT="$CACHE/ntpd-rs-$NTPD_RS_VERSION-debug"
      install_flags=(--debug)
    fi
    ;;
  *) echo "setup.sh: NTPD_RS_PROFILE must be release or debug, not '$NTPD_RS_PROFILE'" >&2; exit 2 ;;
esac

need_apt=()
command -v chronyd >/dev/null || need_apt+=(chrony)
command -v ntpdig >/dev/null || need_apt+=(ntpsec-ntpdig)
if [ "${#need_apt[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    # Debian starts services from maintainer scripts unless policy-rc.d forbids it; a time
    # daemon started here would fight for (and, with CAP_SYS_TIME, change) this machine's clock.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if [ ! -x "$NTPD_RS_ROOT/bin/ntp-daemon" ]; then
    echo "setup.sh: building ntpd-rs $NTPD_RS_VERSION ($NTPD_RS_PROFILE) from crates.io into $NTPD_RS_ROOT (minutes)" >&2
    mkdir -p "$NTPD_RS_ROOT"
    # Its own target dir, so it never shares (or locks) the workspace's build directory.
    CARGO_TARGET_DIR="$CACHE/ntpd-rs-build" nice -n 10 \
        cargo install ntpd --version "$NTPD_RS_VERSION" --locked --root "$NTPD_RS_ROOT" "${install_flags[@]}"
    rm -rf "$CACHE/ntpd-rs-build"
fi
echo "NTPD_RS_BIN=$NTPD_RS_ROOT/bin"
