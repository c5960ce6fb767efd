"""Checkpoints: an orbax CheckpointManager over plain pytrees, resume, partial init, export.

A training checkpoint lives in `MODEL_DIR/checkpoints/<step>/` and holds two items:

    state   the train state as a plain nested dict of arrays (no Python objects):
              step      int32 []
              rng       uint32 [2]                the run's base PRNG key data (per-step keys are folded in)
              params    {path: array}             `nnx.State.to_pure_dict()` of the model's parameters
              opt_state the optax state (tuples / dicts of arrays)
              input     {epoch, position, batches: int32 [num_processes]}   the data position of every process
    meta    JSON: step, process count, the input pipeline's seed and sharding

Saves are asynchronous (the device-to-host copy happens before `save` returns, the write in the
background) and keep the last N. Restoring onto a different mesh works because the target tree carries
the new shardings (`jax.ShapeDtypeStruct(..., sharding=...)`) and orbax reads each shard it needs.

`PartialInit` copies parameters from another checkpoint (a training MODEL_DIR, a step folder, or an
`export` folder) into a freshly initialised state by path pattern, reading only the matched arrays.
A per-layer checkpoint (what the converters write) loads into a model with scanned layers: paths and
`include` patterns are matched in the per-layer layout and the result is stacked
(`models/layer_stacking.py`).

`export` writes what evaluation needs and nothing else:

    OUT/params/       orbax pytree of the parameters (float32, or bfloat16 with dtype='bfloat16')
    OUT/config.gin    the run's operative gin config
    OUT/tokenizer.model  the SentencePiece model the run used (when MODEL_DIR has one)
    OUT/export.json   step, dtype, parameter count
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spectron_jax import filesystem
from spectron_jax.models import layer_stacking

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"
INPUT_KEYS = ("epoch", "position", "batches")
TOKENIZER_FILENAME = "tokenizer.model"
CONFIG_FILENAME = "config.gin"
EXPORT_PARAMS_SUBDIR = "params"
EXPORT_INFO_FILENAME = "export.json"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how training checkpoints are written.

    Attributes:
      save_every_steps: a checkpoint every this many steps (and at the last step). DEFAULT, not in the
        paper: 1000.
      keep_last: checkpoints kept on disk (older ones are deleted). DEFAULT, not in the paper: 3.
      async_save: write in a background thread while training continues.
      use_ocdbt: store arrays in tensorstore's OCDBT format (orbax's default: few large files). Its
        manifest is committed with GCS's conditional writes, so a GCS stand-in must honour
        `ifGenerationMatch` / `ifGenerationNotMatch` and send `x-goog-generation` on downloads (the
        released `gcp-storage-emulator` does not: "Malformed StorageGeneration"; `tests/gcs_emulator.py`
        adds both, and the gs:// tests run this format). False writes one zarr store per array.
        `export --no-use_ocdbt` is the same switch for an export.
    """

    save_every_steps: int = 1000
    keep_last: int = 3
    async_save: bool = True
    use_ocdbt: bool = True

    def __post_init__(self):
        if self.save_every_steps < 1:
            raise ValueError(f"CheckpointConfig.save_every_steps must be >= 1, got {self.save_every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"CheckpointConfig.keep_last must be >= 1, got {self.keep_last}")


# ---- Data position <-> arrays ------------------------------------------------------------------
def input_state_arrays(states: Sequence[Mapping[str, int]]) -> dict[str, np.ndarray]:
    """The input positions of all processes (index = process) as int32 arrays `[num_processes]`."""
    return {key: np.asarray([int(s[key]) for s in states], np.int32) for key in INPUT_KEYS}


def input_state_for_process(arrays: Mapping[str, Any], process_index: int,
                            num_processes: int) -> Optional[dict[str, int]]:
    """The saved input position {epoch, position, batches} of `process_index`, or None when the
    checkpoint was written by another number of processes.

    With another process count every process's stream differs, so an exact resume is impossible; the
    caller then starts at position 0 of the saved epoch.
    """
    saved = np.asarray(arrays["epoch"]).shape[0]
    if saved != num_processes:
        return None
    return {key: int(np.asarray(arrays[key])[process_index]) for key in INPUT_KEYS}


def gather_input_states(state: Mapping[str, int]) -> list[dict[str, int]]:
    """Every process's input position (collective: all processes call it)."""
    local = np.asarray([int(state[key]) for key in INPUT_KEYS], np.int32)
    if jax.process_count() == 1:
        return [dict(zip(INPUT_KEYS, local.tolist()))]
    from jax.experimental import multihost_utils

    rows = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), len(INPUT_KEYS))
    return [dict(zip(INPUT_KEYS, row.tolist())) for row in rows]


