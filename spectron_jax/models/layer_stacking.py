"""Conversion of parameter trees between the per-layer and the scanned (stacked) layer layouts.

A per-layer stack named `<name>` (the decoder's `layers`, the Conformer's `blocks`) holds one subtree
per layer, `<name>/<i>/...`. The scanned layout of the same stack with period P (see `scanning.py`)
holds

    scanned_<name>/<j>/...     leaves [num_periods, ...]: row p is layer p * P + j
    remainder_<name>/<k>/...   the num_layers % P layers after the last full period (only if any)

`stack_layers` and `unstack_layers` convert nested dicts (`nnx.State.to_pure_dict()` style, also
`nnx.State`) between the two, exactly (stacking and indexing only). Leaves may be NumPy / JAX arrays or
`jax.ShapeDtypeStruct`s (shapes only, e.g. checkpoint metadata). The periods to use are given per stack
path ('decoder/layers': 6); `scan_periods` reads them back from a scanned tree and `model_scan_periods`
from a model config.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SCANNED_PREFIX = "scanned_"
REMAINDER_PREFIX = "remainder_"

__all__ = ["model_scan_periods", "scan_periods", "stack_layers", "unstack_layers"]


def _pure(tree: Any) -> dict:
    """A deep copy of the dict structure of `tree` (an `nnx.State` becomes its pure dict)."""
    if hasattr(tree, "to_pure_dict"):
        tree = tree.to_pure_dict()
    if isinstance(tree, Mapping):
        return {key: _pure(value) for key, value in tree.items()}
    return tree


def _index(key: Any) -> Any:
    """Integer-looking keys (as orbax metadata spells list indices) become ints."""
    return int(key) if isinstance(key, str) and key.isdigit() else key


def _map(fn, *trees: Any) -> Any:
    """`fn` over the leaves of nested dicts of identical structure."""
    first = trees[0]
    if isinstance(first, Mapping):
        return {key: _map(fn, *(t[key] for t in trees)) for key in first}
    return fn(*trees)


def _stack(*leaves: Any) -> Any:
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _row(leaf: Any, row: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(leaf.shape)[1:], leaf.dtype)
    return leaf[row]


def _parent(tree: dict, path: str) -> tuple[dict, str]:
    parts = path.split("/")
    node = tree
    for part in parts[:-1]:
        if part not in node:
            raise KeyError(f"layer stack {path!r}: no {part!r} in the parameter tree")
        node = node[part]
    return node, parts[-1]


def stack_layers(tree: Any, periods: Mapping[str, int]) -> dict:
    """The per-layer stacks of `tree` in the scanned layout.

    Args:
      tree: nested dict (or `nnx.State`) holding per-layer stacks `<name>/<i>/...`.
      periods: {path of a stack ('decoder/layers'): period P >= 1}.

    Returns:
      a new nested dict; each listed stack of L layers is replaced by `scanned_<name>` (L // P
      periods) and, when L % P > 0, `remainder_<name>`.
    """
    out = _pure(tree)
    for path, period in periods.items():
        if period < 1:
            raise ValueError(f"layer stack {path!r}: period must be >= 1, got {period}")
        parent, name = _parent(out, path)
        if name not in parent:
            raise KeyError(f"layer stack {path!r}: no per-layer {name!r} in the parameter tree")
        layers = {_index(key): value for key, value in parent.pop(name).items()}
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"layer stack {path!r}: layer keys are not 0..{len(layers) - 1}: {sorted(layers)}")
        num_periods, remainder = divmod(len(layers), period)
        if num_periods:
            parent[SCANNED_PREFIX + name] = {
                j: _map(_stack, *(layers[p * period + j] for p in range(num_periods))) for j in range(period)}
        if remainder:
            parent[REMAINDER_PREFIX + name] = {k: layers[num_periods * period + k] for k in range(remainder)}
    return out


def scan_periods(tree: Any, prefix: str = "") -> dict[str, int]:
    """{stack path: period} of every scanned stack in `tree` (empty for a per-layer tree)."""
    tree = tree.to_pure_dict() if hasattr(tree, "to_pure_dict") else tree
    found: dict[str, int] = {}
    if not isinstance(tree, Mapping):
        return found
    for key, value in tree.items():
        key = str(key)
        if key.startswith(SCANNED_PREFIX) and isinstance(value, Mapping):
            found[prefix + key[len(SCANNED_PREFIX):]] = len(value)
        elif isinstance(value, Mapping):
            found.update(scan_periods(value, f"{prefix}{key}/"))
    return found


def unstack_layers(tree: Any) -> dict:
    """Inverse of `stack_layers`: every scanned stack in `tree` back to per-layer `<name>/<i>/...`."""
    out = _pure(tree)
    for path, period in scan_periods(out).items():
        parent, name = _parent(out, path)
        scanned = {_index(key): value for key, value in parent.pop(SCANNED_PREFIX + name).items()}
        remainder = {_index(key): value for key, value in parent.pop(REMAINDER_PREFIX + name, {}).items()}
        num_periods = int(jax.tree.leaves(scanned[0])[0].shape[0])
        layers = {}
        for p in range(num_periods):
            for j in range(period):
                layers[p * period + j] = _map(lambda leaf: _row(leaf, p), scanned[j])
        for k in range(len(remainder)):
            layers[num_periods * period + k] = remainder[k]
        parent[name] = layers
    return out


def model_scan_periods(model_config: Any) -> dict[str, int]:
    """{stack path: period} a model of `model_config` scans (empty when nothing is scanned).

    Accepts a Spectron model config (`encoder` / `decoder` sub-configs; paths 'encoder/blocks',
    'decoder/layers'), a bare `DecoderConfig` ('layers') or a bare `ConformerConfig` ('blocks').
    """
    encoder, decoder = getattr(model_config, "encoder", None), getattr(model_config, "decoder", None)
    if encoder is None and decoder is None:
        if not getattr(model_config, "scan_layers", False):
            return {}
        return {"layers": len(model_config.attention_pattern)} if hasattr(model_config, "attention_pattern") \
            else {"blocks": 1}
    periods = {}
    if encoder is not None and getattr(encoder, "scan_layers", False):
        periods["encoder/blocks"] = 1
    if decoder is not None and getattr(decoder, "scan_layers", False):
        periods["decoder/layers"] = len(decoder.attention_pattern)
    return periods
