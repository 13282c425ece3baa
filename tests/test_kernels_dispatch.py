"""Tests for the dispatch in igpt_fast/kernels/__init__.py: which implementation a call gets (once per
shape class), the per-GPU defaults table, the fp32-on-CUDA rule, bf16 under the interpreter, the fallback
that keeps a kernel which cannot compile or launch from failing a run, and torch.compile seeing the Triton
kernels.

No GPU needed: `_capability` (dispatch's one device question) is patched to report a GPU while the
kernels run under the Triton interpreter, and `_common.launch` (where every eager kernel launch goes)
is patched to raise Triton's OutOfResources for chosen kernels, as a real GPU would for a config that
does not fit.
"""
import json
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


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """Fresh once-per-class state for every test."""
    monkeypatch.setattr(kernels, "_logged", set())
    monkeypatch.setattr(kernels, "_resolved", {})
    monkeypatch.setattr(kernels, "_fallback", {})


@pytest.fixture
def fake_cuda(monkeypatch):
    """Dispatch sees every tensor on a GPU of compute capability 0.0 (in no defaults table)."""
    monkeypatch.setattr(kernels, "_capability", lambda x: (0, 0))


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


def test_auto_on_cuda_checks_each_class_once_then_runs_triton(fake_cuda, launches, monkeypatch):
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
    # class already resolved: the call alone, straight to the autograd.Function (no table, no check)
    monkeypatch.setattr(kernels, "_choose", None)
    _grads(lambda a, b, c: attention(a, b, c, causal=True), (q, k, v))
    assert names == ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                     "_attn_bwd_dq_kernel"]
    from igpt_fast.kernels.flash_attention import _FlashAttention
    assert _FlashAttention.apply in kernels._resolved.values()


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
    with caplog.at_level(logging.INFO, logger="igpt_fast.kernels"):
        _grads(lambda a, b, c: attention(a, b, c, causal=True), (q, k, v))
        with torch.no_grad():  # the same class without gradients is resolved anew: torch, logged already
            attention(q, k, v, causal=True)
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


