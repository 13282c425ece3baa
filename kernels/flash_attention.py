"""Flash attention (FlashAttention-2 style) forward and backward in Triton, causal and bidirectional.

Maths. For one (batch, head), S = scale * Q K^T (T x T), P = softmax(S) row-wise (causal: S[i, j] = -inf
for j > i), O = P V. The forward streams K/V tiles past a resident Q tile with the online softmax in
base 2 (s2 = S * log2(e), running max m and sum l, acc rescaled by exp2(m_old - m_new)), then writes O
and the base-2 log-sum-exp L = m + log2(l) per row; nothing T x T is stored. The backward recomputes
P = exp2(s2 - L) tile by tile, with Delta = rowsum(dO * O) precomputed:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Delta),   dQ = scale * dS K,   dK = scale * dS^T Q.
Two kernels, no atomics: `_attn_bwd_dkdv_kernel` keeps a K/V tile resident and walks the query tiles,
`_attn_bwd_dq_kernel` keeps a Q tile resident and walks the key tiles (FlashAttention-2, Sec. 3.1;
Dao 2023, arXiv:2307.08691). Causal tiles wholly above the diagonal are never visited; only the
diagonal tiles (and the ragged last tile) pay for masking.

References: Dao, "FlashAttention-2" (2023); triton-lang tutorial 06-fused-attention;
Dao-AILab/flash-attention flash_attn/flash_attn_triton.py.

Limits. q, k, v: (B, H, T, D), all the same shape (self-attention: T_q == T_k), any T >= 1, any
D <= 128 (the head-dim tile is padded to a power of 2 >= 16 with masks, so 96 runs in a 128 tile).
fp16 and bf16 on CUDA; fp32 only under the interpreter (fp32 dots miss the tensor cores, the tiles
spill registers by the kilobyte and, at D >= 96 with three stages, overflow A100 shared memory, so
dispatch sends fp32 on CUDA to SDPA and this module refuses it);
fp32 accumulation (fp32 inputs use IEEE fp32 dots, not TF32); output in the input dtype; the last
dimension must be contiguous (other strides are free; a tensor with a strided last dimension is
copied). Offsets into the (B, H) planes are int64. Deterministic (no atomics). On CPU the kernels
run only under the Triton interpreter (TRITON_INTERPRET=1 set before import; fp32/fp16 only), with
one small fixed tile configuration. On CUDA each kernel uses the config attention_configs() picks by
compute capability and head dim (none spills or overflows shared memory on sm_90 or sm_80:
tools/compile_check.py compiles them all in CI), or autotunes over a small set with
IGPT_FAST_AUTOTUNE=1.

Host side. Two launchers (_flash_attn_forward, _flash_attn_backward) hold the kernels' signatures:
in the backward q, k, v share one set of strides (views of one fused projection do; otherwise the
forward copies them) and lse, dq, dk, dv are allocated contiguous, so their strides are derived in
the kernels (the forward gets every stride: deriving or sharing them made ptxas spill in the sm_80
forward at D 96/128). The launch
plan (kernels, tiles, warps, stages; the GPU's compute capability) is cached per (device, dtype, head
dim, causal). Eager calls go through _FlashAttention (autograd.Function: check, allocate, launch);
torch.compile sees the triton_ops igpt_fast::flash_attn_fwd / _bwd (wrap_triton); launch_specs
records the same launches for tools/compile_check.py.
"""
import math
import os

import torch
import triton
import triton.language as tl

