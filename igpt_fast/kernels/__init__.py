"""Public ops of igpt-fast and their dispatch: attention, softmax, cross_entropy.

impl="auto"   Triton kernels for CUDA tensors, the torch path elsewhere. On CUDA, a call the kernel
              does not cover takes the torch path, logged once with its reason: attention with
              T_q != T_k (e.g. a KV-cache decode step), D > 128, or fp32 inputs (fp32 attention dots
              miss the tensor cores, spill registers and at D >= 96 can overflow A100 shared memory;
              SDPA runs fp32 well, so Triton attention on CUDA is fp16/bf16 only).
              A kernel that cannot compile or launch on this GPU (out of shared memory or registers,
              an architecture Triton cannot target) never fails the run: the first call of each shape
              class -- (op, dtype, head dim, causal) for attention, (op, dtype, row width) for softmax
              and cross_entropy -- runs the Triton kernels once on a one-row slice of its inputs, the
              backward too when the inputs need gradients; a Triton error there (or in the call
              itself) is logged once as a warning with its reason, and that class takes the torch
              path from then on. Inside torch.compile no such check runs: a class first seen in a
              compiled graph gets the Triton kernels without the safety net (run one eager step first).
impl="triton" always the Triton kernels; a compile or launch failure raises, and so does a call the
              kernels do not cover (fp32 attention on CUDA included). On CPU this means the Triton
              interpreter: set TRITON_INTERPRET=1 before this package is imported (fp32/fp16 only).
impl="torch"  the torch path (F.scaled_dot_product_attention, torch.softmax, F.cross_entropy).

The choice is logged once per (op, implementation, reason). Importing this package is cheap: the
Triton modules (kernels/flash_attention.py, fused_softmax.py, fused_cross_entropy.py) are imported on first
Triton use. They register their kernels as torch custom ops (`torch.library.custom_op`, namespace
`igpt_fast`) with fake and autograd implementations, so the ops work inside
`torch.compile(fullgraph=True)`. No submodule shares a name with a public op, so
`igpt_fast.kernels.attention` is always the function. The fp32 test oracles live in reference.py.
"""
import logging
import os

import torch
import torch.nn.functional as F

__all__ = ["attention", "softmax", "cross_entropy"]

# The Triton modules live in the repository's top-level kernels/ folder, which has no __init__.py, so
# it never shadows another top-level `kernels` package (Hugging Face's, which transformers 5.x needs)
# in a shell, build or test run started in the repository root. A built wheel copies them into this
# package (setup.py's build_py); from a source checkout or an editable install this package reaches
# them through __path__.
_SOURCE_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "kernels")
if (not os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "flash_attention.py"))
        and os.path.exists(os.path.join(_SOURCE_KERNELS, "flash_attention.py"))):
    __path__.append(_SOURCE_KERNELS)

_log = logging.getLogger("igpt_fast.kernels")
_IMPLS = ("auto", "triton", "torch")
_logged = set()
_checked = set()  # (shape class, with backward) that ran the Triton kernels once without error
_fallback = {}  # shape class -> why the Triton kernels failed on it


def _is_cuda(x):
    """Whether x is a CUDA tensor: the one place dispatch asks (tests patch it to fake a GPU)."""
    return x.is_cuda


def _log_once(op, impl, reason=""):
    if (op, impl, reason) not in _logged and not torch.compiler.is_compiling():
        _logged.add((op, impl, reason))
        _log.info("igpt_fast.kernels.%s: using the %s implementation%s", op, impl, f" ({reason})" if reason else "")


def _dispatch(op, impl, key, inputs, probe_inputs, run_triton, run_torch, unsupported=None):
    """Run one op call with the implementation `impl` resolves to.

    key: the call's shape class. inputs: the call's tensors (the first decides the device);
    probe_inputs: one-row slices of them for the first-use check. run_triton(*tensors) runs the
    kernels on either; run_torch() is the torch path. unsupported: why the kernels cannot take this
    call on its device (None when they can)."""
    if impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be one of {_IMPLS}, got {impl!r}")
    cuda = _is_cuda(inputs[0])
    if impl == "triton" and unsupported is not None:
        raise ValueError(f"{op}: impl='triton' cannot take this call: {unsupported}; use impl='auto' or 'torch'")
    if impl == "torch" or (impl == "auto" and (not cuda or unsupported is not None)):
        _log_once(op, "torch", unsupported if impl == "auto" and cuda else "")
        return run_torch()
    if impl == "auto" and key in _fallback:
        _log_once(op, "torch", f"the Triton kernels failed on {_describe(key)}: {_fallback[key]}")
        return run_torch()
    _log_once(op, "triton")
    if impl == "triton" or torch.compiler.is_compiling():
        return run_triton(*inputs)
    from triton.errors import TritonError

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    try:
        if (key, needs_grad) not in _checked:
            _probe(run_triton, probe_inputs, needs_grad)
            _checked.add((key, needs_grad))
        return run_triton(*inputs)
    except (TritonError, RuntimeError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        _fallback[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        _log.warning("igpt_fast.kernels.%s: the Triton kernels failed on %s (%s); this class takes the torch "
                     "path from now on", op, _describe(key), _fallback[key])
        return run_torch()


def _probe(run_triton, inputs, needs_grad):
    """Run the Triton path once on `inputs`, one-row slices of a call's tensors (same dtype, strides and
    row width, so the same kernels compile), and its backward when needs_grad; raises what they raise."""
    leaves = [t.detach().requires_grad_(needs_grad and t.is_floating_point()) for t in inputs]
    with torch.set_grad_enabled(needs_grad):
        out = run_triton(*leaves)
        if needs_grad:
            out.backward(torch.ones_like(out))


def _describe(key):
    return f"({', '.join(str(k).replace('torch.', '') for k in key[1:])})"


def attention(q, k, v, causal=True, scale=None, impl="auto"):
    """Scaled dot-product attention over (B, H, T, D) tensors; causal for AR, not for BERT."""
    unsupported = None
    if q.shape != k.shape or q.shape != v.shape:
        unsupported = "q, k, v shapes differ"
    elif q.shape[-1] > 128:
        unsupported = "head dim > 128"
    elif q.dtype == torch.float32 and _is_cuda(q):
        unsupported = "fp32 attention on CUDA takes SDPA"

    def run_triton(q, k, v):
        from .flash_attention import flash_attention
        return flash_attention(q, k, v, causal, scale)

    def run_torch():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    key = ("attention", q.dtype, q.shape[-1], bool(causal))
    return _dispatch("attention", impl, key, (q, k, v), (q[:1], k[:1], v[:1]), run_triton, run_torch,
                     unsupported)


def softmax(x, impl="auto"):
    """Softmax over the last dimension of any-rank x; output in x's dtype."""
    def run_triton(x):
        from .fused_softmax import triton_softmax
        return triton_softmax(x)

    def run_torch():
        return torch.softmax(x.float(), dim=-1).to(x.dtype)

    row = x[:1] if x.dim() > 1 else x
    return _dispatch("softmax", impl, ("softmax", x.dtype, x.shape[-1]), (x,), (row,), run_triton, run_torch)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", impl="auto"):
    """Cross-entropy of (N, V) logits against (N,) targets in fp32 math; reduction none/mean/sum."""
    def run_triton(logits, targets):
        from .fused_cross_entropy import triton_cross_entropy
        return triton_cross_entropy(logits, targets, ignore_index, reduction)

    def run_torch():
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)

    key = ("cross_entropy", logits.dtype, logits.shape[-1])
    return _dispatch("cross_entropy", impl, key, (logits, targets), (logits[:1], targets[:1]), run_triton,
                     run_torch)
