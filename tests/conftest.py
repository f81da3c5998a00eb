"""Test setup. Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors;
TRITON_INTERPRET must be set before triton is first imported, hence here.
IWSFT_TEST_CUDA=1 (bench/gpu_check.sh) runs the same tests on the GPU instead."""

import os

import pytest

CUDA_RUN = os.environ.get("IWSFT_TEST_CUDA", "0") == "1"
if not CUDA_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

DEVICE = torch.device("cuda" if CUDA_RUN else "cpu")


def _has_triton():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


BACKENDS = ["torch"] + (["triton"] if _has_triton() else [])


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's name (reproducible, but every test
    draws different inputs)."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    return g
