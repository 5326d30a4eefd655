# `make install` puts the CPU build of PyTorch in first, so pip never pulls CUDA wheels.
# GPU users: `make install TORCH="torch --index-url https://download.pytorch.org/whl/cu128"`
# (or install torch yourself first and run `make install TORCH=`).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench bench-gpu clean

# DeepSpeed compiles its CPU shared-memory op on first use (about 40 s); built here, once, so no
# run (and no test) pays for it later. Skipped where the accelerator has no such op (GPUs).
DS_WARM = from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder("ShareMemCommBuilder"); b and b.load(verbose=False)

install:
	@if [ -n "$(TORCH)" ]; then $(PIP) install -q $(TORCH); fi
	$(PIP) install -q -e ".[dev,sweep,cluster,deepspeed]"
	@$(PYTHON) -c '$(DS_WARM)' >/dev/null 2>&1 || echo "make install: DeepSpeed's CPU op did not build now; DeepSpeed will build it on first use"

demo:
	align train method=dpo

# Two workers, one per core; a file's tests stay together (they share module fixtures).
test:
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

lint:
	$(PYTHON) -m ruff check align_cli tests scripts
	$(PYTHON) -m ruff format --check align_cli tests scripts

bench:
	$(PYTHON) scripts/bench.py

# One H100/H200, under 8 minutes; `python3 scripts/bench_gpu.py --dry-run` checks it on a CPU.
bench-gpu:
	$(PYTHON) scripts/bench_gpu.py

clean:
	rm -rf outputs multirun .pytest_cache build *.egg-info
