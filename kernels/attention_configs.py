"""Attention launch configurations: the tile tables, the kernel variants and their validation.

What `kernels/flash_attention.py` launches is described by a config dict of the keys below (tiles per
kernel and the variants bwd / order / io); this module holds the built-in tables (by GPU target and
head dim, chosen by `make compile-check`'s rules), the autotune sets the GPU sweep times, and
`attention_configs`, which turns a partial config into every kernel's launch keywords. Pure data and
checks: no Triton kernel, so tools and benchmarks can read it cheaply, and flash_attention.py keeps
the kernels and their launchers.
"""
import json
import os

import triton


# Tile configurations and variants. The causal loop bounds need BLOCK_M % BLOCK_N == 0 (forward, dQ)
# and BLOCK_N1 % BLOCK_M1 == 0 (dK/dV, fused); every config below keeps that. A config is a dict:
#   fwd, dkdv, dq, fused: (block rows, block cols, num_warps, num_stages) of each kernel (fused: the
#       dK/dV kernel with dQ added atomically, (BLOCK_M1, BLOCK_N1));
#   bwd: "split" (dK/dV kernel + dQ kernel, deterministic) | "fused_atomic" (one pass per K/V tile);
#   order: "natural" (grid (tiles, B * H)) | "heavy_first" (grid (B * H, tiles), heaviest causal tiles
#       of every head first);
#   io: "pointer" (masked tl.load / tl.store) | "tma" (tensor descriptors built in the kernel over each
#       (batch, head) plane, flash_attention._rows: TMA copies; sm_90 on, "pointer" below) for the forward and the
#       split backward. The fused backward keeps pointer I/O: with descriptors on sm_90 (triton 3.9)
#       its 32-row tiles lost the tensor cores for the dQ product (M = 32 < wgmma's 64) and every 64-row
#       tile tried spilled at D 128 (seven choices of columns, warps and stages: 164-8328 B; at D 64 one
#       stage fits). A launch whose tensors break TMA's alignment rules (flash_attention._tma_meta) uses
#       pointer I/O.
# Where it comes from, first match wins: use_configs() (benchmarks, the GPU sweep), the environment
# variable IGPT_FAST_ATTENTION_CONFIG (JSON of any of those keys, read when a plan is built, e.g.
# '{"bwd": "fused_atomic", "fwd": [128, 64, 8, 3]}'), the per-GPU defaults table's "config" for the
# shape class (written by benchmarks/gpu_sweep.sh), then the built-in table below; keys a source
# lacks come from the next. IGPT_FAST_AUTOTUNE=1 (read at import) autotunes the tiles over
# _TUNE_SETS instead (keyed on T, D, causal and the variant; the first call per key pays for it).
# The interpreter uses one small fixed tile set (autotuning there would only burn CPU) that still
# gives several tiles per row at T = 100.
#
# Predicted effects on an H100/H200 (bf16, fwd+bwd; unmeasured until a GPU sweep times them):
#   bwd="fused_atomic": five matmuls per (query tile, key tile) pair instead of seven, K/V read once
#       instead of twice; fp32 atomics on dQ and a zero-fill + cast pass cost some of it back. Backward
#       +15-25% at D 64, T >= 4096; less at D 128 (the dQ tile adds registers) and at T = 1024 (the
#       extra passes weigh more). Not deterministic (the order of the atomic adds varies).
#   order="heavy_first": causal only; the longest programs start first so the last wave is short.
#       +3-8% at T = 1024 causal (8-16 tiles per head), within noise at T >= 4096 or non-causal.
#   acc = tl.dot(p, v, acc) and the scale folded into the exponent's multiply-add (all variants):
#       +2-5% forward.
#   io="tma" (sm_90): Q/K/V/dO tiles arrive by TMA into shared memory, with no address arithmetic or
#       masks in registers (most registers per thread over dtypes, head dims and causal, triton 3.9 / 3.6:
#       forward 187 / 188 -> 138, dK/dV 239 / 248 -> 212 / 226, dQ 182 / 203 -> 163 / 168): +5-10% forward
#       at D 128 and T >= 4096, less at D 64; backward within +-5%.
#       Automatic warp specialisation (tl.range(warp_specialize=True), FlashAttention-3's producer /
#       consumer split) is not offered: on this forward Triton 3.6 and 3.9 fail an assertion in their
#       warp-specialisation pass at 4 warps and leave the loop unspecialised at 8.
#   sm_90 forward at D 32/64 on 8 warps instead of 4: triton 3.6 gave the 4-warp tile 255 registers
#       (at ptxas' cap); 8 warps hold it in ~115. +5-10% forward at D 64 with triton 3.6.
_CONFIG_ENV = "IGPT_FAST_ATTENTION_CONFIG"
_TILE_KEYS = ("fwd", "dkdv", "dq", "fused")
_VARIANTS = dict(bwd=("split", "fused_atomic"), order=("natural", "heavy_first"), io=("pointer", "tma"))
_BASE_VARIANTS = dict(bwd="split", order="natural", io="pointer")  # what a GPU has measured
_BLOCK_NAMES = dict(fwd=("BLOCK_M", "BLOCK_N"), dkdv=("BLOCK_M1", "BLOCK_N1"), dq=("BLOCK_M2", "BLOCK_N2"),
                    fused=("BLOCK_M1", "BLOCK_N1"))
_INTERPRET_CONFIGS = dict(fwd=(64, 32, 4, 1), dkdv=(32, 64, 4, 1), dq=(64, 32, 4, 1), fused=(32, 64, 4, 1),
                          **_BASE_VARIANTS)
