"""Attention benchmark: igpt-fast's Triton flash attention vs PyTorch SDPA backends vs naive attention.

Providers: ours (igpt_fast.kernels.attention, impl="triton"), sdpa-flash, sdpa-efficient, sdpa-cudnn,
sdpa-math (F.scaled_dot_product_attention pinned to one backend with torch.nn.attention.sdpa_kernel),
naive (matmul + softmax + matmul, T x T materialised). Modes: fwd, bwd (backward of a saved forward),
fwd+bwd. Shapes follow flash-attention's benchmark: H = n_embd // D heads, B = batch_tokens // T.

FLOPs (FlashAttention convention): fwd = 4 * B * H * T^2 * D, halved when causal; bwd = 2.5 * fwd;
fwd+bwd = 3.5 * fwd. Reports median / p20 / p80 ms, TFLOP/s at the median, and peak extra memory
(MiB) of one call. A provider that fails (OOM, backend not available for the shape) is recorded
with its error. Results: OUT/attention.csv (appended), OUT/attention.md, OUT/attention.png.

    python benchmarks/bench_attention.py                       # full sweep, CUDA, bf16
    python benchmarks/bench_attention.py --smoke               # tiny CPU run (Triton interpreter)
    python benchmarks/bench_attention.py --autotune --seq-lens 4096 --head-dims 64
"""
import argparse
import math
import os

PROVIDERS = ("ours", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "naive")
MODES = ("fwd", "bwd", "fwd+bwd")
_SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                  "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2304, 4096, 8192, 16384])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 96, 128])
    p.add_argument("--causal", choices=("both", "causal", "bidirectional"), default="both")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="fp32: 'ours' runs only on CPU (--smoke); on CUDA it is refused (fp32 goes to SDPA)")
    p.add_argument("--n-embd", type=int, default=2048, help="H = n_embd // D")
    p.add_argument("--batch-tokens", type=int, default=16384, help="B = max(1, batch_tokens // T)")
    p.add_argument("--warmup", type=float, default=25, help="ms")
    p.add_argument("--rep", type=float, default=100, help="ms")
    p.add_argument("--autotune", action="store_true", help="autotune the Triton kernels (IGPT_FAST_AUTOTUNE=1)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes in fp32 that run on CPU (ours under the Triton interpreter)")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.head_dims, args.dtype = [100], [32], "fp32"
        args.n_embd, args.batch_tokens, args.warmup, args.rep = 64, 128, 1, 5
    return args


def flops(B, H, T, D, causal, mode):
    fwd = 4 * B * H * T * T * D / (2 if causal else 1)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def _make_fn(provider, causal):
    import torch
    import torch.nn.functional as F

    if provider == "ours":
        from igpt_fast.kernels import attention
        return lambda q, k, v: attention(q, k, v, causal=causal, impl="triton")
    if provider == "naive":
        def naive(q, k, v):
            s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
            if causal:
                T = q.shape[-2]
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            return torch.matmul(torch.softmax(s, dim=-1), v)  # (B, H, T, D)
        return naive
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, _SDPA_BACKENDS[provider])

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return sdpa


def _mode_fn(fn, q, k, v, do, mode):
    """A zero-argument callable that runs `mode` once."""
    import torch

    if mode == "fwd":
        return lambda: fn(q, k, v)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    out = fn(q, k, v)
    return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)


def run(args):
    if args.autotune:
        os.environ["IGPT_FAST_AUTOTUNE"] = "1"
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from common import DEFAULT_OUT, env_info, guarded, peak_memory_mb, time_fn, write_results

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    causals = {"both": (True, False), "causal": (True,), "bidirectional": (False,)}[args.causal]
    env = env_info()
    configs = "autotune" if args.autotune else "default"
    rows = []
    for D in args.head_dims:
        H = max(1, args.n_embd // D)
        for T in args.seq_lens:
            B = max(1, args.batch_tokens // T)
            for causal in causals:
                q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(4))
                for x in (q, k, v):
                    x.requires_grad_()
                for provider in args.providers:
                    fn = _make_fn(provider, causal)
                    for mode in args.modes:
                        row = dict(provider=provider, mode=mode, dtype=args.dtype, B=B, H=H, T=T, D=D,
                                   causal=causal, configs=configs if provider == "ours" else "")
                        timed, error = guarded(lambda: _measure(fn, q, k, v, do, mode, args, time_fn,
                                                                peak_memory_mb))
                        if error is None:
                            (ms, p20, p80), mem = timed
                            row.update(ms=ms, ms_p20=p20, ms_p80=p80,
                                       tflops=flops(B, H, T, D, causal, mode) / (ms * 1e-3) / 1e12,
                                       peak_mem_mib=mem, error="")
                        else:
                            row.update(ms=math.nan, ms_p20=math.nan, ms_p80=math.nan, tflops=math.nan,
                                       peak_mem_mib=math.nan, error=error)
                        rows.append({**row, **env})
                        print(f"{provider:>14} {mode:>7} T={T:<6} D={D:<4} causal={causal!s:<5} "
                              + (f"{row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s {row['peak_mem_mib']:9.1f} MiB"
                                 if not error else f"failed: {error}"), flush=True)
                del q, k, v, do
    out = args.out or DEFAULT_OUT
    paths = write_results(rows, "attention", out)
    if not args.no_plot:
        paths += (plot(rows, os.path.join(out, "attention.png")),)
    print("wrote " + ", ".join(paths))
    return rows


def _measure(fn, q, k, v, do, mode, args, time_fn, peak_memory_mb):
    call = _mode_fn(fn, q, k, v, do, mode)
    timing = time_fn(call, warmup=args.warmup, rep=args.rep)
    return timing, peak_memory_mb(call)


def plot(rows, path):
    """TFLOP/s vs T, one panel per (D, causal) for the fwd+bwd mode (or the first mode run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [r["mode"] for r in rows]
    mode = "fwd+bwd" if "fwd+bwd" in modes else modes[0]
    panels = sorted({(r["D"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (D, causal) in zip(axes[0], panels):
        for provider in dict.fromkeys(r["provider"] for r in rows):
            pts = [(r["T"], r["tflops"]) for r in rows if (r["D"], r["causal"], r["provider"], r["mode"])
                   == (D, causal, provider, mode) and not r["error"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}, D={D}, {'causal' if causal else 'bidirectional'}")
        ax.set_xlabel("T")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"attention, {rows[0]['dtype']}, {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
