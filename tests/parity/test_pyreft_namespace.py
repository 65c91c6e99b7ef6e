"""Every public name of pyreft 0.1.0 exists in reft_kernels and accepts pyreft's parameters.

Run in the parity venv (pyreft 0.1.0) by .ci/pyreft_parity.sh; skipped where pyreft is not
importable. Covers the package namespace (``dir(pyreft)``) and every function/class defined in
pyreft's modules ``utils``, ``config``, ``reft_model``, ``reft_trainer``, ``interventions`` and
``dataset``, each compared with the same attribute here (``reft_kernels.<module>``, whose home
``reft_kernels._PYREFT_SUBMODULES`` names).
"""
import importlib
import inspect

import pytest

from pyreft_env import require_pyreft  # noqa: E402

pyreft = require_pyreft()

import reft_kernels

SUBMODULES = ["utils", "config", "reft_model", "reft_trainer", "interventions", "dataset"]


def public(names):
    return {n for n in names if not n.startswith("_")}


def defined_in(module):
    """Functions and classes ``module`` defines itself (not what it imports)."""
    return {n: v for n, v in vars(module).items() if not n.startswith("_")
            and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module.__name__}


def test_namespace_has_every_pyreft_name():
    missing = sorted(public(dir(pyreft)) - public(dir(reft_kernels)))
    assert missing == [], f"pyreft names missing from reft_kernels: {missing}"
    assert len(public(dir(pyreft))) == 32   # the count the closing note lists


@pytest.mark.parametrize("sub", SUBMODULES)
def test_submodule_defines_pyreft_names(sub):
    theirs = importlib.import_module(f"pyreft.{sub}")
    ours = getattr(reft_kernels, sub)   # an attribute path too, not only an import path
    assert ours is importlib.import_module(f"reft_kernels.{reft_kernels._PYREFT_SUBMODULES[sub]}")
    missing = sorted(set(defined_in(theirs)) - set(dir(ours)))
    assert missing == [], f"pyreft.{sub} names missing from reft_kernels.{sub}: {missing}"


def _signature(obj):
    if inspect.isclass(obj):
        if obj.__init__ is object.__init__:
            return None
        return inspect.signature(obj.__init__)
    return inspect.signature(obj)


def _accepts(ours, theirs) -> list:
    """pyreft's parameters that ``ours`` would reject (by name, or by position)."""
    problems = []
    o_params = list(ours.parameters.values())
    o_names = {p.name for p in o_params}
    o_var_kw = any(p.kind is p.VAR_KEYWORD for p in o_params)
    o_positional = [p.name for p in o_params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    o_var_pos = any(p.kind is p.VAR_POSITIONAL for p in o_params)
    t_positional = [p.name for p in theirs.parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for p in theirs.parameters.values():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            if p.kind is p.VAR_KEYWORD and not o_var_kw:
                problems.append(f"**{p.name}")
            continue
        if p.name not in o_names and not o_var_kw:
            problems.append(p.name)
    for i, name in enumerate(t_positional):
        if i < len(o_positional):
            if o_positional[i] != name:
                problems.append(f"position {i}: {name} (ours: {o_positional[i]})")
        elif not o_var_pos:
            problems.append(f"position {i}: {name} (ours takes {len(o_positional)} positionals)")
    return problems


def _pairs():
    seen = set()
    for name in sorted(public(dir(pyreft))):
        obj = getattr(pyreft, name)
        if callable(obj) and not inspect.ismodule(obj):
            seen.add(id(obj))
            yield f"pyreft.{name}", obj, getattr(reft_kernels, name)
    for sub in SUBMODULES:
        theirs = importlib.import_module(f"pyreft.{sub}")
        ours = getattr(reft_kernels, sub)
        for name, obj in sorted(defined_in(theirs).items()):
            if id(obj) not in seen and hasattr(ours, name):
                yield f"pyreft.{sub}.{name}", obj, getattr(ours, name)


def test_shared_callables_accept_pyreft_parameters():
    bad = {}
    checked = 0
    for label, theirs, ours in _pairs():
        t_sig = _signature(theirs)
        if t_sig is None:
            continue
        problems = _accepts(_signature(ours), t_sig)
        checked += 1
        if problems:
            bad[label] = problems
    assert bad == {}, f"signatures that reject pyreft's parameters: {bad}"
    assert checked >= 30
