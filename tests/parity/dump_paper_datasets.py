"""Build the paper script's datasets (pyreft_examples/loreft/dataset.py) and torch.save their
items: run as is (pyreft) or under ``python -m reft_kernels.compat.pyreft.alias`` (reft_kernels).
Usage: dump_paper_datasets.py DATA_DIR TOKENIZER_DIR OUT.pt"""
import os
import sys

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyreft_examples", "loreft"))
from dataset import LoReftGLUEDataset, LoReftSupervisedDataset  # noqa: E402


def items(ds):
    return [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in ds[i].items()} for i in range(len(ds))]


def main(data_dir, tok_dir, out):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.pad_token = tok.unk_token
    result = {}
    for name, kw in (("glue_untied", dict(position="f2+l2", num_interventions=4, share_weights=False)),
                     ("glue_tied", dict(position="f1+l1", num_interventions=2, share_weights=True))):
        for split in ("train", "validation"):
            ds = LoReftGLUEDataset("glue", os.path.join(data_dir, "sst2"), tok, data_split=split, **kw)
            result[f"{name}/{split}"] = {"items": items(ds), "num_labels": ds.num_labels,
                                         "raw": None if ds.raw_dataset is None else len(ds.raw_dataset)}
    kw = dict(position="f3+l3", num_interventions=2, share_weights=False)
    for split, extra in (("train", {"test_split": "validation"}), ("validation", {}), ("test", {})):
        ds = LoReftSupervisedDataset("gsm8k", os.path.join(data_dir, "gsm8k"), tok, data_split=split, **kw, **extra)
        result[f"gsm8k/{split}"] = {"items": items(ds), "num_labels": ds.num_labels,
                                    "raw": None if ds.raw_dataset is None else len(ds.raw_dataset)}
    torch.save(result, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
