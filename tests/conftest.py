"""Shared test setup. Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before anything imports triton, so it is set here, first; persisted palette lookup tables go to
a temporary folder of the session. Tests marked `cuda` (registered in pyproject.toml) are skipped
where torch sees no CUDA device. The fixtures several test modules share are defined here, once."""
import os
import shutil
import tempfile

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Palette lookup tables persisted by the tests go to a folder of this session, not ~/.cache/igpt-fast.
os.environ.setdefault("IGPT_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="igpt-fast-test-cache-"))

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from shards import write_dataset  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked `cuda` when torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny tokenized dataset, one per test module (tests/shards.write_dataset): 4x4 images of 16
    colours in 3 learnable classes; train 64 samples in shards of 16, val 20 in shards of 8, 8 and 4
    (with 2 ranks and batch 4, rank 0 has 3 val batches, rank 1 has 2), test 16."""
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def one_thread():
    """Tiny ops on a shared CPU: one intra-op thread avoids OpenMP spin contention (100x seen)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every Triton kernel output is allocated NaN-filled for the test (the kernels' shared allocator
    `igpt_fast.kernels._common.empty` is swapped), so an element a kernel fails to write shows up as
    a NaN error."""
    def empty_nan(like, shape, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)
    monkeypatch.setattr(importlib.import_module("igpt_fast.kernels._common"), "empty", empty_nan)


@pytest.fixture(scope="session")
def fashion_mnist():
    """The Fashion-MNIST IDX folder (`make test` passes it as IGPT_FAST_FMNIST; `make data` installs
    Debian's dataset-fashion-mnist); the test is skipped, naming the command, when it is missing."""
    path = os.environ.get("IGPT_FAST_FMNIST", "/usr/share/datasets/fashion-mnist")
    if not os.path.isfile(os.path.join(path, "t10k-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST not found at {path}: run `make data` (sudo apt-get install -y "
                    "dataset-fashion-mnist) or set IGPT_FAST_FMNIST=DIR")
    return path
