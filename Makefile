# The two set-up commands (README): `make run` and `make test`. Both install into .venv first.
VENV := .venv
TIER ?= cpu

.PHONY: install run test check notebooks

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh

# Main job: every notebook on both embedded models: runs first (progress bar, resumable), then
# papermill into outputs/$(TIER)/notebooks. The figures and README tables come from `repro report`.
run: install
	$(VENV)/bin/repro batch --tier $(TIER)

# Whole test suite: unit/property/end-to-end tests, the explorer in JupyterLab + headless Chromium,
# and nbval over every notebook (ci tier). First the ci-tier records the notebooks read, in two processes
# (--ci-records); then two workers (pytest-xdist), each at one torch thread (the ci tier's `threads`). Each
# test module and each notebook runs whole on one worker (--dist loadscope: a notebook's cells share one
# kernel, a module's tests its module fixtures; pytest-xdist 3.8's loadgroup does not group under pytest 9.2),
# handed out longest first (conftest.py's order; xdist's own reorder would put scopes with many tests first).
test: install
	bash scripts/install_browser.sh
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder --ci-records --nbval-lax --nbval-current-env \
		-p no:cacheprovider --durations=25 tests notebooks

# Fast loop for development: unit and property tests on tiny random models; no embedded model, no
# subprocess, no browser, no notebook (the `slow` marker, conftest.py). Not a substitute for `make test`.
check: install
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests

# The notebooks are their own source (edit them in JupyterLab): execute them in place at the ci tier, the
# outputs nbval compares, before committing a change to a notebook or to what it prints.
notebooks: install
	$(VENV)/bin/python scripts/execute_notebooks.py
