"""``ReftModel`` and ``get_reft_model``: pyreft's wrapper, on the fused op and a once-installed patch.

Two calling conventions:

* pyreft/pyvene: ``reft_model({"input_ids": ..., "attention_mask": ...},
  unit_locations={"sources->base": (None, LOCS)}, labels=...)`` returns ``(None, outputs)``;
  ``LOCS[i][b]`` lists intervention i's token positions in batch row b (nested lists, an int, a
  1-D list for every row, or an (n_interventions, B, P) tensor). Lists are validated on the host.
* tensors: ``reft_model(input_ids=..., attention_mask=..., intervention_locations=L, labels=...)``
  with ``L`` a (B, n_interventions, P) integer tensor (the collator's layout) returns the HF outputs.
  Nothing leaves the device: CUDA positions are range-checked with an asynchronous device assert.

Positions are token indices in the padded input; -1 means "no edit" (pyreft's sink token also
works). ``unit_locations=None`` edits every position, as in pyvene.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from .plan import CallPlan
from .registry import DEFAULT_ADAPTER, AdapterRegistry
from ..checkpoint import load_reft_model, save_reft_model, set_default_wrapper
from .config import ReftConfig
from .edit_state import EditState, GeneratedPositions
from .locations import call_positions, input_shape
from .labelled_logits import call_base
from .length_groups import grouped_call
from .patcher import ModelPatch

__all__ = ["ReftModel", "get_reft_model", "count_parameters"]


@contextlib.contextmanager
def _interventions_in_eval(adapters):
    """Generation never applies intervention dropout: eval mode inside, each module's mode restored after."""
    modes = [(m, m.training) for interventions in adapters for m in interventions.modules()]
    for interventions in adapters:
        interventions.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


