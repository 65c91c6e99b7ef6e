"""Run pyreft code unchanged on reft_kernels: ``pyreft`` (and ``pyreft.<sub>``) resolve to us.

In a program: call :func:`as_pyreft` before the first ``import pyreft``::

    import reft_kernels
    reft_kernels.as_pyreft()
    from pyreft.utils import TaskType            # reft_kernels.utils.TaskType
    from pyreft.reft_trainer import ReftTrainerForCausalLM

A script, unmodified: ``python -m reft_kernels.compat.pyreft.alias train.py --its --flags``
(the script runs as ``__main__`` with its own folder first on ``sys.path``, as ``python
train.py`` would).

pyreft's numbers from the same seed: ``as_pyreft()`` (and so the runner) also makes rotations
keep pyreft's d x d base by default (:func:`reft_kernels.interventions.modules.set_pyreft_base_default`),
which makes ``ReftTrainerForCausalLM`` use pyreft's data order too; with dropout 0 and weight
decay 0 a seeded run then logs pyreft's losses. ``as_pyreft(exact=False)`` / the runner's
``--no-exact`` give the light ``completion="compact"`` rotation (no d x d buffer; another path).

``pyreft`` becomes the very module object ``reft_kernels`` and ``pyreft.X`` the module
``reft_kernels.X`` (imported on first use; one object under both names, so classes compare
equal whichever name imported them). ``pyvene`` is *not* provided: pyreft's example code uses
``import pyvene as pv`` only for type hints (``pv.IntervenableModel``); install pyvene for
those imports, or drop them - nothing of pyvene runs under reft_kernels.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import runpy
import sys

__all__ = ["as_pyreft", "run_script"]

_PACKAGE = (__package__ or "reft_kernels").split(".")[0]   # also right when run with -m


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``<alias>.X`` to the already-importable ``reft_kernels.X`` (same module object);
    pyreft's own submodule names go to their homes here (``reft_kernels._PYREFT_SUBMODULES``)."""

    def __init__(self, alias: str):
        self.alias = alias
        self._real_specs = {}

    def _real_name(self, fullname: str):
        if not fullname.startswith(self.alias + "."):
            return None
        rest = fullname[len(self.alias) + 1:]
        return f"{_PACKAGE}.{_pyreft_homes().get(rest, rest)}"

    def find_spec(self, fullname, path=None, target=None):
        real = self._real_name(fullname)
        if real is None or importlib.util.find_spec(real) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(self._real_name(spec.name))
        self._real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # the import system stamped the alias spec on the shared module: give it its own back
        module.__spec__ = self._real_specs.pop(module.__spec__.name, module.__spec__)


def _pyreft_homes():
    """pyreft's submodule name -> its module path under reft_kernels."""
    return importlib.import_module(_PACKAGE)._PYREFT_SUBMODULES


def as_pyreft(name: str = "pyreft", replace: bool = False, exact: bool = True):
    """Make ``import <name>`` and ``import <name>.<sub>`` give reft_kernels (and its submodules).

    ``exact``: rotations built from now on keep pyreft's d x d base (``pyreft_base=True`` unless
    an intervention says otherwise), so seeded runs follow pyreft's path (module docstring).
    Raises RuntimeError if another module is already imported under ``name`` (e.g. the real
    pyreft) unless ``replace=True``. Returns the reft_kernels module. Idempotent.
    """
    pkg = importlib.import_module(_PACKAGE)
    importlib.import_module(_PACKAGE + ".interventions.modules").set_pyreft_base_default(bool(exact))
    current = sys.modules.get(name)
    if current is not None and current is not pkg and not replace:
        raise RuntimeError(f"a different module is already imported as {name!r} "
                           f"({getattr(current, '__file__', current)!r}); call as_pyreft() before the "
                           f"first 'import {name}', or pass replace=True")
    if current is not pkg:
        for key in [k for k in sys.modules if k.startswith(name + ".")]:
            del sys.modules[key]
    sys.modules[name] = pkg
    for sub in [k for k in list(sys.modules) if k.startswith(_PACKAGE + ".")]:
        sys.modules[name + sub[len(_PACKAGE):]] = sys.modules[sub]
    for sub, home in _pyreft_homes().items():  # pyreft's names (loaded ones now, the rest on import)
        if f"{_PACKAGE}.{home}" in sys.modules:
            sys.modules[f"{name}.{sub}"] = sys.modules[f"{_PACKAGE}.{home}"]
    if not any(isinstance(f, _AliasFinder) and f.alias == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(name))
    return pkg


def run_script(path: str, argv=(), alias: str = "pyreft", exact: bool = True) -> None:
    """Run the script at ``path`` as ``__main__`` with ``argv`` after installing the alias."""
    as_pyreft(alias, exact=exact)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"script {path!r} does not exist")
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    runpy.run_path(path, run_name="__main__")


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exact = True
    if argv and argv[0] == "--no-exact":
        exact, argv = False, argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m reft_kernels.compat.pyreft.alias [--no-exact] SCRIPT.py [ARGS...]\n"
              "runs a pyreft script unchanged, with 'import pyreft' resolving to reft_kernels;\n"
              "rotations keep pyreft's d x d base (pyreft's path from a seed) unless --no-exact")
        return 0 if argv else 2
    run_script(argv[0], argv[1:], exact=exact)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
