"""Flash attention (FlashAttention-2 style) forward and backward in Triton, causal and bidirectional.

Maths. For one (batch, head), S = scale * Q K^T (T x T), P = softmax(S) row-wise (causal: S[i, j] = -inf
for j > i), O = P V. The forward streams K/V tiles past a resident Q tile with the online softmax in
base 2 (s2 = S * log2(e), running max m and sum l, acc rescaled by exp2(m_old - m_new)), then writes O
and the base-2 log-sum-exp L = m + log2(l) per row; nothing T x T is stored. The backward recomputes
P = exp2(s2 - L) tile by tile, with Delta = rowsum(dO * O) precomputed:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Delta),   dQ = scale * dS K,   dK = scale * dS^T Q.
Two backward variants (the launch plan's "bwd"). "split", deterministic: `_attn_bwd_dkdv_kernel` keeps
a K/V tile resident and walks the query tiles, `_attn_bwd_dq_kernel` keeps a Q tile resident and walks
the key tiles (FlashAttention-2, Sec. 3.1; Dao 2023, arXiv:2307.08691): seven matmuls per tile pair.
"fused_atomic": the dK/dV kernel also computes dQ's share of each query tile and adds it, in fp32,
with relaxed atomics (as FlashAttention-2's own backward and FlashAttention-3 do): five matmuls, K/V
read once. Both scale scores into base 2 in the exponent's multiply-add, exp2(S * c - L) with
c = scale * log2(e), as the forward does. The grid order (the plan's "order"): "natural" or
"heavy_first" (the causal tiles that do the most work start first, so the last wave is short). The
I/O (the plan's "io"): "pointer" (masked loads and stores) or "tma" (forward and split backward: each
(batch, head) plane read and written through a tensor descriptor built in the kernel, TMA copies on
sm_90, bounded by the plane so ragged tiles need no masks).
Causal tiles wholly above the diagonal are never visited; only the diagonal tiles (and the ragged
last tile) pay for masking.

References: Dao, "FlashAttention-2" (2023); triton-lang tutorial 06-fused-attention;
Dao-AILab/flash-attention flash_attn/flash_attn_triton.py.

Limits. q, k, v: (B, H, T, D), all the same shape (self-attention: T_q == T_k), any T >= 1, any
D <= 128 (the head-dim tile is padded to a power of 2 >= 16 with masks, so 96 runs in a 128 tile).
fp16 and bf16 on CUDA; fp32 only under the interpreter (fp32 dots miss the tensor cores, the tiles
spill registers by the kilobyte and, at D >= 96 with three stages, overflow A100 shared memory, so
dispatch sends fp32 on CUDA to SDPA and this module refuses it);
fp32 accumulation (fp32 inputs use IEEE fp32 dots, not TF32); output in the input dtype; the last
dimension must be contiguous (other strides are free; a tensor with a strided last dimension is
copied). Offsets into the (B, H) planes are int64. Deterministic with bwd="split" (the built-in
default); bwd="fused_atomic" sums dQ in an order that varies from run to run. scale > 0. On CPU the kernels
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
from .attention_configs import (_BLOCK_NAMES, _TUNE_SETS, _block_d, _env_config, attention_configs,  # noqa: F401
                                attention_tune_configs, attention_tune_tiles, check_config)


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE_DOT (fp32 inputs): IEEE fp32 products, not TF32. (A bool, not
    an input_precision string: torch.compile's analysis of a kernel cannot take a string argument.)"""
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _dot_acc(a, b, acc, IEEE_DOT: tl.constexpr):
    """acc + a @ b accumulated inside the matmul (the tensor cores add into acc; no separate add)."""
    if IEEE_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _tile_index(HEAVY_FIRST: tl.constexpr, HEAVY_LAST_TILE: tl.constexpr):
    """(tile index along T, b * H + h) of this program. Natural order: grid (tiles, B * H), tiles of
    one head launch together. HEAVY_FIRST: grid (B * H, tiles), every head's tile of one index launches
    together, the heaviest causal tiles first (HEAVY_LAST_TILE: the last tile is the heaviest, as in
    the forward and dQ, whose last query tiles see every key; dK/dV's first key tiles are heaviest)."""
    if HEAVY_FIRST:
        tile = tl.program_id(1)
        if HEAVY_LAST_TILE:
            tile = tl.num_programs(1) - 1 - tile
        return tile, tl.program_id(0).to(tl.int64)
    return tl.program_id(0), tl.program_id(1).to(tl.int64)


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero outside n_rows and (unless EVEN_D) outside HEAD_DIM."""
    if EVEN_D:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _rows(base, n_rows, stride_t, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
          TMA: tl.constexpr):
    """Where a (n_rows, HEAD_DIM) plane of one (batch, head) is read or written in BLOCK_R-row tiles: its
    base pointer (io "pointer"), or a tensor descriptor over it (io "tma": on sm_90 the loads and stores
    are TMA copies, bounded by the plane, so rows past n_rows and columns past HEAD_DIM read as zeros
    and are never written; elsewhere Triton lowers them to plain loads). Built in the kernel, so the
    signature is the same for both (the descriptors live in a small global scratch Triton allocates)."""
    if TMA:
        rows = tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_t, 1],
                                         block_shape=[BLOCK_R, BLOCK_D])
    else:
        rows = base
    return rows


@triton.jit
def _load_rows(src, start, stride_t, n_rows, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr):
    """The (BLOCK_R, BLOCK_D) tile of rows [start, start + BLOCK_R) of _rows' `src`, zero outside."""
    if TMA:
        tile = src.load([start, 0])
    else:
        offs = start + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        tile = _load_tile(src + offs[:, None] * stride_t + offs_d[None, :], offs, n_rows, offs_d, HEAD_DIM, EVEN_D)
    return tile


