"""An independent NumPy re-computation of the Conformer encoder, written from its equations.

Loops over frames and relative distances where the model uses einsums, gathers and `lax.conv`, so the
two share no code path. Reads the parameters of a `ConformerEncoder` (float64 here) and covers every
variant of `ConformerConfig` used by the tests: conv subsampling or feature projection, Transformer-XL or
relative_key positions, 'same' or causal depthwise conv, with or without conv biases, 'layer' conv norm.
"""

from __future__ import annotations

import numpy as np


def _p(param) -> np.ndarray | None:
    return None if param is None else np.asarray(param[...], np.float64)


def layer_norm(x, norm, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _p(norm.scale) + _p(norm.bias)


def dense(x, layer):
    y = x @ _p(layer.kernel)
    return y if layer.bias is None else y + _p(layer.bias)


def swish(x):
    return x / (1.0 + np.exp(-x))


def feed_forward(x, ffn, eps, factor=0.5):
    return x + factor * dense(swish(dense(layer_norm(x, ffn.norm, eps), ffn.hidden)), ffn.output)


def sinusoid(distance: float, dim: int) -> np.ndarray:
    w = 10000.0 ** (-np.arange(0, dim, 2) / dim)
    return np.concatenate([np.sin(distance * w), np.cos(distance * w)])


def attention(x, mask, att, config):
    """x [frames, embed] of one utterance, mask [frames] bool."""
    frames = x.shape[0]
    q = np.einsum("td,dnh->tnh", x, _p(att.query_kernel)) + _p(att.query_bias)
    k = np.einsum("td,dnh->tnh", x, _p(att.key_kernel)) + _p(att.key_bias)
    v = np.einsum("td,dnh->tnh", x, _p(att.value_kernel)) + _p(att.value_bias)
    heads, head_dim = q.shape[1:]
    logits = np.zeros((heads, frames, frames))
    for i in range(frames):
        for j in range(frames):
            if config.position_encoding == "transformer_xl":
                d = np.clip(i - j, -config.max_relative_distance, config.max_relative_distance)
                r = np.einsum("d,dnh->nh", sinusoid(d, config.model_dim), _p(att.position_kernel))
                content = ((q[i] + _p(att.content_bias)) * k[j]).sum(-1)
                position = ((q[i] + _p(att.position_bias)) * r).sum(-1)
            else:
                d = np.clip(j - i, -config.left_relative_distance, config.right_relative_distance)
                e = _p(att.distance_embedding)[d + config.left_relative_distance]
                content = (q[i] * k[j]).sum(-1)
                position = (q[i] * e[None, :]).sum(-1)
            logits[:, i, j] = (content + position) / np.sqrt(head_dim)
    logits = np.where(mask[None, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("nts,snh->tnh", probs, v)
    return np.einsum("tnh,nhd->td", context, _p(att.output_kernel)) + _p(att.output_bias)


def conv_module(x, mask, conv, config):
    """x [frames, embed] of one utterance; 'layer' conv norm."""
    assert config.conv_norm == "layer"
    y = dense(layer_norm(x, conv.norm, config.norm_epsilon), conv.pointwise_in)
    dim = config.model_dim
    y = y[:, :dim] / (1.0 + np.exp(-y[:, dim:]))
    y = np.where(mask[:, None], y, 0.0)
    kernel = _p(conv.depthwise_kernel)
    taps = kernel.shape[0]
    left = taps - 1 if config.causal_conv else (taps - 1) // 2
    out = np.zeros_like(y)
    for t in range(y.shape[0]):
        for tap in range(taps):
            source = t + tap - left
            if 0 <= source < y.shape[0]:
                out[t] += kernel[tap] * y[source]
    if conv.depthwise_bias is not None:
        out += _p(conv.depthwise_bias)
    out = swish(layer_norm(out, conv.conv_norm, config.norm_epsilon))
    return x + dense(out, conv.pointwise_out)


def block(x, mask, blk, config, *, macaron=0.5, with_conv=True):
    """One Conformer block on one utterance: x [frames, embed], mask [frames] bool."""
    eps = config.norm_epsilon
    x = feed_forward(x, blk.ffn_in, eps, macaron)
    x = x + attention(layer_norm(x, blk.attention_norm, eps), mask, blk.attention, config)
    if with_conv:
        x = conv_module(x, mask, blk.conv, config)
    x = feed_forward(x, blk.ffn_out, eps, macaron)
    return np.where(mask[:, None], layer_norm(x, blk.final_norm, eps), 0.0)


def _conv2d_stride2(x, kernel, bias):
    """x [frames, bins, c_in], kernel [3, 3, c_in, c_out], one zero of padding each side, stride 2."""
    frames, bins = x.shape[:2]
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros(((frames + 1) // 2, (bins + 1) // 2, kernel.shape[-1]))
    for t in range(out.shape[0]):
        for f in range(out.shape[1]):
            window = padded[2 * t: 2 * t + 3, 2 * f: 2 * f + 3]
            out[t, f] = np.einsum("hwi,hwio->o", window, kernel) + bias
    return out


def frontend(features, mask, model, config):
    """features [frames, input_dim], mask [frames] -> (x [frames', embed], mask' [frames'])."""
    if config.frontend == "feature_projection":
        proj = model.feature_projection
        return dense(layer_norm(features, proj.norm, config.norm_epsilon), proj.projection), mask
    sub = model.subsampling
    x = np.where(mask[:, None], features, 0.0)[..., None]
    x = np.maximum(_conv2d_stride2(x, _p(sub.conv1_kernel), _p(sub.conv1_bias)), 0.0)
    mask = mask[::2]
    x = np.where(mask[:, None, None], x, 0.0)
    x = np.maximum(_conv2d_stride2(x, _p(sub.conv2_kernel), _p(sub.conv2_bias)), 0.0)
    mask = mask[::2]
    return dense(x.reshape(x.shape[0], -1), sub.projection), mask


def encoder(features, mask, model, **block_options):
    """The whole encoder on a padded batch: features [batch, frames, input_dim], mask [batch, frames].

    Returns (encoded [batch, frames', embed], mask' [batch, frames'] bool), zero at padded frames.
    """
    config = model.config
    outputs, masks = [], []
    for row in range(features.shape[0]):
        x, m = frontend(np.asarray(features[row], np.float64), np.asarray(mask[row], bool), model, config)
        for blk in model.blocks:
            x = block(x, m, blk, config, **block_options)
        outputs.append(np.where(m[:, None], x, 0.0))
        masks.append(m)
    return np.stack(outputs), np.stack(masks)
