"""Compile every Triton kernel config igpt-fast can launch on CUDA, for GPUs this machine does not have.

Triton compiles for any NVIDIA target without a GPU (its wheel ships ptxas and cuobjdump). For each
target below this tool builds the launches dispatch would make, with the launchers' own code
(`launch_specs` in each kernel module and `attention_configs`, the same config selection the
launchers use), binds them with Triton's own argument specialisation (so pointers and strides carry
the 16-byte divisibility hints a real launch gets), compiles them to cubin and checks:

  - it compiles (TTIR -> TTGIR -> LLVM -> PTX -> cubin, ptxas included);
  - dynamic shared memory fits the per-block limit (232,448 B on sm_90, 166,912 B on sm_80);
  - registers x threads per block fit the register file (65,536 per block on both);
  - no register spill (ptxas -v: spill stores + loads), in a default config;
  - every tl.dot over fp16/bf16 became tensor-core code: TTGIR dots all warp-group (wgmma) on sm_90 or
    #mma-encoded (mma.sync) on sm_80, and the PTX holds wgmma.mma_async / mma.sync.

Covered: attention forward, backward preprocessing, dK/dV and dQ (fp16, bf16; head dims 32, 64, 96,
128; causal and not; fp32 attention on CUDA goes to the torch path, so it is not compiled), in the
built-in default config ("default": bwd split, order natural) and in each other variant's default
tiles: "variant:fused_atomic+heavy_first" (the fused dK/dV/dQ kernel, whose PTX must hold
the fp32 atomic adds, and the heavy-first forward), "variant:heavy_first" (split dK/dV and
dQ in heavy-first order) and "variant:tma" (io "tma": forward, dK/dV and dQ through tensor
descriptors, whose sm_90 PTX must hold TMA copies, cp.async.bulk.tensor), each compiling only the
kernels the default case did not, and only where the variant differs from the default (below sm_90
io "tma" runs as "pointer"); softmax
forward/backward and cross-entropy forward/backward (fp16, bf16, fp32) at the widths that select each
of their launch configs. With --all, also every config of the attention autotune sets
(IGPT_FAST_AUTOTUNE=1), which are also the tiles the GPU sweep times: there a spill or an over-limit shared memory is reported, not failed (the
autotuner skips configs that cannot launch), a compile error or a lost tensor core still fails.

Works with the triton it imports, 3.6 (what the GPU machine runs) or 3.9 (the venv's): `make compile-check`
runs it once with each, the 3.6 wheel from its own --target folder first on PYTHONPATH.

Writes OUT.md (a table whose header names the triton version) and OUT.csv (one row per kernel compile, with a
triton column), atomically; exits 1 listing every failure.
Usage: python tools/compile_check.py [--all] [--jobs 2] [--out benchmarks/results/compile_check]
"""
import os

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels: the interpreter must be off before triton loads

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "compile_check")
TARGETS = {  # per-block limits from the CUDA programming guide's compute capability tables
    "sm_90": dict(capability=(9, 0), max_shared=232448, regs_per_block=65536),
    "sm_80": dict(capability=(8, 0), max_shared=166912, regs_per_block=65536),
}
HEAD_DIMS = (32, 64, 96, 128)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ATTN_VARIANTS = {  # source -> (config override, kernels to compile: those the default case lacks)
    "variant:fused_atomic+heavy_first": (dict(bwd="fused_atomic", order="heavy_first"), ("fwd", "fused")),
    "variant:heavy_first": (dict(order="heavy_first"), ("dkdv", "dq")),
    "variant:tma": (dict(io="tma"), ("fwd", "dkdv", "dq")),
}
SOFTMAX_WIDTHS = (512, 4096, 8192, 20000)  # 4 warps, 8 warps, one 16-warp tile, the looped path
CE_VOCABS = (512, 50000)  # the palette (one tile), a long row (looped 4096-wide tiles)
ATTN_SHAPE = (2, 4, 1024)  # (B, H, T): T = 32 x 32 pixels
ROWS = 64
COLUMNS = ["target", "op", "kernel", "dtype", "shape", "causal", "config", "source", "shared_bytes",
           "regs", "threads", "spill_bytes", "tensor_cores", "verdict"]