# ---- The manager -------------------------------------------------------------------------------
class _Manager(ocp.CheckpointManager):
    """orbax's manager, minus its own calls of JAX's preemption sync point.

    `save` (and its finalize thread) would report the step being saved to the sync manager, which
    keeps one counter per process: a report of an older step, or of a step on another scale than the
    training loop's, makes the agreed stop step unreachable (see `multihost.PreemptionStop`). The
    training loop is the one caller; it saves with `force=True`, so nothing here needs the answer.
    """

    def reached_preemption(self, step: int) -> bool:
        return False


class TrainCheckpointer:
    """Saves and restores train states under `model_dir/checkpoints` (all processes call every method)."""

    def __init__(self, model_dir: str, config: CheckpointConfig = CheckpointConfig()):
        self.directory = filesystem.join(filesystem.absolute(model_dir), CHECKPOINT_SUBDIR)
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE_ITEM, ocp.args.StandardSave, ocp.StandardCheckpointHandler(use_ocdbt=config.use_ocdbt))
        registry.add(STATE_ITEM, ocp.args.StandardRestore, ocp.StandardCheckpointHandler(use_ocdbt=config.use_ocdbt))
        registry.add(META_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
        registry.add(META_ITEM, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
        self.manager = _Manager(self.directory, options=options, handler_registry=registry)

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> bool:
        """Starts saving `state` (a plain pytree of arrays) as checkpoint `step`; returns False if it exists."""
        if step in self.manager.all_steps():
            return False
        meta = {"step": int(step), "process_count": jax.process_count(), **dict(meta or {})}
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores checkpoint `step` into the shapes, dtypes and shardings of `abstract_state`.

        Returns:
          (state, meta): arrays placed as `abstract_state`'s `ShapeDtypeStruct.sharding` say.
        """
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                                       META_ITEM: ocp.args.JsonRestore()}),
        )
        return restored[STATE_ITEM], dict(restored[META_ITEM] or {})

    def meta(self, step: int) -> dict:
        """The JSON `meta` item of checkpoint `step` (reads no arrays)."""
        restored = self.manager.restore(int(step), args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[META_ITEM] or {})

    def wait(self) -> None:
        """Blocks until the background save (if any) is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def step_state_dir(model_dir: str, step: Optional[int] = None) -> str:
    """The folder of the `state` item of checkpoint `step` (default: the newest) under `model_dir`."""
    root = filesystem.join(model_dir, CHECKPOINT_SUBDIR)
    if step is None:
        steps = [int(name) for name in filesystem.listdir(root) if name.isdigit()]
        if not steps:
            raise FileNotFoundError(f"{model_dir}: no checkpoint under {root}")
        step = max(steps)
    path = filesystem.join(root, str(int(step)), STATE_ITEM)
    if not filesystem.is_dir(path):
        raise FileNotFoundError(f"{model_dir}: checkpoint step {step} not found ({path})")
    return path


# ---- Paths of nested dicts ---------------------------------------------------------------------
def flatten_paths(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a/b/c': leaf} of a nested dict (keys joined with '/')."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_paths(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_paths` (integer-looking keys become ints, as `to_pure_dict` writes them)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in path.split("/")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


# ---- Initialising parts of a model from another checkpoint ---------------------------------------
@dataclasses.dataclass(frozen=True)
class PartialInit:
    """Copy parameters from another checkpoint into a fresh state.

    Attributes:
      checkpoint: a training MODEL_DIR (its newest step), a checkpoint step's `state` folder, or an
        `export` folder.
      include: regex over the *source* parameter paths ('encoder/layers/0/ff1/kernel' style); only
        matches are copied. DEFAULT: every parameter.
      source_prefix: stripped from each matched source path (e.g. 'decoder/').
      target_prefix: prepended to give the target path (e.g. 'decoder/' for a bare LM checkpoint).
    """

    checkpoint: str
    include: str = ".*"
    source_prefix: str = ""
    target_prefix: str = ""


def _params_tree_dir(checkpoint: str) -> tuple[str, Optional[str]]:
    """(pytree folder, key of the params subtree in it or None) for the three accepted layouts."""
    checkpoint = filesystem.absolute(checkpoint)
    if filesystem.is_dir(filesystem.join(checkpoint, CHECKPOINT_SUBDIR)):
        return step_state_dir(checkpoint), "params"
    if filesystem.is_dir(filesystem.join(checkpoint, EXPORT_PARAMS_SUBDIR)):
        return filesystem.join(checkpoint, EXPORT_PARAMS_SUBDIR), None
    if filesystem.is_dir(filesystem.join(checkpoint, STATE_ITEM)):
        return filesystem.join(checkpoint, STATE_ITEM), "params"
    if filesystem.is_file(filesystem.join(checkpoint, "_METADATA")):
        return checkpoint, None
    raise FileNotFoundError(f"{checkpoint}: not a training directory, checkpoint step or export folder")


def load_partial_params(init: PartialInit, target_params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Reads the parameters `init` selects, placed and typed like their targets.

    Args:
      init: what to copy.
      target_params: the fresh params (nested dict of `jax.Array`s, already sharded).

    Returns:
      ({target path: array}, copied paths). Only the selected arrays are read from disk.

    Raises:
      ValueError: nothing matched, a target path is missing, or a shape differs.
    """
    directory, subtree = _params_tree_dir(init.checkpoint)
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if subtree is not None:
        tree = tree[subtree]
    source = flatten_paths(tree)
    targets = flatten_paths(target_params)
    pattern = re.compile(init.include)
    selected: dict[str, str] = {}
    for path in source:
        if not pattern.search(path):
            continue
        if not path.startswith(init.source_prefix):
            continue
        target = init.target_prefix + path[len(init.source_prefix):]
        if target not in targets:
            raise ValueError(f"{init.checkpoint}: parameter {path} maps to {target}, which the model lacks")
        if tuple(source[path].shape) != tuple(targets[target].shape):
            raise ValueError(f"{init.checkpoint}: parameter {path} has shape {tuple(source[path].shape)}, "
                             f"the model's {target} has {tuple(targets[target].shape)}")
        selected[path] = target
    if not selected:
        raise ValueError(f"{init.checkpoint}: no parameter matches include={init.include!r}")

    def abstract(path):
        t = targets[selected[path]]
        return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)

    item = unflatten_paths({path: abstract(path) for path in selected})
    if subtree is not None:
        item = {subtree: item}
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    if subtree is not None:
        restored = restored[subtree]
    flat = flatten_paths(restored)
    return {selected[path]: flat[path] for path in selected}, sorted(selected.values())


def source_param_paths(checkpoint: str) -> list[str]:
    """The parameter paths stored in `checkpoint` (any layout `PartialInit` accepts); reads no arrays."""
    directory, subtree = _params_tree_dir(checkpoint)
    metadata = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    return sorted(flatten_paths(tree[subtree] if subtree is not None else tree))


def component_init(checkpoint: str, component: str) -> PartialInit:
    """A `PartialInit` filling the model's `component` ('encoder', 'decoder') from `checkpoint`.

    A checkpoint of a whole Spectron model (paths 'encoder/...') gives its own `component`; a checkpoint
    of the component alone (paths at its root, as converters write them) is placed under it.
    """
    paths = source_param_paths(checkpoint)
    if any(p.startswith(component + "/") for p in paths):
        return PartialInit(checkpoint, include=f"^{re.escape(component)}/")
    return PartialInit(checkpoint, include=".*", target_prefix=component + "/")


def _is_scanned_path(path: str) -> bool:
    return any(part.startswith(layer_stacking.SCANNED_PREFIX) for part in path.split("/"))


def apply_partial_init(params: Mapping[str, Any], inits: Sequence[PartialInit]) -> tuple[dict, list[str]]:
    """`params` with the arrays of every `PartialInit` (in order) swapped in; returns the copied paths.

    When `params` has scanned stacks and a checkpoint has per-layer ones, the checkpoint is matched
    against the per-layer view of `params` (the copied paths are reported in that layout) and the
    result is stacked back and placed like the original arrays. A scanned checkpoint loads into a
    scanned model of the same period; into a per-layer model it is refused.
    """
    flat = flatten_paths(params)
    periods = layer_stacking.scan_periods(params)
    copied: list[str] = []
    for init in inits:
        source_scanned = any(_is_scanned_path(path) for path in source_param_paths(init.checkpoint))
        if source_scanned and not periods:
            raise ValueError(f"{init.checkpoint}: holds scanned layer stacks but the model has per-layer ones; "
                             "set scan_layers = True or convert it with layer_stacking.unstack_layers")
        if periods and not source_scanned:
            view = flatten_paths(layer_stacking.unstack_layers(unflatten_paths(flat)))
            loaded, paths = load_partial_params(init, unflatten_paths(view))
            view.update(loaded)
            for path, value in flatten_paths(layer_stacking.stack_layers(unflatten_paths(view), periods)).items():
                if _is_scanned_path(path):
                    sharding = getattr(flat[path], "sharding", None)
                    value = value if sharding is None else jax.device_put(value, sharding)
                flat[path] = value
        else:
            loaded, paths = load_partial_params(init, unflatten_paths(flat))
            flat.update(loaded)
        copied += paths
        logger.info("initialised %d parameters from %s", len(paths), init.checkpoint)
    return unflatten_paths(flat), copied


# ---- Export ------------------------------------------------------------------------------------
def export(model_dir: str, output_dir: str, dtype: str = "float32", step: Optional[int] = None,
           use_ocdbt: bool = CheckpointConfig.use_ocdbt) -> dict:
    """Writes params-only (optionally bfloat16), config.gin and the tokenizer of a run to `output_dir`.

    Reads only the `params` of the checkpoint (no optimizer state), in whichever format it was saved.
    `use_ocdbt` picks the format of `params/` as `CheckpointConfig.use_ocdbt` does for training
    checkpoints (default: OCDBT, like training); both load back through `load_exported_params`.
    Returns the export.json payload.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    directory = step_state_dir(model_dir, step)
    if "://" not in directory:
        directory = os.path.abspath(directory)  # orbax reads no metadata from a relative path
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not tree or "params" not in tree:
        raise ValueError(f"{directory}: checkpoint has no params")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                                   tree["params"])}
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    params = restored["params"]
    if dtype == "bfloat16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                              params)
    filesystem.makedirs(output_dir)
    params_dir = filesystem.join(filesystem.absolute(output_dir), EXPORT_PARAMS_SUBDIR)
    filesystem.remove_tree(params_dir)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)) as saver:
        saver.save(params_dir, args=ocp.args.StandardSave(params))
    for name in (CONFIG_FILENAME, TOKENIZER_FILENAME):
        source = filesystem.join(model_dir, name)
        if filesystem.is_file(source):
            filesystem.copy(source, filesystem.join(output_dir, name))
        elif name == CONFIG_FILENAME:
            raise FileNotFoundError(f"{model_dir}: no {name} (was it written by spectron_jax.train?)")
    step_done = int(filesystem.path(directory).parent.name)
    info = {
        "step": step_done,
        "dtype": dtype,
        "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "params": EXPORT_PARAMS_SUBDIR,
        "config": CONFIG_FILENAME,
        "tokenizer": TOKENIZER_FILENAME if filesystem.is_file(filesystem.join(output_dir, TOKENIZER_FILENAME)) else None,
    }
    filesystem.write_text(filesystem.join(output_dir, EXPORT_INFO_FILENAME), json.dumps(info, indent=2))
    return info


def load_exported_params(export_dir: str, sharding: Any = None) -> dict:
    """The parameters of an `export` folder as a nested dict of arrays (one device unless `sharding`)."""
    directory = filesystem.join(filesystem.absolute(export_dir), EXPORT_PARAMS_SUBDIR)
    if not filesystem.is_dir(directory):
        raise FileNotFoundError(f"{export_dir}: no {EXPORT_PARAMS_SUBDIR}/ folder (not an export?)")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)
    return checkpointer.restore(directory, abstract)
