"""The vLLM plugin's token selection (reft_kernels.vllm_plugin.plan / store), without vLLM: the
position ranges equal pyreft's get_intervention_locations for every prompt length and rule, and a
prompt split into chunks (chunked prefill, prefix-cache hits) edits exactly the rows a single
full-prompt step edits."""
import itertools

import pytest
import torch

from reft_kernels.data.positions import get_intervention_locations, parse_positions
from reft_kernels.vllm_plugin.plan import build_step_plan, edited_ranges
from reft_kernels.vllm_plugin.store import AdapterEntry, _kinds

RULES = ["l1", "f1", "f3+l3", "f2+l5", "f7+l7", "l4"]


@pytest.mark.parametrize("rule,share", list(itertools.product(RULES, [False, True])))
def test_ranges_equal_pyreft_locations(rule, share):
    first_n, last_n = parse_positions(rule)
    n = 2
    kinds = _kinds(n, first_n, last_n, share, "test")
    for L in range(0, 40):
        locs = get_intervention_locations(last_position=L, positions=rule, num_interventions=n, share_weights=share)
        for i in range(n):
            ours = {p for lo, hi in edited_ranges(kinds[i], L, first_n, last_n) for p in range(lo, hi)}
            assert ours == {p for p in locs[i] if p >= 0}, (rule, share, L, i)


class _Adapter:
    def __init__(self, rule, layers):
        self.first_n, self.last_n = parse_positions(rule)
        kinds = _kinds(len(layers), self.first_n, self.last_n, False, "test")
        self.entries = [AdapterEntry(layer, stage, kind, (layer, stage, "loreft", None, 8), slot)
                        for (layer, stage), kind, slot in zip(layers, kinds, range(len(layers)))]


class _Store:
    def __init__(self, **adapters):
        self.adapters = adapters


def _edited(plan, starts):
    """{(request, layer, stage): sorted absolute positions} from a plan over requests at ``starts``."""
    out = {}
    for layer, items in plan.items():
        for key, rows, _slots in items:
            for r in rows.tolist():
                req, offset, pos0 = next((i, r - s, p) for i, (s, e, p) in enumerate(starts) if s <= r < e)
                out.setdefault((req, layer, key[1]), []).append(pos0 + offset)
    return {k: sorted(v) for k, v in out.items()}


def test_chunked_steps_edit_what_one_step_edits():
    store = _Store(a=_Adapter("f3+l3", [(0, 0), (0, 1)]), b=_Adapter("l1", [(2, 0)]))
    lengths = {0: 13, 1: 9, 2: 20}
    rows = {0: ("a", 13, None), 1: ("b", 9, None), 2: ("a", 20, None)}   # no decode-time rule

    def step(spans):   # spans: request -> (first position, count) scheduled this step
        loc, pos, starts = [0], [], []
        for i in range(3):
            p0, count = spans.get(i, (lengths[i] + 5, 1))   # unscheduled prompt: a decode token
            starts.append((loc[-1], loc[-1] + count, p0))
            pos += range(p0, p0 + count)
            loc.append(loc[-1] + count)
        return _edited(build_step_plan(store, rows, torch.tensor(loc), torch.tensor(pos)), starts)

    whole = step({i: (0, L) for i, L in lengths.items()})
    chunked: dict = {}
    for chunk in range(0, 20, 4):   # 4-token chunks; a prefix-cache hit is a chunk that starts late
        spans = {i: (chunk, min(4, L - chunk)) for i, L in lengths.items() if chunk < L}
        for k, v in step(spans).items():
            chunked.setdefault(k, []).extend(v)
    assert {k: sorted(v) for k, v in chunked.items()} == whole
    assert whole[(0, 0, 0)] == [0, 1, 2] and whole[(0, 0, 1)] == [10, 11, 12] and whole[(1, 2, 0)] == [8]
    assert step({}) == {}   # decode steps edit nothing
