"""Public ops of igpt-fast and their dispatch: attention, softmax, cross_entropy.

impl="auto"   Triton kernels for CUDA tensors, the torch path elsewhere.
impl="triton" always the Triton kernels (on CPU that means the Triton interpreter: set
              TRITON_INTERPRET=1 before this package is imported; fp32/fp16 only there).
impl="torch"  the torch path (F.scaled_dot_product_attention, torch.softmax, F.cross_entropy).

The choice is logged once per (op, implementation).
"""
import logging

import torch
import torch.nn.functional as F

__all__ = ["attention", "softmax", "cross_entropy"]

_log = logging.getLogger("igpt_fast.kernels")
_IMPLS = ("auto", "triton", "torch")
_logged = set()


def _resolve(op, impl, x):
    if impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    if (op, impl) not in _logged:
        _logged.add((op, impl))
        _log.info("igpt_fast.kernels.%s: using the %s implementation", op, impl)
    return impl


def attention(q, k, v, causal=True, scale=None, impl="auto"):
    """Scaled dot-product attention over (B, H, T, D) tensors; causal for AR, not for BERT."""
    if _resolve("attention", impl, q) == "triton":
        from .attention import flash_attention
        return flash_attention(q, k, v, causal, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def softmax(x, impl="auto"):
    """Softmax over the last dimension of any-rank x; output in x's dtype."""
    if _resolve("softmax", impl, x) == "triton":
        from .softmax import triton_softmax
        return triton_softmax(x)
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", impl="auto"):
    """Cross-entropy of (N, V) logits against (N,) targets in fp32 math; reduction none/mean/sum."""
    if _resolve("cross_entropy", impl, logits) == "triton":
        from .cross_entropy import triton_cross_entropy
        return triton_cross_entropy(logits, targets, ignore_index, reduction)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)