@triton.jit
def _store_rows(dst, start, value, stride_t, n_rows, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr):
    """Store a (BLOCK_R, BLOCK_D) tile as rows [start, start + BLOCK_R) of _rows' `dst`, inside only."""
    if TMA:
        dst.store([start, 0], value)
    else:
        offs = start + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        mask = offs[:, None] < n_rows
        if not EVEN_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tl.store(dst + offs[:, None] * stride_t + offs_d[None, :], value, mask=mask)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, offs_m,
                    lo, hi, N_CTX, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                    IEEE_DOT: tl.constexpr, TMA: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_rows(k_src, start_n, stride_kt, N_CTX, BLOCK_N, HEAD_DIM, BLOCK_D, EVEN_D, TMA)  # (BLOCK_N, BLOCK_D)
        qk = _dot(q, tl.trans(k), IEEE_DOT)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            keep = offs_n[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # base 2 (qk_scale > 0)
        p = tl.exp2(qk * qk_scale - m_new[:, None])  # the scale folded into one multiply-add
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_rows(v_src, start_n, stride_vt, N_CTX, BLOCK_N, HEAD_DIM, BLOCK_D, EVEN_D, TMA)  # (BLOCK_N, BLOCK_D)
        acc = _dot_acc(p.to(v.dtype), v, acc, IEEE_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, qk_scale,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     H, N_CTX,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                     CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr, HEAVY_FIRST: tl.constexpr,
                     TMA: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile, off_bh = _tile_index(HEAVY_FIRST, True)
    start_m = tile * BLOCK_M
    off_b = off_bh // H
    off_h = off_bh % H
    q_src = _rows(Q + off_b * stride_qb + off_h * stride_qh, N_CTX, stride_qt, BLOCK_M, HEAD_DIM, BLOCK_D, TMA)
    k_src = _rows(K + off_b * stride_kb + off_h * stride_kh, N_CTX, stride_kt, BLOCK_N, HEAD_DIM, BLOCK_D, TMA)
    v_src = _rows(V + off_b * stride_vb + off_h * stride_vh, N_CTX, stride_vt, BLOCK_N, HEAD_DIM, BLOCK_D, TMA)
    o_dst = _rows(O + off_b * stride_ob + off_h * stride_oh, N_CTX, stride_ot, BLOCK_M, HEAD_DIM, BLOCK_D, TMA)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_src, start_m, stride_qt, N_CTX, BLOCK_M, HEAD_DIM, BLOCK_D, EVEN_D, TMA)  # (BLOCK_M, BLOCK_D)
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
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, offs_m,
                                    0, free_hi, N_CTX, qk_scale, False, CAUSAL, BLOCK_N,
                                    HEAD_DIM, BLOCK_D, EVEN_D, IEEE_DOT, TMA)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, offs_m,
                                    free_hi, hi, N_CTX, qk_scale, True, CAUSAL, BLOCK_N,
                                    HEAD_DIM, BLOCK_D, EVEN_D, IEEE_DOT, TMA)

    acc = acc / l_i[:, None]
    tl.store(LSE + off_bh * N_CTX + offs_m, m_i + tl.log2(l_i), mask=offs_m < N_CTX)
    _store_rows(o_dst, start_m, acc.to(O.dtype.element_ty), stride_ot, N_CTX, BLOCK_M, HEAD_DIM, BLOCK_D, EVEN_D,
                TMA)


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
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                         offs_n, lo, hi, N_CTX, qk_scale, sm_scale,
                         MASKED: tl.constexpr, BLOCK_M1: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IEEE_DOT: tl.constexpr,
                         FUSED_DQ: tl.constexpr, TMA: tl.constexpr):
    # Query rows past N_CTX load as zeros (q, dO, L, Delta), which makes their P^T dO and dS^T Q zero.
    # FUSED_DQ: also dQ += scale * dS K for this query tile, added atomically into the fp32 dq_base
    # (five matmuls per tile pair instead of the split kernels' seven).
    for start_m in range(lo, hi, BLOCK_M1):
        offs_m = start_m + tl.arange(0, BLOCK_M1)
        row_ok = offs_m < N_CTX
        q = _load_rows(q_src, start_m, stride_qt, N_CTX, BLOCK_M1, HEAD_DIM, BLOCK_D, EVEN_D, TMA)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        qk_t = _dot(k, tl.trans(q), IEEE_DOT)  # (BLOCK_N1, BLOCK_M1)
        p_t = tl.exp2(qk_t * qk_scale - lse[None, :])  # one multiply-add
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = _load_rows(do_src, start_m, stride_dot, N_CTX, BLOCK_M1, HEAD_DIM, BLOCK_D, EVEN_D, TMA)
        dv = _dot_acc(p_t.to(do.dtype), do, dv, IEEE_DOT)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dp_t = _dot(v, tl.trans(do), IEEE_DOT)  # (BLOCK_N1, BLOCK_M1)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = _dot_acc(ds_t, q, dk, IEEE_DOT)
        if FUSED_DQ:
            dq = _dot(tl.trans(ds_t), k, IEEE_DOT) * sm_scale  # (BLOCK_M1, BLOCK_D)
            offs_d = tl.arange(0, BLOCK_D)
            dq_mask = row_ok[:, None]
            if not EVEN_D:
                dq_mask = dq_mask & (offs_d[None, :] < HEAD_DIM)
            tl.atomic_add(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=dq_mask,
                          sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, sm_scale, stride_b, stride_h, stride_t,
                          stride_dob, stride_doh, stride_dot, H, N_CTX,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                          CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr, HEAVY_FIRST: tl.constexpr,
                          FUSED_DQ: tl.constexpr, TMA: tl.constexpr,
                          BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr):
    """dK, dV of one key tile; with FUSED_DQ also dQ, accumulated in fp32 in DQ (zeroed by the host)
    with relaxed atomic adds (bwd="fused_atomic"; DQ unused otherwise)."""
    tile, off_bh = _tile_index(HEAVY_FIRST, False)
    start_n = tile * BLOCK_N1
    off_b = off_bh // H
    off_h = off_bh % H
    qk_scale = sm_scale * LOG2E
    q_src = _rows(Q + off_b * stride_b + off_h * stride_h, N_CTX, stride_t, BLOCK_M1, HEAD_DIM, BLOCK_D, TMA)
    do_src = _rows(DO + off_b * stride_dob + off_h * stride_doh, N_CTX, stride_dot, BLOCK_M1, HEAD_DIM, BLOCK_D,
                   TMA)
    lse_base = LSE + off_bh * N_CTX
    delta_base = DELTA + off_bh * N_CTX
    dq_base = DQ + off_bh * N_CTX * HEAD_DIM  # DQ contiguous fp32

    offs_n = start_n + tl.arange(0, BLOCK_N1)
    k = _load_rows(_rows(K + off_b * stride_b + off_h * stride_h, N_CTX, stride_t, BLOCK_N1, HEAD_DIM, BLOCK_D, TMA),
                   start_n, stride_t, N_CTX, BLOCK_N1, HEAD_DIM, BLOCK_D, EVEN_D, TMA)  # (BLOCK_N1, BLOCK_D)
    v = _load_rows(_rows(V + off_b * stride_b + off_h * stride_h, N_CTX, stride_t, BLOCK_N1, HEAD_DIM, BLOCK_D, TMA),
                   start_n, stride_t, N_CTX, BLOCK_N1, HEAD_DIM, BLOCK_D, EVEN_D, TMA)  # (BLOCK_N1, BLOCK_D)
    dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)

    # Causal: query tiles [start_n, start_n + BLOCK_N1) straddle the diagonal (masked); the later
    # ones see every key of this tile; the earlier ones see none and are skipped.
    if CAUSAL:
        diag_hi = start_n + BLOCK_N1
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_base, stride_t,
                                      stride_dot, offs_n, start_n, tl.minimum(diag_hi, N_CTX),
                                      N_CTX, qk_scale, sm_scale, True, BLOCK_M1, HEAD_DIM, BLOCK_D, EVEN_D,
                                      IEEE_DOT, FUSED_DQ, TMA)
    else:
        diag_hi = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_base, stride_t,
                                  stride_dot, offs_n, diag_hi, N_CTX, N_CTX, qk_scale, sm_scale, False,
                                  BLOCK_M1, HEAD_DIM, BLOCK_D, EVEN_D, IEEE_DOT, FUSED_DQ, TMA)

    dk *= sm_scale
    plane = off_bh * N_CTX * HEAD_DIM  # DK, DV contiguous
    _store_rows(_rows(DK + plane, N_CTX, HEAD_DIM, BLOCK_N1, HEAD_DIM, BLOCK_D, TMA), start_n,
                dk.to(DK.dtype.element_ty), HEAD_DIM, N_CTX, BLOCK_N1, HEAD_DIM, BLOCK_D, EVEN_D, TMA)
    _store_rows(_rows(DV + plane, N_CTX, HEAD_DIM, BLOCK_N1, HEAD_DIM, BLOCK_D, TMA), start_n,
                dv.to(DV.dtype.element_ty), HEAD_DIM, N_CTX, BLOCK_N1, HEAD_DIM, BLOCK_D, EVEN_D, TMA)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt, offs_m,
                       lo, hi, N_CTX, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N2: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                       IEEE_DOT: tl.constexpr, TMA: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N2):
        k = _load_rows(k_src, start_n, stride_kt, N_CTX, BLOCK_N2, HEAD_DIM, BLOCK_D, EVEN_D, TMA)
        v = _load_rows(v_src, start_n, stride_vt, N_CTX, BLOCK_N2, HEAD_DIM, BLOCK_D, EVEN_D, TMA)
        qk = _dot(q, tl.trans(k), IEEE_DOT)  # (BLOCK_M2, BLOCK_N2)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N2)
            keep = offs_n[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE_DOT)  # (BLOCK_M2, BLOCK_N2)
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(ds.to(k.dtype), k, dq, IEEE_DOT)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, sm_scale, stride_b, stride_h, stride_t,
                        stride_dob, stride_doh, stride_dot, H, N_CTX,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                        CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr, HEAVY_FIRST: tl.constexpr,
                        TMA: tl.constexpr,
                        BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):
    tile, off_bh = _tile_index(HEAVY_FIRST, True)
    start_m = tile * BLOCK_M2
    off_b = off_bh // H
    off_h = off_bh % H
    qk_scale = sm_scale * LOG2E
    k_src = _rows(K + off_b * stride_b + off_h * stride_h, N_CTX, stride_t, BLOCK_N2, HEAD_DIM, BLOCK_D, TMA)
    v_src = _rows(V + off_b * stride_b + off_h * stride_h, N_CTX, stride_t, BLOCK_N2, HEAD_DIM, BLOCK_D, TMA)

    offs_m = start_m + tl.arange(0, BLOCK_M2)
    row_ok = offs_m < N_CTX
    q = _load_rows(_rows(Q + off_b * stride_b + off_h * stride_h, N_CTX, stride_t, BLOCK_M2, HEAD_DIM, BLOCK_D, TMA),
                   start_m, stride_t, N_CTX, BLOCK_M2, HEAD_DIM, BLOCK_D, EVEN_D, TMA)  # (BLOCK_M2, BLOCK_D)
    do = _load_rows(_rows(DO + off_b * stride_dob + off_h * stride_doh, N_CTX, stride_dot, BLOCK_M2, HEAD_DIM,
                          BLOCK_D, TMA),
                    start_m, stride_dot, N_CTX, BLOCK_M2, HEAD_DIM, BLOCK_D, EVEN_D, TMA)  # (BLOCK_M2, BLOCK_D)
    lse = tl.load(LSE + off_bh * N_CTX + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + off_bh * N_CTX + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        free_hi = start_m
        hi = tl.minimum(start_m + BLOCK_M2, N_CTX)
    else:
        free_hi = (N_CTX // BLOCK_N2) * BLOCK_N2
        hi = N_CTX
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_t, stride_t, offs_m,
                            0, free_hi, N_CTX, qk_scale, False, CAUSAL, BLOCK_N2, HEAD_DIM, BLOCK_D, EVEN_D,
                            IEEE_DOT, TMA)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_t, stride_t, offs_m,
                            free_hi, hi, N_CTX, qk_scale, True, CAUSAL, BLOCK_N2, HEAD_DIM, BLOCK_D, EVEN_D,
                            IEEE_DOT, TMA)

    dq *= sm_scale
    _store_rows(_rows(DQ + off_bh * N_CTX * HEAD_DIM, N_CTX, HEAD_DIM, BLOCK_M2, HEAD_DIM, BLOCK_D, TMA), start_m,
                dq.to(DQ.dtype.element_ty), HEAD_DIM, N_CTX, BLOCK_M2, HEAD_DIM, BLOCK_D, EVEN_D, TMA)  # DQ contiguous


