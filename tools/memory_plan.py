"""Memory plan: which iGPT sizes train on 80 GB GPUs, at 32x32 and 64x64, on 1, 8 or 64 GPUs, with DDP or
FSDP, with or without activation checkpointing, at micro-batch 1 and at the paper's batch per GPU.

Everything comes from one stated formula (bytes per GPU), whose activation constants are checked against
CPU measurements (benchmarks/bench_memory.py -> benchmarks/results/memory.csv; this script prints
predicted vs measured first).

    memory = model_state + b * T * act_per_token + reserved

Model state (P parameters; AdamW; fp32 master weights; bf16 compute):
  ddp, 1 GPU    18 P = 4 P fp32 weights + 4 P fp32 grads + 8 P AdamW moments + 2 P bf16 weight copies
                       (autocast keeps each Linear's bf16 weight copy for backward)
  ddp, N > 1    22 P = the same + 4 P DDP gradient buckets (gradient_as_bucket_view off, the default)
  fsdp, N GPUs  16 P / N (fp32 weights, grads and moments fully sharded) + 12 P_block + 6 P_root + w:
                two blocks in flight (current + prefetched), each all-gathered in bf16 (2 bytes) with
                its fp32 gradient before the reduce-scatter (4 bytes); the root module (embeddings,
                sos, ln_f, lm_head) likewise. w: the MLP folds quick GELU's 1.702 into its weights
                (c_fc.weight * 1.702, c_proj.weight / 1.702), and autograd keeps those two bf16
                products, 16 C^2 bytes a block, unsharded: for every block without checkpointing,
                for the one being recomputed with it. (Under DDP they replace the autocast copies
                already counted in the 2 P.) This is train.py's --parallel fsdp on CUDA: fully_shard
                per block then on the root, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32).
Activations per token (C = n_embd, H = n_head, V = n_vocab, L = n_layer):
  a      per block: the tensors autograd saves (BLOCK_SAVED below, in units of C, with their
         dtypes) + 4 (2 + H) bytes (two norms' rstd, the attention log-sum-exp per head):
         fp32 path (CPU) 16 C x 4 bytes (SDPA returns heads already merged: no copy before c_proj)
         ddp, bf16 autocast on CUDA: 38 C bytes (fp32 residual; bf16 matmul inputs and outputs;
           the Triton attention output is (B, H, T, D), so merging heads is one more 2 C copy)
         fsdp, bf16 parameters: 42 C bytes (bf16 residual; each norm keeps an fp32 copy of its
           input and its bf16 normalised x)
  head   ln_f (its fp32 input 4 C, its output 2 C in bf16, + 2 C under fsdp) + the loss's saved
         state (fused Triton cross-entropy: its bf16 gradient, 2 V; the torch path: the fp32
         log-softmax, 4 V) + 4 (rstd) + 8 (int64 token ids)
  g      backward's working set: two logits-sized gradients and one 4 C-wide gradient in the
         activation dtype, (2 V + 4 C) x bytes (calibrated on the CPU peak RSS: see the check)
  no checkpointing      act_per_token = L a + head + g
  with checkpointing    act_per_token = L r + max(a, head) + g   (each block keeps its input, r =
                        4 C fp32 under ddp, 2 C bf16 under fsdp; backward recomputes one block at a time)
  Attention never stores a (T, T) matrix (flash kernels: Triton on CUDA, SDPA's flash backend for
  head dims above 128, e.g. igpt-xl's 192), so nothing above grows faster than T.
  Measured on the CPU (the check below): the fp32 and CPU-bf16-autocast rows of BLOCK_SAVED, exactly;
  derived, not measured (no GPU here): the CUDA-only terms (the heads-merge copy, fused
  cross-entropy's state, the fsdp column), from the code and from what F.rms_norm's fused CUDA
  backward saves (input, weight, rstd).
reserved  8 GB of each 80 GB GPU for the CUDA context, NCCL buffers and allocator fragmentation:
          72 GB usable.

The paper's batch is 128 images: per GPU 128 / N (128, 16, 2 on 1, 8, 64 GPUs); where that does not
fit, gradient accumulation over the largest micro-batch that does gives the same step (accum column).

    python tools/memory_plan.py                 # check + plan, writes benchmarks/results/memory_plan.md
    python tools/memory_plan.py --gpu-gb 141    # another card size
"""
import argparse
import csv
import math
import os

import torch

from igpt_fast.model import GPTConfig, IGPT, PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
GB, KIB = 1e9, 1024
PAPER_BATCH = 128
MODELS = ("igpt-s", "igpt-m", "igpt-l", "igpt-xl")

