"""Fused softmax + cross-entropy over the colour vocabulary, forward and backward in Triton.

Maths. For a row of logits x (length V, default the 512 palette colours) and target t:
    lse = log(sum_j exp(x_j)),   loss = lse - x_t,   d loss / d x_j = softmax(x)_j - [j == t].
A program takes ROWS rows (a ROWS x BLOCK_V tile of about 2048 elements: 4 rows at the palette's 512
colours, so narrow rows are neither launch- nor occupancy-bound; one row when V > 2048) and streams
them in BLOCK_V chunks with the online max/sum (base 2: exp2 of x * log2(e)) to get lse and x_t,
then walks them again writing the per-row gradient. No (N, V)
probability tensor is ever kept: the forward returns the loss and (only when logits need a
gradient) the unscaled per-row gradient in the logits' dtype, which replaces the logits as the
saved state (the same memory trade as Liger-Kernel's fused cross-entropy, but written to a new
buffer, never into the logits). The backward scales row i by grad_output_i (reduction "none"), by
grad_output / n_valid (mean) or by grad_output (sum), in fp32, in one more pass.

Reduction in the kernel (no torch op after it, no host sync): for "none" each program stores its
rows' losses; for "sum"/"mean" each program stores its loss sum and non-ignored count as partials in
a zeroed fp32 stats buffer, then takes a ticket (an fp32 atomic add, acq_rel); the program that draws
the last ticket adds every partial in a fixed order (so the result is deterministic), writes the loss
(sum, or sum / count) and the count, which the backward kernel reads to scale by grad_output / count.

Rows whose target equals ignore_index get loss 0 and gradient 0. The mean is
over non-ignored rows, like F.cross_entropy; when every row is ignored it is nan (0 / 0) with a zero
gradient, again like F.cross_entropy.

References: linkedin/Liger-Kernel src/liger_kernel/ops/cross_entropy.py; Milakov & Gimelshein,
"Online normalizer calculation for softmax" (2018).

Limits. logits (N, V) in fp16/bf16/fp32 (the last dimension contiguous; otherwise copied), any
V >= 1; targets (N,) integer in [0, V) or ignore_index, any stride (checked on CPU, where the
interpreter skips device_assert: one aminmax per call, the exact test only when some target lies
outside [0, V); on CUDA a bad target is only caught with TRITON_DEBUG=1). Math in fp32; the loss is
fp32; the gradient is in the logits' dtype. "sum"/"mean" take fewer than 2^24 programs (2^26 rows at
the palette's 512 colours). Deterministic. On CPU only under the Triton interpreter (TRITON_INTERPRET=1, fp32/fp16).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import LN2, LOG2E
_MAX_BLOCK_V = 4096
_ROW_TILE = 2048  # elements per program when several rows share one
_MAX_ROWS = 16
_REDUCTIONS = ("none", "sum", "mean")  # the kernels' REDUCTION 0, 1, 2
_BLOCK_P = 1024  # partials summed per step by the last program
_MAX_PROGRAMS = 2 ** 24  # the fp32 ticket counts exactly below this


@triton.jit
def _ce_fwd_kernel(LOGITS, TARGETS, LOSS, GRAD, STATS, stride_l, stride_t, N, V, ignore_index,
                   REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    # GRAD is contiguous (N, V). REDUCTION 0 (none): LOSS is (N,). 1 (sum) / 2 (mean): LOSS is (), STATS the
    # zeroed fp32 [count, ticket, partial sums (P,), partial counts (P,)] over P programs.
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    target = tl.load(TARGETS + rows * stride_t, mask=row_ok, other=ignore_index)
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
    loss = tl.where(valid, lse2 * LN2 - x_target, 0.0)  # (ROWS,)

    if COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(logits + cols[None, :], mask=valid[:, None] & (cols[None, :] < V),
                        other=float("-inf")).to(tl.float32) * LOG2E
            g = tl.exp2(x - lse2[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(GRAD + rows[:, None] * V + cols[None, :], g.to(GRAD.dtype.element_ty),
                     mask=row_ok[:, None] & (cols[None, :] < V))

    if REDUCTION == 0:
        tl.store(LOSS + rows, loss, mask=row_ok)
    else:
        P = tl.num_programs(0)
        tl.store(STATS + 2 + pid, tl.sum(loss, 0))
        tl.store(STATS + 2 + P + pid, tl.sum(valid.to(tl.float32), 0))
        ticket = tl.atomic_add(STATS + 1, 1.0, sem="acq_rel")  # releases the partials above; exact below 2^24
        if ticket == P - 1:  # the last program to finish sums every partial, in a fixed order
            total = tl.zeros([BLOCK_P], dtype=tl.float32)
            count = tl.zeros([BLOCK_P], dtype=tl.int32)
            for start in range(0, P, BLOCK_P):
                p = start + tl.arange(0, BLOCK_P)
                total += tl.load(STATS + 2 + p, mask=p < P, other=0.0, volatile=True)
                count += tl.load(STATS + 2 + P + p, mask=p < P, other=0.0, volatile=True).to(tl.int32)
            n_valid = tl.sum(count, 0).to(tl.float32)
            result = tl.sum(total, 0)
            if REDUCTION == 2:
                result = tl.math.div_rn(result, n_valid)  # 0 / 0 = nan when every row is ignored
            tl.store(LOSS, result)
            tl.store(STATS, n_valid)


@triton.jit
def _ce_bwd_kernel(GRAD, TARGETS, DLOSS, STATS, DLOGITS, stride_t, stride_dl, N, V, ignore_index,
                   REDUCTION: tl.constexpr, BLOCK_V: tl.constexpr, ROWS: tl.constexpr):
    # GRAD and DLOGITS are contiguous (N, V); DLOSS is (N,) for REDUCTION 0, else () (mean: / STATS[0], the count).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    target = tl.load(TARGETS + rows * stride_t, mask=row_ok, other=ignore_index)
    valid = row_ok & (target != ignore_index)  # ignored rows get 0, even for inf / nan scales
    if REDUCTION == 0:
        scale = tl.load(DLOSS + rows * stride_dl, mask=valid, other=0.0).to(tl.float32)
    else:
        dloss = tl.load(DLOSS).to(tl.float32)
        if REDUCTION == 2:
            dloss = tl.math.div_rn(dloss, tl.load(STATS))
        scale = tl.where(valid, dloss, 0.0)
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


def _fwd(logits, targets, ignore_index, compute_grad, reduction, launch):
    """Allocate the loss ((N,) for "none", else ()) fp32, the reduction's stats (zeroed fp32 [count,
    ticket, partials (2P,)]; the loss itself for "none") and, if compute_grad, the unscaled gradient (N, V)
    in the logits' dtype; launch the forward. Its kernel's signature lives here."""
    N, V = logits.shape
    rows, meta = _plan(V)
    programs = -(-N // rows)
    code = _REDUCTIONS.index(reduction)
    if code == 0:
        loss = stats = _common.empty(logits, (N,), torch.float32)
    elif N:
        if programs >= _MAX_PROGRAMS:
            raise ValueError(f"cross_entropy: {N} rows of width {V} need {programs} programs; reduction "
                             f"{reduction!r} takes fewer than {_MAX_PROGRAMS} (use reduction='none')")
        loss = _common.empty(logits, (), torch.float32)
        stats = logits.new_zeros(2 + 2 * programs, dtype=torch.float32)
    else:  # no rows: torch's sum 0 and mean nan, nothing to launch
        loss = torch.full((), 0.0 if reduction == "sum" else float("nan"), device=logits.device)
        stats = loss.new_zeros(1)
    grad = _common.empty(logits, (N, V) if compute_grad else (0, V))
    if N:
        launch(_ce_fwd_kernel, (programs,),
               (logits, targets, loss, grad, stats, logits.stride(0), targets.stride(0), N, V, ignore_index),
               dict(meta, REDUCTION=code, COMPUTE_GRAD=compute_grad, BLOCK_P=_BLOCK_P if code else 1))
    return loss, grad, stats


def _bwd(grad, targets, dloss, stats, ignore_index, reduction, launch):
    """d logits = grad * scale (fp32 math, grad's dtype; grad contiguous), scale per row: dloss_i ("none"),
    dloss ("sum") or dloss / count ("mean", the count from the forward's stats), 0 on ignored rows. Its
    kernel's signature lives here."""
    N, V = grad.shape
    dlogits = _common.empty(grad, (N, V))
    if N:
        rows, meta = _plan(V)
        code = _REDUCTIONS.index(reduction)
        launch(_ce_bwd_kernel, (-(-N // rows),),
               (grad, targets, dloss, stats, dlogits, targets.stride(0), dloss.stride(0) if code == 0 else 0, N, V,
                ignore_index), dict(meta, REDUCTION=code))
    return dlogits


def launch_specs(logits, compute_grad=True):
    """The launches one forward (+ backward when compute_grad) over (N, V) logits like these makes, for
    reductions "mean" (the training loss) and "none", recorded from the launchers themselves (no checks
    run): [(kernel, grid, args, keywords)]. For tools/compile_check.py."""
    specs = []

    def record(*spec):
        specs.append(spec)

    N, V = logits.shape
    targets = torch.zeros(N, dtype=torch.int64, device=logits.device)
    for reduction in ("mean", "none"):
        loss, grad, stats = _fwd(logits, targets, -100, compute_grad, reduction, record)
        if compute_grad:
            _bwd(grad, targets, torch.empty_like(loss), stats, -100, reduction, record)
    return specs


def _cross_entropy_forward(logits, targets, ignore_index, compute_grad, reduction="none", launch=None):
    """The forward launcher: check, then (loss, grad, stats): the loss fp32 ((N,) for "none", else ()),
    the unscaled gradient (N, V) in logits' dtype if compute_grad (else (0, V)) and what the backward
    launcher needs of the reduction."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: need logits (N, V) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"cross_entropy: logits must be fp16/bf16/fp32, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32) or targets.device != logits.device:
        raise ValueError("cross_entropy: targets must be int64/int32 on the logits' device")
    _common.check_device("cross_entropy", logits)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    return _fwd(logits, targets, ignore_index, compute_grad, reduction, launch or _common.launch)


def _cross_entropy_backward(grad, targets, dloss, stats, ignore_index, reduction="none", launch=None):
    """The backward launcher: d logits from the forward's grad and stats and the loss's gradient dloss,
    in fp32 math, stored in grad's dtype."""
    if grad.shape[0] != targets.shape[0]:
        raise RuntimeError("cross_entropy: the forward ran without computing the gradient (grad mode off "
                           "or logits not requiring grad), so it cannot be differentiated")
    return _bwd(grad, targets, dloss, stats, ignore_index, reduction, launch or _common.launch)


class _CrossEntropy(torch.autograd.Function):
    """Eager calls: the launchers and nothing else. Returns the loss fp32, reduced in the kernel."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, compute_grad, reduction):
        loss, grad, stats = _cross_entropy_forward(logits, targets, ignore_index, compute_grad, reduction)
        ctx.save_for_backward(targets, grad, stats)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        return loss

    @staticmethod
    def backward(ctx, dloss):
        targets, grad, stats = ctx.saved_tensors
        dlogits = _cross_entropy_backward(grad, targets, dloss, stats, ctx.ignore_index, ctx.reduction)
        return dlogits, None, None, None, None


@_common.kernel_op("igpt_fast::cross_entropy_fwd")
def _cross_entropy_fwd_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, compute_grad: bool,
                          reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, grad, stats = _cross_entropy_forward(logits, targets, ignore_index, compute_grad, reduction,
                                               _common.launch_traceable)
    return loss, grad, stats if reduction != "none" else stats.new_empty(0)  # outputs may not alias


@_common.kernel_op("igpt_fast::cross_entropy_bwd")
def _cross_entropy_bwd_op(grad: torch.Tensor, targets: torch.Tensor, dloss: torch.Tensor, stats: torch.Tensor,
                          ignore_index: int, reduction: str) -> torch.Tensor:
    return _cross_entropy_backward(grad, targets, dloss, stats, ignore_index, reduction, _common.launch_traceable)


def _fwd_setup_context(ctx, inputs, output):
    logits, targets, ignore_index, compute_grad, reduction = inputs
    ctx.save_for_backward(targets, output[1], output[2])
    ctx.ignore_index, ctx.reduction = ignore_index, reduction


def _fwd_backward(ctx, dloss, dgrad, dstats):
    targets, grad, stats = ctx.saved_tensors
    dlogits = _cross_entropy_bwd_op(grad, targets, dloss, stats, ctx.ignore_index, ctx.reduction)
    return dlogits, None, None, None, None


_cross_entropy_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _check_targets(targets, V, ignore_index):
    """The interpreter's stand-in for the kernel's device_assert (which the interpreter skips): one
    aminmax and, only when some target is outside [0, V) (ignored rows, or an error), the exact test."""
    low, high = torch.aminmax(targets)
    if (low.item() < 0 or high.item() >= V) and ((targets != ignore_index) & ((targets < 0) | (targets >= V))).any():
        raise ValueError(f"cross_entropy: targets outside [0, {V}) that are not ignore_index={ignore_index}")


def triton_cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """Fused cross-entropy of (N, V) logits vs (N,) targets; fp32 loss, reduced in the kernel;
    differentiable w.r.t. logits. Eagerly the autograd.Function; under torch.compile the triton_op."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    ignore_index = int(ignore_index)
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        return _cross_entropy_fwd_op(logits, targets, ignore_index, compute_grad, reduction)[0]
    if not logits.is_cuda and targets.numel():  # the interpreter (on CUDA only TRITON_DEBUG=1 checks)
        _check_targets(targets, logits.shape[-1], ignore_index)
    return _CrossEntropy.apply(logits, targets, ignore_index, compute_grad, reduction)
