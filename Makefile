# Set-up from a bare Python: a virtual environment with torch, the project and its dev extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch pair that lies on this kind of machine's disk; an existing torch in the venv is kept.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m benchmarks.bench_quantizer --quick

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_quantizer

clean:
	rm -rf $(VENV) build *.egg-info
