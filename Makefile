# Two entry points for a fresh clone: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_CONFIG := examples/deepseek-v3.1-b200.yaml
DEMO_OUT := out/deepseek-v3.1
TINY_MOE := examples/bisllm-tiny-moe

.PHONY: install demo test lint clean default-model eagle-head mtp-layer

# torch is pinned first so pip takes the CPU wheel instead of a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet 'torch==2.13.0'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Serve the embedded default model (`bisllm serve --workers 2`: two workers behind the KV-aware
# router) and query it with the OpenAI SDK, then
# validate → migrate → package → check the truss dir with the real truss library.
demo: install
	$(BIN)/bisllm validate $(TINY_MOE)/config.yaml
	$(BIN)/python examples/serve_demo.py
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

# Retrain the embedded default model from scratch (~55 minutes on 2 cores), evaluate it and
# record its checksums; see examples/bisllm-tiny-moe/README.md.
default-model: install
	cd $(TINY_MOE) && ../../$(BIN)/python -m recipe.train --out checkpoint --loss-log training_log.jsonl
	cd $(TINY_MOE) && ../../$(BIN)/python -m recipe.evaluate checkpoint --json eval.json
	cd $(TINY_MOE) && sha256sum checkpoint/* > SHA256SUMS

# Retrain the default model's EAGLE-3 draft head (about 3 minutes on 2 cores) into
# $(TINY_MOE)/eagle3; see examples/bisllm-tiny-moe/README.md.
eagle-head: install
	cd $(TINY_MOE) && ../../$(BIN)/python -m recipe.eagle --out eagle3

# Retrain the default model's MTP (NextN) layer (about 8 minutes on 2 cores) into
# $(TINY_MOE)/mtp; see examples/bisllm-tiny-moe/README.md.
mtp-layer: install
	cd $(TINY_MOE) && ../../$(BIN)/python -m recipe.mtp --out mtp

clean:
	rm -rf $(VENV) out
