# igpt-fast: `make demo`, `make test`, `make bench`, `make compile-check` (each creates .venv when missing
# and installs first), `make data` (Fashion-MNIST), `make gpu-check` (CUDA tests and GPU benchmarks with
# the machine's own torch; results in $(OUT)), `make gpu-wheels` / `make gpu-data` (for a GPU window),
# `make test-latest` (the suite against the newest releases, in .venv-latest) and `make lock`.
#
# Versions: `make install` (and so `make test`, the command CI runs) installs the exact versions of
# constraints.txt, so an upstream release cannot break main without a commit of ours. `make test-latest`
# tries the newest releases in a separate venv: an upstream break shows there first, as a failing
# optional run; once it passes, `make lock` writes its versions to constraints.txt.
#
# Torch: a machine that already has a CUDA torch (system Python) reuses it through a venv with
# --system-site-packages (constraints.txt's torch and triton lines are dropped there); a machine with a
# GPU but no torch gets the default (CUDA) wheel; a machine without a GPU gets the pinned CPU build,
# never the multi-GB CUDA one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.igpt-fast-installed
CPU_TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest
FMNIST ?= /usr/share/datasets/fashion-mnist
DEMO_DIR ?= demo

.PHONY: install data test test-latest lock demo bench gpu-check gpu-wheels gpu-data clean

install: $(STAMP)

# $(VENV)/constraints.txt: constraints.txt, less torch/triton where the venv reuses a CUDA torch.
$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	    echo "using the CUDA torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  grep -v -E '^(torch|triton)==' $(CONSTRAINTS) > $(VENV)/constraints.txt; \
	else cp $(CONSTRAINTS) $(VENV)/constraints.txt; fi
	$(PY) -m pip install -q -c $(VENV)/constraints.txt pip setuptools
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q -c $(VENV)/constraints.txt $(CPU_TORCH); fi; fi
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	@touch $(STAMP)

# Fashion-MNIST (Debian's dataset-fashion-mnist) for the demo and the tests that read real data: installed
# with apt-get as root, or through sudo when it needs no password; otherwise the command to run is printed.
data:
	@if [ ! -d $(FMNIST) ]; then \
	  echo "Fashion-MNIST not found at $(FMNIST); installing Debian's dataset-fashion-mnist"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ] || ! { $$SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || \
	      { $$SUDO apt-get update >/dev/null 2>&1 && $$SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1; }; }; then \
	    echo "could not install it; run: sudo apt-get install -y dataset-fashion-mnist  (or set FMNIST=DIR with the IDX files)"; \
	    exit 1; fi; fi

# The tests that need Fashion-MNIST skip, naming `make data`, when it could not be installed.
test: $(STAMP)
	@$(MAKE) --no-print-directory data FMNIST=$(FMNIST) || echo "note: the Fashion-MNIST tests will be skipped"
	IGPT_FAST_FMNIST=$(FMNIST) $(PY) -m pytest -q tests

# mypy over the public API's modules ([tool.mypy] in pyproject.toml: which files, how strict); ~15 s cold.
.PHONY: typecheck
typecheck: $(STAMP)
	$(PY) -m mypy

# The suite against the newest releases of every dependency (no constraints but the CPU torch pin: the
# newest torch wheel on PyPI is the multi-GB CUDA build, which an eager upgrade would otherwise pull).
# Optional: main is judged by `make test`.
test-latest:
	@if [ ! -x $(LATEST_VENV)/bin/python ]; then $(PYTHON) -m venv $(LATEST_VENV); fi
	@echo "$(CPU_TORCH)" > $(LATEST_VENV)/torch-pin.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/torch-pin.txt $(CPU_TORCH)
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/torch-pin.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	@$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers|kernels|numpy|webdataset|faiss-cpu) '
	@$(MAKE) --no-print-directory data FMNIST=$(FMNIST) || echo "note: the Fashion-MNIST tests will be skipped"
	IGPT_FAST_FMNIST=$(FMNIST) $(LATEST_VENV)/bin/python -m pytest -q tests

# constraints.txt from the versions in $(LATEST_VENV) (run after `make test-latest` passes).
lock:
	@test -x $(LATEST_VENV)/bin/python || { echo "no $(LATEST_VENV): run make test-latest first"; exit 1; }
	{ sed -n '/^#/p' $(CONSTRAINTS); $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable 2>/dev/null \
	  | grep -v -i -E '^(-e |igpt)'; } > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	@echo "wrote $(CONSTRAINTS); review the diff and commit it"