# What one block saves for backward, per token: (tensor, width in units of n_embd, bytes per element on the
# fp32 path, under bf16 autocast, under fsdp's bf16 parameters). The norm keeps its input and rstd (and,
# from bf16, an fp32 copy of its input and the bf16 normalised x before the gain); a matmul keeps its
# input (under autocast, the bf16 copy); quick GELU is silu(1.702 h) / 1.702 with the factors folded
# into the weights, so the MLP keeps h = 1.702 c_fc(x) and silu(h). On the CPU the heads-merged tensor
# is a view of the attention output (0 extra bytes), on CUDA a copy.
BLOCK_SAVED = [
    ("block input x (ln_1's saved input; fp32, or its fp32 copy)", 1, 4, 4, 4),
    ("ln_1 normalised x in bf16 (the gain multiply's input)", 1, 0, 0, 2),
    ("ln_1 output (c_attn input)", 1, 4, 2, 2),
    ("q, k, v (c_attn output; attention inputs)", 3, 4, 2, 2),
    ("attention output", 1, 4, 2, 2),
    ("heads merged (c_proj input): a copy on CUDA", 1, 4, 2, 2),
    ("x + attention (ln_2's saved input; fp32, or its fp32 copy)", 1, 4, 4, 4),
    ("ln_2 normalised x in bf16 (the gain multiply's input)", 1, 0, 0, 2),
    ("ln_2 output (c_fc input)", 1, 4, 2, 2),
    ("h = 1.702 c_fc(x) (silu input)", 4, 4, 2, 2),
    ("silu(h) (c_proj input)", 4, 4, 2, 2),
]
MERGE_COPY = BLOCK_SAVED[5][0]
PATHS = {  # path: (BLOCK_SAVED column, heads-merge copy, fused cross-entropy, checkpointed input bytes)
    "cpu-fp32": (2, False, False, 4),  # the torch path as bench_memory measures it
    "cpu-bf16": (3, False, False, 4),  # the same under CPU bf16 autocast (measured too)
    "cuda-ddp": (3, True, True, 4),  # bf16 autocast, fp32 weights, Triton attention and cross-entropy
    "cuda-fsdp": (4, True, True, 2),  # bf16 parameters (MixedPrecisionPolicy) and autocast
}


def block_bytes(C, H, path):
    """a: bytes one block saves per token."""
    column, merge_copy, _, _ = PATHS[path]
    total = sum(row[1] * row[column] for row in BLOCK_SAVED if merge_copy or row[0] != MERGE_COPY)
    return total * C + 4 * (2 + H)


def head_bytes(C, V, path):
    """ln_f's saved tensors + the loss's saved state + rstd + token ids, per token."""
    column, _, fused_ce, _ = PATHS[path]
    norm = sum(row[column] for row in BLOCK_SAVED[:3]) * C  # as ln_1: input, (normalised x), output
    loss = 2 * V if fused_ce else 4 * V  # fused CE keeps its bf16 gradient; torch keeps fp32 log-softmax
    return norm + loss + 4 + 8


def grad_bytes(C, V, path):
    """g: backward's working set per token."""
    return (2 * V + 4 * C) * (4 if path == "cpu-fp32" else 2)


def act_per_token(C, H, V, L, ckpt, path):
    """Activation bytes per token of one training step on `path` (a key of PATHS)."""
    a, head, g = block_bytes(C, H, path), head_bytes(C, V, path), grad_bytes(C, V, path)
    return L * PATHS[path][3] * C + max(a, head) + g if ckpt else L * a + head + g


def param_counts(config):
    """(P, P_block, P_root): exact, from an IGPT built on the meta device (no memory)."""
    with torch.device("meta"):
        model = IGPT(config)
    P = sum(p.numel() for p in model.parameters())
    P_block = sum(p.numel() for p in model.h[0].parameters())
    return P, P_block, P - config.n_layer * P_block


def state_bytes(config, counts, gpus, strategy, ckpt):
    """Model state bytes per GPU (see the module docstring); counts = param_counts(config)."""
    P, P_block, P_root = counts
    if strategy == "fsdp":
        folded = 16 * config.n_embd ** 2 * (1 if ckpt else config.n_layer)
        return 16 * P / gpus + 12 * P_block + 6 * P_root + folded
    return (18 if gpus == 1 else 22) * P


# ---- the check against bench_memory's CPU measurements


def check(csv_path):
    """Markdown lines: predicted vs measured KiB per token for every row of memory.csv (latest per point)."""
    if not os.path.isfile(csv_path):
        return [f"({csv_path} not found: run `python benchmarks/bench_memory.py` for the check)"]
    latest = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            shape = tuple(int(row[k]) for k in ("n_layer", "n_embd", "n_head", "n_vocab"))
            latest[(shape, int(row["T"]), row["grad_checkpoint"] == "True")] = row
    lines = ["| model (L, C, H, V) | T | ckpt | quantity | predicted KiB/token | measured KiB/token | "
             "measured / predicted |", "|---|---|---|---|---|---|---|"]
    for ((L, C, H, V), T, ckpt), row in sorted(latest.items()):
        model = f"{L}, {C}, {H}, {V}"
        items = [("peak RSS delta", act_per_token(C, H, V, L, ckpt, "cpu-fp32"), row["kib_per_token"])]
        if not ckpt:
            items += [("saved for backward, fp32", L * block_bytes(C, H, "cpu-fp32") + head_bytes(C, V, "cpu-fp32"),
                       row["saved_kib_per_token"]),
                      ("saved for backward, bf16 autocast",
                       L * block_bytes(C, H, "cpu-bf16") + head_bytes(C, V, "cpu-bf16"),
                       row.get("saved_bf16_kib_per_token", ""))]
        for what, predicted, measured in items:
            if measured in ("", None):
                continue
            predicted /= KIB
            measured = float(measured)
            lines.append(f"| {model} | {T} | {'yes' if ckpt else 'no'} | {what} | {predicted:.2f} | {measured:.2f} | "
                         f"{measured / predicted:.3f} |")
    return lines


