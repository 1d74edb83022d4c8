# Stratum developer targets. `make test` is what CI runs (via .ci/run); `make help` lists all.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
# Every test, benchmark and demo runs without CAP_SYS_TIME, so nothing can change this
# machine's clock even by mistake.
NO_SYS_TIME := setpriv --bounding-set=-sys_time --inh-caps=-sys_time
# A second fence: the agent refuses to open its `system` clock backend when this is set.
export STRATUM_DENY_SYSTEM_CLOCK := 1

.PHONY: help deps fmt fmt-check lint test unit crds

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

deps: ## install what a fresh machine lacks (toolchain components)
	@rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

fmt: ## format the code
	$(CARGO) fmt --all

fmt-check: ## fail when the code is not formatted
	$(CARGO) fmt --all -- --check

lint: ## clippy on every target, warnings are errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: ## unit and integration tests (no cluster)
	$(NO_SYS_TIME) $(CARGO) test --workspace

test: deps fmt-check lint unit ## everything CI checks

crds: ## regenerate crds/ from the Rust types
	$(CARGO) run --quiet -p stratum-operator --bin crdgen -- crds