from . import _common
from ._common import INTERPRET, LOG2E


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE_DOT (fp32 inputs): IEEE fp32 products, not TF32. (A bool, not
    an input_precision string: torch.compile's analysis of a kernel cannot take a string argument.)"""
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero outside n_rows and (unless EVEN_D) outside HEAD_DIM."""
    if EVEN_D:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                    lo, hi, N_CTX, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, IEEE_DOT: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], offs_n, N_CTX, offs_d,
                       HEAD_DIM, EVEN_D)  # (BLOCK_N, BLOCK_D)
        qk = _dot(q, tl.trans(k), IEEE_DOT) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            keep = offs_n[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n, N_CTX, offs_d,
                       HEAD_DIM, EVEN_D)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, qk_scale,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     H, N_CTX,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                     CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = O + off_b * stride_ob + off_h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, N_CTX, offs_d,
                   HEAD_DIM, EVEN_D)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key tiles [0, free_hi) need no mask; [free_hi, hi) hold the diagonal and/or the ragged end.
    if CAUSAL:
        free_hi = start_m
        hi = tl.minimum(start_m + BLOCK_M, N_CTX)
    else:
        free_hi = (N_CTX // BLOCK_N) * BLOCK_N
        hi = N_CTX
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                    offs_d, 0, free_hi, N_CTX, qk_scale, False, CAUSAL, BLOCK_N,
                                    HEAD_DIM, EVEN_D, IEEE_DOT)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                    offs_d, free_hi, hi, N_CTX, qk_scale, True, CAUSAL, BLOCK_N,
                                    HEAD_DIM, EVEN_D, IEEE_DOT)

    acc = acc / l_i[:, None]
    row_ok = offs_m < N_CTX
    tl.store(LSE + off_bh * N_CTX + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                                H, N_CTX,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                                BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                   offs_m, N_CTX, offs_d, HEAD_DIM, EVEN_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                    + offs_d[None, :], offs_m, N_CTX, offs_d, HEAD_DIM, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh * N_CTX + offs_m, delta, mask=offs_m < N_CTX)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                         offs_n, offs_d, lo, hi, N_CTX, qk_scale,
                         MASKED: tl.constexpr, BLOCK_M1: tl.constexpr, HEAD_DIM: tl.constexpr,
                         EVEN_D: tl.constexpr, IEEE_DOT: tl.constexpr):
    # Query rows past N_CTX load as zeros (q, dO, L, Delta), which makes their P^T dO and dS^T Q zero.
    for start_m in range(lo, hi, BLOCK_M1):
        offs_m = start_m + tl.arange(0, BLOCK_M1)
        row_ok = offs_m < N_CTX
        q = _load_tile(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, N_CTX, offs_d,
                       HEAD_DIM, EVEN_D)  # (BLOCK_M1, BLOCK_D)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        qk_t = _dot(k, tl.trans(q), IEEE_DOT) * qk_scale  # (BLOCK_N1, BLOCK_M1)
        p_t = tl.exp2(qk_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = _load_tile(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], offs_m, N_CTX, offs_d,
                        HEAD_DIM, EVEN_D)  # (BLOCK_M1, BLOCK_D)
        dv += _dot(p_t.to(do.dtype), do, IEEE_DOT)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dp_t = _dot(v, tl.trans(do), IEEE_DOT)  # (BLOCK_N1, BLOCK_M1)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, IEEE_DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale, stride_b, stride_h, stride_t,
                          stride_dob, stride_doh, stride_dot, H, N_CTX,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                          CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr,
                          BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N1
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    qk_scale = sm_scale * LOG2E
    q_base = Q + off_b * stride_b + off_h * stride_h
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = LSE + off_bh * N_CTX
    delta_base = DELTA + off_bh * N_CTX

    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + off_b * stride_b + off_h * stride_h + offs_n[:, None] * stride_t + offs_d[None, :],
                   offs_n, N_CTX, offs_d, HEAD_DIM, EVEN_D)  # (BLOCK_N1, BLOCK_D)
    v = _load_tile(V + off_b * stride_b + off_h * stride_h + offs_n[:, None] * stride_t + offs_d[None, :],
                   offs_n, N_CTX, offs_d, HEAD_DIM, EVEN_D)  # (BLOCK_N1, BLOCK_D)
    dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)

    # Causal: query tiles [start_n, start_n + BLOCK_N1) straddle the diagonal (masked); the later
    # ones see every key of this tile; the earlier ones see none and are skipped.
    if CAUSAL:
        diag_hi = start_n + BLOCK_N1
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_t,
                                      stride_dot, offs_n, offs_d, start_n, tl.minimum(diag_hi, N_CTX),
                                      N_CTX, qk_scale, True, BLOCK_M1, HEAD_DIM, EVEN_D, IEEE_DOT)
    else:
        diag_hi = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_t,
                                  stride_dot, offs_n, offs_d, diag_hi, N_CTX, N_CTX, qk_scale, False,
                                  BLOCK_M1, HEAD_DIM, EVEN_D, IEEE_DOT)

    dk *= sm_scale
    row_ok = offs_n[:, None] < N_CTX
    if not EVEN_D:
        row_ok = row_ok & (offs_d[None, :] < HEAD_DIM)
    out_offs = off_bh * N_CTX * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # DK, DV contiguous
    dk_ptrs = DK + out_offs
    dv_ptrs = DV + out_offs
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=row_ok)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                       lo, hi, N_CTX, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N2: tl.constexpr,
                       HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, IEEE_DOT: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N2):
        offs_n = start_n + tl.arange(0, BLOCK_N2)
        k = _load_tile(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], offs_n, N_CTX, offs_d,
                       HEAD_DIM, EVEN_D)  # (BLOCK_N2, BLOCK_D)
        v = _load_tile(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n, N_CTX, offs_d,
                       HEAD_DIM, EVEN_D)  # (BLOCK_N2, BLOCK_D)
        qk = _dot(q, tl.trans(k), IEEE_DOT) * qk_scale  # (BLOCK_M2, BLOCK_N2)
        p = tl.exp2(qk - lse[:, None])
        if MASKED:
            keep = offs_n[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE_DOT)  # (BLOCK_M2, BLOCK_N2)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE_DOT)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, sm_scale, stride_b, stride_h, stride_t,
                        stride_dob, stride_doh, stride_dot, H, N_CTX,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                        CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr,
                        BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M2
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    qk_scale = sm_scale * LOG2E
    k_base = K + off_b * stride_b + off_h * stride_h
    v_base = V + off_b * stride_b + off_h * stride_h

    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_CTX
    q = _load_tile(Q + off_b * stride_b + off_h * stride_h + offs_m[:, None] * stride_t + offs_d[None, :],
                   offs_m, N_CTX, offs_d, HEAD_DIM, EVEN_D)  # (BLOCK_M2, BLOCK_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                    + offs_d[None, :], offs_m, N_CTX, offs_d, HEAD_DIM, EVEN_D)  # (BLOCK_M2, BLOCK_D)
    lse = tl.load(LSE + off_bh * N_CTX + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + off_bh * N_CTX + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        free_hi = start_m
        hi = tl.minimum(start_m + BLOCK_M2, N_CTX)
    else:
        free_hi = (N_CTX // BLOCK_N2) * BLOCK_N2
        hi = N_CTX
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_t, stride_t, offs_m, offs_d,
                            0, free_hi, N_CTX, qk_scale, False, CAUSAL, BLOCK_N2, HEAD_DIM, EVEN_D,
                            IEEE_DOT)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_t, stride_t, offs_m, offs_d,
                            free_hi, hi, N_CTX, qk_scale, True, CAUSAL, BLOCK_N2, HEAD_DIM, EVEN_D,
                            IEEE_DOT)

    dq *= sm_scale
    mask = row_ok[:, None]
    if not EVEN_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    dq_ptrs = DQ + off_bh * N_CTX * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # DQ contiguous
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)


# Tile configurations. The causal loop bounds need BLOCK_M % BLOCK_N == 0 (forward, dQ) and
# BLOCK_N1 % BLOCK_M1 == 0 (dK/dV); every config below keeps that. On CUDA each kernel uses the fixed
# config attention_configs() picks by compute capability and head-dim tile, unless
# IGPT_FAST_AUTOTUNE=1 (read at import), which autotunes over _TUNE_SETS (keyed on T, D and causal;
# the first call per key pays for the tuning). The interpreter uses one small fixed config
# (autotuning there would only burn CPU) that still gives several tiles per row at T = 100.
_AUTOTUNE = os.environ.get("IGPT_FAST_AUTOTUNE") == "1"
_BLOCK_NAMES = dict(fwd=("BLOCK_M", "BLOCK_N"), dkdv=("BLOCK_M1", "BLOCK_N1"), dq=("BLOCK_M2", "BLOCK_N2"))
_INTERPRET_CONFIGS = dict(fwd=(64, 32, 4, 1), dkdv=(32, 64, 4, 1), dq=(64, 32, 4, 1))
# (block rows, block cols, num_warps, num_stages) for fwd (BLOCK_M, BLOCK_N), dkdv (BLOCK_M1, BLOCK_N1)
# and dq (BLOCK_M2, BLOCK_N2), by target and BLOCK_D. Rule: no register spill, with a margin below
# ptxas' 255-register cap in both fp16 and bf16, causal or not (benchmarks/results/compile_check.md).
# Where a tile spilled (or sat at the cap) with 4 warps, it keeps its shape and gets 8 warps (half
# the accumulator registers per thread) or one pipeline stage less, so the work split is unchanged:
# sm_90 dK/dV at D64 (4 -> 8 warps); sm_80 forward at D64 (4 -> 8 warps) and D128 (3 -> 2 stages),
# dK/dV at D64 and D128 and dQ at D64 (4 -> 8 warps).
_DEFAULT_CONFIGS = {
    "sm90": {
        32: dict(fwd=(128, 64, 4, 3), dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3)),
        64: dict(fwd=(128, 64, 4, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 4, 3)),
        128: dict(fwd=(128, 64, 8, 3), dkdv=(32, 64, 4, 3), dq=(64, 32, 4, 3)),
    },
    "sm80": {
        32: dict(fwd=(128, 64, 4, 3), dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3)),
        64: dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3)),
        128: dict(fwd=(128, 64, 8, 2), dkdv=(32, 64, 8, 3), dq=(64, 32, 4, 3)),
    },
}
_TUNE_SETS = dict(
    fwd=[(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    dkdv=[(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
    dq=[(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
)
_PREPROCESS_CONFIG = dict(BLOCK_M=64, num_warps=4)
_KERNELS = dict(fwd=_attn_fwd_kernel, dkdv=_attn_bwd_dkdv_kernel, dq=_attn_bwd_dq_kernel)
_TUNED = {name: triton.autotune(
    configs=[triton.Config(dict(zip(_BLOCK_NAMES[name], (r, c))), num_warps=w, num_stages=st)
             for r, c, w, st in _TUNE_SETS[name]],
    key=["N_CTX", "HEAD_DIM", "CAUSAL"])(kernel) for name, kernel in _KERNELS.items()}


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


def attention_configs(capability, head_dim):
    """Launch keywords of each attention kernel ("fwd", "dkdv", "dq", "pre") on a GPU of compute
    `capability` (major, minor) at `head_dim`; capability None: the interpreter's small tiles. The
    launchers and tools/compile_check.py both call this, so CI compiles exactly what runs."""
    if capability is None:
        tiles = _INTERPRET_CONFIGS
    else:
        tiles = _DEFAULT_CONFIGS[attention_target(capability)][min(128, max(32, _block_d(head_dim)))]
    return dict({name: _config(name, tile) for name, tile in tiles.items()}, pre=dict(_PREPROCESS_CONFIG))


def attention_tune_configs(name):
    """Launch keywords of every config in kernel `name`'s autotune set (IGPT_FAST_AUTOTUNE=1)."""
    return [_config(name, tile) for tile in _TUNE_SETS[name]]


def _make_plan(configs, dtype, head_dim, causal):
    """The launch plan of one shape class: name -> (kernel, tile along the grid's first axis, launch
    keywords). configs: attention_configs' form, or None for the autotuned kernels (whose tile is the
    name of the block keyword, read from the chosen config)."""
    block_d = _block_d(head_dim)
    shape = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=block_d == head_dim)
    pre = configs["pre"] if configs is not None else _PREPROCESS_CONFIG
    plan = dict(pre=(_attn_bwd_preprocess_kernel, pre["BLOCK_M"], dict(shape, **pre)))
    meta = dict(shape, CAUSAL=bool(causal), IEEE_DOT=dtype == torch.float32)
    for name, axis in (("fwd", "BLOCK_M"), ("dkdv", "BLOCK_N1"), ("dq", "BLOCK_M2")):
        if configs is None:
            plan[name] = (_TUNED[name], axis, meta)
        else:
            plan[name] = (_KERNELS[name], configs[name][axis], dict(meta, **configs[name]))
    return plan


