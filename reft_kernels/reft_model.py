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

from .adapters import AdapterMixin
from .checkpoint import load_reft_model, save_reft_model, set_default_wrapper
from .config import ReftConfig
from .edit_state import GeneratedPositions
from .interventions import ReftIntervention, intervention_class
from .families import hidden_size, resolve_site
from .patcher import ModelPatch

__all__ = ["ReftModel", "get_reft_model", "count_parameters"]


def _input_shape(inputs: Mapping):
    x = inputs.get("input_ids")
    if x is None:
        x = inputs.get("inputs_embeds")
    if x is None:
        raise ValueError("the model inputs need input_ids or inputs_embeds; got keys "
                         f"{sorted(inputs)}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"the model inputs are an empty batch (input shape {tuple(x.shape)}); pass at least one "
                         "row of shape (B, T)")
    return x.shape[0], x.shape[1], x.device


def _check_range(t: torch.Tensor, seq_len: int, name: str) -> None:
    """-1 <= t < seq_len; on the host for CPU tensors, as an async device assert otherwise."""
    if t.numel() == 0:
        return
    if t.device.type == "cpu":
        lo, hi = int(t.min()), int(t.max())
        if lo < -1 or hi >= seq_len:
            raise ValueError(f"{name} contains {lo if lo < -1 else hi}, outside [-1, {seq_len}) for inputs of "
                             f"length {seq_len}; use token indices 0..{seq_len - 1} and -1 for 'no edit'")
    else:
        torch._assert_async(((t >= -1) & (t < seq_len)).all(), f"reft_kernels: {name} outside [-1, seq_len)")


def _rows_tensor(rows, i: int, batch: int, seq_len: int) -> torch.Tensor:
    """Intervention i's [batch][positions] list -> (B, P) int64 (ragged rows padded with -1)."""
    if len(rows) != batch:
        raise ValueError(f"unit_locations for intervention {i} has {len(rows)} rows but the batch has {batch}; "
                         "give one position list per batch row")
    rows = [r.tolist() if isinstance(r, torch.Tensor) else r for r in rows]
    width = max((len(r) for r in rows), default=0)
    out = torch.tensor([list(r) + [-1] * (width - len(r)) for r in rows])
    if out.numel() and out.dtype != torch.int64:
        raise TypeError(f"unit_locations for intervention {i} holds {out.dtype} values; positions must be ints")
    bad = out[(out < -1) | (out >= seq_len)]
    if bad.numel():
        raise ValueError(f"unit_locations for intervention {i} contains {int(bad[0])}, outside [-1, {seq_len}) for "
                         f"inputs of length {seq_len}; use token indices 0..{seq_len - 1} and -1 for 'no edit'")
    return out.to(torch.int64)


def _depth(x) -> int:
    """Nesting depth of a location list; a tensor counts as its number of dimensions."""
    if isinstance(x, torch.Tensor):
        return x.dim()
    return 1 + _depth(x[0]) if isinstance(x, (list, tuple)) and len(x) else int(isinstance(x, (list, tuple)))


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


