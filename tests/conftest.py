"""Test configuration shared by every test.

Without a GPU the Triton kernels are tested on CPU tensors by the Triton
interpreter. The interpreter mode is fixed when ``@triton.jit`` runs, i.e.
when a kernel module is imported, so ``TRITON_INTERPRET=1`` is set here,
before anything imports turbotune.
"""
import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from turbotune import backend  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """Where kernels run: the GPU if there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (compiled on a GPU, interpreted on the CPU)."""
    with backend.force(backend.TRITON):
        yield


@pytest.fixture
def one_thread():
    """torch on one thread for the test (modules of many tiny ops use it: OpenMP barriers stall on a
    shared CPU); the previous count is restored."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
