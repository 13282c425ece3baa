"""Fused row softmax over the last dimension, forward and backward in Triton.

Maths. y = exp(x - max x) / sum exp(x - max x) per row (computed as exp2 of (x - max) * log2(e)),
dx = y * (dy - sum(y * dy)). One program per row. A row that fits one tile (width <= 8192) is
loaded once (tutorial 02's fused softmax); a wider row is streamed twice: first the online max/sum
(Milakov & Gimelshein 2018), then the normalised write. The backward likewise reduces sum(y * dy)
in one pass (or one tile) and writes dx in the next.

References: triton-lang tutorial 02-fused-softmax; Milakov & Gimelshein, "Online normalizer
calculation for softmax" (2018).

Limits. Any rank (rows = all leading dimensions flattened), any width >= 1 (a last dimension that is
not contiguous is copied first); fp16, bf16 and fp32 (fp32 math, output in the input dtype). A row
that is all -inf gives nan, like torch.softmax. Deterministic. On CPU only under the Triton
interpreter (TRITON_INTERPRET=1, fp32/fp16).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import LOG2E
_MAX_SINGLE_BLOCK = 8192
_LOOP_BLOCK = 4096


@triton.jit
def _softmax_fwd_kernel(X, Y, stride_x, stride_y, W, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < W, other=float("-inf")).to(tl.float32) * LOG2E
        e = tl.exp2(x - tl.max(x, 0))
        tl.store(y_row + cols, (e / tl.sum(e, 0)).to(Y.dtype.element_ty), mask=cols < W)
    else:
        m = float("-inf")  # running max of x * log2(e)
        d = 0.0  # running sum of exp2(x * log2(e) - m)
        for start in range(0, W, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < W, other=float("-inf")).to(tl.float32) * LOG2E
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), 0)
            m = m_new
        for start in range(0, W, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < W, other=float("-inf")).to(tl.float32) * LOG2E
            tl.store(y_row + cols, (tl.exp2(x - m) / d).to(Y.dtype.element_ty), mask=cols < W)


@triton.jit
def _softmax_bwd_kernel(Y, DY, DX, stride_y, stride_dy, stride_dx, W, BLOCK: tl.constexpr,
                        SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y_row = Y + row * stride_y
    dy_row = DY + row * stride_dy
    dx_row = DX + row * stride_dx
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        y = tl.load(y_row + cols, mask=cols < W, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=cols < W, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(y * dy, 0))
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=cols < W)
    else:
        dot = 0.0
        for start in range(0, W, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            y = tl.load(y_row + cols, mask=cols < W, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=cols < W, other=0.0).to(tl.float32)
            dot += tl.sum(y * dy, 0)
        for start in range(0, W, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            y = tl.load(y_row + cols, mask=cols < W, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=cols < W, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, (y * (dy - dot)).to(DX.dtype.element_ty), mask=cols < W)


def _launch_meta(W):
    """Launch keywords for rows of width W (the same on every GPU)."""
    block = triton.next_power_of_2(W)
    single = block <= _MAX_SINGLE_BLOCK
    block = block if single else _LOOP_BLOCK
    return dict(BLOCK=block, SINGLE=single, num_warps=4 if block <= 1024 else (8 if block <= 4096 else 16))


def _rows(x):
    """View x as (rows, W) with a contiguous last dimension."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])  # (N, W)


def _check(x):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"softmax: x must be fp16/bf16/fp32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("softmax: x needs at least one dimension")
    _common.check_device("softmax", x)


def _forward_spec(x2, y):
    N, W = x2.shape
    return _softmax_fwd_kernel, (N,), (x2, y, x2.stride(0), y.stride(0), W), _launch_meta(W)


def _backward_spec(y2, dy2, dx):
    N, W = y2.shape
    return (_softmax_bwd_kernel, (N,), (y2, dy2, dx, y2.stride(0), dy2.stride(0), dx.stride(0), W),
            _launch_meta(W))


def launch_specs(x2):
    """The launches one forward + backward over (N, W) rows like x2 makes, built by the launchers'
    own code: [(kernel, grid, args, keywords)]. For tools/compile_check.py."""
    y, dy, dx = (torch.empty_like(x2) for _ in range(3))
    return [_forward_spec(x2, y), _backward_spec(y, dy, dx)]


def _softmax_forward(x):
    _check(x)
    x2 = _rows(x)  # (N, W)
    N, W = x2.shape
    y = _common.empty(x2, (N, W))
    if N > 0 and W > 0:
        _common.launch(*_forward_spec(x2, y))
    return y.view(x.shape)


def _softmax_backward(y, dy):
    y2, dy2 = _rows(y), _rows(dy)  # (N, W) each
    N, W = y2.shape
    dx = _common.empty(y2, (N, W))
    if N > 0 and W > 0:
        _common.launch(*_backward_spec(y2, dy2, dx))
    return dx.view(y.shape)


@torch.library.custom_op("igpt_fast::softmax_fwd", mutates_args=())
def _softmax_fwd_op(x: torch.Tensor) -> torch.Tensor:
    return _softmax_forward(x)


@_softmax_fwd_op.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("igpt_fast::softmax_bwd", mutates_args=())
def _softmax_bwd_op(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return _softmax_backward(y, dy)


@_softmax_bwd_op.register_fake
def _(y, dy):
    return y.new_empty(y.shape)


def _fwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _fwd_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_bwd_op(y, dy.to(y.dtype))


_softmax_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def triton_softmax(x):
    """Triton softmax over the last dimension of x; output in x's dtype; differentiable."""
    return _softmax_fwd_op(x)

