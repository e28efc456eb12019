# bench.mk: the benchmark suite (issue 5). Included by the main Makefile; every target has a
# `## description` for `make help`. Not part of `make test` (slow, noisy); the load generator's
# smoke test (tests/it/bench_smoke.rs) is. How to read the results: bench/README.md.

BENCH_VENV    := $(CURDIR)/.venv/bench
BENCH_PYTHON  ?= python3
BENCH_REQS    := $(CURDIR)/bench/requirements.txt
BENCH_STAMP   := $(BENCH_VENV)/.bench-requirements.stamp
# Where the release binaries are: cargo's target dir (honours CARGO_TARGET_DIR).
BENCH_BIN_DIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/release
# The last release: the plain TCP scenarios compare against its binary ("features that are
# off cost nothing"). 015438e is the last commit that landed before the PROXY, faults, TLS/UDP
# and telemetry work (issues 9-15). Built once into target/bench-release/<ref>/.
BENCH_RELEASE_REF ?= 015438e
BENCH_RELEASE_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/bench-release/$(BENCH_RELEASE_REF)
# Extra arguments for bench/run.py, e.g. BENCH_ARGS="--rounds 5 --scenarios pp-64x100,idle-10k".
BENCH_ARGS    ?=

.PHONY: bench bench-quick bench-venv bench-build bench-release-build bench-parser

bench-venv: $(BENCH_STAMP) ## Create .venv/bench with the pinned Twisted for the baseline server

# Re-run pip only when requirements.txt changes.
$(BENCH_STAMP): $(BENCH_REQS)
	test -x $(BENCH_VENV)/bin/python || $(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(BENCH_REQS)
	touch $@

bench-build: ## Build echo-service, echo-bench and the tokio baseline examples in release
	$(CARGO) build --release --locked --workspace --bins --examples

bench-release-build: ## Build the last release's echo-service (BENCH_RELEASE_REF) from git, once
	@if [ ! -x $(BENCH_RELEASE_DIR)/echo-service ]; then \
		set -e; rm -rf $(BENCH_RELEASE_DIR); mkdir -p $(BENCH_RELEASE_DIR)/src; \
		git -C $(CURDIR) archive $(BENCH_RELEASE_REF) | tar -x -C $(BENCH_RELEASE_DIR)/src; \
		printf '\n# Not a member of the workspace it is extracted into.\n[workspace]\n' \
			>> $(BENCH_RELEASE_DIR)/src/Cargo.toml; \
		CARGO_TARGET_DIR=$(BENCH_RELEASE_DIR)/target $(CARGO) build --release --locked \
			--manifest-path $(BENCH_RELEASE_DIR)/src/Cargo.toml --bin echo-service; \
		cp $(BENCH_RELEASE_DIR)/target/release/echo-service $(BENCH_RELEASE_DIR)/echo-service; \
		rm -rf $(BENCH_RELEASE_DIR)/target $(BENCH_RELEASE_DIR)/src; \
	fi

bench: bench-build bench-release-build bench-venv ## Benchmark echo-service vs tokio, Twisted and the last release (~20 min); writes bench/results/
	$(BENCH_PYTHON) bench/run.py --bin-dir $(BENCH_BIN_DIR) --python $(BENCH_VENV)/bin/python \
		--release-bin $(BENCH_RELEASE_DIR)/echo-service --release-ref $(BENCH_RELEASE_REF) $(BENCH_ARGS)

bench-quick: bench-build bench-venv ## One short round of every scenario (~2 min): checks the suite, numbers are rough
	$(BENCH_PYTHON) bench/run.py --bin-dir $(BENCH_BIN_DIR) --python $(BENCH_VENV)/bin/python \
		--rounds 1 --duration 1 --warmup 0.3 --idle-settle 0.5 --idle-hold 0.5 $(BENCH_ARGS)

bench-parser: ## Micro-benchmark the PROXY header parser (ns per header, release build)
	$(CARGO) bench --locked --bench proxy_parser