_AUTOTUNE = os.environ.get("IGPT_FAST_AUTOTUNE") == "1"  # IGPT_FAST_AUTOTUNE=1: the autotuned kernels below
_KERNELS = dict(fwd=_attn_fwd_kernel, dkdv=_attn_bwd_dkdv_kernel, dq=_attn_bwd_dq_kernel,
                fused=_attn_bwd_dkdv_kernel)
_TUNED = {name: triton.autotune(
    configs=[triton.Config(dict(zip(_BLOCK_NAMES[name], (r, c))), num_warps=w, num_stages=st)
             for r, c, w, st in _TUNE_SETS[name]],
    key=["N_CTX", "HEAD_DIM", "CAUSAL", "HEAVY_FIRST", "TMA"],
    reset_to_zero=["DQ"] if name == "fused" else None)(kernel) for name, kernel in _KERNELS.items()}


def _make_plan(configs, dtype, head_dim, causal, tuned=False):
    """The launch plan of one shape class: name -> (kernel, tile along the grid's first axis, launch
    keywords), plus "bwd" (the backward variant). configs: attention_configs' form; tuned: the
    autotuned kernels instead of configs' tiles (their tile is then the name of the block keyword,
    read from the chosen config)."""
    block_d = _block_d(head_dim)
    shape = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=block_d == head_dim)
    plan = dict(pre=(_attn_bwd_preprocess_kernel, configs["pre"]["BLOCK_M"], dict(shape, **configs["pre"])),
                bwd=configs["bwd"])
    meta = dict(shape, CAUSAL=bool(causal), IEEE_DOT=dtype == torch.float32,
                HEAVY_FIRST=configs["order"] == "heavy_first", TMA=configs["io"] == "tma")
    for name, axis in (("fwd", "BLOCK_M"), ("dkdv", "BLOCK_N1"), ("dq", "BLOCK_M2"), ("fused", "BLOCK_N1")):
        kmeta = dict(meta, FUSED_DQ=name == "fused") if name in ("dkdv", "fused") else meta
        if name == "fused":  # pointer I/O always: see the io note in attention_configs.py
            kmeta["TMA"] = False
        if tuned:
            plan[name] = (_TUNED[name], axis, kmeta)
        else:
            plan[name] = (_KERNELS[name], configs[name][axis], dict(kmeta, **configs[name]))
    return plan


