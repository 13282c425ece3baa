"""Attention benchmark: igpt-fast's Triton flash attention vs PyTorch SDPA backends vs naive attention.

Providers: ours (igpt_fast.kernels.attention, impl="triton"; --config JSON picks a kernel variant,
e.g. '{"bwd": "fused_atomic", "order": "heavy_first"}', see kernels/flash_attention.py), sdpa (torch's
default SDPA backend choice), sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math
(F.scaled_dot_product_attention pinned to one backend with torch.nn.attention.sdpa_kernel), naive
(matmul + softmax + matmul, T x T materialised). Modes: fwd, bwd (backward of a saved forward),
fwd+bwd. Shapes follow flash-attention's benchmark: H = n_embd // D heads, B = batch_tokens // T.

FLOPs (FlashAttention convention): fwd = 4 * B * H * T^2 * D, halved when causal; bwd = 2.5 * fwd;
fwd+bwd = 3.5 * fwd. Reports median / p20 / p80 ms, TFLOP/s at the median, and peak extra memory
(MiB) of one call. A provider that fails (OOM, backend not available for the shape) is recorded
with its error. Results: OUT/attention.csv (appended), OUT/attention.md, OUT/attention.png.

    python benchmarks/bench_attention.py                       # full sweep, CUDA, bf16
    python benchmarks/bench_attention.py --smoke               # tiny CPU run (Triton interpreter)
    python benchmarks/bench_attention.py --autotune --seq-lens 4096 --head-dims 64
    python benchmarks/bench_attention.py --sweep --record defaults.json   # the GPU sweep (gpu_sweep.sh)

--sweep times every kernel variant x tile config of the launch plan at each (D, causal, T): for each
grid order (natural, heavy_first; natural only when not causal) and I/O (pointer; on sm_90 also tma,
which covers the forward and the split backward), the forward tiles (mode fwd) and the
backward variants (mode bwd, the backward of a saved forward): split with each dK/dV tile (dQ at its
default), then each dQ tile (dK/dV at the best), and fused_atomic with each of its tiles. Every
candidate is first checked against the fp32 reference on one (batch, 2-head) slice at the same T
(outputs for the forward, gradients for the backward; error at most 2x torch's default SDPA in the
same dtype + a floor); a failing or crashing candidate is recorded and skipped. The winner (best
(order, I/O), then best forward + best backward) is then timed in fwd and fwd+bwd against torch's default
SDPA, cuDNN, FlashAttention-2 and efficient SDPA; the table gets one entry per (class, T, mode) with
ours_ms (the winner), torch_ms (the faster of default SDPA and forced cuDNN: the torch path impl="auto"
would take, named in torch_backend), the winning config and every timing. Before timing, --jobs
worker processes compile every candidate in parallel (one call each on a (1, H, 256, D) slice, which
specialises like the real shapes), so the timing loop only loads cached kernels. --budget-s stops
starting new shapes past that many seconds; the table is rewritten after each shape, so a timeout
keeps every finished one. Shapes run in order of value: D 64 causal, D 128 causal, D 64, D 128, D 96.
"""
import argparse
import math
import os

PROVIDERS = ("ours", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "naive")
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
    p.add_argument("--config", default=None, help="kernel config for 'ours' (JSON, e.g. '{\"bwd\": \"fused_atomic\"}')")
    p.add_argument("--sweep", action="store_true", help="time every kernel variant x tile config (see above)")
    p.add_argument("--record", default=None, help="--sweep: defaults table to merge the winners into")
    p.add_argument("--jobs", type=int, default=0, help="--sweep: processes compiling the candidates first")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="--sweep: start no shape after this")
    p.add_argument("--max-tiles", type=int, default=None, help="--sweep: at most this many tiles per kernel")
    p.add_argument("--source", default="", help="--sweep: the table entries' source field")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes in fp32 that run on CPU (ours under the Triton interpreter)")
    args = p.parse_args(argv)
    if args.config is not None:
        import json
        args.config = json.loads(args.config)
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
    if provider == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
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
    if args.config is not None:
        import json
        os.environ["IGPT_FAST_ATTENTION_CONFIG"] = json.dumps(args.config)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from common import DEFAULT_OUT, env_info, guarded, peak_memory_mb, time_fn, write_results

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    causals = {"both": (True, False), "causal": (True,), "bidirectional": (False,)}[args.causal]
    env = env_info()
    configs = "autotune" if args.autotune else ("default" if args.config is None else str(args.config))
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


