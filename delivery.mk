# delivery.mk: Kubernetes delivery targets (Helm chart, dashboards, alert rules).
# Included by the main Makefile; every target has a `## description` for `make help`.
# Paths are relative to $(CURDIR), the repository root the main Makefile runs in.

DELIVERY_VENV       := $(CURDIR)/.venv
DELIVERY_PYTHON     ?= python3
DELIVERY_REQS       := $(CURDIR)/tests/delivery/requirements.txt
DELIVERY_STAMP      := $(DELIVERY_VENV)/.delivery-requirements.stamp
DELIVERY_BIN        := $(CURDIR)/target/debug/echo-service
DASHBOARDS_SRC      := $(CURDIR)/dashboards
CHART_FILES         := $(CURDIR)/helm/echo-service/files
# Files the chart ships (Helm's .Files cannot read outside the chart folder).
DASHBOARD_FILES     := echo-service-dashboard.json echo-service-alerts.yaml

.PHONY: venv dashboards-sync test-delivery delivery-bin audit

# `make test` also runs the supply-chain audit (after the other test prerequisites).
test: audit

venv: $(DELIVERY_STAMP) ## Create .venv with the delivery test tools (helm-python-sdk, kubernetes-validate, checkov, ...)

# Re-run pip only when requirements.txt changes.
$(DELIVERY_STAMP): $(DELIVERY_REQS)
	test -x $(DELIVERY_VENV)/bin/python || $(DELIVERY_PYTHON) -m venv $(DELIVERY_VENV)
	$(DELIVERY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(DELIVERY_REQS)
	touch $@

dashboards-sync: ## Copy the Grafana dashboard and alert rules from dashboards/ into the Helm chart
	mkdir -p $(CHART_FILES)
	$(foreach f,$(DASHBOARD_FILES),cp $(DASHBOARDS_SRC)/$(f) $(CHART_FILES)/$(f);)

# Always ask cargo (a no-op when up to date) so the tests never run a stale binary.
delivery-bin:
	cargo build --locked --bin echo-service

test-delivery: venv delivery-bin ## Verify chart, manifests, dashboards and alerts with Helm, kubernetes-validate, checkov, Prometheus
	ECHO_SERVICE_BIN=$(DELIVERY_BIN) $(DELIVERY_VENV)/bin/python -m pytest -p no:cacheprovider $(CURDIR)/tests/delivery -q

audit: ## cargo-deny (advisories, bans, licences, sources) offline against the RustSec snapshot (../shared/advisory-db or $$ECHO_ADVISORY_DB)
	$(CURDIR)/tests/delivery/audit.sh
