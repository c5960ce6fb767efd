"""Acoustic heads of the decoder: the pre-net, the post-net, an optional stop head, and the reduction factor.

The decoder reads and writes log-mel spectrograms through two small MLPs:

* the **pre-net** h_pre maps the previous spectrogram frame(s) to the decoder width. It is a deliberate
  bottleneck with dropout, as in Tacotron 2, so the decoder cannot simply copy its input frame;
* the **post-net** h_post maps a decoder output vector to the next frame(s). The paper calls it an MLP; it
  is not Tacotron's convolutional post-net, and the regression loss is taken on its output only.

With a reduction factor r, one decoder step reads and writes a *group* of r consecutive frames, so a
continuation of T frames (T a multiple of r, zero-padded) takes S = T / r speech steps. Teacher forcing
lays the speech slots out as

    step:    0            1              2              …   S-1
    input:   eos embed.   pre(group 0)   pre(group 1)   …   pre(group S-2)
    output:  group 0      group 1        group 2        …   group S-1

`prenet_inputs` builds the pre-net inputs of all S steps with a zero placeholder at step 0; the assembly
replaces step 0 by the embedding of the `eos` token (the text→speech delimiter). The pre-net reads either
the last frame of the previous group ('last_frame', what Tacotron does) or all r of its frames
concatenated ('all_frames').

The paper uses one frame per step (r = 1) and names several frames per step as future work; r ∈ {1, 2, 3, 4}
is offered to cut the number of decoder steps.

Parameters carry logical axis names in their `out_sharding` metadata (`mel`, `prenet`, `mlp`, `embed`);
the partitioning code maps them to mesh axes. Between two pre-net hidden layers the hidden axis alternates
between `prenet` and unnamed, so that one partition spec never names the same mesh axis twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

PRENET_INPUT_MODES = ("last_frame", "all_frames")
SUPPORTED_REDUCTION_FACTORS = (1, 2, 3, 4)


@dataclasses.dataclass(frozen=True)
class AcousticConfig:
    """Sizes and switches of the pre-net, post-net and stop head.

    Attributes:
      num_mel: spectrogram bins per frame (128, the feature contract).
      reduction_factor: frames read and written per decoder step, r. The paper uses 1.
      prenet_dims: hidden sizes of the pre-net MLP. DEFAULT, not in the paper: (256, 256) as in Tacotron 2.
      prenet_dropout: dropout rate after every pre-net hidden layer. DEFAULT, not in the paper: 0.5
        (Tacotron 2).
      prenet_dropout_at_inference: keep pre-net dropout on when the module is in eval mode (Tacotron 2
        does, as a source of variation that stops the decoder from repeating frames). DEFAULT, not in the
        paper.
      prenet_input: what the pre-net reads of the previous group: 'last_frame' (`num_mel` inputs) or
        'all_frames' (the r frames concatenated, `r * num_mel` inputs). Equal for r = 1.
      postnet_hidden: hidden width of the post-net MLP (one hidden layer with ReLU), or 0 for a linear
        post-net. DEFAULT, not in the paper: 512.
      stop_head: whether the model has a stop-logit head (the paper describes no stop token). DEFAULT:
        False.
      dtype: computation dtype of the heads (a name such as 'float32' or 'bfloat16').
      param_dtype: storage dtype of the parameters.
    """

    num_mel: int = 128
    reduction_factor: int = 1
    prenet_dims: tuple[int, ...] = (256, 256)
    prenet_dropout: float = 0.5
    prenet_dropout_at_inference: bool = True
    prenet_input: str = "last_frame"
    postnet_hidden: int = 512
    stop_head: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        if self.num_mel <= 0:
            raise ValueError(f"AcousticConfig.num_mel must be positive, got {self.num_mel}")
        if self.reduction_factor not in SUPPORTED_REDUCTION_FACTORS:
            raise ValueError(
                f"AcousticConfig.reduction_factor must be one of {SUPPORTED_REDUCTION_FACTORS}, "
                f"got {self.reduction_factor}"
            )
        if not self.prenet_dims or any(int(d) <= 0 for d in self.prenet_dims):
            raise ValueError(
                f"AcousticConfig.prenet_dims must be a non-empty tuple of positive sizes, got {self.prenet_dims}"
            )
        object.__setattr__(self, "prenet_dims", tuple(int(d) for d in self.prenet_dims))
        if not 0.0 <= self.prenet_dropout < 1.0:
            raise ValueError(f"AcousticConfig.prenet_dropout must lie in [0, 1), got {self.prenet_dropout}")
        if self.prenet_input not in PRENET_INPUT_MODES:
            raise ValueError(
                f"AcousticConfig.prenet_input must be one of {PRENET_INPUT_MODES}, got {self.prenet_input!r}"
            )
        if self.postnet_hidden < 0:
            raise ValueError(f"AcousticConfig.postnet_hidden must be >= 0, got {self.postnet_hidden}")

    @property
    def prenet_input_dim(self) -> int:
        """Features the pre-net reads per step: `num_mel`, or `r * num_mel` in 'all_frames' mode."""
        if self.prenet_input == "all_frames":
            return self.reduction_factor * self.num_mel
        return self.num_mel


def _axes(*names: str | None) -> dict[str, Any]:
    """Param metadata carrying logical axis names; applied by the partitioner, not at creation."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


