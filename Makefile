# reidcli — two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: install demo test lint format clean bench

install: $(STAMP)

# torch/torchvision pinned to the wheels this machine carries; faiss chosen by whether a GPU answers.
# faiss-gpu-cu12 installs on any CUDA host but imports only beside CUDA 12 libraries: it is kept only if it imports.
$(STAMP): pyproject.toml setup.py reidcli/retrieval/_cpu.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q "torch>=2.3,<2.15" "torchvision>=0.18,<0.30"
	if nvidia-smi >/dev/null 2>&1 && $(BIN)/pip install -q faiss-gpu-cu12 && $(BIN)/python -c "import faiss"; then :; \
	else $(BIN)/pip uninstall -q -y faiss-gpu-cu12 >/dev/null 2>&1; $(BIN)/pip install -q faiss-cpu; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	bash examples/demo.sh $(DEMO)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check reidcli tests benchmarks
	$(BIN)/ruff format --check reidcli tests benchmarks

format: install
	$(BIN)/ruff format reidcli tests benchmarks
	$(BIN)/ruff check --fix reidcli tests benchmarks

bench: install
	$(BIN)/python -m benchmarks.cpu_eval

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
