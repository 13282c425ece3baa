"""Tests for kernels/fused_softmax.py: Triton row softmax (forward and backward) vs an fp64 reference.

Rule: the kernel's max error against fp64 is at most 2x that of torch.softmax in the same dtype plus
a small floor. Widths cover the single-tile path (1, 3, 17, 512, 1000, 8192) and the looped online
path (8193, 20000); ranks 1 to 4; fp32 and fp16 under the Triton interpreter, bf16 on CUDA only.
Outputs are allocated NaN-filled so an unwritten element fails.
"""
import os

import pytest
import torch

from igpt_fast.kernels import softmax
from igpt_fast.kernels.reference import softmax_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA and TRITON_INTERPRET is not set")
_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _nan_outputs(nan_outputs):
    """Kernel outputs start as NaN: an unwritten element shows up as a NaN error."""


def _check(x):
    from igpt_fast.kernels.fused_softmax import triton_softmax

    dy = torch.randn_like(x)
    results = []
    for fn, inp in ((softmax_ref, x.double()), (triton_softmax, x), (lambda t: torch.softmax(t, -1), x)):
        leaf = inp.detach().clone().requires_grad_()
        y = fn(leaf)
        y.backward(dy.to(y.dtype))
        results.append((y.detach(), leaf.grad))
    (ref_y, ref_dx), (y, dx), (base_y, base_dx) = results
    assert y.dtype == x.dtype and y.shape == x.shape and dx.shape == x.shape
    for name, r, o, b in (("y", ref_y, y, base_y), ("dx", ref_dx, dx, base_dx)):
        err = (o.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + _FLOOR[x.dtype], f"{name}: error {err:.3g} vs torch {base_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(5, 1), (3, 3), (2, 3, 17), (4, 512), (2, 2, 3, 1000), (2, 8192),
                                   (2, 8193), (20000,)])
def test_softmax_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    _check((3 * torch.randn(shape, generator=g)).to(DEVICE, dtype))


def test_softmax_strided_and_extreme_inputs():
    x = torch.randn(6, 40, device=DEVICE)[:, ::2]  # (6, 20), last-dim stride 2
    x[0, 3] = 80.0
    x[1] = -1e4
    _check(x)


def test_softmax_dispatch():
    x = torch.randn(3, 7, 33, device=DEVICE)
    torch.testing.assert_close(softmax(x, impl="triton"), softmax(x, impl="torch"), atol=1e-6, rtol=1e-5)


def test_softmax_compiles():
    x = torch.randn(4, 50, device=DEVICE, requires_grad=True)
    compiled = torch.compile(lambda t: softmax(t * 2, impl="triton").square().sum(), backend="aot_eager",
                             fullgraph=True)
    compiled(x).backward()
    g_compiled = x.grad.clone()
    x.grad = None
    softmax(x * 2, impl="triton").square().sum().backward()
    torch.testing.assert_close(g_compiled, x.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(7, 1), (64, 512), (3, 1000), (4, 16384), (2, 40000)])
def test_softmax_bf16_cuda(shape):
    _check(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
