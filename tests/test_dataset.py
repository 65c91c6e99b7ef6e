"""Positions, data modules and the collator (reft_kernels.data.datasets)."""
import pytest
import torch

import reft_kernels as rk
from reft_kernels.data.datasets import (IGNORE_INDEX, get_intervention_locations, make_classification_data_module,
                                  make_generation_inputs, make_last_position_supervised_data_module,
                                  make_multiple_position_supervised_data_module, parse_positions)
from reft_kernels.jobs.prompts import format_prompt, load_builtin_instructions
from reft_kernels.base_models.tiny import build_word_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def data():
    rows = load_builtin_instructions()[:12]
    prompts = [format_prompt(r["instruction"], r["input"]) for r in rows]
    outputs = [r["output"] for r in rows]
    return prompts, outputs, build_word_tokenizer(prompts + outputs)


@pytest.mark.parametrize("spec,expected", [("f7+l7", (7, 7)), ("f3", (3, 0)), ("l1", (0, 1)), ("f0+l2", (0, 2)),
                                           ("f3+l0", (3, 0)), ("f1", (1, 0))])
def test_parse_positions(spec, expected):
    assert parse_positions(spec) == expected


@pytest.mark.parametrize("bad", ["", "x3", "f", "7", "f3+", "+l2", "l2+f3", "f-1"])
def test_parse_positions_rejects(bad):
    with pytest.raises(ValueError, match="positions="):
        parse_positions(bad)


@pytest.mark.parametrize("kw,expected", [
    # the table of pyreft-facts.md section 3.1 (verified against pyreft)
    (dict(last_position=10, positions="f2+l2", num_interventions=4), [[0, 1], [0, 1], [8, 9], [8, 9]]),
    (dict(last_position=10, positions="f2+l2", num_interventions=2, share_weights=True), [[0, 1, 8, 9]] * 2),
    (dict(last_position=3, positions="f2+l2", num_interventions=2), [[0, -1], [2, -1]]),
    (dict(last_position=3, positions="f2+l2", num_interventions=2, pad_mode="last"), [[0, 3], [2, 3]]),
    # only one of f/l -> tied layout; clamping to L // 2 pads
    (dict(last_position=5, positions="l3", num_interventions=2), [[3, 4, -1]] * 2),
    (dict(last_position=1, positions="f1+l1", num_interventions=2), [[-1, -1]] * 2),
    (dict(last_position=6, first_n=1, last_n=2, num_interventions=2), [[0, -1], [4, 5]]),
])
def test_intervention_locations_match_pyreft(kw, expected):
    assert get_intervention_locations(**kw) == expected


@pytest.mark.parametrize("spec", ["f0+l0", "f0", "l0", " f0 + l0 "])
def test_positions_that_select_nothing_are_refused(spec):
    """pyreft parses these to (0, 0) and trains an adapter that edits no token (grad norm 0)."""
    with pytest.raises(ValueError, match=r"selects no token.*e\.g\. 'l1'"):
        parse_positions(spec)
    with pytest.raises(ValueError, match="selects no token"):
        get_intervention_locations(last_position=10, positions=spec, num_interventions=2)


def test_first_n_last_n_that_select_nothing_are_refused():
    with pytest.raises(ValueError, match="first_n=0 and last_n=0: selects no token"):
        get_intervention_locations(last_position=10, first_n=0, last_n=0, num_interventions=1)
    for bad in (dict(first_n=-1, last_n=2), dict(first_n=1, last_n=1.5), dict(first_n="1", last_n=1)):
        with pytest.raises(ValueError, match="must be a non-negative int"):
            get_intervention_locations(last_position=10, num_interventions=1, **bad)
    # one side 0 is fine (that is what "f3" / "l2" mean)
    assert get_intervention_locations(last_position=10, first_n=0, last_n=2, num_interventions=1) == [[8, 9]]


