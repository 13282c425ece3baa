#!/usr/bin/env bash
# igpt-fast GPU check: one command for a CUDA machine without network access that already has torch
# and triton. Installs the project (pip install --no-deps --no-build-isolation -e ., so nothing is
# fetched), runs the test suite on CUDA (bf16, T = 4096 / 16384, torch.compile vs eager included) and
# the GPU benchmarks, and writes logs, CSV, markdown and plots to the folder given as $1, else $OUT,
# else benchmarks/results. Each step has a time limit (about 6 minutes in all on an H100); a failing
# step is logged and the next one still runs; the exit status is non-zero if any step failed.
#
#   bash benchmarks/gpu_check.sh /tmp/gpu-results
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="$(mkdir -p "${1:-${OUT:-benchmarks/results}}" && cd "${1:-${OUT:-benchmarks/results}}" && pwd)"
PY="${PYTHON:-python}"
FAILED=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  if timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start))s"
  else
    echo "   FAILED (exit $?) after $((SECONDS - start))s; last lines of $OUT_DIR/$name.log:"
    tail -n 15 "$OUT_DIR/$name.log" | sed 's/^/   | /'
    FAILED+=("$name")
  fi
}

{ nvidia-smi || true; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; git rev-parse HEAD || true; } > "$OUT_DIR/env.txt" 2>&1
step install 120 "$PY" -m pip install --no-deps --no-build-isolation -e .
step tests 200 "$PY" -m pytest -q tests/test_attention.py tests/test_softmax.py tests/test_cross_entropy.py \
  --junitxml="$OUT_DIR/tests.xml"
step bench_attention 150 "$PY" benchmarks/bench_attention.py --out "$OUT_DIR" \
  --providers ours sdpa-flash sdpa-efficient sdpa-cudnn --modes fwd bwd fwd+bwd \
  --seq-lens 1024 2304 4096 8192 16384 --head-dims 64 96 128 --warmup 10 --rep 30
step bench_attention_naive 60 "$PY" benchmarks/bench_attention.py --out "$OUT_DIR" --no-plot \
  --providers sdpa-math naive --modes fwd+bwd --seq-lens 1024 2304 4096 --head-dims 64 --warmup 5 --rep 20
step bench_attention_autotune 90 "$PY" benchmarks/bench_attention.py --out "$OUT_DIR" --no-plot --autotune \
  --providers ours --modes fwd+bwd --seq-lens 1024 2304 4096 --head-dims 64 128 --causal causal --warmup 10 --rep 30
step bench_softmax 40 "$PY" benchmarks/bench_softmax.py --out "$OUT_DIR" --warmup 10 --rep 30
step bench_cross_entropy 40 "$PY" benchmarks/bench_cross_entropy.py --out "$OUT_DIR" --warmup 10 --rep 30

# >>> Training benchmark (owned by the model/train engineer; adjust its flags and limit here). It
# >>> writes to benchmarks/results/, so its files are copied to OUT_DIR afterwards.
if [ -f benchmarks/bench_train.py ]; then
  step bench_train 150 "$PY" benchmarks/bench_train.py --gpu
  cp -f benchmarks/results/train_gpu.* "$OUT_DIR"/ 2>/dev/null || true
fi
# <<< Training benchmark.

echo "results in $OUT_DIR"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed steps: ${FAILED[*]}"
  exit 1
fi
