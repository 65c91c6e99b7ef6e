"""A two-layer tiny Llama with one LoReFT per block output, shared by the generation tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reft_kernels as pyreft

H, RANK = 64, 4
LENGTHS = (5, 9, 7)


def two_layer_reft(set_bias):
    """(model, [two LoReFTs], reft model on the torch backend, three random prompts of LENGTHS).
    ``set_bias(bias)`` fills each intervention's learned-source bias in place: a strong edit, so
    the generated tokens change."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         pad_token_id=0)).eval()
    ivs = []
    for _ in range(2):
        iv = pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=RANK, dtype=torch.float32)
        with torch.no_grad():
            set_bias(iv.learned_source.bias)
        ivs.append(iv)
    config = pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": RANK, "intervention": iv}
        for layer, iv in enumerate(ivs)])
    reft = pyreft.get_reft_model(model, config, backend="torch")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (n,), generator=g) for n in LENGTHS]
    return model, ivs, reft, prompts

