"""The file I/O both formats share: readers that never unpickle (the crash-safe directory write
is :mod:`.dir_merge`).

Every reader raises :class:`~.spec.CheckpointError` naming the file, what is wrong with it and
what to do, instead of the bare json/safetensors/torch error.
"""
from __future__ import annotations

import json
import os
from typing import Dict

import torch

from .spec import CheckpointError

_CORRUPT_FIX = ("the file is corrupt or truncated (an interrupted copy or download?): copy it "
                "again from its source, or save the checkpoint again")


def resolve_dir(path, local_directory=None, from_huggingface_hub=False) -> str:
    """A local directory, or (like pyvene) a Hugging Face Hub repo id downloaded first."""
    path = os.fspath(path)
    if os.path.isdir(path) and not from_huggingface_hub:
        return path
    if not from_huggingface_hub and (os.path.exists(path) or path.count("/") != 1):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id=path, local_dir=local_directory)


def read_json(path) -> dict:
    """A JSON object from ``path``; a CheckpointError naming the file if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint directory is incomplete") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}; line {e.lineno}, column "
                              f"{e.colno}); {_CORRUPT_FIX}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              f"{_CORRUPT_FIX}") from None
    return _expect_dict(data, path, "JSON ", "an object ({...})")


def _expect_dict(data, path, held: str, expected: str) -> dict:
    """``data`` if it is a dict; else CheckpointError: ``path`` holds a <held><type>, expected ..."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {held}{type(data).__name__}, expected {expected}; {_CORRUPT_FIX}")
    return data


def read_safetensors(path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU (no pickle)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing; the checkpoint directory is incomplete (was the "
                              "save interrupted?): save it again or restore the file")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError/OSError
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                              f"{e}); {_CORRUPT_FIX}") from None


def read_torch_bin(path) -> dict:
    """A pyreft ``.bin`` state dict, read with ``torch.load(weights_only=True)`` (no arbitrary code)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report which file, whatever torch raised
        raise CheckpointError(f"cannot read {path} as a pyreft weights file "
                              f"(torch.load(weights_only=True) failed: {e}); {_CORRUPT_FIX}") from e
    return _expect_dict(data, path, "", "a state dict (name -> tensor)")


def write_json(path, data, sort_keys: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
