"""Device mesh, logical-axis rules and the shardings derived from them (a thin t5x-style partitioner).

Model code names axes logically: parameters carry logical names in their `out_sharding` metadata and
activations are pinned with `spectron_jax.models.sharding.constrain`. This module owns the other half:

  * `MeshConfig` / `make_mesh`: a `Mesh` over ('data', 'fsdp', 'model'), plus a leading 'replica' axis
    when a run spans several slices (data parallel over the slow network, as in t5x).
  * one rules table, `(logical_name, mesh axis | tuple of mesh axes | None)` in priority order, and
    `resolve_logical_axes` / `logical_to_mesh_spec`. Resolution follows t5x (a mesh axis is used at
    most once per array, later rules for a name are fallbacks, axes the mesh lacks are skipped); in
    addition a mesh axis that does not divide the dimension is skipped, with the reason recorded
    (multi-query attention: `kv_heads` of size 1 stays replicated).
  * `param_shardings`, `abstract_sharded_state`, `sharded_init`, `report_replicated` for NNX states
    (model or `nnx.Optimizer`) and `mirror_param_shardings` for plain optax states.
  * `sharding_context(mesh, rules)`: activates the mesh (`jax.set_mesh`) and the rules (flax's
    logical-axis-rules context, which `models.sharding.constrain` reads); `with_logical_constraint`.
  * host data layout: `data_shard_info`, `host_batch_slice`, `global_batch_from_host`.

Nothing here reads gin: the entry point binds a `MeshConfig` and a rules table and passes them in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "model")
REPLICA_AXIS = "replica"

MeshAxes = Union[str, tuple[str, ...], None]
LogicalRules = tuple[tuple[str, MeshAxes], ...]
Rules = Sequence[tuple[str, MeshAxes]]  # what functions accept (lists from gin included)

# The default logical-axis rules. Each name appears once, so flax's own (dict-like) reading of the
# table and the first-match reading here agree; add a second entry for a name to give it a fallback.
DEFAULT_RULES: LogicalRules = (
    # activations
    ("batch", (REPLICA_AXIS, "data", "fsdp")),  # data parallel over slices, data and fsdp
    ("length", None),  # decoder positions; a knob for sequence parallelism
    ("frames", None),  # encoder time; likewise
    # parameters (and activations carrying the same names)
    ("vocab", "model"),
    ("embed", "fsdp"),  # FSDP: parameters gathered per layer; activations keep batch on fsdp first
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),  # replicated automatically when 'model' does not divide it (MQA: 1 head)
    ("head_dim", None),
    ("mel", None),
    ("prenet", None),  # the pre-net is small; sharding it would only add collectives
    ("conv_kernel", None),
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
    ("relpos", None),
    ("layers", None),  # the stacked axis of scanned layers
)


# ---- Mesh -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Shape of the device mesh.

    Attributes:
      ici: sizes of ('data', 'fsdp', 'model') inside one slice (fast interconnect); one entry may be
        -1, filled so the product equals the devices per slice.
      dcn: None for a single slice (mesh axes ('data', 'fsdp', 'model')). Otherwise the sizes of
        ('replica', 'data', 'fsdp', 'model') across slices (slow network), one entry may be -1 (filled
        from the number of slices); the mesh then has axes ('replica', 'data', 'fsdp', 'model') and
        each axis's size is its ici size times its dcn size (ici has no replica factor). The usual
        multi-slice setting is (-1, 1, 1, 1): pure data parallelism across slices, as in t5x.
      allow_split_physical_axes: let `mesh_utils` split a physical TPU axis over several mesh axes.
    """

    ici: tuple[int, ...] = (-1, 1, 1)  # DEFAULT, not in the paper: pure data parallelism
    dcn: Optional[tuple[int, ...]] = None  # DEFAULT, not in the paper: one slice
    allow_split_physical_axes: bool = False

    def __post_init__(self):
        object.__setattr__(self, "ici", _check_shape("ici", self.ici, len(MESH_AXES)))
        if self.dcn is not None:
            object.__setattr__(self, "dcn", _check_shape("dcn", self.dcn, len(MESH_AXES) + 1))

    @property
    def axis_names(self) -> tuple[str, ...]:
        return MESH_AXES if self.dcn is None else (REPLICA_AXIS,) + MESH_AXES


def _check_shape(name: str, shape: Sequence[int], rank: int) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"MeshConfig.{name} must be a sequence of ints, got {shape!r}") from None
    if len(shape) != rank:
        raise ValueError(f"MeshConfig.{name} needs {rank} sizes, got {shape}")
    if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"MeshConfig.{name}={shape}: sizes must be positive, with at most one -1")
    return shape


def _fill_shape(name: str, shape: tuple[int, ...], total: int, unit: str) -> tuple[int, ...]:
    """Replaces a -1 in `shape` so that its product is `total`; checks that it is."""
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if total % known:
            raise ValueError(f"mesh {name} shape {shape} does not divide the {total} {unit}")
        shape = tuple(total // known if s == -1 else s for s in shape)
    if math.prod(shape) != total:
        raise ValueError(f"mesh {name} shape {shape} needs {math.prod(shape)} {unit} but there are {total}")
    return shape


def device_grid(config: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
    """Arranges `devices` as an array shaped like the mesh (axis order `config.axis_names`).

    Devices may be real or abstract (`jax.experimental.topologies` TPU devices for AOT compilation).
    Slices are told apart by `slice_index` when devices have it, otherwise by `process_index`.
    """
    devices = list(devices)
    if not devices:
        raise ValueError("make_mesh got an empty device list")
    try:
        if config.dcn is None:
            shape = _fill_shape("ici", config.ici, len(devices), "devices")
            return mesh_utils.create_device_mesh(
                shape, devices, allow_split_physical_axes=config.allow_split_physical_axes)
        by_slice = hasattr(devices[0], "slice_index")
        granule = (lambda d: d.slice_index) if by_slice else (lambda d: d.process_index)
        num_slices = len({granule(d) for d in devices})
        if len(devices) % num_slices:
            raise ValueError(f"{len(devices)} devices do not split evenly over {num_slices} slices")
        dcn = _fill_shape("dcn", config.dcn, num_slices, "slices")
        ici = (1,) + _fill_shape("ici", config.ici, len(devices) // num_slices, "devices per slice")
        return mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=not by_slice,
            allow_split_physical_axes=config.allow_split_physical_axes)
    except ValueError as e:
        raise ValueError(" ".join(str(e).split())) from None  # one line


def make_mesh(config: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A `Mesh` for `config` over `devices` (default: `jax.devices()`), all axes of type Auto."""
    grid = device_grid(config, jax.devices() if devices is None else devices)
    names = config.axis_names
    return Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


# ---- Logical axes -> PartitionSpec ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AxisResolution:
    """A resolved sharding: the spec (one entry per dimension) and why dimensions stayed replicated."""

    spec: PartitionSpec
    notes: tuple[str, ...] = ()


def _as_axes(entry: MeshAxes) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(axes: Sequence[str]) -> MeshAxes:
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def resolve_logical_axes(logical_axes: Sequence[Union[str, Sequence[str], None]], rules: Rules, mesh: Any,
                         shape: Optional[Sequence[int]] = None) -> AxisResolution:
    """Maps one array's logical axis names to a `PartitionSpec` over `mesh`.

    Args:
      logical_axes: one entry per dimension: a logical name, None (replicated), or a tuple of names
        (their mesh axes are concatenated).
      rules: `(logical_name, mesh axes)` pairs in priority order.
      mesh: a `Mesh` or `AbstractMesh` (only its axis names and sizes are read).
      shape: the array's shape; when given, a mesh axis that does not divide its dimension is skipped.

    Returns:
      The spec (length `len(logical_axes)`) and a note for each mesh axis left out and each name
      without a rule.
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    sizes = dict(mesh.shape)
    used: set[str] = set()
    entries, notes = [], []
    for dim, names in enumerate(logical_axes):
        kept: list[str] = []
        for name in _as_axes(names):
            candidates = [axes for rule_name, axes in rules if rule_name == name]
            if not candidates:
                notes.append(f"dim {dim}: no rule for logical axis {name!r}; replicated")
                continue
            for candidate in candidates:
                chosen = []
                for axis in _as_axes(candidate):
                    if axis not in sizes:
                        continue  # e.g. 'replica' on a single-slice mesh
                    if axis in used:
                        notes.append(f"dim {dim} ({name}): mesh axis {axis!r} already used by another dimension")
                        continue
                    factor = math.prod(sizes[a] for a in kept + chosen) * sizes[axis]
                    if shape is not None and shape[dim] % factor:
                        notes.append(f"dim {dim} ({name}, size {shape[dim]}): not divisible by mesh axis "
                                     f"{axis!r} (total shards {factor}); not sharded over it")
                        continue
                    chosen.append(axis)
                if chosen or not _as_axes(candidate):
                    break  # an explicit None also ends the search
            kept += chosen
            used.update(chosen)
        entries.append(_spec_entry(kept))
    return AxisResolution(PartitionSpec(*entries), tuple(notes))


def logical_to_mesh_spec(logical_axes: Sequence[Union[str, Sequence[str], None]], rules: Rules, mesh: Any,
                         shape: Optional[Sequence[int]] = None) -> PartitionSpec:
    """`resolve_logical_axes(...).spec`: the `PartitionSpec` for one array's logical axes."""
    return resolve_logical_axes(logical_axes, rules, mesh, shape).spec


# ---- Parameter (and optimizer state) shardings ----------------------------------------------------
def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if name != "value":
            parts.append(str(name))
    return "/".join(parts)


def _resolve_tree(state: Any, rules, mesh: Mesh) -> tuple[Any, list[str]]:
    """NamedSharding per array leaf of `state` (Variables keep their wrapper) and all notes."""
    notes: list[str] = []

    def one(path, x):
        value = x.get_value() if _is_variable(x) else x
        shape = tuple(getattr(value, "shape", ()))
        axes = x.get_metadata().get("out_sharding") if _is_variable(x) else None
        if axes:
            axes = tuple(axes)
            if len(axes) != len(shape):
                raise ValueError(f"parameter {_path_str(path)!r}: logical axes {axes} do not match shape {shape}")
            resolution = resolve_logical_axes(axes, rules, mesh, shape)
            notes.extend(f"{_path_str(path)}: {note}" for note in resolution.notes)
            spec = resolution.spec
        else:
            spec = PartitionSpec(*([None] * len(shape)))
        sharding = NamedSharding(mesh, spec)
        return x.replace(sharding) if _is_variable(x) else sharding

    tree = jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)
    return tree, notes


def param_shardings(state: Any, rules: Rules, mesh: Mesh) -> Any:
    """`NamedSharding`s for an NNX state, read from each Variable's `out_sharding` logical names.

    Args:
      state: an `nnx.State` (from `nnx.split` / `nnx.state`, concrete or from `nnx.eval_shape`) of a
        model or of an `nnx.Optimizer`, whose optimizer Variables copy the parameters' metadata, or
        any pytree of arrays (leaves without metadata are replicated).
      rules: the logical-axis rules table.
      mesh: the device mesh.

    Returns:
      The same structure with a `NamedSharding` per array (inside the Variable wrappers, as
      `jax.jit(out_shardings=...)` expects for an `nnx.State`). Replication fallbacks are logged.
    """
    tree, notes = _resolve_tree(state, rules, mesh)
    for note in notes:
        (logger.warning if "no rule" in note else logger.info)("sharding: %s", note)
    return tree


def sharding_notes(state: Any, rules: Rules, mesh: Mesh) -> list[str]:
    """Why each parameter dimension that has a logical name was not sharded as its rule asks."""
    return _resolve_tree(state, rules, mesh)[1]


def mirror_param_shardings(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a plain optax state `tree` (e.g. `jax.eval_shape(tx.init, params)`).

    Every subtree with the structure and shapes of `params` (moments) gets `shardings` (a pytree of
    `NamedSharding` shaped like `params`); every other leaf (step counts) is replicated on `mesh`.
    """
    params_def = jax.tree.structure(params)
    params_shapes = [np.shape(x) for x in jax.tree.leaves(params)]

    def mirrors_params(x: Any) -> bool:
        return (jax.tree.structure(x) == params_def
                and [np.shape(v) for v in jax.tree.leaves(x)] == params_shapes)

    def one(x):
        if mirrors_params(x):
            return shardings
        return NamedSharding(mesh, PartitionSpec(*([None] * np.ndim(x))))

    return jax.tree.map(one, tree, is_leaf=mirrors_params)


def abstract_sharded_state(module_factory: Callable[[], nnx.Module], rules: Rules,
                           mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Builds a module abstractly (no arrays allocated).

    Returns:
      `(graphdef, abstract_state, shardings)`: the state's leaves are `jax.ShapeDtypeStruct`s that
      carry their `NamedSharding` (what AOT compilation and orbax restore take), `shardings` is the
      same structure holding the `NamedSharding`s.
    """
    with nnx.use_eager_sharding(False):
        abstract_module = nnx.eval_shape(module_factory)
    graphdef, state = nnx.split(abstract_module)
    shardings = param_shardings(state, rules, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return graphdef, abstract, shardings


def sharded_init(module_factory: Callable[[], nnx.Module], rules: Rules, mesh: Mesh) -> nnx.Module:
    """Initialises `module_factory()` with every array created directly in its shards.

    The factory runs once abstractly (`nnx.eval_shape`) to find the state's shapes and logical
    names, then inside `jax.jit` with `out_shardings` set from the rules, so no device ever holds a
    full copy of a sharded parameter. With JAX's partitionable threefry (the default) the values
    equal an unsharded initialisation with the same seeds.
    """
    graphdef, _, shardings = abstract_sharded_state(module_factory, rules, mesh)

    def init():
        with nnx.use_eager_sharding(False):
            module = module_factory()
        return nnx.state(module)

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def check_replication(state: Any, shardings: Any, tolerance: float, min_size: int = 2**20) -> float:
    """Fails fast when too much of `state` would be replicated (MaxText's `sharding_tolerance`).

    Args:
      state: pytree of arrays / `jax.ShapeDtypeStruct`s (e.g. params and optimizer state).
      shardings: matching `NamedSharding`s.
      tolerance: the largest allowed fraction of all elements held by fully replicated arrays of more
        than `min_size` elements on a mesh of more than one device.
      min_size: smaller arrays (norm scales, biases) are never counted.

    Returns:
      The replicated fraction (0 on a single device).

    Raises:
      ValueError: one line naming the fraction and the three largest replicated arrays.
    """
    leaves = jax.tree_util.tree_leaves_with_path(state)
    sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(sharding_leaves) != len(leaves):
        raise ValueError(f"check_replication: {len(leaves)} arrays but {len(sharding_leaves)} shardings")
    total, replicated = 0, []
    for (path, x), sharding in zip(leaves, sharding_leaves):
        size = math.prod(np.shape(x))
        total += size
        if size > min_size and len(sharding.device_set) > 1 and sharding.is_fully_replicated:
            replicated.append((size, _path_str(path), tuple(np.shape(x))))
    fraction = sum(r[0] for r in replicated) / max(total, 1)
    if fraction > tolerance:
        largest = ", ".join(f"{p} {shape}" for _, p, shape in sorted(replicated, reverse=True)[:3])
        raise ValueError(f"{fraction:.0%} of the train state would be replicated on every device (tolerance "
                         f"{tolerance:.0%}; largest: {largest}); bind an FSDP mesh, e.g. "
                         f"--gin.MeshConfig.ici=\"(1,-1,1)\", or raise TrainConfig.sharding_tolerance")
    return fraction


def report_replicated(state: Any, shardings: Any = None, min_size: int = 2**20) -> list[str]:
    """Lists (and logs a warning for) large arrays left fully replicated on a multi-device mesh.

    Args:
      state: a pytree / `nnx.State` of arrays or `jax.ShapeDtypeStruct`s.
      shardings: matching `NamedSharding`s; default: each leaf's own `.sharding`.
      min_size: arrays with more elements than this are reported.

    Returns:
      One line per offending array: its path, shape and element count.
    """
    leaves = jax.tree_util.tree_leaves_with_path(state)
    if shardings is None:
        sharding_leaves = [getattr(x, "sharding", None) for _, x in leaves]
    else:
        sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        if len(sharding_leaves) != len(leaves):
            raise ValueError(f"report_replicated: {len(leaves)} arrays but {len(sharding_leaves)} shardings")
    found = []
    for (path, x), sharding in zip(leaves, sharding_leaves):
        size = math.prod(np.shape(x))
        if sharding is None or size <= min_size or len(sharding.device_set) <= 1:
            continue
        if sharding.is_fully_replicated:
            found.append(f"{_path_str(path)}: shape {tuple(np.shape(x))} ({size} elements) is fully "
                         f"replicated over {len(sharding.device_set)} devices")
    if found:
        logger.warning("%d large arrays are fully replicated:\n  %s", len(found), "\n  ".join(found))
    return found


# ---- Activation constraints -----------------------------------------------------------------------
@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activates `mesh` (`jax.set_mesh`) and `rules` (flax's logical-axis-rules context).

    Inside it, `spectron_jax.models.sharding.constrain` and `with_logical_constraint` pin activations;
    outside, both are no-ops. Trace (jit) the step inside this context.
    """
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(tuple(rules)):
        yield


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[Union[str, Sequence[str], None]], *,
                            rules: Optional[Rules] = None, mesh: Optional[Any] = None) -> jax.Array:
    """Constrains `x` (e.g. `[batch, length, embed]`) by one logical name per dimension.

    `rules` and `mesh` default to those `sharding_context` activates; without both this is a no-op.
    The spec follows `resolve_logical_axes`, so mesh axes that do not divide a dimension are left out.
    """
    if np.ndim(x) != len(logical_axes):
        raise ValueError(f"array of rank {np.ndim(x)} got logical axes {tuple(logical_axes)}")
    rules = flax_spmd.get_logical_axis_rules() if rules is None else rules
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        mesh = None if mesh.empty else mesh
    if not rules or mesh is None:
        return x
    spec = logical_to_mesh_spec(logical_axes, rules, mesh, np.shape(x))
    target = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    return jax.lax.with_sharding_constraint(x, target)


# ---- Host data layout -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataShardInfo:
    """Which part of the global batch one process reads.

    Attributes:
      index: this process's data shard, in [0, count) (seqio `ShardInfo(index, num_shards)`).
      count: number of distinct data shards (processes holding the same batch rows share one).
      per_host_batch: rows of the global batch this process supplies.
      global_batch: rows of the global batch.
    """

    index: int
    count: int
    per_host_batch: int
    global_batch: int


def batch_mesh_axes(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the 'batch' rule shards over on `mesh` (in order)."""
    return _as_axes(logical_to_mesh_spec(("batch",), rules, mesh)[0])


def _process_batch_shards(process_grid: np.ndarray, axis_names: Sequence[str],
                          batch_axes: Sequence[str]) -> dict[int, frozenset[int]]:
    """Process -> the batch shards (row blocks) its devices hold; `process_grid` is shaped like the
    mesh and holds each device's process index, `batch_axes` are the batch's mesh axes, major first."""
    order = [list(axis_names).index(a) for a in batch_axes]
    sizes = [process_grid.shape[i] for i in order]
    shards: dict[int, set[int]] = {}
    for coords, process in np.ndenumerate(process_grid):
        block = int(np.ravel_multi_index([coords[i] for i in order], sizes)) if order else 0
        shards.setdefault(int(process), set()).add(block)
    return {p: frozenset(s) for p, s in shards.items()}


def _shard_info_from_grid(process_grid, axis_names, batch_axes, global_batch, process) -> DataShardInfo:
    num_blocks = math.prod(process_grid.shape[list(axis_names).index(a)] for a in batch_axes)
    if global_batch % num_blocks:
        raise ValueError(f"global batch {global_batch} is not divisible by the {num_blocks} batch shards "
                         f"over mesh axes {tuple(batch_axes)}")
    shards = _process_batch_shards(process_grid, axis_names, batch_axes)
    distinct = sorted(set(shards.values()), key=min)
    mine = shards[process]
    if any(a != b and a & b for a in distinct for b in distinct) or len({len(s) for s in distinct}) > 1:
        raise ValueError(f"mesh axes {tuple(axis_names)} {process_grid.shape} give processes overlapping or "
                         "unequal parts of the batch; reorder the mesh so each process holds whole batch shards")
    return DataShardInfo(index=distinct.index(mine), count=len(distinct),
                         per_host_batch=global_batch // num_blocks * len(mine), global_batch=global_batch)


def _process_grid(mesh: Mesh) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)


def data_shard_info(global_batch: int, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    process_index: Optional[int] = None) -> DataShardInfo:
    """This process's data shard for a global batch of `global_batch` rows (t5x `get_data_layout`)."""
    process = jax.process_index() if process_index is None else process_index
    return _shard_info_from_grid(_process_grid(mesh), mesh.axis_names, batch_mesh_axes(mesh, rules),
                                 global_batch, process)


def host_batch_slice(global_batch: int, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                     process_index: Optional[int] = None) -> slice:
    """Rows `[index * per_host, (index + 1) * per_host)` of a globally ordered batch for this process.

    The global array built by `global_batch_from_host` holds these rows at this process's devices'
    positions; when a process's devices hold non-adjacent blocks, the global row order is a
    permutation of the loader's order (harmless for per-example losses).
    """
    info = data_shard_info(global_batch, mesh, rules, process_index)
    return slice(info.index * info.per_host_batch, (info.index + 1) * info.per_host_batch)


def global_batch_from_host(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                           rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Builds global `jax.Array`s, sharded along the batch rule, from this process's rows.

    Args:
      host_batch: name -> array `[per_host_batch, ...]` (every array the same number of rows).
      mesh: the device mesh.
      rules: the rules table; its 'batch' entry decides the mesh axes of dimension 0.

    Returns:
      name -> `jax.Array [global_batch, ...]` with sharding `P(batch_axes, None, ...)`.
    """
    rows = {name: np.shape(value)[0] if np.ndim(value) else None for name, value in host_batch.items()}
    if None in rows.values() or len(set(rows.values())) != 1:
        raise ValueError(f"host batch arrays must share a leading batch dimension, got rows {rows}")
    per_host = next(iter(rows.values()))
    axes = batch_mesh_axes(mesh, rules)
    num_blocks = math.prod(mesh.shape[a] for a in axes)
    mine = _process_batch_shards(_process_grid(mesh), mesh.axis_names, axes)[jax.process_index()]
    if per_host % len(mine):
        raise ValueError(f"host batch of {per_host} rows does not split over this process's {len(mine)} batch shards")
    global_rows = per_host // len(mine) * num_blocks
    out = {}
    for name, value in host_batch.items():
        value = np.asarray(value)
        sharding = NamedSharding(mesh, PartitionSpec(_spec_entry(axes), *([None] * (value.ndim - 1))))
        out[name] = jax.make_array_from_process_local_data(sharding, value, (global_rows,) + value.shape[1:])
    return out
