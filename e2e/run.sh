#!/usr/bin/env bash
# `make e2e`: bring the stack up (e2e/stack.sh), run the e2e tests against it, tear it down,
# whatever the outcome. STRATUM_E2E_KEEP=1 leaves the stack running for inspection.
# Usage: e2e/run.sh [TEST-NAME-FILTER...]   (STRATUM_E2E_TARGETS: see below)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

down() {
  if [[ ${STRATUM_E2E_KEEP:-} == 1 ]]; then
    echo "e2e: stack left running (STRATUM_E2E_KEEP=1); stop it with: e2e/stack.sh down" >&2
  else
    e2e/stack.sh down || true
  fi
}
trap down EXIT

e2e/stack.sh down >/dev/null 2>&1 || true # a stack left over by an interrupted run
e2e/stack.sh up
eval "$(e2e/stack.sh env)"
# Every e2e test target (tests/*.rs) against the same stack, one test at a time; a failing
# target does not keep the others from running; --nocapture shows the figures the tests print.
# STRATUM_E2E_TARGETS="real_agent real_node" runs only those targets, in that order (the
# arguments, by contrast, filter test names within every target).
targets=(--tests)
if [[ -n ${STRATUM_E2E_TARGETS:-} ]]; then
  targets=()
  for t in $STRATUM_E2E_TARGETS; do targets+=(--test "$t"); done
fi
cargo test -p stratum-e2e "${targets[@]}" --no-fail-fast -- --ignored --test-threads=1 --nocapture "$@"
