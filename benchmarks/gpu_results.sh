#!/usr/bin/env bash
# igpt-fast Fashion-MNIST results on one borrowed GPU: AR and BERT models pretrained for a fixed
# wall-clock budget each with the Triton kernels in bf16, a linear probe of every layer (with the
# raw-pixel baseline), and completions, packed into at most eight files.
#
#   bash benchmarks/gpu_results.sh OUT_DIR             # on the GPU machine (OUT_DIR defaults to $OUT)
#   bash benchmarks/gpu_results.sh --dry-run OUT_DIR   # the same pipeline on CPU on tiny synthetic IDX
#
# Needs gpu-wheels/ (`make gpu-wheels`) and gpu-data/ (`make gpu-data`: Fashion-MNIST tokenized at
# n_px 14 with a 16-colour palette, the setup of results/fashion-mnist/, packed as one .tar.gz)
# carried with the working tree. Steps: install, data (unpack), timing (a short run of each model
# times ms/step), train (AR and BERT at the same time on the one GPU, each for the number of steps
# that fits TRAIN_SECONDS, cosine schedule completed), probe (every layer + raw pixels, both runs at
# once), sample (completions of test images). Step limits add up to 240 s + TRAIN_SECONDS.
#
# Settings (environment): TRAIN_SECONDS (120), MODEL_ARGS ("--preset igpt-s --n-layer 8": 8 layers of
# width 512), BATCH_SIZE (128), LR (2e-3), PROBE_MAX_TRAIN (5000) and PROBE_MAX_EVAL (2000) as in
# results/fashion-mnist, GPU_DATA (gpu-data/fashion-mnist-14.tar.gz) or DATA_DIR (a tokenized folder).
# OUT_DIR receives summary.md (training and probe tables), results.tar.gz (logs, configs, log.jsonl,
# probe.json, plots, sample grids; no checkpoints) and six plots. Exit status 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_steps.sh
gpu_args "usage: bash benchmarks/gpu_results.sh [--dry-run] [OUT_DIR]  (OUT_DIR defaults to \$OUT)" "$@"
gpu_begin "igpt-fast Fashion-MNIST results: AR vs BERT, linear probes"

if [ "$DRY_RUN" = 1 ]; then
  export TRAIN_SECONDS="${TRAIN_SECONDS:-6}" MODEL_ARGS="${MODEL_ARGS:---n-layer 2 --n-embd 32 --n-head 2}" \
    BATCH_SIZE="${BATCH_SIZE:-8}" PROBE_MAX_TRAIN="${PROBE_MAX_TRAIN:-150}" PROBE_MAX_EVAL="${PROBE_MAX_EVAL:-40}" \
    TIMING_STEPS=4 NUM_WORKERS=0 MAX_STEPS=12 SAMPLE_ARGS="--n-images 2 --samples-per-image 2" \
    IMPL=torch  # the Triton interpreter takes seconds per training step even at n_px 4
else
  export TRAIN_SECONDS="${TRAIN_SECONDS:-120}" MODEL_ARGS="${MODEL_ARGS:---preset igpt-s --n-layer 8}" \
    BATCH_SIZE="${BATCH_SIZE:-128}" PROBE_MAX_TRAIN="${PROBE_MAX_TRAIN:-5000}" PROBE_MAX_EVAL="${PROBE_MAX_EVAL:-2000}" \
    TIMING_STEPS=30 NUM_WORKERS=2 MAX_STEPS=1000000 SAMPLE_ARGS="--n-images 8 --samples-per-image 4" IMPL=triton
fi
export LR="${LR:-2e-3}" GPU_DATA="${GPU_DATA:-gpu-data/fashion-mnist-14.tar.gz}" DATA_DIR="${DATA_DIR:-}" \
  IGPT="$PY -m igpt_fast.cli"
PUBLISH=(runs/ar/loss.png:loss_ar.png runs/bert/loss.png:loss_bert.png runs/ar/probe.png:probe_ar.png
         runs/bert/probe.png:probe_bert.png runs/ar/samples/completions.png:completions_ar.png
         runs/bert/samples/completions.png:completions_bert.png)

has_flag() {  # has_flag VERB FLAG: whether `igpt-fast VERB --help` lists FLAG (the CLI is evolving)
  $IGPT "$1" --help 2>/dev/null | grep -q -- "$2"
}

both() {  # both NAME CMD...: CMD ar and CMD bert at the same time (logs/NAME-ar.log, ...); fail if either fails
  local name="$1" pids=() obj rc=0
  shift
  for obj in ar bert; do
    "$@" "$obj" > "$PACK/logs/$name-$obj.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  tail -n 4 "$PACK/logs/$name"-*.log
  return $rc
}

