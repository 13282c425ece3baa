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
GPU (--gpu, run by benchmarks/gpu_check.sh): bf16 autocast train steps (forward, loss, backward, clip,
fused AdamW) of igpt-s at 32x32 (batch 32) and 64x64 with activation checkpointing (batch 8), four
variants per shape in two pairs: impl="triton" with impl="torch" eager, then both compiled
(torch.compile of the model as `train --compile` does: forward and loss in one graph with our kernels
inside it as torch.library.triton_ops, the backward compiled with it; clip and AdamW eager). The two
variants of a pair share a process and, after warming up (the first step, which compiles, is timed
apart as first_step_s; then --warmup-ms), take --rounds steps alternately (ABBA), so clock and thermal
drift hit both alike. A step is timed from a synchronized start to a synchronized end (host_ms: until
the step's Python returned, the host's share of it). speedup_vs_torch is the median over rounds of
(torch step / triton step) within a round. peak_mem_gb is the peak allocated during the variant's
own steps; it includes the other model's weights and optimizer state (about 1.2 GB for igpt-s).
A variant that fails (compile error, out of memory) gets its error in its row and the others run;
the exit status is then 1. A SIGTERM (gpu_check.sh's step limit) stops the run and writes the pairs
measured so far. train_gpu_goals.md sets the measurements against the goals: triton eager >= 1.1x
torch eager, triton compiled >= 1.0x torch compiled, at both shapes; MFU >= 40% at 32x32.
--smoke runs the same pairs on CPU at tiny shapes (1 layer, 32 wide, 4x4; impl="triton" under the
Triton interpreter, TRITON_INTERPRET=1; compiled with the aot_eager backend instead of inductor), for
gpu_check.sh's dry run.

MFU = tok/s * (6 N + 12 n_layer n_embd n_ctx) / peak bf16 FLOP/s (igpt_fast.train.flops_per_token).
Rows are appended to benchmarks/results/train_cpu.csv / train_gpu.csv (+ train_gpu_goals.csv;
benchmarks/common.py); the latest tables are in the matching .md.
    python benchmarks/bench_train.py                 # CPU: 8 layers, 256 wide, 8 heads, T=1024, batch 8
    python benchmarks/bench_train.py --gpu
    TRITON_INTERPRET=1 python benchmarks/bench_train.py --smoke --out /tmp/smoke
"""
import argparse
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import DEFAULT_OUT, env_info, guarded, write_results

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


PAIR_IMPLS = ("triton", "torch")  # the variant first, its yardstick second
GOALS = (("eager", 1.1), ("compiled", 1.0))  # speedup of impl=triton over impl=torch, paired, per kind
MFU_GOAL = 0.40  # at the first shape (32x32), the better of the two triton variants


class StepTimeLimit(Exception):
    """SIGTERM (gpu_check.sh's step limit) arrived: stop timing and write what was measured."""


_STOPPED = []  # set by the SIGTERM handler; checked after every guarded call, which may have caught its raise


def _on_sigterm(signum, frame):
    _STOPPED.append(time.perf_counter())
    raise StepTimeLimit("stopped by SIGTERM (the step's time limit)")


def _guarded(fn):
    """common.guarded (a failing variant becomes an error message), except that a SIGTERM, even one that
    torch.compile wrapped into its own error, ends the run."""
    result, error = guarded(fn)
    if _STOPPED:
        raise StepTimeLimit("stopped by SIGTERM (the step's time limit)")
    return result, error


def _gpu_shapes(args):
    """(label, GPTConfig, batch size, grad_checkpoint) of the GPU mode's two training shapes."""
    if args.smoke:
        tiny = dict(n_layer=1, n_head=2, n_embd=32)
        return [("4x4", GPTConfig(n_px=4, **tiny), 2, False), ("4x4 ckpt", GPTConfig(n_px=4, **tiny), 2, True)]
    s = PRESETS["igpt-s"]
    return [("32x32", GPTConfig(**{**s, "n_px": 32}), args.gpu_batch_size, False),
            ("64x64 ckpt", GPTConfig(**{**s, "n_px": 64}), args.long_batch_size, True)]


def _gpu_step(cfg, impl, compiled, grad_checkpoint, batch_size, device, backend):
    """(step function, model) of one GPU-mode variant: bf16 autocast on CUDA, fp32 on CPU."""
    torch.manual_seed(0)
    model = IGPT(cfg, impl=impl, grad_checkpoint=grad_checkpoint).to(device).train()
    fwd = torch.compile(model, backend=backend) if compiled else model
    opt = configure_optimizer(model, 1e-4)
    idx = torch.randint(0, cfg.n_vocab, (batch_size, cfg.n_ctx), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = fwd(idx, idx)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step, model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_step(step, device):
    """(ms of one step, synchronized before and after; ms until step() returned, the host's share)."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    host = time.perf_counter() - t0
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, host * 1e3


def gpu_pair(label, cfg, batch_size, grad_checkpoint, compiled, args, device):
    """impl=triton and impl=torch at one shape, both eager or both compiled, in this process: each is
    warmed up (its first step compiles), then they take --rounds steps alternately (ABBA order).
    Returns the two rows; a variant that fails carries its error and the other is still timed."""
    kind = "compiled" if compiled else "eager"
    backend = "inductor" if device.type == "cuda" else "aot_eager"  # CPU: no C++ compile in a smoke run
    steps, models, errors, first_s = {}, {}, {}, {}
    for impl in PAIR_IMPLS:
        t0 = time.perf_counter()
        built, errors[impl] = _guarded(lambda: _gpu_step(cfg, impl, compiled, grad_checkpoint, batch_size, device,
                                                         backend))
        if built is None:
            continue
        steps[impl], models[impl] = built
        _, errors[impl] = _guarded(lambda: _timed_step(steps[impl], device))  # compiles (Triton, torch.compile)
        first_s[impl] = time.perf_counter() - t0
        warm = time.perf_counter()
        n = 0
        while errors[impl] is None and (n < 1 or (time.perf_counter() - warm) * 1e3 < args.warmup_ms):
            _, errors[impl] = _guarded(lambda: _timed_step(steps[impl], device))
            n += 1
        if errors[impl]:
            del steps[impl]
    ms, host_ms, peak = ({impl: {} for impl in PAIR_IMPLS} for _ in range(3))
    for r in range(args.rounds):
        for impl in (PAIR_IMPLS if r % 2 == 0 else PAIR_IMPLS[::-1]):
            if impl not in steps:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timed, errors[impl] = _guarded(lambda: _timed_step(steps[impl], device))
            if timed is None:
                del steps[impl]
                continue
            ms[impl][r], host_ms[impl][r] = timed
            peak[impl][r] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else math.nan
    peak_flops_s = peak_flops(device)
    rows = []
    for impl in PAIR_IMPLS:
        row = {"shape": label, "variant": f"{impl} {kind}", "impl": impl, "compile": compiled, "n_px": cfg.n_px,
               "n_ctx": cfg.n_ctx, "batch_size": batch_size, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
               "grad_checkpoint": grad_checkpoint}
        row.update(dict.fromkeys(("ms", "ms_p20", "ms_p80", "host_ms", "tok_s", "mfu", "peak_mem_gb",
                                  "speedup_vs_torch"), math.nan), first_step_s=first_s.get(impl, math.nan))
        times = list(ms[impl].values())
        if len(times) >= 2:
            q = statistics.quantiles(times, n=10, method="inclusive")
            med = statistics.median(times)
            tok_s = batch_size * cfg.n_ctx / (med / 1e3)
            row.update(ms=med, ms_p20=q[1], ms_p80=q[7], host_ms=statistics.median(host_ms[impl].values()),
                       tok_s=tok_s, peak_mem_gb=max(peak[impl].values()),
                       mfu=tok_s * flops_per_token(models[impl]) / peak_flops_s if peak_flops_s else math.nan)
        both = [r for r in ms[PAIR_IMPLS[0]] if r in ms[PAIR_IMPLS[1]]]
        if impl == PAIR_IMPLS[0] and both:  # median over rounds of (torch step / triton step) within a round
            row["speedup_vs_torch"] = statistics.median(ms[PAIR_IMPLS[1]][r] / ms[impl][r] for r in both)
        row["rounds"] = len(times)
        row["error"] = errors.get(impl) or ""
        rows.append(row)
    return rows


def gpu_goals(rows, shapes):
    """The goals of the GPU window, each with its measured value: speedups per shape and kind, MFU."""
    goals = []
    for label, *_ in shapes:
        for kind, target in GOALS:
            row = next((r for r in rows if r["shape"] == label and r["variant"] == f"{PAIR_IMPLS[0]} {kind}"), {})
            value = row.get("speedup_vs_torch", math.nan)
            goals.append({"goal": f"{label}: triton {kind} >= {target}x torch {kind} (paired step time)",
                          "target": target, "measured": value,
                          "met": "n/a" if math.isnan(value) else "yes" if value >= target else "no"})
    label = shapes[0][0]
    ours = [r for r in rows if r["shape"] == label and r["impl"] == PAIR_IMPLS[0] and r.get("mfu", math.nan) >= 0]
    best = max(ours, key=lambda r: r["mfu"], default={})
    which = f": {best['variant']}" if best else ""
    goals.append({"goal": f"{label}: MFU >= {MFU_GOAL:.0%} (the better triton variant{which})",
                  "target": MFU_GOAL, "measured": best.get("mfu", math.nan),
                  "met": "yes" if best and best["mfu"] >= MFU_GOAL else "no" if best else "n/a"})
    return goals


def run_gpu(args):
    """Both pairs (eager, compiled) at both shapes: the eager pairs first, then the compiled ones, whose
    first steps compile for a minute or more. A SIGTERM ends the run early: the pairs measured so far are
    written, the rest are rows with an error saying they did not run."""
    import torch._dynamo

    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device; --smoke runs the same pairs on CPU at tiny shapes")
    shapes = _gpu_shapes(args)
    plan = [(shape, compiled) for compiled in ((False, True) if args.compile else (False,)) for shape in shapes]
    signal.signal(signal.SIGTERM, _on_sigterm)
    rows = []
    for (label, cfg, batch_size, ckpt), compiled in plan:
        kind = "compiled" if compiled else "eager"
        if _STOPPED:
            rows += [{"shape": label, "variant": f"{impl} {kind}", "impl": impl, "compile": compiled,
                      "error": "not run: the step's time limit was reached"} for impl in PAIR_IMPLS]
            continue
        try:
            pair = gpu_pair(label, cfg, batch_size, ckpt, compiled, args, device)
            rows += pair
            for row in pair:
                print(json.dumps(row), flush=True)
                if not row["error"]:
                    print(f"{label} {row['variant']} | {row['ms']:.2f} ms (p20 {row['ms_p20']:.2f}, p80 "
                          f"{row['ms_p80']:.2f}) | host {row['host_ms']:.2f} ms | {row['tok_s']:.3g} tok/s | "
                          f"mfu {row['mfu']:.1%} | {row['peak_mem_gb']:.2f} GB | first step "
                          f"{row['first_step_s']:.1f} s", flush=True)
            torch._dynamo.reset()  # the next pair compiles for its own shapes, as a fresh process would
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except StepTimeLimit:
            if not any(r["shape"] == label and r["compile"] == compiled for r in rows):
                rows += [{"shape": label, "variant": f"{impl} {kind}", "impl": impl, "compile": compiled,
                          "error": "stopped: the step's time limit was reached"} for impl in PAIR_IMPLS]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return rows, gpu_goals(rows, shapes)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true",
                   help="GPU mode: impl=triton vs impl=torch, eager and compiled, igpt-s at 32x32 and 64x64 ckpt")
    p.add_argument("--smoke", action="store_true", help="the GPU mode's pairs on CPU at tiny shapes (dry runs)")
    p.add_argument("--n-px", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gpu-batch-size", type=int, default=32, help="GPU: batch size at 32x32")
    p.add_argument("--long-batch-size", type=int, default=8, help="GPU: batch size at 64x64 (activation checkpointing)")
    p.add_argument("--warmup-ms", type=float,
                   help="warm-up time after the first step (default: GPU 500 ms, else 1 ms; GPU mode: >= 1 step)")
    p.add_argument("--rounds", type=int,
                   help="timed steps per variant, alternating within a group or pair (default: CPU 5, GPU 30, smoke 2)")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile pairs")
    p.add_argument("--variants", default="igpt-fast,plain-gpt,igpt-fast+compile,plain-gpt+compile,hf",
                   help="CPU: comma-separated")
    p.add_argument("--group", help=argparse.SUPPRESS)  # internal: run one CPU group, print JSON
    args = p.parse_args()
    gpu_mode = args.gpu or args.smoke
    if args.rounds is None:
        args.rounds = 2 if args.smoke else 30 if args.gpu else 5
    if args.rounds < 2:
        p.error("--rounds must be at least 2")
    if args.warmup_ms is None:
        args.warmup_ms = 500.0 if args.gpu and not args.smoke else 1.0
    if args.threads and not (args.gpu and not args.smoke):
        torch.set_num_threads(args.threads)

    if args.group:
        print("RESULT " + json.dumps(cpu_group(args.group.split(","), args)))
        return
    if gpu_mode:
        if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":  # read when the kernels are defined
            p.error("--smoke runs impl=triton on CPU under the Triton interpreter: set TRITON_INTERPRET=1")
        rows, goals = run_gpu(args)
        env = env_info()
        paths = (write_results([{**env, **r} for r in rows], "train_gpu", args.out)
                 + write_results([{**env, **g} for g in goals], "train_gpu_goals", args.out))
        print("\n".join(paths))
        failed = [f"{r['shape']} {r['variant']}" for r in rows if r.get("error")]
        if failed:
            sys.exit(f"{len(failed)} of {len(rows)} variants did not finish (their rows say why): {', '.join(failed)}")
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
