"""Analytic FLOPs: a hand count of the tiny config, the prefix-LM mask's pair count against the model's own
mask, frozen parameters, and one layer's forward + backward against XLA's cost analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectron_jax import flops
from spectron_jax.models.acoustic import AcousticConfig
from spectron_jax.models.attention import visibility_mask
from spectron_jax.models.conformer import ConformerConfig
from spectron_jax.models.decoder import DecoderConfig, GatedMLP
from spectron_jax.models.spectron import SpectronConfig

# gin/models/tiny.gin
TINY = SpectronConfig(
    encoder=ConformerConfig(input_dim=128, model_dim=64, num_layers=2, num_heads=4, ffn_dim=256, conv_kernel_size=15,
                            subsampling_channels=16),
    decoder=DecoderConfig(vocab_size=512, model_dim=128, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=32,
                          mlp_dim=384),
    acoustic=AcousticConfig(num_mel=128, prenet_dims=(64, 64), postnet_hidden=128),
)
SHAPES = dict(batch_size=2, prompt_len=32, text_len=16, cont_len=24)


def test_tiny_config_equals_a_hand_count():
    # Batch 2; prompt 32 frames -> 16 -> 8 encoder frames (mel 128 -> 64 -> 32 bins); text 16; speech 24 slots;
    # decoder row 8 + 16 + 24 = 48 slots. Forward FLOPs (2 x multiply-adds) times 3 for a trained layer inside
    # the network (forward, weight and input gradients: MaxText's 6 x parameters per token), times 2 for a trained
    # first layer (data input: no input gradient), times 3 for attention (activation x activation).
    encoder_per_row = (
        2 * 16 * 64 * 9 * 16 * 2                                         # conv1 [16 frames, 64 bins, 16 ch]
        + 2 * 8 * 32 * 9 * 16 * 16 * 3                                   # conv2 [8, 32, 16]
        + 2 * 8 * 512 * 64 * 3                                           # 32 bins x 16 ch -> 64
        + 2 * (
            2 * 2 * 2 * 8 * 64 * 256 * 3                                 # two macaron FFNs x (hidden, output)
            + 4 * 2 * 8 * 64 * 64 * 3                                    # q, k, v, o
            + (2 * 8 * 8 * 64 + 2 * 8 * 15 * 64 + 2 * 8 * 8 * 64) * 3    # content, position (15 distances), values
            + (2 * 8 * 64 * 128 + 2 * 8 * 15 * 64 + 2 * 8 * 64 * 64) * 3  # conv module: in, depthwise (15 taps), out
        )
    )
    position_kernel_per_step = 2 * (2 * 15 * 64 * 64 * 2)                # per layer, once per step, constant input
    projection = 2 * 8 * 64 * 128 * 3
    prenet = 2 * 24 * 128 * 64 * 2 + 2 * 24 * 64 * 64 * 3 + 2 * 24 * 64 * 128 * 3
    pairs = 8 * 8 + sum(i + 1 for i in range(8, 48))                     # bidirectional prefix + causal rest = 1204
    decoder = 2 * (
        2 * 48 * 128 * (128 + 32 + 32 + 128) * 3                         # q (4 x 32), k, v (1 x 32), o
        + 3 * 2 * 48 * 128 * 384 * 3                                     # gate, up, down
        + 2 * 2 * pairs * 4 * 32 * 3                                     # scores + values over 4 x 32
    )
    logits = 2 * 16 * 128 * 512 * 3
    postnet = 2 * 24 * 128 * 128 * 3 + 2 * 24 * 128 * 128 * 3
    hand = 2 * (encoder_per_row + projection + prenet + decoder + logits + postnet) + position_kernel_per_step

    count = flops.step_flops(TINY, **SHAPES)
    assert count.total == pytest.approx(hand, rel=0.01)
    assert count.per_sample == pytest.approx(count.total / 2)
    assert set(count.training) == set(count.forward)
    assert count.training["decoder/attention"] == pytest.approx(2 * 2 * 2 * 2 * pairs * 4 * 32 * 3)


@pytest.mark.parametrize("window", [None, 1, 5, 100])
def test_visible_pairs_equal_the_models_prefix_lm_mask(window):
    prefix, length = 7, 30
    slots = jnp.arange(length)
    positions = slots[None, :]
    valid = jnp.ones((1, length), bool)
    is_prefix = (slots < prefix)[None, :]
    mask = visibility_mask(slots, positions, slots, positions, valid, is_prefix, window)
    assert flops.decoder_visible_pairs(prefix, length, window) == int(np.sum(np.asarray(mask)))


def test_doubling_the_continuation_adds_linear_and_causal_attention_terms():
    base = flops.step_flops(TINY, **SHAPES)
    longer = flops.step_flops(TINY, **dict(SHAPES, cont_len=48))
    # Linear in the speech slots: pre-net, post-net; the encoder and the text logits do not change.
    for group in ("prenet", "postnet"):
        assert longer.training[group] == pytest.approx(2 * base.training[group])
    for group in ("encoder/ffn", "encoder/attention", "logits", "projection"):
        assert longer.training[group] == base.training[group]
    # Decoder projections scale with the row length 48 -> 72; attention with the visible pairs.
    assert longer.training["decoder/mlp"] == pytest.approx(base.training["decoder/mlp"] * 72 / 48)
    ratio = flops.decoder_visible_pairs(8, 72) / flops.decoder_visible_pairs(8, 48)
    assert longer.training["decoder/attention"] == pytest.approx(base.training["decoder/attention"] * ratio)


def test_frozen_parameters_skip_their_weight_gradients():
    full = flops.step_flops(TINY, **SHAPES)
    frozen_lm = flops.step_flops(TINY, **SHAPES, frozen=("^decoder/",))
    # The LM's weights (and the tied table, i.e. the logits) lose one of their three passes; its attention
    # still carries gradients down to the encoder, projection and pre-net.
    for group in ("decoder/mlp", "decoder/attention_projections", "logits"):
        assert frozen_lm.training[group] == pytest.approx(full.training[group] * 2 / 3)
    for group in ("decoder/attention", "encoder/ffn", "prenet", "postnet"):
        assert frozen_lm.training[group] == full.training[group]
    # Nothing trained: no backward pass at all.
    nothing = flops.step_flops(TINY, **SHAPES, frozen=(".",))
    assert nothing.total == pytest.approx(nothing.forward_total) and nothing.forward == full.forward


def test_one_mlp_layer_matches_xla_cost_analysis():
    cfg = DecoderConfig(vocab_size=64, model_dim=128, num_layers=1, num_heads=4, num_kv_heads=1, head_dim=32,
                        mlp_dim=384)
    config = SpectronConfig(encoder=ConformerConfig(), decoder=cfg, acoustic=AcousticConfig())
    count = flops.step_flops(config, batch_size=2, prompt_len=32, text_len=16, cont_len=24)
    tokens = 2 * (8 + 16 + 24)
    mlp = GatedMLP(cfg.model_dim, cfg.mlp_dim, rngs=nnx.Rngs(0))
    graph, params = nnx.split(mlp)

    def loss(params, x):
        return jnp.sum(nnx.merge(graph, params)(x) ** 2)

    x = jax.ShapeDtypeStruct((1, tokens, cfg.model_dim), jnp.float32)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x)  # forward, weight and input gradients
    xla = float(grads.cost_analysis()["flops"])
    assert count.training["decoder/mlp"] == pytest.approx(xla, rel=0.05)


def test_w2v_bert_variant_counts_the_feature_projection_and_the_relative_key_table():
    import dataclasses

    encoder = dataclasses.replace(TINY.encoder, input_dim=160, frontend="feature_projection",
                                  position_encoding="relative_key", left_relative_distance=6,
                                  right_relative_distance=3)
    config = dataclasses.replace(TINY, encoder=encoder, acoustic=dataclasses.replace(TINY.acoustic, num_mel=160))
    count = flops.step_flops(config, **dict(SHAPES, prompt_len=10))  # no subsampling: 10 encoder frames
    rows = 2 * 10
    assert count.training["encoder/frontend"] == 2 * rows * 160 * 64 * 2  # first layer: no input gradient
    # per layer: content + values (3x each) and the query x table product over 6 + 3 + 1 distances (3x)
    assert count.training["encoder/attention"] == 2 * (2 * 2 * rows * 10 * 64 * 3 + 2 * rows * 10 * 64 * 3)
    assert count.training["encoder/attention_projections"] == 2 * 4 * 2 * rows * 64 * 64 * 3
