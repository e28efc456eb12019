# echo-service: every target has a `## description`; `make help` lists them.
# The two commands that matter: `make run` (the service on its defaults) and `make test`.

SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
ARGS ?=

.PHONY: help build run test test-rust lint fmt soak clean fuzz

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

build: ## Build the release binaries (echo-service, echo-bench)
	$(CARGO) build --release --locked --workspace --bins

run: ## Run echo-service on its defaults (echo :8000, admin :9000); extra flags via ARGS="..."
	$(CARGO) run --release --locked --bin echo-service -- $(ARGS)

lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

test: lint test-rust test-delivery ## Run every test: lint, Rust unit + black-box tests, chart/dashboard checks
	@echo "make test: all checks passed"

# nextest runs each test in its own process (parallel, isolated); plain cargo test otherwise.
test-rust: ## Rust unit tests and black-box tests of the real binary (needs promtool + prometheus)
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
		echo "promtool/prometheus missing: apt-get install -y --no-install-recommends prometheus (.ci/run does this)"; exit 1; }
	# The black-box tests run echo-bench, another workspace crate's binary: cargo builds a
	# package's own binaries for its tests, not its neighbours'.
	$(CARGO) build --locked --workspace --bins
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --workspace --all-targets --no-fail-fast; \
	else \
		$(CARGO) test --locked --workspace --all-targets --no-fail-fast; \
	fi

FUZZ_SECONDS ?= 60
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 lets the stable toolchain build it.
fuzz: ## Fuzz the PROXY header parser for FUZZ_SECONDS (default 60); new inputs land in fuzz/corpus
	@command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install --locked cargo-fuzz"; exit 1; }
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run proxy_header corpus/proxy_header -- \
		-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=1024 -print_final_stats=1

clean: ## Remove build output and the Python venv
	$(CARGO) clean
	rm -rf .venv

-include delivery.mk
-include bench.mk
-include soak.mk
