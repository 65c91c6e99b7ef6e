"""The installed transformers lies in the range setup.py declares (CI tests both of its ends)."""
import ast
import pathlib

import transformers
from packaging.requirements import Requirement


def declared_range() -> Requirement:
    tree = ast.parse((pathlib.Path(__file__).parents[1] / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "TRANSFORMERS_RANGE":
            return Requirement(node.value.value)
    raise AssertionError("setup.py has no TRANSFORMERS_RANGE")


def test_installed_transformers_is_in_the_declared_range():
    req = declared_range()
    assert req.specifier.contains(transformers.__version__), (
        f"transformers {transformers.__version__} is outside the supported range {req}: run the whole suite "
        "on it (both CI environments) before widening TRANSFORMERS_RANGE in setup.py")
    assert req.specifier.contains("4.45.1")   # pyreft's pin stays supported
