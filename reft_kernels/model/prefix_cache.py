"""The frozen-prefix activation cache: train without recomputing the layers below the first edit.

With every intervention at layer >= L, layers 0..L-1 are frozen. When nothing in them is random
(no active dropout) and nothing below L trains, the hidden state leaving layer L-1 is a fixed
function of the example:

    h_{L-1}(x) = f_{L-1} o ... o f_0 o embed(x)    (x: the row's token ids, mask, token types, positions)

so it is computed once (first epoch), stored per example, and every later forward of that example
starts at layer L. The layers are not copied: each prefix block's ``forward`` is wrapped; when the
whole batch is cached it returns the stored state instead of computing (the embeddings, rotary
tables and masks are still built by the model itself, so a family's embedding scale and position
handling stay where they are). The loss is the same as without the cache (tests: <= 1e-6
relative in fp32, Llama, Gemma, GPT-2, BERT, both trainers, gradient checkpointing).

Keys: the row trimmed after its last attended token (``n`` = index of the last 1 in the mask + 1)
-- ``input_ids[:n]``, ``attention_mask[:n]`` and, when given, ``token_type_ids[:n]``,
``position_ids[:n]``. The stored value is ``h_{L-1}[:n]``. Positions after ``n`` are padding: no
attended token sees them (masked keys, and causal queries never look ahead) and their labels are
ignored, so on a hit they are zero. A row padded to another length in another epoch still hits.

Memory: ``n x d`` values per example in the model's dtype (SmolLM2, d = 576, bf16: 1.1 KB per
token; the emoji quick start's 10 examples hold 0.3 MB). Past ``max_bytes`` (default 1 GiB) no new
rows are stored, with one message; batches with a row not stored compute the prefix as usual.

Off, with a one-line reason, when: an intervention sits at layer 0 or outside the block list; a
parameter below L requires grad; a prefix module has active dropout; or a call asks for
``output_hidden_states``/``output_attentions``, passes ``inputs_embeds`` or a KV cache, or asks for
one (``use_cache=True``: generation always computes every layer, whatever the installed
transformers calls its cache).
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..families import family_of, get_submodule
from .lazy_callback import lazy_callback
from .patcher import find_cache

__all__ = ["PrefixCache", "PrefixCacheCallback", "prefix_cache_plan", "active_dropout", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 1 << 30
_KEY_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_BYPASS_FLAGS = ("output_hidden_states", "output_attentions")


def _all_sites(reft_model) -> list:
    adapters = getattr(reft_model, "adapters", None)
    return adapters.all_sites() if adapters is not None else []


def prefix_cache_plan(reft_model):
    """``(blocks, L, None)`` when the prefix 0..L-1 can be cached, else ``(None, None, reason)``."""
    base = reft_model.model
    family, path = family_of(base)
    if family is None:
        return None, None, "no block list found in the base model"
    blocks = get_submodule(base, path)
    owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    sites = _all_sites(reft_model)
    if not sites:
        return None, None, "the model has no interventions"
    layers = [owner.get(id(s.module)) for s in sites]
    if any(i is None for i in layers):
        return None, None, "an intervention sits outside the block list"
    lowest = min(layers)
    if lowest == 0:
        return None, None, "an intervention sits at layer 0, so there is no frozen prefix to skip"
    prefix = list(blocks[:lowest])
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    below = prefix + ([embeddings] if isinstance(embeddings, nn.Module) else [])
    below += [m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in ("wpe", "embeddings", "embed_positions")]
    trainable = [m for m in below if any(p.requires_grad for p in m.parameters())]
    if trainable:
        return None, None, f"a parameter below layer {lowest} requires grad ({type(trainable[0]).__name__})"
    return blocks, lowest, None


def active_dropout(modules: List[nn.Module]) -> Optional[str]:
    """The first module under ``modules`` in training mode with a dropout probability > 0 -- an
    ``nn.Dropout``'s ``p``, an attention's ``attention_dropout`` or an intervention's ``dropout_p``
    -- as ``"<class> with <attribute>=<p>"``; None when nothing drops out (so a call is a fixed
    function of its inputs)."""
    for root in modules:
        for m in root.modules():
            if not m.training:
                continue
            for attr in ("p", "dropout_p", "attention_dropout"):
                p = getattr(m, attr, None)
                if isinstance(p, float) and p > 0:
                    return f"{type(m).__name__} with {attr}={p}"
    return None


class PrefixCache:
    """Per-example cache of layer L-1's output on a ReftModel's base model (see the module docstring)."""

    def __init__(self, reft_model, max_bytes: int = DEFAULT_MAX_BYTES, log: Callable[[str], None] = print):
        self.reft_model, self.max_bytes, self.log = reft_model, int(max_bytes), log
        self.rows: Dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        self.full = False
        self.paused = False   # True: every call computes every layer (benchmarks time the uncached base)
        self.blocks, self.layer, self.reason = prefix_cache_plan(reft_model)
        self._handles: list = []
        self._originals: Dict[int, Callable] = {}
        self._hit: Optional[torch.Tensor] = None     # layer L's input for the current batch, or None
        self._keys: Optional[list] = None            # row keys to store after a miss
        self._structure: Optional[tuple] = None      # (is_tuple, tuple length) of a prefix block's output

    @property
    def active(self) -> bool:
        return self.reason is None and bool(self._handles)

    # -- install / remove ------------------------------------------------------------------------
    def install(self) -> bool:
        if self.reason is not None or self._handles:
            return self.reason is None
        base = self.reft_model.model
        self._use_cache_arg = "use_cache" in inspect.signature(base.forward).parameters
        self._handles.append(base.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._handles.append(self.blocks[self.layer - 1].register_forward_hook(self._on_prefix_output))
        for block in self.blocks[:self.layer]:
            self._originals[id(block)] = block.forward
            block.forward = self._skipping(block.forward)
        return True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for block in self.blocks[:self.layer] if self.blocks is not None else []:
            if id(block) in self._originals:
                del block.forward   # the instance attribute; the class's forward shows again
        self._originals.clear()
        self.rows.clear()
        self.bytes, self._hit, self._keys = 0, None, None

    def disable(self, reason: str) -> None:
        self.remove()
        self.reason = reason
        self.log(f"prefix cache off: {reason}")

    # -- per call -----------------------------------------------------------------------------------
    def _row_keys(self, inputs: dict) -> list:
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        keys = []
        for i in range(ids.shape[0]):
            n = ids.shape[1]
            if mask is not None:
                nz = torch.nonzero(mask[i]).flatten()
                n = int(nz[-1]) + 1 if len(nz) else 0
            h = hashlib.blake2b(digest_size=16)
            for name in _KEY_INPUTS:
                t = inputs.get(name)
                if isinstance(t, torch.Tensor) and t.dim() == 2:
                    h.update(name.encode() + t[i, :n].detach().cpu().numpy().tobytes())
            keys.append((h.digest(), n))
        return keys

    def _on_call(self, module, args, kwargs):
        self._hit, self._keys = None, None
        if self.paused:
            return None
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        if (not isinstance(inputs.get("input_ids"), torch.Tensor) or inputs.get("inputs_embeds") is not None
                or find_cache(args, kwargs) is not None or inputs.get("use_cache") is True
                or any(inputs.get(f) for f in _BYPASS_FLAGS)):
            return None     # generation, embeddings given, or per-layer outputs asked for: compute all
        if module.training or any(b.training for b in self.blocks[:self.layer]):
            why = active_dropout(list(self.blocks[:self.layer]) + [module.get_input_embeddings()])
            if why:
                self.disable(f"{why} is active below the first intervention")
                return None
        keys = self._row_keys(inputs)
        if all(k in self.rows for k, _ in keys):
            self.hits += 1
            self._hit = self._assemble(keys, inputs["input_ids"].shape[1])
        else:
            self.misses += 1
            self._keys = keys
        if self._use_cache_arg:   # no KV cache while training: the same loss, and prefix blocks return only h
            return args, {**kwargs, "use_cache": False}
        return None

    def _assemble(self, keys, seq_len: int) -> torch.Tensor:
        first = self.rows[keys[0][0]]
        out = first.new_zeros((len(keys), seq_len, first.shape[-1]))
        for i, (k, n) in enumerate(keys):
            out[i, :n] = self.rows[k]
        return out

    def _on_prefix_output(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self._hit is not None or self._keys is None:
            return None
        extra = output[1:] if isinstance(output, tuple) else ()
        if any(e is not None for e in extra):
            self.disable(f"layer {self.layer - 1} returns more than its hidden state")
            return None
        self._structure = (isinstance(output, tuple), len(output) if isinstance(output, tuple) else 1)
        if hidden.requires_grad and getattr(self.reft_model.model, "_require_grads_hook", None) is None:
            self.disable(f"the output of layer {self.layer - 1} requires grad (something below it trains)")
            return None
        if self.full:
            return None
        for i, (k, n) in enumerate(self._keys):
            if k in self.rows:
                continue
            row = hidden[i, :n].detach().clone()
            size = row.numel() * row.element_size()
            if self.bytes + size > self.max_bytes:
                self.full = True
                self.log(f"prefix cache full at {self.bytes / 2**20:.1f} MiB (limit {self.max_bytes / 2**20:.0f} "
                         "MiB): rows not stored compute their prefix every step; raise the limit to store more")
                return None
            self.rows[k] = row
            self.bytes += size
        return None

    def _skipping(self, forward):
        def forward_or_cached(*args, **kwargs):
            if self._hit is None or self._structure is None:
                return forward(*args, **kwargs)
            given = args[0] if args else kwargs.get("hidden_states")
            hidden = self._hit
            if isinstance(given, torch.Tensor) and given.requires_grad and torch.is_grad_enabled():
                hidden = hidden.detach().requires_grad_(True)   # reentrant checkpointing needs a grad path
            is_tuple, length = self._structure
            return (hidden,) + (None,) * (length - 1) if is_tuple else hidden
        return forward_or_cached


class _Callback:
    """Installs a :class:`PrefixCache` on the trained ReftModel for the length of ``train()``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, log: Callable[[str], None] = print):
        self.max_bytes, self.log, self.cache = max_bytes, log, None

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.cache is not None:   # a train() that raised never ended: its hooks go first
            self.cache.remove()
        reft_model = getattr(model, "module", model)
        if reft_model is None or not hasattr(reft_model, "interventions"):
            self.log("prefix cache off: the trained model is not a ReftModel")
            return
        self.cache = PrefixCache(reft_model, self.max_bytes, self.log)
        if not self.cache.install():
            self.log(f"prefix cache off: {self.cache.reason}")

    def on_train_end(self, args, state, control, **kw):
        if self.cache is not None:
            self.cache.remove()


def _init(self, max_gb: float = DEFAULT_MAX_BYTES / 2**30, log: Callable[[str], None] = print):
    if not max_gb > 0:
        raise ValueError(f"max_gb={max_gb!r}: the prefix cache budget must be positive (GiB), e.g. 1")
    _Callback.__init__(self, int(max_gb * 2**30), log)


__getattr__ = lazy_callback(globals(), "PrefixCacheCallback", _Callback, """\
``transformers.Trainer(..., callbacks=[PrefixCacheCallback()])`` on a ReftModel: the frozen prefix
below the first intervention is computed once per example (module docstring). ``max_gb``: the
memory budget (default 1).""", init=_init)
