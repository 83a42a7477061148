# infini-bench: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on CI machines; users with GPUs get PyPI's CUDA build of the same version, or pass their own.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed ## create .venv and install the project (torch first, see TORCH_SPEC)

run: install ## the embedded default main job on CPU (python run.py)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python run.py $(ARGS)

test: install ## run the test suite (no network, a few minutes on 2 CPU cores)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q $(ARGS)

.PHONY: help install run test
