"""Shared test setup. Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before igpt_fast.kernels' Triton modules are imported, so it is set here, first."""
import os
import shutil

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
