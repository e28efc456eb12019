# soak.mk: long-running and fault scenarios (issue 6). Included by the main Makefile; every
# target has a `## description` for `make help`. `make soak` is not part of `make test`; the fault
# tests (tests/it/faults.rs) are, at full size, and `make faults` runs just them.

SOAK_PYTHON ?= python3
# Extra arguments for tests/soak/soak.py, e.g. SOAK_ARGS="--idle 5000 --interval 2".
SOAK_ARGS   ?=

.PHONY: soak soak-ci faults

soak: ## 10 minutes of mixed load (ping-pong, bulk, churn, idle) on a release build; report in target/soak/
	$(CARGO) build --locked --release --bins
	$(SOAK_PYTHON) tests/soak/soak.py --duration 600 --interval 5 $(SOAK_ARGS)

soak-ci: ## The 1-minute soak that CI runs; report in target/soak/
	$(CARGO) build --locked --release --bins
	$(SOAK_PYTHON) tests/soak/soak.py --duration 60 --interval 2 $(SOAK_ARGS)

faults: ## Only the fault and abuse tests (10k idle, never-readers, EMFILE, resets, SIGTERM, netns); needs root for the netns
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --test it --no-fail-fast -E 'test(/^faults::/)'; \
	else \
		$(CARGO) test --locked --test it -- faults::; \
	fi
