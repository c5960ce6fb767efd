"""Whole-block and whole-stack tests of the Conformer against the NumPy re-computation in
`conformer_reference.py`, with every parameter randomised (norm scales, biases, u / v all non-trivial),
on padded batches; plus checks that the comparison catches a dropped conv module or a wrong macaron
factor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conformer_reference as ref
from spectron_jax.models import conformer
from spectron_jax.models.conformer import ConformerConfig, ConformerEncoder

TOLERANCE = 1e-4


def _config(**overrides) -> ConformerConfig:
    values = dict(input_dim=12, model_dim=16, num_layers=2, num_heads=2, ffn_dim=24, conv_kernel_size=5,
                  subsampling_channels=3, max_relative_distance=3, attention_dropout=0.0, residual_dropout=0.0,
                  conv_dropout=0.0)
    values.update(overrides)
    return ConformerConfig(**values)


def randomised_encoder(config: ConformerConfig, seed: int = 0) -> ConformerEncoder:
    """An encoder whose every parameter is moved off its initial value (so each term matters)."""
    model = ConformerEncoder(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed + 100)
    leaves = [leaf + jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype) for leaf in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def _padded_batch(config, frames, lengths, seed=1):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(lengths), frames, config.input_dim)).astype(np.float32)
    mask = np.arange(frames)[None, :] < np.asarray(lengths)[:, None]
    features[~mask] = 30.0  # garbage at padded frames
    return features, mask


def max_block_error(model, x, mask, **block_options) -> float:
    """max |model block 0 - NumPy block 0| over valid frames of a padded batch x [batch, frames, embed]."""
    ours = np.asarray(nnx.jit(lambda m, x, k: m.blocks[0](x, k, deterministic=True))(model, x, mask))
    worst = 0.0
    for row in range(x.shape[0]):
        expected = ref.block(np.asarray(x[row], np.float64), mask[row], model.blocks[0], model.config,
                             **block_options)
        worst = max(worst, float(np.abs(ours[row][mask[row]] - expected[mask[row]]).max()))
    return worst


def _block_inputs(config, lengths=(9, 6), frames=9):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(len(lengths), frames, config.model_dim)).astype(np.float32)
    mask = np.arange(frames)[None, :] < np.asarray(lengths)[:, None]
    return x, mask


@pytest.mark.parametrize("variant", [
    {},  # the native encoder: Transformer-XL positions, 'same' conv with biases
    dict(position_encoding="relative_key", left_relative_distance=4, right_relative_distance=2,
         causal_conv=True, conv_bias=False, frontend="feature_projection"),  # the w2v-BERT 2.0 variant
])
def test_block_matches_numpy(variant):
    config = _config(**variant)
    model = randomised_encoder(config)
    x, mask = _block_inputs(config)
    assert max_block_error(model, x, mask) < TOLERANCE


@pytest.mark.parametrize("frontend", ["conv_subsampling", "feature_projection"])
def test_stack_matches_numpy_on_padded_batch(frontend):
    config = _config(frontend=frontend)
    model = randomised_encoder(config, seed=3)
    features, mask = _padded_batch(config, frames=18, lengths=[18, 11])
    encoded, encoded_mask = nnx.jit(lambda m, f, k: m(f, k, deterministic=True))(model, features, mask)
    expected, expected_mask = ref.encoder(features, mask, model)
    np.testing.assert_array_equal(np.asarray(encoded_mask), expected_mask)
    assert encoded.shape[1] == config.output_length(18)
    np.testing.assert_allclose(np.asarray(encoded), expected, atol=TOLERANCE, rtol=0)
    assert np.abs(expected).max() > 0.5


def _block_without_conv(self, x, mask, *, deterministic):
    x = self.ffn_in(x, deterministic=deterministic)
    x = x + self.attention(self.attention_norm(x), mask, deterministic=deterministic).astype(x.dtype)
    x = self.ffn_out(x, deterministic=deterministic)
    return conformer._apply_mask(self.final_norm(x), mask)


def _full_step_ffn(self, x, *, deterministic):
    return x + self.output(jax.nn.swish(self.hidden(self.norm(x)))).astype(x.dtype)


@pytest.mark.parametrize("mutation", ["no_conv_module", "macaron_factor_1"])
def test_reference_catches_mutations(monkeypatch, mutation):
    """The comparison fails when the model drops its conv module or uses a full-step FFN, and the
    reference, mutated the same way, agrees with the mutated model (so the gap is that mutation)."""
    config = _config()
    model = randomised_encoder(config, seed=4)
    x, mask = _block_inputs(config)
    if mutation == "no_conv_module":
        monkeypatch.setattr(conformer.ConformerBlock, "__call__", _block_without_conv)
        mutated_reference = dict(with_conv=False)
    else:
        monkeypatch.setattr(conformer.FeedForward, "__call__", _full_step_ffn)
        mutated_reference = dict(macaron=1.0)
    assert max_block_error(model, x, mask) > 100 * TOLERANCE
    assert max_block_error(model, x, mask, **mutated_reference) < TOLERANCE
