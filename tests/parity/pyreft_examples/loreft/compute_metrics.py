"""Generation eval of the paper script (pyreft's examples/loreft/compute_metrics.py), minimal:
left-padded prompt batches, positions shifted by each row's padding (minus the sink token),
``generate(..., intervene_on_prompt=True)``, greedy; accuracy = the answer appears in the output."""
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq


def compute_metrics(task, dataset_name, intervenable, tokenizer, eval_dataset, data_items, trigger_tokens,
                    batch_size, generation_args):
    tokenizer.padding_side = "left"   # generation pads on the left
    collator = DataCollatorForSeq2Seq(tokenizer=tokenizer, model=intervenable.model, label_pad_token_id=-100,
                                      padding="longest")
    loader = DataLoader(eval_dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    generations, correct = [], 0
    with torch.no_grad():
        for inputs in loader:
            locations = inputs["intervention_locations"].permute(1, 0, 2)   # [n_interventions, B, P]
            leading_pads = (inputs["attention_mask"] == 0).long().cumprod(dim=1).sum(dim=1)
            locations = locations + (leading_pads - 1).view(1, -1, 1)       # left padding, minus the sink
            _, steered = intervenable.generate(
                {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                unit_locations={"sources->base": (None, locations.tolist())}, intervene_on_prompt=True,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **generation_args)
            prompt_len = inputs["input_ids"].shape[1]
            texts = tokenizer.batch_decode(steered[:, prompt_len:], skip_special_tokens=True)
            for i, text in zip(inputs["id"].tolist(), texts):
                answer = data_items[i]["answer"].split("####")[-1].strip()
                hit = answer in text
                correct += hit
                generations.append({"id": i, "generation": text, "answer": answer, "correct": bool(hit)})
    return generations, {f"eval/{dataset_name}": correct / max(1, len(generations))}
