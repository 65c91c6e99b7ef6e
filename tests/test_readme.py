"""The README's code runs as written: every ```python block in a fresh interpreter, and its
serving block is the one tests/test_server.py runs (docs/serving.md)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_the_blocks_we_test():
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "REFT_KERNELS_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", PYTHON_BLOCKS[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README python block {index} failed:\n{PYTHON_BLOCKS[index]}\n{proc.stderr[-3000:]}"


def test_serving_block_is_the_tested_one():
    docs = open(os.path.join(ROOT, "docs", "serving.md"), encoding="utf-8").read()
    tested = re.search(r"<!-- serving-snippet:start -->\n```bash\n(.*?)```", docs, re.S).group(1)
    assert f"```bash\n{tested}```" in README
