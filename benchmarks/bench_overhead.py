"""Host cost per call of igpt-fast's ops: microseconds of Python between the caller and Triton's launcher.

Per op (attention, softmax, cross_entropy) and mode (fwd: inputs without gradients; fwd+bwd: the
forward and its backward), three providers on the same tensors:
  ours    the public op, igpt_fast.kernels.<op>(..., impl="triton") (after its first call);
  floor   the kernel module's own eager autograd.Function over its launchers (_FlashAttention,
          _Softmax, _CrossEntropy) called directly: what any eager wrapper must at least pay;
  torch   torch's own op (F.scaled_dot_product_attention, torch.softmax, F.cross_entropy).
With --stub (the default on CPU) the launch seam kernels/_common.launch is a no-op, so ours and floor
measure only our Python (checks, allocation, launch plan) on top of Triton's launcher; `over_floor_us`
is ours - floor. On CUDA without --stub the kernels really run on tiny shapes (the GPU work is a few
microseconds), so us/call is the real per-call cost and `vs_torch` = ours / torch (goal <= 1.2).
On CPU, torch's row includes its (tiny) compute. Timing: `--calls` calls per sample (synchronized once
on CUDA), --samples samples; us = median per call, p20 / p80 over samples.

Results: OUT/overhead.csv (appended) and OUT/overhead.md. --baseline CSV adds the matching us of an
earlier run (e.g. the code before a change) as `baseline_us`.

    python benchmarks/bench_overhead.py                    # CPU: stubbed launches, fp32, TRITON_INTERPRET=1
    python benchmarks/bench_overhead.py --no-stub          # CUDA: real per-call cost, bf16
"""
import argparse
import csv
import math
import os
import statistics
import time

OPS = ("attention", "softmax", "cross_entropy")
MODES = ("fwd", "fwd+bwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--stub", action=argparse.BooleanOptionalAction, default=None,
                   help="make kernel launches no-ops (default: on CPU yes, on CUDA no)")
    p.add_argument("--calls", type=int, default=200, help="calls per timing sample")
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--baseline", default=None, help="an earlier overhead.csv to compare with")
    p.add_argument("--label", default="", help="a note stored with every row (e.g. 'before')")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    return p.parse_args(argv)


def _floor_functions(torch):
    """The kernel modules' own eager autograd.Functions: their launchers and nothing else."""
    from igpt_fast.kernels import flash_attention as fa
    from igpt_fast.kernels import fused_cross_entropy as fce
    from igpt_fast.kernels import fused_softmax as fs

    return dict(attention=lambda q, k, v: fa._FlashAttention.apply(q, k, v, True, 0.125),
                softmax=fs._Softmax.apply,
                cross_entropy=lambda x, t: fce._CrossEntropy.apply(x, t, -100, x.requires_grad, "mean"))


def _cases(torch, device, dtype):
    """op -> (inputs factory(grad), providers {name: fn(*inputs)}, shape label)."""
    import torch.nn.functional as F

    from igpt_fast.kernels import attention, cross_entropy, softmax

    floor = _floor_functions(torch)
    T, N = (128, 4096) if device == "cuda" else (16, 64)

    def qkv(grad):
        return [torch.randn(1, 1, T, 64, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]

    def rows(grad):
        return [torch.randn(N, 512, device=device, dtype=dtype, requires_grad=grad)]

    def ce(grad):
        return [torch.randn(N, 512, device=device, dtype=dtype, requires_grad=grad),
                torch.randint(0, 512, (N,), device=device)]

    return dict(
        attention=(qkv, dict(ours=lambda q, k, v: attention(q, k, v, causal=True, scale=0.125, impl="triton"),
                             floor=floor["attention"],
                             torch=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                   scale=0.125)),
                   f"B1 H1 T{T} D64 causal"),
        softmax=(rows, dict(ours=lambda x: softmax(x, impl="triton"), floor=floor["softmax"],
                            torch=lambda x: torch.softmax(x, dim=-1)), f"N{N} W512"),
        cross_entropy=(ce, dict(ours=lambda x, t: cross_entropy(x, t, impl="triton"),
                                floor=floor["cross_entropy"], torch=lambda x, t: F.cross_entropy(x, t)),
                       f"N{N} V512 mean"),
    )


def _per_call_us(torch, call, calls, samples):
    """(median, p20, p80) microseconds per call over `samples` samples of `calls` calls each."""
    cuda = torch.cuda.is_available()
    for _ in range(max(10, calls // 10)):
        call()
    per_call = []
    for _ in range(samples):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    q = statistics.quantiles(per_call, n=10, method="inclusive")
    return statistics.median(per_call), q[1], q[7]


def _baseline(path):
    if not path:
        return {}
    with open(path, newline="") as f:
        return {(r["op"], r["mode"], r["provider"]): float(r["us"]) for r in csv.DictReader(f) if r.get("us")}


def run(args):
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors reach the launchers only under it
    from common import DEFAULT_OUT, env_info, write_results

    from igpt_fast.kernels import _common

    stub = (not cuda) if args.stub is None else args.stub
    if stub:
        _common.launch = lambda kernel, grid, args, meta: None
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_num_threads(1)
    env = env_info()
    baseline = _baseline(args.baseline)
    rows = []
    for op, (make, providers, shape) in _cases(torch, device, dtype).items():
        if op not in args.ops:
            continue
        for mode in MODES:
            grad = mode == "fwd+bwd"
            inputs = make(grad)
            results = {}
            for provider, fn in providers.items():
                if grad:
                    def call(fn=fn):
                        out = fn(*inputs)
                        out.backward(torch.ones_like(out))
                else:
                    def call(fn=fn):
                        with torch.no_grad():
                            fn(*inputs)
                results[provider] = _per_call_us(torch, call, args.calls, args.samples)
            for provider, (us, p20, p80) in results.items():
                row = dict(op=op, mode=mode, provider=provider, shape=shape, dtype=str(dtype).replace("torch.", ""),
                           launch="stubbed" if stub else "real", us=us, us_p20=p20, us_p80=p80,
                           over_floor_us=us - results["floor"][0] if provider == "ours" else math.nan,
                           vs_torch=us / results["torch"][0])
                if baseline:
                    row["baseline_us"] = baseline.get((op, mode, provider), math.nan)
                rows.append(dict(row, label=args.label, **env))
                print(f"{op:>13} {mode:>7} {provider:>5}: {us:8.1f} us/call (p20 {p20:.1f}, p80 {p80:.1f})"
                      + (f", +{us - results['floor'][0]:.1f} over floor" if provider == "ours" else ""),
                      flush=True)
    paths = write_results(rows, "overhead", args.out or DEFAULT_OUT)
    print("wrote " + ", ".join(paths))
    return rows


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
