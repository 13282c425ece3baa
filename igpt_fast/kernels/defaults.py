"""The per-GPU defaults table: which implementation impl="auto" uses for a shape class on a GPU.

defaults.json (beside this file) holds measured entries, each one shape class on one kind of GPU:
  capability "9.0", op ("attention" | "softmax" | "cross_entropy"), dtype ("bf16" | "fp16"),
  width (head dim for attention, row width W for softmax, vocabulary V for cross_entropy),
  causal (attention; null otherwise), size (T for attention, rows N otherwise), mode ("fwd" |
  "fwd+bwd"), ours_ms, torch_ms, ratio = ours_ms / torch_ms, choice ("triton" when ratio < 1, else
  "torch"), and where it came from: device, date, commit, torch / triton versions, source.
GPU runs add entries with `record` (benchmarks call it; an entry replaces the one with the same key).
Optional fields a GPU sweep (benchmarks/gpu_sweep.sh) adds: config (the kernel config that won for
the class, e.g. {"bwd": "fused_atomic", "order": "heavy_first", "fwd": [128, 64, 8, 3], ...}: the
launch plan reads it through `config`), torch_backend ("cudnn" when forcing SDPA's cuDNN backend
beat torch's default SDPA at that shape, else "default": dispatch's torch path reads it through
`torch_backend`), and timings (every variant's and provider's ms, for the record).

`choose` answers one shape class: among the entries of its capability, op, width and causal flag
(bf16 entries stand in for fp16 when there are none for fp16: same element size, same kernels), the
mode of the call (fwd+bwd when it needs gradients; the other mode when that one is missing), the
entry whose size is nearest on a log2 scale. No entry: "triton" (our kernels wherever they compile;
dispatch's first-use check still falls back if they do not).
"""
import json
import math
import os

from igpt_fast.atomic import write_text

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "defaults.json")
KEY = ("capability", "op", "dtype", "width", "causal", "size", "mode")
_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
_tables = {}


def load(path=None):
    """The entries of the table at `path` (default PATH; a missing file is an empty table); read once
    per path."""
    path = path or PATH
    if path not in _tables:
        try:
            with open(path) as f:
                _tables[path] = json.load(f)["entries"]
        except FileNotFoundError:
            _tables[path] = []
    return _tables[path]


def record(rows, path=None):
    """Merge measured rows into the table at `path`, atomically; returns the new entries. Each row
    has KEY's fields, ours_ms, torch_ms and its provenance (device, date, commit, torch, triton,
    source, and optionally torch_provider); ratio and choice are computed here."""
    path = path or PATH
    entries = {tuple(e[k] for k in KEY): e for e in load(path)}
    for row in rows:
        entry = dict(row, ratio=round(row["ours_ms"] / row["torch_ms"], 3))
        entry["choice"] = "triton" if entry["ratio"] < 1 else "torch"
        entries[tuple(entry[k] for k in KEY)] = entry
    ordered = sorted(entries.values(), key=lambda e: (e["capability"], e["op"], e["dtype"], e["width"],
                                                        str(e["causal"]), e["mode"], e["size"]))
    lines = ",\n".join("  " + json.dumps(e) for e in ordered)  # one entry a line
    write_text(path, '{"format": 1, "entries": [\n' + lines + "\n]}\n")
    _tables.pop(path, None)
    return ordered


def _nearest(capability, op, dtype, width, causal, size, needs_grad, path=None):
    """The entry that decides one shape class (see the module docstring), or None."""
    cap = f"{capability[0]}.{capability[1]}"
    dtype = _DTYPES.get(str(dtype), str(dtype))
    mine = [e for e in load(path) if e["capability"] == cap and e["op"] == op and e["width"] == width
            and e["causal"] == causal]
    for d in (dtype, "bf16") if dtype == "fp16" else (dtype,):
        same_dtype = [e for e in mine if e["dtype"] == d]
        if same_dtype:
            break
    else:
        return None
    modes = ("fwd+bwd", "fwd") if needs_grad else ("fwd", "fwd+bwd")
    for mode in modes:
        candidates = [e for e in same_dtype if e["mode"] == mode]
        if candidates:
            return min(candidates, key=lambda e: (abs(math.log2(e["size"]) - math.log2(max(size, 1))), e["size"]))
    return None


def choose(capability, op, dtype, width, causal, size, needs_grad, path=None):
    """("triton" | "torch", the deciding entry or None) for one shape class on a GPU of compute
    `capability` (major, minor)."""
    best = _nearest(capability, op, dtype, width, causal, size, needs_grad, path)
    return ("triton", None) if best is None else (best["choice"], best)


def config(capability, op, dtype, width, causal, size, path=None):
    """The kernel config a sweep recorded for this shape class (its fwd+bwd entry nearest in size), or
    None when the table has none."""
    best = _nearest(capability, op, dtype, width, causal, size, True, path)
    return None if best is None else best.get("config")


def torch_backend(capability, op, dtype, width, causal, size, needs_grad, path=None):
    """"cudnn" when the table says forcing SDPA's cuDNN backend is torch's faster path for this shape
    class, else "default"."""
    best = _nearest(capability, op, dtype, width, causal, size, needs_grad, path)
    return "default" if best is None else best.get("torch_backend", "default")