data_step() {  # the tokenized dataset in $WORK/data
  if [ "$DRY_RUN" = 1 ]; then  # two classes of 8x8 images: bright top half or bright bottom half
    mkdir -p "$WORK/idx"
    "$PY" - "$WORK/idx" <<'EOF' || return 1
import gzip, os, struct, sys
import numpy as np
rng = np.random.default_rng(0)
for prefix, n in [("train", 240), ("t10k", 80)]:
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, 8, 8))
    for i, y in enumerate(labels):
        images[i, 4 * y:4 * y + 4] += 180
    for kind, array in [("images-idx3", images), ("labels-idx1", labels)]:
        with gzip.open(os.path.join(sys.argv[1], f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
            f.write(array.astype(np.uint8).tobytes())
EOF
    $IGPT palette "$WORK/idx" --k 4 --n-px 4 --workers 1 --out "$WORK/palette.npy" \
      && $IGPT tokenize "$WORK/idx" --palette "$WORK/palette.npy" --out "$WORK/data" --n-px 4 \
        --val-fraction 0.2 --workers 1 --shard-size 100 || return 1
  elif [ -n "$DATA_DIR" ]; then
    ln -sfn "$(cd "$DATA_DIR" && pwd)" "$WORK/data" || return 1
  elif [ -f "$GPU_DATA" ]; then
    mkdir -p "$WORK/data" && tar xzf "$GPU_DATA" -C "$WORK/data" --strip-components=1 || return 1
  else
    echo "no $GPU_DATA: run \`make gpu-data\` before the GPU window and carry gpu-data/, or set DATA_DIR" >&2
    return 1
  fi
  "$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print('data:', {k: m[k] for k in m if k not in ('class_names', 'source')})" \
    "$WORK/data/meta.json"
}

train_one() {  # train_one timing|full OBJECTIVE: a timing run (TIMING_STEPS) or the run (the planned steps)
  local steps=$TIMING_STEPS run="$WORK/timing/$2" log_every ckpt=0 warmup n_px
  log_every=$((steps / 3 > 1 ? steps / 3 : 1))
  if [ "$1" = full ]; then
    steps="$(cat "$PACK/timing/steps_$2")" && run="$PACK/runs/$2" || return 1
    log_every=$((steps / 40 > 1 ? steps / 40 : 1))
    ckpt=$((steps / 4 > 1 ? steps / 4 : 1))  # a checkpoint to probe even if the time limit cuts the run
  fi
  warmup=$((steps / 10 < 100 ? steps / 10 : 100))
  n_px="$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['n_px'])" "$WORK/data/meta.json")" || return 1
  # shellcheck disable=SC2086  # MODEL_ARGS holds several flags
  $IGPT train "$WORK/data" --out "$run" --objective "$2" $MODEL_ARGS --n-px "$n_px" --impl "$IMPL" --steps "$steps" \
    --batch-size "$BATCH_SIZE" --lr "$LR" --warmup-steps "$warmup" --log-every "$log_every" --eval-every 0 \
    --eval-batches 20 --ckpt-every "$ckpt" --num-workers "$NUM_WORKERS" --seed 0
}

