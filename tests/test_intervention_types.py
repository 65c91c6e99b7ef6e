"""The intervention-type registry (reft_kernels.interventions.registry): its records agree with the
modules, the op variants and the checkpoint rules, and a seventh class is one record plus its math."""
import pytest
import torch
from torch import nn

import reft_kernels as rk
from reft_kernels import checkpoint as ck
from reft_kernels.interventions import registry as it
from reft_kernels.cli.args import build_parser
from reft_kernels.interventions.modules import INTERVENTION_CLASSES, ReftIntervention, intervention_class
from reft_kernels.ops import VARIANTS, reft_edit
from reft_kernels.interventions.pyreft_keys import from_pyreft, to_pyreft
from test_checkpoint import D, R, run, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(it.TYPES))
def test_each_record_matches_its_module(name):
    kind = it.TYPES[name]
    iv = getattr(rk, name)(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)
    assert iv.variant == kind.variant and kind.variant in VARIANTS
    assert hasattr(iv, "rotate_layer") == kind.rotated and hasattr(iv, "proj_layer") == kind.projected
    assert isinstance(iv.learned_source, nn.Parameter) == kind.vector_source
    tensors = iv.canonical_tensors()
    assert set(kind.required_tensors()) <= set(tensors)
    ck.spec._check_tensor_set({k: v for k, v in tensors.items()}, name, "test")
    assert it.type_name(f"<class 'pyreft.interventions.{name}'>") == name
    assert it.cli_choices()[kind.cli_name] == name


def test_unknown_type_names_the_registered_ones():
    with pytest.raises(ValueError, match="LoreftIntervention"):
        it.type_name("FooIntervention")
    with pytest.raises(ck.CheckpointError, match="is not supported"):
        ck.spec._class_name("FooIntervention")
    with pytest.raises(ValueError, match="already registered"):
        it.register(it.TYPES["LoreftIntervention"])


def test_keys_follow_pyvene():
    reps = [(3, "block_output", "pos", 1), (3, "block_output", "pos", 1), (None, "model.layers[2]", "pos", 1)]
    assert it.representation_keys(reps) == ["layer_3_comp_block_output_unit_pos_nunit_1#0",
                                            "layer_3_comp_block_output_unit_pos_nunit_1#1",
                                            "comp_model_layers[2]_unit_pos_nunit_1#0"]
    assert it.representation_keys(reps[:1], "old") == ["layer.3.comp.block_output.unit.pos.nunit.1#0"]
    config = rk.ReftConfig(representations=[{"layer": 3, "component": "block_output", "low_rank_dimension": R,
                                              "intervention_type": "LoreftIntervention"}] * 2)
    assert config.keys == it.representation_keys(reps[:2])


# ------------------------------------------------------------------------------------------
# a seventh intervention: its record, and its math (an existing op variant and a module class)
@pytest.fixture
def seventh():
    """NoconsReFT, Phi(h) = h + P^T (b - P h) with a free projection P: registered for the test."""
    record = it.register(it.InterventionType("NoconsreftIntervention", "noconsreft", "consreft",
                                             rotated=False, vector_source=True))

    class NoconsreftIntervention(ReftIntervention):
        def __init__(self, embed_dim, low_rank_dimension, dtype=torch.bfloat16, dropout=0.0,
                     act_fn=None, **ignored):
            super().__init__(embed_dim, low_rank_dimension, dtype, dropout, act_fn)
            self.proj_layer = nn.Linear(embed_dim, low_rank_dimension, bias=False).to(self.dtype)
            self.learned_source = nn.Parameter(torch.rand(low_rank_dimension))

        def op_tensors(self):
            return self.proj_layer.weight, None, self.learned_source, None

    yield record, NoconsreftIntervention
    del it.TYPES[record.name]
    del INTERVENTION_CLASSES[record.name]


def test_a_seventh_intervention_is_one_record_plus_its_math(seventh, tmp_path):
    record, cls = seventh
    assert cls.variant == "consreft" and intervention_class("NoconsreftIntervention") is cls
    assert "NoconsreftIntervention" in ck.CLASSES and "NoconsreftIntervention" in ck.PROJECTED
    args = ["train", "--model", "m", "--data", "d.jsonl", "--output", "o", "--intervention", "noconsreft"]
    assert build_parser().parse_args(args).intervention == "noconsreft"

    torch.manual_seed(0)
    iv = cls(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)
    h, pos = torch.randn(2, 5, D), torch.tensor([[0, 3], [4, -1]])
    P, b = iv.proj_layer.weight, iv.learned_source
    rows = h[[0, 0, 1], [0, 3, 4]]
    expected = rows + (b - rows @ P.t()) @ P
    torch.testing.assert_close(iv.edit(h, pos, backend="torch")[[0, 0, 1], [0, 3, 4]], expected)
    torch.testing.assert_close(reft_edit(h, pos, P, None, b, variant="consreft", backend="torch"),
                               iv.edit(h, pos, backend="torch"))

    # checkpoints: our format round trip, pyreft's state-dict keys both ways
    config = rk.ReftConfig(representations=[{"layer": 1, "component": "block_output", "low_rank_dimension": R,
                                              "intervention": cls(embed_dim=D, low_rank_dimension=R,
                                                                  dtype=torch.float32)}])
    rm = rk.get_reft_model(tiny_llama(), config).eval()
    with torch.no_grad():
        for p in rm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    expected = run(rm)
    ck.save_reft_model(rm, tmp_path / "ck")
    loaded = ck.load_reft_model(tmp_path / "ck", tiny_llama()).eval()
    assert type(next(iter(loaded.interventions.values()))) is cls
    assert torch.equal(run(loaded), expected)
    tensors = next(iter(rm.interventions.values())).canonical_tensors()
    sd = to_pyreft(tensors, record.name)
    assert list(sd) == ["learned_source", "embed_dim", "interchange_dim", "proj_layer.weight"]
    back = from_pyreft(sd, record.name, D)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in back)
