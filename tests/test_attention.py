"""Tests for kernels/flash_attention.py: Triton flash attention vs an fp64 reference.

Rule (flash-attention's): the kernel's max error against fp64 may be at most 2x the error of plain
PyTorch attention computed in the same dtype, plus a small absolute floor; outputs and dq/dk/dv.
Without CUDA the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
in fp32 and fp16; on CUDA (where fp32 attention goes to SDPA) in fp16 and bf16. Every kernel output is allocated NaN-filled, so an element a kernel forgets to
write fails the comparison.

Covering set (the interpreter is slow, so not the full cross product): each of T in
{1, 17, 100, 256, 576} and D in {32, 64, 96, 128}, causal and not, in both dtypes (_COVER); plus
the causal flags flipped for T <= 256 in fp32 (fp16 on CUDA) (_COVER_FLIPPED). B * H > 1 everywhere. CUDA-only
(skipped here): bf16 on the covering set, T = 4096 and 16384, torch.compile vs eager.
"""
import math
import os

import pytest
import torch

from igpt_fast.kernels import attention
from igpt_fast.kernels.reference import attention_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA and TRITON_INTERPRET is not set")

_COVER = [(1, 32, True), (17, 64, False), (100, 96, True), (256, 128, False), (576, 64, True)]
_COVER_FLIPPED = [(1, 128, False), (17, 32, True), (100, 64, False), (256, 96, True)]
_FLOOR = {torch.float32: 4e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
# The kernels take fp32 only under the interpreter (on CUDA fp32 goes to SDPA), so on a GPU the tests
# that run one precise dtype use fp16, and the covering set runs in fp16 and bf16.
PRECISE = torch.float16 if CUDA else torch.float32
COVER_DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _nan_outputs(nan_outputs):
    """Kernel outputs start as NaN: an unwritten element shows up as a NaN error."""


def _naive(q, k, v, causal, scale=None):
    """Plain PyTorch attention with every step in the inputs' dtype (the error baseline)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, T)
    if causal:
        T = q.shape[-2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)  # (B, H, T, D)


def _run(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn on leaf copies of q, k, v."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def _check(q, k, v, causal, scale=None):
    from igpt_fast.kernels.flash_attention import flash_attention

    do = torch.randn_like(q)
    ref = _run(lambda a, b, c: attention_ref(a, b, c, causal, scale), q.double(), k.double(), v.double(), do)
    ours = _run(lambda a, b, c: flash_attention(a, b, c, causal, scale), q, k, v, do)
    base = _run(lambda a, b, c: _naive(a, b, c, causal, scale), q, k, v, do)
    for name, r, o, b in zip(("out", "dq", "dk", "dv"), ref, ours, base):
        assert o.dtype == q.dtype and o.shape == q.shape
        err = (o.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + _FLOOR[q.dtype], (
            f"{name}: kernel error {err:.3g} > 2 x torch error {base_err:.3g} + {_FLOOR[q.dtype]:g}")


def _inputs(T, D, dtype, B=None, H=2, seed=0):
    B = B if B is not None else (2 if T <= 100 else 1)
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", COVER_DTYPES, ids=str)
@pytest.mark.parametrize("T,D,causal", _COVER)
def test_attention_matches_reference(T, D, causal, dtype):
    _check(*_inputs(T, D, dtype), causal)


@pytest.mark.parametrize("T,D,causal", _COVER_FLIPPED)
def test_attention_matches_reference_flipped_causal(T, D, causal):
    _check(*_inputs(T, D, PRECISE), causal)


def test_attention_strided_inputs_and_scale():
    """q, k, v as views of one fused (B, T, 3, H, D) projection, with a custom scale."""
    B, T, H, D = 2, 40, 3, 32
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE, dtype=PRECISE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D), non-contiguous
    _check(q, k, v, causal=True, scale=0.3)


def test_dispatch_torch_and_triton_agree():
    q, k, v = _inputs(33, 64, PRECISE)
    tol = 1e-5 if PRECISE == torch.float32 else 2e-3
    for causal in (True, False):
        ours = attention(q, k, v, causal=causal, impl="triton")
        torch_path = attention(q, k, v, causal=causal, impl="torch")
        torch.testing.assert_close(ours, torch_path, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, k, v, impl="cuda")


def test_bad_shapes_raise_readable_errors():
    from igpt_fast.kernels.flash_attention import flash_attention

    q, k, v = _inputs(8, 32, torch.float32)
    with pytest.raises(ValueError, match="share one"):
        flash_attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="D <= 128"):
        flash_attention(*_inputs(8, 160, torch.float32))


def test_custom_op_registration():
    """The custom op's fake, schema and autograd registrations agree with the real kernel."""
    from igpt_fast.kernels.flash_attention import _flash_attn_fwd_op

    q, k, v = (x.requires_grad_() for x in _inputs(17, 32, PRECISE))
    torch.library.opcheck(_flash_attn_fwd_op, (q, k, v, True, 0.2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiled_graph_matches_eager_aot_eager():
    """torch.compile traces the op (fake tensors + autograd) without graph breaks; CPU-cheap backend."""
    q, k, v = _inputs(20, 32, PRECISE)

    def f(q, k, v):
        return attention(q * 2, k, v, causal=True, impl="triton").sin().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    eager = _run(lambda a, b, c: f(a, b, c).reshape(1), q, k, v, torch.ones(1, device=DEVICE))
    comp = _run(lambda a, b, c: compiled(a, b, c).reshape(1), q, k, v, torch.ones(1, device=DEVICE))
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("T,D,causal", _COVER + _COVER_FLIPPED)
def test_attention_bf16_cuda(T, D, causal):
    _check(*_inputs(T, D, torch.bfloat16), causal)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [4096, 16384])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_long_cuda(T, causal):
    D = 64
    q, k, v = _inputs(T, D, torch.bfloat16, B=1, H=1 if T > 4096 else 2)
    _check(q, k, v, causal)


@pytest.mark.cuda
def test_attention_compile_vs_eager_cuda():
    torch.manual_seed(0)
    B, T, H, D = 2, 576, 4, 64
    proj = torch.nn.Linear(H * D, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16)

    def f(x):
        q, k, v = proj(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        return attention(q, k, v, causal=True, impl="triton").float().square().mean()

    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, compiled):
        proj.zero_grad()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), proj.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-3, rtol=1e-2)


def test_public_op_survives_submodule_import():
    """Importing the kernel module leaves the package's public op a function."""
    import igpt_fast.kernels as kernels
    from igpt_fast.kernels.flash_attention import flash_attention  # noqa: F401

    assert kernels.attention is attention and callable(kernels.attention)
