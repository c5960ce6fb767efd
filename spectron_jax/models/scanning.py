"""Scanned layer stacks and named rematerialisation policies, shared by the decoder and the Conformer.

Scanning. A stack of identical blocks can be built once under `nnx.vmap` (every parameter gains a
leading axis with the logical name 'layers', which the partitioning rules map to no mesh axis) and
applied with `nnx.scan` over that axis. Tracing and compiling then see one block instead of
`num_layers`, which is what makes building and compiling the 1B model cheap. The scanned unit is one
`period`: a short list of blocks that repeats (one block for a uniform stack; Gemma 3's five local and
one global layer for a sliding-window pattern), so the parameters of a scanned stack are

    scanned_<name>/<j>/...   [num_periods, ...]  block j of every period (layer p * period + j)

`models/layer_stacking.py` converts between this layout and the per-layer `<name>/<i>/...` one.

Rematerialisation (`remat_policy`, per block, scanned or not):
  'none'           keep every activation for the backward pass (fastest, most memory)
  'full'           keep only each block's input; recompute the block in the backward pass
  'dots_saveable'  keep the outputs of matrix multiplications (`jax.checkpoint_policies.dots_saveable`),
                   recompute the element-wise work (norms, activations, softmax)
  'save_proj'      keep only the named projections (`PROJECTION_NAMES`, marked in the model code with
                   `jax.ad_checkpoint.checkpoint_name`): q / k / v / attention output and MLP in / out;
                   attention logits and probabilities are recomputed
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

REMAT_POLICIES = ("none", "full", "dots_saveable", "save_proj")
LAYERS_AXIS = "layers"  # logical name of the stacked axis (partitioning maps it to no mesh axis)
SCAN_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS}

# Names given to projection outputs with `checkpoint_name`; 'save_proj' keeps exactly these.
Q_PROJ, K_PROJ, V_PROJ, OUT_PROJ = "q_proj", "k_proj", "v_proj", "out_proj"
MLP_IN, MLP_OUT = "mlp_in", "mlp_out"
PROJECTION_NAMES = (Q_PROJ, K_PROJ, V_PROJ, OUT_PROJ, MLP_IN, MLP_OUT)

__all__ = [
    "LAYERS_AXIS",
    "PROJECTION_NAMES",
    "REMAT_POLICIES",
    "checkpoint_name",
    "check_remat_policy",
    "checkpoint_policy",
    "maybe_remat",
    "remat_label",
    "scan_period_split",
    "stacked_init",
]


def check_remat_policy(owner: str, policy: str) -> None:
    """Raises a one-line ValueError naming `owner` ('DecoderConfig.remat_policy') if `policy` is unknown."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"{owner} must be one of {REMAT_POLICIES}, got {policy!r}")


def checkpoint_policy(policy: str) -> Optional[Callable[..., bool]]:
    """The `jax.checkpoint` policy of a named remat policy ('full' -> None: save nothing)."""
    check_remat_policy("remat_policy", policy)
    if policy == "dots_saveable":
        return jax.checkpoint_policies.dots_saveable
    if policy == "save_proj":
        return jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES)
    return None


def maybe_remat(fn: Callable, policy: str, *, scanned: bool) -> Callable:
    """`fn` wrapped in `nnx.remat` with the named policy ('none': `fn` itself).

    `prevent_cse` is off inside a scan (the scan already keeps XLA from merging the recomputation
    into the forward pass, and the barrier would cost speed) and on otherwise.
    """
    check_remat_policy("remat_policy", policy)
    if policy == "none":
        return fn
    return nnx.remat(fn, policy=checkpoint_policy(policy), prevent_cse=not scanned)


def scan_period_split(num_layers: int, period: int) -> tuple[int, int]:
    """(periods scanned, layers left over) for `num_layers` layers cycling a pattern of `period`."""
    return num_layers // period, num_layers % period


def stacked_init(make: Callable[[nnx.Rngs], Any], num: int, rngs: nnx.Rngs) -> Any:
    """`num` copies of `make(rngs)` built under `nnx.vmap`, every variable stacked on a leading 'layers' axis.

    Each copy draws from its own split of every stream of `rngs` (the parent streams advance once).
    Under `nnx.eval_shape` this traces `make` once, whatever `num` is.
    """
    return nnx.vmap(make, in_axes=0, out_axes=0, transform_metadata=SCAN_METADATA)(rngs.split(num))


def remat_label(model_config: Any) -> str:
    """The remat policies of a model config as one short label, e.g. 'full' or 'enc:none dec:full'.

    Accepts a `DecoderConfig` / `ConformerConfig` (their `remat_policy`) or any config with `encoder`
    and `decoder` sub-configs (a Spectron model config). Scanned stacks are marked with '+scan'.
    """

    def one(cfg) -> str:
        label = getattr(cfg, "remat_policy", "none")
        return label + ("+scan" if getattr(cfg, "scan_layers", False) else "")

    encoder, decoder = getattr(model_config, "encoder", None), getattr(model_config, "decoder", None)
    if encoder is None and decoder is None:
        return one(model_config)
    parts = [(name, one(cfg)) for name, cfg in (("enc", encoder), ("dec", decoder)) if cfg is not None]
    if len({label for _, label in parts}) == 1:
        return parts[0][1]
    return " ".join(f"{name}:{label}" for name, label in parts)
