#!/usr/bin/env bash
# Build and cache the real control plane for the e2e tests, from the Go module proxy only:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm, and for the
#   real node kubelet, kube-proxy, containerd (+ its runc shim and ctr) and CoreDNS.
#
# Usage:
#   e2e/scripts/build-bins.sh                  build what is missing (cold: ~30-45 min on 2 cores),
#                                              or report the cached versions (warm: seconds);
#                                              last line on stdout is BIN=<bin dir>
#   e2e/scripts/build-bins.sh --print-bin-dir  print the bin dir for the pinned versions; no build
#   e2e/scripts/build-bins.sh --check          exit 0 if the cache is complete, 1 if not; no build
#   e2e/scripts/build-bins.sh --check-updates  newer patches of the pinned lines that the proxy AND
#                                              the checksum database serve (a few look-ups); no build
#
# Versions come from versions.env (override with E2E_K8S_VERSION etc.). The cache lives outside the
# clone: ${E2E_BIN_CACHE:-$HOME/.cache/stratum-e2e}/<k8s>-<etcd>-<kwok>-<helm>-<containerd>-<coredns>/
# {bin,src,logs,kwok-stages}.
# Progress goes to stderr with timestamps; the Go tool's own output goes to <cache>/logs/<step>.log
# and its tail is shown when a step fails.
#
# Each project gets its own small wrapper module under <cache>/src/ (so minimum version
# selection never mixes, say, etcd's grpc into kube-apiserver). Kubernetes needs the wrapper anyway:
# k8s.io/kubernetes requires its staging modules as `k8s.io/X v0.0.0` and maps them with replace
# directives that only work in the main module, so the wrapper gets replace lines generated from the
# release's own go.mod, mapping each to the published k8s.io/X v0.<minor>.<patch>.
#
# Go builds run under `nice -n 10`, one at a time (the machine has 2 cores, shared with cargo).
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$SCRIPT_DIR/versions.env"

MODE=build
case "${1:-}" in
  "") ;;
  --print-bin-dir) MODE=print ;;
  --check) MODE=check ;;
  --check-updates) MODE=updates ;;
  -h | --help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "build-bins.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

K8S=$E2E_K8S_VERSION ETCD=$E2E_ETCD_VERSION KWOK=$E2E_KWOK_VERSION HELM=$E2E_HELM_VERSION
CONTAINERD=$E2E_CONTAINERD_VERSION COREDNS=$E2E_COREDNS_VERSION
CACHE=$E2E_CACHE_DIR BIN=$E2E_BIN_DIR SRC=$E2E_CACHE_DIR/src LOGS=$E2E_CACHE_DIR/logs
TIMES=$E2E_CACHE_DIR/build-times.txt

if [[ $MODE == print ]]; then
  echo "$BIN"
  exit 0
fi

