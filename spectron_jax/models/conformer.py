"""Conformer speech encoder E: log-mel prompt frames -> encoder vectors (the decoder's prefix).

Structure (lingvo / praxis semantics): a ×4 convolutional subsampling, then ``num_layers`` Conformer
blocks, each

    x = x + 0.5 · FFN(x)                                   half-step ("macaron") feed-forward
    x = x + Dropout(RelPosMHSA(LayerNorm(x)))              Transformer-XL relative attention
    x = x + ConvModule(x)                                  GLU + depthwise conv over time
    x = x + 0.5 · FFN(x)
    x = LayerNorm(x)

Padding: every module keeps results at valid frames independent of what padded frames hold. Features
are zeroed at padded frames before each convolution, the subsampling strides the mask exactly as it
strides the frames, attention hides padded keys, and the group / batch norms of the conv module take
statistics over valid frames only. Outputs at padded frames are zero.

Variants for importing w2v-BERT 2.0 (``convert/encoder.py``; defaults keep the structure above):
``frontend='feature_projection'`` replaces the subsampling by LayerNorm + linear per input frame (its
input is 160 stacked fbank values per 20 ms, ``features.w2v_bert_features``); ``position_encoding=
'relative_key'`` uses a learned table of clipped key - query distances; ``causal_conv`` pads the
depthwise conv on the left only; ``conv_bias=False`` drops the conv module's biases.

The blocks are a per-layer list (``blocks/<i>``) unrolled under ``jax.jit`` by default. With
``scan_layers`` they are built once under ``nnx.vmap`` (parameters ``scanned_blocks/0/...`` stacked on
a leading 'layers' axis; every block keeps its own dropout stream and batch-norm statistics) and run
with ``nnx.scan`` carrying ``x``, which keeps tracing and compile time independent of the depth
(``scanning.py``; ``layer_stacking.py`` converts checkpoints between the layouts). ``remat_policy``
rematerialises each block: 'none' (default), 'full', 'dots_saveable' or 'save_proj' (keeps the
q / k / v / output projections, the FFN in / out and the conv module's pointwise in / out).

The paper says only "a 600M-parameter USM Conformer"; layer count, width, heads and subsampling are
DEFAULTs (see ``conformer_600m_config``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spectron_jax.models.relative_attention import RelativePositionSelfAttention
from spectron_jax.models.scanning import (
    LAYERS_AXIS,
    MLP_IN,
    MLP_OUT,
    check_remat_policy,
    checkpoint_name,
    maybe_remat,
    stacked_init,
)
from spectron_jax.models.sharding import constrain, logical_param

CONV_NORMS = ("layer", "group", "batch")
FRONTENDS = ("conv_subsampling", "feature_projection")
INPUT_NORMS = ("none", "utterance")
POSITION_ENCODINGS = ("transformer_xl", "relative_key")


@dataclasses.dataclass(frozen=True)
class ConformerConfig:
    """Hyper-parameters of the Conformer encoder. The defaults describe a tiny test-sized model."""

    input_dim: int = 128  # mel bins of the input features (the feature contract).
    model_dim: int = 64  # DEFAULT, not in the paper (tiny; the 600M stand-in uses 1024).
    num_layers: int = 2  # DEFAULT, not in the paper (tiny; the 600M stand-in uses 24).
    num_heads: int = 4  # DEFAULT, not in the paper (the 600M stand-in uses 8).
    ffn_dim: int | None = None  # FFN hidden width; None = 4 × model_dim. DEFAULT, not in the paper.
    conv_kernel_size: int = 32  # depthwise conv taps. DEFAULT, not in the paper (USM / praxis value).
    conv_norm: str = "layer"  # norm after the depthwise conv: 'layer' | 'group' | 'batch'. DEFAULT.
    num_groups: int = 8  # groups of the 'group' conv norm. DEFAULT, not in the paper.
    batch_norm_momentum: float = 0.99  # running-average decay of the 'batch' conv norm. DEFAULT.
    subsampling_channels: int = 16  # channels of both subsampling convs. DEFAULT, not in the paper.
    attention_dropout: float = 0.1  # on attention probabilities. DEFAULT, not in the paper.
    residual_dropout: float = 0.1  # FFN hidden/output, attention output, subsampling output. DEFAULT.
    conv_dropout: float = 0.1  # on the conv module's output. DEFAULT, not in the paper.
    max_relative_distance: int = 512  # relative distances are clipped to ±this (encoder frames). DEFAULT.
    norm_epsilon: float = 1e-6  # all layer / group / batch norms. DEFAULT, not in the paper.
    # Variants the w2v-BERT 2.0 encoder needs (defaults: the native encoder above).
    # 'conv_subsampling' (×4 in time) | 'feature_projection' (LayerNorm + linear per input frame, no
    # subsampling; w2v-BERT takes stacked fbank frames, 160 values per 20 ms).
    frontend: str = "conv_subsampling"
    # What the encoder does to its input first: 'none' (the features as given) | 'utterance' (each
    # row's bins minus their mean over its valid frames, over their standard deviation: per-utterance
    # cepstral mean and variance normalisation, as ASR front-ends do; raw log-mel has a mean near -5
    # and bins of very different spread). DEFAULT 'none' (w2v-BERT's fbank comes normalised).
    input_norm: str = "none"
    # 'transformer_xl' (sinusoids, u / v biases, clipped to ±max_relative_distance) | 'relative_key'
    # (a learned [left + right + 1, head_dim] table indexed by key - query, clipped to [-left, right]).
    position_encoding: str = "transformer_xl"
    left_relative_distance: int = 64  # 'relative_key' only: how far back a query sees distinct positions.
    right_relative_distance: int = 8  # 'relative_key' only: how far ahead.
    causal_conv: bool = False  # depthwise conv padded K - 1 frames on the left only (no look-ahead).
    conv_bias: bool = True  # biases on the conv module's two pointwise linears and its depthwise conv.
    dtype: Any = "float32"  # compute dtype of matmuls and convs (norms and softmax run in float32).
    param_dtype: Any = "float32"  # storage dtype of the parameters.
    scan_layers: bool = False  # build the blocks under nnx.vmap and run them with nnx.scan.
    remat_policy: str = "none"  # 'none' | 'full' | 'dots_saveable' | 'save_proj' (see scanning.py).

    def __post_init__(self):
        positive = ("input_dim", "model_dim", "num_layers", "num_heads", "conv_kernel_size",
                    "num_groups", "subsampling_channels", "max_relative_distance")
        for name in ("left_relative_distance", "right_relative_distance"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"ConformerConfig.{name} must be >= 0, got {getattr(self, name)}")
        check_remat_policy("ConformerConfig.remat_policy", self.remat_policy)
        if self.frontend not in FRONTENDS:
            raise ValueError(f"ConformerConfig.frontend must be one of {FRONTENDS}, got {self.frontend!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"ConformerConfig.input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"ConformerConfig.position_encoding must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}"
            )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ConformerConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"ConformerConfig.ffn_dim must be positive or None, got {self.ffn_dim}")
        if self.model_dim % self.num_heads:
            raise ValueError(
                f"ConformerConfig.model_dim ({self.model_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.model_dim % 2:
            raise ValueError(f"ConformerConfig.model_dim must be even (sinusoidal encodings), got {self.model_dim}")
        if self.conv_norm not in CONV_NORMS:
            raise ValueError(f"ConformerConfig.conv_norm must be one of {CONV_NORMS}, got {self.conv_norm!r}")
        if self.conv_norm == "group" and self.model_dim % self.num_groups:
            raise ValueError(
                f"ConformerConfig.model_dim ({self.model_dim}) must be divisible by num_groups ({self.num_groups})"
            )
        for name in ("attention_dropout", "residual_dropout", "conv_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ConformerConfig.{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.batch_norm_momentum <= 1.0:
            raise ValueError(f"ConformerConfig.batch_norm_momentum must lie in [0, 1], got {self.batch_norm_momentum}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"ConformerConfig.{name} is not a dtype: {getattr(self, name)!r}") from None

    @property
    def ffn_hidden_dim(self) -> int:
        return int(self.ffn_dim) if self.ffn_dim is not None else 4 * self.model_dim

    def output_length(self, num_frames):
        """Encoder frames for ``num_frames`` input frames (ints or integer arrays): ×4 fewer, or as many."""
        return subsampled_length(num_frames) if self.frontend == "conv_subsampling" else num_frames

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


def conformer_600m_config(**overrides: Any) -> ConformerConfig:
    """The stand-in for the paper's 600M USM encoder: 24 layers × 1024, 8 heads, FFN 4096, kernel 32.

    All of these numbers are DEFAULTs (USM / BEST-RQ 0.6B class), not in the paper; 128 subsampling
    channels are a DEFAULT too.
    """
    values = dict(model_dim=1024, num_layers=24, num_heads=8, ffn_dim=4096, conv_kernel_size=32,
                  subsampling_channels=128)
    values.update(overrides)
    return ConformerConfig(**values)


def normalize_utterance(features: jax.Array, mask: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """float32 [batch, frames, bins]: each row's bins minus their mean over its valid frames (`mask`
    bool [batch, frames]), over sqrt(their variance + epsilon); zero at padded frames."""
    valid = mask[..., None]
    x = jnp.where(valid, features.astype(jnp.float32), 0.0)
    count = jnp.maximum(jnp.sum(valid.astype(jnp.float32), axis=1, keepdims=True), 1.0)
    mean = jnp.sum(x, axis=1, keepdims=True) / count
    variance = jnp.sum(jnp.where(valid, jnp.square(x - mean), 0.0), axis=1, keepdims=True) / count
    return jnp.where(valid, (x - mean) * jax.lax.rsqrt(variance + epsilon), 0.0)


def subsampled_length(num_frames):
    """Encoder frames produced from ``num_frames`` input frames: ``ceil(ceil(n / 2) / 2)`` (240 -> 60).

    Works on Python ints and integer arrays (NumPy or JAX). Each stride-2 conv pads one frame on each
    side and keeps output frame ``i`` iff input frame ``2 i`` is valid.
    """
    return ((num_frames + 1) // 2 + 1) // 2


def _lecun_normal(in_axis=-2, out_axis=-1):
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def _constant_vector(value: float, dim: int, axis: str, config: ConformerConfig) -> nnx.Param:
    """A ``[dim]`` parameter (bias, norm scale) filled with ``value``, with logical axis ``axis``.

    Constant initialisers draw no randomness. (Each draw from an ``nnx.Rngs`` stream is costly while
    ``nnx.eval_shape`` traces the 24-layer encoder, so modules draw at most one key each.)
    """
    return logical_param(nnx.initializers.constant(value), None, (dim,), (axis,), config.storage_dtype)


def _apply_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Zeroes ``x [batch, frames, ...]`` where ``mask [batch, frames]`` is False."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


class Dense(nnx.Module):
    """Linear layer over the last axis: kernel ``[in, out]`` and (unless ``use_bias=False``) bias ``[out]``."""

    def __init__(self, in_dim: int, out_dim: int, axes: tuple[str, str], config: ConformerConfig, *,
                 rngs: nnx.Rngs, use_bias: bool = True):
        self.dtype = config.compute_dtype
        self.kernel = logical_param(_lecun_normal(), rngs.params(), (in_dim, out_dim), axes, config.storage_dtype)
        self.bias = _constant_vector(0.0, out_dim, axes[1], config) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[batch, frames, in] -> [batch, frames, out]`` in the compute dtype."""
        y = jnp.einsum("bti,io->bto", jnp.asarray(x, self.dtype), jnp.asarray(self.kernel[...], self.dtype))
        return y if self.bias is None else y + jnp.asarray(self.bias[...], self.dtype)


