"""Training-step benchmark of IGPT against the GPT a user would write and against Hugging Face ImageGPT.

CPU (default): one AdamW train step (forward, loss, backward, clip, step), fp32, one intra-op thread
(--threads), at the same shape for
  - igpt-fast: IGPT with impl="torch" (F.scaled_dot_product_attention, the fused norm backward and
    quick GELU of igpt_fast.model);
  - plain-gpt: the model a user would write (nanoGPT's model.py: LayerNorm without bias, tanh-GELU
    MLP, bias-free Linear, fused q|k|v, F.scaled_dot_product_attention, untied head), the same
    shapes and loss; not iGPT's maths, a yardstick for the speed of the eager building blocks;
  - igpt-fast+compile and plain-gpt+compile: both under torch.compile (--no-compile skips them);
  - hf: HF ImageGPTForCausalImageModeling (its eager attention; dropouts 0 for parity).
Variants of one group share a process and take their steps alternately (igpt-fast with plain-gpt,
the compiled pair together, hf alone), so a busy machine slows both sides of a ratio alike:
speedup_vs_plain is the median over rounds of (plain step time / variant step time) within a pair
(speedup_vs_plain_cpu the same in CPU time); speedup_vs_hf compares medians across processes.
cpu_ms is the process CPU time of a step (time.process_time), which neighbours' load inflates less
than wall time. peak_rss_mb is the peak resident memory during the variant's own steps (Linux:
VmHWM, reset through /proc/self/clear_refs before each step; it includes the other model of the
pair, about 0.1 GB here). On this CPU torch.compile does not speed up either model's step much:
compare the compiled pair with the eager one.
GPU (--gpu, run by benchmarks/gpu_check.sh): bf16 autocast train steps with the Triton kernels for
  igpt-s at 32x32 and, with activation checkpointing, the largest n_px in (64, 48, 40, 32) whose step
  fits; tokens/s, MFU and peak memory (torch.cuda.max_memory_allocated).

MFU = tok/s * (6 N + 12 n_layer n_embd n_ctx) / peak bf16 FLOP/s (igpt_fast.train.flops_per_token).
Rows are appended to benchmarks/results/train_cpu.csv / train_gpu.csv (benchmarks/common.py); the
latest table is in the matching .md.
    python benchmarks/bench_train.py                 # CPU: 8 layers, 256 wide, 8 heads, T=1024, batch 8
    python benchmarks/bench_train.py --gpu
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import DEFAULT_OUT, env_info, time_fn, write_results

from igpt_fast.model import GPTConfig, IGPT, PRESETS
from igpt_fast.train import configure_optimizer, flops_per_token, peak_flops

GROUPS = (("igpt-fast", "plain-gpt"), ("igpt-fast+compile", "plain-gpt+compile"), ("hf",))


class PlainBlock(nn.Module):
    """nanoGPT's Block (bias=False, no dropout)."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """nanoGPT's GPT at igpt-fast's shape: token and position tables, blocks, ln_f, untied head."""

    def __init__(self, n_vocab, n_ctx, n_layer, n_embd, n_head):
        super().__init__()
        self.wte = nn.Embedding(n_vocab, n_embd)
        self.wpe = nn.Embedding(n_ctx, n_embd)
        self.h = nn.ModuleList([PlainBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, n_vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe.weight[:idx.size(1)]  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _reset_peak_rss():
    """Reset the kernel's peak-RSS counter of this process; False where it cannot be (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _make_step(variant, args, idx):
    """(step function, parameter count) of one CPU variant."""
    T = idx.size(1)
    if variant == "hf":
        from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

        cfg = ImageGPTConfig(vocab_size=513, n_positions=T, n_embd=args.n_embd, n_layer=args.n_layer,
                             n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = ImageGPTForCausalImageModeling(cfg).train()
        hf_in = torch.cat([torch.full((idx.size(0), 1), 512), idx[:, :-1]], 1)

        def loss_fn():
            logits = model(hf_in).logits  # (B, T, 512)
            return F.cross_entropy(logits.view(-1, 512).float(), idx.view(-1))
    else:
        if variant.startswith("plain-gpt"):
            model = PlainGPT(512, T, args.n_layer, args.n_embd, args.n_head).train()
        else:
            cfg = GPTConfig(n_px=args.n_px, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
            model = IGPT(cfg, impl="torch").train()
        fwd = torch.compile(model) if variant.endswith("+compile") else model

        def loss_fn():
            return fwd(idx, idx)[1]
    opt = configure_optimizer(model, 1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def cpu_group(variants, args):
    """Time the variants of one group in this process, one step each per round, alternating the order."""
    torch.manual_seed(0)
    T = args.n_px * args.n_px
    idx = torch.randint(0, 512, (args.batch_size, T))
    steps, params = {}, {}
    for v in variants:
        steps[v], params[v] = _make_step(v, args, idx)
    for v in variants:  # warm-up: the first step (compilation for the compiled pair), then --warmup-ms
        start = time.perf_counter()
        steps[v]()
        while (time.perf_counter() - start) * 1e3 < args.warmup_ms:
            steps[v]()
    wall, cpu, rss = ({v: [] for v in variants} for _ in range(3))
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            if _reset_peak_rss():
                rss[v].append(None)
            w0, c0 = time.perf_counter(), time.process_time()
            steps[v]()
            wall[v].append((time.perf_counter() - w0) * 1e3)
            cpu[v].append((time.process_time() - c0) * 1e3)
            if rss[v] and rss[v][-1] is None:
                rss[v][-1] = _peak_rss_mb()
    plain = next((v for v in variants if v.startswith("plain-gpt")), None)
    rows = []
    for v in variants:
        q = statistics.quantiles(wall[v], n=10, method="inclusive")
        med = statistics.median(wall[v])
        row = {"variant": v, "params": params[v], "ms": med, "ms_p20": q[1], "ms_p80": q[7],
               "cpu_ms": statistics.median(cpu[v]), "tok_s": idx.numel() / (med / 1e3),
               "peak_rss_mb": max(rss[v], default=float("nan")),
               "rounds": args.rounds, "paired_with": ",".join(u for u in variants if u != v) or "none"}
        if plain:
            row["speedup_vs_plain"] = statistics.median(p / w for p, w in zip(wall[plain], wall[v]))
            row["speedup_vs_plain_cpu"] = statistics.median(p / w for p, w in zip(cpu[plain], cpu[v]))
        rows.append(row)
    return rows


def gpu_variant(name, cfg, batch_size, warmup_ms, rep_ms, compile_model, grad_checkpoint=False):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = IGPT(cfg, grad_checkpoint=grad_checkpoint).to(device).train()
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
            "n_embd": cfg.n_embd, "grad_checkpoint": grad_checkpoint, "compile": compile_model, "ms": med,
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
        cfg = GPTConfig(**{**s, "n_px": n_px})
        try:
            rows.append(gpu_variant(f"igpt-s {n_px}x{n_px} ckpt", cfg, args.long_batch_size, args.warmup_ms,
                                    args.rep_ms, args.gpu_compile, grad_checkpoint=True))
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
    p.add_argument("--rep-ms", type=float, default=3000.0, help="GPU: timing time")
    p.add_argument("--rounds", type=int, default=5, help="CPU: timed steps per variant (alternating within a group)")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="CPU: skip the torch.compile pair")
    p.add_argument("--gpu-compile", action="store_true", help="GPU: torch.compile the model")
    p.add_argument("--variants", default="igpt-fast,plain-gpt,igpt-fast+compile,plain-gpt+compile,hf",
                   help="comma-separated")
    p.add_argument("--group", help=argparse.SUPPRESS)  # internal: run one CPU group, print JSON
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2")
    if args.warmup_ms is None:
        args.warmup_ms = 500.0 if args.gpu else 1.0
    if args.threads and not args.gpu:
        torch.set_num_threads(args.threads)

    if args.group:
        print("RESULT " + json.dumps(cpu_group(args.group.split(","), args)))
        return
    if args.gpu:
        rows = [{**env_info(), **r} for r in run_gpu(args)]
        print("\n".join(write_results(rows, "train_gpu", args.out)))
        return
    wanted = [v for v in args.variants.split(",") if args.compile or not v.endswith("+compile")]
    unknown = set(wanted) - {v for g in GROUPS for v in g}
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {[v for g in GROUPS for v in g]}")
    rows = []
    for group in GROUPS:
        variants = [v for v in group if v in wanted]
        if not variants:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--group", ",".join(variants)] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("n_px", "n_layer", "n_head", "n_embd", "batch_size", "warmup_ms", "rounds", "threads")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{variants} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        for row in json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:]):
            print(json.dumps(row), flush=True)
            rows.append(row)
    hf = next((r for r in rows if r["variant"] == "hf"), None)
    for r in rows:
        if hf:
            r["speedup_vs_hf"] = r["tok_s"] / hf["tok_s"]
        r["config"] = (f"L{args.n_layer} C{args.n_embd} H{args.n_head} T{args.n_px ** 2} B{args.batch_size} "
                       f"threads {args.threads or torch.get_num_threads()}")
    rows = [{**env_info(), **r} for r in rows]
    for path in write_results(rows, "train_cpu", args.out):
        print(path)
    print(open(os.path.join(args.out, "train_cpu.md")).read())


if __name__ == "__main__":
    main()
