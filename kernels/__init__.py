"""Public ops of igpt-fast and their dispatch: attention, softmax, cross_entropy.

impl="auto"   Triton kernels for CUDA tensors, the torch path elsewhere. On CUDA, a call the kernel
              does not cover (attention with T_q != T_k, e.g. a KV-cache decode step, or D > 128)
              takes the torch path; that choice is logged once with its reason.
impl="triton" always the Triton kernels (on CPU that means the Triton interpreter: set
              TRITON_INTERPRET=1 before this package is imported; fp32/fp16 only there).
impl="torch"  the torch path (F.scaled_dot_product_attention, torch.softmax, F.cross_entropy).

The choice is logged once per (op, implementation). Importing this package is cheap: the Triton
modules (flash_attention.py, fused_softmax.py, fused_cross_entropy.py) are imported on first Triton
use. They register their kernels as torch custom ops (`torch.library.custom_op`, namespace
`igpt_fast`) with fake and autograd implementations, so the ops work inside
`torch.compile(fullgraph=True)`. No submodule shares a name with a public op, so
`igpt_fast.kernels.attention` is always the function.
"""
import logging

import torch
import torch.nn.functional as F

__all__ = ["attention", "softmax", "cross_entropy"]

_log = logging.getLogger("igpt_fast.kernels")
_IMPLS = ("auto", "triton", "torch")
_logged = set()


def _resolve(op, impl, x, unsupported=None):
    """Pick 'triton' or 'torch' for one call. `unsupported`: why the kernel cannot take it (or None)."""
    if impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be one of {_IMPLS}, got {impl!r}")
    reason = ""
    if impl == "auto":
        impl = "triton" if x.is_cuda and unsupported is None else "torch"
        reason = f" ({unsupported})" if x.is_cuda and unsupported is not None else ""
    if (op, impl, reason) not in _logged and not torch.compiler.is_compiling():
        _logged.add((op, impl, reason))
        _log.info("igpt_fast.kernels.%s: using the %s implementation%s", op, impl, reason)
    return impl


def attention(q, k, v, causal=True, scale=None, impl="auto"):
    """Scaled dot-product attention over (B, H, T, D) tensors; causal for AR, not for BERT."""
    unsupported = None
    if q.shape != k.shape or q.shape != v.shape:
        unsupported = "q, k, v shapes differ"
    elif q.shape[-1] > 128:
        unsupported = "head dim > 128"
    if _resolve("attention", impl, q, unsupported) == "triton":
        from .flash_attention import flash_attention
        return flash_attention(q, k, v, causal, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def softmax(x, impl="auto"):
    """Softmax over the last dimension of any-rank x; output in x's dtype."""
    if _resolve("softmax", impl, x) == "triton":
        from .fused_softmax import triton_softmax
        return triton_softmax(x)
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", impl="auto"):
    """Cross-entropy of (N, V) logits against (N,) targets in fp32 math; reduction none/mean/sum."""
    if _resolve("cross_entropy", impl, logits) == "triton":
        from .fused_cross_entropy import triton_cross_entropy
        return triton_cross_entropy(logits, targets, ignore_index, reduction)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)

