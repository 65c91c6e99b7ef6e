"""Install ReFT edits into a Hugging Face model, once (the hook mechanics).

Mechanism. :class:`ModelPatch` registers, at ``get_reft_model`` time (and when adapters are
added or deleted, never per call):

* one forward hook (``.output`` sites) or forward pre-hook (``.input`` sites) per hooked module,
  shared by every intervention of every adapter on that module, which apply the call's plan for
  it in order (so two interventions on one module compose, ``I_2(I_1(h))``, as in pyvene; see
  :mod:`reft_kernels.model.plan`); modules without an intervention get no hook and run at
  base speed;
* one forward pre-hook on the wrapped model, which finds the window of tokens this forward
  covers (:func:`window_offset`) and hands it to the call's plan, which turns its absolute
  positions into window-local ones (see :class:`EditState`).

What the hooks apply comes from the call's plan (:class:`~reft_kernels.model.plan.CallPlan`,
armed with :meth:`ModelPatch.activate`); the patch itself holds only which plan is armed.

``ModelPatch.remove`` removes exactly these handles; hooks added by anyone else are never touched
(pyvene deletes every hook of the model on each call). Edits run in place on tensors the module
has just created (a decoder layer's output), so the hidden states are never copied; inputs
(pre-hooks) and outputs that alias an input are edited out of place.

Where to hook (the abstract components of each model family, the block list, the hidden size)
is decided in :mod:`reft_kernels.families`; this module only installs and runs the hooks.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Sequence

import torch
from torch import nn

from .edit_state import EditState, GeneratedPositions
from ..families import Site, hidden_size, resolve_site  # noqa: F401 (kept importable from here)

__all__ = ["Site", "resolve_site", "hidden_size", "ModelPatch", "EditState", "GeneratedPositions", "find_cache"]


# Caches whose ``get_seq_length()`` is not the number of tokens seen (transformers < 4.54 counts
# occupied slots of a fixed-size or sliding buffer); newer layered caches count every token.
_UNTRUSTED_CACHES = ("StaticCache", "HybridCache", "SlidingWindowCache", "HybridChunkedCache",
                     "OffloadedStaticCache", "OffloadedHybridCache", "MambaCache")
_LEGACY_CACHE_NAMES = ("past_key_values", "cache", "past_key_value", "past")


def _is_cache_object(value) -> bool:
    cache_utils = sys.modules.get("transformers.cache_utils")
    return cache_utils is not None and isinstance(value, getattr(cache_utils, "Cache", ()))


def _is_legacy_cache(value) -> bool:
    """A tuple cache: one (key, value, ...) tuple of tensors per layer."""
    return (isinstance(value, (tuple, list)) and len(value) > 0 and isinstance(value[0], (tuple, list))
            and len(value[0]) > 0 and isinstance(value[0][0], torch.Tensor))


def find_cache(args, kwargs):
    """The KV cache of a model call, wherever it sits: a transformers Cache object in any argument,
    or a legacy tuple cache under a known keyword. None when the call has no cache."""
    for value in (*kwargs.values(), *args):
        if _is_cache_object(value):
            return value
    for name in _LEGACY_CACHE_NAMES:
        if _is_legacy_cache(kwargs.get(name)):
            return kwargs[name]
    return None


def _as_offset(value) -> int:
    return int(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else int(value)


def window_offset(args, kwargs, seq_len: int, model: nn.Module) -> int:
    """How many tokens precede the ``seq_len`` tokens a model call covers (its window offset).

    Sources, most direct first: ``cache_position`` (transformers < 5 passes it; it is the definition),
    the cache's ``get_seq_length()`` when that counts every token seen (the dynamic and layered caches
    the model itself reads its positions from; a legacy tuple's key length), then the length of a 2-D
    ``attention_mask`` (past + current tokens), then ``position_ids`` when there is no padding (no
    mask). A call with no cache at all starts at 0. A cache whose offset none of these gives raises:
    a guessed 0 would silently re-apply prompt edits to generated tokens.
    """
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return _as_offset(cache_position)
    cache = find_cache(args, kwargs)
    if cache is None:
        return 0
    if _is_legacy_cache(cache):
        return cache[0][0].shape[-2]
    if hasattr(cache, "layers") or type(cache).__name__ not in _UNTRUSTED_CACHES:
        return _as_offset(cache.get_seq_length())
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= seq_len:
        return mask.shape[-1] - seq_len
    position_ids = kwargs.get("position_ids")
    if mask is None and isinstance(position_ids, torch.Tensor) and position_ids.numel():
        first = position_ids.reshape(-1, position_ids.shape[-1])[:, 0]
        if bool((first == first[0]).all()):
            return _as_offset(first)
    import transformers
    raise RuntimeError(
        f"reft_kernels cannot tell which token positions this {type(model).__name__} call covers: it got a "
        f"{type(cache).__name__} under transformers {transformers.__version__} without cache_position, a 2-D "
        "attention_mask or position_ids, so edits could land on the wrong tokens. Pass cache_position (or an "
        "attention_mask covering past and new tokens), or use a DynamicCache; please report this model and "
        "version to reft_kernels")


def _call_window(args, kwargs, model):
    """(batch, seq_len, offset, device) of a model call; None without input_ids/inputs_embeds."""
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if x is None:
        return None
    return x.shape[0], x.shape[1], window_offset(args, kwargs, x.shape[1], model), x.device


def _first_tensor(value):
    return value if isinstance(value, torch.Tensor) else value[0]


def _may_edit_inplace(hidden: torch.Tensor, inputs) -> bool:
    """True for a fresh contiguous tensor that is not (a view of) one of the module's inputs."""
    if not hidden.is_contiguous() or hidden._base is not None or (hidden.is_leaf and hidden.requires_grad):
        return False
    ptr = hidden.untyped_storage().data_ptr()
    return not any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in inputs)


