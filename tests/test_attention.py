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
    _check_views(torch.randn(2, 40, 3, 3, 32, device=DEVICE, dtype=PRECISE),  # (B, T, 3, H, D)
                 lambda qkv: qkv.permute(2, 0, 3, 1, 4).unbind(0), causal=True, scale=0.3)  # each (B, H, T, D)


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
@pytest.mark.parametrize("io", ["pointer", "tma"])
def test_attention_compile_vs_eager_cuda(io):
    """Inductor's launch of our kernels matches the eager Function; with io "tma" Inductor also provides the
    descriptors' scratch (its launcher sets Triton's allocator), in forward and backward."""
    from igpt_fast.kernels.flash_attention import use_configs

    with use_configs(dict(io=io)):
        _compile_vs_eager_cuda()


def _compile_vs_eager_cuda():
    torch._dynamo.reset()
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


# Every kernel variant (the launch plan's bwd, order and io, tests/test_attention.py's default being
# split + natural + pointer) on one small set of odd shapes: outputs and gradients against fp64.
_VARIANT_CONFIGS = [dict(bwd="fused_atomic"), dict(order="heavy_first"), dict(bwd="fused_atomic", order="heavy_first"),
                    dict(io="tma"), dict(io="tma", order="heavy_first")]
_VARIANT_COVER = [(17, 32, True), (100, 96, False), (130, 64, True)]