# ---- the GPU sweep ------------------------------------------------------------------------------

_TORCH_PROVIDERS = ("sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient")
_FLOOR = {"bf16": 4e-3, "fp16": 5e-4, "fp32": 4e-6}


def _label(config):
    return " ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in config.items())


_SMOKE_TILES = dict(fwd=[(64, 32, 4, 1)], dkdv=[(32, 64, 4, 1)], dq=[(64, 32, 4, 1)], fused=[(32, 64, 4, 1)])


def _candidates(causal, max_tiles, smoke=False, tma=False):
    """[(order, [fwd configs], bwd stage 1 [configs], split dQ tiles)] the sweep times: see --sweep.
    smoke: the interpreter's small tiles, one per kernel. tma (an sm_90 GPU, or smoke): every order
    also with io "tma" (the forward and split backward; the fused backward has pointer I/O only)."""
    from igpt_fast.kernels import flash_attention as fa

    tiles = {name: (_SMOKE_TILES[name] if smoke else fa.attention_tune_tiles(name))[:max_tiles]
             for name in ("fwd", "dkdv", "dq", "fused")}
    plans = []
    for order in (("natural", "heavy_first") if causal else ("natural",)):
        for io in ("pointer", "tma") if tma else ("pointer",):
            fwd = [dict(order=order, io=io, fwd=t) for t in tiles["fwd"]]
            bwd = [dict(order=order, io=io, bwd="split", dkdv=t) for t in tiles["dkdv"]]
            if io == "pointer":
                bwd += [dict(order=order, io=io, bwd="fused_atomic", fused=t) for t in tiles["fused"]]
            plans.append((order, fwd, bwd, tiles["dq"]))
    return plans


def _sweeps_tma(smoke):
    """Whether the sweep times io "tma": on a Hopper GPU (TMA hardware), and in the CPU smoke run (so
    the interpreter exercises those candidates too)."""
    import torch

    return smoke or (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9)


