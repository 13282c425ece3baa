"""Tests for kernels/fused_cross_entropy.py: fused softmax + cross-entropy vs an fp64 reference.

Rule: loss and logits-gradient errors against fp64 at most 2x those of F.cross_entropy in the same
dtype plus a floor (F.cross_entropy upcasts nothing, so its fp16 gradient is the baseline). Covered:
V in {1, 17, 512 (the palette), 1000, 5000 (looped tiles)}, reductions none/mean/sum with a random
per-row grad_output, ignore_index (including every row ignored), int32 targets, fp32 and fp16 under
the interpreter, bf16 on CUDA. Kernel outputs are NaN-filled before launch.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from igpt_fast.kernels import cross_entropy
from igpt_fast.kernels.reference import cross_entropy_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA and TRITON_INTERPRET is not set")
_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _nan_outputs(nan_outputs):
    """Kernel outputs start as NaN: an unwritten element shows up as a NaN error."""


def _inputs(N, V, dtype, ignore_every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(N, V, generator=g)).to(DEVICE, dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::ignore_every] = -100
    return logits, targets.to(DEVICE)


def _check(logits, targets, reduction, ignore_index=-100):
    from igpt_fast.kernels.fused_cross_entropy import triton_cross_entropy

    gout = torch.randn(targets.shape[0] if reduction == "none" else (), device=logits.device).abs() + 0.5
    results = []
    for fn, inp in ((cross_entropy_ref, logits.double()), (triton_cross_entropy, logits), (F.cross_entropy, logits)):
        leaf = inp.detach().clone().requires_grad_()
        loss = fn(leaf, targets, ignore_index=ignore_index, reduction=reduction)
        loss.backward(gout.to(loss.dtype))
        results.append((loss.detach(), leaf.grad))
    (ref_l, ref_g), (loss, grad), (base_l, base_g) = results
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype and grad.shape == logits.shape
    for name, r, o, b in (("loss", ref_l, loss, base_l), ("grad", ref_g, grad, base_g)):
        err = (o.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + _FLOOR[logits.dtype], f"{name}: error {err:.3g} vs torch {base_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,V", [(7, 1), (9, 17), (33, 512), (5, 1000), (4, 5000)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_matches_reference(N, V, reduction, dtype):
    _check(*_inputs(N, V, dtype), reduction)


def test_cross_entropy_custom_ignore_index_and_int32_targets():
    logits, targets = _inputs(20, 512, torch.float32)
    targets = targets.masked_fill(targets == -100, 7).to(torch.int32)
    _check(logits, targets.long(), "mean", ignore_index=7)
    from igpt_fast.kernels.fused_cross_entropy import triton_cross_entropy

    torch.testing.assert_close(triton_cross_entropy(logits, targets, ignore_index=7),
                               F.cross_entropy(logits, targets.long(), ignore_index=7))


def test_cross_entropy_all_ignored_matches_torch():
    """Mean over zero rows is nan (like F.cross_entropy) and the gradient is zero (also like it)."""
    logits = torch.randn(4, 17, device=DEVICE, requires_grad=True)
    targets = torch.full((4,), -100, device=DEVICE)
    loss = cross_entropy(logits, targets, impl="triton")
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, targets))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_no_grad_and_errors():
    from igpt_fast.kernels.fused_cross_entropy import triton_cross_entropy

    logits, targets = _inputs(6, 512, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(triton_cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    with pytest.raises(ValueError, match="reduction"):
        triton_cross_entropy(logits, targets, reduction="avg")
    if not CUDA:
        with pytest.raises(ValueError, match="outside"):
            triton_cross_entropy(logits, targets.clamp(min=0) + 512)


def test_cross_entropy_dispatch_and_compile():
    logits, targets = _inputs(16, 512, torch.float32)
    torch.testing.assert_close(cross_entropy(logits, targets, impl="triton"),
                               cross_entropy(logits, targets, impl="torch"))
    x = logits.clone().requires_grad_()

    def f(t):
        return cross_entropy(t * 0.5, targets, impl="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled(x).backward()
    g_compiled = x.grad.clone()
    x.grad = None
    f(x).backward()
    torch.testing.assert_close(g_compiled, x.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("N,V", [(4096, 512), (100, 17), (64, 50000)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_bf16_cuda(N, V, reduction):
    _check(*_inputs(N, V, torch.bfloat16), reduction)


def test_cross_entropy_reduces_across_many_programs():
    """The kernel's sum and mean over more partials than its last program adds per step (1025 programs
    of 4 rows), with strided targets; 'none' with the stride-0 grad_output of a later .sum(). Sums of
    4000 terms: a few ulp of fp32 from the fp64 reference, whatever the order."""
    logits, targets = _inputs(4099, 512, torch.float32, ignore_every=5)
    strided = torch.stack([targets, targets], 1)[:, 0]  # (N,), stride 2
    for reduction in ("mean", "sum"):
        ref = cross_entropy_ref(logits.double(), targets, reduction=reduction)
        leaf = logits.clone().requires_grad_()
        loss = cross_entropy(leaf, strided, reduction=reduction, impl="triton")
        loss.backward()
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
        base = logits.clone().requires_grad_()
        F.cross_entropy(base, targets, reduction=reduction).backward()
        torch.testing.assert_close(leaf.grad, base.grad)
    leaf = logits.clone().requires_grad_()
    cross_entropy(leaf, strided, reduction="none", impl="triton").sum().backward()
    torch.testing.assert_close(leaf.grad, base.grad)


def test_cross_entropy_no_rows_matches_torch():
    logits = torch.randn(0, 17, device=DEVICE, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        loss = cross_entropy(logits, targets, reduction=reduction, impl="triton")
        torch.testing.assert_close(loss, F.cross_entropy(logits, targets, reduction=reduction), equal_nan=True)
