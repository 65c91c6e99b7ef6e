"""Model-family knowledge: where each architecture keeps its blocks and what the abstract
components mean there. Everything model-specific about *where* to intervene lives in this file.

``FAMILIES`` is keyed by ``config.model_type`` (as PEFT's target-module mapping and Liger-Kernel's
``MODEL_TYPE_TO_APPLY_LIGER_FN``). Each :class:`Family` gives

* ``blocks``: the path of the block ``ModuleList`` inside the base model (``model.base_model``,
  i.e. the ``base_model_prefix`` submodule of a model with a head, or the bare model itself);
* ``components``: abstract component -> (submodule suffix of block ``l``, ``"output"`` | ``"input"``).
  A component hooks the tensor ``h`` of shape (batch, seq, hidden) that the module returns
  (forward hook) or receives first (forward pre-hook), and the edit is ``h <- Phi(h)`` there:
  ``block_*`` is the residual stream after / before block ``l``; ``attention_*`` and ``mlp_*`` are
  the sublayer's own output (before the residual add) and input (after any pre-norm);
* ``hidden``: the config attribute(s) holding the residual width (``hidden_size``, ``n_embd``, ``dim``);
* ``head``: the path of the causal LM's output projection when its ``...ForCausalLM`` forward is
  ``head(body(x))`` followed by elementwise steps only (a cast, Gemma-2's soft-capping), so the head
  may run on the labelled rows alone (:mod:`reft_kernels.model.labelled_logits`); None: not split;
* ``unsupported``: component -> why this family has no such (batch, seq, hidden) tensor.

Unknown model types fall back to :func:`_generic_family`, which finds the block list (inside
``get_decoder()`` or the base model, the ModuleList of ``num_hidden_layers`` identical blocks with
the most parameters) and recognises the usual sublayer names. Any model accepts pyvene string
components, ``"<module path>.output"`` / ``"<module path>.input"``, e.g. ``"transformer.h[3].output"``.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from torch import nn

__all__ = ["Family", "FAMILIES", "Site", "ABSTRACT_COMPONENTS", "family_of", "resolve_site", "hidden_size",
           "get_submodule"]

ABSTRACT_COMPONENTS = ("block_output", "block_input", "mlp_output", "mlp_input", "attention_output",
                       "attention_input")


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its blocks and sublayers (see the module docstring)."""

    blocks: str
    components: Dict[str, Tuple[str, str]]
    hidden: Tuple[str, ...] = ("hidden_size",)
    head: Optional[str] = None
    unsupported: Dict[str, str] = field(default_factory=dict)


def _components(attention: str, mlp: Optional[str], attention_input: Optional[str] = None,
                mlp_input: Optional[str] = None) -> Dict[str, Tuple[str, str]]:
    """The six components of a block whose sublayers sit at ``.<attention>`` and ``.<mlp>``."""
    table = {"block_output": ("", "output"), "block_input": ("", "input"),
             "attention_output": (attention, "output"),
             "attention_input": (attention if attention_input is None else attention_input, "input")}
    if mlp is not None:
        table.update(mlp_output=(mlp, "output"), mlp_input=(mlp if mlp_input is None else mlp_input, "input"))
    return table


_LLAMA = Family("layers", _components(".self_attn", ".mlp"), head="lm_head")
# BERT-style post-norm encoders: attention.output.dense / output.dense are the projections before
# dropout + residual + LayerNorm; the MLP's input is the attention block's (normed) output.
_BERT = Family("encoder.layer", _components(".attention.output.dense", ".output.dense", attention_input=".attention",
                                            mlp_input=".intermediate"))
_OPT_MLP = ("OPT's MLP (fc1/fc2) runs on flattened (batch*seq, hidden) rows, so it has no (batch, seq, hidden) "
            "tensor to edit; intervene on block_output or attention_output")

FAMILIES: Dict[str, Family] = {
    # Llama layout: <base>.layers[l] with .self_attn and .mlp (pre-norm decoders)
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "phi3": _LLAMA,
    "gpt2": Family("h", _components(".attn", ".mlp"), hidden=("n_embd", "hidden_size"), head="lm_head"),
    "gpt_neox": Family("layers", _components(".attention", ".mlp"), head="embed_out"),
    "opt": Family("decoder.layers", _components(".self_attn", None), head="lm_head", unsupported={
        "mlp_output": _OPT_MLP, "mlp_input": _OPT_MLP}),
    "falcon": Family("h", _components(".self_attention", ".mlp"), head="lm_head"),
    "bert": _BERT, "roberta": _BERT,
    # DistilBERT is post-norm: its attention's input *is* the block input (transformers 4.x passes it
    # three times, as query=key=value keywords, so the block's pre-hook is the one place to edit it).
    "distilbert": Family("transformer.layer", _components(".attention", ".ffn", attention_input=""),
                         hidden=("dim", "hidden_size")),
}
_GENERIC_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")
_ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class Site:
    """Where an intervention applies: ``module``'s output (forward hook) or input (pre-hook)."""

    module: nn.Module
    kind: str   # "output" | "input"
    path: str   # e.g. "model.layers[3].mlp", for messages


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.layers[3].mlp``-style path (pyvene's string syntax) -> the submodule."""
    module, done = model, ""
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            module = module[int(token[1:-1])] if token.startswith("[") else getattr(module, token)
        except (AttributeError, IndexError, TypeError, KeyError):
            raise ValueError(f"component path {path!r}: {type(module).__name__} at {done or 'the model'!r} "
                             f"has no {token!r}; check the path against print(model)") from None
        done += token if token.startswith("[") or not done else "." + token
    if not isinstance(module, nn.Module):
        raise ValueError(f"component path {path!r} names a {type(module).__name__}, not a module")
    return module


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def _dotted(path: str) -> str:
    """``transformer.h.3.mlp`` (named_modules) -> ``transformer.h[3].mlp`` (component syntax)."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)


def _base_prefix(model: nn.Module) -> str:
    """Path of the base model inside ``model`` ('' for a bare base model such as LlamaModel)."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _config_int(model: nn.Module, names) -> Optional[int]:
    """The first int among ``names`` on the model's config (or its text config, for multimodal ones)."""
    config = getattr(model, "config", None)
    configs = [config]
    if callable(getattr(config, "get_text_config", None)):
        configs.append(config.get_text_config())
    for cfg in configs:
        for name in names:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def num_layers(model: nn.Module) -> Optional[int]:
    return _config_int(model, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))


