# Every entry point a person uses. `make help` lists them.
CARGO ?= cargo
NIGHTLY ?= +nightly
# Seconds each fuzz target runs in `make fuzz-smoke` (CI) and `make fuzz` (long runs).
FUZZ_SMOKE_SECS ?= 20
FUZZ_SECS ?= 3600
# Preemptions loom explores per model (the models finish exhaustively in seconds without a bound).
LOOM_MAX_PREEMPTIONS ?= 4
FUZZ_TARGETS = $(notdir $(basename $(wildcard fuzz/fuzz_targets/*.rs)))
VCMDQ = target/release/vcmdq

.PHONY: replay-check vmm-example vmm-c-example expected help build release test test-plan fuzz-setup unit lint fmt clippy doc demo traces bench bench-quick ratios idle loadtest fuzz-build fuzz-smoke fuzz miri loom soak soak-smoke linux-trace clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

build: ## Debug build of the workspace.
	$(CARGO) build --workspace --all-targets

release: ## Optimised build of the vcmdq binary.
	$(CARGO) build --release -p vcmdq-cli

test: test-plan fuzz-setup lint unit doc loom replay-check vmm-example vmm-c-example fuzz-smoke soak-smoke ## Everything CI checks (installs cargo-fuzz if missing).
	@echo "make test: all checks passed"

test-plan:
	@echo "make test: fmt, clippy, unit and integration tests, docs, loom models, every bundled trace replayed,"
	@echo "           the VMM examples (Rust, and C with $(CC)), $(FUZZ_SMOKE_SECS) s of each fuzz target, a short soak. Cold on 2 cores: about 8 minutes (cargo-fuzz"
	@echo "           is installed from crates.io first if missing, about 1 minute); warm: about 4.5 minutes."

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

demo: release ## Replay the bundled mixed trace, then a real Linux guest's stream, and show what happened.
	@echo "make demo: replaying traces/mixed.vct (six VMs: Linux range unmaps, ATS, SVA, a hostile guest,"
	@echo "           a Tegra241 guest, an SMMU without range invalidation) through shared-memory rings,"
	@echo "           the engine and the physical queue model, then checking it against the oracle"
	$(VCMDQ) replay traces/mixed.vct --per-viommu
	@echo
	@echo "make demo: and a stream nobody here wrote: Linux 6.1's arm-smmu-v3 driver under QEMU 7.2"
	@echo "           (iommu.strict=1: one TLBI_NH_VA + CMD_SYNC per unmap; traces/README.md says how it"
	@echo "           was captured), replayed closed-loop as the guest waited for each CMD_SYNC"
	$(VCMDQ) trace info traces/linux-strict.vct
	$(VCMDQ) replay traces/linux-strict.vct

# The bundled workload traces; `cargo test` checks that regenerating them gives the same bytes.
# (linux-strict.vct and linux-lazy.vct are imports of real captures whose raw logs are not in the
# repository: traces/README.md says how they were made.)
TRACE_WORKLOADS = dma-unmap ats sva-churn noisy-neighbour hot-unplug hostile mixed

vmm-example: ## A small VMM: two Linux-like guests drive Tegra241 VCMDQs in guest RAM, checked against the oracle.
	$(CARGO) run --release -q -p vcmdq-vmm --example vmm

vmm-c-example: ## The C API: a C VMM built with the system C compiler serves a guest VCMDQ.
	$(CARGO) build --release -q -p vcmdq-vmm-c
	@mkdir -p target/vmm-c
	$(CC) -std=c11 -D_DEFAULT_SOURCE -Wall -Wextra -Werror -O2 -Iengine/vmm-c/include engine/vmm-c/examples/vmm.c \
	  -Ltarget/release -lvcmdq_vmm_c -Wl,-rpath,$(CURDIR)/target/release -o target/vmm-c/vmm
	target/vmm-c/vmm

replay-check: release ## Replay every bundled trace and compare with its expected summary.
	@for t in traces/*.vct; do \
	  echo "replay-check: $$t"; \
	  $(VCMDQ) replay $$t --expect $${t%.vct}.expected.json > /dev/null || exit 1; \
	done

expected: release ## Rewrite the expected replay summaries (review the diff before committing).
	@for t in traces/*.vct; do $(VCMDQ) replay $$t --write-expected $${t%.vct}.expected.json > /dev/null || exit 1; done

traces: release ## Regenerate the bundled traces in traces/ (deterministic, byte for byte).
	@for w in $(TRACE_WORKLOADS); do $(VCMDQ) gen $$w -o traces/$$w.vct || exit 1; done
	$(VCMDQ) trace import-qemu traces/qemu-sample.log -o traces/qemu-sample.vct

# Criterion's own options (see BENCHMARKS.md). `make bench BENCH_ARGS=` draws criterion's HTML
# reports too, which adds minutes.
BENCH_ARGS ?= --noplot
BENCH_QUICK ?= --warm-up-time 0.3 --measurement-time 0.7 --noplot

bench: ## Criterion suites (~5 min on 2 cores), then the ratios to the limit and the floor.
	$(CARGO) bench -p vcmdq-bench -- $(BENCH_ARGS)
	@$(MAKE) --no-print-directory ratios

bench-quick: ## The same suites with short warm-up and measurement (~2 min), then the ratios.
	$(CARGO) bench -p vcmdq-bench -- $(BENCH_QUICK)
	@$(MAKE) --no-print-directory ratios

ratios: ## vcmdq against the copy limit and the naive floor, from the last criterion run.
	$(CARGO) run --release -q -p vcmdq-bench --bin ratios

idle: ## Idle CPU of 1 and 2 workers and the wake-up latency of a sleeping worker (~15 s; run it on a quiet machine).
	$(CARGO) run --release -q -p vcmdq-bench --bin idle

# Where `make loadtest` draws its plot: under target/, so a run does not rewrite the tracked
# docs/latency.svg. `make loadtest LOADTEST_SVG=docs/latency.svg` refreshes that one on purpose.
LOADTEST_SVG ?= target/loadtest/latency.svg

loadtest: release ## Latency under load: 10/50/90% of saturation, plot in target/loadtest/latency.svg (LOADTEST_SVG=).
	@mkdir -p $(dir $(LOADTEST_SVG))
	$(VCMDQ) loadtest --svg $(LOADTEST_SVG)

fuzz-setup: ## Install cargo-fuzz (and nightly, if rustup can) when missing; say what the fuzz steps use.
	fuzz/fuzz.sh setup

fuzz-build: ## Build every fuzz target (cargo-fuzz; nightly with ASan, else stable without a sanitizer).
	fuzz/fuzz.sh build

fuzz-smoke: fuzz-build ## Run every fuzz target for FUZZ_SMOKE_SECS seconds on its seed corpus.
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  echo "fuzz-smoke: $$t for $(FUZZ_SMOKE_SECS)s"; \
	  log=fuzz/target/fuzz-smoke-$$t.log; \
	  if fuzz/fuzz.sh run $$t corpus/$$t -- -max_total_time=$(FUZZ_SMOKE_SECS) -print_final_stats=1 >$$log 2>&1; \
	  then tail -n 3 $$log; else tail -n 40 $$log; echo "fuzz-smoke: $$t FAILED (full log: $$log)"; exit 1; fi; \
	done

fuzz: fuzz-build ## Run every fuzz target for FUZZ_SECS seconds (long).
	@for t in $(FUZZ_TARGETS); do \
	  fuzz/fuzz.sh run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECS) || exit 1; \
	done

loom: ## loom models of PROD/CONS publication, the completion and error paths, the unbind barrier and the sleep handshake (--cfg loom).
	RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=$(LOOM_MAX_PREEMPTIONS) $(CARGO) test -p vcmdq --release --test loom_hwmodel --test loom_completion --test loom_grace --test loom_sleep --target-dir target/loom

miri: ## Ring, physical-queue and codec tests under miri (nightly; installs the component).
	rustup component list --toolchain nightly --installed | grep -q '^miri' || rustup component add miri rust-src --toolchain nightly
	$(CARGO) $(NIGHTLY) miri test -p vcmdq --test ring --test hwmodel --test codec --target-dir target/miri
	$(CARGO) $(NIGHTLY) miri test -p vcmdq-cli --bin vcmdq --target-dir target/miri
	$(CARGO) $(NIGHTLY) miri test -p vcmdq --lib --target-dir target/miri -- command::

# Guest commands `make soak` writes (1e9 took about 4 minutes on the shared, loaded 2-core machine).
SOAK_COMMANDS ?= 1e9

soak: release ## A billion commands of mixed, hostile traffic with physical faults, checked online against the oracle (minutes; not in test).
	$(VCMDQ) soak --commands $(SOAK_COMMANDS)

soak-smoke: release ## Five million soak commands on each of two engine setups, faults every 20000 positions, unbinds, ring replacements and PROD games (seconds).
	$(VCMDQ) soak --commands 5M --fault-every 20000 --progress 0
	$(VCMDQ) soak --commands 5M --fault-every 20000 --workers 2 --hardware thread --guests 2 --seed 2 --churn-log2 11 --prod-game-every 16 --progress 0

# traces/linux/capture.sh's parameters as NAME=VALUE words (see traces/linux/README.md), e.g.
# `make linux-trace LINUX_TRACE_ARGS="WORKLOAD=lazy VCPUS=4"`.
LINUX_TRACE_ARGS ?=

linux-trace: release ## Capture a real Linux guest's SMMUv3 commands under QEMU, import, replay (apt; minutes; not in test).
	traces/linux/capture.sh VCMDQ=$(CURDIR)/$(VCMDQ) $(LINUX_TRACE_ARGS)

clean:
	$(CARGO) clean
	rm -rf fuzz/target
