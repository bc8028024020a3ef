# The two set-up commands (README): `make run` and `make test`. Both install into .venv first.
VENV := .venv
TIER ?= cpu

.PHONY: install run test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

# Main job: every notebook on the embedded default, executed by papermill into outputs/notebooks.
run: install
	$(VENV)/bin/repro notebooks --tier $(TIER)

# Whole test suite: unit/property/end-to-end tests and nbval over every notebook (ci tier).
test: install
	$(VENV)/bin/python -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider tests notebooks
