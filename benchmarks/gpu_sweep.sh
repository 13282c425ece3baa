#!/usr/bin/env bash
# igpt-fast GPU sweep: every attention kernel variant x tile config timed against cuDNN, FlashAttention-2
# and efficient SDPA, the winners written into the per-GPU defaults table; one command of under 8 minutes
# for a CUDA machine without network access that has torch and triton (a borrowed H100 / H200).
#
#   bash benchmarks/gpu_sweep.sh OUT_DIR             # on the GPU machine (OUT_DIR defaults to $OUT)
#   bash benchmarks/gpu_sweep.sh --dry-run OUT_DIR   # the same steps on CPU, one tiny shape (~1 minute)
#
# What it does (benchmarks/bench_attention.py --sweep has the details): bf16, D 64 / 128 / 96 (H = 2048 / D),
# causal and not, T 1024 / 2304 / 4096 / 16384 (B = 16384 / T); for each shape every grid order, forward
# tile and backward variant (split with each dK/dV and dQ tile, fused_atomic with each tile), with pointer
# and (sm_90) TMA I/O, is checked
# against the fp32 reference and then timed; the winner is timed in fwd and fwd+bwd next to torch's
# default SDPA, cuDNN, FlashAttention-2 and efficient SDPA. OUT_DIR/defaults.json is the project's
# igpt_fast/kernels/defaults.json with those entries merged in (config = the winning variant and tiles,
# torch_backend = whether forcing cuDNN beat torch's default SDPA, timings = every candidate's ms): a
# developer copies it over igpt_fast/kernels/defaults.json and commits it. summary.md holds every
# timing table, results.tar.gz the logs and CSVs. Install as in gpu_check.sh (gpu-wheels/ carried; the
# sweep itself needs only torch and triton, so it runs even when the install step fails).
#
# Time arithmetic (run it after gpu_check.sh in the same 15-minute window, as a second call while the
# machine is warm): machine start 60-120 s; gpu_check.sh 445 s of step limits (213 s measured on an H200,
# 2026-12-04); this script 40 + 280 = 320 s of step limits: 120 + 445 + 320 = 885 s <= 900 s at worst,
# about 90 + 215 + 250 = 555 s expected. Inside the sweep step (280 s), on sm_90 (io "tma" doubles the
# forward and split-backward candidates): ~85 s compiling every candidate in 14 parallel processes (~200
# configs, ~300 kernels, 2-4 s each), then 24 shapes x 46 (causal) or 23 candidates x ~80 ms (check on a
# 2-head slice + do_bench warmup 5 ms, rep 20 ms) + 10 provider timings x ~80 ms: ~4-5 s a shape, ~110 s
# in all; --budget-s 240 starts no new shape after 240 s, and the table is rewritten after each shape, so
# a slow machine still returns every shape it finished (the shapes run in order of value, D 96 last).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_steps.sh
gpu_args "usage: bash benchmarks/gpu_sweep.sh [--dry-run] [OUT_DIR]  (OUT_DIR defaults to \$OUT)" "$@"
gpu_begin "igpt-fast GPU sweep: attention variants x tiles -> defaults table"

SWEEP=(benchmarks/bench_attention.py --sweep --seq-lens 1024 2304 4096 16384 --head-dims 64 128 96
       --warmup 5 --rep 20 --jobs 14 --budget-s 240)
if [ "$DRY_RUN" = 1 ]; then  # tiny fp32 shapes under the interpreter, one class, no parallel compile
  SWEEP+=(--smoke --causal causal --jobs 0)
fi
cp igpt_fast/kernels/defaults.json "$OUT_DIR/defaults.json"
PUBLISH=(sweep/attention_sweep.md:attention_sweep.md)

gpu_plan install 40 "carried wheels + pip install -e . into a venv over the python (offline)" \
  sweep 280 "every attention variant x tile, checked then timed vs SDPA default / cuDNN / flash / efficient; winners -> defaults.json"

step install 40 bash -c gpu_install
step sweep 280 "$PY" "${SWEEP[@]}" --out "$PACK/sweep" --record "$OUT_DIR/defaults.json" \
  --source "gpu_sweep.sh $(date -u +%Y-%m-%d)"
gpu_end
