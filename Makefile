# Stemma: `make demo` runs the worked example end to end, `make test` runs the tests.
# Both start from nothing but Python: they create .venv and install pinned dependencies.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt
CONFIG ?= configs/credit.yaml

.PHONY: install dev demo data test test-all bench lint shape format typecheck clean native-deps

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

data: install
	$(BIN)/stemma data generate

# The worked example's whole story: the spec is checked, then `stemma demo` trains the
# first champion and plays simulated days of scoring, drift monitoring, retraining,
# shadow evaluation and promotion in a fresh project under .stemma/demo.
demo: install data
	$(BIN)/stemma validate $(CONFIG)
	$(BIN)/stemma demo

# PostgreSQL for tests/infra/test_native_stack.py and Chromium for the UI test in
# tests/flows/test_serve.py (installed from Debian's packages when missing and run as
# root; otherwise those tests say why they skip).
native-deps:
	bash infra/native/install.sh
	bash infra/native/install-browser.sh

# Test files run in parallel worker processes (pytest-xdist), one file per worker at a time
# so that a module's fixtures start once. Most tests wait on subprocesses and servers: on two
# cores, two workers took ~1,070 s where one process took ~1,700 s. PYTEST_WORKERS=0 runs
# them in this process.
PYTEST_WORKERS ?= logical
test: dev native-deps
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile

bench: dev
	$(BIN)/python -m pytest tests/benchmarks -m benchmark -s

lint: dev
	$(BIN)/ruff check components examples flows tests
	$(BIN)/ruff format --check components examples flows tests
	$(BIN)/lint-imports

# The code-shape numbers of the redesign: module and function lengths, imports of private
# names, the lines of components/ against their baseline, and the import contract.
shape: dev
	$(BIN)/python tests/code_shape.py

format: dev
	$(BIN)/ruff format components examples flows tests
	$(BIN)/ruff check --fix components examples flows tests

typecheck: dev
	$(BIN)/mypy components examples

clean:
	rm -rf .stemma .pytest_cache .ruff_cache .mypy_cache htmlcov .coverage