# ---- the plan


def plan(gpu_gb, reserved_gb, n_pxs, gpu_counts):
    """Rows (dicts) of the plan for every preset, n_px, GPU count, strategy and checkpointing choice."""
    usable = (gpu_gb - reserved_gb) * GB
    rows = []
    for name in MODELS:
        for n_px in n_pxs:
            config = GPTConfig(**{**PRESETS[name], "n_px": n_px})
            C, H, V, L, T = config.n_embd, config.n_head, config.n_vocab, config.n_layer, config.n_ctx
            counts = param_counts(config)
            P = counts[0]
            for gpus in gpu_counts:
                paper_b = max(1, PAPER_BATCH // gpus)
                for strategy in ("ddp", "fsdp"):
                    for ckpt in (False, True):
                        state = state_bytes(config, counts, gpus, strategy, ckpt)
                        per_image = T * act_per_token(C, H, V, L, ckpt, f"cuda-{strategy}")
                        b_max = max(0, math.floor((usable - state) / per_image))
                        b_used = min(b_max, paper_b)
                        rows.append({"model": name, "n_px": n_px, "T": T, "params_M": P / 1e6, "gpus": gpus,
                                     "strategy": strategy, "ckpt": ckpt, "state_gb": state / GB,
                                     "act_gb_per_image": per_image / GB,
                                     "total_gb_b1": (state + per_image) / GB + reserved_gb, "fits_b1": b_max >= 1,
                                     "max_micro_batch": b_max, "paper_micro_batch": paper_b,
                                     "fits_paper": b_max >= paper_b,
                                     "accum": math.ceil(PAPER_BATCH / (gpus * b_used)) if b_used else None})
    return rows


def plan_table(rows):
    lines = ["| model | n_px | params | GPUs | strategy | ckpt | state GB | act GB / image | GB at b=1 | fits b=1 | "
             "max micro-batch | paper micro-batch (128/N) | fits | accum for 128 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n_px']} | {r['params_M']:.0f}M | {r['gpus']} | {r['strategy']} | "
                     f"{'yes' if r['ckpt'] else 'no'} | {r['state_gb']:.1f} | {r['act_gb_per_image']:.2f} | "
                     f"{r['total_gb_b1']:.1f} | {'yes' if r['fits_b1'] else 'no'} | {r['max_micro_batch']} | "
                     f"{r['paper_micro_batch']} | {'yes' if r['fits_paper'] else 'no'} | "
                     f"{r['accum'] if r['accum'] else '-'} |")
    return lines


def summary_table(rows):
    """Per model and n_px: the fewest GPUs (and how) at which b = 1 fits, and at which the paper's batch
    fits without accumulation."""
    lines = ["| model | n_px | params | fits b=1 with | fits 128 / N per GPU with |", "|---|---|---|---|---|"]

    def first(pred, key):
        ok = sorted((r for r in key if pred(r)), key=lambda r: (r["gpus"], r["ckpt"], r["strategy"] != "ddp"))
        if not ok:
            return "does not fit"
        r = ok[0]
        return f"{r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}, {r['strategy']}{', ckpt' if r['ckpt'] else ''}"

    for name in MODELS:
        for n_px in sorted({r["n_px"] for r in rows}):
            group = [r for r in rows if r["model"] == name and r["n_px"] == n_px]
            lines.append(f"| {name} | {n_px} | {group[0]['params_M']:.0f}M | {first(lambda r: r['fits_b1'], group)} | "
                         f"{first(lambda r: r['fits_paper'], group)} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 bytes)")
    p.add_argument("--reserved-gb", type=float, default=8.0, help="held back per GPU (context, NCCL, fragmentation)")
    p.add_argument("--n-px", type=int, nargs="+", default=[32, 64])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--measured", default=os.path.join(RESULTS, "memory.csv"), help="bench_memory.py results")
    p.add_argument("--out", default=os.path.join(RESULTS, "memory_plan.md"))
    args = p.parse_args()

    rows = plan(args.gpu_gb, args.reserved_gb, args.n_px, args.gpus)
    text = "\n".join([
        "# Memory plan", "",
        f"{args.gpu_gb:g} GB GPUs, {args.reserved_gb:g} GB reserved each; AdamW with fp32 master weights; ddp: "
        "bf16 autocast, fsdp: bf16 parameters (MixedPrecisionPolicy); Triton attention and cross-entropy. "
        "Formula and assumptions: tools/memory_plan.py (docstring).", "",
        "## Check: the formula against CPU measurements (benchmarks/bench_memory.py, torch path)", "",
        *check(args.measured), "",
        "## Summary: the fewest GPUs that fit", "", *summary_table(rows), "",
        "## Every configuration", "", *plan_table(rows), ""])
    print(text)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