@pytest.mark.parametrize("config", _VARIANT_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("T,D,causal", _VARIANT_COVER)
def test_attention_variants_match_reference(config, T, D, causal):
    from igpt_fast.kernels.flash_attention import use_configs

    dtype = torch.float16 if T == 130 else PRECISE
    with use_configs(config):
        _check(*_inputs(T, D, dtype), causal)


def test_attention_variant_tiles_match_reference():
    """The fused backward with a tile other than the interpreter's default (BLOCK_M1 = BLOCK_N1)."""
    from igpt_fast.kernels.flash_attention import use_configs

    with use_configs(dict(bwd="fused_atomic", fused=[32, 32, 4, 1], fwd=[32, 32, 4, 1])):
        _check(*_inputs(70, 64, PRECISE), causal=True)


def _tma_launches(monkeypatch):
    """Record, for every attention launch, whether it ran with tensor descriptors (TMA)."""
    from igpt_fast.kernels import flash_attention as fa

    seen = []
    real = fa._tma_meta

    def spy(meta, *tensors):
        out = real(meta, *tensors)
        seen.append(out["TMA"])
        return out

    monkeypatch.setattr(fa, "_tma_meta", spy)
    return seen


def _check_views(base, split, causal=True, scale=None):
    """q, k, v = split(buffer), views of one buffer passed as they are (not copies): output and the buffer's
    gradient against fp64, within _check's rule."""
    from igpt_fast.kernels.flash_attention import flash_attention

    do = torch.randn_like(split(base)[0])
    results = []
    for fn, dtype in ((attention_ref, torch.float64), (flash_attention, base.dtype), (_naive, base.dtype)):
        leaf = base.detach().to(dtype).requires_grad_()
        out = fn(*split(leaf), causal, scale)
        out.backward(do.to(dtype))
        results.append((out.detach(), leaf.grad))
    for ref, ours, naive in zip(*results):
        err, base_err = ((x.double() - ref).abs().max().item() for x in (ours, naive))
        assert err <= 2 * base_err + _FLOOR[base.dtype], (err, base_err)


def test_attention_tma_strided_views_and_fallback(monkeypatch):
    """io "tma": descriptors over strided views of one fused projection (each (batch, head) plane its own
    descriptor, bounded by T and D, so ragged tiles neither read the next head nor write past the end);
    a head dim whose rows break TMA's 16-byte rule (D = 20 in fp16: 40-byte rows), or a k / v starting off a
    16-byte boundary, falls back to pointer I/O, same results. The fused backward never takes descriptors."""
    from igpt_fast.kernels import flash_attention as fa

    seen = _tma_launches(monkeypatch)
    with fa.use_configs(dict(io="tma")):
        _check_views(torch.randn(2, 45, 3, 3, 32, device=DEVICE, dtype=PRECISE),  # (B, T, 3, H, D)
                     lambda qkv: qkv.permute(2, 0, 3, 1, 4).unbind(0), causal=True, scale=0.3)
        assert seen == [True, True, True]  # forward, dK/dV, dQ
        seen.clear()
        _check(*_inputs(33, 20, torch.float16), causal=False)
        assert seen == [False, False, False]
        seen.clear()  # views of one buffer with aligned strides, k and v starting off a 16-byte boundary
        _check_views(torch.randn(2, 2, 30, 104, device=DEVICE, dtype=torch.float16),  # 208-byte rows
                     lambda x: (x[..., :32], x[..., 36:68], x[..., 68:100]))
        assert seen == [False, False, False]
        seen.clear()  # the same with every view on a 16-byte boundary: descriptors over the views themselves
        _check_views(torch.randn(2, 2, 30, 104, device=DEVICE, dtype=torch.float16),
                     lambda x: (x[..., :32], x[..., 40:72], x[..., 72:104]))
        assert seen == [True, True, True]
    seen.clear()
    with fa.use_configs(dict(io="tma", bwd="fused_atomic")):
        _check(*_inputs(40, 32, PRECISE), causal=True)
        plan = fa._plan_for(_inputs(40, 32, PRECISE)[0], True)
        assert plan["fwd"][2]["TMA"] and not plan["fused"][2]["TMA"]


def test_scratch_allocator_per_thread_and_never_replaced():
    """Triton keeps its scratch allocator in a ContextVar that new threads (autograd's backward threads)
    do not inherit: ensure_scratch_allocator sets ours where none is set, and keeps a user's."""
    import threading

    import triton
    from triton.runtime import _allocation

    from igpt_fast.kernels import _common

    seen = {}

    def fresh_thread():
        seen["before"] = _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
        _common.ensure_scratch_allocator()
        seen["ours"] = _allocation._allocator.get() is _common._scratch

        def mine(size, alignment, stream):
            return None

        triton.set_allocator(mine)
        _common.ensure_scratch_allocator()
        seen["kept"] = _allocation._allocator.get() is mine

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert seen == dict(before=True, ours=True, kept=True)


def test_attention_config_from_environment(monkeypatch):
    """IGPT_FAST_ATTENTION_CONFIG selects a variant without code; a bad one raises a readable error."""
    from igpt_fast.kernels import flash_attention as fa

    monkeypatch.setattr(fa, "_PLANS", {})
    monkeypatch.setenv("IGPT_FAST_ATTENTION_CONFIG", '{"bwd": "fused_atomic", "order": "heavy_first"}')
    q = _inputs(40, 32, PRECISE)[0]
    plan = fa._plan_for(q, True)
    assert plan["bwd"] == "fused_atomic" and plan["fwd"][2]["HEAVY_FIRST"]
    _check(*_inputs(40, 32, PRECISE), causal=True)
    monkeypatch.setattr(fa, "_PLANS", {})
    monkeypatch.setenv("IGPT_FAST_ATTENTION_CONFIG", '{"bwd": "atomic"}')
    with pytest.raises(ValueError, match="bwd must be one of"):
        fa._plan_for(q, True)


def test_attention_config_validation():
    from igpt_fast.kernels.flash_attention import attention_configs, check_config

    with pytest.raises(ValueError, match="unknown key"):
        check_config(dict(tiles=[1, 2, 3, 4]))
    with pytest.raises(ValueError, match="rows % cols"):
        check_config(dict(fwd=[64, 128, 4, 3]))
    with pytest.raises(ValueError, match="cols % rows"):
        check_config(dict(fused=[64, 32, 4, 3]))
    with pytest.raises(ValueError, match="io must be one of"):
        check_config(dict(io="bulk"))
    configs = attention_configs((9, 0), 64, dict(bwd="fused_atomic", fused=(32, 128, 8, 2)))
    assert configs["bwd"] == "fused_atomic" and configs["order"] == "natural" and configs["io"] == "pointer"
    assert configs["fused"] == dict(BLOCK_M1=32, BLOCK_N1=128, num_warps=8, num_stages=2)
    assert configs["fwd"] == dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    assert attention_configs((9, 0), 64, dict(io="tma"))["io"] == "tma"  # TMA hardware from sm_90 on
    assert attention_configs((8, 0), 64, dict(io="tma"))["io"] == "pointer"
    assert attention_configs(None, 64, dict(io="tma"))["io"] == "tma"  # the interpreter runs the descriptors


def test_attention_table_config_lookup(tmp_path):
    """The defaults table's config and torch backend for a class: the fwd+bwd entry nearest in T."""
    from igpt_fast.kernels import defaults

    path = str(tmp_path / "defaults.json")
    base = dict(capability="9.0", op="attention", dtype="bf16", width=64, causal=True, mode="fwd+bwd",
                device="test", date="2026-12-05", commit="x", torch="t", triton="3.6.0", source="test")
    defaults.record([dict(base, size=1024, ours_ms=1.0, torch_ms=2.0, config=dict(order="heavy_first"),
                          torch_backend="cudnn"),
                     dict(base, size=16384, ours_ms=3.0, torch_ms=2.0, config=dict(bwd="fused_atomic"))], path)
    assert defaults.config((9, 0), "attention", torch.bfloat16, 64, True, 1500, path) == dict(order="heavy_first")
    assert defaults.config((9, 0), "attention", torch.float16, 64, True, 9000, path) == dict(bwd="fused_atomic")
    assert defaults.config((9, 0), "attention", torch.bfloat16, 64, False, 1024, path) is None
    assert defaults.torch_backend((9, 0), "attention", torch.bfloat16, 64, True, 1024, True, path) == "cudnn"
    assert defaults.torch_backend((9, 0), "attention", torch.bfloat16, 64, True, 16384, True, path) == "default"


def test_attention_torch_path_forces_cudnn_where_the_table_says(monkeypatch):
    """impl="auto"'s torch path: cuDNN first for a class whose table entry has torch_backend "cudnn"."""
    import igpt_fast.kernels as kernels

    monkeypatch.setattr(kernels, "_capability", lambda x: (9, 0))
    monkeypatch.setattr(kernels.defaults, "torch_backend",
                        lambda cap, op, dtype, width, causal, size, grad: "cudnn" if causal else "default")
    q = _inputs(16, 32, torch.float32)[0]
    assert kernels._attention_torch_path(q, 32, True, 16) is kernels._attention_cudnn
    assert kernels._attention_torch_path(q, 32, False, 16) is kernels._attention_torch
    torch.testing.assert_close(kernels._attention_cudnn(q, q, q, True, 0.2), kernels._attention_torch(q, q, q, True, 0.2))
