"""Fused row softmax over the last dimension, forward and backward in Triton.

Maths. y = exp(x - max x) / sum exp(x - max x) per row (computed as exp2 of (x - max) * log2(e)),
dx = y * (dy - sum(y * dy)). Rows that fit one tile (width <= 8192) are loaded once (tutorial 02's
fused softmax), several narrow rows per program (ROWS x BLOCK tiles of about 2048 elements, up to 16
rows: at the palette's 512 colours, 4 rows), so narrow rows are neither launch- nor occupancy-bound;
a wider row gets its own program and is streamed twice: first the online max/sum (Milakov &
Gimelshein 2018), then the normalised write. The backward likewise reduces sum(y * dy) in one pass
(or one tile) and writes dx in the next.

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
_ROW_TILE = 2048  # elements per program when several rows share one
_MAX_ROWS = 16


@triton.jit
def _softmax_fwd_kernel(X, Y, stride_x, N, W, BLOCK: tl.constexpr, ROWS: tl.constexpr, SINGLE: tl.constexpr):
    # Y is contiguous (N, W).
    if SINGLE:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < N) & (cols[None, :] < W)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32) * LOG2E  # (ROWS, BLOCK)
        e = tl.exp2(x - tl.max(x, 1)[:, None])
        y = e / tl.sum(e, 1)[:, None]
        tl.store(Y + rows[:, None] * W + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        y_row = Y + row * W
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
def _softmax_bwd_kernel(Y, DY, DX, stride_dy, N, W, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                        SINGLE: tl.constexpr):
    # Y (the forward's output) and DX are contiguous (N, W).
    if SINGLE:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < N) & (cols[None, :] < W)
        offs = rows[:, None] * W + cols[None, :]
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)  # (ROWS, BLOCK)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(y * dy, 1)[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        y_row = Y + row * W
        dy_row = DY + row * stride_dy
        dx_row = DX + row * W
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


_PLANS = {}  # row width -> (rows per program, launch keywords)


def _plan(W):
    """(rows per program, launch keywords) for rows of width W, the same on every GPU; cached."""
    plan = _PLANS.get(W)
    if plan is None:
        block = triton.next_power_of_2(W)
        single = block <= _MAX_SINGLE_BLOCK
        block = block if single else _LOOP_BLOCK
        rows = min(_MAX_ROWS, max(1, _ROW_TILE // block)) if single else 1
        tile = rows * block
        warps = 4 if tile <= 2048 else (8 if tile <= 4096 else 16)
        plan = _PLANS[W] = (rows, dict(BLOCK=block, ROWS=rows, SINGLE=single, num_warps=warps))
    return plan


def _rows(x):
    """View x as (N, W) rows with a contiguous last dimension."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])  # (N, W)


def _check(x):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"softmax: x must be fp16/bf16/fp32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("softmax: x needs at least one dimension")
    _common.check_device("softmax", x)


def _fwd(x2, launch):
    """Allocate y (N, W) and launch the forward over rows x2 (N, W). Its kernel's signature lives here."""
    N, W = x2.shape
    y = _common.empty(x2, (N, W))
    if N and W:
        rows, meta = _plan(W)
        launch(_softmax_fwd_kernel, (-(-N // rows),), (x2, y, x2.stride(0), N, W), meta)
    return y


def _bwd(y2, dy2, launch):
    """Allocate dx (N, W) and launch the backward over contiguous y2 and rows dy2. Its kernel's
    signature lives here."""
    N, W = y2.shape
    dx = _common.empty(y2, (N, W))
    if N and W:
        rows, meta = _plan(W)
        launch(_softmax_bwd_kernel, (-(-N // rows),), (y2, dy2, dx, dy2.stride(0), N, W), meta)
    return dx


def _softmax_forward(x, launch=None):
    """The forward launcher: check, allocate y (contiguous, x's shape and dtype), launch."""
    _check(x)
    return _fwd(_rows(x), launch or _common.launch).view(x.shape)


def _softmax_backward(y, dy, launch=None):
    """The backward launcher: dx from the forward's y and dy."""
    return _bwd(_rows(y.contiguous()), _rows(dy), launch or _common.launch).view(y.shape)


def launch_specs(x2):
    """The launches one forward + backward over (N, W) rows like x2 makes, recorded from the launchers
    themselves (no checks run): [(kernel, grid, args, keywords)]. For tools/compile_check.py."""
    specs = []

    def record(*spec):
        specs.append(spec)

    _bwd(_fwd(x2, record), torch.empty_like(x2), record)
    return specs


class _Softmax(torch.autograd.Function):
    """Eager calls: the launchers and nothing else."""

    @staticmethod
    def forward(ctx, x):
        y = _softmax_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _softmax_backward(y, dy.to(y.dtype))


@_common.kernel_op("igpt_fast::softmax_fwd")
def _softmax_fwd_op(x: torch.Tensor) -> torch.Tensor:
    return _softmax_forward(x, _common.launch_traceable)


@_common.kernel_op("igpt_fast::softmax_bwd")
def _softmax_bwd_op(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return _softmax_backward(y, dy, _common.launch_traceable)


def _fwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _fwd_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_bwd_op(y, dy.to(y.dtype))


_softmax_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def triton_softmax(x):
    """Triton softmax over the last dimension of x; output in x's dtype; differentiable. Eagerly the
    autograd.Function; under torch.compile the triton_op."""
    if torch.compiler.is_compiling():
        return _softmax_fwd_op(x)
    return _Softmax.apply(x)