# --check-updates: newer patches of the pinned lines that can really be used. `go list -m -versions`
# is not enough: here it omitted v1.36.2, v1.36.4 and v1.36.5, and v1.36.5 had an .info on the proxy
# but no checksum database entry (so `go mod download` refuses it). A patch counts only if
# `go mod download` (which verifies against the checksum database) succeeds.
if [[ $MODE == updates ]]; then
  export GOTOOLCHAIN=local
  probe_line() { # module pinned-version
    local mod=$1 pinned=$2 prefix n v misses=0 newest=$2 out
    prefix=${pinned%.*}
    n=${pinned##*.}
    while ((misses < 3)); do
      n=$((n + 1))
      v=$prefix.$n
      out=$(cd / && { go mod download -json "$mod@$v" 2>&1 || true; })
      if grep -q '"Error"\|^go: ' <<<"$out"; then
        misses=$((misses + 1))
        printf '  %-28s %-9s not usable: %s\n' "$mod" "$v" "$(grep -o '[0-9]\{3\} [A-Za-z ]*\|not available\|verifying[^:]*' <<<"$out" | head -1)"
      else
        misses=0
        newest=$v
        printf '  %-28s %-9s available and verified\n' "$mod" "$v"
      fi
    done
    printf '%-28s pinned %-9s newest usable %s\n' "$mod" "$pinned" "$newest"
  }
  probe_line k8s.io/kubernetes "$K8S"
  probe_line go.etcd.io/etcd/server/v3 "$ETCD"
  probe_line sigs.k8s.io/kwok "$KWOK"
  probe_line helm.sh/helm/v3 "$HELM"
  probe_line github.com/containerd/containerd/v2 "$CONTAINERD"
  probe_line github.com/coredns/coredns "$COREDNS"
  exit 0
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

all_present() {
  local b
  for b in $E2E_BINARIES; do [[ -x $BIN/$b ]] || return 1; done
  [[ -f $E2E_KWOK_STAGES_DIR/.complete ]]
}

report_versions() {
  log "versions in $BIN:"
  {
    printf '  %-24s %s\n' etcd "$("$BIN/etcd" --version | head -1)"
    local b
    for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
      printf '  %-24s %s\n' "$b" "$("$BIN/$b" --version)"
    done
    printf '  %-24s %s\n' kubectl "$("$BIN/kubectl" version --client | head -1)"
    printf '  %-24s %s\n' kwok "$("$BIN/kwok" --version)"
    printf '  %-24s %s\n' helm "$("$BIN/helm" version --short)"
    printf '  %-24s %s\n' containerd "$("$BIN/containerd" --version)"
    printf '  %-24s %s\n' coredns "$("$BIN/coredns" -version | head -1)"
  } >&2
}

if [[ $MODE == check ]]; then
  if all_present; then exit 0; fi
  exit 1
fi

# ---------------------------------------------------------------------------------------------------
# Fast path: everything is cached.
if all_present; then
  log "cache is warm ($E2E_CACHE_KEY): nothing to build"
  report_versions
  echo "BIN=$BIN"
  exit 0
fi

# ---------------------------------------------------------------------------------------------------
STEP=preflight
STEP_LOG=
on_err() {
  local rc=$?
  # errtrace also runs this in $(...) subshells; report once, from the main shell.
  [[ $BASHPID == "$$" ]] || exit "$rc"
  log "FAILED in step '$STEP' (exit $rc)."
  if [[ -n $STEP_LOG && -s $STEP_LOG ]]; then
    log "last lines of $STEP_LOG:"
    tail -n 40 "$STEP_LOG" | sed 's/^/    /' >&2
  fi
  log "binaries finished so far are kept in $BIN; re-run to resume."
  exit "$rc"
}
trap on_err ERR

# Run a command of the current step with its output in logs/<step>.log.
run() {
  STEP_LOG=$LOGS/$STEP.log
  printf '\n### [%s] %s\n' "$(date +%H:%M:%S)" "$*" >>"$STEP_LOG"
  "$@" >>"$STEP_LOG" 2>&1
}
# Go, never fetching another toolchain, pure-Go static binaries (as upstream builds these), niced.
gocmd() { run nice -n 10 env GOTOOLCHAIN=local CGO_ENABLED=0 go "$@"; }

STEP_T0=0
step() {
  STEP=$1
  STEP_T0=$(date +%s)
  log "==> $STEP: $2"
}
step_done() {
  local secs=$(($(date +%s) - STEP_T0))
  log "    $STEP done in ${secs}s"
  printf '%s %s %ss\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$STEP" "$secs" >>"$TIMES"
}

command -v go >/dev/null || die "go not found in PATH (needs Go >= 1.26)"
export GOTOOLCHAIN=local
GOVER=$(go env GOVERSION)
mkdir -p "$BIN" "$SRC" "$LOGS"

# One build at a time per cache dir (a second invocation waits instead of corrupting the first).
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "another build-bins.sh holds $CACHE/.lock; waiting for it"
  flock 9
  if all_present; then report_versions; echo "BIN=$BIN"; exit 0; fi
fi

T_ALL=$(date +%s)
log "building control plane $E2E_CACHE_KEY with $GOVER into $BIN"
log "Go output: $LOGS/<step>.log; step timings: $TIMES"
avail_kb=$(df -Pk "$CACHE" | awk 'NR==2{print $4}')
((avail_kb > 12 * 1024 * 1024)) || log "WARNING: only $((avail_kb / 1024)) MiB free under $CACHE; a cold build needs ~10 GiB (module cache + build cache + binaries)"

# Install $tmp as $BIN/$name only once it is complete, so an interrupted build never looks finished.
install_bin() { mv -f "$1" "$BIN/$2"; }

# Start a wrapper module in $SRC/$1 that mirrors the `go` and `godebug` lines of the go.mod in $2
# (both only take effect in the main module; godebug default=go1.26 changes runtime defaults).
wrapper_module() {
  local dir=$SRC/$1 gomod=$2 kv
  mkdir -p "$dir"
  cd "$dir"
  rm -f go.mod go.sum
  run go mod init "e2e.local/$1"
  run go mod edit -go="$(awk '$1=="go"{print $2; exit}' "$gomod")"
  while read -r kv; do
    run go mod edit -godebug="$kv"
  done < <(sed -n 's/^godebug[[:space:]]\{1,\}\([^(].*\)$/\1/p' "$gomod")
}

# Path of the go.mod of module@version (downloads module metadata only).
module_gomod() {
  local out
  out=$(GOTOOLCHAIN=local go mod download -json "$1" 2>&1) || { echo "$out" >&2; return 1; }
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$out"
}
# Commit time of module@version as recorded by the proxy (used as a reproducible build date).
module_time() {
  GOTOOLCHAIN=local go list -m -json "$1" | sed -n 's/^[[:space:]]*"Time": "\(.*\)",\{0,1\}$/\1/p'
}

# ---------------------------------------------------------------------------------------------------
# etcd: server/go.mod has `replace ... => ../api` lines, so `go install …@ver` refuses it; a wrapper
# module ignores them and uses the published go.etcd.io/etcd/*/v3 $ETCD tags it requires.
if [[ ! -x $BIN/etcd ]]; then
  step etcd-download "etcd $ETCD: resolve and download modules"
  ETCD_GOMOD=$(module_gomod "go.etcd.io/etcd/server/v3@$ETCD")
  wrapper_module etcd "$ETCD_GOMOD"
  gocmd get "go.etcd.io/etcd/server/v3@$ETCD"
  step_done
  step etcd-build "compile etcd"
  gocmd build -buildvcs=false -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD" \
    -o "$BIN/.etcd.tmp" go.etcd.io/etcd/server/v3
  install_bin "$BIN/.etcd.tmp" etcd
  step_done
fi

# ---------------------------------------------------------------------------------------------------
# Kubernetes: one wrapper module; replace lines generated from the release's own go.mod.
K8S_BINS="kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy"
need_k8s=0
for b in $K8S_BINS; do [[ -x $BIN/$b ]] || need_k8s=1; done
if ((need_k8s)); then
  step k8s-download "Kubernetes $K8S: generate wrapper go.mod and download modules"
  STAGING=v0.${K8S#v1.}
  K8S_MINOR=$(cut -d. -f2 <<<"$K8S")
  K8S_GOMOD=$(module_gomod "k8s.io/kubernetes@$K8S")
  [[ -f $K8S_GOMOD ]] || die "no go.mod for k8s.io/kubernetes@$K8S (is $K8S on the proxy? go list -m -versions k8s.io/kubernetes)"
  wrapper_module k8s "$K8S_GOMOD"
  # The staging modules: every k8s.io/* module the release requires at the placeholder v0.0.0.
  mapfile -t staging < <(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$K8S_GOMOD")
  ((${#staging[@]} > 20)) || die "found only ${#staging[@]} staging modules in $K8S_GOMOD; go.mod layout changed?"
  for m in "${staging[@]}"; do
    run go mod edit -replace="$m=$m@$STAGING"
  done
  log "    $K8S: ${#staging[@]} staging modules mapped to $STAGING"
  # `go get` resolves and downloads everything the four commands import (this is most of the
  # download time: k8s.io/kubernetes plus ~200 modules).
  pkgs=()
  for b in $K8S_BINS; do pkgs+=("k8s.io/kubernetes/cmd/$b@$K8S"); done
  gocmd get "${pkgs[@]}"
  step_done

  # Same flags as upstream: hack/lib/golang.sh (tags selinux,notest,grpcnotrace; -trimpath; -s -w)
  # and hack/lib/version.sh (-X for both version packages). Without them /version says
  # v0.0.0-master, which breaks semver checks in helm, kwokctl and clients.
  BUILD_DATE=$(module_time "k8s.io/kubernetes@$K8S")
  LDF="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    LDF+=" -X $p.gitVersion=$K8S -X $p.gitMajor=1 -X $p.gitMinor=$K8S_MINOR -X $p.gitTreeState=clean"
    # The proxy does not record the release commit; an all-zero commit says "unknown" honestly.
    LDF+=" -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.buildDate=$BUILD_DATE"
  done
  for b in $K8S_BINS; do
    [[ -x $BIN/$b ]] && continue
    step "build-$b" "compile $b $K8S"
    cd "$SRC/k8s"
    gocmd build -buildvcs=false -trimpath -tags selinux,notest,grpcnotrace -ldflags "$LDF" \
      -o "$BIN/.$b.tmp" "k8s.io/kubernetes/cmd/$b"
    install_bin "$BIN/.$b.tmp" "$b"
    step_done
  done
fi

# ---------------------------------------------------------------------------------------------------
# kwok: the controller that plays kubelet for fake nodes. Its stages (node/pod lifecycle) are YAML in
# the module; the standalone binary has no defaults, so cluster.sh feeds it these copies.
if [[ ! -x $BIN/kwok || ! -f $E2E_KWOK_STAGES_DIR/.complete ]]; then
  step kwok-download "kwok $KWOK: download modules"
  KWOK_GOMOD=$(module_gomod "sigs.k8s.io/kwok@$KWOK")
  wrapper_module kwok "$KWOK_GOMOD"
  gocmd get "sigs.k8s.io/kwok/cmd/kwok@$KWOK"
  KWOK_DIR=$(GOTOOLCHAIN=local go list -m -f '{{.Dir}}' "sigs.k8s.io/kwok")
  [[ -d $KWOK_DIR/kustomize/stage ]] || die "no kustomize/stage in $KWOK_DIR"
  rm -rf "$E2E_KWOK_STAGES_DIR"
  mkdir -p "$E2E_KWOK_STAGES_DIR"
  cp -r "$KWOK_DIR/kustomize/stage/." "$E2E_KWOK_STAGES_DIR/"
  chmod -R u+w "$E2E_KWOK_STAGES_DIR" # module cache files are read-only
  touch "$E2E_KWOK_STAGES_DIR/.complete"
  step_done
  if [[ ! -x $BIN/kwok ]]; then
    step kwok-build "compile kwok"
    gocmd build -buildvcs=false -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK" \
      -o "$BIN/.kwok.tmp" sigs.k8s.io/kwok/cmd/kwok
    install_bin "$BIN/.kwok.tmp" kwok
    step_done
  fi
fi

# ---------------------------------------------------------------------------------------------------
# helm v3: without -X …/internal/version.version it reports just "v3.21" (see its Makefile).
if [[ ! -x $BIN/helm ]]; then
  step helm-download "helm $HELM: download modules"
  HELM_GOMOD=$(module_gomod "helm.sh/helm/v3@$HELM")
  wrapper_module helm "$HELM_GOMOD"
  gocmd get "helm.sh/helm/v3/cmd/helm@$HELM"
  # Like helm's Makefile: the default Kubernetes version for `helm template` follows client-go.
  CG=$(GOTOOLCHAIN=local go list -m -f '{{.Version}}' k8s.io/client-go) # v0.36.2 -> 1.36
  CG_MINOR=$(cut -d. -f2 <<<"$CG")
  step_done
  step helm-build "compile helm"
  HV=helm.sh/helm/v3/internal/version
  gocmd build -buildvcs=false -trimpath -ldflags "-s -w -X $HV.version=$HELM -X $HV.gitTreeState=clean \
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$CG_MINOR \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$CG_MINOR" \
    -o "$BIN/.helm.tmp" helm.sh/helm/v3/cmd/helm
  install_bin "$BIN/.helm.tmp" helm
  step_done
fi

# ---------------------------------------------------------------------------------------------------
# containerd 2.x, the real node's runtime: containerd, its runc shim and ctr (to import images).
# No replace lines in its go.mod, but a wrapper keeps its client-go/grpc apart from Kubernetes'.
# Flags as its Makefile for a static build: CGO off (no btrfs, whose driver needs cgo headers),
# tags no_btrfs static_build, version via -X on $PKG/version.
if [[ ! -x $BIN/containerd || ! -x $BIN/containerd-shim-runc-v2 || ! -x $BIN/ctr ]]; then
  step containerd-download "containerd $CONTAINERD: download modules"
  CTRD=github.com/containerd/containerd/v2
  CONTAINERD_GOMOD=$(module_gomod "$CTRD@$CONTAINERD")
  wrapper_module containerd "$CONTAINERD_GOMOD"
  gocmd get "$CTRD/cmd/containerd@$CONTAINERD" "$CTRD/cmd/containerd-shim-runc-v2@$CONTAINERD" "$CTRD/cmd/ctr@$CONTAINERD"
  step_done
  # The proxy does not record the commit; the version string says which tag it is.
  CLDF="-s -w -X $CTRD/version.Version=$CONTAINERD -X $CTRD/version.Revision=proxy-$CONTAINERD -X $CTRD/version.Package=$CTRD"
  for b in containerd containerd-shim-runc-v2 ctr; do
    [[ -x $BIN/$b ]] && continue
    step "build-$b" "compile $b $CONTAINERD"
    cd "$SRC/containerd"
    gocmd build -buildvcs=false -trimpath -tags "no_btrfs static_build" -ldflags "$CLDF" \
      -o "$BIN/.$b.tmp" "$CTRD/cmd/$b"
    install_bin "$BIN/.$b.tmp" "$b"
    step_done
  done
fi

# ---------------------------------------------------------------------------------------------------
# CoreDNS (the cluster's DNS for `<svc>.<ns>.svc.cluster.local`): package main at the module root,
# every default plugin compiled in. No replace lines; own wrapper (it is on client-go v0.37).
if [[ ! -x $BIN/coredns ]]; then
  step coredns-download "CoreDNS $COREDNS: download modules"
  COREDNS_GOMOD=$(module_gomod "github.com/coredns/coredns@$COREDNS")
  wrapper_module coredns "$COREDNS_GOMOD"
  gocmd get "github.com/coredns/coredns@$COREDNS"
  step_done
  step coredns-build "compile coredns"
  gocmd build -buildvcs=false -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS" \
    -o "$BIN/.coredns.tmp" github.com/coredns/coredns
  install_bin "$BIN/.coredns.tmp" coredns
  step_done
fi

# ---------------------------------------------------------------------------------------------------
STEP=verify
trap - ERR
all_present || die "build finished but binaries are missing in $BIN"
v=$("$BIN/kube-apiserver" --version)
[[ $v == "Kubernetes $K8S" ]] || die "kube-apiserver --version says '$v', expected 'Kubernetes $K8S' (version ldflags?)"
log "all built in $(($(date +%s) - T_ALL))s"
printf '%s total %ss\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(($(date +%s) - T_ALL))" >>"$TIMES"
report_versions
echo "BIN=$BIN"
