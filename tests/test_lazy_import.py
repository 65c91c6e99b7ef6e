"""``import reft_kernels`` and ``reft-kernels --help`` load no heavy stack; every public name still resolves.

Checked by which modules are imported (sys.modules in a fresh interpreter), not by timing.
"""
import os
import subprocess
import sys

import pytest

import reft_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "datasets", "fastapi", "matplotlib")


def _loaded_after(code):
    probe = code + "\nimport sys; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [m for m in proc.stdout.strip().split(",") if m]


@pytest.mark.parametrize("code", [
    "import reft_kernels",
    "import reft_kernels.cli.main as c; c.build_parser()",
    "import reft_kernels.cli.main as c, contextlib, io\n"
    "for cmd in ([], ['serve'], ['train'], ['generate'], ['demo'], ['fetch-model']):\n"
    "    with contextlib.redirect_stdout(io.StringIO()):\n"
    "        try: c.build_parser().parse_args(cmd + ['--help'])\n"
    "        except SystemExit: pass",
])
def test_startup_imports_no_heavy_stack(code):
    assert _loaded_after(code) == []


def test_a_public_name_loads_its_module_on_first_use():
    assert _loaded_after("import reft_kernels; reft_kernels.ReftConfig") == ["torch"]


@pytest.mark.parametrize("name", reft_kernels.__all__)
def test_every_public_name_resolves_to_its_home(name):
    value = getattr(reft_kernels, name)
    assert value.__module__ == f"reft_kernels.{reft_kernels._EXPORTS[name]}"
    assert name in dir(reft_kernels)


def test_submodules_are_attributes_and_unknown_names_raise():
    assert reft_kernels.ops.loreft is not None
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        reft_kernels.not_a_name
