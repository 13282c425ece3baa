"""Training-step benchmark of IGPT, against Hugging Face ImageGPTForCausalImageModeling.

CPU (default): one AdamW train step (forward, loss, backward, clip, step) at the same config for
  - igpt-fast eager (F.scaled_dot_product_attention, bias-free, fused q|k|v),
  - igpt-fast + torch.compile (--no-compile skips it),
  - HF ImageGPTForCausalImageModeling (its eager attention; dropouts set to 0 for parity);
  each variant runs in its own process so peak RSS (ru_maxrss) is its own. (KV-cache sampling has its
  own benchmark: benchmarks/bench_sample.py.)
GPU (--gpu, run by benchmarks/gpu_check.sh): bf16 autocast train steps with the Triton kernels for
  igpt-s at 32x32 and, with activation checkpointing, the largest n_px in (64, 48, 40, 32) whose step
  fits; tokens/s, MFU and peak memory (torch.cuda.max_memory_allocated).

MFU = tok/s * (6 N + 12 n_layer n_embd n_ctx) / peak bf16 FLOP/s (igpt_fast.train.flops_per_token).
Timing, environment columns and result files come from benchmarks/common.py (time_fn: median, p20,
p80 ms; on CPU at least one warm-up and three timed steps). Rows are appended to
benchmarks/results/train_cpu.csv / train_gpu.csv; the latest table is in the matching .md.
    python benchmarks/bench_train.py                 # CPU: 8 layers, 256 wide, 8 heads, T=1024, batch 8
    python benchmarks/bench_train.py --gpu
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from common import DEFAULT_OUT, env_info, time_fn, write_results

from igpt_fast.model import GPTConfig, IGPT, PRESETS
from igpt_fast.train import configure_optimizer, flops_per_token, peak_flops


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_variant(variant, args):
    """One variant's train-step timing; runs inside its own process."""
    torch.manual_seed(0)
    T = args.n_px * args.n_px
    idx = torch.randint(0, 512, (args.batch_size, T))
    if variant == "hf":
        from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

        cfg = ImageGPTConfig(vocab_size=513, n_positions=T, n_embd=args.n_embd, n_layer=args.n_layer,
                             n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = ImageGPTForCausalImageModeling(cfg).train()
        hf_in = torch.cat([torch.full((args.batch_size, 1), 512), idx[:, :-1]], 1)

        def loss_fn():
            logits = model(hf_in).logits  # (B, T, 512)
            return torch.nn.functional.cross_entropy(logits.view(-1, 512).float(), idx.view(-1))
    else:
        cfg = GPTConfig(n_px=args.n_px, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, impl="torch")
        model = IGPT(cfg).train()
        fwd = torch.compile(model) if variant == "igpt-fast+compile" else model

        def loss_fn():
            return fwd(idx, idx)[1]
    opt = configure_optimizer(model, 1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    rss_before = _peak_rss_mb()
    med, p20, p80 = time_fn(step, warmup=args.warmup_ms, rep=args.rep_ms)
    return {"variant": variant, "params": sum(p.numel() for p in model.parameters()), "ms": med, "ms_p20": p20,
            "ms_p80": p80, "tok_s": args.batch_size * T / (med / 1e3), "peak_rss_mb": _peak_rss_mb(),
            "rss_before_mb": rss_before}


def gpu_variant(name, cfg, batch_size, warmup_ms, rep_ms, compile_model):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = IGPT(cfg).to(device).train()
    fwd = torch.compile(model) if compile_model else model
    opt = configure_optimizer(model, 1e-4)
    idx = torch.randint(0, cfg.n_vocab, (batch_size, cfg.n_ctx), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(idx, idx)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    med, p20, p80 = time_fn(step, warmup=warmup_ms, rep=rep_ms)
    tok_s = batch_size * cfg.n_ctx / (med / 1e3)
    peak = peak_flops(device)
    return {"variant": name, "n_px": cfg.n_px, "n_ctx": cfg.n_ctx, "batch_size": batch_size, "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd, "grad_checkpoint": cfg.grad_checkpoint, "compile": compile_model, "ms": med,
            "ms_p20": p20, "ms_p80": p80, "tok_s": tok_s,
            "mfu": tok_s * flops_per_token(model) / peak if peak else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def run_gpu(args):
    rows = []
    s = dict(PRESETS["igpt-s"])
    rows.append(gpu_variant("igpt-s 32x32", GPTConfig(**s), args.gpu_batch_size, args.warmup_ms, args.rep_ms,
                            args.gpu_compile))
    print(json.dumps(rows[-1]), flush=True)
    for n_px in (64, 48, 40, 32):
        cfg = GPTConfig(**{**s, "n_px": n_px, "grad_checkpoint": True})
        try:
            rows.append(gpu_variant(f"igpt-s {n_px}x{n_px} ckpt", cfg, args.long_batch_size, args.warmup_ms, args.rep_ms,
                                    args.gpu_compile))
        except torch.cuda.OutOfMemoryError:
            print(f"igpt-s {n_px}x{n_px} with activation checkpointing, batch {args.long_batch_size}: out of memory",
                  flush=True)
            torch.cuda.empty_cache()
            continue
        print(json.dumps(rows[-1]), flush=True)
        break
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="GPU mode (igpt-s 32x32 and the longest n_px that fits)")
    p.add_argument("--n-px", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gpu-batch-size", type=int, default=32)
    p.add_argument("--long-batch-size", type=int, default=4)
    p.add_argument("--warmup-ms", type=float, help="warm-up time (default: CPU one step, GPU 500 ms)")
    p.add_argument("--rep-ms", type=float, help="timing time (default: CPU three steps, GPU 3000 ms)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="CPU: skip the torch.compile variant")
    p.add_argument("--gpu-compile", action="store_true", help="GPU: torch.compile the model")
    p.add_argument("--variants", default="igpt-fast,igpt-fast+compile,hf", help="comma-separated")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one CPU variant, print JSON
    args = p.parse_args()
    if args.warmup_ms is None:
        args.warmup_ms = 500.0 if args.gpu else 1.0
    if args.rep_ms is None:
        args.rep_ms = 3000.0 if args.gpu else 1.0

    if args.one:
        row = cpu_variant(args.one, args)
        print("RESULT " + json.dumps(row))
        return
    if args.gpu:
        rows = [{**env_info(), **r} for r in run_gpu(args)]
        print("\n".join(write_results(rows, "train_gpu", args.out)))
        return
    variants = [v for v in args.variants.split(",") if args.compile or v != "igpt-fast+compile"]
    rows = []
    for v in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", v] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("n_px", "n_layer", "n_head", "n_embd", "batch_size", "warmup_ms", "rep_ms")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{v} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        print(json.dumps(row), flush=True)
        rows.append(row)
    hf = next((r for r in rows if r["variant"] == "hf"), None)
    for r in rows:
        if hf and "ms" in r:
            r["speedup_vs_hf"] = r["tok_s"] / hf["tok_s"]
        r["config"] = f"L{args.n_layer} C{args.n_embd} H{args.n_head} T{args.n_px ** 2} B{args.batch_size}"
    rows = [{**env_info(), **r} for r in rows]
    for path in write_results(rows, "train_cpu", args.out):
        print(path)
    print(open(os.path.join(args.out, "train_cpu.md")).read())


if __name__ == "__main__":
    main()
