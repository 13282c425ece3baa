"""Shared test setup. Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before anything imports triton, so it is set here, first."""
import os
import shutil

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny ops on a shared CPU: one intra-op thread avoids OpenMP spin contention (100x seen)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def nan_outputs(monkeypatch):
    """nan_outputs("igpt_fast.kernels.softmax"): that kernel module's output allocator `_empty` fills
    with NaN for the test, so an element a kernel fails to write shows up as a NaN error."""
    def patch(module_name):
        def empty_nan(like, shape, dtype=None):
            return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)
        monkeypatch.setattr(importlib.import_module(module_name), "_empty", empty_nan)
    return patch
