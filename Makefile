# Two entry points for a fresh clone: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_CONFIG := examples/deepseek-v3.1-b200.yaml
DEMO_OUT := out/deepseek-v3.1

.PHONY: install demo test lint clean

# torch is pinned first so pip takes the CPU wheel instead of a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet 'torch==2.13.0'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Validate → migrate → package → check the truss dir with the real truss library.
demo: install
	$(BIN)/bisllm validate $(DEMO_CONFIG)
	$(BIN)/bisllm migrate examples/v1-llama-3.3-70b-engine-builder.yaml --dry-run
	mkdir -p out
	$(BIN)/bisllm package $(DEMO_CONFIG) -o $(DEMO_OUT) --force
	TRUSS_NO_UPDATE_CHECK=1 $(BIN)/python -c "from pathlib import Path; from truss.base.truss_config import TrussConfig; TrussConfig.from_yaml(Path('$(DEMO_OUT)/truss/config.yaml')).validate_forbid_extra(); print('truss accepts $(DEMO_OUT)/truss/config.yaml')"
	rm -rf out/deepseek-v3.1-build-context
	TRUSS_NO_UPDATE_CHECK=1 $(BIN)/truss image build-context out/deepseek-v3.1-build-context $(DEMO_OUT)/truss
	@echo "Image build context for truss push rendered in out/deepseek-v3.1-build-context"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) out
