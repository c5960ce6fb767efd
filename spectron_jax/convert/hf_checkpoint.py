"""Reading a Hugging Face checkpoint directory: `config.json` plus safetensors weights, sharded or not.

A checkpoint directory holds either one `model.safetensors` or several shards listed by
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`). Tensors come back as NumPy
arrays in float32 (bf16 / fp16 weights are widened), keyed by their Hugging Face names.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from etils import epath

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message names the file and what is wrong."""


def read_config(checkpoint_dir: str) -> dict[str, Any]:
    """The checkpoint's `config.json` as a dict."""
    path = epath.Path(checkpoint_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no config.json in the checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def weight_files(checkpoint_dir: str) -> list[epath.Path]:
    """The safetensors files of a checkpoint, in a stable order."""
    root = epath.Path(checkpoint_dir)
    index = root / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map'") from None
        files = [root / name for name in sorted(set(weight_map.values()))]
    elif (root / SINGLE_FILE).exists():
        files = [root / SINGLE_FILE]
    else:
        raise CheckpointError(f"{root}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing")
    return files


def read_tensors(checkpoint_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32 NumPy, keyed by its Hugging Face name."""
    from safetensors import safe_open  # the `convert` extra

    tensors: dict[str, np.ndarray] = {}
    for f in weight_files(checkpoint_dir):
        try:
            # safetensors' NumPy reader cannot widen bf16; the PyTorch reader can, when torch is there.
            with safe_open(str(f), framework="pt") as reader:
                for name in reader.keys():
                    tensors[name] = reader.get_tensor(name).float().numpy()
        except OSError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors
