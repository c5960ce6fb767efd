"""Logical axis names for parameters and activations, and the constraint that applies them.

Model code never names mesh axes. Parameters carry a tuple of *logical* axis names in their
`out_sharding` metadata (see `logical_param`), and activations are pinned by logical name with
`constrain`. The partitioning code later supplies a table of rules mapping logical names to mesh axes
('data', 'fsdp', 'model', ...) and a mesh; until both are active, `constrain` is a no-op, so the same
model code runs unchanged on one CPU device and on a TPU pod.

Parameters are created with `eager_sharding=False`: building a model needs neither a mesh nor rules.
The partitioning code turns the metadata into shardings with `nnx.get_partition_spec` under
`flax.linen.logical_axis_rules(rules)`.

Logical names used by the models:
  parameters:  vocab, embed, mlp, heads, kv_heads, head_dim, mel, prenet, conv_kernel, conv_in,
               conv_out, norm, relpos
  activations: batch, length (decoder positions), frames (encoder time), plus the parameter names
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd
from flax.linen import spmd as linen_spmd

LogicalAxes = tuple[Optional[str], ...]
LogicalRules = Sequence[tuple[str, object]]
Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def logical_param(
    initializer: Initializer,
    key: jax.Array,
    shape: Sequence[int],
    logical_axes: Sequence[Optional[str]],
    dtype,
) -> nnx.Param:
    """Creates an `nnx.Param` carrying logical axis names as sharding metadata.

    Args:
      initializer: a `jax.nn.initializers`-style function `(key, shape, dtype) -> array`.
      key: PRNG key for the initializer.
      shape: the parameter's shape.
      logical_axes: one logical name (or None) per dimension of `shape`.
      dtype: the parameter's storage dtype.

    Returns:
      The parameter; `param.get_metadata()['out_sharding'] == tuple(logical_axes)`.
    """
    shape = tuple(int(s) for s in shape)
    logical_axes = tuple(logical_axes)
    if len(shape) != len(logical_axes):
        raise ValueError(f"parameter of shape {shape} got {len(logical_axes)} logical axis names {logical_axes}")
    value = initializer(key, shape, jnp.dtype(dtype))
    return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


def active_rules() -> LogicalRules:
    """The logical-axis rules set by `flax.linen.logical_axis_rules` (empty when none)."""
    return core_spmd.get_logical_axis_rules()


def _active_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def logical_to_mesh_spec(
    logical_axes: Sequence[Optional[str]],
    rules: LogicalRules,
    mesh_axis_sizes: Mapping[str, int],
    shape: Optional[Sequence[int]] = None,
) -> jax.sharding.PartitionSpec:
    """Maps logical names to a `PartitionSpec` over the mesh's axes.

    Rules are `(logical_name, mesh_axis | tuple of mesh axes | None)` in priority order (t5x / flax
    semantics: a mesh axis is used at most once per array). Mesh axes a rule names but the mesh lacks
    are dropped, so one rule table serves meshes with and without, say, an 'fsdp' axis. Given `shape`,
    a mesh axis that does not divide its dimension is dropped too (a single kv head stays replicated).

    Args:
      logical_axes: one logical name (or None) per dimension.
      rules: the logical-to-mesh rules.
      mesh_axis_sizes: {mesh axis name: size}, e.g. `mesh.shape`.
      shape: the array's shape, to check divisibility (optional).
    """
    spec = linen_spmd.logical_to_mesh_axes(tuple(logical_axes), tuple(rules))
    entries = []
    for dim, entry in enumerate(spec):
        if entry is None or entry is jax.sharding.PartitionSpec.UNCONSTRAINED:
            entries.append(entry)
            continue
        kept, product = [], 1
        for axis in (entry,) if isinstance(entry, str) else tuple(entry):
            if axis not in mesh_axis_sizes:
                continue
            size = mesh_axis_sizes[axis]
            if shape is not None and shape[dim] % (product * size):
                continue
            kept.append(axis)
            product *= size
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return jax.sharding.PartitionSpec(*entries)


def constrain(
    x: jax.Array,
    logical_axes: Sequence[Optional[str]],
    *,
    rules: Optional[LogicalRules] = None,
    mesh=None,
) -> jax.Array:
    """Constrains an activation's sharding by logical axis names; a no-op without mesh and rules.

    Args:
      x: any array whose rank equals `len(logical_axes)`, e.g. `[batch, length, embed]`.
      logical_axes: one logical name (or None) per dimension.
      rules: logical-to-mesh rules; default: those set by `flax.linen.logical_axis_rules`.
      mesh: a `Mesh`/`AbstractMesh`; default: the one set by `jax.set_mesh`.

    Returns:
      `x`, with a sharding constraint (Auto mesh axes) or an explicit reshard (Explicit mesh axes)
      when both a mesh and rules are active; otherwise `x` unchanged. Mesh axes that the mesh lacks
      or that do not divide their dimension are left out of the constraint.
    """
    if x.ndim != len(logical_axes):
        raise ValueError(f"array of rank {x.ndim} got logical axes {tuple(logical_axes)}")
    rules = active_rules() if rules is None else rules
    mesh = _active_mesh() if mesh is None else mesh
    if not rules or mesh is None:
        return x
    spec = logical_to_mesh_spec(logical_axes, rules, dict(mesh.shape), x.shape)
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
    if isinstance(mesh, jax.sharding.Mesh):
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, spec)