def _dense(in_dim: int, out_dim: int, in_axis: str | None, out_axis: str | None, config: AcousticConfig,
           rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear `[..., in_dim] -> [..., out_dim]` whose kernel is named (in_axis, out_axis)."""
    return nnx.Linear(
        in_dim,
        out_dim,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_metadata=_axes(in_axis, out_axis),
        bias_metadata=_axes(out_axis),
        rngs=rngs,
    )


class PreNet(nnx.Module):
    """Bottleneck MLP from spectrogram frames to the decoder width.

    `[batch, steps, prenet_input_dim] -> [batch, steps, model_dim]`: Linear → ReLU → Dropout for every
    hidden size in `config.prenet_dims`, then a Linear to `model_dim`.

    Dropout follows the module mode (`.train()` / `.eval()` set `deterministic`), except that with
    `config.prenet_dropout_at_inference` it stays on in eval mode too. An explicit `deterministic=`
    argument to `__call__` overrides both.
    """

    def __init__(self, config: AcousticConfig, model_dim: int, *, rngs: nnx.Rngs):
        self.config = config
        self.model_dim = model_dim
        self.deterministic = False
        layers = []
        in_dim, in_axis = config.prenet_input_dim, "mel"
        for i, hidden in enumerate(config.prenet_dims):
            # Hidden axes alternate between `prenet` and unnamed, so no kernel names `prenet` twice.
            out_axis = "prenet" if i % 2 == 0 else None
            layers.append(_dense(in_dim, hidden, in_axis, out_axis, config, rngs))
            in_dim, in_axis = hidden, out_axis
        self.hidden_layers = nnx.List(layers)
        self.output_layer = _dense(in_dim, model_dim, in_axis, "embed", config, rngs)
        self.dropout = nnx.Dropout(config.prenet_dropout, rngs=rngs)

    def dropout_active(self, deterministic: bool | None = None) -> bool:
        """Whether a call with this `deterministic` argument applies dropout."""
        if deterministic is None:
            deterministic = self.deterministic and not self.config.prenet_dropout_at_inference
        return (not deterministic) and self.config.prenet_dropout > 0.0

    def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
                 rngs: nnx.Rngs | None = None, row_keys: jax.Array | None = None) -> jax.Array:
        """Maps `inputs [batch, steps, prenet_input_dim]` to `[batch, steps, model_dim]`.

        `row_keys` (a key array [batch]) draws each row's dropout masks from its own key (layer j uses
        fold_in(key, j)), so a row's mask does not depend on the other rows of the batch; otherwise the
        masks of the whole batch come from `rngs`.
        """
        if inputs.shape[-1] != self.config.prenet_input_dim:
            raise ValueError(
                f"PreNet expects {self.config.prenet_input_dim} features per step "
                f"(prenet_input={self.config.prenet_input!r}, r={self.config.reduction_factor}), "
                f"got shape {inputs.shape}"
            )
        apply_dropout = self.dropout_active(deterministic)
        x = inputs
        for j, layer in enumerate(self.hidden_layers):
            x = nnx.relu(layer(x))
            if apply_dropout and row_keys is not None:
                x = _row_dropout(x, row_keys, j, self.config.prenet_dropout)
            else:
                x = self.dropout(x, deterministic=not apply_dropout, rngs=rngs)
        return self.output_layer(x)


def _row_dropout(x: jax.Array, row_keys: jax.Array, layer: int, rate: float) -> jax.Array:
    """Inverted dropout of `x [batch, ...]` with row b's mask drawn from fold_in(row_keys[b], layer)."""
    keep = 1.0 - rate

    def mask(key):
        return jax.random.bernoulli(jax.random.fold_in(key, layer), keep, x.shape[1:])

    kept = jax.vmap(mask)(row_keys)
    return jnp.where(kept, x / keep, jnp.zeros((), x.dtype)).astype(x.dtype)


