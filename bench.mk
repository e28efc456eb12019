# bench.mk: the benchmark suite (issue 5). Included by the main Makefile; every target has a
# `## description` for `make help`. Not part of `make test` (slow, noisy); the load generator's
# smoke test (tests/it/bench_smoke.rs) is. How to read the results: bench/README.md.

BENCH_VENV    := $(CURDIR)/.venv/bench
BENCH_PYTHON  ?= python3
BENCH_REQS    := $(CURDIR)/bench/requirements.txt
BENCH_STAMP   := $(BENCH_VENV)/.bench-requirements.stamp
# Where the release binaries are: cargo's target dir (honours CARGO_TARGET_DIR).
BENCH_BIN_DIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/release
# Extra arguments for bench/run.py, e.g. BENCH_ARGS="--rounds 5 --scenarios pp-64x100,idle-10k".
BENCH_ARGS    ?=

.PHONY: bench bench-quick bench-venv bench-build

bench-venv: $(BENCH_STAMP) ## Create .venv/bench with the pinned Twisted for the baseline server

# Re-run pip only when requirements.txt changes.
$(BENCH_STAMP): $(BENCH_REQS)
	test -x $(BENCH_VENV)/bin/python || $(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(BENCH_REQS)
	touch $@

bench-build: ## Build echo-service, echo-bench and the tokio baseline examples in release
	$(CARGO) build --locked --release --bins --examples

bench: bench-build bench-venv ## Benchmark echo-service vs tokio and Twisted baselines (~12 min); writes bench/results/
	$(BENCH_PYTHON) bench/run.py --bin-dir $(BENCH_BIN_DIR) --python $(BENCH_VENV)/bin/python $(BENCH_ARGS)

bench-quick: bench-build bench-venv ## One short round of every scenario (~2 min): checks the suite, numbers are rough
	$(BENCH_PYTHON) bench/run.py --bin-dir $(BENCH_BIN_DIR) --python $(BENCH_VENV)/bin/python \
		--rounds 1 --duration 1 --warmup 0.3 --idle-settle 0.5 --idle-hold 0.5 $(BENCH_ARGS)
