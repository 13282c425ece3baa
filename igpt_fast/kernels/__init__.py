"""Public ops of igpt-fast and their dispatch: attention, softmax, cross_entropy.

impl="auto"   on CUDA, the implementation the per-GPU defaults table (defaults.py, defaults.json)
              names for the call's shape class -- our Triton kernels where GPU runs measured them
              faster than torch's op, torch's op where they did not, ours on GPUs and classes the
              table lacks -- and torch's op for calls the kernels do not cover: attention with
              T_q != T_k (e.g. a KV-cache decode step), D > 128, or fp32 inputs (fp32 attention dots
              miss the tensor cores, spill registers and at D >= 96 can overflow A100 shared memory;
              SDPA runs fp32 well, so Triton attention on CUDA is fp16/bf16 only). Elsewhere (CPU)
              the torch path, and under the Triton interpreter (TRITON_INTERPRET=1, even with
              tensors on a GPU) the torch path for bf16, which the interpreter cannot run. A
              kernel that cannot compile or launch on this GPU (out of shared memory or registers,
              an architecture Triton cannot target) never fails the run: the first call of each
              shape class runs the Triton kernels once on a one-row slice of its inputs (the
              backward too when the inputs need gradients); a Triton error there is logged once as
              a warning with its reason, and that class takes the torch path from then on.
impl="triton" always the Triton kernels; a compile or launch failure raises, and so does a call the
              kernels do not cover (fp32 attention on CUDA included). On CPU this means the Triton
              interpreter: set TRITON_INTERPRET=1 before this package is imported (fp32/fp16 only).
impl="torch"  the torch path (F.scaled_dot_product_attention, torch.softmax, F.cross_entropy).

Decided once per shape class, not per call. A shape class is (op, impl, device, dtype, width -- head
dim or row width --, causal, size bucket -- T or rows, by powers of 2 --, whether gradients are
needed, and for attention whether q, k, v share a shape); its first call resolves it (table lookup,
first-use check, one log line per (op, implementation, reason)) to a function, and every later call
of the class is one dict lookup and that function: the op's torch.autograd.Function, which checks,
allocates and launches, or torch's op. The choice never changes silently mid-run.

Under torch.compile the ops are torch.library.triton_ops (the graph holds the Triton kernels, so a
compiled step can be captured in CUDA graphs); the choice is made while tracing, from the same table,
reusing an eager first-use check's verdict when one ran (a class first seen in a compiled graph gets
no check: run one eager step first). Importing this package is cheap: the Triton modules
(kernels/flash_attention.py, fused_softmax.py, fused_cross_entropy.py) are imported on first Triton
use; they need torch >= 2.6. No submodule shares a name with a public op, so
`igpt_fast.kernels.attention` is always the function. The fp32 test oracles live in reference.py.
"""
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from igpt_fast.options import IMPLS

from . import defaults

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

defaults.load()  # read now, so tracing a first call under torch.compile opens no file
_log = logging.getLogger("igpt_fast.kernels")
_resolved: dict[tuple[Any, ...], Callable[..., torch.Tensor]] = {}  # shape class -> the function its calls run
_fallback: dict[tuple[Any, ...], str] = {}  # (op, device, dtype, width, causal) -> why the Triton kernels failed on it
_logged: set[tuple[str, str, str]] = set()  # (op, implementation, reason) already logged
# The Triton interpreter (read once, at import, like kernels/_common.py) runs fp32/fp16 only: under it impl="auto"
# sends the dtypes it cannot run to the torch path, even where the tensors are on a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_NOT_INTERPRETED = (torch.bfloat16,)


def _capability(x):
    """x's CUDA compute capability (major, minor), None for other tensors: the one place dispatch
    asks about the device (tests patch it to fake a GPU)."""
    return _device_capability(x.get_device()) if x.is_cuda else None


@torch.compiler.assume_constant_result  # a constant while torch.compile traces
def _device_capability(index):
    return torch.cuda.get_device_capability(index)