class PostNet(nnx.Module):
    """MLP from decoder outputs to the r spectrogram frames of each step.

    `[batch, steps, model_dim] -> [batch, steps, r, num_mel]`: Linear → ReLU → Linear with a hidden width of
    `config.postnet_hidden`, or a single Linear when that is 0. `flatten_groups` turns the result into
    `[batch, steps * r, num_mel]`, aligned with the continuation frames.
    """

    def __init__(self, config: AcousticConfig, model_dim: int, *, rngs: nnx.Rngs):
        self.config = config
        out_dim = config.reduction_factor * config.num_mel
        if config.postnet_hidden > 0:
            self.hidden_layer = _dense(model_dim, config.postnet_hidden, "embed", "mlp", config, rngs)
            self.output_layer = _dense(config.postnet_hidden, out_dim, "mlp", "mel", config, rngs)
        else:
            self.hidden_layer = None
            self.output_layer = _dense(model_dim, out_dim, "embed", "mel", config, rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """Maps `hidden [batch, steps, model_dim]` to frames `[batch, steps, r, num_mel]`."""
        x = hidden
        if self.hidden_layer is not None:
            x = nnx.relu(self.hidden_layer(x))
        x = self.output_layer(x)
        batch, steps = x.shape[:2]
        return x.reshape(batch, steps, self.config.reduction_factor, self.config.num_mel)


class StopHead(nnx.Module):
    """Linear stop logit per speech step: `[batch, steps, model_dim] -> [batch, steps]`.

    The logit is trained towards 1 at the last valid step of each row (`stop_targets`).
    """

    def __init__(self, config: AcousticConfig, model_dim: int, *, rngs: nnx.Rngs):
        self.config = config
        self.projection = _dense(model_dim, 1, "embed", None, config, rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """Maps `hidden [batch, steps, model_dim]` to stop logits `[batch, steps]`."""
        return self.projection(hidden)[..., 0]


# ---------------------------------------------------------------------------------------------------
# Reduction-factor helpers (pure functions of arrays)
# ---------------------------------------------------------------------------------------------------


def _check_groupable(num_frames: int, reduction_factor: int, what: str) -> int:
    if reduction_factor < 1:
        raise ValueError(f"reduction factor must be >= 1, got {reduction_factor}")
    if num_frames % reduction_factor:
        raise ValueError(
            f"{what} has {num_frames} frames, not a multiple of the reduction factor {reduction_factor}; "
            "pad it with pad_to_multiple first"
        )
    return num_frames // reduction_factor


def group_frames(frames: jax.Array, reduction_factor: int) -> jax.Array:
    """Splits `frames [batch, T, mel]` into groups `[batch, T / r, r, mel]` (T a multiple of r)."""
    batch, num_frames, num_mel = frames.shape
    steps = _check_groupable(num_frames, reduction_factor, "frames")
    return jnp.reshape(frames, (batch, steps, reduction_factor, num_mel))


def flatten_groups(groups: jax.Array) -> jax.Array:
    """Inverse of `group_frames`: `[batch, steps, r, mel] -> [batch, steps * r, mel]`."""
    batch, steps, reduction_factor, num_mel = groups.shape
    return jnp.reshape(groups, (batch, steps * reduction_factor, num_mel))


def group_mask(mask: jax.Array, reduction_factor: int) -> jax.Array:
    """Step validity `[batch, T / r]` (int32) from frame validity `mask [batch, T]`.

    A step is valid if any of its r frames is valid.
    """
    batch, num_frames = mask.shape
    steps = _check_groupable(num_frames, reduction_factor, "mask")
    grouped = jnp.reshape(jnp.asarray(mask) > 0, (batch, steps, reduction_factor))
    return jnp.any(grouped, axis=-1).astype(jnp.int32)


def pad_to_multiple(frames: jax.Array, mask: jax.Array, reduction_factor: int) -> tuple[jax.Array, jax.Array]:
    """Zero-pads `frames [batch, T, mel]` and `mask [batch, T]` along time to a multiple of r."""
    if reduction_factor < 1:
        raise ValueError(f"reduction factor must be >= 1, got {reduction_factor}")
    extra = (-frames.shape[1]) % reduction_factor
    if extra == 0:
        return frames, mask
    frames = jnp.pad(frames, ((0, 0), (0, extra), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, extra)))
    return frames, mask


def prenet_inputs(frames: jax.Array, mask: jax.Array, reduction_factor: int,
                  mode: str = "last_frame") -> tuple[jax.Array, jax.Array]:
    """Teacher-forced pre-net inputs of every speech step.

    Args:
      frames: `[batch, T, mel]` continuation frames, T a multiple of r; padded frames may hold anything.
      mask: `[batch, T]`, 1 = valid frame (valid frames are a prefix of each row).
      reduction_factor: r.
      mode: 'last_frame' (step s reads the last frame of group s−1) or 'all_frames' (step s reads the r
        frames of group s−1 concatenated, frame-major).

    Returns:
      inputs: `[batch, T / r, mel]` ('last_frame') or `[batch, T / r, r * mel]` ('all_frames'); step 0 is a
        zero placeholder (the assembly puts the `eos` embedding there), step s ≥ 1 holds group s−1 with
        padded frames zeroed.
      step_mask: `[batch, T / r]` int32, 1 where any frame of the step's output group is valid.
    """
    if mode not in PRENET_INPUT_MODES:
        raise ValueError(f"prenet input mode must be one of {PRENET_INPUT_MODES}, got {mode!r}")
    valid = jnp.asarray(mask) > 0
    clean = jnp.where(valid[..., None], frames, jnp.zeros((), frames.dtype))
    groups = group_frames(clean, reduction_factor)  # [batch, steps, r, mel]
    batch, steps, _, num_mel = groups.shape
    if mode == "last_frame":
        per_group = groups[:, :, -1, :]  # [batch, steps, mel]
    else:
        per_group = jnp.reshape(groups, (batch, steps, reduction_factor * num_mel))
    placeholder = jnp.zeros_like(per_group[:, :1])
    inputs = jnp.concatenate([placeholder, per_group[:, :-1]], axis=1)
    return inputs, group_mask(mask, reduction_factor)


def stop_targets(mask: jax.Array, reduction_factor: int) -> jax.Array:
    """Stop targets `[batch, T / r]` (float32): 1.0 at the last valid step of each row, else 0.0.

    `mask [batch, T]` marks valid frames (a prefix of each row); a row with no valid frame has no stop step.
    """
    steps_valid = group_mask(mask, reduction_factor)  # [batch, steps]
    num_valid = jnp.sum(steps_valid, axis=-1, keepdims=True)  # [batch, 1]
    step_index = jnp.arange(steps_valid.shape[1])[None, :]
    return ((step_index == num_valid - 1) & (num_valid > 0)).astype(jnp.float32)