_PLANS = {}  # (device index, dtype, head dim, causal, T bucket) -> launch plan
_OVERRIDE = []  # the config of the innermost use_configs() block


class use_configs:
    """`with use_configs(config):` every attention launch plan built inside uses `config` (a dict of
    the config keys; missing keys from the usual sources). The plan cache is cleared on entry and exit,
    so the block sees the config and later calls see the usual one again."""

    def __init__(self, config):
        self.config = check_config(dict(config), "use_configs")

    def __enter__(self):
        _OVERRIDE.append(self.config)
        _PLANS.clear()
        return self

    def __exit__(self, *exc):
        _OVERRIDE.pop()
        _PLANS.clear()


def _table_config(capability, dtype, head_dim, causal, T):
    """The defaults table's config for this shape class (the entry nearest in T), {} when none."""
    from . import defaults
    return dict(defaults.config(capability, "attention", dtype, head_dim, causal, T) or {})


def _plan_for(q, causal):
    """The cached launch plan for q's device (its compute capability, read once), dtype, head dim,
    causal flag and T bucket: built on the first call of a shape class, a dict lookup after that."""
    T = q.shape[2]
    key = (q.get_device(), q.dtype, q.shape[-1], causal, T.bit_length())
    plan = _PLANS.get(key)
    if plan is None:
        capability = None if INTERPRET and not q.is_cuda else torch.cuda.get_device_capability(q.device)
        override = {} if capability is None else _table_config(capability, q.dtype, q.shape[-1], causal, T)
        override.update(_env_config())
        if _OVERRIDE:
            override.update(_OVERRIDE[-1])
        configs = attention_configs(capability, q.shape[-1], override)
        plan = _PLANS[key] = _make_plan(configs, q.dtype, q.shape[-1], causal,
                                        tuned=_AUTOTUNE and capability is not None)
    return plan


