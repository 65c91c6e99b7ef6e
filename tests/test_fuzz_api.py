"""A hypothesis sweep over the public model API: every call either matches the reference (plain
hooks applying the float64 oracle at the requested positions) or raises a clear ValueError /
TypeError. Which one is decided here, independently of the library, from the inputs alone."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reft_kernels as pyreft
from test_patcher import H, expected_output, llama

pytestmark = pytest.mark.usefixtures("one_thread")
N_LAYERS, N_INT = 2, 2
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def patched():
    model = llama(layers=N_LAYERS)
    ivs = [pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=4, dtype=torch.float32) for _ in range(N_INT)]
    for iv in ivs:
        with torch.no_grad():
            iv.learned_source.bias.uniform_(-2, 2)
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": 4, "intervention": iv}
            for i, iv in enumerate(ivs)]
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), backend="torch")
    return model, ivs, reft


@st.composite
def calls(draw):
    """A batch plus unit_locations that may be malformed in every way a user could get wrong."""
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 6))
    n_int = draw(st.sampled_from([N_INT] * 4 + [1, 3]))
    rows = draw(st.sampled_from([batch] * 4 + [batch - 1, batch + 1]))
    position = st.integers(-3, seq + 2) if draw(st.booleans()) else st.integers(-1, seq - 1)
    locs = [[draw(st.lists(position, min_size=0, max_size=4)) for _ in range(rows)] for _ in range(n_int)]
    as_tensor = draw(st.booleans()) and all(len(r) == len(locs[0][0]) for rs in locs for r in rs)
    return batch, seq, locs, as_tensor


def is_valid(batch, seq, locs) -> bool:
    return (len(locs) == N_INT and all(len(rows) == batch for rows in locs)
            and all(-1 <= p < seq for rows in locs for row in rows for p in row))


@FUZZ
@given(call=calls())
def test_unit_locations_give_the_reference_or_a_clear_error(patched, call):
    model, ivs, reft = patched
    batch, seq, locs, as_tensor = call
    ids = torch.randint(1, 100, (batch, seq), generator=torch.Generator().manual_seed(batch * 7 + seq))
    inputs = {"input_ids": ids}
    units = {"sources->base": (None, torch.tensor(locs, dtype=torch.long) if as_tensor else locs)}
    if not is_valid(batch, seq, locs):
        with pytest.raises((ValueError, TypeError)):
            reft(inputs, unit_locations=units)
        return
    with torch.no_grad():
        _, out = reft(inputs, unit_locations=units)
    width = max((len(r) for rows in locs for r in rows), default=0)
    padded = [torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long).reshape(batch, width)
              for rows in locs]
    sites = [(model.model.layers[i], "output", ivs[i], padded[i]) for i in range(N_INT)]
    want = expected_output(model, sites, inputs)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-4)


@FUZZ
@given(batch=st.integers(1, 3), seq=st.integers(1, 6), width=st.integers(0, 4), data=st.data())
def test_tensor_locations_give_the_reference_or_a_clear_error(patched, batch, seq, width, data):
    model, ivs, reft = patched
    shape = data.draw(st.sampled_from([(batch, N_INT, width)] * 3 + [(batch + 1, N_INT, width),
                                                                    (batch, N_INT + 1, width), (batch, width)]))
    dtype = data.draw(st.sampled_from([torch.long, torch.long, torch.int32, torch.float32]))
    values = data.draw(st.lists(st.integers(-3, seq + 2), min_size=int(torch.Size(shape).numel()),
                                max_size=int(torch.Size(shape).numel())))
    locs = torch.tensor(values, dtype=dtype).reshape(shape)
    ids = torch.randint(1, 100, (batch, seq), generator=torch.Generator().manual_seed(seq))
    valid = (shape == (batch, N_INT, width) and dtype != torch.float32
             and bool(((locs >= -1) & (locs < seq)).all()))
    if not valid:
        with pytest.raises((ValueError, TypeError)):
            reft(input_ids=ids, intervention_locations=locs)
        return
    with torch.no_grad():
        out = reft(input_ids=ids, intervention_locations=locs)
    sites = [(model.model.layers[i], "output", ivs[i], locs[:, i].long()) for i in range(N_INT)]
    torch.testing.assert_close(out.logits, expected_output(model, sites, {"input_ids": ids}).logits,
                               rtol=1e-4, atol=1e-4)


def test_empty_batch_and_empty_location_lists_are_named(patched):
    _, _, reft = patched
    ids = torch.randint(1, 100, (2, 5))
    with pytest.raises(ValueError, match=r"intervention 0 .*0 rows.*batch has 2"):
        reft({"input_ids": ids}, unit_locations={"sources->base": (None, [[], []])})
    with pytest.raises(ValueError, match=r"empty batch"):
        reft({"input_ids": ids[:0]}, unit_locations={"sources->base": (None, [[], []])})


@FUZZ
@given(layer=st.one_of(st.integers(-2, N_LAYERS + 1), st.just("1"), st.just(1.0), st.none()),
       rank=st.integers(-1, H + 3))
def test_config_gives_a_model_or_a_clear_error(layer, rank):
    model = llama(layers=N_LAYERS)
    valid_layer = type(layer) is int and 0 <= layer < N_LAYERS
    try:
        iv = pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=rank, dtype=torch.float32)
    except (ValueError, TypeError):
        assert not 0 < rank <= H
        return
    assert 0 < rank <= H
    config = pyreft.ReftConfig(representations={"layer": layer, "component": "block_output",
                                                "low_rank_dimension": rank, "intervention": iv})
    if not valid_layer:
        with pytest.raises((ValueError, TypeError), match="layer"):
            pyreft.get_reft_model(model, config, backend="torch")
        return
    reft = pyreft.get_reft_model(model, config, backend="torch")
    with torch.no_grad():
        reft({"input_ids": torch.randint(1, 100, (1, 4))}, unit_locations={"sources->base": (None, [[[3]]])})


@FUZZ
@given(batch=st.integers(2, 3), seq=st.integers(2, 7), width=st.integers(0, 5), data=st.data())
def test_non_contiguous_hidden_states_match_their_contiguous_copy(batch, seq, width, data):
    iv = pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=4, dtype=torch.float32)
    layout = data.draw(st.sampled_from(["transposed", "strided", "sliced"]))
    if layout == "transposed":
        hidden = torch.randn(seq, batch, H).transpose(0, 1)
    elif layout == "strided":
        hidden = torch.randn(batch, seq, 2 * H)[..., ::2]
    else:
        hidden = torch.randn(batch, seq + 2, H)[:, 1:-1]
    assert not hidden.is_contiguous()
    positions = torch.tensor(data.draw(st.lists(st.integers(-1, seq - 1), min_size=batch * width,
                                                max_size=batch * width)), dtype=torch.long).reshape(batch, width)
    with torch.no_grad():
        got = iv(hidden, positions=positions, backend="torch")
        want = iv(hidden.contiguous(), positions=positions, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