class ReftModel(nn.Module):
    """A HF model with ReFT interventions installed (pyreft's ``ReftModel(config, model)``).

    ``interventions`` is an ``nn.ModuleDict`` keyed like pyvene >= 0.1.7, so ``state_dict()`` and
    ``named_parameters()`` contain ``interventions.<key>.<param>``. ``train()``/``eval()`` reach the
    interventions (dropout is off in eval). See the module docstring for the calling conventions
    and :mod:`reft_kernels.model.registry` for named adapters (``add_adapter``, ``adapter_ids=``, ...),
    held by ``self.adapters`` (an :class:`~reft_kernels.model.registry.AdapterRegistry`).
    """

    #: in training steps that read only the loss, run a padded batch in length groups without its
    #: trailing padding (:mod:`reft_kernels.model.length_groups`); False: one call per batch
    trim_padding = True

    def __init__(self, config: ReftConfig, model: nn.Module, backend: str = "auto", **pyvene_kwargs):
        super().__init__()
        unknown = sorted(set(pyvene_kwargs) - {"use_fast"})
        if unknown:
            raise TypeError(f"ReftModel got unexpected keyword arguments {unknown}; it takes config, model, "
                            "backend and pyvene's use_fast (accepted and unused: there is one fast path)")
        self.model = model
        self.backend = backend
        self.interventions = nn.ModuleDict()
        self.extra_adapters = nn.ModuleDict()
        self._patch: Optional[ModelPatch] = ModelPatch(model)
        self.adapters = AdapterRegistry(model, self.interventions, self.extra_adapters, self._patch.sync)
        self.adapters.build(DEFAULT_ADAPTER, config)
        self.adapters.active = [DEFAULT_ADAPTER]
        self._base_state = ({n: p.requires_grad for n, p in model.named_parameters()},
                            {n: m.training for n, m in model.named_modules()})

    @property
    def config(self) -> ReftConfig:
        """The primary adapter's config (see :mod:`reft_kernels.model.registry`)."""
        return self.adapters.primary_config

    # -- named adapters (the registry's; see reft_kernels.model.registry) -----------------------------
    @property
    def adapter_names(self) -> list:
        """Every adapter's name, in registration order (``adapter_ids`` ints index this list)."""
        return self.adapters.names

    @property
    def active_adapters(self) -> list:
        """The adapters applied to every row when ``adapter_ids`` is not given, in order."""
        return list(self.adapters.active)

    @property
    def active_adapter(self) -> str:
        """PEFT's single name (the first active adapter)."""
        if not self.adapters.active:
            raise ValueError("no adapter is active; call set_adapter(name)")
        return self.adapters.active[0]

    def adapter_interventions(self, name: str) -> nn.ModuleDict:
        """Adapter ``name``'s intervention modules, keyed like ``reft_model.interventions``."""
        return self.adapters.modules(name)

    def adapter_config(self, name: str) -> ReftConfig:
        self.adapters.check(name)
        return self.adapters.configs[name]

    def all_adapter_modules(self) -> list:
        return self.adapters.all_modules()

    def add_adapter(self, adapter_name: str, config: ReftConfig) -> None:
        """Build a new adapter from ``config`` (as ``get_reft_model`` does) next to the others; its
        interventions go next to the modules they edit and start in training mode; the active
        adapters are unchanged (``set_adapter`` to use it)."""
        self._check_live(None, None)
        self.adapters.build(adapter_name, config)
        self.adapters.move_to_sites(adapter_name)

    def load_adapter(self, path, adapter_name: str = DEFAULT_ADAPTER, *, config=None, dtype=None,
                     is_trainable: bool = False) -> None:
        """Load a checkpoint (ours or pyreft's, see :mod:`reft_kernels.checkpoint`) as adapter
        ``adapter_name``. ``config``/``dtype`` as for ``ReftModel.load``. The adapter is in eval
        mode unless ``is_trainable``. Base-model weights in the checkpoint are not loaded (all
        adapters share the frozen base). Everything is validated before anything changes."""
        self.adapters.load(path, adapter_name, config=config, dtype=dtype, is_trainable=is_trainable)

    def set_adapter(self, adapter_name) -> None:
        """Apply ``adapter_name`` (a name, or a list composed in order) to every row by default."""
        self.adapters.set_active(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (its modules and, if no other adapter uses them, its hooks)."""
        self.adapters.delete(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block every call runs the base model (no adapter edits anything)."""
        before, self.adapters.disabled = self.adapters.disabled, True
        try:
            yield
        finally:
            self.adapters.disabled = before

    def save_adapter(self, save_directory, adapter_name: str, **kwargs) -> str:
        """Write adapter ``adapter_name`` alone as a checkpoint (the same files as a
        single-adapter ReftModel with that config writes)."""
        return self.adapters.save(adapter_name, save_directory, **kwargs)

    # -- pyvene / pyreft helpers ----------------------------------------------------------------
    def set_device(self, device=None) -> None:
        """Move each adapter's interventions next to their hooked modules (or to ``device``); dtypes are kept."""
        for name in self.adapter_names:
            if device is None:
                self.adapters.move_to_sites(name)
            else:
                self.adapter_interventions(name).to(device)

    def disable_model_gradients(self) -> None:
        """Freeze the base model and put it in eval mode (as pyvene does); interventions stay trainable."""
        self.model.requires_grad_(False)
        self.model.eval()

    def count_parameters(self, include_model: bool = False) -> int:
        seen = {id(p): p for p in self.interventions.parameters()}
        if include_model:
            seen.update({id(p): p for p in self.model.parameters()})
        return sum(p.numel() for p in seen.values())

    def print_trainable_parameters(self) -> None:
        """pyreft's summary line."""
        iv = self.count_parameters()
        trainable_model = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total_model = sum(p.numel() for p in self.model.parameters())
        print(f"trainable intervention params: {iv:,d} || trainable model params: {trainable_model:,d}\n"
              f"model params: {total_model:,d} || trainable%: {100 * (iv + trainable_model) / total_model}")

    # -- one call's plan -------------------------------------------------------------------------
    def _prepare_call(self, inputs, unit_locations, intervention_locations, adapter_ids):
        """(edits, seeds, positions, max_position) of one call (see :mod:`reft_kernels.model.registry`)."""
        batch, _, device = input_shape(inputs)
        chains = self.adapters.row_chains(adapter_ids, batch)
        n = self.adapters.location_count(chains)
        if n == 0:   # no adapter edits this call (disabled, or no row has one): positions are not used
            return {}, {}, [], None
        positions, max_position = call_positions(inputs, unit_locations, intervention_locations, n,
                                                 self.adapters.location_names())
        edits, seeds = self.adapters.site_edits(chains, device)
        return edits, seeds, positions, max_position

    def _check_live(self, sources, source_representations):
        if self._patch is None:
            raise RuntimeError("this ReftModel was unloaded; wrap the model again with get_reft_model")
        if sources is not None or source_representations is not None:
            raise ValueError("ReFT interventions are sourceless; pass sources=None and source_representations=None")

    # -- calls ----------------------------------------------------------------------------------
    def forward(self, base: Optional[Mapping] = None, sources=None, unit_locations=None,
                source_representations=None, subspaces=None, labels=None,
                output_original_output: bool = False, use_cache=None, *,
                intervention_locations: Optional[torch.Tensor] = None, adapter_ids=None, **model_kwargs):
        """Run the model with the interventions; see the module docstring for both conventions.

        ``subspaces`` is accepted and ignored, as by every pyreft intervention. With
        ``output_original_output`` the pyvene form returns ``(base_outputs, outputs)``.
        ``adapter_ids``: one adapter (name, index, list = composition, None = none) per row.
        """
        self._check_live(sources, source_representations)
        pyvene_style = base is not None
        if pyvene_style and not isinstance(base, Mapping):
            raise TypeError(f"base must be a dict of model inputs, got {type(base).__name__}; or call "
                            "reft_model(input_ids=..., attention_mask=..., intervention_locations=...)")
        if pyvene_style and model_kwargs:
            raise TypeError(f"unexpected arguments {sorted(model_kwargs)}; put model inputs in the base dict")
        inputs = dict(base) if pyvene_style else model_kwargs
        for name, value in (("labels", labels), ("use_cache", use_cache)):
            if value is not None:
                inputs[name] = value
        edits, seeds, positions, max_position = self._prepare_call(
            inputs, unit_locations, intervention_locations, adapter_ids)
        if not output_original_output and adapter_ids is None:   # training: rows in length groups, no padding
            grouped = grouped_call(self, inputs, positions, self._one_group)
            if grouped is not None:
                return (None, grouped) if pyvene_style else grouped
        original = self.model(**inputs) if output_original_output else None
        outputs = self._planned_call(inputs, edits, seeds, positions, max_position)
        return (original, outputs) if pyvene_style else outputs

    def _planned_call(self, inputs: dict, edits, seeds, positions, max_position):
        """The base model on ``inputs`` with the hooks armed with this call's plan (in training: the
        LM head at labelled positions only, :mod:`reft_kernels.model.labelled_logits`)."""
        with self._patch.activate(CallPlan(edits, seeds, EditState(positions, max_position), self.backend)):
            return call_base(self, inputs)

    def _one_group(self, inputs: dict, locations: torch.Tensor):
        """One length group of a training call (:mod:`reft_kernels.model.length_groups`)."""
        return self._planned_call(inputs, *self._prepare_call(inputs, None, locations, None))

    def generate(self, base: Optional[Mapping] = None, sources=None, unit_locations=None,
                 source_representations=None, intervene_on_prompt: bool = True, subspaces=None,
                 output_original_output: bool = False, *,
                 intervention_locations: Optional[torch.Tensor] = None, adapter_ids=None,
                 generated_positions=None, **generate_kwargs):
        """``self.model.generate`` with the prompt positions (and optionally generated tokens) edited.

        Positions index the (left-padded) prompt; ``unit_locations=None`` means every prompt position.
        The prefill edits them; cached decode steps edit no prompt token; without a cache every full
        recompute re-applies the edit to the same prompt tokens. ``generated_positions`` (``"all"``,
        an int k = every k-th, a list of token indices = midfixes, or a
        :class:`~reft_kernels.model.edit_state.GeneratedPositions`) also edits generated tokens, at the
        same absolute positions with or without a cache. ``intervene_on_prompt=False`` edits no
        prompt token and, by default, every generated token (pyvene's meaning). Beam search and
        ``num_return_sequences`` expand positions and ``adapter_ids`` with the batch. pyvene form:
        returns ``(None or base_output, output)``; tensor form: the output.
        """
        self._check_live(sources, source_representations)
        generated = GeneratedPositions.parse(generated_positions)
        pyvene_style = base is not None
        inputs = dict(base) if pyvene_style else {
            k: generate_kwargs.pop(k) for k in ("input_ids", "inputs_embeds", "attention_mask") if k in generate_kwargs}
        batch, seq_len, device = input_shape(inputs)
        if not intervene_on_prompt:
            if unit_locations is not None or intervention_locations is not None:
                raise ValueError("intervene_on_prompt=False edits generated tokens only; drop unit_locations/"
                                 "intervention_locations, or pass intervene_on_prompt=True to edit them too")
            generated = generated or GeneratedPositions(every=1)
        edits, seeds, positions, max_position = self._prepare_call(
            inputs, unit_locations, intervention_locations, adapter_ids)
        if not intervene_on_prompt:   # no prompt position at any location
            positions, max_position = [torch.empty(batch, 0, dtype=torch.int64, device=device)] * len(positions), -1
        if intervention_locations is not None and intervention_locations.numel():
            max_position = int(intervention_locations.max())   # one sync per generate: lets decode steps skip
        if any(p is None for p in positions):   # unit_locations=None: every prompt position (pyreft's meaning)
            every = torch.arange(seq_len, device=device).expand(batch, seq_len)
            positions = [every if p is None else p for p in positions]
            max_position = seq_len - 1 if max_position is None else max(max_position, seq_len - 1)
        original = self.model.generate(**inputs, **generate_kwargs) if output_original_output else None
        call = CallPlan(edits, seeds, EditState(positions, max_position, generated, seq_len), self.backend)
        with self._patch.activate(call), _interventions_in_eval(self.all_adapter_modules()):
            output = self.model.generate(**inputs, **generate_kwargs)
        return (original, output) if pyvene_style else output

    # -- lifecycle ------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Remove this wrapper's hooks, restore grad flags and train/eval modes; return the model."""
        if self._patch is not None:
            self._patch.remove()
            self._patch = None
            grads, modes = self._base_state
            for name, p in self.model.named_parameters():
                p.requires_grad_(grads.get(name, p.requires_grad))
            for name, m in self.model.named_modules():
                m.training = modes.get(name, m.training)
        return self.model

    def save(self, save_directory, adapter_name: Optional[str] = None, **kwargs):
        """Write a checkpoint (see :mod:`reft_kernels.checkpoint`); ``adapter_name``: that adapter alone."""
        if adapter_name is not None:
            return self.save_adapter(save_directory, adapter_name, **kwargs)
        return save_reft_model(self, save_directory, **kwargs)

    @staticmethod
    def load(load_directory, model, **kwargs) -> "ReftModel":
        """Rebuild a ReftModel on ``model`` from a checkpoint (see :mod:`reft_kernels.checkpoint`).

        The loaded interventions are in eval mode (as PEFT's loaded adapters are); call ``train()``
        to continue training."""
        reft_model = load_reft_model(load_directory, model, wrap=get_reft_model, **kwargs)
        reft_model.interventions.eval()
        return reft_model

    def save_pretrained(self, save_directory, **kwargs):
        """PEFT-style name of :meth:`save` (writes the checkpoint and its model card README.md)."""
        return self.save(save_directory, **kwargs)

    @staticmethod
    def from_pretrained(load_directory, model, **kwargs) -> "ReftModel":
        """PEFT-style name of :meth:`load`: ``ReftModel.from_pretrained(directory, base_model)``."""
        return ReftModel.load(load_directory, model, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """pyreft's ``reft_model.count_parameters``: the number of parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def get_reft_model(model: nn.Module, reft_config: ReftConfig, set_device: bool = True,
                   disable_model_grads: bool = True, backend: str = "auto") -> ReftModel:
    """pyreft's entry point: wrap ``model``; move interventions to its device; freeze it.

    As in pyreft, freezing also puts the base model in eval mode (``ReftModel.train()`` turns both
    back on); the interventions start in training mode. ``backend`` picks the op backend.
    """
    reft_model = ReftModel(reft_config, model, backend=backend)
    if set_device:
        reft_model.set_device()
    if disable_model_grads:
        reft_model.disable_model_gradients()
    return reft_model


set_default_wrapper(get_reft_model)  # checkpoint.load_reft_model wraps with it (it cannot import us)
