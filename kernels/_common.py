"""Helpers the three Triton kernel modules share: the interpreter flag, base-2 constants, output
allocation and the device/dtype checks every launcher runs first.

INTERPRET is read once, at import: TRITON_INTERPRET=1 must be set before Triton and this package are
imported (tests/conftest.py does it for the test suite). LOG2E and LN2 are `tl.constexpr` so that
@triton.jit code can read them as globals (the Triton compiler rejects a plain Python float global).
"""
import os

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
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
    """Launch a @triton.jit (or autotuned) kernel: kernel[grid](*args, **meta). Every launch goes
    through here, so one test seam can make a launch fail."""
    kernel[grid](*args, **meta)
