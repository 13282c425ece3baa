"""Pure-torch fp32 references of the three ops: the test oracles for the Triton kernels.

Importable without Triton (nothing here imports it), so reading or testing the maths needs no GPU and
no interpreter. Each computes in fp32 (fp64 inputs stay fp64, which is how the tests build an fp64
oracle) and materialises everything: attention_ref builds the T x T score matrix, so keep T small.
"""
import math

import torch


def attention_ref(q, k, v, causal=True, scale=None):
    """Attention over (B, H, T, D) q, k, v in fp32 (fp64 stays fp64), output in q's dtype."""
    dtype = q.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, T)
    if causal:
        T = q.shape[-2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v).to(dtype)  # (B, H, T, D)


def softmax_ref(x):
    """Softmax over the last dimension in fp32 (fp64 stays fp64), output in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.softmax(x.to(compute), dim=-1).to(x.dtype)


def cross_entropy_ref(logits, targets, ignore_index=-100, reduction="mean"):
    """Cross-entropy of (N, V) logits vs (N,) targets in fp32 (fp64 stays fp64); like F.cross_entropy."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(compute), dim=-1)  # (N, V)
    valid = targets != ignore_index
    nll = -logp.gather(1, targets.masked_fill(~valid, 0)[:, None]).squeeze(1) * valid  # (N,)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / valid.sum()
