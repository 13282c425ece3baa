"""Fused softmax + cross-entropy over the colour vocabulary, forward and backward in Triton.

Maths. For a row of logits x (length V, default the 512 palette colours) and target t:
    lse = log(sum_j exp(x_j)),   loss = lse - x_t,   d loss / d x_j = softmax(x)_j - [j == t].
A program takes ROWS rows (a ROWS x BLOCK_V tile of about 2048 elements: 4 rows at the palette's 512
colours, so narrow rows are neither launch- nor occupancy-bound; one row when V > 2048) and streams
them in BLOCK_V chunks with the online max/sum (base 2: exp2 of x * log2(e)) to get lse and x_t,
then walks them again writing the per-row gradient. No (N, V)
probability tensor is ever kept: the forward returns the per-row loss and (only when logits need a
gradient) the unscaled per-row gradient in the logits' dtype, which replaces the logits as the
saved state (the same memory trade as Liger-Kernel's fused cross-entropy, but written to a new
buffer, never into the logits). The backward scales row i by grad_output_i (reduction "none"), by
grad_output / n_valid (mean) or by grad_output (sum), in fp32, in one more pass.

Rows whose target equals ignore_index get loss 0 and gradient 0. The mean is
over non-ignored rows, like F.cross_entropy; when every row is ignored it is nan (0 / 0) with a zero
gradient, again like F.cross_entropy.

References: linkedin/Liger-Kernel src/liger_kernel/ops/cross_entropy.py; Milakov & Gimelshein,
"Online normalizer calculation for softmax" (2018).

Limits. logits (N, V) in fp16/bf16/fp32 (the last dimension contiguous; otherwise copied), any
V >= 1; targets (N,) integer in [0, V) or ignore_index (checked on CPU; on CUDA a bad target is only
caught with TRITON_DEBUG=1). Math in fp32; the loss is fp32; the gradient is in the logits' dtype.
Deterministic. On CPU only under the Triton interpreter (TRITON_INTERPRET=1, fp32/fp16).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import LN2, LOG2E
_MAX_BLOCK_V = 4096
_ROW_TILE = 2048  # elements per program when several rows share one
_MAX_ROWS = 16
_REDUCTIONS = ("none", "mean", "sum")


@triton.jit
def _ce_fwd_kernel(LOGITS, TARGETS, LOSS, GRAD, stride_l, N, V, ignore_index,
                   COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, ROWS: tl.constexpr):
    # GRAD is contiguous (N, V).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    target = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (target != ignore_index)
    tl.device_assert(((target >= 0) & (target < V)) | (valid == 0), "cross_entropy: target out of [0, V)")
    logits = LOGITS + rows[:, None] * stride_l  # (ROWS, 1)

    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)  # running max of x * log2(e)
    d = tl.zeros([ROWS], dtype=tl.float32)  # running sum of exp2(x * log2(e) - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols[None, :], mask=valid[:, None] & (cols[None, :] < V),
                    other=float("-inf")).to(tl.float32) * LOG2E  # (ROWS, BLOCK_V)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(valid, m_new, 0.0)  # ignored rows: all -inf, kept finite
        d = d * tl.exp2(tl.where(valid, m, 0.0) - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), 1)
        m = m_new
    lse2 = tl.where(valid, m + tl.log2(d), 0.0)  # log-sum-exp in base 2
    x_target = tl.load(LOGITS + rows * stride_l + tl.where(valid, target, 0), mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + rows, tl.where(valid, lse2 * LN2 - x_target, 0.0), mask=row_ok)

    if COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(logits + cols[None, :], mask=valid[:, None] & (cols[None, :] < V),
                        other=float("-inf")).to(tl.float32) * LOG2E
            g = tl.exp2(x - lse2[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(GRAD + rows[:, None] * V + cols[None, :], g.to(GRAD.dtype.element_ty),
                     mask=row_ok[:, None] & (cols[None, :] < V))


@triton.jit
def _ce_bwd_kernel(GRAD, DLOSS, DLOGITS, N, V, BLOCK_V: tl.constexpr, ROWS: tl.constexpr):
    # GRAD, DLOSS and DLOGITS are contiguous.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    scale = tl.load(DLOSS + rows, mask=row_ok, other=0.0).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        offs = rows[:, None] * V + cols[None, :]
        mask = row_ok[:, None] & (cols[None, :] < V)
        g = tl.load(GRAD + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DLOGITS + offs, (g * scale[:, None]).to(DLOGITS.dtype.element_ty), mask=mask)


_PLANS = {}  # V -> (rows per program, launch keywords)


def _plan(V):
    """(rows per program, launch keywords) for a vocabulary of V, the same on every GPU; cached."""
    plan = _PLANS.get(V)
    if plan is None:
        block_v = min(triton.next_power_of_2(V), _MAX_BLOCK_V)
        rows = min(_MAX_ROWS, max(1, _ROW_TILE // block_v))
        warps = 4 if rows * block_v <= 2048 else 8
        plan = _PLANS[V] = (rows, dict(BLOCK_V=block_v, ROWS=rows, num_warps=warps))
    return plan


def _fwd(logits, targets, ignore_index, compute_grad, launch):
    """Allocate the per-row loss (N,) fp32 and, if compute_grad, the unscaled gradient (N, V) in the
    logits' dtype; launch the forward. Its kernel's signature lives here."""
    N, V = logits.shape
    loss = _common.empty(logits, (N,), torch.float32)
    grad = _common.empty(logits, (N, V) if compute_grad else (0, V))
    if N:
        rows, meta = _plan(V)
        launch(_ce_fwd_kernel, (-(-N // rows),), (logits, targets, loss, grad, logits.stride(0), N, V, ignore_index),
               dict(meta, COMPUTE_GRAD=compute_grad))
    return loss, grad


def _bwd(grad, dloss, launch):
    """d logits = grad * dloss[:, None] (fp32 math, grad's dtype); grad and dloss contiguous. Its
    kernel's signature lives here."""
    N, V = grad.shape
    dlogits = _common.empty(grad, (N, V))
    if N:
        rows, meta = _plan(V)
        launch(_ce_bwd_kernel, (-(-N // rows),), (grad, dloss, dlogits, N, V), meta)
    return dlogits


def launch_specs(logits, compute_grad=True):
    """The launches one forward (+ backward when compute_grad) over (N, V) logits like these makes,
    recorded from the launchers themselves (no checks run): [(kernel, grid, args, keywords)]. For
    tools/compile_check.py."""
    specs = []

    def record(*spec):
        specs.append(spec)

    N, V = logits.shape
    targets = torch.zeros(N, dtype=torch.int64, device=logits.device)
    _, grad = _fwd(logits, targets, -100, compute_grad, record)
    if compute_grad:
        _bwd(grad, torch.empty(N, dtype=torch.float32, device=logits.device), record)
    return specs


def _cross_entropy_forward(logits, targets, ignore_index, compute_grad, launch=None):
    """The forward launcher: check, then the per-row loss (N,) fp32 and, if compute_grad, the unscaled
    gradient (N, V) in logits' dtype."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: need logits (N, V) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"cross_entropy: logits must be fp16/bf16/fp32, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32) or targets.device != logits.device:
        raise ValueError("cross_entropy: targets must be int64/int32 on the logits' device")
    _common.check_device("cross_entropy", logits)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    return _fwd(logits, targets.contiguous(), ignore_index, compute_grad, launch or _common.launch)


def _cross_entropy_backward(grad, dloss, launch=None):
    """The backward launcher: d logits = grad * dloss[:, None], in fp32 math, stored in grad's dtype."""
    return _bwd(grad.contiguous(), dloss.contiguous(), launch or _common.launch)


class _CrossEntropy(torch.autograd.Function):
    """Eager calls: the launchers and nothing else. Returns the per-row loss (N,) fp32."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, compute_grad):
        loss, grad = _cross_entropy_forward(logits, targets, ignore_index, compute_grad)
        ctx.save_for_backward(targets, grad)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, dloss):
        targets, grad = ctx.saved_tensors
        return _ce_grad(grad, targets, ctx.ignore_index, dloss, _cross_entropy_backward), None, None, None


def _ce_grad(grad, targets, ignore_index, dloss, backward):
    if grad.shape[0] != targets.shape[0]:
        raise RuntimeError("cross_entropy: the forward ran without computing the gradient (grad mode off "
                           "or logits not requiring grad), so it cannot be differentiated")
    dloss = dloss.masked_fill(targets == ignore_index, 0.0)  # ignored rows: 0, even for inf / nan scales
    return backward(grad, dloss.float())


@_common.kernel_op("igpt_fast::cross_entropy_fwd")
def _cross_entropy_fwd_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _cross_entropy_forward(logits, targets, ignore_index, compute_grad, _common.launch_traceable)


@_common.kernel_op("igpt_fast::cross_entropy_bwd")
def _cross_entropy_bwd_op(grad: torch.Tensor, dloss: torch.Tensor) -> torch.Tensor:
    return _cross_entropy_backward(grad, dloss, _common.launch_traceable)


def _fwd_setup_context(ctx, inputs, output):
    logits, targets, ignore_index, compute_grad = inputs
    ctx.save_for_backward(targets, output[1])
    ctx.ignore_index = ignore_index


def _fwd_backward(ctx, dloss, dgrad):
    targets, grad = ctx.saved_tensors
    return _ce_grad(grad, targets, ctx.ignore_index, dloss, _cross_entropy_bwd_op), None, None, None


_cross_entropy_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def triton_cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """Fused cross-entropy of (N, V) logits vs (N,) targets; fp32 loss; differentiable w.r.t. logits.
    Eagerly the autograd.Function; under torch.compile the triton_op."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    ignore_index = int(ignore_index)
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        loss, _ = _cross_entropy_fwd_op(logits, targets, ignore_index, compute_grad)  # (N,) fp32
    else:
        if not logits.is_cuda:  # the interpreter: check the targets here (on CUDA only TRITON_DEBUG=1 does)
            V = logits.shape[-1]
            if ((targets != ignore_index) & ((targets < 0) | (targets >= V))).any():
                raise ValueError(f"cross_entropy: targets outside [0, {V}) that are not ignore_index={ignore_index}")
        loss = _CrossEntropy.apply(logits, targets, ignore_index, compute_grad)  # (N,) fp32
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()
