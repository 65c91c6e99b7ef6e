"""The patched model against a hand-written hook + the float64 oracle, on tiny random models."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reft_kernels as pyreft
from reft_kernels.ops.reference import reft_edit_reference


def tiny_llama(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


def reference_hook(intervention, positions):
    """A plain forward hook applying the oracle edit to the module output (tuple or tensor)."""
    proj, weight, bias, proj_bias = intervention.op_tensors()

    def hook(module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        new = reft_edit_reference(hidden.double(), positions, proj.double(),
                                  None if weight is None else weight.double(), bias.double(),
                                  None if proj_bias is None else proj_bias.double(),
                                  variant=intervention.variant, act=intervention.act_fn).to(hidden.dtype)
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])
    return hook


def test_block_output_matches_hand_written_hook():
    model = tiny_llama()
    iv = pyreft.LoreftIntervention(embed_dim=64, low_rank_dimension=4, dtype=torch.float32)
    config = pyreft.ReftConfig(representations={"layer": 1, "component": "block_output",
                                                "low_rank_dimension": 4, "intervention": iv})
    ids = torch.randint(0, 100, (3, 9))
    locs = [[[0, 8], [3, -1], [5, 5]]]
    reft = pyreft.get_reft_model(model, config, backend="torch")
    with torch.no_grad():
        _, out = reft({"input_ids": ids}, unit_locations={"sources->base": (None, locs)})
        handle = model.model.layers[1].register_forward_hook(reference_hook(iv, torch.tensor(locs[0])))
        try:
            reft.unload()
            expected = model(input_ids=ids).logits
        finally:
            handle.remove()
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
