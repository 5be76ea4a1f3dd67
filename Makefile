# opskit: every target installs what it needs first, so a fresh clone needs nothing else.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TARGET  ?=
CONFIG  ?=
BASELINE ?=

.PHONY: install test pytest lint loadtest capacity alerts dashboards check-alerts stack drill bench clean

install: $(STAMP) system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Prometheus and Alertmanager come from Debian; they are run on loopback by the tests, never as services.
.PHONY: system-deps
system-deps:
	@scripts/install-system-deps.sh

# Two workers for most tests (they wait on real servers); the few that measure timing accuracy against
# the mock's ground truth run afterwards on their own, so a neighbour's CPU cannot skew them.
test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 2 -m "not serial"
	$(BIN)/pytest -q -m serial
	$(MAKE) --no-print-directory check-alerts

pytest: install
	$(BIN)/pytest -q -n 2 -m "not serial"
	$(BIN)/pytest -q -m serial

lint: install
	$(BIN)/ruff check .

# PRICES=FILE prices the run (a target's `prices:` section); the embedded mock gets the shipped
# illustrative ones; a TARGET, CONFIG or $$OPSKIT_TARGET_URL none unless given (a config's own prices apply).
PRICES ?=
loadtest: install
	$(BIN)/opskit loadtest $(if $(TARGET),--target $(TARGET)) $(if $(CONFIG),--config $(CONFIG)) \
		$(if $(BASELINE),--baseline $(BASELINE)) \
		$(if $(PRICES),--prices $(PRICES),$(if $(TARGET)$(CONFIG)$(OPSKIT_TARGET_URL),,--prices loadtests/example-prices.yaml))

alerts: install
	$(BIN)/opskit generate alerts

# The highest load that meets every SLO (embedded mock by default); PLANNED=R gates on 1.5x headroom.
PLANNED ?=
capacity: install
	$(BIN)/opskit loadtest capacity $(if $(TARGET),--target $(TARGET)) $(if $(CONFIG),--config $(CONFIG)) \
		$(if $(PLANNED),--planned-rate $(PLANNED))

dashboards: install
	$(BIN)/opskit generate dashboards

# Kubernetes manifests made from alerts/ and dashboards/ (PrometheusRule, Grafana ConfigMaps).
.PHONY: manifests
# RUNBOOK_BASE: the absolute URL of alerts/runbook.md that the PrometheusRule links to (required; the
# committed deploy/generated/ uses the placeholder below: render your own before applying it).
RUNBOOK_BASE ?= https://runbooks.example.com/opskit/alerts/runbook.md
manifests: install
	$(BIN)/opskit generate manifests --runbook-base $(RUNBOOK_BASE)

check-alerts: install
	alerts/check.sh

stack: install
	$(BIN)/opskit stack up

drill: install
	$(BIN)/opskit drill

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) reports .stack build *.egg-info
