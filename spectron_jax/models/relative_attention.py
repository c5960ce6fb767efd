"""Transformer-XL relative-position self-attention for the Conformer encoder.

The attention logit between query frame ``i`` and key frame ``j`` is

    logit[i, j] = ((q_i + u) · k_j + (q_i + v) · r_{i-j}) / sqrt(head_dim)

where ``u`` (content bias) and ``v`` (position bias) are learned per head and ``r_d`` is a sinusoidal
encoding of the relative distance ``d = i - j`` projected to every head. Distances are clipped to
``[-max_relative_distance, max_relative_distance]``. The result depends on positions only through
``i - j``: shifting a whole sequence leaves it unchanged.

The position term is computed once for every distinct distance (``[batch, heads, frames, distances]``)
and then gathered with a static ``[frames, frames]`` index of ``clip(i - j) + offset``; the index is a
compile-time constant, so this is the jit-friendly form of Transformer-XL's "rel-shift".

The 'relative_key' variant (w2v-BERT 2.0, Shaw et al.) replaces the position term by a learned table
``E [left + right + 1, head_dim]`` shared by the heads and has no ``u`` / ``v``:

    logit[i, j] = (q_i · k_j + q_i · E[clip(j - i, -left, right) + left]) / sqrt(head_dim)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectron_jax.models.scanning import K_PROJ, OUT_PROJ, Q_PROJ, V_PROJ, checkpoint_name
from spectron_jax.models.sharding import logical_param

# Added to the logits of padded keys. Finite, so a row whose keys are all padding gives a uniform
# distribution instead of NaN (its output is discarded by the caller).
_MASKED_LOGIT = -1e9


def sinusoidal_relative_encoding(distances: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal encodings of (signed) relative distances.

    Args:
      distances: ``[distances]`` integer or float relative distances ``i - j``.
      dim: encoding width (even).

    Returns:
      ``[distances, dim]`` float32: ``[sin(d * w_0) … sin(d * w_{dim/2-1}), cos(d * w_0) … ]`` with
      ``w_k = 10000^(-2k/dim)``.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal encoding width must be even, got {dim}")
    inverse_frequency = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = jnp.asarray(distances, jnp.float32)[:, None] * inverse_frequency[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def relative_distance_window(num_frames: int, max_relative_distance: int) -> int:
    """Largest distance that can occur after clipping: ``min(num_frames - 1, max_relative_distance)``."""
    return max(0, min(int(num_frames) - 1, int(max_relative_distance)))


def key_distance_index(num_frames: int, left: int, right: int) -> np.ndarray:
    """``[frames, frames]`` int32 with entry ``[i, j] = clip(j - i, -left, right) + left`` (rows of ``E``)."""
    positions = np.arange(num_frames)
    return (np.clip(positions[None, :] - positions[:, None], -left, right) + left).astype(np.int32)


def relative_distance_index(num_frames: int, max_relative_distance: int) -> np.ndarray:
    """Static gather index into the table of distinct distances.

    Returns:
      ``[frames, frames]`` int32 with entry ``[i, j] = clip(i - j, -W, W) + W`` where
      ``W = relative_distance_window(num_frames, max_relative_distance)``; the table it indexes lists
      the distances ``-W … W`` in order.
    """
    window = relative_distance_window(num_frames, max_relative_distance)
    positions = np.arange(num_frames)
    distance = np.clip(positions[:, None] - positions[None, :], -window, window)
    return (distance + window).astype(np.int32)


class RelativePositionSelfAttention(nnx.Module):
    """Multi-head self-attention with Transformer-XL relative positions over encoder frames.

    Parameters (logical axes): query/key/value kernels ``[embed, heads, head_dim]`` with biases
    ``[heads, head_dim]``; the position projection ``[relpos, heads, head_dim]`` (no bias) maps the
    ``model_dim``-wide sinusoidal encoding to every head; content bias ``u`` and position bias ``v``
    ``[heads, head_dim]``; output kernel ``[heads, head_dim, embed]`` with bias ``[embed]``. With
    ``position_encoding='relative_key'`` the position kernel and ``u`` / ``v`` are replaced by the
    distance table ``[relpos, head_dim]`` (``left_distance + right_distance + 1`` rows).
    """

    def __init__(
        self,
        model_dim: int,
        num_heads: int,
        *,
        max_relative_distance: int,
        dropout_rate: float,
        position_encoding: str = "transformer_xl",
        left_distance: int = 64,
        right_distance: int = 8,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if model_dim % num_heads:
            raise ValueError(f"model_dim {model_dim} is not divisible by num_heads {num_heads}")
        self.model_dim = model_dim
        self.num_heads = num_heads
        self.head_dim = model_dim // num_heads
        self.max_relative_distance = max_relative_distance
        if position_encoding not in ("transformer_xl", "relative_key"):
            raise ValueError(f"unknown position_encoding {position_encoding!r}")
        self.position_encoding = position_encoding
        self.left_distance = int(left_distance)
        self.right_distance = int(right_distance)
        self.dtype = dtype
        heads = (num_heads, self.head_dim)
        in_proj = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        out_proj = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        zeros = nnx.initializers.zeros_init()
        # One draw from the stream, split locally: every draw is costly while nnx.eval_shape traces.
        keys = iter(jax.random.split(rngs.params(), 5))

        def param(initializer, shape, axes):
            key = None if initializer is zeros else next(keys)
            return logical_param(initializer, key, shape, axes, param_dtype)

        qkv_axes = ("embed", "heads", "head_dim")
        self.query_kernel = param(in_proj, (model_dim, *heads), qkv_axes)
        self.key_kernel = param(in_proj, (model_dim, *heads), qkv_axes)
        self.value_kernel = param(in_proj, (model_dim, *heads), qkv_axes)
        self.query_bias = param(zeros, heads, ("heads", "head_dim"))
        self.key_bias = param(zeros, heads, ("heads", "head_dim"))
        self.value_bias = param(zeros, heads, ("heads", "head_dim"))
        if position_encoding == "transformer_xl":
            self.position_kernel = param(in_proj, (model_dim, *heads), ("relpos", "heads", "head_dim"))
            # Transformer-XL's u and v; zero at initialisation (DEFAULT, not in the paper).
            self.content_bias = param(zeros, heads, ("heads", "head_dim"))
            self.position_bias = param(zeros, heads, ("heads", "head_dim"))
        else:
            table = nnx.initializers.normal(1.0)
            self.distance_embedding = param(
                table, (self.left_distance + self.right_distance + 1, self.head_dim), ("relpos", "head_dim"))
        self.output_kernel = param(out_proj, (*heads, model_dim), ("heads", "head_dim", "embed"))
        self.output_bias = param(zeros, (model_dim,), ("embed",))
        self.attention_dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def _cast(self, param: nnx.Param) -> jax.Array:
        return jnp.asarray(param[...], self.dtype)

    def project(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values.

        Args:
          inputs: ``[batch, frames, embed]``.

        Returns:
          three ``[batch, frames, heads, head_dim]`` arrays in the compute dtype.
        """
        x = jnp.asarray(inputs, self.dtype)
        query = jnp.einsum("btd,dnh->btnh", x, self._cast(self.query_kernel)) + self._cast(self.query_bias)
        key = jnp.einsum("btd,dnh->btnh", x, self._cast(self.key_kernel)) + self._cast(self.key_bias)
        value = jnp.einsum("btd,dnh->btnh", x, self._cast(self.value_kernel)) + self._cast(self.value_bias)
        return checkpoint_name(query, Q_PROJ), checkpoint_name(key, K_PROJ), checkpoint_name(value, V_PROJ)

    def relative_logits(self, query: jax.Array, key: jax.Array, key_mask: jax.Array) -> jax.Array:
        """Masked, scaled relative-position logits (Transformer-XL or relative_key).

        Args:
          query: ``[batch, frames, heads, head_dim]``.
          key: ``[batch, frames, heads, head_dim]``.
          key_mask: ``[batch, frames]`` bool, True = valid key.

        Returns:
          ``[batch, heads, frames, frames]`` float32 (query frame, key frame); padded keys hold a large
          negative value.
        """
        num_frames = query.shape[1]
        if self.position_encoding == "relative_key":
            content = jnp.einsum("btnh,bsnh->bnts", query, key)
            per_distance = jnp.einsum("btnh,rh->bntr", query, self._cast(self.distance_embedding))
            index = jnp.asarray(key_distance_index(num_frames, self.left_distance, self.right_distance))
            position = per_distance[:, :, jnp.arange(num_frames)[:, None], index]
            logits = (content.astype(jnp.float32) + position.astype(jnp.float32)) / math.sqrt(self.head_dim)
            return jnp.where(key_mask[:, None, None, :], logits, _MASKED_LOGIT)
        window = relative_distance_window(num_frames, self.max_relative_distance)
        distances = jnp.arange(-window, window + 1)
        encoding = sinusoidal_relative_encoding(distances, self.model_dim).astype(self.dtype)
        relative = jnp.einsum("rd,dnh->rnh", encoding, self._cast(self.position_kernel))
        content = jnp.einsum("btnh,bsnh->bnts", query + self._cast(self.content_bias), key)
        per_distance = jnp.einsum("btnh,rnh->bntr", query + self._cast(self.position_bias), relative)
        index = jnp.asarray(relative_distance_index(num_frames, self.max_relative_distance))
        rows = jnp.arange(num_frames)[:, None]
        position = per_distance[:, :, rows, index]  # [batch, heads, frames, frames]
        logits = (content.astype(jnp.float32) + position.astype(jnp.float32)) / math.sqrt(self.head_dim)
        return jnp.where(key_mask[:, None, None, :], logits, _MASKED_LOGIT)

    def attention_logits(self, inputs: jax.Array, mask: jax.Array) -> jax.Array:
        """``[batch, heads, frames, frames]`` logits for ``inputs [batch, frames, embed]``, ``mask [batch, frames]``."""
        query, key, _ = self.project(inputs)
        return self.relative_logits(query, key, jnp.asarray(mask).astype(bool))

    def __call__(self, inputs: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """Self-attention over the valid frames.

        Args:
          inputs: ``[batch, frames, embed]``.
          mask: ``[batch, frames]`` bool, True = valid frame; padded frames are invisible as keys.
          deterministic: disables attention dropout.

        Returns:
          ``[batch, frames, embed]`` in the compute dtype (values at padded query frames are
          meaningless; the caller zeroes them).
        """
        query, key, value = self.project(inputs)
        logits = self.relative_logits(query, key, jnp.asarray(mask).astype(bool))
        probabilities = jax.nn.softmax(logits, axis=-1)
        probabilities = self.attention_dropout(probabilities, deterministic=deterministic)
        context = jnp.einsum("bnts,bsnh->btnh", probabilities.astype(self.dtype), value)
        output = jnp.einsum("btnh,nhd->btd", context, self._cast(self.output_kernel))
        return checkpoint_name(output + self._cast(self.output_bias), OUT_PROJ)
