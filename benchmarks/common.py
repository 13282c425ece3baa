"""Shared helpers for the igpt-fast benchmark scripts (bench_*.py in this folder).

env_info()                 device name, torch / triton / python versions, git sha, UTC time
time_fn(fn, warmup, rep)   (median, p20, p80) ms; CUDA: triton.testing.do_bench, CPU: perf_counter
peak_memory_mb(fn)         extra peak CUDA memory of one call (nan on CPU)
copy_bandwidth_gbps(dev)   measured device-to-device copy bandwidth (read + write bytes / s)
guarded(fn)                (result, None) or (None, "ErrorType: message") for OOM / unsupported kernels
write_results(rows, name, out_dir)   append rows to OUT/name.csv (header merged), rewrite OUT/name.md

The scripts import this file as `common` (Python puts a script's folder first on sys.path), e.g.
`python benchmarks/bench_attention.py`, or through `igpt-fast bench ...`, which runs them the same way.
Units: milliseconds, GB/s (1e9 bytes), TFLOP/s (1e12), MiB.
"""
import csv
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results")


def git_sha():
    """Short sha of the checkout this file lives in, '+dirty' when tracked files changed; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def env_info():
    """Columns every result row carries."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return dict(device=device, torch=torch.__version__, triton=triton_version,
                python=platform.python_version(), git_sha=git_sha(),
                time=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn, warmup=25, rep=100):
    """Time fn() for about `rep` ms after about `warmup` ms of warm-up; return (median, p20, p80) in ms."""
    if torch.cuda.is_available():
        import triton.testing
        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start) * 1e3 < rep:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(times), q[1], q[7]


def peak_memory_mb(fn):
    """Peak CUDA memory allocated during one fn() above what was allocated before it, in MiB (nan on CPU)."""
    if not torch.cuda.is_available():
        return math.nan
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth_gbps(device, nbytes=2**28):
    """Measured copy bandwidth (bytes read + bytes written per second) of `device`, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median, _, _ = time_fn(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * nbytes / (median * 1e-3) / 1e9


def guarded(fn):
    """Run fn(); an OOM, unsupported backend or kernel resource error becomes (None, message), logged
    with its traceback to stderr, so one failing provider is recorded instead of ending the sweep."""
    import triton.runtime.errors as triton_errors

    try:
        return fn(), None
    except (RuntimeError, ValueError, NotImplementedError, triton_errors.TritonError) as e:
        traceback.print_exc(file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _fmt(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_results(rows, name, out_dir=DEFAULT_OUT):
    """Append rows (dicts) to out_dir/name.csv and write them as out_dir/name.md; return both paths.

    An existing CSV with other columns is rewritten with the union of the columns (old rows keep
    blanks for the new ones), so results from older runs are never dropped."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{name}.csv")
    md_path = os.path.join(out_dir, f"{name}.md")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    old_rows = []
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = reader.fieldnames or []
            if old_fields != fields:
                old_rows = list(reader)
            fields = list(dict.fromkeys(old_fields + fields))
    if old_rows or not os.path.exists(csv_path):
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(old_rows)
    with open(csv_path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields, restval="").writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
    env_keys = list(env_info())
    table_keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in env_keys]
    with open(md_path, "w") as f:
        if rows:
            first = rows[0]
            f.write(f"# {name}\n\n" + ", ".join(f"{k}: {first.get(k, '')}" for k in env_keys) + "\n\n")
        f.write("| " + " | ".join(table_keys) + " |\n|" + "---|" * len(table_keys) + "\n")
        for row in rows:
            f.write("| " + " | ".join(_fmt(row.get(k, "")) for k in table_keys) + " |\n")
    return csv_path, md_path


def plot_lines(rows, x_key, y_key, path, title, copy_gbps=None):
    """One panel per mode: y_key vs x_key (log2 x axis), one line per provider (and per other shape
    columns that vary, e.g. V); an optional dashed line at the measured copy bandwidth. Returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False)
    shape_keys = [k for k in ("V", "N", "W", "D", "causal") if k != x_key and len({r.get(k) for r in rows}) > 1]
    for ax, mode in zip(axes[0], modes):
        series = {}
        for r in rows:
            if r["mode"] == mode and not r["error"]:
                label = " ".join([r["provider"]] + [f"{k}={r[k]}" for k in shape_keys])
                series.setdefault(label, []).append((r[x_key], r[y_key]))
        for label, pts in series.items():
            ax.plot(*zip(*sorted(pts)), marker="o", label=label)
        if copy_gbps:
            ax.axhline(copy_gbps, color="gray", linestyle="--", label="copy")
        ax.set_xscale("log", base=2)
        ax.set_title(mode)
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}, {rows[0]['dtype']}, {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