def _log_once(op, impl, reason=""):
    if (op, impl, reason) not in _logged:
        _logged.add((op, impl, reason))
        _log.info("igpt_fast.kernels.%s: using the %s implementation%s", op, impl, f" ({reason})" if reason else "")


def _describe(cls):
    return f"({', '.join(str(k).replace('torch.', '') for k in cls[2:])})"


def _choose(op, impl, x, width, causal, size, needs_grad, unsupported):
    """"triton" or "torch" for a shape class, and the reason worth logging; no first-use check."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        if unsupported is not None:
            raise ValueError(f"{op}: impl='triton' cannot take this call: {unsupported}; use impl='auto' or 'torch'")
        return "triton", ""
    capability = _capability(x)
    if impl == "torch" or capability is None:
        return "torch", ""
    if unsupported is not None:
        return "torch", unsupported
    if _INTERPRET and x.dtype in _NOT_INTERPRETED:
        return "torch", f"the Triton interpreter (TRITON_INTERPRET=1) cannot run {str(x.dtype).replace('torch.', '')}"
    cls = (op, x.get_device(), x.dtype, width, causal)
    if cls in _fallback:
        return "torch", f"the Triton kernels failed on {_describe(cls)}: {_fallback[cls]}"
    choice, entry = defaults.choose(capability, op, x.dtype, width, causal, size, needs_grad)
    if entry is None:
        return choice, ""
    return choice, (f"defaults table: {entry['mode']} {entry['ours_ms']:.4g} ms ours vs {entry['torch_ms']:.4g} ms "
                    f"torch at size {entry['size']} on {entry['device']}, {entry['date']}")


def _resolve(key, op, impl, inputs, probe, extra, width, causal, size, unsupported, load_triton, run_torch):
    """Resolve a shape class on its first eager call: choose, check the Triton kernels once (auto on
    CUDA) on `probe` (one-row slices of the inputs), log, and remember the function its calls run:
    load_triton() (imported on first use) or run_torch, both called as fn(*inputs, *extra)."""
    needs_grad = torch.is_grad_enabled() and inputs[0].requires_grad
    choice, reason = _choose(op, impl, inputs[0], width, causal, size, needs_grad, unsupported)
    if choice == "triton" and impl == "auto":
        cls = (op, inputs[0].get_device(), inputs[0].dtype, width, causal)
        failure = _first_use_check(load_triton, probe, extra, needs_grad)
        if failure is not None:
            _fallback[cls] = failure
            reason = f"the Triton kernels failed on {_describe(cls)}: {failure}"
            _logged.add((op, "torch", reason))
            _log.warning("igpt_fast.kernels.%s: %s; this class takes the torch path from now on", op, reason)
            choice = "torch"
    _log_once(op, choice, reason)
    fn = _resolved[key] = load_triton() if choice == "triton" else run_torch
    return fn


def _first_use_check(load_triton, probe, extra, needs_grad):
    """Run the Triton path once on `probe`, one-row slices of a call's tensors (same dtype, strides and
    row width, so the same kernels compile), its backward too when needs_grad. None when it ran, else
    the reason it failed. Contract errors (ValueError) and out-of-memory propagate."""
    try:
        from triton.errors import TritonError

        fn = load_triton()
    except ImportError as err:
        return f"ImportError: {err}"
    leaves = [t.detach().requires_grad_(needs_grad and t.is_floating_point()) for t in probe]
    try:
        with torch.set_grad_enabled(needs_grad):
            out = fn(*leaves, *extra)
            if needs_grad:
                out.backward(torch.ones_like(out))
    except (TritonError, RuntimeError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        text = str(err).strip()
        return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
    return None


def _grad_needed(x):
    return x.requires_grad and torch.is_grad_enabled()


def _traced_choice(op, impl, x, width, causal, size, unsupported):
    """The implementation while torch.compile traces: the table and any eager first-use verdict
    (_fallback); no check can run inside a graph."""
    return _choose(op, impl, x, width, causal, size, _grad_needed(x), unsupported)[0]


def _attention_triton():
    from .flash_attention import _FlashAttention
    return _FlashAttention.apply


def _attention_torch(q, k, v, causal, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _attention_cudnn(q, k, v, causal, scale):
    """SDPA with cuDNN tried first (then torch's usual order): the torch path where the defaults table
    measured forced cuDNN faster than torch's default choice (torch_backend "cudnn")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _attention_torch_path(q, width, causal, size):
    """The torch function of an attention shape class: cuDNN first where the table says it wins."""
    capability = _capability(q)
    if capability is not None and defaults.torch_backend(capability, "attention", q.dtype, width, causal, size,
                                                         _grad_needed(q)) == "cudnn":
        return _attention_cudnn
    return _attention_torch


def _attention_unsupported(q, k, v):
    if q.shape != k.shape or q.shape != v.shape:
        return "q, k, v shapes differ"
    if q.shape[-1] > 128:
        return "head dim > 128"
    if q.dtype == torch.float32 and _capability(q) is not None:
        return "fp32 attention on CUDA takes SDPA"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
              impl: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, D) tensors; causal for AR, not for BERT."""
    T, D = q.shape[-2:]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    causal = bool(causal)
    if torch.compiler.is_compiling():
        if _traced_choice("attention", impl, q, D, causal, T, _attention_unsupported(q, k, v)) == "torch":
            return _attention_torch(q, k, v, causal, scale)
        from .flash_attention import flash_attention
        return flash_attention(q, k, v, causal, scale)
    key = ("attention", impl, q.get_device(), q.dtype, D, causal, T.bit_length(), _grad_needed(q),
           q.shape == k.shape == v.shape)
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolve(key, "attention", impl, (q, k, v), (q[:1], k[:1], v[:1]), (causal, scale), D, causal, T,
                      _attention_unsupported(q, k, v), _attention_triton, _attention_torch_path(q, D, causal, T))
    return fn(q, k, v, causal, scale)


def _softmax_triton():
    from .fused_softmax import _Softmax
    return _Softmax.apply


def _softmax_torch(x):
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def softmax(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Softmax over the last dimension of any-rank x; output in x's dtype."""
    W = x.shape[-1] if x.dim() else 1
    rows = x.numel() // W if W else 0
    if torch.compiler.is_compiling():
        if _traced_choice("softmax", impl, x, W, None, rows, None) == "torch":
            return _softmax_torch(x)
        from .fused_softmax import triton_softmax
        return triton_softmax(x)
    key = ("softmax", impl, x.get_device(), x.dtype, W, rows.bit_length(), _grad_needed(x))
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolve(key, "softmax", impl, (x,), (x[:1] if x.dim() > 1 else x,), (), W, None, rows, None,
                      _softmax_triton, _softmax_torch)
    return fn(x)


def _cross_entropy_triton():
    from .fused_cross_entropy import triton_cross_entropy
    return triton_cross_entropy


def _cross_entropy_torch(logits, targets, ignore_index, reduction):
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of (N, V) logits against (N,) targets in fp32 math; reduction none/mean/sum."""
    N, V = logits.shape[0], logits.shape[-1]
    if torch.compiler.is_compiling():
        if _traced_choice("cross_entropy", impl, logits, V, None, N, None) == "torch":
            return _cross_entropy_torch(logits, targets, ignore_index, reduction)
        return _cross_entropy_triton()(logits, targets, ignore_index, reduction)
    key = ("cross_entropy", impl, logits.get_device(), logits.dtype, V, N.bit_length(), _grad_needed(logits))
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolve(key, "cross_entropy", impl, (logits, targets), (logits[:1], targets[:1]),
                      (ignore_index, reduction), V, None, N, None, _cross_entropy_triton, _cross_entropy_torch)
    return fn(logits, targets, ignore_index, reduction)
