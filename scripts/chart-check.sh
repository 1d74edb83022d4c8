#!/usr/bin/env bash
# Static checks of the Helm chart and its monitoring: what `make chart` runs.
#
# Usage:
#   scripts/chart-check.sh [--check]
#       1. CRDs: copy crds/*.yaml into charts/stratum/crds/ (the chart's copy is never edited);
#          with --check, copy nothing and fail when the copy differs (CI: "run make chart")
#       2. helm lint --strict, default values and ci/full-values.yaml
#       3. helm template, default and full values; every document is a well-formed object
#       4. alerts: promtool check rules + promtool test rules on files/alerts.yaml, and the
#          PrometheusRule the chart renders with default values equals that file
#       5. dashboard: every query parses as PromQL, the ConfigMap ships files/dashboard.json,
#          and (with the `prometheus` binary) every query returns data from a loopback
#          Prometheus scraping the contract-shaped sample pages in tests/fixtures/
#       6. images: the default names are what `make images` builds; image.registry and
#          image.tag move both images; pull secrets reach the operator pods and the agents;
#          agent.priorityClassName reaches the operator's --agent-priority-class
#       7. shellcheck of the chart's scripts (when shellcheck is installed)
#       8. audit policy: files/audit-policy.yaml is an audit.k8s.io/v1 Policy that records
#          stratum.io changes at RequestResponse and secrets at Metadata at most (its rules are
#          evaluated request by request in `cargo test -p stratum-agent --test compliance_report`)
#   scripts/chart-check.sh metrics URL|FILE...
#       promtool check metrics on real /metrics output (an agent's or the operator's)
#   scripts/chart-check.sh dashboard-queries PROMETHEUS_URL
#       every dashboard query returns data from a live Prometheus (the e2e check)
#   scripts/chart-check.sh dashboard-fixtures
#       step 5's loopback-Prometheus check on its own
#
# Tools: helm ($HELM, else PATH, else the e2e build cache ~/.cache/stratum-e2e/*/bin/helm),
# promtool and prometheus (Debian package `prometheus`), python3 with PyYAML (python3-yaml).
# Exit status: 0 when every step passed; each failure is named on stderr.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART=$ROOT/charts/stratum
TOOLS=$CHART/tests/chart_tools.py
# The namespace files/alerts.yaml is written for (see its header).
RULES_NAMESPACE=stratum-system
# Render for the Kubernetes the project targets (k8s-openapi v1_36, the e2e API server), not
# whatever default the helm binary was built with.
KUBE_VERSION=${KUBE_VERSION:-1.36.0}
# The full-values rendering uses another namespace, to show everything follows the release's.
FULL_NAMESPACE=time-system

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
  printf 'chart-check: FAILED: %s\n' "$*" >&2
  exit 1
}

need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found ($2)"; }

find_helm() {
  local bin
  if [[ -n ${HELM:-} ]]; then
    [[ -x $HELM ]] || die "HELM=$HELM is not executable"
    echo "$HELM"
    return
  fi
  if command -v helm >/dev/null 2>&1; then
    command -v helm
    return
  fi
  # The pinned helm that build-bins.sh built, in whichever cache it uses (E2E_BIN_CACHE).
  if bin=$("$ROOT/e2e/scripts/build-bins.sh" --print-bin-dir 2>/dev/null) && [[ -x $bin/helm ]]; then
    echo "$bin/helm"
    return
  fi
  die "helm not found: set HELM, put helm on PATH, or run e2e/scripts/build-bins.sh"
}

