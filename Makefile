# Stratum developer targets. `make test` is what CI runs (via .ci/run); `make help` lists all.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
# Every test, benchmark and demo runs without CAP_SYS_TIME, so nothing can change this
# machine's clock even by mistake.
NO_SYS_TIME := setpriv --bounding-set=-sys_time --inh-caps=-sys_time
# A second fence: the agent refuses to open its `system` clock backend when this is set.
export STRATUM_DENY_SYSTEM_CLOCK := 1

.PHONY: help deps fmt fmt-check lint test unit crds chart chart-check images images-check sim fuzz e2e demo bench bench-setup bench-memory bench-operator bench-operator-compare

help: ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

deps: ## install what a fresh machine lacks (Rust components, Debian packages, ntpd-rs, the Go-built cluster tools)
	@scripts/install-deps.sh
	@NTPD_RS_PROFILE=debug bench/setup.sh >/dev/null
	@e2e/scripts/deps.sh >/dev/null
	@# helm, kubectl and the control plane: chart-check and e2e both use them, so build them first.
	@e2e/scripts/build-bins.sh >/dev/null

fmt: ## format the code
	$(CARGO) fmt --all

fmt-check: ## fail when the code is not formatted
	$(CARGO) fmt --all -- --check

lint: ## clippy on every target, warnings are errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: ## unit and integration tests (no cluster)
	$(NO_SYS_TIME) $(CARGO) test --workspace

test: deps fmt-check lint unit chart-check images e2e ## everything CI checks (images: the real node runs them)

crds: ## regenerate crds/ from the Rust types
	$(CARGO) run --quiet -p stratum-operator --bin crdgen -- crds

chart: ## copy crds/ into the chart, lint, template (default + full values), promtool and dashboard checks
	scripts/chart-check.sh

chart-check: ## as chart, but fail when the chart's CRD copy differs from crds/
	scripts/chart-check.sh --check

images: ## operator, agent and ntp-client images as OCI archives in target/images (no daemon, no registry), verified
	scripts/images.sh

images-check: ## verify the archives of `make images`: labels, entrypoint, user, static binaries that run
	scripts/images.sh --check

sim: ## the NTP core's must-show scenarios on simulated time, with figures
	$(CARGO) run --quiet --release -p stratum-ntp --example sim

FUZZ_SECONDS ?= 120
fuzz: ## run every fuzz target for FUZZ_SECONDS each (nightly + cargo-fuzz, installed if missing)
	scripts/fuzz.sh $(FUZZ_SECONDS) agent/ntp/fuzz agent/fuzz

bench-setup: ## install chrony, ntpsec-ntpdig and ntpd-rs (interop tests and the bench use them)
	bench/setup.sh

bench: ## CPU per request, in-server latency and max rate: stratum-agent vs chronyd -x vs ntpd-rs vs raw UDP echo, 5 interleaved rounds; ~10 min
	$(NO_SYS_TIME) bench/run.sh

bench-memory: ## agent peak RSS with 100 busy tenants and a config reload (the agent's default resources come from it); about a minute
	$(CARGO) build --quiet --release -p stratum-agent --bins
	$(NO_SYS_TIME) bench/agent-memory.sh

bench-operator: ## operator scale benchmark: 1000 tenants, 10k pods (resolution time, incremental update, RSS)
	$(NO_SYS_TIME) $(CARGO) run --quiet --release -p stratum-operator --example scale

bench-operator-compare: ## the operator scale benchmark at OLD_REV (default: merge-base with main) vs the working tree, interleaved ROUNDS (5) times
	bench/operator-compare.sh "$(OLD_REV)" "$(ROUNDS)"

e2e: ## end-to-end tests on a real control plane (built from the Go proxy and cached on first use)
	e2e/run.sh

demo: deps images ## the whole system on a local control plane with a short tour; Ctrl-C cleans up
	e2e/demo.sh
