# Two commands do all the set-up: `make lab` (install + JupyterLab with the
# quick-start notebook) and `make test` (install + the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
export MLSQL_HOME ?= $(CURDIR)/.mlsql

.PHONY: install lab test test-fast bench lint clean

install: $(VENV)/.installed

# torch is pinned to the CPU build that pip has at hand; an open range would
# pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[lab,data,test,torch]'
	$(PY) -m mlsql.kernel install --sys-prefix
	touch $@

# Jupyter refuses to run as root unless told; containers often run as root.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: install
	cd notebooks && ../$(VENV)/bin/jupyter lab $(LAB_ARGS) 01_quickstart.ipynb

test: install
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not slow"

bench: install
	$(PY) bench/bench_core.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .mlsql build *.egg-info
