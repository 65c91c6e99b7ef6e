"""Shared test setup. Triton must see TRITON_INTERPRET before it is first imported."""
import os

import pytest
import torch   # importing torch does not import triton

if not torch.cuda.is_available():   # no GPU: Triton kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add overhead (and stall on a loaded 2-core machine).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; restores the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs SmolLM2-135M-Instruct (reft-kernels fetch-model); "
                            "skips when it is not cached and REFT_KERNELS_FETCH_MODEL is not 1")
