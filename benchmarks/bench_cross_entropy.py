"""Cross-entropy benchmark: igpt-fast's fused Triton cross-entropy vs F.cross_entropy, in GB/s.

Providers: ours (igpt_fast.kernels.cross_entropy, impl="triton"), torch-fp32 (the dispatcher's torch
path: F.cross_entropy(logits.float())), torch (F.cross_entropy on the logits as they are). Shapes: N
tokens (B * n_ctx) x V colours (512 by default). Modes: fwd (loss only, no grad; bytes = N * V * elt,
one read of the logits) and fwd+bwd (loss and logits gradient; bytes = 2 * N * V * elt: read the
logits, write the gradient: the least any implementation must move). GB/s = bytes / median time;
pct_copy against the measured copy bandwidth; peak extra memory (MiB) of one call. Results:
OUT/cross_entropy.csv (appended), OUT/cross_entropy.md, OUT/cross_entropy.png.

    python benchmarks/bench_cross_entropy.py            # CUDA, bf16
    python benchmarks/bench_cross_entropy.py --smoke    # tiny CPU run (Triton interpreter)
"""
import argparse
import math
import os

PROVIDERS = ("ours", "torch-fp32", "torch")
MODES = ("fwd", "fwd+bwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--tokens", nargs="+", type=int, default=[8192, 32768, 131072], help="N = B * n_ctx")
    p.add_argument("--n-vocab", nargs="+", type=int, default=[512])
    p.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of targets set to ignore_index")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--warmup", type=float, default=25, help="ms")
    p.add_argument("--rep", type=float, default=100, help="ms")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny fp32 shapes that run on CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.n_vocab, args.dtype, args.warmup, args.rep = [64], [512, 1000], "fp32", 1, 5
    return args


def run(args):
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from common import (DEFAULT_OUT, copy_bandwidth_gbps, env_info, guarded, peak_memory_mb, plot_lines,
                        time_fn, write_results)
    from igpt_fast.kernels import cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    copy_gbps = copy_bandwidth_gbps(device)
    env = env_info()
    fns = {"ours": lambda x, t: cross_entropy(x, t, impl="triton"),
           "torch-fp32": lambda x, t: cross_entropy(x, t, impl="torch"),
           "torch": lambda x, t: F.cross_entropy(x, t)}
    rows = []
    for V in args.n_vocab:
        for N in args.tokens:
            logits = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
            targets = torch.randint(0, V, (N,), device=device)
            targets[torch.rand(N, device=device) < args.ignore_frac] = -100
            elt = logits.element_size()
            for provider in args.providers:
                fn = fns[provider]
                for mode in args.modes:
                    if mode == "fwd":
                        def call():
                            with torch.no_grad():
                                return fn(logits, targets)
                        nbytes = N * V * elt
                    else:
                        call, nbytes = (lambda: torch.autograd.grad(fn(logits, targets), logits)), 2 * N * V * elt
                    timed, error = guarded(lambda: (time_fn(call, warmup=args.warmup, rep=args.rep),
                                                    peak_memory_mb(call)))
                    (ms, p20, p80), mem = timed if error is None else ((math.nan,) * 3, math.nan)
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    rows.append(dict(provider=provider, mode=mode, dtype=args.dtype, N=N, V=V, ms=ms, ms_p20=p20,
                                     ms_p80=p80, gbps=gbps, copy_gbps=copy_gbps, pct_copy=100 * gbps / copy_gbps,
                                     peak_mem_mib=mem, error=error or "", **env))
                    print(f"{provider:>10} {mode:>7} N={N:<7} V={V:<6} " + (
                        f"{ms:8.3f} ms {gbps:8.1f} GB/s ({100 * gbps / copy_gbps:.0f}% of copy) {mem:8.1f} MiB"
                        if not error else f"failed: {error}"), flush=True)
    out = args.out or DEFAULT_OUT
    paths = write_results(rows, "cross_entropy", out)
    if not args.no_plot:
        paths += (plot_lines(rows, "N", "gbps", os.path.join(out, "cross_entropy.png"), "cross-entropy GB/s",
                             copy_gbps=copy_gbps),)
    print("wrote " + ", ".join(paths))
    return rows


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