WORK=
cleanup() {
  [[ -z ${PROM_PID:-} ]] || kill "$PROM_PID" 2>/dev/null || true
  [[ -z ${HTTP_PID:-} ]] || kill "$HTTP_PID" 2>/dev/null || true
  [[ -z $WORK ]] || rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
crds() {
  local check=$1 src dst f name
  src=$ROOT/crds
  dst=$CHART/crds
  compgen -G "$src/*.yaml" >/dev/null || die "no CRDs in $src (run make crds)"
  if ((check)); then
    step "CRDs: charts/stratum/crds/ must equal crds/"
    if ! diff -r -u "$src" "$dst" >&2; then
      die "the chart's CRDs differ from crds/; run 'make chart' (or scripts/chart-check.sh) and commit the copy"
    fi
    info "identical ($(find "$src" -name '*.yaml' | wc -l) files)"
  else
    step "CRDs: copy crds/*.yaml into charts/stratum/crds/"
    mkdir -p "$dst"
    # Remove copies whose source is gone, so a deleted kind disappears from the chart too.
    for f in "$dst"/*.yaml; do
      [[ -e $f ]] || continue
      name=$(basename "$f")
      [[ -e $src/$name ]] || {
        rm -f "$f"
        info "removed stale $name"
      }
    done
    for f in "$src"/*.yaml; do
      cp "$f" "$dst/"
      info "copied $(basename "$f")"
    done
  fi
}

lint_and_template() {
  local helm=$1 values name
  step "helm lint --strict ($("$helm" version --short 2>/dev/null || echo "$helm"))"
  "$helm" lint --strict --kube-version "$KUBE_VERSION" "$CHART" || die "helm lint (default values)"
  "$helm" lint --strict --kube-version "$KUBE_VERSION" "$CHART" -f "$CHART/ci/full-values.yaml" ||
    die "helm lint (ci/full-values.yaml)"

  for values in default full; do
    step "helm template ($values values)"
    local args=(template stratum "$CHART" --kube-version "$KUBE_VERSION")
    if [[ $values == default ]]; then
      args+=(--namespace "$RULES_NAMESPACE")
    else
      args+=(--namespace "$FULL_NAMESPACE" -f "$CHART/ci/full-values.yaml")
    fi
    "$helm" "${args[@]}" >"$WORK/$values.yaml" || die "helm template ($values values)"
    if [[ $values == default ]]; then
      python3 "$TOOLS" manifests "$WORK/$values.yaml" Deployment ServiceAccount ClusterRole \
        ClusterRoleBinding Role RoleBinding ValidatingAdmissionPolicy ValidatingAdmissionPolicyBinding ||
        die "default rendering"
    else
      python3 "$TOOLS" manifests "$WORK/$values.yaml" Deployment PodDisruptionBudget Service \
        TimeService ServiceMonitor PodMonitor PrometheusRule ConfigMap ||
        die "full rendering"
    fi
  done
  # helm template also puts the chart's CRDs first with --include-crds; check they parse.
  "$helm" template stratum "$CHART" --kube-version "$KUBE_VERSION" --include-crds >"$WORK/with-crds.yaml" || die "helm template --include-crds"
  python3 "$TOOLS" manifests "$WORK/with-crds.yaml" CustomResourceDefinition || die "CRD rendering"
}

alerts() {
  local helm=$1
  step "alerts: promtool check rules + promtool test rules (files/alerts.yaml)"
  promtool check rules "$CHART/files/alerts.yaml" || die "promtool check rules"
  (cd "$CHART/tests" && promtool test rules alerts_test.yaml) || die "promtool test rules"

  step "alerts: the PrometheusRule rendered with default values is files/alerts.yaml"
  "$helm" template stratum "$CHART" --namespace "$RULES_NAMESPACE" --kube-version "$KUBE_VERSION" \
    --set monitoring.prometheusRule.enabled=true --show-only templates/monitoring-prometheusrule.yaml \
    >"$WORK/rule-default.yaml" || die "helm template PrometheusRule"
  python3 "$TOOLS" rule-file "$WORK/rule-default.yaml" "$WORK/rules-default.yaml" || die "PrometheusRule"
  python3 "$TOOLS" same-rules "$WORK/rules-default.yaml" "$CHART/files/alerts.yaml" ||
    die "the chart's PrometheusRule differs from files/alerts.yaml (see the file's header)"
  info "identical"

  step "alerts: the PrometheusRule rendered with ci/full-values.yaml is valid"
  python3 "$TOOLS" rule-file "$WORK/full.yaml" "$WORK/rules-full.yaml" || die "PrometheusRule (full)"
  promtool check rules "$WORK/rules-full.yaml" || die "promtool check rules (full values)"
  # ci/full-values.yaml sets each of these; the rendering must show them.
  grep -Eq '^ +> 0\.005$' "$WORK/full.yaml" || die "offsetThresholdSeconds was not applied"
  grep -q "namespace=\"$FULL_NAMESPACE\"" "$WORK/full.yaml" || die "the release namespace was not applied"
  grep -q 'runbooks.example.invalid/stratum#stratumoffsethigh' "$WORK/full.yaml" || die "runbookBaseUrl was not applied"
  if grep -q 'StratumTenantRateLimitingSpike' "$WORK/full.yaml"; then
    die "disabledAlerts was not applied"
  fi
}

dashboard() {
  step "dashboard: every query parses as PromQL; the ConfigMap ships files/dashboard.json"
  python3 -m json.tool "$CHART/files/dashboard.json" >/dev/null || die "dashboard.json is not valid JSON"
  python3 "$TOOLS" dashboard-rules "$CHART/files/dashboard.json" "$WORK/dashboard-rules.yaml" || die "dashboard queries"
  promtool check rules "$WORK/dashboard-rules.yaml" >/dev/null || {
    promtool check rules "$WORK/dashboard-rules.yaml" || true
    die "a dashboard query does not parse"
  }
  python3 "$TOOLS" configmap-file "$WORK/full.yaml" stratum.json "$CHART/files/dashboard.json" ||
    die "dashboard ConfigMap"
}

# A loopback Prometheus scraping the sample pages of tests/fixtures/, then every dashboard
# query must return data. Checks the dashboard against the metric contract, not the binaries.
dashboard_fixtures() {
  if ! command -v prometheus >/dev/null 2>&1; then
    step "dashboard on sample metrics: SKIPPED (no prometheus binary)"
    return
  fi
  step "dashboard on sample metrics: loopback Prometheus scraping tests/fixtures/*.prom"
  local http_port prom_port i up
  http_port=$(free_port)
  prom_port=$(free_port)
  python3 -m http.server "$http_port" --bind 127.0.0.1 --directory "$CHART/tests/fixtures" \
    >"$WORK/http.log" 2>&1 &
  HTTP_PID=$!
  cat >"$WORK/prometheus.yml" <<EOF
global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: stratum-agent
    static_configs:
      - targets: ['127.0.0.1:$http_port']
        labels: {__metrics_path__: /agent-node-0.prom, instance: '10.77.0.10:9123'}
      - targets: ['127.0.0.1:$http_port']
        labels: {__metrics_path__: /agent-node-1.prom, instance: '10.77.0.11:9123'}
  - job_name: stratum-operator
    metrics_path: /operator.prom
    static_configs:
      - targets: ['127.0.0.1:$http_port']
EOF
  promtool check config "$WORK/prometheus.yml" >/dev/null || die "fixture Prometheus config"
  prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" >"$WORK/prometheus.log" 2>&1 &
  PROM_PID=$!
  # Wait until all three targets were scraped at least twice (rate() needs two samples).
  for ((i = 0; i < 60; i++)); do
    kill -0 "$PROM_PID" 2>/dev/null || {
      tail -20 "$WORK/prometheus.log" >&2
      die "prometheus exited"
    }
    up=$(curl -fsS --max-time 2 "http://127.0.0.1:$prom_port/api/v1/query" \
      --data-urlencode 'query=count(count_over_time(up[1m]) >= 3)' 2>/dev/null |
      python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)' 2>/dev/null || echo 0)
    [[ $up == 3 ]] && break
    sleep 0.5
  done
  [[ $up == 3 ]] || die "the fixture targets were not scraped (see $WORK/prometheus.log)"
  python3 "$TOOLS" dashboard-check "$CHART/files/dashboard.json" "http://127.0.0.1:$prom_port" ||
    die "a dashboard query returned no data on the sample metrics"
  kill "$PROM_PID" "$HTTP_PID" 2>/dev/null || true
  wait "$PROM_PID" "$HTTP_PID" 2>/dev/null || true
  PROM_PID='' HTTP_PID=''
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

shellchecks() {
  if ! command -v shellcheck >/dev/null 2>&1; then
    step "shellcheck: SKIPPED (not installed)"
    return
  fi
  step "shellcheck"
  shellcheck "$ROOT/scripts/chart-check.sh" "$CHART"/tests/*.sh || die "shellcheck"
  info "clean"
}

# The image references and pull secrets the operator Deployment renders, for a few value sets.
images() {
  local helm=$1 version
  version=$(awk '$1 == "appVersion:" {gsub(/"/, "", $2); print $2}' "$CHART/Chart.yaml")
  step "images: names, registry override and pull secrets"
  local render=("$helm" template stratum "$CHART" --kube-version "$KUBE_VERSION" --show-only templates/operator-deployment.yaml)
  "${render[@]}" >"$WORK/images-default.yaml" || die "helm template (images, default)"
  python3 "$TOOLS" operator-images "$WORK/images-default.yaml" "localhost/stratum/operator:$version" \
    "localhost/stratum/agent:$version" "" "" || die "default image names (scripts/images.sh builds these)"
  "${render[@]}" --set image.registry=registry.example.com/team --set image.tag=1.2.3 \
    --set 'imagePullSecrets[0].name=regcred' >"$WORK/images-registry.yaml" || die "helm template (images, registry)"
  python3 "$TOOLS" operator-images "$WORK/images-registry.yaml" registry.example.com/team/operator:1.2.3 \
    registry.example.com/team/agent:1.2.3 regcred regcred || die "image.registry, image.tag and imagePullSecrets"
  "${render[@]}" --set image.registry=registry.example.com/team --set operator.image.registry=mirror.example.com \
    --set agent.image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef \
    --set 'imagePullSecrets[0].name=regcred' --set 'agent.imagePullSecrets[0].name=agents-a' \
    --set 'agent.imagePullSecrets[1].name=agents-b' >"$WORK/images-override.yaml" || die "helm template (images, overrides)"
  python3 "$TOOLS" operator-images "$WORK/images-override.yaml" "mirror.example.com/operator:$version" \
    registry.example.com/team/agent@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef \
    regcred agents-a,agents-b || die "per-image registry, digest and agent.imagePullSecrets"
}

# The agents' priority class reaches the operator, whose default TimeServices without their
# own take: the chart's default, another class, and none.
agent_priority_class() {
  local helm=$1
  step "agent priority class: agent.priorityClassName reaches --agent-priority-class"
  local render=("$helm" template stratum "$CHART" --kube-version "$KUBE_VERSION" --show-only templates/operator-deployment.yaml)
  "${render[@]}" >"$WORK/priority-default.yaml" || die "helm template (priority class, default)"
  python3 "$TOOLS" operator-arg "$WORK/priority-default.yaml" --agent-priority-class system-node-critical ||
    die "default agent priority class"
  "${render[@]}" --set agent.priorityClassName=stratum-node >"$WORK/priority-set.yaml" ||
    die "helm template (priority class, set)"
  python3 "$TOOLS" operator-arg "$WORK/priority-set.yaml" --agent-priority-class stratum-node ||
    die "agent.priorityClassName set"
  "${render[@]}" --set agent.priorityClassName= >"$WORK/priority-none.yaml" ||
    die "helm template (priority class, none)"
  python3 "$TOOLS" operator-arg "$WORK/priority-none.yaml" --agent-priority-class "" ||
    die "agent.priorityClassName empty"
}

audit_policy() {
  step "audit policy: files/audit-policy.yaml"
  python3 "$TOOLS" audit-policy "$CHART/files/audit-policy.yaml" || die "files/audit-policy.yaml"
}

cmd_all() {
  local check=0 helm
  case ${1:-} in
  --check) check=1 ;;
  "") ;;
  *) die "unknown option $1 (usage: chart-check.sh [--check])" ;;
  esac
  need promtool "apt-get install prometheus (with service start blocked)"
  need python3 "apt-get install python3 python3-yaml"
  python3 -c 'import yaml' 2>/dev/null || die "PyYAML missing (apt-get install python3-yaml)"
  helm=$(find_helm)
  WORK=$(mktemp -d)
  crds "$check"
  lint_and_template "$helm"
  alerts "$helm"
  images "$helm"
  agent_priority_class "$helm"
  dashboard
  dashboard_fixtures
  shellchecks
  audit_policy
  printf '\nchart-check: all checks passed\n'
}

cmd_metrics() {
  (($# > 0)) || die "usage: chart-check.sh metrics URL|FILE..."
  need promtool "apt-get install prometheus (with service start blocked)"
  local src failed=0 out
  for src in "$@"; do
    step "promtool check metrics: $src"
    if [[ $src == http://* || $src == https://* ]]; then
      out=$(curl -fsS --max-time 10 "$src") || {
        info "FAIL: cannot fetch $src"
        failed=1
        continue
      }
    else
      [[ -r $src ]] || {
        info "FAIL: cannot read $src"
        failed=1
        continue
      }
      out=$(<"$src")
    fi
    if [[ -z $out ]]; then
      info "FAIL: empty metrics page"
      failed=1
    elif promtool check metrics <<<"$out"; then
      info "ok ($(grep -c '^# TYPE' <<<"$out") metric families)"
    else
      failed=1
    fi
  done
  ((failed == 0)) || die "promtool check metrics"
}

cmd_dashboard_queries() {
  (($# == 1)) || die "usage: chart-check.sh dashboard-queries PROMETHEUS_URL"
  step "dashboard queries against $1"
  python3 "$TOOLS" dashboard-check "$CHART/files/dashboard.json" "$1" || die "dashboard queries"
}

case ${1:-} in
metrics)
  shift
  cmd_metrics "$@"
  ;;
dashboard-queries)
  shift
  cmd_dashboard_queries "$@"
  ;;
dashboard-fixtures)
  WORK=$(mktemp -d)
  dashboard_fixtures
  ;;
*) cmd_all "$@" ;;
esac