def _find_block_list(model: nn.Module) -> Optional[str]:
    """Generic fallback: the path of the model's block ``ModuleList``, or None.

    Searched inside ``get_decoder()`` (decoder-only and encoder-decoder models) or else the base
    model; among the ModuleLists of identical modules (``num_hidden_layers`` long when the config
    says), the one holding the most parameters."""
    names = {id(m): n for n, m in model.named_modules()}
    root = ""
    decoder = None
    if callable(getattr(model, "get_decoder", None)):
        try:
            decoder = model.get_decoder()
        except Exception:   # noqa: BLE001 - a model whose get_decoder is not implemented
            decoder = None
    if isinstance(decoder, nn.Module) and id(decoder) in names:
        root = names[id(decoder)]
    elif _base_prefix(model):
        root = _base_prefix(model)
    n_layers = num_layers(model)
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if root and not name.startswith(root + "."):
            continue
        if len({type(m) for m in module}) != 1 or (n_layers is not None and len(module) != n_layers):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = name, size
    return None if best is None else _dotted(best)


def _generic_family(model: nn.Module, blocks: str) -> Family:
    """block_* on any block list; a BERT-layout block (attention, intermediate, output) as BERT;
    otherwise attention_*/mlp_* where the block has a sublayer by a usual name."""
    first = get_submodule(model, f"{blocks}[0]")
    if all(isinstance(getattr(first, n, None), nn.Module) for n in ("attention", "intermediate", "output")):
        return Family(blocks, _BERT.components, hidden=_GENERIC_HIDDEN)
    table = {"block_output": ("", "output"), "block_input": ("", "input")}
    for names, prefix in ((_ATTENTION_NAMES, "attention"), (_MLP_NAMES, "mlp")):
        child = next((n for n in names if isinstance(getattr(first, n, None), nn.Module)), None)
        if child is not None:
            table.update({f"{prefix}_output": (f".{child}", "output"), f"{prefix}_input": (f".{child}", "input")})
    return Family(blocks, table, hidden=_GENERIC_HIDDEN)


def family_of(model: nn.Module) -> Tuple[Optional[Family], Optional[str]]:
    """(family, full path of the block list from ``model``), or (None, None) if no block list is found.

    A known ``model_type`` whose blocks are not where the table says (e.g. a custom wrapper) falls
    back to the generic search too."""
    family = FAMILIES.get(_model_type(model))
    if family is not None:
        for prefix in dict.fromkeys((_base_prefix(model), "")):
            path = _join(prefix, family.blocks)
            try:
                blocks = get_submodule(model, path)
            except ValueError:
                continue
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return family, path
    blocks = _find_block_list(model)
    if blocks is None:
        return None, None
    return _generic_family(model, blocks), blocks


def _string_hint(blocks: Optional[str], layer) -> str:
    index = layer if isinstance(layer, int) and not isinstance(layer, bool) else 3
    example = f"'{blocks}[{index}].output'" if blocks else "'transformer.h[3].output'"
    return (f"pass a string component naming the module instead, such as {example} (a module path from "
            "print(model), ending in '.output' or '.input')")


def resolve_site(model: nn.Module, layer, component: str) -> Site:
    """The module and hook kind for (``layer``, ``component``); errors say what to pass instead."""
    if not isinstance(component, str):
        raise TypeError(f"component must be a string such as 'block_output', got {type(component).__name__}")
    if "." in component:
        path, _, kind = component.rpartition(".")
        if kind not in ("output", "input"):
            raise ValueError(f"component={component!r}: a string component must end in '.output' or "
                             f"'.input', e.g. 'model.layers[3].output'")
        return Site(get_submodule(model, path), kind, path)
    name = type(model).__name__
    family, blocks = family_of(model)
    if family is None:
        raise ValueError(f"reft_kernels does not know where {name} (model_type={_model_type(model)!r}) keeps its "
                         f"layers, so component={component!r} cannot be placed; {_string_hint(None, layer)}")
    if component not in family.components:
        why = family.unsupported.get(component)
        detail = why if why else f"use one of {sorted(family.components)}"
        raise ValueError(f"component={component!r} is not supported for {name}: {detail}; or "
                         f"{_string_hint(blocks, layer)}")
    if isinstance(layer, bool) or not hasattr(type(layer), "__index__"):
        raise TypeError(f"layer={layer!r} ({type(layer).__name__}) must be an int layer index for "
                        f"component={component!r}, e.g. layer=1")
    layer = operator.index(layer)
    n_layers = len(get_submodule(model, blocks))
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer!r} is out of range for {name} with {n_layers} layers; "
                         f"use 0..{n_layers - 1}")
    suffix, kind = family.components[component]
    path = f"{blocks}[{layer}]{suffix}"
    return Site(get_submodule(model, path), kind, path)


def hidden_size(model: nn.Module) -> Optional[int]:
    """The model's residual width from its config (None when it has none)."""
    family = FAMILIES.get(_model_type(model))
    return _config_int(model, (family.hidden if family else ()) + _GENERIC_HIDDEN)
