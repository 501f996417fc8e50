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
	$(BIN)/python -m bbkernels.build
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# Two workers (one per core of the CI machine); a file's tests stay in one worker, so its module fixtures run once.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# The main job: Bayesian Bits LeNet5 on real MNIST with the reference README's flags, for a few epochs.
DATA_DIR ?= data
DEMO_EPOCHS ?= 4
SHARED_MNIST := ../shared/data/MNIST/raw

demo: $(STAMP)
	@if [ -d $(SHARED_MNIST) ] && [ ! -d $(DATA_DIR)/MNIST/raw ]; then \
		mkdir -p $(DATA_DIR)/MNIST && cp -r $(SHARED_MNIST) $(DATA_DIR)/MNIST/ && chmod -R u+w $(DATA_DIR)/MNIST; fi
	$(BIN)/bayesian-bits train --experiment mnist --data-dir $(DATA_DIR) --model lenet5quantized \
		--batch-size 128 --learning-rate 1e-3 --learning-rate-q 1e-3 --learning-rate-s 1e-3 \
		--optimizer Adam --optimizer-q Adam --optimizer-s Adam --gating-lambda 0.1 \
		--gamma-4-init 6 --gamma-8-init 6 --gamma-16-init -6 --gamma-32-init -6 --learned-scale range \
		--include-pruning --reg-type bop --epochs $(DEMO_EPOCHS) --eval-every 1 --logdir runs/demo --overwrite \
		--target-rel-bops 1.0 --fixed-gate-finetune-epochs 1 --finetune-optimizer Adam

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_quantizer --csv bench_out/quantizer.csv

clean:
	rm -rf $(VENV) build bench_out *.egg-info
