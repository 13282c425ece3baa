"""Fused softmax + cross-entropy over the colour vocabulary, forward and backward in Triton.

Maths. For a row of logits x (length V, default the 512 palette colours) and target t:
    lse = log(sum_j exp(x_j)),   loss = lse - x_t,   d loss / d x_j = softmax(x)_j - [j == t].
One program per row streams the row in BLOCK_V chunks with the online max/sum (base 2: exp2 of
x * log2(e)) to get lse and x_t, then walks the row again writing the per-row gradient. No (N, V)
probability tensor is ever kept: the forward returns the per-row loss and (only when logits need a
gradient) the unscaled per-row gradient in the logits' dtype, which replaces the logits as the
saved state (the same memory trade as Liger-Kernel's fused cross-entropy, but written to a new
buffer, never into the logits). The backward scales row i by grad_output_i (reduction "none"), by
grad_output / n_valid (mean) or by grad_output (sum), in fp32, in one more pass.

Rows whose target equals ignore_index get loss 0 and gradient 0 and skip the exp pass. The mean is
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
_REDUCTIONS = ("none", "mean", "sum")


@triton.jit
def _ce_fwd_kernel(LOGITS, TARGETS, LOSS, GRAD, stride_l, stride_g, V, ignore_index,
                   COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_l
    grad = GRAD + row * stride_g
    target = tl.load(TARGETS + row)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(grad + cols, tl.zeros([BLOCK_V], dtype=GRAD.dtype.element_ty), mask=cols < V)
        return
    tl.device_assert((target >= 0) & (target < V), "cross_entropy: target out of [0, V)")

    m = float("-inf")  # running max of x * log2(e)
    d = 0.0  # running sum of exp2(x * log2(e) - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * LOG2E
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), 0)
        m = m_new
    lse2 = m + tl.log2(d)  # log-sum-exp in base 2
    x_target = tl.load(logits + target).to(tl.float32)
    tl.store(LOSS + row, lse2 * LN2 - x_target)

    if COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * LOG2E
            g = tl.exp2(x - lse2) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad + cols, g.to(GRAD.dtype.element_ty), mask=cols < V)


@triton.jit
def _ce_bwd_kernel(GRAD, DLOSS, DLOGITS, stride_g, stride_dl, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(DLOSS + row).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        g = tl.load(GRAD + row * stride_g + cols, mask=cols < V, other=0.0).to(tl.float32)
        tl.store(DLOGITS + row * stride_dl + cols, (g * scale).to(DLOGITS.dtype.element_ty), mask=cols < V)


def _launch_meta(V):
    """Launch keywords for a vocabulary of V (the same on every GPU)."""
    block_v = min(triton.next_power_of_2(V), _MAX_BLOCK_V)
    return dict(BLOCK_V=block_v, num_warps=4 if block_v <= 1024 else 8)


def _forward_spec(logits, targets, loss, grad, ignore_index, compute_grad):
    N, V = logits.shape
    args = (logits, targets, loss, grad, logits.stride(0), grad.stride(0) if compute_grad else 0, V, ignore_index)
    return _ce_fwd_kernel, (N,), args, dict(_launch_meta(V), COMPUTE_GRAD=compute_grad)


def _backward_spec(grad, dloss, dlogits):
    N, V = grad.shape
    return _ce_bwd_kernel, (N,), (grad, dloss, dlogits, grad.stride(0), dlogits.stride(0), V), _launch_meta(V)


def launch_specs(logits, compute_grad=True):
    """The launches one forward (+ backward when compute_grad) over (N, V) logits like these makes,
    built by the launchers' own code: [(kernel, grid, args, keywords)]. For tools/compile_check.py."""
    N, V = logits.shape
    targets = torch.zeros(N, dtype=torch.int64, device=logits.device)
    loss, dloss = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(2))
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty((0, V))
    specs = [_forward_spec(logits, targets, loss, grad, -100, compute_grad)]
    if compute_grad:
        specs.append(_backward_spec(grad, dloss, torch.empty_like(logits)))
    return specs


def _cross_entropy_forward(logits, targets, ignore_index, compute_grad):
    """Per-row loss (N,) fp32 and, if compute_grad, the unscaled gradient (N, V) in logits' dtype."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: need logits (N, V) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"cross_entropy: logits must be fp16/bf16/fp32, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32) or targets.device != logits.device:
        raise ValueError("cross_entropy: targets must be int64/int32 on the logits' device")
    _common.check_device("cross_entropy", logits)
    N, V = logits.shape
    if not logits.is_cuda:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bad.any():
            raise ValueError(f"cross_entropy: targets outside [0, {V}) that are not ignore_index={ignore_index}")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    loss = _common.empty(logits, (N,), torch.float32)
    grad = _common.empty(logits, (N, V) if compute_grad else (0, V))
    if N > 0:
        _common.launch(*_forward_spec(logits, targets.contiguous(), loss, grad, ignore_index, compute_grad))
    return loss, grad


def _cross_entropy_backward(grad, dloss):
    """d logits = grad * dloss[:, None], in fp32 math, stored in grad's dtype."""
    N, V = grad.shape
    dlogits = _common.empty(grad, (N, V))
    if N > 0:
        _common.launch(*_backward_spec(grad, dloss.contiguous(), dlogits))
    return dlogits


@torch.library.custom_op("igpt_fast::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _cross_entropy_forward(logits, targets, ignore_index, compute_grad)


@_cross_entropy_fwd_op.register_fake
def _(logits, targets, ignore_index, compute_grad):
    N, V = logits.shape
    return logits.new_empty((N,), dtype=torch.float32), logits.new_empty((N, V) if compute_grad else (0, V))


@torch.library.custom_op("igpt_fast::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(grad: torch.Tensor, dloss: torch.Tensor) -> torch.Tensor:
    return _cross_entropy_backward(grad, dloss)


@_cross_entropy_bwd_op.register_fake
def _(grad, dloss):
    return grad.new_empty(grad.shape)


def _fwd_setup_context(ctx, inputs, output):
    logits, targets, ignore_index, compute_grad = inputs
    ctx.save_for_backward(targets, output[1])
    ctx.ignore_index = ignore_index


def _fwd_backward(ctx, dloss, dgrad):
    targets, grad = ctx.saved_tensors
    if grad.shape[0] != targets.shape[0]:
        raise RuntimeError("cross_entropy: the forward ran without computing the gradient (grad mode off "
                           "or logits not requiring grad), so it cannot be differentiated")
    dloss = dloss.masked_fill(targets == ctx.ignore_index, 0.0)  # ignored rows: 0, even for inf / nan scales
    return _cross_entropy_bwd_op(grad, dloss.float()), None, None, None


_cross_entropy_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def triton_cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """Fused cross-entropy of (N, V) logits vs (N,) targets; fp32 loss; differentiable w.r.t. logits."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _cross_entropy_fwd_op(logits, targets, int(ignore_index), compute_grad)  # (N,) fp32
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()