demo: $(STAMP) data
	$(VENV)/bin/igpt-fast demo --src $(FMNIST) --out $(DEMO_DIR)

bench: $(STAMP)
	$(PY) benchmarks/bench_tokenize.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_sample.py

# No GPU needed: compile every CUDA kernel config dispatch can launch for sm_90 and sm_80 and fail on a
# compile error, shared memory or registers over the limit, a spill, or a dot off the tensor cores;
# table in benchmarks/results/compile_check.md/.csv. compile-check-all adds the autotune configs.
# Both run twice, failing if either fails: with the venv's triton, then with GPU_TRITON (what the GPU
# machine runs; its wheel in its own folder under the venv, installed once, first on PYTHONPATH), table
# in benchmarks/results/compile_check_triton$(GPU_TRITON).md/.csv.
GPU_TRITON ?= 3.6.0
GPU_TRITON_DIR := $(VENV)/triton-$(GPU_TRITON)
.PHONY: compile-check compile-check-all
$(GPU_TRITON_DIR): | $(STAMP)
	rm -rf $@.tmp
	$(PY) -m pip install -q --no-deps --target $@.tmp triton==$(GPU_TRITON)
	mv $@.tmp $@

compile-check: $(STAMP) | $(GPU_TRITON_DIR)
	s=0; $(PY) tools/compile_check.py --jobs 2 || s=1; \
	PYTHONPATH=$(GPU_TRITON_DIR) $(PY) tools/compile_check.py --jobs 2 \
	  --out benchmarks/results/compile_check_triton$(GPU_TRITON) || s=1; exit $$s

compile-check-all: $(STAMP) | $(GPU_TRITON_DIR)
	s=0; $(PY) tools/compile_check.py --all --jobs 2 || s=1; \
	PYTHONPATH=$(GPU_TRITON_DIR) $(PY) tools/compile_check.py --all --jobs 2 \
	  --out benchmarks/results/compile_check_triton$(GPU_TRITON) || s=1; exit $$s

gpu-check:  # on a CUDA machine that has torch and triton: CUDA tests + every GPU benchmark
	bash benchmarks/gpu_check.sh $(OUT)

# For a GPU machine without network (Python 3.12, x86-64): the wheels its image lacks, into gpu-wheels/
# (carried with the working tree; benchmarks/gpu_steps.sh installs them, the last four only where missing).
GPU_WHEELS ?= webdataset braceexpand faiss-cpu click tqdm packaging pyyaml
gpu-wheels:
	rm -rf gpu-wheels.tmp
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  -d gpu-wheels.tmp $(GPU_WHEELS)
	rm -rf gpu-wheels && mv gpu-wheels.tmp gpu-wheels
	@du -ch gpu-wheels/*.whl

# Fashion-MNIST tokenized for benchmarks/gpu_results.sh (16-colour palette, 10% val, as results/fashion-mnist/):
# gpu-data/fashion-mnist-$(GPU_DATA_N_PX).tar.gz, carried with the working tree and unpacked on the GPU machine.
GPU_DATA_N_PX ?= 14
gpu-data: $(STAMP) data
	rm -rf gpu-data/tmp && mkdir -p gpu-data/tmp
	$(VENV)/bin/igpt-fast palette $(FMNIST) --k 16 --n-px $(GPU_DATA_N_PX) --out gpu-data/tmp/palette.npy
	$(VENV)/bin/igpt-fast tokenize $(FMNIST) --palette gpu-data/tmp/palette.npy --n-px $(GPU_DATA_N_PX) \
	  --val-fraction 0.1 --out gpu-data/tmp/fashion-mnist-$(GPU_DATA_N_PX)
	tar czf gpu-data/tmp/data.tar.gz -C gpu-data/tmp fashion-mnist-$(GPU_DATA_N_PX)
	mv gpu-data/tmp/data.tar.gz gpu-data/fashion-mnist-$(GPU_DATA_N_PX).tar.gz && rm -rf gpu-data/tmp
	@du -h gpu-data/fashion-mnist-$(GPU_DATA_N_PX).tar.gz

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
