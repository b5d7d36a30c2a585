# Every entry point a person uses. `make help` lists them.
CARGO ?= cargo
NIGHTLY ?= +nightly
# Seconds each fuzz target runs in `make fuzz-smoke` (CI) and `make fuzz` (long runs).
FUZZ_SMOKE_SECS ?= 20
FUZZ_SECS ?= 3600
FUZZ_TARGETS = $(notdir $(basename $(wildcard fuzz/fuzz_targets/*.rs)))
VCMDQ = target/release/vcmdq

.PHONY: help build release test unit lint fmt clippy doc demo bench fuzz-build fuzz-smoke fuzz miri loom soak clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

build: ## Debug build of the workspace.
	$(CARGO) build --workspace --all-targets

release: ## Optimised build of the vcmdq binary.
	$(CARGO) build --release -p vcmdq

test: lint unit doc fuzz-smoke ## Everything CI checks.
	@echo "make test: all checks passed"

unit: ## Unit, property and integration tests.
	$(CARGO) test --workspace

lint: fmt clippy ## rustfmt check and clippy with warnings as errors.

fmt:
	$(CARGO) fmt --all -- --check
	cd fuzz && $(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

doc: ## API docs, warnings as errors.
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

demo: release ## Replay a bundled trace through the real pipeline and show what happened.
	$(VCMDQ) decode traces/sample-queue.txt

bench: ## Full criterion suites (long).
	$(CARGO) bench -p vcmdq-bench

fuzz-build: ## Build every fuzz target (nightly, cargo-fuzz).
	cd fuzz && $(CARGO) $(NIGHTLY) fuzz build

fuzz-smoke: fuzz-build ## Run every fuzz target for FUZZ_SMOKE_SECS seconds on its seed corpus.
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  echo "fuzz-smoke: $$t for $(FUZZ_SMOKE_SECS)s"; \
	  (cd fuzz && $(CARGO) $(NIGHTLY) fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SMOKE_SECS) -print_final_stats=1 2>&1 | tail -n 3) || exit 1; \
	done

fuzz: fuzz-build ## Run every fuzz target for FUZZ_SECS seconds (long).
	@for t in $(FUZZ_TARGETS); do \
	  (cd fuzz && $(CARGO) $(NIGHTLY) fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECS)) || exit 1; \
	done

loom: ## Loom model of the unbind barrier (own target dir: the cfg rebuilds everything).
	CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" $(CARGO) test -p vcmdq --release --test loom_grace

clean:
	$(CARGO) clean
	rm -rf fuzz/target