def _cases(check_all):
    """Every (target, op, dtype, size, causal, source) to compile; attention first (the slow ones)."""
    cases = []
    for target in TARGETS:
        for dtype in ("fp16", "bf16"):
            for D in HEAD_DIMS:
                for causal in (True, False):
                    for source in ("default", *ATTN_VARIANTS):
                        if source != "default" and _runs_as_default(target, D, source):
                            continue  # e.g. io "tma" below sm_90, which attention_configs makes "pointer"
                        cases.append(dict(target=target, op="attention", dtype=dtype, size=D, causal=causal,
                                          source=source))
                    if check_all:
                        from igpt_fast.kernels import flash_attention as fa
                        for name in ("fwd", "dkdv", "dq", "fused"):
                            for i in range(len(fa.attention_tune_configs(name))):
                                cases.append(dict(target=target, op="attention", dtype=dtype, size=D,
                                                  causal=causal, source=f"tune:{name}:{i}"))
    for target in TARGETS:
        for dtype in DTYPES:
            cases += [dict(target=target, op="softmax", dtype=dtype, size=W, causal=None, source="default")
                      for W in SOFTMAX_WIDTHS]
            for V in CE_VOCABS:
                for grad in (True, False):
                    cases.append(dict(target=target, op="cross_entropy", dtype=dtype, size=V, causal=None,
                                      source="default" if grad else "default:no-grad"))
    return cases


def _runs_as_default(target, head_dim, source):
    """Whether variant `source` launches exactly the default config on `target` (nothing new to compile)."""
    from igpt_fast.kernels import flash_attention

    capability = TARGETS[target]["capability"]
    return (flash_attention.attention_configs(capability, head_dim, ATTN_VARIANTS[source][0])
            == flash_attention.attention_configs(capability, head_dim))


def _specs(case):
    """The (kernel, grid, args, keywords) launches of one case, on CPU stand-in tensors."""
    from igpt_fast.kernels import flash_attention, fused_cross_entropy, fused_softmax

    dtype = DTYPES[case["dtype"]]
    if case["op"] == "attention":
        q = torch.empty(*ATTN_SHAPE, case["size"], dtype=dtype)  # (B, H, T, D)
        capability = TARGETS[case["target"]]["capability"]
        if case["source"] == "default":
            configs = flash_attention.attention_configs(capability, case["size"])
            return flash_attention.launch_specs(q, case["causal"], configs)
        if case["source"] in ATTN_VARIANTS:
            override, names = ATTN_VARIANTS[case["source"]]
            configs = flash_attention.attention_configs(capability, case["size"], override)
            return [s for s in flash_attention.launch_specs(q, case["causal"], configs) if _attn_kernel(s) in names]
        _, name, i = case["source"].split(":")
        configs = flash_attention.attention_configs(capability, case["size"],
                                                    dict(bwd="fused_atomic") if name == "fused" else None)
        configs[name] = flash_attention.attention_tune_configs(name)[int(i)]
        return [s for s in flash_attention.launch_specs(q, case["causal"], configs) if _attn_kernel(s) == name]
    if case["op"] == "softmax":
        return fused_softmax.launch_specs(torch.empty(ROWS, case["size"], dtype=dtype))
    return fused_cross_entropy.launch_specs(torch.empty(ROWS, case["size"], dtype=dtype),
                                            compute_grad=case["source"] == "default")


def _attn_kernel(spec):
    """Which attention kernel ("fwd", "dkdv", "dq", "fused", "pre") a launch spec runs."""
    from igpt_fast.kernels import flash_attention

    kernel, _grid, _args, meta = spec
    if kernel is flash_attention._attn_bwd_dkdv_kernel:
        return "fused" if meta["FUSED_DQ"] else "dkdv"
    return {flash_attention._attn_fwd_kernel: "fwd", flash_attention._attn_bwd_dq_kernel: "dq"}.get(kernel, "pre")