class ModelPatch:
    """The hooks of one ReftModel on its HF model; see the module docstring.

    ``sync(sites)`` keeps exactly one hook per hooked (module, kind): hooks are added for new
    sites and removed for sites no adapter uses any more. Each hook applies the edits that the
    current call's plan (``call``, see :mod:`reft_kernels.model.plan`) lists for its site.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.call = None        # the CallPlan of the last armed call (kept for checkpoint recompute)
        self.armed = False
        self.handles = [model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)]
        self.site_hooks: dict = {}

    @staticmethod
    def site_key(site: Site) -> tuple:
        return (id(site.module), site.kind)

    def sync(self, sites: Sequence[Site]) -> None:
        """Hook every site in ``sites`` (once per module and kind); unhook sites not listed."""
        wanted = {self.site_key(s): s for s in sites}
        for key in [k for k in self.site_hooks if k not in wanted]:
            self.site_hooks.pop(key).remove()
        for key, site in wanted.items():
            if key in self.site_hooks:
                continue
            if site.kind == "output":
                hook = site.module.register_forward_hook(self._output_hook(key, site.path), with_kwargs=True)
            else:
                hook = site.module.register_forward_pre_hook(self._input_hook(key, site.path), with_kwargs=True)
            self.site_hooks[key] = hook

    @contextlib.contextmanager
    def activate(self, call):
        """Arm the hooks with ``call`` (a CallPlan) for the model calls made inside the block."""
        self.call, self.armed = call, True
        try:
            yield
        finally:
            self.armed = False

    def _on_model_call(self, module, args, kwargs):
        if not self.armed:   # a call to the wrapped model outside ReftModel edits nothing
            self.call = None
            return None
        window = _call_window(args, kwargs, module)
        if window is None:
            raise ValueError("ReftModel needs input_ids or inputs_embeds to place the interventions")
        self.call.enter(*window)
        return None

    # -- hooks ---------------------------------------------------------------------------------
    def _output_hook(self, key, path):
        def hook(module, args, kwargs, output):
            call = self.call
            steps = None if call is None else call.at(key)
            if not steps:
                return None
            hidden = _first_tensor(output)
            new = call.apply(steps, hidden, _may_edit_inplace(hidden, (*args, *kwargs.values())), path)
            if new is hidden:
                return None
            if isinstance(output, torch.Tensor):
                return new
            if type(output) in (tuple, list):
                return type(output)((new, *output[1:]))
            raise TypeError(f"{path!r} returns a {type(output).__name__} whose first tensor cannot be replaced; "
                            "intervene on a submodule that returns a tensor or a tuple")
        return hook

    def _input_hook(self, key, path):
        def hook(module, args, kwargs):
            call = self.call
            steps = None if call is None else call.at(key)
            if not steps:
                return None
            if args:
                return (call.apply(steps, args[0], False, path), *args[1:]), kwargs
            name = "hidden_states" if "hidden_states" in kwargs else next(
                (k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
            if name is None:
                raise ValueError(f"no tensor input found at {path!r} to intervene on")
            return args, {**kwargs, name: call.apply(steps, kwargs[name], False, path)}
        return hook

    def remove(self) -> None:
        """Remove exactly the hooks this patch registered."""
        for handle in (*self.handles, *self.site_hooks.values()):
            handle.remove()
        self.handles, self.site_hooks = [], {}
        self.call = None