def _grid(T, BH, tile, heavy_first):
    """(tiles along T, B * H), or (B * H, tiles) for heavy_first; tile a keyword name for the
    autotuned kernels (grid from their config)."""
    if isinstance(tile, int):
        n = -(-T // tile)
        return (BH, n) if heavy_first else (n, BH)
    if heavy_first:
        return lambda meta: (BH, triton.cdiv(T, meta[tile]))
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


def _tma_meta(meta, *tensors):
    """`meta`, or (io "tma" where a tensor breaks TMA's rules: a 16-byte aligned start and every stride
    but the last a multiple of 16 bytes, e.g. a head dim that is not a multiple of 8 in fp16) the same
    launch with pointer I/O. With TMA, makes sure Triton can allocate the descriptors' scratch."""
    if not meta["TMA"]:
        return meta
    for t in tensors:
        size = t.element_size()
        # A traced call sees fake tensors (no data pointer): their storage offset and strides decide, the
        # storage itself being allocator-aligned.
        start = t.data_ptr() if type(t) is torch.Tensor else t.storage_offset() * size
        if start % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return dict(meta, TMA=False)
    _common.ensure_scratch_allocator()
    return meta


def _attn_fwd(q, k, v, scale, plan, launch):
    """Allocate o (B, H, T, D) in q's dtype and the base-2 LSE (B, H, T) fp32; launch the forward.
    q, k, v share their strides (_shared_layout). The forward kernel's signature lives here."""
    B, H, T, D = q.shape
    o = _common.empty(q, (B, H, T, D))
    lse = _common.empty(q, (B, H, T), torch.float32)
    if B * H:
        kernel, tile, meta = plan["fwd"]
        meta = _tma_meta(meta, q, k, v, o)
        args = (q, k, v, o, lse, scale * LOG2E.value, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                *o.stride()[:3], H, T)
        launch(kernel, _grid(T, B * H, tile, meta["HEAVY_FIRST"]), args, meta)
    return o, lse


def _attn_bwd(do, q, k, v, o, lse, scale, plan, launch):
    """Launch Delta = rowsum(dO * O), then dK/dV and dQ: two kernels (bwd "split"), or one that adds
    dQ atomically into a zeroed fp32 buffer, cast to q's dtype after (bwd "fused_atomic"). Returns dq,
    dk, dv (B, H, T, D), contiguous, in q's dtype. The backward kernels' signatures live here."""
    B, H, T, D = q.shape
    fused = plan["bwd"] == "fused_atomic"
    dk, dv = (_common.empty(q, (B, H, T, D)) for _ in range(2))
    dq = q.new_zeros((B, H, T, D), dtype=torch.float32) if fused else _common.empty(q, (B, H, T, D))
    if B * H == 0:
        return dq.to(q.dtype), dk, dv
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = _common.empty(lse, (B, H, T))  # fp32: rowsum(dO * O)
    BH = B * H
    sb, sh, st, _ = q.stride()
    sdb, sdh, sdt, _ = do.stride()
    kernel, tile, meta = plan["pre"]
    launch(kernel, (-(-T // tile), BH), (o, do, delta, *o.stride()[:3], sdb, sdh, sdt, H, T), meta)
    kernel, tile, meta = plan["fused" if fused else "dkdv"]
    meta = _tma_meta(meta, q, k, v, do, dk, dv)
    launch(kernel, _grid(T, BH, tile, meta["HEAVY_FIRST"]),
           (q, k, v, do, dk, dv, dq if fused else dk, lse, delta, scale, sb, sh, st, sdb, sdh, sdt, H, T), meta)
    if fused:
        return dq.to(q.dtype), dk, dv
    kernel, tile, meta = plan["dq"]
    meta = _tma_meta(meta, q, k, v, do, dq)
    launch(kernel, _grid(T, BH, tile, meta["HEAVY_FIRST"]),
           (q, k, v, do, dq, lse, delta, scale, sb, sh, st, sdb, sdh, sdt, H, T), meta)
    return dq, dk, dv


def _flash_attn_forward(q, k, v, causal, scale, launch=None):
    """The forward launcher: check, lay out, allocate, launch (eagerly unless `launch` says otherwise).
    Returns o, the base-2 LSE and the q, k, v the kernels read (to save for the backward)."""
    _check_inputs(q, k, v)
    if not scale > 0:
        raise ValueError(f"flash_attention: scale must be > 0 (the kernels take the row max of unscaled "
                         f"scores), got {scale}")
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