def _compile(kernel, args, meta, target):
    """Compile one launch for `target` the way JITFunction.run would; returns (CompiledKernel, ptxas log)."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    meta = dict(meta, debug=kernel.debug or knobs.runtime.debug,
                instrumentation_mode=knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # a launch option in 3.9, unknown to 3.6 (KeyError)
        meta["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def _tensor_cores(compiled, arch):
    """'n/a' for a kernel without tl.dot, else 'ok (N wgmma)' / 'ok (N mma)' or 'FAIL: ...'."""
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    wgmma = len(re.findall(r"ttng\.warp_group_dot ", ttgir))
    dots = re.findall(r"= tt\.dot .*", ttgir)
    if wgmma + len(dots) == 0:
        return "n/a"
    if arch == 90:
        if dots or "wgmma.mma_async" not in ptx:
            return f"FAIL: {len(dots)} of {wgmma + len(dots)} dots not wgmma"
        return f"ok ({wgmma} wgmma)"
    fma = [d for d in dots if "#mma" not in d.split("->")[-1]]
    if fma or "mma.sync" not in ptx:
        return f"FAIL: {len(fma)} of {len(dots)} dots not mma"
    return f"ok ({len(dots)} mma)"


def _tma_note(compiled, meta, arch):
    """io "tma" on sm_90: the PTX must hold TMA copies (cp.async.bulk.tensor); elsewhere Triton lowers
    the descriptors to plain loads, so there is nothing to find."""
    if not meta.get("TMA") or arch != 90:
        return ""
    copies = len(re.findall(r"cp\.async\.bulk\.tensor", compiled.asm["ptx"]))
    return f"; {copies} TMA copies" if copies else "; FAIL: no TMA copy (cp.async.bulk.tensor) in PTX"


def _config_label(meta):
    keys = [k for k in meta if k.startswith("BLOCK") and k != "BLOCK_D"]
    parts = [f"{k}={meta[k]}" for k in keys] + [f"w{meta.get('num_warps', 4)}", f"s{meta.get('num_stages', 3)}"]
    parts += [flag.lower() for flag in ("FUSED_DQ", "HEAVY_FIRST", "TMA") if meta.get(flag)]
    return " ".join(parts)


def check_case(case):
    """Compile every launch of one case; returns its result rows."""
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report goes to stdout, captured per compile
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    limits = TARGETS[case["target"]]
    arch = limits["capability"][0] * 10 + limits["capability"][1]
    target = GPUTarget("cuda", arch, 32)
    tuned = case["source"].startswith("tune")
    rows = []
    for kernel, _grid, args, meta in _specs(case):
        row = dict(target=case["target"], op=case["op"], kernel=kernel.__name__, dtype=case["dtype"],
                   shape=(f"D={case['size']}" if case["op"] == "attention" else
                          f"{'W' if case['op'] == 'softmax' else 'V'}={case['size']}"),
                   causal="" if case["causal"] is None else str(case["causal"]).lower(),
                   config=_config_label(meta), source=case["source"])
        try:
            compiled, log = _compile(kernel, args, meta, target)
        except (triton.CompilationError, RuntimeError) as err:
            rows.append(dict(row, verdict=f"FAIL: compile error: {type(err).__name__}: "
                                          f"{str(err).strip().splitlines()[-1][:200]}"))
            continue
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
        threads = compiled.metadata.num_warps * 32
        shared = compiled.metadata.shared
        cores = _tensor_cores(compiled, arch)
        if meta.get("FUSED_DQ"):
            atomics = len(re.findall(r"\b(?:red|atom)\.global[a-z0-9.]*\.add[a-z0-9.]*\.f32", compiled.asm["ptx"]))
            cores += f"; {atomics} f32 atomic adds" if atomics else "; FAIL: no f32 atomic add in PTX"
        cores += _tma_note(compiled, meta, arch)
        problems, notes = [], []
        if shared > limits["max_shared"]:
            (notes if tuned else problems).append(f"shared {shared} B > {limits['max_shared']} B")
        if regs * threads > limits["regs_per_block"]:
            (notes if tuned else problems).append(f"{regs} regs x {threads} threads > {limits['regs_per_block']}")
        if spill:
            (notes if tuned else problems).append(f"spills {spill} B")
        if "FAIL: " in cores:
            problems.append(cores[cores.index("FAIL: ") + len("FAIL: "):])
        verdict = ("FAIL: " + "; ".join(problems) if problems else
                   "ok" + (" (autotuner skips or pays: " + "; ".join(notes) + ")" if notes else ""))
        rows.append(dict(row, shared_bytes=shared, regs=regs, threads=threads, spill_bytes=spill,
                         tensor_cores=cores, verdict=verdict))
    return rows


def _atomic_write(path, text):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _markdown(rows, header):
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="also every attention autotune config")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output path without extension (.md and .csv)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    cases = _cases(args.all)
    rows = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for i, case_rows in enumerate(pool.map(check_case, cases), 1):
            rows += case_rows
            bad = sum(r["verdict"].startswith("FAIL") for r in case_rows)
            print(f"[{i}/{len(cases)}] {case_rows[0]['target']} {case_rows[0]['op']} {case_rows[0]['dtype']} "
                  f"{case_rows[0]['shape']} {case_rows[0]['causal']} {case_rows[0]['source']}: "
                  f"{'FAIL' if bad else 'ok'} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    elapsed = time.perf_counter() - start

    ptxas = {}
    for target, limits in TARGETS.items():
        major, minor = limits["capability"]
        ptxas[target] = _ptxas_version(10 * major + minor)
    failures = [r for r in rows if r["verdict"].startswith("FAIL")]
    max_regs = max(r["regs"] for r in rows if "regs" in r)
    command = " ".join(["python tools/compile_check.py"] + (sys.argv[1:] if argv is None else list(argv)))
    triton_dir = os.path.relpath(os.path.dirname(triton.__file__), REPO)
    header = (f"# Compile check, triton {triton.__version__}: every CUDA kernel config, compiled without a GPU\n\n"
              f"`{command}` with triton {triton.__version__} ({triton_dir}), "
              f"torch {torch.__version__}; ptxas: sm_80 {ptxas['sm_80']}, sm_90 {ptxas['sm_90']}. "
              f"{len(rows)} compiles, {len(failures)} failures, max {max_regs} registers/thread, "
              f"{sum(1 for r in rows if r.get('spill_bytes'))} with spills; {elapsed:.0f} s with "
              f"{args.jobs} workers. Limits: shared memory per block 232,448 B (sm_90), 166,912 B (sm_80); "
              f"65,536 registers per block. Attention launches at (B, H, T) = {ATTN_SHAPE}; softmax and "
              f"cross-entropy at {ROWS} rows.")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    _atomic_write(args.out + ".md", _markdown(rows, header))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["triton"] + COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(dict(r, triton=triton.__version__) for r in rows)
    _atomic_write(args.out + ".csv", buf.getvalue())
    print(f"{len(rows)} compiles in {elapsed:.0f} s, {len(failures)} failures, max {max_regs} registers; "
          f"wrote {args.out}.md and .csv")
    if failures:
        for r in failures:
            print(f"FAIL {r['target']} {r['kernel']} {r['dtype']} {r['shape']} causal={r['causal']} "
                  f"[{r['config']}]: {r['verdict'][6:]}", file=sys.stderr)
        return 1
    return 0


def _ptxas_version(arch):
    """The version line of the ptxas this triton runs for `arch` (3.6: ptxas below sm_100; 3.9: ptxas-blackwell
    from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    out = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-2]


if __name__ == "__main__":
    sys.exit(main())
