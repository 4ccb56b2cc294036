# Everything runs inside .venv. torch is installed first as the CPU wheel 2.13.0 when the venv has none
# (an unpinned torch would pull several GB of CUDA packages); GPU images bring their own torch.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup test pretrain finetune sweep bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	@# DeepSpeed's CPU collective op is built on first use (30-50 s on 2 cores): built here, once, rather
	@# than inside a newcomer's first run or the first test that starts DeepSpeed.
	$(BIN)/python -m suformer.train.jit_ops
	@# Debian's Chromium renders the MLflow compare view (jobs/render_sweep.py and its test).
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null \
		|| (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) \
		|| echo "warning: could not install Debian's chromium (jobs/render_sweep.py needs it): apt-get install chromium"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

pretrain: setup
	$(BIN)/python jobs/pretrain.py --config jobs/configs/t5_pegasus_tiny_cpu.yaml

finetune: setup
	$(BIN)/python jobs/finetune.py --config jobs/configs/finetune_ner_tiny_cpu.yaml

sweep: setup
	$(BIN)/python jobs/sweep.py --config jobs/configs/sweep_sentiment_tiny_cpu.yaml

bench: setup
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/models_cpu.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/efficiency.py

clean:
	rm -rf $(VENV) runs .pytest_cache
