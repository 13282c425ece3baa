"""Activation memory per token of one training step on the torch path (CPU, fp32), against sequence length.

The claim it checks: with an attention that never materialises the (T, T) score matrix
(F.scaled_dot_product_attention's flash kernel on CPU, the Triton kernel on CUDA), the memory a
training step needs beyond the model and optimizer state grows linearly in T, so the bytes per token
stay flat from 32x32 (T = 1024) to 96x96 (T = 9216); activation checkpointing lowers that constant.

Each (shape, n_px, checkpointing) point runs in a fresh subprocess (so one point's allocations and its
peak never leak into another's) and does, on a fixed small model (shapes L x C x H: 4 layers 128 wide
with 2 heads of 64, and 2 layers 256 wide with 4 heads of 64; 512 colours; batch 1; impl="torch"):
  1. build the model and AdamW, then one warm-up step on a 16-token prefix (allocates the gradients
     and both AdamW moments, pays the libraries' one-off set-up) with zero_grad(set_to_none=False);
  2. read the current RSS (/proc/self/statm): model + gradients + optimizer state + runtime;
  3. one full forward + backward + AdamW step at T = n_px^2;
  4. peak = resource.getrusage(RUSAGE_SELF).ru_maxrss; delta = peak - the RSS of step 2: the step's
     own activations and workspace, in MiB and KiB per token.
Without checkpointing the script also counts the bytes autograd saves for backward (saved-tensor
hooks, unique storages, parameters excluded), in fp32 and under CPU bf16 autocast, in separate
forwards after the measured step, at T and T / 2: the difference per token is the exact activation
term that tools/memory_plan.py's formula predicts (it reads memory.csv and prints predicted vs
measured), free of the weight-sized tensors some ops save once per step.

Why RSS and not tracemalloc: torch allocates tensors in C++, which tracemalloc does not see. The
children run with MALLOC_MMAP_THRESHOLD_=131072: glibc then serves every block above 128 KiB with
its own mapping and unmaps it on free (its default raises that threshold as blocks are freed, after
which freed tensors stay in the heap and RSS over-counts), so RSS follows the live tensors; the
warm-up keeps one-off costs out of the delta. What is left above the saved tensors is backward's
working set (gradients in flight) and a little runtime scratch.

    python benchmarks/bench_memory.py                     # both shapes, n_px 32, 64, 96, with and without ckpt
    python benchmarks/bench_memory.py --n-px 32 --shapes 4x128x2   # fewer points
Step times are not reported: memory is the point, and this machine's cores are shared.
Rows are appended to benchmarks/results/memory.csv; the latest table is written to memory.md.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
from contextlib import nullcontext

import torch
from common import DEFAULT_OUT, env_info, write_results

from igpt_fast.model import GPTConfig, IGPT
from igpt_fast.train import configure_optimizer

KIB, MIB = 1024, 2**20


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # Linux reports KiB


def saved_bytes(model, idx, bf16=False):
    """Bytes autograd keeps for backward in one forward of model(idx, idx): unique storages of the
    tensors packed by saved-tensor hooks, parameters (and views of them) excluded; bf16: under CPU
    bf16 autocast."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        _, loss = model(idx, idx)
    del loss
    return sum(seen.values())


def saved_bytes_per_token(model, idx, bf16=False):
    """The per-token slope of saved_bytes between idx and its first half: what grows with T, without
    the weight-sized tensors some ops save once per step (autocast's bf16 weight copies, scaled weights)."""
    T = idx.size(1)
    full, half = saved_bytes(model, idx, bf16), saved_bytes(model, idx[:, :T // 2].clone(), bf16)  # own storage
    return (full - half) / (idx.size(0) * (T - T // 2))


def measure(args):
    """One point, inside its own process: the dict printed as RESULT."""
    torch.manual_seed(0)
    config = GPTConfig(n_px=args.n_px, n_vocab=args.n_vocab, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    model = IGPT(config, impl="torch", grad_checkpoint=args.grad_checkpoint).train()
    opt = configure_optimizer(model, 1e-4)
    T = config.n_ctx
    idx = torch.randint(0, config.n_vocab, (args.batch_size, T))

    def step(tokens):
        _, loss = model(tokens, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: they belong to the baseline

    step(idx[:, :16])
    base = current_rss_bytes()
    peak_before = peak_rss_bytes()
    step(idx)
    peak = peak_rss_bytes()
    tokens = args.batch_size * T
    row = {"n_px": args.n_px, "T": T, "grad_checkpoint": args.grad_checkpoint, "batch_size": args.batch_size,
           "model": f"L{args.n_layer} C{args.n_embd} H{args.n_head}", "n_layer": args.n_layer,
           "n_embd": args.n_embd, "n_head": args.n_head, "n_vocab": args.n_vocab,
           "params": sum(p.numel() for p in model.parameters()), "base_rss_mb": base / MIB,
           "peak_delta_mb": (peak - base) / MIB, "kib_per_token": (peak - base) / KIB / tokens,
           "peak_set_by_step": peak > peak_before}
    if not args.grad_checkpoint:
        row.update(saved_kib_per_token=saved_bytes_per_token(model, idx) / KIB,
                   saved_bf16_kib_per_token=saved_bytes_per_token(model, idx, bf16=True) / KIB)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-px", type=int, nargs="+", default=[32, 64, 96])
    p.add_argument("--shapes", nargs="+", default=["4x128x2", "2x256x4"], help="models as n_layer x n_embd x n_head")
    p.add_argument("--n-layer", type=int, help=argparse.SUPPRESS)  # internal: the child's shape
    p.add_argument("--n-head", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-embd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-vocab", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder")
    p.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one point, print RESULT
    args = p.parse_args()
    if args.one:
        args.n_px = args.n_px[0]
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    rows = []
    points = [(shape, n_px, ckpt) for shape in args.shapes for n_px in args.n_px for ckpt in (False, True)]
    for shape, n_px, ckpt in points:
        n_layer, n_embd, n_head = (int(x) for x in shape.split("x"))
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--n-px", str(n_px), f"--n-layer={n_layer}",
               f"--n-embd={n_embd}", f"--n-head={n_head}", f"--n-vocab={args.n_vocab}",
               f"--batch-size={args.batch_size}"] + (["--grad-checkpoint"] if ckpt else [])
        out = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * KIB)})
        if out.returncode != 0:
            print(f"{shape} n_px {n_px} grad_checkpoint {ckpt} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        if not row["peak_set_by_step"]:
            print(f"warning: {shape} n_px {n_px}: the peak RSS was reached before the measured step", file=sys.stderr)
        print(json.dumps(row), flush=True)
        rows.append(row)
    rows = [{**env_info(), **r} for r in rows]
    for path in write_results(rows, "memory", args.out):
        print(path)
    print(open(os.path.join(args.out, "memory.md")).read())


if __name__ == "__main__":
    main()
