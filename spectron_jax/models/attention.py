"""Self-attention of the prefix decoder: RMSNorm, rotary positions, the visibility mask and the KV cache.

The decoder works on rows laid out in fixed slots, `[prefix | text | speech]`, where padding may sit
inside every group. Three rules make the result at valid positions equal to that of a contiguous,
unpadded layout:

* a slot's rotary position is the running count of valid slots before it (`cumsum(valid) - 1`);
* padded slots are invisible as keys;
* key slot `j` is visible to query slot `i` iff `valid[j] and (j <= i or is_prefix[j])` (the prefix,
  which sits at the front of every row, is bidirectional; everything after it is causal), and, in a
  sliding-window layer, additionally iff `|position[i] - position[j]| < window`.

The KV cache is an explicit pytree (`DecoderCache`) passed in and returned. Every row of a batch
advances by the same number of slots per call (`end_index` is shared); rows that have nothing to add
at a step pass `valid=False` there, which writes an invisible slot. The bidirectional prefix must be
entirely inside the first call that fills a cache (prefill); later calls only append causal slots.
Sliding-window layers keep a full-length cache and mask by distance (simple; a ring buffer would
save memory for very long windows).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from spectron_jax.models.sharding import constrain, logical_param
from spectron_jax.models.scanning import K_PROJ, OUT_PROJ, Q_PROJ, V_PROJ, checkpoint_name

# A large negative (not -inf) so that a query with no visible key gets a finite, uniform softmax.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis: `x / sqrt(mean(x^2) + eps) * scale`.

    With `add_one`, the stored parameter is an offset from one (`scale = 1 + param`, initialised to
    zero), the Gemma checkpoint convention. Statistics are computed in float32; the output has the
    input's dtype.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, add_one: bool = False, param_dtype="float32"):
        self.eps = eps
        self.add_one = add_one
        init = jax.nn.initializers.zeros if add_one else jax.nn.initializers.ones
        self.scale = logical_param(init, jax.random.key(0), (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> [..., dim]."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.add_one:
            scale = 1.0 + scale
        return (normed * scale).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------


def rotary_dim(head_dim: int, fraction: float) -> int:
    """Number of leading head dimensions rotated by RoPE (even, at most head_dim)."""
    dim = int(round(head_dim * fraction))
    return dim - dim % 2


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0, fraction: float = 1.0) -> jax.Array:
    """Rotates the leading `rotary_dim` features of every head by position-dependent angles.

    Half-split convention (GPT-NeoX / Gemma): of the rotated block, feature `i` pairs with feature
    `i + rot/2`, rotated by angle `position * base^(-2i/rot)`. Features past the rotated block pass
    through unchanged.

    Args:
      x: [batch, length, heads, head_dim].
      positions: int [batch, length], the rotary position of each slot.
      base: the RoPE wavelength base.
      fraction: share of head_dim that is rotated.

    Returns:
      [batch, length, heads, head_dim], same dtype as x.
    """
    rot = rotary_dim(x.shape[-1], fraction)
    if rot == 0:
        return x
    half = rot // 2
    inv_freq = base ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / rot)  # [half]
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [batch, length, half]
    sin = jnp.sin(angles)[:, :, None, :]  # [batch, length, 1, half]
    cos = jnp.cos(angles)[:, :, None, :]
    first = x[..., :half].astype(jnp.float32)
    second = x[..., half:rot].astype(jnp.float32)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rot:]], axis=-1)


def running_positions(valid: jax.Array, start: Optional[jax.Array] = None) -> jax.Array:
    """Rotary positions: `start + cumsum(valid) - 1`, clipped below at `start`.

    Args:
      valid: bool [batch, length].
      start: int [batch], the number of valid slots already cached (default 0).

    Returns:
      int32 [batch, length]. A padded slot gets the position of the last valid slot before it.
    """
    counts = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
    counts = jnp.maximum(counts, 0)
    if start is not None:
        counts = counts + start.astype(jnp.int32)[:, None]
    return counts


def visibility_mask(
    query_slots: jax.Array,
    query_positions: jax.Array,
    key_slots: jax.Array,
    key_positions: jax.Array,
    key_valid: jax.Array,
    key_is_prefix: jax.Array,
    window: Optional[int] = None,
) -> jax.Array:
    """Which keys each query may attend to.

    Args:
      query_slots: int [length], slot index of each query (the same for every row).
      query_positions: int [batch, length], rotary position of each query.
      key_slots: int [keys], slot index of each key.
      key_positions: int [batch, keys].
      key_valid: bool [batch, keys], False on padded / unwritten slots.
      key_is_prefix: bool [batch, keys], True on slots of the bidirectional prefix.
      window: sliding-window size in positions (None: unlimited).

    Returns:
      bool [batch, length, keys]: `valid[j] & (j <= i | prefix[j]) [& |pos_i - pos_j| < window]`.
    """
    causal = key_slots[None, None, :] <= query_slots[None, :, None]  # [1, length, keys]
    visible = key_valid[:, None, :] & (causal | key_is_prefix[:, None, :])
    if window is not None:
        distance = jnp.abs(query_positions[:, :, None] - key_positions[:, None, :])
        visible = visible & (distance < window)
    return visible


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class LayerCache:
    """Keys and values of one layer, after RoPE.

    k: [batch, max_len, kv_heads, head_dim]
    v: [batch, max_len, kv_heads, head_dim]
    """

    k: jax.Array
    v: jax.Array


@struct.dataclass
class DecoderCache:
    """The decoder's KV cache: per-layer keys/values plus shared per-slot bookkeeping.

    layers: one `LayerCache` per unscanned decoder layer (all layers, or a scanned decoder's remainder).
    positions: int32 [batch, max_len], the rotary position of each written slot.
    valid: bool [batch, max_len], True where a slot holds a real (non-padded) key.
    end_index: int32 [], the number of slots written so far (the same for every row).
    scanned: for a scanned decoder of period P, P `LayerCache`s with k / v stacked on the layer axis,
      [num_periods, batch, max_len, kv_heads, head_dim]: `scanned[j]` row `p` is layer `p * P + j`.
      Empty without scanning.
    """

    layers: tuple
    positions: jax.Array
    valid: jax.Array
    end_index: jax.Array
    scanned: tuple = ()

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def num_valid(self) -> jax.Array:
        """int32 [batch]: valid slots per row, i.e. the next rotary position of each row."""
        return jnp.sum(self.valid.astype(jnp.int32), axis=1)


def init_cache(batch: int, max_len: int, *, num_layers: int, num_kv_heads: int, head_dim: int,
               dtype="float32", scan_period: int = 0) -> DecoderCache:
    """An empty cache: zero keys/values, no valid slots, end_index 0.

    scan_period: 0 for a per-layer decoder; P > 0 for a scanned one (`DecoderConfig.scan_period`):
    `num_layers // P` periods stacked in `scanned`, the `num_layers % P` others in `layers`.
    """
    shape = (batch, max_len, num_kv_heads, head_dim)

    def layer_cache(lead=()):
        return LayerCache(k=jnp.zeros(lead + shape, dtype), v=jnp.zeros(lead + shape, dtype))

    scanned = ()
    if scan_period:
        num_periods, num_layers = divmod(num_layers, scan_period)
        scanned = tuple(layer_cache((num_periods,)) for _ in range(scan_period)) if num_periods else ()
    return DecoderCache(
        layers=tuple(layer_cache() for _ in range(num_layers)),
        positions=jnp.zeros((batch, max_len), jnp.int32),
        valid=jnp.zeros((batch, max_len), bool),
        end_index=jnp.zeros((), jnp.int32),
        scanned=scanned,
    )


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Hyper-parameters of one attention layer (the decoder resolves per-layer values)."""

    model_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    window: Optional[int] = None  # sliding window in positions; None = global
    qk_norm: bool = False
    norm_eps: float = 1e-6
    rmsnorm_add_one: bool = False
    logit_softcap: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None  # queries scaled by this**-0.5; None: head_dim
    dtype: str = "float32"
    param_dtype: str = "float32"


def _softcap(x: jax.Array, cap: Optional[float]) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nnx.Module):
    """Multi-head / grouped-query / multi-query self-attention with RoPE, no biases.

    Query head `n` reads kv head `n // (num_heads // num_kv_heads)`. Parameters:
      q: [embed, heads, head_dim]; k, v: [embed, kv_heads, head_dim]; o: [heads, head_dim, embed].
    """

    def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads={cfg.num_kv_heads}")
        self.cfg = cfg
        d, n, k, h = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init_in = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        init_out = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        self.q = logical_param(init_in, rngs.params(), (d, n, h), ("embed", "heads", "head_dim"), cfg.param_dtype)
        self.k = logical_param(init_in, rngs.params(), (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
        self.v = logical_param(init_in, rngs.params(), (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
        self.o = logical_param(init_out, rngs.params(), (n, h, d), ("heads", "head_dim", "embed"), cfg.param_dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, eps=cfg.norm_eps, add_one=cfg.rmsnorm_add_one, param_dtype=cfg.param_dtype)
            self.k_norm = RMSNorm(h, eps=cfg.norm_eps, add_one=cfg.rmsnorm_add_one, param_dtype=cfg.param_dtype)
        else:
            self.q_norm = None
            self.k_norm = None

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        cache: Optional[LayerCache] = None,
        write_index: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, Optional[LayerCache]]:
        """Attends from the slots of `x` to themselves, or to the cache after writing them into it.

        Args:
          x: [batch, length, embed], already normalised.
          positions: int [batch, length], rotary positions of the slots of x.
          mask: bool [batch, length, keys]; keys = length without a cache, max_len with one.
          cache: this layer's cache, or None.
          write_index: int32 [], the slot where x's keys/values are written (with a cache).

        Returns:
          ([batch, length, embed], the updated LayerCache or None).
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = x.astype(dtype)
        q = checkpoint_name(jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dtype)), Q_PROJ)
        k = checkpoint_name(jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dtype)), K_PROJ)
        v = checkpoint_name(jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dtype)), V_PROJ)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q, positions, base=cfg.rope_base, fraction=cfg.rope_fraction)
        k = apply_rope(k, positions, base=cfg.rope_base, fraction=cfg.rope_fraction)
        scalar = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
        q = q * jnp.asarray(scalar ** -0.5, dtype)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))

        new_cache = None
        if cache is not None:
            start = (0, write_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
            new_cache = LayerCache(k=k, v=v)
            k, v = k.astype(dtype), v.astype(dtype)
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))

        batch, length = q.shape[:2]
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
        logits = _softcap(logits, cfg.logit_softcap)
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
        out = out.reshape(batch, length, cfg.num_heads, cfg.head_dim)
        out = checkpoint_name(jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(dtype)), OUT_PROJ)
        return out, new_cache