class ReftModel(AdapterMixin, nn.Module):
    """A HF model with ReFT interventions installed (pyreft's ``ReftModel(config, model)``).

    ``interventions`` is an ``nn.ModuleDict`` keyed like pyvene >= 0.1.7, so ``state_dict()`` and
    ``named_parameters()`` contain ``interventions.<key>.<param>``. ``train()``/``eval()`` reach the
    interventions (dropout is off in eval). See the module docstring for the calling conventions
    and :mod:`reft_kernels.adapters` for named adapters (``add_adapter``, ``adapter_ids=``, ...).
    """

    def __init__(self, config: ReftConfig, model: nn.Module, backend: str = "auto", **pyvene_kwargs):
        super().__init__()
        unknown = sorted(set(pyvene_kwargs) - {"use_fast"})
        if unknown:
            raise TypeError(f"ReftModel got unexpected keyword arguments {unknown}; it takes config, model, "
                            "backend and pyvene's use_fast (accepted and unused: there is one fast path)")
        if not isinstance(config, ReftConfig):
            raise TypeError(f"config must be a ReftConfig, got {type(config).__name__}")
        self.config = config
        self.model = model
        self.backend = backend
        sites = [resolve_site(model, rep.layer, rep.component) for rep in config.representations]
        width = hidden_size(model)
        self.interventions = nn.ModuleDict({
            key: self._build(rep, width) for key, rep in zip(config.keys, config.representations)})
        self._base_state = ({n: p.requires_grad for n, p in model.named_parameters()},
                            {n: m.training for n, m in model.named_modules()})
        self._patch: Optional[ModelPatch] = ModelPatch(model, backend)
        self._init_adapters(self.interventions, sites)

    def _hidden_width(self) -> Optional[int]:
        return hidden_size(self.model)

    @staticmethod
    def _build(rep, width: Optional[int]) -> ReftIntervention:
        abstract = "." not in rep.component
        if rep.intervention is not None:
            iv = rep.intervention
        else:
            kwargs = {"embed_dim": width, **rep.kwargs()}
            if kwargs["embed_dim"] is None:
                raise ValueError(f"embed_dim is unknown for component {rep.component!r}; put it in the "
                                 "representation's intervention_kwargs or pass a built intervention")
            iv = intervention_class(rep.intervention_type)(**kwargs)
        if abstract and width is not None and iv.embed_dim != width:
            raise ValueError(f"intervention for {rep.component!r} (layer {rep.layer}) has embed_dim={iv.embed_dim} "
                             f"but the model's hidden size is {width}; build it with embed_dim={width}")
        return iv

    # -- pyvene / pyreft helpers ----------------------------------------------------------------
    def set_device(self, device=None) -> None:
        """Move each adapter's interventions next to their hooked modules (or to ``device``); dtypes are kept."""
        for name in self.adapter_names:
            if device is None:
                self._move_to_sites(name)
            else:
                self.adapter_interventions(name).to(device)

    def _model_device(self) -> torch.device:
        tensor = next(self.model.parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

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

    # -- positions ------------------------------------------------------------------------------
    def _locations_from_units(self, unit_locations, batch: int, seq_len: int, device, n: int):
        """pyvene ``unit_locations`` -> ([(B, P_i) tensor | None] per location, max position)."""
        if unit_locations is None:
            return [None] * n, None
        if not isinstance(unit_locations, Mapping) or not ({"sources->base", "base"} & set(unit_locations)):
            raise TypeError(f"unit_locations={unit_locations!r}: pass {{'sources->base': (None, LOCS)}} with "
                            "LOCS[intervention][batch_row] = [positions]")
        locs = unit_locations.get("sources->base", unit_locations.get("base"))
        if isinstance(locs, tuple) and len(locs) == 2:
            locs = locs[1]
        if isinstance(locs, torch.Tensor):
            if locs.dtype not in (torch.int32, torch.int64) or locs.dim() != 3 or tuple(locs.shape[:2]) != (n, batch):
                raise (ValueError if locs.dtype in (torch.int32, torch.int64) else TypeError)(
                    f"a unit_locations tensor must be int32/int64 of shape (n_interventions, B, P) = ({n}, {batch}, P), "
                    f"got {locs.dtype} {tuple(locs.shape)}")
            return self._locations_from_tensor(locs.transpose(0, 1), batch, seq_len, device, n,
                                               "unit_locations"), None
        if isinstance(locs, int):
            locs = [locs]
        if _depth(locs) == 1:
            locs = [[list(locs)] * batch] * n
        empty = next((i for i, r in enumerate(locs) if isinstance(r, (list, tuple)) and not len(r)), None)
        if empty is not None:
            raise ValueError(f"unit_locations for intervention {empty} has 0 rows but the batch has {batch}; give one "
                             "position list per batch row ([] for 'no edit' in that row)")
        if _depth(locs) != 3:
            raise ValueError("unit_locations must be nested as LOCS[intervention][batch_row] = [positions], "
                             f"an int, or a flat list of positions; got depth {_depth(locs)}")
        if len(locs) != n:
            raise ValueError(f"unit_locations has {len(locs)} intervention entries but the adapters of this call "
                             f"have {n} interventions ({self._location_names()}); give one [batch][positions] "
                             "list per intervention")
        rows = [_rows_tensor(r, i, batch, seq_len) for i, r in enumerate(locs)]
        max_position = max((int(r.max()) for r in rows if r.numel()), default=-1)
        return [r.to(device, non_blocking=True) for r in rows], max_position

    def _locations_from_tensor(self, locs, batch: int, seq_len: int, device, n: int, name="intervention_locations"):
        """(B, n_interventions, P) integer tensor -> per-intervention (B, P) views, checked without sync."""
        if not isinstance(locs, torch.Tensor) or locs.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32/int64 tensor of shape (B, n_interventions={n}, P), "
                            f"got {type(locs).__name__} {getattr(locs, 'dtype', '')}")
        if locs.dim() != 3 or locs.shape[0] != batch or locs.shape[1] != n:
            raise ValueError(f"{name} has shape {tuple(locs.shape)} but must be (B, n_interventions, P) = "
                             f"({batch}, {n}, P) for this batch and its adapters ({self._location_names()})")
        locs = locs.to(device, non_blocking=True)
        _check_range(locs, seq_len, name)
        return [locs[:, i] for i in range(n)]

    def _location_names(self):
        return list(self.interventions) if self._active == [self._primary] else self.adapter_names

    def _positions(self, inputs, unit_locations, intervention_locations, n: int):
        batch, seq_len, device = _input_shape(inputs)
        if intervention_locations is not None:
            if unit_locations is not None:
                raise ValueError("pass either unit_locations or intervention_locations, not both")
            return self._locations_from_tensor(intervention_locations, batch, seq_len, device, n), None
        return self._locations_from_units(unit_locations, batch, seq_len, device, n)

    def _prepare_call(self, inputs, unit_locations, intervention_locations, adapter_ids):
        """(plan, seeds, positions, max_position) of one call (see :mod:`reft_kernels.adapters`)."""
        batch, _, device = _input_shape(inputs)
        chains = self._row_chains(adapter_ids, batch)
        n = self._location_count(chains)
        if n == 0:   # no adapter edits this call (disabled, or no row has one): positions are not used
            return {}, {}, [], None
        positions, max_position = self._positions(inputs, unit_locations, intervention_locations, n)
        plan, seeds = self._edit_plan(chains, device)
        return plan, seeds, positions, max_position

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
        plan, seeds, positions, max_position = self._prepare_call(
            inputs, unit_locations, intervention_locations, adapter_ids)
        original = self.model(**inputs) if output_original_output else None
        with self._patch.activate(plan, positions, max_position, seeds):
            outputs = self.model(**inputs)
        return (original, outputs) if pyvene_style else outputs

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
        :class:`~reft_kernels.edit_state.GeneratedPositions`) also edits generated tokens, at the
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
        batch, seq_len, device = _input_shape(inputs)
        if not intervene_on_prompt:
            if unit_locations is not None or intervention_locations is not None:
                raise ValueError("intervene_on_prompt=False edits generated tokens only; drop unit_locations/"
                                 "intervention_locations, or pass intervene_on_prompt=True to edit them too")
            generated = generated or GeneratedPositions(every=1)
        plan, seeds, positions, max_position = self._prepare_call(
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
        with self._patch.activate(plan, positions, max_position, seeds, generated, seq_len), \
                _interventions_in_eval(self.all_adapter_modules()):
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