def test_bf16_under_the_interpreter_takes_torch_path_on_cuda(fake_cuda, launches, caplog):
    # TRITON_INTERPRET=1 on a machine whose tensors are on a GPU: the interpreter has no bf16, so auto must not
    # send bf16 to it (its ValueError is a contract error and would propagate); impl="triton" still raises it
    names = launches()
    q, k, v = _qkv(dtype=torch.bfloat16)
    x = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="igpt_fast.kernels"):
        out, grads = _grads(lambda a, b, c: attention(a, b, c, causal=True), (q, k, v))
        attention(q, k, v, causal=True)
        y, (dx,) = _grads(softmax, (x,))
    ref, ref_grads = _grads(lambda a, b, c: attention(a, b, c, causal=True, impl="torch"), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    ref_y, (ref_dx,) = _grads(lambda t: softmax(t, impl="torch"), (x,))
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(dx, ref_dx)
    assert names == [] and not kernels._fallback
    lines = [r.getMessage() for r in caplog.records]
    reason = "the Triton interpreter (TRITON_INTERPRET=1) cannot run bfloat16"
    assert sum(m.startswith("igpt_fast.kernels.attention: using the torch") and reason in m for m in lines) == 1
    assert sum(m.startswith("igpt_fast.kernels.softmax: using the torch") and reason in m for m in lines) == 1
    with pytest.raises(ValueError, match="no bf16"):
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
    assert set(kernels._fallback) == {("softmax", -1, torch.float16, 40, None),
                                      ("cross_entropy", -1, torch.float32, 17, None)}


def test_contract_errors_are_not_swallowed(fake_cuda, launches):
    launches()
    with pytest.raises(ValueError, match="targets must be int64/int32"):
        cross_entropy(torch.randn(4, 17), torch.zeros(4))
    assert not kernels._fallback


def test_defaults_table_decides_auto(fake_cuda, launches, monkeypatch, tmp_path, caplog):
    """auto follows the per-GPU table: torch where a GPU run measured torch faster (for that mode and
    the nearest measured size), ours where it measured ours faster or has no entry."""
    from igpt_fast.kernels import defaults

    path = str(tmp_path / "defaults.json")
    provenance = dict(device="Test GPU", date="2026-12-04", commit="abc1234", torch="2.11", triton="3.6",
                      source="a test")
    defaults.record([dict(capability="0.0", op="attention", dtype="fp16", width=32, causal=True, size=1024,
                          mode="fwd+bwd", ours_ms=2.0, torch_ms=1.0, **provenance),
                     dict(capability="0.0", op="attention", dtype="fp16", width=32, causal=True, size=1024,
                          mode="fwd", ours_ms=1.0, torch_ms=2.0, **provenance)], path=path)
    monkeypatch.setattr(defaults, "PATH", path)
    names = launches()
    q, k, v = _qkv()  # T = 24: nearest measured size 1024
    with caplog.at_level(logging.INFO, logger="igpt_fast.kernels"):
        _grads(lambda a, b, c: attention(a, b, c, causal=True), (q, k, v))
    assert names == []  # fwd+bwd: torch measured faster
    assert any("defaults table" in r.getMessage() and "Test GPU" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        attention(q, k, v, causal=True)  # forward only: ours measured faster
    assert names == ["_attn_fwd_kernel"] * 2  # the first-use check, then the call
    names.clear()
    _grads(lambda a, b, c: attention(a, b, c, causal=False), (q, k, v))  # no entry: ours
    assert names[0] == "_attn_fwd_kernel"
    assert defaults.choose((9, 0), "attention", torch.bfloat16, 64, True, 1024, True)[0] == "triton"
    assert defaults.choose((8, 6), "attention", torch.bfloat16, 64, True, 1024, True) == ("triton", None)


def test_shipped_table_says_torch_where_torch_won():
    """The sm_90 entries from the H200 run of 2026-12-04: cross-entropy at the palette's 512 colours
    was slower than torch's (host-bound), attention at D 64 faster than SDPA (flash)."""
    from igpt_fast.kernels import defaults

    choice, entry = defaults.choose((9, 0), "cross_entropy", torch.bfloat16, 512, None, 32768, True)
    assert choice == "torch" and entry["ratio"] > 1 and entry["device"] == "NVIDIA H200"
    choice, entry = defaults.choose((9, 0), "attention", torch.float16, 64, True, 1024, True)
    assert choice == "triton" and entry["ratio"] < 1 and entry["commit"] and entry["source"]


_COMPILED_STEP = """
import re

import torch
import torch._functorch.config
import triton
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from triton.backends.compiler import GPUTarget

from igpt_fast.kernels import _common

_common.OPAQUE_OPS = False  # the triton_ops a GPU gets (the interpreter's tiles: no GPU to ask)
_common.INTERPRET = True
_common.check_device = lambda op, x: None  # CPU stand-in tensors: they are traced, never launched
from igpt_fast.kernels import attention, cross_entropy, softmax  # noqa: E402


class Target:  # torch's analysis of what a kernel writes lowers it to TTIR: a target, no GPU
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(Target())
torch._functorch.config.force_non_lazy_backward_lowering = True  # the backward graph at compile time
codes = []


def record(gm, example_inputs):
    codes.append(gm.code)
    if len(codes) == 2:  # forward and backward traced; CPU tensors cannot run the CUDA kernels
        raise RuntimeError("traced")
    return gm


def backend(gm, example_inputs):
    from torch._functorch.aot_autograd import aot_module_simplified
    return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)


targets = torch.tensor([0, 3, -100, 16, 2, 5])


def step(q, k, v, x, logits):
    a = attention(q * 2, k, v, causal=True, impl="triton").sin().sum()
    return a + softmax(x, impl="triton").square().sum() + cross_entropy(logits, targets, impl="triton")


inputs = [torch.randn(2, 2, 20, 32, dtype=torch.float16) for _ in range(3)] + [torch.randn(6, 40), torch.randn(6, 17)]
try:
    torch.compile(step, backend=backend, fullgraph=True)(*[t.requires_grad_() for t in inputs])
except Exception as err:
    assert "traced" in str(err), err
node = "higher_order.triton_kernel_wrapper_functional("
names = sorted({kernel_side_table.get_kernel(i).fn.__name__ for i in range(len(kernel_side_table.id_to_kernel))})
graphs = "".join(codes)
tma = sorted(set(re.findall(r"'TMA': (True|False)", graphs)))
print(len(codes), graphs.count(node), "igpt_fast" in graphs, "tensors_to_clone = ['Q'" in graphs, "/".join(tma),
      " ".join(names))
"""


@pytest.mark.parametrize("io", ["pointer", "tma"])
def test_compiled_graph_holds_the_triton_kernels(io):
    """torch.compile(fullgraph=True) traces the public ops (the triton_ops a GPU gets) to forward and
    backward graphs whose nodes are the Triton kernels themselves (triton_kernel_wrapper_functional over
    our @triton.jit functions, with torch's analysis of what each kernel writes, so inputs are not
    cloned), with no opaque op left: the graphs Inductor compiles and CUDA graphs capture. Without a
    GPU the graphs are traced, not run (the interpreter's kernels cannot be captured at all: they are
    not JITFunctions); a fresh process, as the ops are registered at import. With io "tma" the traced
    kernels build their tensor descriptors (the alignment check reads fake tensors' offsets and strides)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["IGPT_FAST_ATTENTION_CONFIG"] = json.dumps(dict(io=io))
    out = subprocess.run([sys.executable, "-c", _COMPILED_STEP], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    n_graphs, n_kernels, opaque, cloned, tma, names = out.stdout.split(maxsplit=5)
    assert (n_graphs, n_kernels, opaque, cloned) == ("2", "8", "False", "False")  # fwd 3, bwd 3 + 1 + 1
    assert tma == str(io == "tma")  # every attention launch (the preprocess kernel takes no TMA flag)
    assert names.split() == sorted(["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                                    "_attn_bwd_dq_kernel", "_softmax_fwd_kernel", "_softmax_bwd_kernel",
                                    "_ce_fwd_kernel", "_ce_bwd_kernel"])


def test_reference_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; "
            "from igpt_fast.kernels.reference import attention_ref, softmax_ref, cross_entropy_ref; "
            "import torch; print(softmax_ref(torch.zeros(2)).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[0.5, 0.5]"