def _warm_worker(job):
    """Compile (by running once, fwd + bwd) each config of `job` on a small slice; {label: error}."""
    import torch

    from igpt_fast.kernels import attention
    from igpt_fast.kernels import flash_attention as fa

    (H, D, causal, dtype_name, configs) = job
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    q, k, v = (torch.randn(1, H, 256, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    errors = {}
    for config in configs:
        try:
            with fa.use_configs(config):
                out = attention(q, k, v, causal=causal, impl="triton")
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 -- any failure rules the candidate out; reported, not hidden
            errors[_label(config)] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return errors


def _warm(classes, args, dtype_name, max_tiles):
    """Compile every candidate of every (H, D, causal) class in `args.jobs` processes: {label key: error}."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    jobs = []
    for H, D, causal in classes:
        configs = []
        for _, fwd, bwd, dq_tiles in _candidates(causal, max_tiles, args.smoke, _sweeps_tma(args.smoke)):
            configs += fwd + bwd + [dict(bwd[0], dq=t) for t in dq_tiles]
        for i in range(args.jobs):  # round-robin so every worker gets a share of every class
            jobs.append((H, D, causal, dtype_name, configs[i::args.jobs]))
    errors = {}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for (H, D, causal, _, _), errs in zip(jobs, pool.map(_warm_worker, jobs)):
            errors.update({(D, causal, label): e for label, e in errs.items()})
    return errors


def _error_ok(ours, ref, base, floor):
    """Every tensor of `ours` within 2x the error of torch's own `base` (vs the fp32 `ref`) + floor."""
    for o, r, b in zip(ours, ref, base):
        err = (o.float() - r).abs().max().item()
        if not err <= 2 * (b.float() - r).abs().max().item() + floor:
            return False, err
    return True, None


def sweep(args):
    """The GPU sweep (see the module docstring); returns the rows written to OUT/attention_sweep.*."""
    import datetime
    import time

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from common import DEFAULT_OUT, env_info, git_sha, guarded, time_fn, write_results

    from igpt_fast.kernels import defaults
    from igpt_fast.kernels import flash_attention as fa
    from igpt_fast.kernels.reference import attention_ref

    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    max_tiles = args.max_tiles
    causals = {"both": (True, False), "causal": (True,), "bidirectional": (False,)}[args.causal]
    classes = [(max(1, args.n_embd // D), D, c) for D in args.head_dims for c in causals]
    rank = {64: 0, 128: 1, 32: 2, 96: 3}
    classes.sort(key=lambda hdc: (rank.get(hdc[1], 4) + (0 if hdc[2] else 1.5)))
    warm_errors = _warm(classes, args, args.dtype, max_tiles) if cuda and args.jobs > 0 else {}
    print(f"sweep: {len(classes)} classes x {len(args.seq_lens)} T; compiled in "
          f"{time.perf_counter() - start:.0f} s, {len(warm_errors)} candidates failed to compile", flush=True)
    env = env_info()
    capability = "{}.{}".format(*torch.cuda.get_device_capability()) if cuda else "cpu"
    out = args.out or DEFAULT_OUT
    rows, entries = [], []

    def measure(fn, mode, q, k, v, do):
        return time_fn(_mode_fn(fn, q, k, v, do, mode), warmup=args.warmup, rep=args.rep)[0]

    for H, D, causal in classes:
        for T in args.seq_lens:
            if time.perf_counter() - start > args.budget_s:
                print(f"sweep: budget of {args.budget_s:.0f} s spent; D={D} causal={causal} T={T} and later skipped")
                break
            B = max(1, args.batch_tokens // T)
            shape = dict(dtype=args.dtype, B=B, H=H, T=T, D=D, causal=causal)
            q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(4))
            for x in (q, k, v):
                x.requires_grad_()
            # The check slice: (1, 2, T, D); reference in fp32, torch's default SDPA as the error baseline.
            cq, ck, cv, cdo = (x.detach()[:1, :2].clone() for x in (q, k, v, do))
            leaves = [x.float().requires_grad_() for x in (cq, ck, cv)]
            r = attention_ref(*leaves, causal)
            ref = [r.detach()] + list(torch.autograd.grad(r, leaves, cdo.float()))
            del r, leaves
            base = _run_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), cq, ck, cv, cdo)
            ours_fn = _make_fn("ours", causal)
            timings = {}

            def try_config(config, mode):
                label = _label(config)
                if (D, causal, label) in warm_errors:
                    err = warm_errors[(D, causal, label)]
                else:
                    with fa.use_configs(config):
                        got, err = guarded(lambda: _run_grads(ours_fn, cq, ck, cv, cdo))
                        if err is None:
                            idx = [0] if mode == "fwd" else [1, 2, 3]
                            ok, bad = _error_ok([got[i] for i in idx], [ref[i] for i in idx],
                                                [base[i] for i in idx], _FLOOR[args.dtype])
                            err = None if ok else f"error {bad:.3g} over 2x torch's + {_FLOOR[args.dtype]:g}"
                        if err is None:
                            ms, err = guarded(lambda: measure(ours_fn, mode, q, k, v, do))
                row = dict(provider="ours", mode=mode, **shape, config=label, ms=ms if err is None else math.nan,
                           error=err or "")
                rows.append({**row, **env})
                timings[f"{mode} {label}"] = None if err else round(ms, 5)
                print(f"  D={D} causal={causal!s:<5} T={T:<6} {mode:>3} {label}: "
                      + (f"{ms:.4f} ms" if err is None else f"skipped: {err}"), flush=True)
                return math.inf if err else ms

            best = None  # (fwd ms + bwd ms, fwd config, bwd config)
            for order, fwd, bwd, dq_tiles in _candidates(causal, max_tiles, args.smoke, _sweeps_tma(args.smoke)):
                f_ms, f_cfg = min(((try_config(c, "fwd"), c) for c in fwd), key=lambda t: t[0])
                b_ms, b_cfg = min(((try_config(c, "bwd"), c) for c in bwd), key=lambda t: t[0])
                if b_cfg.get("bwd") == "split":
                    b_ms, b_cfg = min([(b_ms, b_cfg)] + [(try_config(dict(b_cfg, dq=t), "bwd"), dict(b_cfg, dq=t))
                                                        for t in dq_tiles[1:]], key=lambda t: t[0])
                if best is None or f_ms + b_ms < best[0]:
                    best = (f_ms + b_ms, f_cfg, b_cfg)
            if not math.isfinite(best[0]):
                print(f"  D={D} causal={causal} T={T}: no candidate passed; nothing recorded", flush=True)
                continue
            winner = dict(best[1], **best[2])
            provider_ms = {}
            for mode in ("fwd", "fwd+bwd"):
                with fa.use_configs(winner):
                    ms, err = guarded(lambda: measure(ours_fn, mode, q, k, v, do))
                provider_ms[("ours", mode)] = ms if err is None else math.inf
                rows.append({**dict(provider="ours", mode=mode, **shape, config="winner: " + _label(winner),
                                    ms=ms if err is None else math.nan, error=err or ""), **env})
                for provider in _TORCH_PROVIDERS if cuda else ("sdpa", "sdpa-flash"):  # CPU: no cuDNN
                    ms, err = guarded(lambda: measure(_make_fn(provider, causal), mode, q, k, v, do))
                    provider_ms[(provider, mode)] = ms if err is None else math.inf
                    timings[f"{mode} {provider}"] = None if err else round(ms, 5)
                    rows.append({**dict(provider=provider, mode=mode, **shape, config="", ms=ms if err is None
                                        else math.nan, error=err or ""), **env})
            for mode in ("fwd", "fwd+bwd"):
                ours_ms = provider_ms[("ours", mode)]
                cudnn = provider_ms.get(("sdpa-cudnn", mode), math.inf)
                backend = "cudnn" if cudnn < provider_ms[("sdpa", mode)] else "default"
                torch_ms = provider_ms[("sdpa-cudnn" if backend == "cudnn" else "sdpa", mode)]
                if not (math.isfinite(ours_ms) and math.isfinite(torch_ms)):
                    continue
                timings[f"{mode} winner"] = round(ours_ms, 5)
                entries.append(dict(capability=capability, op="attention", dtype=args.dtype, width=D, causal=causal,
                                    size=T, mode=mode, ours_ms=round(ours_ms, 5), torch_ms=round(torch_ms, 5),
                                    torch_provider="sdpa-cudnn" if backend == "cudnn" else "sdpa",
                                    torch_backend=backend, config=winner, timings=timings, device=env["device"],
                                    date=datetime.date.today().isoformat(), commit=git_sha(), torch=torch.__version__,
                                    triton=env["triton"], source=args.source or "bench_attention.py --sweep"))
                print(f"  D={D} causal={causal!s:<5} T={T:<6} {mode:>7}: ours {ours_ms:.4f} ms ({_label(winner)}), "
                      f"cuDNN {cudnn:.4f} ms ({cudnn / ours_ms:.2f}x), torch path {backend} {torch_ms:.4f} ms",
                      flush=True)
            write_results(rows, "attention_sweep", out)
            if args.record and entries:
                defaults.record(entries, args.record)
            del q, k, v, do
    print(f"sweep: {len(entries)} table entries, {time.perf_counter() - start:.0f} s"
          + (f"; recorded in {args.record}" if args.record else ""))
    return rows


def _run_grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn on leaf copies of q, k, v."""
    import torch

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, do))


def main(argv=None):
    args = parse_args(argv)
    sweep(args) if args.sweep else run(args)


if __name__ == "__main__":
    main()