def test_data_modules_and_cli_refuse_empty_positions(data, tmp_path, capsys):
    prompts, outputs, tok = data
    with pytest.raises(ValueError, match="selects no token"):
        make_multiple_position_supervised_data_module(tok, None, prompts, outputs, positions="f0+l0")
    with pytest.raises(ValueError, match="selects no token"):
        make_generation_inputs(tok, prompts[:2], positions="l0")
    from reft_kernels.cli.main import main
    code = main(["train", "--model", str(tmp_path / "unused"), "--data", "builtin", "--output",
                 str(tmp_path / "out"), "--positions", "f0+l0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--positions" in err and "selects no token" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_untied_needs_even_interventions():
    with pytest.raises(ValueError, match="num_interventions=3"):
        get_intervention_locations(last_position=10, positions="f2+l2", num_interventions=3)


def test_last_position_module(data):
    prompts, outputs, tok = data
    dm = make_last_position_supervised_data_module(tok, None, prompts, outputs, num_interventions=2)
    ex = dm["train_dataset"][0]
    plen = len(tok(prompts[0])["input_ids"])
    assert ex["intervention_locations"] == [[plen - 1], [plen - 1]]
    assert ex["labels"][:plen] == [IGNORE_INDEX] * plen
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    assert dm["eval_dataset"] is None


def test_module_argument_errors(data):
    prompts, outputs, tok = data
    with pytest.raises(ValueError, match="outputs has"):
        make_last_position_supervised_data_module(tok, None, prompts, outputs[:-1])
    with pytest.raises(ValueError, match="empty"):
        make_multiple_position_supervised_data_module(tok, None, [], [])
    with pytest.raises(ValueError, match="positions="):
        make_multiple_position_supervised_data_module(tok, None, prompts, outputs, positions="x")


def _collate(dm, tok, side, idx):
    tok.padding_side = side
    return dm["data_collator"]([dm["train_dataset"][i] for i in idx])


def test_collator_positions_follow_padding_side(data):
    prompts, outputs, tok = data
    dm = make_multiple_position_supervised_data_module(tok, None, prompts, outputs, positions="f3+l3",
                                                       num_interventions=2)
    idx = list(range(len(prompts)))
    right, left = _collate(dm, tok, "right", idx), _collate(dm, tok, "left", idx)
    for batch in (right, left):
        loc = batch["intervention_locations"]
        assert loc.dtype == torch.long and loc.shape == (len(idx), 2, 3)
        assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape
    # the same tokens are selected whichever side pads
    for b in idx:
        for i in range(2):
            pr, pl = right["intervention_locations"][b, i], left["intervention_locations"][b, i]
            assert torch.equal(pr < 0, pl < 0)
            assert torch.equal(right["input_ids"][b, pr[pr >= 0]], left["input_ids"][b, pl[pl >= 0]])
            assert right["attention_mask"][b, pr[pr >= 0]].all() and left["attention_mask"][b, pl[pl >= 0]].all()
    # first prompt tokens on the right-padded side start at 0; last ones end at prompt_len - 1
    plen = len(tok(prompts[0])["input_ids"])
    assert right["intervention_locations"][0, 0].tolist() == [0, 1, 2]
    assert right["intervention_locations"][0, 1].tolist() == [plen - 3, plen - 2, plen - 1]


def test_short_prompt_pads_with_minus_one_not_a_response_token(data):
    _, _, tok = data
    dm = make_multiple_position_supervised_data_module(tok, None, ["hello"], [" world"], positions="f2+l2",
                                                       num_interventions=2)
    loc = dm["data_collator"]([dm["train_dataset"][0]])["intervention_locations"]
    assert loc.shape[:2] == (1, 2) and (loc == -1).all()   # pyreft points these at the response


def test_left_and_right_padding_give_the_same_loss(data):
    """Per-example loss of an intervened Llama is the same with either padding side."""
    prompts, outputs, tok = data
    model = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2)
    reps = [{"layer": 1, "component": "block_output", "low_rank_dimension": 2,
             "intervention": rk.LoreftIntervention(embed_dim=32, low_rank_dimension=2, dtype=torch.float32)}] * 1
    reft = rk.get_reft_model(model, rk.ReftConfig(representations=reps), backend="torch")
    with torch.no_grad():
        reft.interventions[next(iter(reft.interventions))].learned_source.weight.normal_(0, 1.0)
    dm = make_multiple_position_supervised_data_module(tok, model, prompts, outputs, positions="f2+l2",
                                                       num_interventions=1, share_weights=True)
    idx = list(range(6))
    losses = {}
    for side in ("right", "left"):
        batch = _collate(dm, tok, side, idx)
        with torch.no_grad():
            logits = reft(**{k: v for k, v in batch.items() if k != "labels"}).logits
        lab = batch["labels"]
        per = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), lab[:, 1:], reduction="none")
        losses[side] = per.sum(1) / (lab[:, 1:] != IGNORE_INDEX).sum(1)
        # and the edit changes something: compare with the un-intervened model
        with torch.no_grad():
            plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert (plain - logits).abs().max() > 1e-3
    torch.testing.assert_close(losses["right"], losses["left"], atol=1e-4, rtol=1e-4)


