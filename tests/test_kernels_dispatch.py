"""Tests for the dispatch in kernels/__init__.py: which implementation a call gets, the fp32-on-CUDA
rule, and the fallback that keeps a kernel which cannot compile or launch from failing a run.

No GPU needed: `_is_cuda` (dispatch's one device question) is patched to say "CUDA" while the kernels
run under the Triton interpreter, and `_common.launch` (where every kernel launch goes) is patched to
raise Triton's OutOfResources for chosen kernels, as a real GPU would for a config that does not fit.
"""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import igpt_fast.kernels as kernels
from igpt_fast.kernels import attention, cross_entropy, softmax

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="fakes CUDA over the Triton interpreter")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Dispatch sees every tensor as CUDA, with fresh once-per-class state."""
    monkeypatch.setattr(kernels, "_is_cuda", lambda x: True)
    for name in ("_checked", "_logged"):
        monkeypatch.setattr(kernels, name, set())
    monkeypatch.setattr(kernels, "_fallback", {})


@pytest.fixture
def launches(monkeypatch):
    """launches(failing=()) -> a list that records the name of every kernel launched from then on;
    launches of the kernels named in `failing` raise OutOfResources instead of running."""
    from triton.runtime.errors import OutOfResources

    from igpt_fast.kernels import _common

    real = _common.launch

    def install(failing=()):
        names = []

        def launch(kernel, grid, args, meta):
            names.append(kernel.__name__)
            if kernel.__name__ in failing:
                raise OutOfResources(300_000, 232_448, "shared memory")
            real(kernel, grid, args, meta)

        monkeypatch.setattr(_common, "launch", launch)
        return names
    return install


def _qkv(T=24, D=32, dtype=torch.float16, grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, T, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def _grads(fn, inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.float().sum().backward()
    return out.detach(), [x.grad for x in leaves]


def test_auto_on_cpu_takes_torch_path(launches):
    names = launches()
    q, k, v = _qkv(dtype=torch.float32)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert names == []


def test_auto_on_cuda_checks_each_class_once_then_runs_triton(fake_cuda, launches):
    names = launches()
    q, k, v = _qkv()
    out, grads = _grads(lambda a, b, c: attention(a, b, c, causal=True), (q, k, v))
    # first use: a one-row probe (forward + the three backward kernels), then the real call and its backward
    assert names == ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                     "_attn_bwd_dq_kernel"] * 2
    names.clear()
    ref, ref_grads = _grads(lambda a, b, c: attention(a, b, c, causal=True, impl="triton"), (q, k, v))
    assert len(names) == 4  # impl="triton": no probe
    torch.testing.assert_close(out, ref)
    names.clear()
    _grads(lambda a, b, c: attention(a, b, c, causal=True), (q, k, v))
    assert names == ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                     "_attn_bwd_dq_kernel"]  # class already checked: the call alone


def test_backward_launch_failure_falls_back_once_per_class(fake_cuda, launches, caplog):
    names = launches(failing={"_attn_bwd_dkdv_kernel"})
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="igpt_fast.kernels"):
        out, grads = _grads(lambda a, b, c: attention(a, b, c, causal=True), (q, k, v))
    assert names == ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "OutOfResources" in warnings[0] and "float16, 32, True" in warnings[0]
    ref, ref_grads = _grads(lambda a, b, c: attention(a, b, c, causal=True, impl="torch"), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)

    names.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="igpt_fast.kernels"):
        _grads(lambda a, b, c: attention(a, b, c, causal=True), (q, k, v))
    assert names == [] and not caplog.records  # the class stays on the torch path, silently
    attention(q, k, v, causal=False)  # another class is tried on its own
    assert names[0] == "_attn_fwd_kernel"


def test_forward_only_calls_probe_forward_only(fake_cuda, launches):
    names = launches(failing={"_attn_bwd_dkdv_kernel"})
    q, k, v = _qkv(grad=False)
    with torch.no_grad():
        attention(q, k, v, causal=False)
    assert names == ["_attn_fwd_kernel"] * 2 and not kernels._fallback


def test_impl_triton_raises_launch_failures(fake_cuda, launches):
    from triton.runtime.errors import OutOfResources

    launches(failing={"_attn_fwd_kernel"})
    with pytest.raises(OutOfResources):
        attention(*_qkv(), impl="triton")


def test_out_of_memory_is_not_a_fallback(fake_cuda, monkeypatch):
    from igpt_fast.kernels import _common

    def launch(kernel, grid, args, meta):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(_common, "launch", launch)
    with pytest.raises(torch.OutOfMemoryError):
        attention(*_qkv())
    assert not kernels._fallback


def test_fp32_attention_on_cuda_takes_sdpa_or_raises(fake_cuda, launches, caplog):
    names = launches()
    q, k, v = _qkv(dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="igpt_fast.kernels"):
        out = attention(q, k, v, causal=False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert names == [] and any("fp32 attention on CUDA" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="impl='triton' cannot take this call: fp32"):
        attention(q, k, v, impl="triton")


def test_softmax_and_cross_entropy_fall_back(fake_cuda, launches):
    names = launches(failing={"_softmax_bwd_kernel", "_ce_fwd_kernel"})
    x = torch.randn(5, 40, dtype=torch.float16)
    y, (dx,) = _grads(softmax, (x,))
    ref, (ref_dx,) = _grads(lambda t: softmax(t, impl="torch"), (x,))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(dx, ref_dx)
    assert names == ["_softmax_fwd_kernel", "_softmax_bwd_kernel"]
    names.clear()
    x1 = torch.randn(24, dtype=torch.float16)  # one row, rank 1: the probe runs it whole
    torch.testing.assert_close(softmax(x1), softmax(x1, impl="torch"))
    assert names == ["_softmax_fwd_kernel"] * 2

    logits = torch.randn(6, 17, requires_grad=True)
    targets = torch.tensor([0, 3, -100, 16, 2, 5])
    loss = cross_entropy(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    assert set(kernels._fallback) == {("softmax", torch.float16, 40), ("cross_entropy", torch.float32, 17)}


def test_contract_errors_are_not_swallowed(fake_cuda, launches):
    launches()
    with pytest.raises(ValueError, match="targets must be int64/int32"):
        cross_entropy(torch.randn(4, 17), torch.zeros(4))
    assert not kernels._fallback


def test_reference_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; "
            "from igpt_fast.kernels.reference import attention_ref, softmax_ref, cross_entropy_ref; "
            "import torch; print(softmax_ref(torch.zeros(2)).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[0.5, 0.5]"
