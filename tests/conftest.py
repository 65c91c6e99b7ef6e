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


# The fast run (`python -m pytest tests -q -m "not slow"`) leaves these out; CI (.ci/run) runs everything.
# Slow: a real model, several processes, a compiler, or an emulated GPU build.
SLOW_FILES = {"test_real_model.py", "test_distributed.py", "test_native_build.py", "test_native_cuda_emulation.py"}
SLOW_TESTS = {"test_full_demo_cuts_the_loss_by_half"}


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs SmolLM2-135M-Instruct (reft-kernels fetch-model); "
                            "skips when it is not cached and REFT_KERNELS_FETCH_MODEL is not 1")
    config.addinivalue_line("markers", "slow: left out of the fast run (-m 'not slow'); CI runs every test")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.fspath.basename in SLOW_FILES or item.originalname in SLOW_TESTS
                or item.get_closest_marker("real_model")):
            item.add_marker(pytest.mark.slow)