# By target and BLOCK_D. Rule: no register spill, with a margin below ptxas' 255-register cap in
# both fp16 and bf16, causal or not, with triton 3.6 and 3.9 (benchmarks/results/compile_check*.md).
# Where a tile spilled (or sat at the cap) with 4 warps, it keeps its shape and gets 8 warps (half
# the accumulator registers per thread) or one pipeline stage less, so the work split is unchanged:
# sm_90 forward at D32/64 and dK/dV at D64 (4 -> 8 warps); sm_80 forward at D64 (4 -> 8 warps) and
# D128 (3 -> 2 stages), dK/dV at D32, D64 and D128, dQ at D64 and the fused backward at D96/128 (4 -> 8
# warps: (32, 64, 4, 2) spilled 24-36 B at D96 on both triton versions). The variants stay at
# the ones a GPU measured (split, natural, pointer) until a sweep's table entry names others.
_DEFAULT_CONFIGS = {
    "sm90": {
        32: dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3), fused=(64, 128, 8, 2)),
        64: dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 4, 3), fused=(64, 128, 8, 2)),
        128: dict(fwd=(128, 64, 8, 3), dkdv=(32, 64, 4, 3), dq=(64, 32, 4, 3), fused=(64, 64, 8, 2)),
    },
    "sm80": {
        32: dict(fwd=(128, 64, 4, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 4, 3), fused=(32, 64, 4, 2)),
        64: dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3), fused=(32, 64, 4, 2)),
        128: dict(fwd=(128, 64, 8, 2), dkdv=(32, 64, 8, 3), dq=(64, 32, 4, 3), fused=(32, 64, 8, 2)),
    },
}
# The autotune sets, and the tiles the GPU sweep times (benchmarks/bench_attention.py --sweep).
_TUNE_SETS = dict(
    fwd=[(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    dkdv=[(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
    dq=[(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
    fused=[(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2)],
)
_PREPROCESS_CONFIG = dict(BLOCK_M=64, num_warps=4)


def _config(name, tile):
    """(rows, cols, num_warps, num_stages) of kernel `name` -> its launch keywords."""
    r, c, w, st = tile
    return dict(zip(_BLOCK_NAMES[name], (r, c)), num_warps=w, num_stages=st)


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def attention_target(capability):
    """The config table a GPU of compute capability (major, minor) uses: "sm90" (Hopper: 227 KiB of
    shared memory per block) or "sm80" (Ampere and the rest)."""
    return "sm90" if capability[0] == 9 else "sm80"


def check_config(config, where="attention config"):
    """Raise a readable ValueError unless `config` (a dict of the keys above, any subset) is valid."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a dict, got {config!r}")
    for key, value in config.items():
        if key in _VARIANTS:
            if value not in _VARIANTS[key]:
                raise ValueError(f"{where}: {key} must be one of {_VARIANTS[key]}, got {value!r}")
        elif key in _TILE_KEYS:
            if (not isinstance(value, (list, tuple)) or len(value) != 4
                    or not all(isinstance(x, int) and x > 0 for x in value)):
                raise ValueError(f"{where}: {key} must be (rows, cols, num_warps, num_stages), got {value!r}")
            rows, cols = value[:2]
            if key in ("fwd", "dq") and rows % cols or key in ("dkdv", "fused") and cols % rows:
                raise ValueError(f"{where}: {key} tile {rows} x {cols}: the causal bounds need "
                                 f"{'rows % cols' if key in ('fwd', 'dq') else 'cols % rows'} == 0")
        else:
            raise ValueError(f"{where}: unknown key {key!r}; keys: {_TILE_KEYS + tuple(_VARIANTS)}")
    return config


def attention_configs(capability, head_dim, override=None):
    """Launch keywords of each attention kernel ("fwd", "dkdv", "dq", "fused", "pre") and the variants
    ("bwd", "order", "io") on a GPU of compute `capability` (major, minor) at `head_dim`; capability None:
    the interpreter's small tiles. `override`: a config dict (any subset of the keys) replacing the
    built-in entries. The launchers and tools/compile_check.py both call this, so CI compiles exactly
    what runs. io "tma" below sm_90 (no TMA unit) becomes "pointer": there the descriptors would only
    be lowered to plain loads with more registers (the sm_80 forward at D 96/128 reached 255 in the
    compile-check tables of commit 1e0dedc)."""
    if capability is None:
        tiles = dict(_INTERPRET_CONFIGS)
    else:
        tiles = dict(_DEFAULT_CONFIGS[attention_target(capability)][min(128, max(32, _block_d(head_dim)))],
                     **_BASE_VARIANTS)
    tiles.update(check_config(dict(override or {})))
    if capability is not None and capability[0] < 9:
        tiles["io"] = "pointer"
    configs = {name: _config(name, tiles[name]) for name in _TILE_KEYS}
    return dict(configs, pre=dict(_PREPROCESS_CONFIG), **{key: tiles[key] for key in _VARIANTS})


def attention_tune_configs(name):
    """Launch keywords of every config in kernel `name`'s autotune set (IGPT_FAST_AUTOTUNE=1)."""
    return [_config(name, tile) for tile in _TUNE_SETS[name]]


def attention_tune_tiles(name):
    """The (rows, cols, num_warps, num_stages) tiles of kernel `name`'s autotune set: what the GPU
    sweep times."""
    return list(_TUNE_SETS[name])


def _env_config():
    text = os.environ.get(_CONFIG_ENV)
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{_CONFIG_ENV} is not JSON ({err}): {text!r}") from None
    return check_config(config, _CONFIG_ENV)