def test_generation_inputs_left_padded(data):
    prompts, _, tok = data
    batch = make_generation_inputs(tok, prompts[:3], positions="l2", num_interventions=1)
    for b in range(3):
        n = len(tok(prompts[b])["input_ids"])
        width = batch["input_ids"].shape[1]
        assert batch["attention_mask"][b].sum() == n and batch["attention_mask"][b, -1] == 1
        assert batch["intervention_locations"][b, 0].tolist() == [width - 2, width - 1]


def test_classification_module(data):
    _, _, tok = data
    texts = ["the sky is blue", "snow is white", "cats", "what is the capital of france ?"]
    dm = make_classification_data_module(tok, None, texts, [0, 1, 0, 1], positions="f1+l1",
                                         num_interventions=2, eval_texts=texts[:2], eval_labels=[0, 1])
    tok.padding_side = "right"
    batch = dm["data_collator"]([dm["train_dataset"][i] for i in range(4)])
    assert batch["labels"].tolist() == [0, 1, 0, 1]
    n0 = len(tok(texts[0])["input_ids"])
    assert batch["intervention_locations"][0, :, 0].tolist() == [0, n0 - 1]
    assert (batch["intervention_locations"][0, :, 1:] == -1).all()   # padded to the batch's widest row
    assert len(dm["eval_dataset"]) == 2


def test_pyreft_dataset_classes_sink_layout(data):
    import datasets
    prompts, outputs, tok = data
    rows = load_builtin_instructions()[:6]
    ds = rk.dataset.ReftSupervisedDataset("alpaca", None, tok, dataset=datasets.Dataset.from_list(rows),
                                          position="f1+l1", num_interventions=2, input_field="input",
                                          output_field="output", instruction_field="instruction")
    ex = ds[0]
    assert ex["input_ids"][0] == tok.pad_token_id and ex["attention_mask"][0] == 0 and ex["labels"][0] == IGNORE_INDEX
    plen = len(tok(rk.dataset.prompt_no_input % rows[0]["instruction"])["input_ids"])
    assert ex["intervention_locations"] == [[1], [plen - 1]]      # pyreft: +1 shift, L = prompt_len - 1
    gen = rk.dataset.ReftGenerationDataset("g", None, tok, dataset=datasets.Dataset.from_list(
        [{"p": p, "c": c} for p, c in zip(prompts[:4], outputs[:4])]), position="l3", num_interventions=1,
        prompt_field="p", completion_field="c")
    cls = rk.dataset.ReftClassificationDataset("c", None, tok, dataset=datasets.Dataset.from_list(
        [{"t": "what is the capital of france"}]), position="f1", num_interventions=1, input_field="t", label_field="t")
    assert cls[0]["intervention_locations"] == [[1]]
    # they batch with the collator and run through a ReftModel (pads hit the masked sink token)
    model = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2)
    reps = [{"layer": 0, "component": "block_output", "low_rank_dimension": 2,
             "intervention": rk.LoreftIntervention(embed_dim=32, low_rank_dimension=2, dtype=torch.float32)}]
    reft = rk.get_reft_model(model, rk.ReftConfig(representations=reps), backend="torch")
    tok.padding_side = "right"
    batch = rk.make_data_collator(tok, model)([gen[i] for i in range(4)])
    assert batch["intervention_locations"].shape == (4, 1, 3)
    assert torch.isfinite(reft(**{k: v for k, v in batch.items() if k != "id"}).loss)


def test_public_names_after_the_split():
    """reft_kernels.data.datasets keeps every public name (positions re-exported), and the top level too."""
    from reft_kernels.data import datasets as dataset, positions as dataset_positions
    for name in dataset.__all__:
        assert getattr(dataset, name) is not None, name
    for name in dataset_positions.__all__:
        assert getattr(dataset, name) is getattr(dataset_positions, name), name
    for name in ("parse_positions", "get_intervention_locations", "ReftDataCollator", "make_data_collator",
                 "make_generation_inputs", "ReftDataset", "make_classification_data_module"):
        assert getattr(rk, name) is getattr(dataset, name), name
