"""Row-softmax benchmark: igpt-fast's Triton softmax vs torch.softmax, in GB/s against the card's copy bandwidth.

Shapes: N rows (default 4096) of width W (512 ... 32768: single-tile and looped paths). Modes: fwd
(bytes = 2 * N * W * elt: read x, write y) and bwd (bytes = 3 * N * W * elt: read y and dy, write dx;
timed with torch.autograd.grad on a saved forward). GB/s = bytes / median time; pct_copy = GB/s /
measured device copy bandwidth (common.copy_bandwidth_gbps). Results: OUT/softmax.csv (appended),
OUT/softmax.md, OUT/softmax.png.

    python benchmarks/bench_softmax.py            # CUDA, bf16
    python benchmarks/bench_softmax.py --smoke    # tiny CPU run (Triton interpreter)
"""
import argparse
import math
import os

PROVIDERS = ("ours", "torch")
MODES = ("fwd", "bwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--widths", nargs="+", type=int, default=[512, 1024, 2304, 4096, 8192, 16384, 32768])
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--warmup", type=float, default=25, help="ms")
    p.add_argument("--rep", type=float, default=100, help="ms")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny fp32 shapes that run on CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.widths, args.dtype, args.warmup, args.rep = 8, [100, 9000], "fp32", 1, 5
    return args


def _mode_fn(fn, x, dy, mode):
    """A zero-argument callable that runs `mode` once (bwd: the backward of one saved forward)."""
    import torch

    if mode == "fwd":
        return lambda: fn(x)
    y = fn(x)
    return lambda: torch.autograd.grad(y, x, dy, retain_graph=True)


def run(args):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from common import DEFAULT_OUT, copy_bandwidth_gbps, env_info, guarded, plot_lines, time_fn, write_results
    from igpt_fast.kernels import softmax

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    copy_gbps = copy_bandwidth_gbps(device)
    env = env_info()
    rows = []
    fns = {"ours": lambda t: softmax(t, impl="triton"), "torch": lambda t: torch.softmax(t, dim=-1)}
    for W in args.widths:
        x = torch.randn(args.rows, W, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        for provider in args.providers:
            fn = fns[provider]
            for mode in args.modes:
                call = _mode_fn(fn, x, dy, mode)
                nbytes = (2 if mode == "fwd" else 3) * x.numel() * x.element_size()
                timing, error = guarded(lambda: time_fn(call, warmup=args.warmup, rep=args.rep))
                ms, p20, p80 = timing if error is None else (math.nan,) * 3
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(provider=provider, mode=mode, dtype=args.dtype, N=args.rows, W=W, ms=ms,
                                 ms_p20=p20, ms_p80=p80, gbps=gbps, copy_gbps=copy_gbps,
                                 pct_copy=100 * gbps / copy_gbps, error=error or "", **env))
                print(f"{provider:>6} {mode:>4} W={W:<6} " + (f"{ms:8.3f} ms {gbps:8.1f} GB/s "
                      f"({100 * gbps / copy_gbps:.0f}% of copy)" if not error else f"failed: {error}"), flush=True)
    out = args.out or DEFAULT_OUT
    paths = write_results(rows, "softmax", out)
    if not args.no_plot:
        paths += (plot_lines(rows, "W", "gbps", os.path.join(out, "softmax.png"), "softmax GB/s",
                             copy_gbps=copy_gbps),)
    print("wrote " + ", ".join(paths))
    return rows


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
