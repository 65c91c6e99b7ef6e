"""The model side: :class:`~.reft_model.ReftModel` and what runs inside its calls.

* :mod:`.reft_model` -- ``ReftModel``, ``get_reft_model``;
* :mod:`.config` -- ``ReftConfig`` (pyreft's ``pyreft.config``);
* :mod:`.registry` -- the in-memory adapter registry (named adapters, per-row adapters);
* :mod:`.plan` -- the edits one site applies (one adapter or a stack of them);
* :mod:`.patcher` -- the forward hooks and the window offset;
* :mod:`.edit_state` -- per-call positions (prompt, generated tokens, per-row adapters);
* :mod:`.prefix_cache` -- the frozen-prefix activation cache; :mod:`.precision` -- the base's dtype.

Empty on purpose: ``reft_kernels.checkpoint`` imports :mod:`.config` without loading the model.
"""
