"""PaLM-style prefix decoder LM on embeddings, with an explicit KV cache.

The Spectron assembly builds the decoder's input sequence itself (projected encoder frames, text
embeddings, pre-net outputs), so the stack here consumes and produces embeddings:

    x [batch, length, embed], valid [batch, length], is_prefix [batch, length]
        -> Decoder -> hidden [batch, length, embed] (after the final norm), new cache

and the `Embedder` turns token ids into embeddings (`encode`) and hidden states into float32 logits
(`decode`), sharing one table when the embeddings are tied.

Blocks (no biases anywhere, RMSNorm):
  parallel (PaLM, default): x + Attn(N x) + MLP(N x), one shared norm
  sequential:               x = x + Attn(N1 x); x = x + MLP(N2 x)
With `post_norms` (Gemma 2/3 checkpoints) the attention and MLP outputs are normalised again before
they are added. The MLP is gated: SwiGLU (default) or GeGLU.

Masking, rotary positions and the cache layout are described in `attention.py`.

Layers are a per-layer list (`layers/<i>`) by default. With `scan_layers` the stack is built under
`nnx.vmap` and run with `nnx.scan` (see `scanning.py`): the scanned unit is one period of
`attention_pattern` (one block for a uniform stack, six for Gemma 3's 5 local + 1 global), its
parameters are `scanned_layers/<j>/...` with a leading `[num_layers // period]` axis, and the
`num_layers % period` layers left over (Gemma 3 1B: 26 = 4 x 6 + 2) stay unscanned in
`remainder_layers/<k>` (layer `num_periods * period + k`). The KV cache follows the same split.
`remat_policy` (none / full / dots_saveable / save_proj) rematerialises each block, scanned or not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from spectron_jax.models.attention import (
    Attention,
    AttentionConfig,
    DecoderCache,
    LayerCache,
    RMSNorm,
    init_cache,
    running_positions,
    visibility_mask,
)
from spectron_jax.models.scanning import (
    MLP_IN,
    MLP_OUT,
    check_remat_policy,
    checkpoint_name,
    maybe_remat,
    scan_period_split,
    stacked_init,
)
from spectron_jax.models.sharding import constrain, logical_param

__all__ = [
    "DECODER_PRESETS",
    "Decoder",
    "DecoderBlock",
    "DecoderCache",
    "DecoderConfig",
    "Embedder",
    "GatedMLP",
    "LayerCache",
    "RMSNorm",
]

BLOCKS = ("parallel", "sequential")
ACTIVATIONS = ("swiglu", "geglu")
ATTENTION_KINDS = ("global", "local")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and options of the decoder LM. Defaults give the ≈350M decoder (see DECODER_PRESETS)."""

    vocab_size: int = 32768  # DEFAULT, not in the paper (PaLM 2 uses 256k; 32k is cheaper)
    model_dim: int = 1024  # DEFAULT, not in the paper
    num_layers: int = 24  # DEFAULT, not in the paper
    num_heads: int = 16  # DEFAULT, not in the paper
    num_kv_heads: int = 1  # 1 = multi-query (PaLM); = num_heads: multi-head; between: grouped. DEFAULT
    head_dim: int = 64  # DEFAULT, not in the paper
    mlp_dim: int = 3584  # gated-MLP hidden width. DEFAULT, not in the paper
    block: str = "parallel"  # 'parallel' (PaLM) or 'sequential'
    activation: str = "swiglu"  # 'swiglu' (PaLM) or 'geglu' (Gemma)
    rope_base: float = 10000.0
    rope_fraction: float = 1.0  # share of head_dim rotated by RoPE
    local_rope_base: Optional[float] = None  # RoPE base of 'local' layers (Gemma 3: 10k); None = rope_base
    tie_embeddings: bool = True
    scale_tied_logits: bool = True  # tied logits times model_dim**-0.5 (PaLM/T5 with an N(0,1) table); off for Gemma
    embed_init_std: float = 1.0  # stddev of the embedding table at initialisation (PaLM: 1.0)
    embed_scale_by_sqrt_dim: bool = False  # Gemma: token embeddings times sqrt(model_dim)
    rmsnorm_add_one: bool = False  # Gemma: norm scale stored as an offset from 1
    norm_eps: float = 1e-6
    post_norms: bool = False  # Gemma 2/3: norm the attention and MLP outputs before the residual add
    qk_norm: bool = False  # Gemma 3: RMSNorm on queries and keys over head_dim
    sliding_window: Optional[int] = None  # window (in positions) of 'local' layers
    attention_pattern: tuple = ("global",)  # cycled over layers, entries 'global' / 'local'
    final_logit_softcap: Optional[float] = None  # logits = cap * tanh(logits / cap)
    attn_logit_softcap: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None  # queries times this**-0.5; None: head_dim
    dropout: float = 0.0  # residual dropout on attention and MLP outputs. DEFAULT, not in the paper
    remat_policy: str = "none"  # 'none' | 'full' | 'dots_saveable' | 'save_proj' (see scanning.py)
    scan_layers: bool = False  # build the blocks under nnx.vmap and run them with nnx.scan
    dtype: str = "float32"  # computation dtype ('bfloat16' on TPU)
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "model_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecoderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderConfig.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.block not in BLOCKS:
            raise ValueError(f"DecoderConfig.block must be one of {BLOCKS}, got {self.block!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"DecoderConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ValueError(f"DecoderConfig.rope_fraction must be in (0, 1], got {self.rope_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DecoderConfig.dropout must be in [0, 1), got {self.dropout}")
        pattern = tuple(self.attention_pattern)
        object.__setattr__(self, "attention_pattern", pattern)  # lists (e.g. from gin) become tuples
        check_remat_policy("DecoderConfig.remat_policy", self.remat_policy)
        if not pattern or any(kind not in ATTENTION_KINDS for kind in pattern):
            raise ValueError(f"DecoderConfig.attention_pattern entries must be in {ATTENTION_KINDS}, got {pattern}")
        if "local" in pattern and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError("DecoderConfig.attention_pattern has 'local' layers but sliding_window is not set")
        for name in ("final_logit_softcap", "attn_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be positive or None, got {value}")

    @property
    def scan_period(self) -> int:
        """Layers per scanned unit (one period of `attention_pattern`); 0 when `scan_layers` is off."""
        return len(self.attention_pattern) if self.scan_layers else 0

    def layer_kind(self, layer: int) -> str:
        """'global' or 'local' for layer `layer` (the pattern repeats over the layers)."""
        return self.attention_pattern[layer % len(self.attention_pattern)]

    def attention_config(self, layer: int) -> AttentionConfig:
        """The attention hyper-parameters of layer `layer`."""
        local = self.layer_kind(layer) == "local"
        base = self.local_rope_base if (local and self.local_rope_base is not None) else self.rope_base
        return AttentionConfig(
            model_dim=self.model_dim, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, rope_base=base, rope_fraction=self.rope_fraction,
            window=self.sliding_window if local else None, qk_norm=self.qk_norm, norm_eps=self.norm_eps,
            rmsnorm_add_one=self.rmsnorm_add_one, logit_softcap=self.attn_logit_softcap,
            query_pre_attn_scalar=self.query_pre_attn_scalar, dtype=self.dtype, param_dtype=self.param_dtype,
        )


# Production shapes (DEFAULT, not in the paper, which gives only the sizes 350M and 1B), multi-query
# attention and SwiGLU as in PaLM, 32k tied vocabulary:
#   350m: 24 layers x 1024, 16 heads x 64, 1 kv head, mlp 3584  -> 351.3M parameters
#   1b:   24 layers x 2048, 16 heads x 128, 1 kv head, mlp 5120 -> 1036.0M parameters
DECODER_PRESETS = {
    "350m": DecoderConfig(),
    "1b": DecoderConfig(model_dim=2048, head_dim=128, mlp_dim=5120),
}


class Embedder(nnx.Module):
    """Token embedding table [vocab, embed]; with untied embeddings, an output projection [embed, vocab]."""

    def __init__(self, vocab_size: int, model_dim: int, *, tie: bool = True, scale_by_sqrt_dim: bool = False,
                 scale_tied_logits: bool = True, final_logit_softcap: Optional[float] = None,
                 init_std: float = 1.0, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        self.model_dim = model_dim
        self.tie = tie
        self.scale_by_sqrt_dim = scale_by_sqrt_dim
        self.scale_tied_logits = scale_tied_logits
        self.final_logit_softcap = final_logit_softcap
        self.dtype = dtype
        self.table = logical_param(jax.nn.initializers.normal(init_std), rngs.params(), (vocab_size, model_dim),
                                   ("vocab", "embed"), param_dtype)
        if tie:
            self.output = None
        else:
            init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            self.output = logical_param(init, rngs.params(), (model_dim, vocab_size), ("embed", "vocab"), param_dtype)

    def encode(self, tokens: jax.Array) -> jax.Array:
        """tokens int [batch, length] -> embeddings [batch, length, embed] (computation dtype)."""
        dtype = jnp.dtype(self.dtype)
        # Out-of-range ids (e.g. in padded slots) would embed as NaN under `jnp.take`'s fill mode and
        # spread to valid outputs through attention: clip them to a real row instead.
        tokens = jnp.clip(jnp.asarray(tokens, jnp.int32), 0, self.table.shape[0] - 1)
        x = jnp.take(self.table[...], tokens, axis=0).astype(dtype)
        if self.scale_by_sqrt_dim:
            x = x * jnp.asarray(math.sqrt(self.model_dim), dtype)
        return constrain(x, ("batch", "length", "embed"))

    def decode(self, x: jax.Array) -> jax.Array:
        """hidden [batch, length, embed] -> float32 logits [batch, length, vocab]."""
        dtype = jnp.dtype(self.dtype)
        x = x.astype(dtype)
        if self.tie:
            logits = jnp.einsum("bld,vd->blv", x, self.table[...].astype(dtype), preferred_element_type=jnp.float32)
            if self.scale_tied_logits:
                logits = logits * (self.model_dim ** -0.5)
        else:
            logits = jnp.einsum("bld,dv->blv", x, self.output[...].astype(dtype), preferred_element_type=jnp.float32)
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        return constrain(logits, ("batch", "length", "vocab"))


class GatedMLP(nnx.Module):
    """act(x W_gate) * (x W_up) W_down, act = SiLU (SwiGLU) or tanh-GELU (GeGLU).

    Parameters: gate, up [embed, mlp]; down [mlp, embed].
    """

    def __init__(self, model_dim: int, mlp_dim: int, *, activation: str = "swiglu", dtype="float32",
                 param_dtype="float32", rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.dtype = dtype
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.gate = logical_param(init, rngs.params(), (model_dim, mlp_dim), ("embed", "mlp"), param_dtype)
        self.up = logical_param(init, rngs.params(), (model_dim, mlp_dim), ("embed", "mlp"), param_dtype)
        self.down = logical_param(init, rngs.params(), (mlp_dim, model_dim), ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [batch, length, embed] -> [batch, length, embed]."""
        dtype = jnp.dtype(self.dtype)
        x = x.astype(dtype)
        gate = checkpoint_name(jnp.einsum("bld,dm->blm", x, self.gate[...].astype(dtype)), MLP_IN)
        up = checkpoint_name(jnp.einsum("bld,dm->blm", x, self.up[...].astype(dtype)), MLP_IN)
        act = jax.nn.silu(gate) if self.activation == "swiglu" else jax.nn.gelu(gate, approximate=True)
        hidden = constrain(act * up, ("batch", "length", "mlp"))
        return checkpoint_name(jnp.einsum("blm,md->bld", hidden, self.down[...].astype(dtype)), MLP_OUT)


class DecoderBlock(nnx.Module):
    """One decoder layer, parallel or sequential (see the module docstring)."""

    def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
        self.block = cfg.block

        def norm():
            return RMSNorm(cfg.model_dim, eps=cfg.norm_eps, add_one=cfg.rmsnorm_add_one, param_dtype=cfg.param_dtype)

        self.attn_norm = norm()  # the shared norm of a parallel block
        self.mlp_norm = norm() if cfg.block == "sequential" else None
        self.post_attn_norm = norm() if cfg.post_norms else None
        self.post_mlp_norm = norm() if cfg.post_norms else None
        self.attn = Attention(cfg.attention_config(layer), rngs=rngs)
        self.mlp = GatedMLP(cfg.model_dim, cfg.mlp_dim, activation=cfg.activation, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, positions, mask, *, deterministic: bool, cache: Optional[LayerCache] = None,
                 write_index=None, rngs: Optional[nnx.Rngs] = None):
        """x [batch, length, embed] -> ([batch, length, embed], updated LayerCache or None).

        positions: int [batch, length]; mask: bool [batch, length, keys] (see Attention).
        """

        def residual(branch, post_norm):
            if post_norm is not None:
                branch = post_norm(branch)
            return self.dropout(branch, deterministic=deterministic, rngs=rngs)

        normed = self.attn_norm(x)
        attn_out, new_cache = self.attn(normed, positions, mask, cache=cache, write_index=write_index)
        if self.block == "parallel":
            mlp_out = self.mlp(normed)
            x = x + residual(attn_out, self.post_attn_norm) + residual(mlp_out, self.post_mlp_norm)
        else:
            x = x + residual(attn_out, self.post_attn_norm)
            x = x + residual(self.mlp(self.mlp_norm(x)), self.post_mlp_norm)
        return constrain(x, ("batch", "length", "embed")), new_cache


class Decoder(nnx.Module):
    """The decoder LM: embedder, `num_layers` blocks and a final RMSNorm.

    `__call__` runs the stack on embeddings; `embed` / `logits` use the embedder.
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedder = Embedder(
            cfg.vocab_size, cfg.model_dim, tie=cfg.tie_embeddings, scale_by_sqrt_dim=cfg.embed_scale_by_sqrt_dim,
            scale_tied_logits=cfg.scale_tied_logits, final_logit_softcap=cfg.final_logit_softcap,
            init_std=cfg.embed_init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.scan_layers:
            period = cfg.scan_period
            num_periods, remainder = scan_period_split(cfg.num_layers, period)
            self.scanned_layers = stacked_init(
                lambda r: nnx.List([DecoderBlock(cfg, j, rngs=r) for j in range(period)]), num_periods, rngs,
            ) if num_periods else None
            first = num_periods * period
            self.remainder_layers = nnx.List([DecoderBlock(cfg, first + k, rngs=rngs) for k in range(remainder)])
        else:
            self.layers = nnx.List([DecoderBlock(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.model_dim, eps=cfg.norm_eps, add_one=cfg.rmsnorm_add_one,
                                  param_dtype=cfg.param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens int [batch, length] -> [batch, length, embed]."""
        return self.embedder.encode(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [batch, length, embed] -> float32 logits [batch, length, vocab]."""
        return self.embedder.decode(hidden)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> DecoderCache:
        """An empty KV cache for `batch` rows of `max_len` slots (dtype default: the computation dtype)."""
        cfg = self.cfg
        return init_cache(batch, max_len, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, dtype=cfg.dtype if dtype is None else dtype,
                          scan_period=cfg.scan_period)

    def __call__(
        self,
        x: jax.Array,
        valid: jax.Array,
        is_prefix: jax.Array,
        *,
        deterministic: bool,
        cache: Optional[DecoderCache] = None,
        rngs: Optional[nnx.Rngs] = None,
    ) -> tuple[jax.Array, Optional[DecoderCache]]:
        """Runs the stack over a chunk of slots.

        Without a cache the chunk is a whole row. With a cache the chunk's keys/values are written at
        `cache.end_index` and the chunk attends to everything cached so far: a prefill (prefix + text,
        the prefix bidirectional) or a single decode step (length 1).

        Args:
          x: [batch, length, embed] input embeddings.
          valid: bool [batch, length]; False on padded slots (their outputs are meaningless).
          is_prefix: bool [batch, length]; True on the bidirectional prefix at the front of each row.
          deterministic: disables dropout.
          cache: a DecoderCache with room for `length` more slots after `end_index`, or None (the
            caller keeps count: under jit, a write past the end is clamped, not reported).
          rngs: an `nnx.Rngs` with a 'dropout' stream (needed when dropout is active).

        Returns:
          (hidden [batch, length, embed] after the final norm, the updated cache or None).
        """
        cfg = self.cfg
        if not deterministic and cfg.dropout > 0 and rngs is None:
            raise ValueError("Decoder: dropout is active (deterministic=False) but no rngs were given")
        valid = valid.astype(bool)
        is_prefix = is_prefix.astype(bool)
        length = x.shape[1]
        x = constrain(x.astype(jnp.dtype(cfg.dtype)), ("batch", "length", "embed"))

        if cache is None:
            positions = running_positions(valid)
            slots = jnp.arange(length)
            query_slots, key_slots = slots, slots
            key_positions, key_valid, key_is_prefix = positions, valid, is_prefix
            write_index = None
        else:
            if length > cache.max_len:
                raise ValueError(f"Decoder: a chunk of {length} slots does not fit a cache of {cache.max_len} slots")
            write_index = cache.end_index
            positions = running_positions(valid, cache.num_valid())
            query_slots = write_index + jnp.arange(length)
            key_slots = jnp.arange(cache.max_len)
            key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, write_index))
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, write_index))
            key_is_prefix = jax.lax.dynamic_update_slice(jnp.zeros_like(cache.valid), is_prefix, (0, write_index))

        windows = {cfg.attention_config(i).window for i in range(cfg.num_layers)}
        masks = {w: visibility_mask(query_slots, positions, key_slots, key_positions, key_valid, key_is_prefix, w)
                 for w in windows}

        def run_block(block, x, mask, layer_cache, rngs, scanned):
            def apply(block, x, mask, layer_cache, rngs):
                return block(x, positions, mask, deterministic=deterministic, cache=layer_cache,
                             write_index=write_index, rngs=rngs)

            return maybe_remat(apply, cfg.remat_policy, scanned=scanned)(block, x, mask, layer_cache, rngs)

        def layer_mask(layer):
            return masks[cfg.attention_config(layer).window]

        new_scanned = ()
        if cfg.scan_layers:
            x, new_scanned = self._run_scanned(x, cache, rngs, deterministic, run_block, layer_mask)
            blocks = list(self.remainder_layers)
            first = cfg.num_layers - len(blocks)
        else:
            blocks, first = list(self.layers), 0
        new_layers = []
        for k, block in enumerate(blocks):
            layer_cache = None if cache is None else cache.layers[k]
            x, new_layer_cache = run_block(block, x, layer_mask(first + k), layer_cache, rngs, False)
            new_layers.append(new_layer_cache)

        hidden = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_cache = DecoderCache(layers=tuple(new_layers), positions=key_positions, valid=key_valid,
                                     end_index=write_index + length, scanned=new_scanned)
        return hidden, new_cache

    def _run_scanned(self, x, cache, rngs, deterministic, run_block, layer_mask):
        """Runs `scanned_layers` with `nnx.scan`: x is the carry; per-period caches and dropout keys are scanned.

        Returns (x [batch, length, embed], the period caches: a tuple of `LayerCache`s [periods, ...] or ()).
        """
        cfg = self.cfg
        if self.scanned_layers is None:
            return x, ()
        period = cfg.scan_period
        num_periods, _ = scan_period_split(cfg.num_layers, period)
        caches = None if cache is None else tuple(cache.scanned)
        keys = None
        if rngs is not None and not deterministic and cfg.dropout > 0:
            keys = jax.random.split(rngs.dropout(), num_periods)

        @nnx.scan(in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def body(blocks, x, layer_caches, key):
            step_rngs = None if key is None else nnx.Rngs(dropout=key)
            new = []
            for j, block in enumerate(blocks):
                layer_cache = None if layer_caches is None else layer_caches[j]
                x, new_cache = run_block(block, x, layer_mask(j), layer_cache, step_rngs, True)
                new.append(new_cache)
            return x, (None if layer_caches is None else tuple(new))

        x, new_caches = body(self.scanned_layers, x, caches, keys)
        return x, (() if new_caches is None else new_caches)