class LayerNorm(nnx.Module):
    """Per-frame layer norm over the channel axis (float32 statistics); scale and bias ``[norm]``."""

    def __init__(self, dim: int, config: ConformerConfig, *, rngs: nnx.Rngs):
        self.epsilon = config.norm_epsilon
        self.scale = _constant_vector(1.0, dim, "norm", config)
        self.bias = _constant_vector(0.0, dim, "norm", config)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        """``[batch, frames, dim] -> [batch, frames, dim]`` float32 (``mask`` unused: no cross-frame statistics)."""
        del mask, deterministic
        x = jnp.asarray(x, jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        normed = (x - mean) * jax.lax.rsqrt(variance + self.epsilon)
        return normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class MaskedGroupNorm(nnx.Module):
    """Group norm with statistics per utterance and group over valid frames × the group's channels."""

    def __init__(self, dim: int, config: ConformerConfig, *, rngs: nnx.Rngs):
        self.num_groups = config.num_groups
        self.epsilon = config.norm_epsilon
        self.scale = _constant_vector(1.0, dim, "norm", config)
        self.bias = _constant_vector(0.0, dim, "norm", config)

    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """``x [batch, frames, dim]``, ``mask [batch, frames]`` bool -> ``[batch, frames, dim]`` float32."""
        del deterministic
        batch, frames, dim = x.shape
        grouped = jnp.asarray(x, jnp.float32).reshape(batch, frames, self.num_groups, dim // self.num_groups)
        weight = mask.astype(jnp.float32)[:, :, None, None]
        count = jnp.maximum(jnp.sum(weight, axis=(1, 3), keepdims=True) * grouped.shape[-1], 1.0)
        mean = jnp.sum(grouped * weight, axis=(1, 3), keepdims=True) / count
        variance = jnp.sum(jnp.square(grouped - mean) * weight, axis=(1, 3), keepdims=True) / count
        normed = ((grouped - mean) * jax.lax.rsqrt(variance + self.epsilon)).reshape(batch, frames, dim)
        return normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class MaskedBatchNorm(nnx.Module):
    """Batch norm whose batch statistics exclude padded frames.

    Training (``deterministic=False``) normalises with the mean / variance over all valid
    ``(batch, frame)`` positions and updates the running averages (``nnx.BatchStat``, ``[norm]``);
    inference (``deterministic=True``) uses the running averages, so each utterance is independent of
    the rest of the batch. Under ``jax.jit`` with a sharded batch the reductions are global.
    """

    def __init__(self, dim: int, config: ConformerConfig, *, rngs: nnx.Rngs):
        self.epsilon = config.norm_epsilon
        self.momentum = config.batch_norm_momentum
        self.scale = _constant_vector(1.0, dim, "norm", config)
        self.bias = _constant_vector(0.0, dim, "norm", config)
        self.running_mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32), out_sharding=("norm",), eager_sharding=False)
        self.running_var = nnx.BatchStat(jnp.ones((dim,), jnp.float32), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """``x [batch, frames, dim]``, ``mask [batch, frames]`` bool -> ``[batch, frames, dim]`` float32."""
        x = jnp.asarray(x, jnp.float32)
        if deterministic:
            mean, variance = self.running_mean[...], self.running_var[...]
        else:
            weight = mask.astype(jnp.float32)[:, :, None]
            count = jnp.maximum(jnp.sum(weight), 1.0)
            mean = jnp.sum(x * weight, axis=(0, 1)) / count
            variance = jnp.sum(jnp.square(x - mean) * weight, axis=(0, 1)) / count
            decay = self.momentum
            self.running_mean[...] = decay * self.running_mean[...] + (1.0 - decay) * jax.lax.stop_gradient(mean)
            self.running_var[...] = decay * self.running_var[...] + (1.0 - decay) * jax.lax.stop_gradient(variance)
        normed = (x - mean) * jax.lax.rsqrt(variance + self.epsilon)
        return normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def make_conv_norm(dim: int, config: ConformerConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The conv module's norm selected by ``config.conv_norm``; called as ``norm(x, mask, deterministic=…)``."""
    norm_class = {"layer": LayerNorm, "group": MaskedGroupNorm, "batch": MaskedBatchNorm}[config.conv_norm]
    return norm_class(dim, config, rngs=rngs)


class ConvSubsampling(nnx.Module):
    """×4 subsampling in time and frequency: two stride-2 3×3 Conv2d + ReLU, then a linear to model_dim.

    Each conv pads one frame / bin on every side, so output frame ``i`` covers input frames
    ``2i-1 … 2i+1`` whatever the total length; the mask is strided the same way (``mask[:, ::2]``)
    and features are zeroed at padded frames before each conv. Parameters: conv kernels
    ``[conv_kernel, conv_kernel, conv_in, conv_out]`` (HWIO; H = time, W = mel), biases ``[conv_out]``,
    projection ``[conv_out (mel/4 × channels), embed]``.
    """

    def __init__(self, config: ConformerConfig, *, rngs: nnx.Rngs):
        channels = config.subsampling_channels
        kernel_axes = ("conv_kernel", "conv_kernel", "conv_in", "conv_out")
        dtype = config.storage_dtype
        key1, key2 = jax.random.split(rngs.params())
        self.dtype = config.compute_dtype
        self.conv1_kernel = logical_param(_lecun_normal(), key1, (3, 3, 1, channels), kernel_axes, dtype)
        self.conv1_bias = _constant_vector(0.0, channels, "conv_out", config)
        self.conv2_kernel = logical_param(_lecun_normal(), key2, (3, 3, channels, channels), kernel_axes, dtype)
        self.conv2_bias = _constant_vector(0.0, channels, "conv_out", config)
        self.output_bins = subsampled_length(config.input_dim)
        self.projection = Dense(self.output_bins * channels, config.model_dim, ("conv_out", "embed"), config, rngs=rngs)

    def _conv(self, x: jax.Array, kernel: nnx.Param, bias: nnx.Param) -> jax.Array:
        """Stride-2 3×3 conv: ``[batch, frames, bins, c_in] -> [batch, ceil(frames/2), ceil(bins/2), c_out]``."""
        y = jax.lax.conv_general_dilated(
            x, jnp.asarray(kernel[...], self.dtype), window_strides=(2, 2), padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + jnp.asarray(bias[...], self.dtype)

    def __call__(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Subsamples the features and their mask.

        Args:
          features: ``[batch, frames, input_dim]``.
          mask: ``[batch, frames]`` bool, True = valid.

        Returns:
          ``([batch, frames', model_dim], [batch, frames'] bool)`` with ``frames' = subsampled_length(frames)``;
          features at padded frames are not yet zeroed.
        """
        x = _apply_mask(jnp.asarray(features, self.dtype), mask)[..., None]  # [batch, frames, mel, 1]
        x = jax.nn.relu(self._conv(x, self.conv1_kernel, self.conv1_bias))
        mask = mask[:, ::2]
        x = _apply_mask(x, mask)
        x = jax.nn.relu(self._conv(x, self.conv2_kernel, self.conv2_bias))
        mask = mask[:, ::2]
        batch, frames, bins, channels = x.shape
        return self.projection(x.reshape(batch, frames, bins * channels)), mask


class FeatureProjection(nnx.Module):
    """Per-frame front-end: ``Linear(LayerNorm(features))`` to model_dim, keeping the frame rate.

    Parameters: norm scale / bias ``[input_dim]``, projection kernel ``[mel, embed]`` and bias ``[embed]``.
    """

    def __init__(self, config: ConformerConfig, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(config.input_dim, config, rngs=rngs)
        self.projection = Dense(config.input_dim, config.model_dim, ("mel", "embed"), config, rngs=rngs)

    def __call__(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``features [batch, frames, input_dim]``, ``mask [batch, frames]`` -> ``([batch, frames, embed], mask)``."""
        return self.projection(self.norm(features)), mask


class FeedForward(nnx.Module):
    """Half-step macaron FFN: ``x + 0.5 · Dropout(W2 · Dropout(Swish(W1 · LayerNorm(x))))``."""

    def __init__(self, config: ConformerConfig, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(config.model_dim, config, rngs=rngs)
        self.hidden = Dense(config.model_dim, config.ffn_hidden_dim, ("embed", "mlp"), config, rngs=rngs)
        self.output = Dense(config.ffn_hidden_dim, config.model_dim, ("mlp", "embed"), config, rngs=rngs)
        # One module for both dropouts: each call draws a fresh mask from its stream.
        self.dropout = nnx.Dropout(config.residual_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        """``[batch, frames, embed] -> [batch, frames, embed]`` (residual included)."""
        hidden = checkpoint_name(self.hidden(self.norm(x)), MLP_IN)
        y = self.dropout(jax.nn.swish(hidden), deterministic=deterministic)
        y = self.dropout(checkpoint_name(self.output(y), MLP_OUT), deterministic=deterministic)
        return x + 0.5 * y.astype(x.dtype)


def depthwise_conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, *, causal: bool = False) -> jax.Array:
    """Per-channel convolution over time with 'same' (or causal) padding.

    ``y[b, t, c] = bias[c] + Σ_k kernel[k, c] · x[b, t + k - left, c]`` with ``left = (K - 1) // 2``
    (``left = K - 1`` when ``causal``: no look-ahead) and zeros outside ``[0, frames)`` (for even K
    the extra 'same' tap looks ahead).

    Args:
      x: ``[batch, frames, channels]``.
      kernel: ``[taps, channels]``.
      bias: ``[channels]`` or None.
      causal: pad all ``K - 1`` frames on the left.

    Returns:
      ``[batch, frames, channels]``.
    """
    taps, channels = kernel.shape
    left = taps - 1 if causal else (taps - 1) // 2
    y = jax.lax.conv_general_dilated(
        x, kernel[:, None, :].astype(x.dtype), window_strides=(1,), padding=((left, taps - 1 - left),),
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=channels,
    )
    return y if bias is None else y + bias.astype(x.dtype)


class ConvModule(nnx.Module):
    """``x + Dropout(W_out · Swish(Norm(DepthwiseConv(GLU(W_in · LayerNorm(x))))))``.

    Parameters: ``W_in [embed, mlp]`` (``mlp`` = 2 × model_dim, split into value and gate), depthwise
    kernel ``[conv_kernel, mlp]`` and bias ``[mlp]``, ``W_out [mlp, embed]`` (``mlp`` = model_dim here);
    the three biases exist only when ``config.conv_bias``. Padded frames are zeroed right before the
    depthwise conv, so they cannot leak into valid ones; ``config.causal_conv`` pads on the left only.
    """

    def __init__(self, config: ConformerConfig, *, rngs: nnx.Rngs):
        dim = config.model_dim
        self.dtype = config.compute_dtype
        self.causal = config.causal_conv
        self.norm = LayerNorm(dim, config, rngs=rngs)
        self.pointwise_in = Dense(dim, 2 * dim, ("embed", "mlp"), config, rngs=rngs, use_bias=config.conv_bias)
        self.depthwise_kernel = logical_param(
            _lecun_normal(in_axis=0, out_axis=1), rngs.params(), (config.conv_kernel_size, dim),
            ("conv_kernel", "mlp"), config.storage_dtype,
        )
        self.depthwise_bias = _constant_vector(0.0, dim, "mlp", config) if config.conv_bias else None
        self.conv_norm = make_conv_norm(dim, config, rngs=rngs)
        self.pointwise_out = Dense(dim, dim, ("mlp", "embed"), config, rngs=rngs, use_bias=config.conv_bias)
        self.dropout = nnx.Dropout(config.conv_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """``x [batch, frames, embed]``, ``mask [batch, frames]`` bool -> ``[batch, frames, embed]``."""
        value, gate = jnp.split(checkpoint_name(self.pointwise_in(self.norm(x)), MLP_IN), 2, axis=-1)
        y = _apply_mask(value * jax.nn.sigmoid(gate), mask)
        bias = None if self.depthwise_bias is None else self.depthwise_bias[...]
        y = depthwise_conv1d(y, self.depthwise_kernel[...], bias, causal=self.causal)
        y = jax.nn.swish(self.conv_norm(y, mask, deterministic=deterministic)).astype(self.dtype)
        y = self.dropout(checkpoint_name(self.pointwise_out(y), MLP_OUT), deterministic=deterministic)
        return x + y.astype(x.dtype)


class ConformerBlock(nnx.Module):
    """FFN/2 → relative MHSA → conv module → FFN/2 → LayerNorm, on ``[batch, frames, embed]``."""

    def __init__(self, config: ConformerConfig, *, rngs: nnx.Rngs):
        self.ffn_in = FeedForward(config, rngs=rngs)
        self.attention_norm = LayerNorm(config.model_dim, config, rngs=rngs)
        self.attention = RelativePositionSelfAttention(
            config.model_dim, config.num_heads, max_relative_distance=config.max_relative_distance,
            position_encoding=config.position_encoding, left_distance=config.left_relative_distance,
            right_distance=config.right_relative_distance, dropout_rate=config.attention_dropout,
            dtype=config.compute_dtype, param_dtype=config.storage_dtype, rngs=rngs,
        )
        self.attention_dropout = nnx.Dropout(config.residual_dropout, rngs=rngs)
        self.conv = ConvModule(config, rngs=rngs)
        self.ffn_out = FeedForward(config, rngs=rngs)
        self.final_norm = LayerNorm(config.model_dim, config, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """``x [batch, frames, embed]`` float32, ``mask [batch, frames]`` bool -> same shape, zero at padding."""
        x = self.ffn_in(x, deterministic=deterministic)
        attended = self.attention(self.attention_norm(x), mask, deterministic=deterministic)
        x = x + self.attention_dropout(attended, deterministic=deterministic).astype(x.dtype)
        x = self.conv(x, mask, deterministic=deterministic)
        x = self.ffn_out(x, deterministic=deterministic)
        return _apply_mask(self.final_norm(x), mask)


class ConformerEncoder(nnx.Module):
    """Speech encoder: ``(features [batch, frames, input_dim], mask) -> ([batch, frames', model_dim], mask')``.

    Dropout draws from the 'dropout' stream of the ``rngs`` the encoder was built with (the 'default'
    stream when there is no 'dropout' stream); ``deterministic=True`` disables it and makes the
    'batch' conv norm use its running statistics.
    """

    def __init__(self, config: ConformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        if config.frontend == "conv_subsampling":
            self.subsampling = ConvSubsampling(config, rngs=rngs)
        else:
            self.feature_projection = FeatureProjection(config, rngs=rngs)
        self.input_dropout = nnx.Dropout(config.residual_dropout, rngs=rngs)
        if config.scan_layers:
            # A period of one block, as a list: paths 'scanned_blocks/0/...' (see layer_stacking.py).
            self.scanned_blocks = stacked_init(lambda r: nnx.List([ConformerBlock(config, rngs=r)]),
                                               config.num_layers, rngs)
        else:
            self.blocks = nnx.List([ConformerBlock(config, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(self, features: jax.Array, mask: jax.Array, *, deterministic: bool) -> tuple[jax.Array, jax.Array]:
        """Encodes a batch of (padded) log-mel frames.

        Args:
          features: ``[batch, frames, input_dim]`` log-mel frames (stacked fbank frames for the
            'feature_projection' front-end); values at padded frames are ignored.
          mask: ``[batch, frames]`` bool or int, 1 / True = valid frame.
          deterministic: True disables dropout (and uses batch-norm running statistics).

        Returns:
          ``encoded [batch, frames', model_dim]`` float32, zero at padded frames, and
          ``encoded_mask [batch, frames']`` bool, where ``frames' = config.output_length(frames)`` and
          each row has ``config.output_length(valid frames)`` leading valid positions when its valid
          frames are a prefix.
        """
        features = jnp.asarray(features)
        mask = jnp.asarray(mask)
        if features.ndim != 3 or features.shape[-1] != self.config.input_dim:
            raise ValueError(
                f"Conformer features must be [batch, frames, {self.config.input_dim}], got shape {features.shape}"
            )
        if mask.shape != features.shape[:2]:
            raise ValueError(f"Conformer mask must be [batch, frames] = {features.shape[:2]}, got shape {mask.shape}")
        mask = mask.astype(bool)
        if self.config.input_norm == "utterance":
            features = normalize_utterance(features, mask)
        frontend = self.subsampling if self.config.frontend == "conv_subsampling" else self.feature_projection
        x, mask = frontend(features, mask)
        x = self.input_dropout(x, deterministic=deterministic).astype(jnp.float32)
        x = constrain(x, ("batch", "frames", "embed"))

        def apply(block, x, mask):
            return constrain(block(x, mask, deterministic=deterministic), ("batch", "frames", "embed"))

        run = maybe_remat(apply, self.config.remat_policy, scanned=self.config.scan_layers)
        if self.config.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
            def body(blocks, x):
                for block in blocks:
                    x = run(block, x, mask)
                return x

            x = body(self.scanned_blocks, x)
        else:
            for block in self.blocks:
                x = run(block, x, mask)
        return _apply_mask(x, mask), mask
