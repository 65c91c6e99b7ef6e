"""ReFT-wrapped vLLM model classes: ``Reft<Arch>`` = vLLM's own ``<Arch>`` plus per-token edits.

For every architecture that vLLM and :data:`reft_kernels.families.FAMILIES` both know with the
decoder-layer contract below, :func:`register_models` registers a subclass of vLLM's class under
the same architecture name. The subclass changes two things, and nothing model-specific:

* ``forward``: before vLLM's forward, build this step's edit plan (:mod:`.plan`) from the batch
  state (:mod:`.batch_state`), the request offsets (:mod:`.shim`) and ``positions``;
* a forward hook on each decoder layer that edits the planned rows of its output.

Layer contract. vLLM's decoder layers return ``(hidden_states, residual)`` and the block output HF
sees is their sum ``s = hs + res`` (the next layer's fused add-norm forms it). On an edited row the
hook computes ``s``, applies the edit ``Phi(s)`` with the library's per-row op
:func:`reft_kernels.ops.reft_edit_multi`, and returns ``hs = 0, res = Phi(s)``: the sum the next
layer forms is then exactly ``Phi(s)``, bit for bit what the HF path feeds its next block.

Without adapters loaded, or in a step where no request uses one, the hook returns at once.
"""
from __future__ import annotations

import logging
import sys
from typing import Dict, Optional

import torch

from . import batch_state, known
from .known import ADAPTERS_CONFIG_KEY
from .plan import build_step_plan
from .shim import check_vllm_version, query_start_loc
from .store import AdapterStore

__all__ = ["register_models", "get_store", "reft_arch_classes", "ADAPTERS_CONFIG_KEY"]

log = logging.getLogger("reft_kernels.vllm")
_store: Optional[AdapterStore] = None
_plan: Dict[int, list] = {}


def get_store() -> Optional[AdapterStore]:
    """This worker process's adapter store (None before a Reft model was built here)."""
    return _store


def _edit_layer(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    """Edit this step's planned rows of one layer's ``(hidden, residual)`` in place."""
    from ..ops import reft_edit_multi
    items = _plan.get(layer)
    if not items:
        return
    groups = _store.groups
    for key, rows, slots in items:
        g = groups[key]
        s = hidden.index_select(0, rows) + residual.index_select(0, rows)
        zeros = torch.zeros((rows.numel(), 1), dtype=torch.int64, device=hidden.device)
        out = reft_edit_multi(s.unsqueeze(1), zeros, slots, g.proj, g.weight, g.bias, g.proj_bias,
                              variant=g.variant, act=g.act)
        hidden.index_fill_(0, rows, 0)
        residual.index_copy_(0, rows, out.squeeze(1))


def _layer_hook(layer: int):
    def hook(module, args, output):
        if _plan and layer in _plan:
            if not (isinstance(output, tuple) and len(output) == 2):
                raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; reft_kernels' vLLM plugin "
                                "needs decoder layers that return (hidden_states, residual)")
            hidden, residual = output
            _edit_layer(hidden, residual, layer)
        return output
    return hook


def _decoder_layers(model: torch.nn.Module):
    """The decoder layer ModuleList of a vLLM causal LM (``model.layers`` in every supported family)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: reft_kernels expected vLLM's decoder layers at .model.layers")
    return layers


def _setup(model: torch.nn.Module, vllm_config) -> None:
    """Build this process's adapter store, load the configured adapters, hook the layers."""
    global _store
    check_vllm_version()
    hf_config = vllm_config.model_config.hf_config
    layers = _decoder_layers(model)
    param = next(model.parameters())
    _store = AdapterStore(hf_config, vllm_config.model_config.dtype, param.device, len(layers))
    _store.refusal = _compiled_refusal(vllm_config)
    known.local_store = _store       # a front end in this process can check request names against it
    known.configured_names(vllm_config)         # checks the shape of hf_overrides' reft_adapters
    for name, item in (getattr(hf_config, ADAPTERS_CONFIG_KEY, None) or {}).items():
        item = {"path": item} if isinstance(item, str) else dict(item)
        _store.load(name, item.pop("path"), **item)
    for i, layer in enumerate(layers):
        if type(layer).__name__ != "PPMissingLayer":
            layer.register_forward_hook(_layer_hook(i))


def _compiled_refusal(vllm_config) -> Optional[str]:
    """Why adapters cannot run in this engine (None: they can). A compiled graph (torch.compile
    without guard checks, CUDA graphs) would keep whichever edit path it was traced with; eager
    mode runs the hooks every step. Stock use of the same engine (no adapters) is unaffected."""
    cc = vllm_config.compilation_config
    compiled = int(getattr(cc, "mode", 0) or 0) != 0
    graphs = str(getattr(cc, "cudagraph_mode", "NONE")).rsplit(".", 1)[-1] not in ("NONE", "None", "0")
    if compiled or graphs:
        return ("reft_kernels adapters need vLLM in eager mode (enforce_eager=True / --enforce-eager): this engine "
                "compiles the model (torch.compile or CUDA graphs), which would freeze the edit path")
    return None


def _forward_with_plan(self, input_ids, positions, *args, **kwargs):
    global _plan
    _plan = {}
    if _store is not None and _store.adapters:
        state = batch_state.require()
        if state.rows:
            loc = query_start_loc()
            if loc is not None:
                _plan = build_step_plan(_store, state.rows, loc, positions.to("cpu"))
    try:
        return super(type(self), self).forward(input_ids, positions, *args, **kwargs)
    finally:
        _plan = {}


def _make_class(base: type) -> type:
    def __init__(self, *, vllm_config, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        _setup(self, vllm_config)

    return type(f"Reft{base.__name__}", (base,), {
        "__init__": __init__, "forward": _forward_with_plan, "__module__": __name__,
        "__doc__": f"vLLM's {base.__name__} with reft_kernels adapters (see reft_kernels.vllm_plugin.model)."})


# model_type in reft_kernels.families with vLLM's (hidden_states, residual) decoder-layer contract
LAYER_CONTRACT_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def reft_arch_classes() -> Dict[str, str]:
    """``{vLLM architecture: its HF model_type}`` the plugin wraps (families x vLLM x contract)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from ..families import FAMILIES
    from vllm import ModelRegistry
    known = set(ModelRegistry.get_supported_archs())
    out = {}
    for model_type in LAYER_CONTRACT_TYPES:
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if model_type in FAMILIES and arch in known:
            out[arch] = model_type
    return out


def __getattr__(name: str):
    """``Reft<Arch>`` classes, built on first access (vLLM's registry imports them lazily by name)."""
    archs = reft_arch_classes() if name.startswith("Reft") else {}
    if name[4:] in archs:
        import importlib
        # vLLM keeps <Arch> in vllm.model_executor.models.<model_type> for every wrapped family
        base = getattr(importlib.import_module(f"vllm.model_executor.models.{archs[name[4:]]}"), name[4:])
        cls = _make_class(base)
        setattr(sys.modules[__name__], name, cls)
        return cls
    raise AttributeError(name)


def register_models() -> list:
    """Register ``Reft<Arch>`` for every wrapped architecture (lazily, by name); returns the archs."""
    from vllm import ModelRegistry
    archs = sorted(reft_arch_classes())
    for arch in archs:
        ModelRegistry.register_model(arch, f"{__name__}:Reft{arch}")
    return archs
