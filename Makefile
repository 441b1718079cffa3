# One command each on a fresh clone: `make test`, `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU_PIN := torch==2.13.0
RUNS ?= runs

.PHONY: setup test test-vbench demo lint bench bench-linvideo bench-linvideo-e2e bench-sparse bench-dfa-sla bench-toy-cuda clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A machine without a usable torch gets the pinned CPU wheel, never a loose pin (which pulls CUDA).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not vbench"

# Real VBench: builds its venv (torch 2.5.1 + vbench 0.1.5, ~4 min and ~6 GB on first use) under
# VBENCH_TEST_CACHE, then scores toy clips with temporal_flickering through the driver.
VBENCH_TEST_CACHE ?= .cache/vbench-test
test-vbench: setup
	BENCH_VBENCH_CACHE=$(abspath $(VBENCH_TEST_CACHE)) $(PY) -m pytest -q -p no:cacheprovider -m vbench

# Dense, untrained linear attention (all layers) and LinVideo (the default conversion shipped beside the
# teacher: half of the layers linear) on the toy teacher, 64 held-out prompts, ToyBench.
demo: setup
	$(VENV)/bin/bench run --method sdpa --model toy --device cpu --runs-dir $(RUNS)
	$(VENV)/bin/bench run --method linear --model toy --device cpu --runs-dir $(RUNS)
	$(VENV)/bin/bench run --method linvideo --model toy --device cpu --runs-dir $(RUNS)
	$(VENV)/bin/bench report --runs-dir $(RUNS) --out $(RUNS)/report

lint: setup
	$(VENV)/bin/ruff check harness methods tests
	$(VENV)/bin/ruff format --check harness methods tests

# GPU benchmark: the latency script of the foundation issue (run on a CUDA machine).
bench: setup
	$(PY) -m harness.benchmarks.gpu_latency --out reports/gpu

# LinVideo on the GPU: correctness, latency with the paper's converted layers, one ADM training step.
bench-linvideo: setup
	$(PY) -m harness.benchmarks.linvideo_gpu --out reports/gpu/linvideo

# LinVideo end to end at Wan 1.3B 480p x 81: dense, LinVideo, 4-step, + radial samples beside the paper's (< 8 min).
bench-linvideo-e2e: setup
	$(PY) -m harness.benchmarks.linvideo_e2e_gpu --out reports/gpu/linvideo_e2e

# Sparse baselines on the GPU: Flex vs masked dense, attention and forward latency at Wan shapes (~5 min on an H100).
bench-sparse: setup
	$(PY) -m harness.benchmarks.sparse_gpu --out reports/gpu/sparse

# DFA's window and SLA (Flex's critical blocks, the Triton linear branch): correctness against masked dense and
# float64, then per-call latency and SLA's parts.
bench-dfa-sla: setup
	$(PY) -m harness.benchmarks.dfa_sla_gpu --out reports/gpu/dfa_sla

# The toy on CUDA: Flex vs masked dense at toy and short-clip sizes, then a short bench run of every sparse
# method and linvideo (~5 min on an H200).
bench-toy-cuda: setup
	$(PY) -m harness.benchmarks.toy_cuda_gpu --out reports/gpu/toy_cuda

clean:
	rm -rf $(VENV) $(RUNS)
