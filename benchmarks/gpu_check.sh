#!/usr/bin/env bash
# igpt-fast GPU check: the CUDA kernel tests and the GPU benchmarks in one command of under 8 minutes,
# for a CUDA machine without network access that has torch and triton (a borrowed H100 / H200).
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine (OUT_DIR defaults to $OUT)
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # the same steps on CPU, tiny shapes (1-2 minutes)
#
# Needs gpu-wheels/ (`make gpu-wheels`) carried with the working tree: the install step puts those
# wheels and the project into a throwaway venv that sees python3's packages (pip --no-index --no-deps,
# nothing fetched; the dry run installs the project too), and every step runs that venv's python.
# Steps, most valuable first, each under a time limit (the plan table in summary.md; 445 s in all):
# install, CUDA tests of the three kernels (bf16, T = 4096 / 16384, torch.compile vs eager; JUnit XML),
# host cost per call of our ops next to torch's (bench_overhead.py; goal: at most 1.2x SDPA's), the
# igpt-s training step with impl=triton paired with impl=torch, eager and compiled, at 32x32 and at
# 64x64 with activation checkpointing (bench_train.py --gpu; goals: triton eager >= 1.1x torch eager,
# compiled >= 1.0x compiled torch, MFU >= 40% at 32x32; it stops at its limit with every pair measured
# so far, compiling last), attention vs the SDPA backends at D = 64, softmax and cross-entropy GB/s
# against copy bandwidth. Attention at D = 96 / 128 is left to gpu_sweep.sh, the second call of the
# same window, which times every head dim against every SDPA backend.
# OUT_DIR receives summary.md (every table and each step's status, rewritten after each step),
# results.tar.gz (logs, CSVs, markdown, plots, JUnit XML) and three plots: five files.
# A failed or timed-out step is recorded and the next one runs; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_steps.sh
gpu_args "usage: bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]  (OUT_DIR defaults to \$OUT)" "$@"
gpu_begin "igpt-fast GPU check"

SMOKE=()
SMOKE_ATTN=()
TEST_ARGS=()
TRAIN_ARGS=(--gpu)
OVERHEAD_ARGS=(--no-stub --samples 10)  # real launches, tiny shapes
if [ "$DRY_RUN" = 1 ]; then  # the benchmarks' --smoke: tiny fp32 shapes that run on CPU
  SMOKE=(--smoke)
  SMOKE_ATTN=(--smoke --modes fwd+bwd --causal causal)  # later flags win: one interpreted mode per provider
  TEST_ARGS=(-k dispatch)
  TRAIN_ARGS=(--smoke)  # the same four variants per shape, 1 layer at 4x4, compiled with aot_eager
  OVERHEAD_ARGS=(--calls 20 --samples 3)  # launches stubbed on CPU
elif "$PY" -c "import xdist" 2>/dev/null; then
  TEST_ARGS=(-n 8)  # Triton compiles each kernel variant once per process: compile in parallel
fi
ATTN=(benchmarks/bench_attention.py --providers ours sdpa-flash sdpa-efficient sdpa-cudnn --modes fwd fwd+bwd
      --seq-lens 1024 2304 4096 16384 --warmup 10 --rep 30)
PUBLISH=(attention_d64/attention.png:attention_d64.png softmax/softmax.png:softmax.png
         cross_entropy/cross_entropy.png:cross_entropy.png)

gpu_plan install 35 "carried wheels + pip install -e . into a venv over the python (offline)" \
  tests 85 "tests/test_attention.py, test_softmax.py, test_cross_entropy.py on CUDA" \
  overhead 35 "bench_overhead: us per call of our attention, softmax, cross-entropy vs torch's (goal <= 1.2x)" \
  train 205 "bench_train --gpu: igpt-s 32x32 and 64x64 ckpt, triton vs torch, eager then compiled; goals" \
  attention_d64 35 "attention vs SDPA flash / efficient / cuDNN, T 1024-16384, D 64, fwd / fwd+bwd" \
  softmax 25 "row softmax GB/s vs torch and copy bandwidth" \
  cross_entropy 25 "fused cross-entropy GB/s vs torch"

step install 35 bash -c gpu_install
step tests 85 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_softmax.py \
  tests/test_cross_entropy.py "${TEST_ARGS[@]}" --junitxml="$PACK/tests/junit.xml"
step overhead 35 "$PY" benchmarks/bench_overhead.py "${OVERHEAD_ARGS[@]}" --out "$PACK/overhead"
step train 205 "$PY" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" --out "$PACK/train"
step attention_d64 35 "$PY" "${ATTN[@]}" --head-dims 64 --out "$PACK/attention_d64" "${SMOKE_ATTN[@]}"
step softmax 25 "$PY" benchmarks/bench_softmax.py --warmup 10 --rep 30 --out "$PACK/softmax" "${SMOKE[@]}"
step cross_entropy 25 "$PY" benchmarks/bench_cross_entropy.py --warmup 10 --rep 30 --out "$PACK/cross_entropy" \
  "${SMOKE[@]}"
gpu_end
