"""pytest plugin of the GPU check: once ``REFT_GPU_CHECK_DEADLINE`` (a Unix time) has passed, the
remaining tests are skipped with the reason "time budget", instead of the run being killed
(which would lose every result). The check counts those as not run.

    REFT_GPU_CHECK_DEADLINE=$(($(date +%s) + 200)) python -m pytest -p gpu_pytest_budget ...
"""
import os
import time

import pytest

BUDGET_REASON = "not run: the GPU check's time budget was spent"


def pytest_runtest_setup(item):
    deadline = os.environ.get("REFT_GPU_CHECK_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(BUDGET_REASON)