_PLANS = {}  # (device index, dtype, head dim, causal) -> launch plan


def _plan_for(q, causal):
    """The cached launch plan for q's device (its compute capability, read once), dtype, head dim and
    causal flag: built on the first call of a shape class, a dict lookup after that."""
    key = (q.get_device(), q.dtype, q.shape[-1], causal)
    plan = _PLANS.get(key)
    if plan is None:
        if INTERPRET and not q.is_cuda:
            configs = attention_configs(None, q.shape[-1])
        elif _AUTOTUNE:
            configs = None
        else:
            configs = attention_configs(torch.cuda.get_device_capability(q.device), q.shape[-1])
        plan = _PLANS[key] = _make_plan(configs, q.dtype, q.shape[-1], causal)
    return plan


def _grid(T, BH, tile):
    """(tiles along T, B * H); tile a keyword name for the autotuned kernels (grid from their config)."""
    if isinstance(tile, int):
        return (-(-T // tile), BH)
    return lambda meta: (triton.cdiv(T, meta[tile]), BH)


def _check_inputs(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"flash_attention: q, k, v must share one (B, H, T, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention: q, k, v must share a dtype among fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("flash_attention: q, k, v must be on one device")
    if q.shape[2] < 1 or not 1 <= q.shape[3] <= 128:
        raise ValueError(f"flash_attention: need T >= 1 and 1 <= D <= 128, got T={q.shape[2]}, D={q.shape[3]}")
    if q.is_cuda and q.dtype == torch.float32:
        raise ValueError("flash_attention: fp32 on CUDA is not supported (fp32 tiles spill registers and "
                         "miss the tensor cores); use fp16/bf16 inputs or impl='torch'")
    _common.check_device("flash_attention", q)


def _shared_layout(q, k, v):
    """q, k, v with one set of strides and a contiguous last dimension (the kernels take one set):
    as given when they already have it (separate tensors, or views of one fused projection), else copies."""
    s = q.stride()
    if s[3] == 1 and k.stride() == s and v.stride() == s:
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _attn_fwd(q, k, v, scale, plan, launch):
    """Allocate o (B, H, T, D) in q's dtype and the base-2 LSE (B, H, T) fp32; launch the forward.
    q, k, v share their strides (_shared_layout). The forward kernel's signature lives here."""
    B, H, T, D = q.shape
    o = _common.empty(q, (B, H, T, D))
    lse = _common.empty(q, (B, H, T), torch.float32)
    if B * H:
        kernel, tile, meta = plan["fwd"]
        args = (q, k, v, o, lse, scale * LOG2E.value, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                *o.stride()[:3], H, T)
        launch(kernel, _grid(T, B * H, tile), args, meta)
    return o, lse


def _attn_bwd(do, q, k, v, o, lse, scale, plan, launch):
    """Launch Delta = rowsum(dO * O), then dK/dV, then dQ. Returns dq, dk, dv (B, H, T, D), contiguous,
    in q's dtype. The three backward kernels' signatures live here."""
    B, H, T, D = q.shape
    dq, dk, dv = (_common.empty(q, (B, H, T, D)) for _ in range(3))
    if B * H == 0:
        return dq, dk, dv
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = _common.empty(lse, (B, H, T))  # fp32: rowsum(dO * O)
    BH = B * H
    sb, sh, st, _ = q.stride()
    sdb, sdh, sdt, _ = do.stride()
    kernel, tile, meta = plan["pre"]
    launch(kernel, (-(-T // tile), BH), (o, do, delta, *o.stride()[:3], sdb, sdh, sdt, H, T), meta)
    kernel, tile, meta = plan["dkdv"]
    launch(kernel, _grid(T, BH, tile), (q, k, v, do, dk, dv, lse, delta, scale, sb, sh, st, sdb, sdh, sdt, H, T),
           meta)
    kernel, tile, meta = plan["dq"]
    launch(kernel, _grid(T, BH, tile), (q, k, v, do, dq, lse, delta, scale, sb, sh, st, sdb, sdh, sdt, H, T), meta)
    return dq, dk, dv


def _flash_attn_forward(q, k, v, causal, scale, launch=None):
    """The forward launcher: check, lay out, allocate, launch (eagerly unless `launch` says otherwise).
    Returns o, the base-2 LSE and the q, k, v the kernels read (to save for the backward)."""
    _check_inputs(q, k, v)
    q, k, v = _shared_layout(q, k, v)
    o, lse = _attn_fwd(q, k, v, scale, _plan_for(q, causal), launch or _common.launch)
    return o, lse, q, k, v


def _flash_attn_backward(do, q, k, v, o, lse, causal, scale, launch=None):
    """The backward launcher over the forward's saved q, k, v, o, lse: dq, dk, dv."""
    return _attn_bwd(do, q, k, v, o, lse, scale, _plan_for(q, causal), launch or _common.launch)


def launch_specs(q, causal, configs):
    """Every launch one forward + backward over q-shaped (B, H, T, D) inputs makes with `configs`
    (attention_configs' form), in order, recorded from the launchers themselves: [(kernel, grid, args,
    keywords)]. For tools/compile_check.py, which compiles them for GPUs this machine lacks."""
    specs = []

    def record(*spec):
        specs.append(spec)

    plan = _make_plan(configs, q.dtype, q.shape[-1], causal)
    scale = 1.0 / math.sqrt(q.shape[-1])
    o, lse = _attn_fwd(q, q, q, scale, plan, record)
    _attn_bwd(torch.empty_like(q), q, q, q, o, lse, scale, plan, record)
    return specs


class _FlashAttention(torch.autograd.Function):
    """Eager calls: the launchers and nothing else."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse, q, k, v = _flash_attn_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return (*_flash_attn_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale), None, None)


@_common.kernel_op("igpt_fast::flash_attn_fwd")
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse, _, _, _ = _flash_attn_forward(q, k, v, causal, scale, _common.launch_traceable)
    return o, lse


@_common.kernel_op("igpt_fast::flash_attn_bwd")
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _shared_layout(q, k, v)
    return _flash_attn_backward(do, q, k, v, o, lse, causal, scale, _common.launch_traceable)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _fwd_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_flash_attn_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def flash_attention(q, k, v, causal=True, scale=None):
    """Triton flash attention over (B, H, T, D) q, k, v; differentiable. Eagerly the autograd.Function;
    under torch.compile the triton_op, so the compiled graph holds the Triton kernels."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return _flash_attn_fwd_op(q, k, v, bool(causal), scale)[0]
    return _FlashAttention.apply(q, k, v, bool(causal), scale)
