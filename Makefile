# Two commands do all the set-up: `make lab` (install + JupyterLab with the
# quick-start notebook) and `make test` (install + the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
export MLSQL_HOME ?= $(CURDIR)/.mlsql

.PHONY: install lock lock-upgrade lab test test-fast bench lint clean

install: $(VENV)/.installed $(VENV)/.labextension

# Installs the exact versions in requirements.lock (torch is locked at its CPU build; an
# open range would pull a multi-GB CUDA one), then MLSQL itself. The check fails when the
# lock no longer matches pyproject.toml: `make lock` writes it again.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) .ci/lock.py --check
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps -e ./device_bridge -e .
	$(PY) -m pip check
	$(PY) -m mlsql.notebook.kernel install --sys-prefix
	touch $@

# The JupyterLab extension (extensions/, TypeScript) is built with node and jlpm (which comes with
# jupyterlab) into mlsql/labextension/, only when its sources changed; the venv's JupyterLab sees it
# through a link (edit, `make install`, reload the page). A wheel carries the built files itself.
LABEXT_DIR := $(VENV)/share/jupyter/labextensions/mlsql-jupyterlab
EXT_BUILT := mlsql/labextension/package.json
EXT_SOURCES := $(wildcard extensions/src/*.ts extensions/src/logic/*.ts extensions/style/*) \
  extensions/package.json extensions/yarn.lock extensions/tsconfig.json extensions/.yarnrc.yml \
  $(wildcard mlsql/language/*.py)

$(EXT_BUILT): $(EXT_SOURCES) | $(VENV)/.installed
	@command -v node >/dev/null || { echo "node (>= 18) is needed to build the JupyterLab extension in extensions/"; exit 1; }
	cd extensions && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" jlpm install --immutable && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" jlpm build
	touch $@

$(VENV)/.labextension: $(EXT_BUILT) $(VENV)/.installed
	rm -rf "$(LABEXT_DIR)"
	mkdir -p "$(dir $(LABEXT_DIR))"
	ln -s "$(CURDIR)/mlsql/labextension" "$(LABEXT_DIR)"
	touch $@

# Resolve pyproject.toml again and rewrite requirements.lock (needs the package index): `make lock`
# keeps every locked version that still fits, `make lock-upgrade` takes the newest ones allowed.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) .ci/lock.py

lock-upgrade:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) .ci/lock.py --upgrade

# Jupyter refuses to run as root unless told; containers often run as root.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

# `make lab` also runs a local device agent (trusting this workspace's key, registered as device 'local') for DEPLOY ... TO DEVICE,
# and the job scheduler inside the Jupyter server (the mlsql.notebook.server extension).
DEVICE_PORT ?= 7070
DEVICE_TOKEN ?= local-dev-token

lab: install
	mkdir -p "$(MLSQL_HOME)"
	@# the agent as device 'local' of the workspace: the Deploy dialog and the MLSQL panel list it
	$(VENV)/bin/mlsql run -e "CREATE OR REPLACE DEVICE 'local' OPTIONS (url = 'http://127.0.0.1:$(DEVICE_PORT)', token = '$(DEVICE_TOKEN)')" >/dev/null
	@$(VENV)/bin/mlsql device serve --name local --port $(DEVICE_PORT) --token $(DEVICE_TOKEN) \
	  > "$(MLSQL_HOME)/agent.log" 2>&1 & AGENT=$$!; trap 'kill $$AGENT 2>/dev/null' EXIT INT TERM; \
	echo "device agent 'local' on http://127.0.0.1:$(DEVICE_PORT) (token $(DEVICE_TOKEN)), log in $(MLSQL_HOME)/agent.log"; \
	cd notebooks && ../$(VENV)/bin/jupyter lab $(LAB_ARGS) --ServerApp.jpserver_extensions="{'mlsql.notebook.server': True}" \
	  01_quickstart.ipynb

test: install
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not slow"

bench: install
	$(PY) bench/bench_core.py
	$(PY) bench/bench_export.py
	$(PY) bench/bench_device.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports  # the architecture's contracts (.importlinter)

clean:
	rm -rf $(VENV) .mlsql build *.egg-info mlsql/labextension extensions/lib extensions/node_modules extensions/tsconfig.tsbuildinfo