timing_step() {  # a short run of each model (both at once, as they will train); steps for TRAIN_SECONDS
  both timing train_one timing || return 1
  "$PY" - "$WORK/timing" "$PACK/timing" <<'EOF'
import json, os, statistics, sys
src, out = sys.argv[1:]
budget, max_steps = float(os.environ["TRAIN_SECONDS"]), int(os.environ["MAX_STEPS"])
lines = ["| objective | ms/step | tok/s | planned steps for %g s |" % budget, "|---|---|---|---|"]
for obj in ("ar", "bert"):
    rows = [json.loads(ln) for ln in open(os.path.join(src, obj, "log.jsonl")) if ln.strip()]
    ms = statistics.median([r["ms_per_step"] for r in rows if "ms_per_step" in r][1:] or
                           [r["ms_per_step"] for r in rows if "ms_per_step" in r])
    tok_s = statistics.median([r["tok_per_s"] for r in rows if "tok_per_s" in r])
    steps = max(2, min(max_steps, int(0.9 * budget * 1e3 / ms)))  # 10% for evaluation and checkpoints
    with open(os.path.join(out, f"steps_{obj}"), "w") as f:
        f.write(f"{steps}\n")
    lines.append(f"| {obj} | {ms:.1f} | {tok_s:.3g} | {steps} |")
with open(os.path.join(out, "timing.md"), "w") as f:
    f.write("# timing (both models at once, after the first logged interval)\n\n" + "\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

train_step() {  # both models, then the training table
  local start=$SECONDS rc=0
  both train train_one full || rc=1
  echo "wall $((SECONDS - start)) s"
  "$PY" - "$PACK/runs" "$WORK/data/meta.json" "$PACK/train/train.md" "$((SECONDS - start))" <<'EOF'
import json, os, sys
runs, meta_path, out, wall = sys.argv[1:]
meta = json.load(open(meta_path))
n_train = meta["splits"]["train"]["samples"]
lines = ["| objective | params | steps | images seen | epochs | ms/step | tok/s | MFU | train loss | val loss |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for obj in ("ar", "bert"):
    path = os.path.join(runs, obj, "log.jsonl")
    if not os.path.exists(path):
        lines.append(f"| {obj} | no log.jsonl |"); continue
    rows = [json.loads(ln) for ln in open(path) if ln.strip()]
    cfg = json.load(open(os.path.join(runs, obj, "config.json")))
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    last = train[-1] if train else {}
    steps = last.get("step", 0)
    batch = cfg["train"]["batch_size"] * cfg["train"]["grad_accum"] * cfg["world_size"]
    mfu = last.get("mfu")
    params = f"{cfg['params'] / 1e6:.2f}M"
    lines.append(f"| {obj} | {params} | {steps} | {steps * batch} | {steps * batch / n_train:.2f} | "
                 f"{last.get('ms_per_step', float('nan')):.1f} | {last.get('tok_per_s', float('nan')):.3g} | "
                 f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | {last.get('loss', float('nan')):.4f} | "
                 f"{val[-1]['val_loss'] if val else float('nan'):.4f} |")
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w") as f:
    f.write(f"# pretraining (AR and BERT at the same time, {wall} s wall)\n\n" + "\n".join(lines) + "\n")
print("\n".join(lines))
EOF
  return $rc
}

on_run() {  # on_run probe|sample OBJECTIVE: that verb on the trained run, with --impl where the verb has it
  local args=(--max-train "$PROBE_MAX_TRAIN" --max-eval "$PROBE_MAX_EVAL") impl=()
  # shellcheck disable=SC2206  # SAMPLE_ARGS holds several flags
  [ "$1" = sample ] && args=(--split test $SAMPLE_ARGS)
  has_flag "$1" --impl && impl=(--impl "$IMPL")
  $IGPT "$1" "$PACK/runs/$2" --data "$WORK/data" "${args[@]}" "${impl[@]}"
}

probe_step() {  # both probes, then one table: test accuracy per layer, raw pixels
  local rc=0
  both probe on_run probe || rc=1
  "$PY" - "$PACK/runs" "$PACK/probe/probe.md" <<'EOF'
import json, os, sys
runs, out = sys.argv[1:]
probes = {o: json.load(open(os.path.join(runs, o, "probe.json"))) for o in ("ar", "bert")
          if os.path.exists(os.path.join(runs, o, "probe.json"))}
if not probes:
    sys.exit("no probe.json")
any_probe = next(iter(probes.values()))
n_layer = any_probe["n_layer"]
heads = [f"layer {i}" if i < n_layer else f"ln_f ({i})" for i in range(n_layer + 1)]
lines = ["| objective | " + " | ".join(heads) + " | best layer (by val) | raw pixels |", "|---" * (len(heads) + 3) + "|"]
for obj, p in probes.items():
    accs = [f"{r['test_acc']:.3f}" for r in p["layers"]]
    lines.append(f"| {obj} | " + " | ".join(accs) + f" | {p['best_layer']} | {p['pixels']['test_acc']:.3f} |")
with open(out, "w") as f:
    f.write(f"# linear probe, {any_probe['eval_split']} accuracy (fit on {any_probe['n_train']} train images, "
            f"L2 chosen on {any_probe['n_val']} val, scored on {any_probe.get('n_test', '')})\n\n" + "\n".join(lines) + "\n")
print("\n".join(lines))
EOF
  return $rc
}

export -f has_flag both data_step train_one timing_step train_step on_run probe_step
mkdir -p "$PACK/timing" "$PACK/runs"

gpu_plan install 40 "carried wheels + pip install -e . into a venv over the python (offline)" \
  data 20 "$([ "$DRY_RUN" = 1 ] && echo 'synthetic IDX, palette, tokenize at n_px 4' || echo "unpack ${DATA_DIR:-$GPU_DATA}")" \
  timing 60 "$TIMING_STEPS steps of each model, both at once: ms/step -> steps for TRAIN_SECONDS" \
  train $((TRAIN_SECONDS + 50)) "AR and BERT ($MODEL_ARGS, batch $BATCH_SIZE, --impl $IMPL) for $TRAIN_SECONDS s each, at once" \
  probe 40 "linear probe of every layer + raw pixels ($PROBE_MAX_TRAIN train, $PROBE_MAX_EVAL val / test)" \
  sample 30 "completions of test images (top half given)"

step install 40 bash -c gpu_install
step data 20 bash -c data_step
step timing 60 bash -c timing_step
step train $((TRAIN_SECONDS + 50)) bash -c train_step
step probe 40 bash -c probe_step
step sample 30 bash -c 'both sample on_run sample'
gpu_end
