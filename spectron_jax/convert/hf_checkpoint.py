"""Reading a Hugging Face checkpoint directory, and what both importers share to map it onto ours.

`read_config` / `read_tensors`: `config.json` plus safetensors weights, sharded or not.
`map_tensors`: the one mapping style: a table {source name: (our path, transform)} applied and checked
against our module's traced shapes, counting every source tensor as used, ignored by rule or left over.
`write_params`, `within_tolerance`, `is_remote`, `CheckpointError`: the writer, the parity rule, the
remote-path test and the error type of both importers.

A checkpoint directory holds either one `model.safetensors` or several shards listed by
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`). Tensors come back as NumPy
arrays in float32 (bf16 / fp16 weights are widened), keyed by their Hugging Face names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from etils import epath

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PARAMS_SUBDIR = "params"  # where both importers write the converted parameters


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted (a config field we cannot express, a missing or
    misshapen tensor); the message names the file, field or tensor and what is wrong."""


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


# ---- what both importers share ---------------------------------------------------------------------
Transform = Optional[Callable[[np.ndarray], np.ndarray]]
Rules = Mapping[str, tuple[str, Transform]]

DEFAULT_TOLERANCE = 1e-4
TOLERANCE_HELP = ("the check fails when max |ours - transformers| exceeds tolerance x max(1, max |transformers|) "
                  "(relative to the output's scale, absolute below 1)")


def is_remote(path: str) -> bool:
    """Whether `path` names an object store (gs://, s3://, ...) rather than a local directory."""
    return "://" in str(path)


def transformers_available() -> bool:
    """Whether torch and transformers import (the parity checks need both)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def within_tolerance(diff: float, scale: float, tolerance: float) -> bool:
    """The tolerance rule of every check: diff <= tolerance x max(1, scale) (see TOLERANCE_HELP)."""
    return diff <= tolerance * max(1.0, scale)


@dataclasses.dataclass(frozen=True)
class Counts:
    """What a conversion did with the source tensors.

    Attributes:
      used: tensors mapped onto our parameters.
      ignored: tensors left out by a rule (RoPE frequency buffers, a tied head, a pre-training mask vector).
      left_over: names outside the converted model (a wrapper's task head, a multimodal checkpoint's vision
        tower), sorted; not converted.
    """

    used: int
    ignored: int
    left_over: tuple[str, ...]

    def summary(self) -> str:
        shown = ", ".join(self.left_over[:4]) + (", ..." if len(self.left_over) > 4 else "")
        return (f"{self.used} tensors converted, {self.ignored} ignored by rule, {len(self.left_over)} left over"
                + (f" ({shown})" if self.left_over else ""))


def map_tensors(tensors: Mapping[str, np.ndarray], rules: Rules, shapes: Mapping[str, tuple[int, ...]], *,
                scope: str = "", ignore: Sequence[str] = (), what: str = "model") -> tuple[dict[str, np.ndarray], Counts]:
    """Our flat float32 parameters {path: array} from source tensors by a name table.

    Args:
      tensors: {source name: array}.
      rules: {source name: (our parameter path, transform of the array or None)}.
      shapes: {our parameter path: shape}, traced from our module (`traced_shapes`); every path must be
        filled, and every transformed array must have its shape.
      scope: the source-name prefix of the converted model: a tensor under it that no rule uses and no
        `ignore` pattern matches is refused; one outside it is left over (counted).
      ignore: regexes (searched) of source names dropped on purpose.
      what: our model's name, for the errors.

    Raises:
      CheckpointError: a missing or misshapen tensor, an unfilled parameter, a tensor without counterpart.
    """
    flat: dict[str, np.ndarray] = {}
    for name, (path, fn) in rules.items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint: tensor {name} is missing")
        if path not in shapes:
            raise CheckpointError(f"checkpoint: tensor {name} maps to {path}, which our {what} lacks")
        source = np.asarray(tensors[name], np.float32)
        try:
            value = source if fn is None else fn(source)
        except ValueError:
            value = None
        if value is None or tuple(value.shape) != tuple(shapes[path]):
            raise CheckpointError(f"checkpoint: tensor {name} has shape {tuple(source.shape)}, which does not give "
                                  f"our {path} of shape {tuple(shapes[path])}")
        flat[path] = np.ascontiguousarray(value, np.float32)
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise CheckpointError(f"checkpoint: our {what} parameter {missing[0]} is not filled ({len(missing)} unfilled)")
    patterns = [re.compile(p) for p in ignore]
    rest = [name for name in tensors if name not in rules]
    ignored = [name for name in rest if name.startswith(scope) and any(p.search(name) for p in patterns)]
    unknown = sorted(name for name in rest if name.startswith(scope) and name not in ignored)
    if unknown:
        raise CheckpointError(f"checkpoint: tensor {unknown[0]} has no counterpart in our {what} "
                              f"({len(unknown)} such tensors)")
    left_over = tuple(sorted(name for name in rest if not name.startswith(scope)))
    return flat, Counts(used=len(flat), ignored=len(ignored), left_over=left_over)


def traced_shapes(factory: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    """{parameter path: shape} of the flax module `factory` builds, traced without allocating."""
    from flax import nnx

    from spectron_jax.checkpoints import flatten_paths

    def str_keys(tree):
        return {str(k): str_keys(v) if isinstance(v, Mapping) else v for k, v in tree.items()}

    pure = nnx.state(nnx.eval_shape(factory), nnx.Param).to_pure_dict()
    return {path: tuple(leaf.shape) for path, leaf in flatten_paths(str_keys(pure)).items()}


def write_params(output_dir: str, flat: Mapping[str, np.ndarray]) -> None:
    """Writes flat parameters as an orbax pytree under `output_dir/params` (replacing an older one)."""
    import orbax.checkpoint as ocp

    from spectron_jax.checkpoints import unflatten_paths

    target = epath.Path(output_dir) / PARAMS_SUBDIR
    if target.exists():
        target.rmtree()
    target.parent.mkdir(parents=True, exist_ok=True)
    saver = ocp.StandardCheckpointer()
    saver.save(target if is_remote(str(target)) else target.resolve(), unflatten_paths(dict(flat)))
    saver.wait_until_finished()
