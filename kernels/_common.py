"""Helpers the three Triton kernel modules share: the interpreter flag, base-2 constants, output
allocation, the device/dtype checks every launcher runs first, the two ways to launch a kernel and
the torch op registration.

INTERPRET is read once, at import: TRITON_INTERPRET=1 must be set before Triton and this package are
imported (tests/conftest.py does it for the test suite). LOG2E and LN2 are `tl.constexpr` so that
@triton.jit code can read them as globals (the Triton compiler rejects a plain Python float global).

Each kernel module has one launcher per direction (e.g. `_flash_attn_forward`), which takes the launch
function as an argument: the eager `torch.autograd.Function` passes `launch` (kernel[grid](...)), the
`torch.library.triton_op` passes `launch_traceable` (wrap_triton, so torch.compile sees the kernel),
and `launch_specs` (tools/compile_check.py) passes one that records the launch. A kernel's signature
therefore lives in one place. Needs torch >= 2.6 (torch.library.triton_op).

Under the interpreter the kernels are not JITFunctions, which torch.compile needs to capture a
kernel, so there `kernel_op` registers an opaque torch.library.custom_op instead (OPAQUE_OPS; its
fake runs the same body with the launches skipped), and compiled graphs call it as one op.
"""
import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from triton.runtime import _allocation

if not hasattr(torch.library, "triton_op"):
    raise ImportError(f"igpt-fast's Triton kernels need torch >= 2.6 (torch.library.triton_op), found "
                      f"{torch.__version__}; use impl='torch'")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
OPAQUE_OPS = INTERPRET  # read when the kernel modules register their ops (tests set it before importing them)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def empty(like, shape, dtype=None):
    """Allocate a kernel output; the tests swap this for a NaN-filled allocator to catch unwritten elements."""
    return like.new_empty(shape, dtype=dtype)


def check_device(op, x):
    """Raise a one-line error when x cannot run the Triton kernels here: a CPU tensor without the
    interpreter, or bf16 under the interpreter (which has no bf16)."""
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError(f"{op}: CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 "
                           "before importing igpt_fast.kernels, or use impl='torch'")
    if INTERPRET and x.dtype == torch.bfloat16:
        raise ValueError(f"{op}: the Triton interpreter has no bf16; use fp16/fp32 or a GPU")


def launch(kernel, grid, args, meta):
    """The eager launch: kernel[grid](*args, **meta), grid a tuple. Every eager launch goes through
    here, so one test seam can make a launch fail (or a benchmark make it a no-op)."""
    kernel[grid](*args, **meta)


def launch_traceable(kernel, grid, args, meta):
    """The launch inside a kernel_op: wrap_triton records the kernel in a traced graph (eagerly it is
    the kernel itself). In an opaque op's fake (fake tensors: shapes only) there is nothing to launch."""
    if OPAQUE_OPS:
        if not any(isinstance(a, FakeTensor) for a in args):
            kernel[grid](*args, **meta)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def kernel_op(name):
    """Decorator registering a launcher-calling function (type-annotated) as the torch op `name`:
    torch.library.triton_op, or with OPAQUE_OPS a custom_op whose fake is the same function."""
    def register(fn):
        if not OPAQUE_OPS:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return register


def _scratch(size, alignment, stream):
    """Triton's global scratch (the tensor descriptors a kernel builds in device code) from torch's
    caching allocator, on the current device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


_NULL_ALLOCATOR = getattr(_allocation, "_NULL_ALLOCATOR", None)  # both private: None where a triton lacks them
_ALLOCATOR = getattr(_allocation, "_allocator", None)


def ensure_scratch_allocator():
    """Give Triton an allocator for kernel scratch unless one is set. Triton keeps it in a ContextVar, so
    a thread that never set one (autograd's backward threads do not inherit it) gets ours on its first
    launch; torch.compile's own launcher sets its own."""
    if _ALLOCATOR is None or _NULL_ALLOCATOR is None or _ALLOCATOR.get() is _NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


def cdiv(a, b):
    return -(-a // b)
