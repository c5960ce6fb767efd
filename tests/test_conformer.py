"""Tests of the Conformer speech encoder against NumPy re-computations and padding / position properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectron_jax.models import conformer
from spectron_jax.models.conformer import ConformerConfig, ConformerEncoder, subsampled_length
from spectron_jax.models.relative_attention import RelativePositionSelfAttention

CONTRACT_AXES = {
    "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "mel", "prenet", "conv_kernel", "conv_in",
    "conv_out", "norm", "relpos",
}


def tiny_config(**overrides) -> ConformerConfig:
    values = dict(model_dim=32, num_layers=2, num_heads=2, subsampling_channels=4, num_groups=4,
                  attention_dropout=0.0, residual_dropout=0.0, conv_dropout=0.0)
    values.update(overrides)
    return ConformerConfig(**values)


# ----------------------------------------------------------------------------------------------------
# Subsampling


def test_subsampled_length_matches_conv_output_and_mask():
    config = tiny_config()
    subsampling = conformer.ConvSubsampling(config, rngs=nnx.Rngs(0))
    for num_frames in range(1, 51):
        # The real convolutions' output shape, traced without running them.
        out, out_mask = jax.eval_shape(
            lambda x, m: subsampling(x, m),
            jax.ShapeDtypeStruct((1, num_frames, 128), jnp.float32), jax.ShapeDtypeStruct((1, num_frames), bool),
        )
        expected = subsampled_length(num_frames)
        assert expected == math.ceil(num_frames / 4)
        assert out.shape == (1, expected, config.model_dim)
        assert out_mask.shape == (1, expected)
    # Padded rows: the strided mask keeps exactly subsampled_length(valid) leading positions.
    lengths = np.arange(1, 51)
    mask = np.arange(50)[None, :] < lengths[:, None]
    features = np.random.default_rng(0).normal(size=(len(lengths), 50, 128)).astype(np.float32)
    _, out_mask = jax.jit(lambda x, m: subsampling(x, m))(features, mask)
    np.testing.assert_array_equal(np.asarray(out_mask).sum(axis=1), subsampled_length(lengths))
    np.testing.assert_array_equal(
        np.asarray(out_mask), np.arange(out_mask.shape[1])[None, :] < subsampled_length(lengths)[:, None]
    )


# ----------------------------------------------------------------------------------------------------
# Padding invariance of the whole encoder


def _randomize_batch_stats(model: nnx.Module, seed: int) -> int:
    rng = np.random.default_rng(seed)
    count = 0
    for _, module in model.iter_modules():
        if isinstance(module, conformer.MaskedBatchNorm):
            dim = module.running_mean[...].shape[0]
            module.running_mean[...] = jnp.asarray(rng.normal(size=dim), jnp.float32)
            module.running_var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=dim), jnp.float32)
            count += 1
    return count


@pytest.mark.parametrize("conv_norm", ["layer", "group", "batch"])
def test_padding_with_garbage_does_not_change_valid_outputs(conv_norm):
    config = tiny_config(conv_norm=conv_norm)
    model = ConformerEncoder(config, rngs=nnx.Rngs(params=1, dropout=2))
    if conv_norm == "batch":
        assert _randomize_batch_stats(model, seed=3) == config.num_layers
    encode = nnx.jit(lambda m, x, mask: m(x, mask, deterministic=True))
    rng = np.random.default_rng(4)
    lengths = [37, 22]
    utterances = [rng.normal(size=(n, 128)).astype(np.float32) for n in lengths]
    padded_frames = 64
    features = 50.0 * rng.normal(size=(2, padded_frames, 128)).astype(np.float32)  # garbage everywhere
    mask = np.zeros((2, padded_frames), np.int32)
    for row, utterance in enumerate(utterances):
        features[row, : len(utterance)] = utterance
        mask[row, : len(utterance)] = 1
    encoded, encoded_mask = encode(model, features, mask)
    assert encoded.shape == (2, subsampled_length(padded_frames), config.model_dim)
    for row, utterance in enumerate(utterances):
        valid = subsampled_length(len(utterance))
        np.testing.assert_array_equal(np.asarray(encoded_mask[row]), np.arange(encoded.shape[1]) < valid)
        np.testing.assert_array_equal(np.asarray(encoded[row, valid:]), 0.0)
    # Row 0 against the same utterance encoded alone, unpadded (row 1 shares the batch with it).
    alone, alone_mask = encode(model, utterances[0][None], np.ones((1, lengths[0]), np.int32))
    assert alone.shape[1] == subsampled_length(lengths[0]) and bool(alone_mask.all())
    np.testing.assert_allclose(encoded[0, : alone.shape[1]], alone[0], rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(encoded)).max() > 0.1  # outputs are not trivially zero


def test_batch_norm_training_statistics_exclude_padding():
    """Training-mode batch norm: garbage in padded frames changes neither outputs nor running stats."""
    config = tiny_config(conv_norm="batch", num_layers=1)
    rng = np.random.default_rng(5)
    features = rng.normal(size=(2, 40, 128)).astype(np.float32)
    mask = np.ones((2, 40), np.int32)
    mask[0, 29:] = 0
    mask[1, 13:] = 0
    garbage = features.copy()
    garbage[mask == 0] = 100.0 * rng.normal(size=(int((mask == 0).sum()), 128))
    results = []
    for inputs in (features * mask[..., None], garbage):
        model = ConformerEncoder(config, rngs=nnx.Rngs(params=6, dropout=7))
        encoded, _ = model(inputs, mask, deterministic=False)
        norm = model.blocks[0].conv.conv_norm
        results.append((np.asarray(encoded), np.asarray(norm.running_mean[...]), np.asarray(norm.running_var[...])))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-5, atol=1e-6)
    assert np.abs(results[0][1]).max() > 0  # the running mean moved


# ----------------------------------------------------------------------------------------------------
# Norms against NumPy


def test_masked_batch_norm_matches_numpy():
    config = tiny_config(conv_norm="batch", batch_norm_momentum=0.9)
    norm = conformer.MaskedBatchNorm(6, config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(8)
    norm.scale[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
    x = rng.normal(size=(3, 9, 6)).astype(np.float32)
    mask = np.arange(9)[None, :] < np.array([9, 4, 1])[:, None]
    out = np.asarray(norm(x, mask, deterministic=False))
    valid = x[mask]  # [valid frames, 6]
    mean, var = valid.mean(axis=0), valid.var(axis=0)
    scale, bias = np.asarray(norm.scale[...]), np.asarray(norm.bias[...])
    expected = (x - mean) / np.sqrt(var + config.norm_epsilon) * scale + bias
    np.testing.assert_allclose(out[mask], expected[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.running_mean[...], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.running_var[...], 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
    inference = np.asarray(norm(x, mask, deterministic=True))
    running_mean, running_var = 0.1 * mean, 0.9 + 0.1 * var
    expected = (x - running_mean) / np.sqrt(running_var + config.norm_epsilon) * scale + bias
    np.testing.assert_allclose(inference, expected, rtol=1e-5, atol=1e-5)


def test_masked_group_norm_matches_numpy():
    config = tiny_config(conv_norm="group", num_groups=2)
    norm = conformer.MaskedGroupNorm(6, config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 7, 6)).astype(np.float32)
    mask = np.arange(7)[None, :] < np.array([7, 3])[:, None]
    out = np.asarray(norm(x, mask))
    for b in range(2):
        for g in range(2):
            block = x[b, mask[b], 3 * g: 3 * g + 3]
            expected = (block - block.mean()) / np.sqrt(block.var() + config.norm_epsilon)
            np.testing.assert_allclose(out[b, mask[b], 3 * g: 3 * g + 3], expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Relative attention


def numpy_sinusoid(distance: int, dim: int) -> np.ndarray:
    half = dim // 2
    rates = np.array([10000.0 ** (-2.0 * k / dim) for k in range(half)])
    return np.concatenate([np.sin(distance * rates), np.cos(distance * rates)])


def numpy_relative_attention(attention, x, mask, max_distance):
    """Transformer-XL attention, one (batch, head, query, key) at a time."""
    p = {name: np.asarray(getattr(attention, name)[...], np.float64) for name in (
        "query_kernel", "key_kernel", "value_kernel", "query_bias", "key_bias", "value_bias", "position_kernel",
        "content_bias", "position_bias", "output_kernel", "output_bias")}
    x = np.asarray(x, np.float64)
    batch, frames, dim = x.shape
    heads, head_dim = p["query_bias"].shape
    q = np.einsum("btd,dnh->btnh", x, p["query_kernel"]) + p["query_bias"]
    k = np.einsum("btd,dnh->btnh", x, p["key_kernel"]) + p["key_bias"]
    v = np.einsum("btd,dnh->btnh", x, p["value_kernel"]) + p["value_bias"]
    logits = np.full((batch, heads, frames, frames), np.nan)
    for i in range(frames):
        for j in range(frames):
            distance = int(np.clip(i - j, -max_distance, max_distance))
            r = np.einsum("d,dnh->nh", numpy_sinusoid(distance, dim), p["position_kernel"])
            for b in range(batch):
                for n in range(heads):
                    content = (q[b, i, n] + p["content_bias"][n]) @ k[b, j, n]
                    position = (q[b, i, n] + p["position_bias"][n]) @ r[n]
                    logits[b, n, i, j] = (content + position) / np.sqrt(head_dim)
    masked = np.where(mask[:, None, None, :], logits, -np.inf)
    probs = np.exp(masked - masked.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    context = np.einsum("bnts,bsnh->btnh", probs, v)
    output = np.einsum("btnh,nhd->btd", context, p["output_kernel"]) + p["output_bias"]
    return logits, output


def _attention_with_random_biases(max_distance: int, seed: int) -> RelativePositionSelfAttention:
    attention = RelativePositionSelfAttention(
        8, 2, max_relative_distance=max_distance, dropout_rate=0.0, rngs=nnx.Rngs(seed)
    )
    rng = np.random.default_rng(seed)
    for name in ("query_bias", "key_bias", "value_bias", "content_bias", "position_bias", "output_bias"):
        shape = getattr(attention, name)[...].shape
        getattr(attention, name)[...] = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return attention


@pytest.mark.parametrize("max_distance", [3, 100])
def test_relative_attention_matches_numpy_transformer_xl(max_distance):
    attention = _attention_with_random_biases(max_distance, seed=10)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 7, 8)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mask[1, 5:] = False
    expected_logits, expected_output = numpy_relative_attention(attention, x, mask, max_distance)
    logits = np.asarray(attention.attention_logits(x, mask))
    valid_keys = np.broadcast_to(mask[:, None, None, :], logits.shape)
    np.testing.assert_allclose(logits[valid_keys], expected_logits[valid_keys], rtol=1e-4, atol=1e-4)
    output = np.asarray(attention(x, mask, deterministic=True))
    np.testing.assert_allclose(output[mask], expected_output[mask], rtol=1e-4, atol=1e-4)


def test_relative_attention_logits_depend_on_relative_position_only():
    """Prepending frames shifts every position; logits among the original frames must not change."""
    attention = _attention_with_random_biases(max_distance=4, seed=12)
    rng = np.random.default_rng(13)
    x = rng.normal(size=(1, 9, 8)).astype(np.float32)
    shifted = np.concatenate([rng.normal(size=(1, 5, 8)).astype(np.float32), x], axis=1)
    logits = np.asarray(attention.attention_logits(x, np.ones((1, 9), bool)))
    logits_shifted = np.asarray(attention.attention_logits(shifted, np.ones((1, 14), bool)))
    np.testing.assert_allclose(logits_shifted[:, :, 5:, 5:], logits, rtol=1e-5, atol=1e-5)
    # The position term is not trivially zero: the same content at a different offset scores differently.
    constant = np.repeat(x[:, :1], 9, axis=1)
    constant_logits = np.asarray(attention.attention_logits(constant, np.ones((1, 9), bool)))
    assert np.abs(constant_logits[0, :, 4, 0] - constant_logits[0, :, 4, 8]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# Depthwise convolution


@pytest.mark.parametrize("taps", [32, 5, 4])
def test_depthwise_conv_matches_numpy(taps):
    rng = np.random.default_rng(taps)
    x = rng.normal(size=(2, 11, 3)).astype(np.float32)
    kernel = rng.normal(size=(taps, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    out = np.asarray(conformer.depthwise_conv1d(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias)))
    left = (taps - 1) // 2
    expected = np.zeros_like(x) + bias
    for t in range(x.shape[1]):
        for k in range(taps):
            source = t + k - left
            if 0 <= source < x.shape[1]:
                expected[:, t, :] += kernel[k] * x[:, source, :]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Size of the 600M stand-in


def analytic_parameter_count(config: ConformerConfig) -> int:
    d, f, k, c = config.model_dim, config.ffn_hidden_dim, config.conv_kernel_size, config.subsampling_channels
    layer_norm = 2 * d
    ffn = layer_norm + (d * f + f) + (f * d + d)
    attention = layer_norm + 3 * (d * d + d) + d * d + 2 * d + (d * d + d)
    conv = layer_norm + (d * 2 * d + 2 * d) + (k * d + d) + 2 * d + (d * d + d)
    block = 2 * ffn + attention + conv + layer_norm
    bins = math.ceil(config.input_dim / 4)
    subsampling = (9 * c + c) + (9 * c * c + c) + (bins * c * d + d)
    return subsampling + config.num_layers * block


def test_600m_parameter_count_without_allocation():
    config = conformer.conformer_600m_config()
    abstract = nnx.eval_shape(lambda: ConformerEncoder(config, rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in params)
    count = sum(math.prod(leaf.shape) for leaf in params)
    assert count == analytic_parameter_count(config)
    assert 540e6 <= count <= 660e6, count
    print(f"600M stand-in parameter count: {count:,}")


def test_parameters_carry_contract_logical_axes():
    model = nnx.eval_shape(lambda: ConformerEncoder(tiny_config(conv_norm="batch"), rngs=nnx.Rngs(0)))
    variables = nnx.state(model, nnx.Param, nnx.BatchStat)
    leaves = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert len(leaves) > 20
    for variable in leaves:
        axes = variable.get_metadata()["out_sharding"]
        assert len(axes) == len(variable.shape), (axes, variable.shape)
        assert set(axes) <= CONTRACT_AXES, axes
    assert analytic_parameter_count(tiny_config()) == sum(
        math.prod(v.shape) for v in jax.tree.leaves(nnx.state(nnx.eval_shape(
            lambda: ConformerEncoder(tiny_config(), rngs=nnx.Rngs(0))), nnx.Param)))


# ----------------------------------------------------------------------------------------------------
# Dropout and input checks


def test_dropout_only_when_not_deterministic():
    config = tiny_config(attention_dropout=0.2, residual_dropout=0.2, conv_dropout=0.2, num_layers=1)
    model = ConformerEncoder(config, rngs=nnx.Rngs(params=14, dropout=15))
    rng = np.random.default_rng(16)
    features = rng.normal(size=(2, 24, 128)).astype(np.float32)
    mask = np.ones((2, 24), np.int32)
    encode = nnx.jit(lambda m, x, mask, deterministic: m(x, mask, deterministic=deterministic)[0],
                     static_argnames="deterministic")
    first = encode(model, features, mask, deterministic=True)
    second = encode(model, features, mask, deterministic=True)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    dropped_a = encode(model, features, mask, deterministic=False)
    dropped_b = encode(model, features, mask, deterministic=False)
    assert np.abs(np.asarray(dropped_a) - np.asarray(first)).max() > 1e-3
    assert np.abs(np.asarray(dropped_a) - np.asarray(dropped_b)).max() > 1e-3
    third = encode(model, features, mask, deterministic=True)
    np.testing.assert_array_equal(np.asarray(third), np.asarray(first))


def test_bad_inputs_and_configs_raise_clear_errors():
    model = ConformerEncoder(tiny_config(num_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"features must be \[batch, frames, 128\]"):
        model(np.zeros((1, 10, 80), np.float32), np.ones((1, 10)), deterministic=True)
    with pytest.raises(ValueError, match="mask must be"):
        model(np.zeros((1, 10, 128), np.float32), np.ones((1, 9)), deterministic=True)
    with pytest.raises(ValueError, match="num_heads"):
        ConformerConfig(model_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="conv_norm"):
        ConformerConfig(conv_norm="instance")
    with pytest.raises(ValueError, match="num_groups"):
        ConformerConfig(model_dim=36, num_heads=4, conv_norm="group", num_groups=8)
    with pytest.raises(ValueError, match="residual_dropout"):
        ConformerConfig(residual_dropout=1.0)
    with pytest.raises(ValueError, match="dtype"):
        ConformerConfig(dtype="float13")
    assert ConformerConfig().ffn_hidden_dim == 4 * ConformerConfig().model_dim
