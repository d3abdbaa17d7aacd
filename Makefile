# asgd_jax: `make demo` runs the main job, `make test` the whole suite (what CI runs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The suite runs in TEST_WORKERS processes, one test file per process at a time
# (module-scoped fixtures such as a local Ray cluster stay in one process).
TEST_WORKERS ?= 2
PYTEST_ARGS ?= -n $(TEST_WORKERS) --dist loadfile

.PHONY: install test lint demo bench clean

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "asgd_jax needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check asgd_jax tests benchmarks

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/asgd-jax demo

bench: install
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
