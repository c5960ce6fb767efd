"""Tests of the pre-net, post-net, stop head and reduction-factor helpers against NumPy references."""

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from spectron_jax.models import acoustic

MEL = 5
KNOWN_AXES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "mel", "prenet", "conv_kernel",
              "conv_in", "conv_out", "norm", "relpos", None}


def _padded_frames(rng, lengths, total, mel=MEL):
    """Frames [batch, total, mel] with garbage beyond each row's length, and the matching mask."""
    batch = len(lengths)
    frames = rng.normal(size=(batch, total, mel)).astype(np.float32)
    mask = np.zeros((batch, total), np.int32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        frames[b, n:] = rng.uniform(-1e3, 1e3, size=(total - n, mel))
    return frames, mask


def _expected_prenet_inputs(frames, mask, r, mode):
    """Teacher-forced inputs built step by step with explicit loops."""
    batch, total, mel = frames.shape
    steps = total // r
    width = mel if mode == "last_frame" else r * mel
    inputs = np.zeros((batch, steps, width), np.float32)
    step_mask = np.zeros((batch, steps), np.int32)
    for b in range(batch):
        for s in range(steps):
            step_mask[b, s] = int(any(mask[b, s * r + j] for j in range(r)))
            if s == 0:
                continue  # placeholder for the eos embedding
            group = [frames[b, (s - 1) * r + j] if mask[b, (s - 1) * r + j] else np.zeros(mel)
                     for j in range(r)]
            inputs[b, s] = group[-1] if mode == "last_frame" else np.concatenate(group)
    return inputs, step_mask


def _expected_stop_targets(mask, r):
    batch, total = mask.shape
    steps = total // r
    out = np.zeros((batch, steps), np.float32)
    for b in range(batch):
        last = -1
        for s in range(steps):
            if any(mask[b, s * r + j] for j in range(r)):
                last = s
        if last >= 0:
            out[b, last] = 1.0
    return out


@pytest.mark.parametrize("r", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["last_frame", "all_frames"])
def test_prenet_inputs_match_loops(r, mode):
    rng = np.random.default_rng(10 * r + len(mode))
    total = 6 * r
    lengths = [total, total - 1, 2 * r + 1, 1, 0]
    frames, mask = _padded_frames(rng, lengths, total)
    inputs, step_mask = acoustic.prenet_inputs(jnp.asarray(frames), jnp.asarray(mask), r, mode)
    want_inputs, want_mask = _expected_prenet_inputs(frames, mask, r, mode)
    np.testing.assert_allclose(np.asarray(inputs), want_inputs, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(step_mask), want_mask)
    np.testing.assert_array_equal(np.asarray(acoustic.group_mask(jnp.asarray(mask), r)), want_mask)


def test_prenet_inputs_small_literal_case():
    # r = 2, one row of 3 valid frames (values 10, 20, 30) padded to 6.
    frames = np.array([[10.0, 20.0, 30.0, 99.0, 99.0, 99.0]], np.float32)[..., None]
    mask = np.array([[1, 1, 1, 0, 0, 0]], np.int32)
    last, step_mask = acoustic.prenet_inputs(frames, mask, 2, "last_frame")
    both, _ = acoustic.prenet_inputs(frames, mask, 2, "all_frames")
    np.testing.assert_array_equal(np.asarray(last)[0, :, 0], [0.0, 20.0, 0.0])
    np.testing.assert_array_equal(np.asarray(both)[0], [[0.0, 0.0], [10.0, 20.0], [30.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(step_mask)[0], [1, 1, 0])
    np.testing.assert_array_equal(np.asarray(acoustic.stop_targets(mask, 2))[0], [0.0, 1.0, 0.0])


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_stop_targets_match_loops(r):
    rng = np.random.default_rng(r)
    total = 5 * r
    lengths = [total, total - r + 1, r, 1, 0]
    _, mask = _padded_frames(rng, lengths, total)
    got = acoustic.stop_targets(jnp.asarray(mask), r)
    np.testing.assert_array_equal(np.asarray(got), _expected_stop_targets(mask, r))
    assert got.dtype == jnp.float32


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_group_and_flatten_are_inverse_reshapes(r):
    rng = np.random.default_rng(r)
    frames = rng.normal(size=(2, 4 * r, MEL)).astype(np.float32)
    groups = np.asarray(acoustic.group_frames(jnp.asarray(frames), r))
    assert groups.shape == (2, 4, r, MEL)
    for s in range(4):
        for j in range(r):
            np.testing.assert_array_equal(groups[:, s, j], frames[:, s * r + j])
    np.testing.assert_array_equal(np.asarray(acoustic.flatten_groups(jnp.asarray(groups))), frames)


def test_pad_to_multiple_and_grouping_errors():
    frames = np.ones((2, 7, MEL), np.float32)
    mask = np.ones((2, 7), np.int32)
    padded, padded_mask = acoustic.pad_to_multiple(jnp.asarray(frames), jnp.asarray(mask), 3)
    assert padded.shape == (2, 9, MEL) and padded_mask.shape == (2, 9)
    np.testing.assert_array_equal(np.asarray(padded)[:, 7:], 0.0)
    np.testing.assert_array_equal(np.asarray(padded_mask).sum(axis=1), [7, 7])
    with pytest.raises(ValueError, match="multiple of the reduction factor 3"):
        acoustic.group_frames(jnp.asarray(frames), 3)
    with pytest.raises(ValueError, match="prenet input mode"):
        acoustic.prenet_inputs(jnp.asarray(frames), jnp.asarray(mask), 1, "every_frame")


@pytest.mark.parametrize("kwargs, message", [
    ({"reduction_factor": 5}, "reduction_factor"),
    ({"prenet_input": "first_frame"}, "prenet_input"),
    ({"prenet_dropout": 1.0}, "prenet_dropout"),
    ({"prenet_dims": ()}, "prenet_dims"),
    ({"postnet_hidden": -1}, "postnet_hidden"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        acoustic.AcousticConfig(**kwargs)


def _linear(layer, x):
    return x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])


def _numpy_prenet(prenet, x):
    for layer in prenet.hidden_layers:
        x = np.maximum(_linear(layer, x), 0.0)
    return _linear(prenet.output_layer, x)


@pytest.mark.parametrize("mode, r", [("last_frame", 1), ("last_frame", 3), ("all_frames", 2)])
def test_prenet_without_dropout_matches_numpy(mode, r):
    config = acoustic.AcousticConfig(num_mel=MEL, reduction_factor=r, prenet_dims=(7, 6),
                                     prenet_input=mode, prenet_dropout_at_inference=False)
    prenet = acoustic.PreNet(config, 9, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 4, config.prenet_input_dim)).astype(np.float32)
    prenet.eval()
    first = np.asarray(prenet(jnp.asarray(x)))
    second = np.asarray(prenet(jnp.asarray(x)))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, _numpy_prenet(prenet, x), rtol=1e-5, atol=1e-5)
    assert first.shape == (2, 4, 9)
    # An explicit flag overrides the mode: deterministic=False draws masks even in eval mode.
    assert not np.allclose(np.asarray(prenet(jnp.asarray(x), deterministic=False)), first)
    with pytest.raises(ValueError, match="PreNet expects"):
        prenet(jnp.ones((2, 4, config.prenet_input_dim + 1)))


def test_prenet_dropout_stays_on_at_inference_when_configured():
    config = acoustic.AcousticConfig(num_mel=MEL, prenet_dims=(64,), prenet_dropout=0.5,
                                     prenet_dropout_at_inference=True)
    prenet = acoustic.PreNet(config, 3, rngs=nnx.Rngs(1))
    prenet.eval()
    assert prenet.deterministic and prenet.dropout_active()
    frame = np.random.default_rng(1).normal(size=(MEL,)).astype(np.float32)
    x = jnp.asarray(np.broadcast_to(frame, (1, 4000, MEL)))
    out = np.asarray(prenet(x))[0]  # [4000, 3], one dropout mask per step
    reference = _numpy_prenet(prenet, frame[None])[0]
    assert np.std(out, axis=0).min() > 1e-3  # the steps differ: masks were drawn
    # One hidden layer: the output is linear in the dropped-out hidden units, so with inverted
    # dropout (scale 1 / (1 − p)) its mean over masks equals the dropout-free output.
    stderr = np.std(out, axis=0) / np.sqrt(out.shape[0])
    np.testing.assert_array_less(np.abs(out.mean(axis=0) - reference), 5 * stderr + 1e-4)
    # Training mode also drops; switching the knob off makes eval mode deterministic.
    prenet.train()
    assert prenet.dropout_active()
    off = acoustic.PreNet(acoustic.AcousticConfig(num_mel=MEL, prenet_dims=(64,),
                                                  prenet_dropout_at_inference=False), 3, rngs=nnx.Rngs(1))
    off.eval()
    assert not off.dropout_active()
    np.testing.assert_allclose(np.asarray(off(x))[0], np.broadcast_to(reference, (4000, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("postnet_hidden", [0, 11])
@pytest.mark.parametrize("r", [1, 2])
def test_postnet_and_stop_head_match_numpy(postnet_hidden, r):
    config = acoustic.AcousticConfig(num_mel=MEL, reduction_factor=r, postnet_hidden=postnet_hidden,
                                     stop_head=True)
    postnet = acoustic.PostNet(config, 8, rngs=nnx.Rngs(2))
    stop = acoustic.StopHead(config, 8, rngs=nnx.Rngs(3))
    hidden = np.random.default_rng(2).normal(size=(3, 4, 8)).astype(np.float32)
    frames = np.asarray(postnet(jnp.asarray(hidden)))
    x = hidden
    if postnet_hidden:
        x = np.maximum(_linear(postnet.hidden_layer, x), 0.0)
    flat = _linear(postnet.output_layer, x)  # [3, 4, r * mel]
    assert frames.shape == (3, 4, r, MEL)
    for j in range(r):
        np.testing.assert_allclose(frames[:, :, j], flat[:, :, j * MEL:(j + 1) * MEL], rtol=1e-5, atol=1e-5)
    logits = np.asarray(stop(jnp.asarray(hidden)))
    assert logits.shape == (3, 4)
    np.testing.assert_allclose(logits, _linear(stop.projection, hidden)[..., 0], rtol=1e-5, atol=1e-5)


def test_params_carry_logical_axis_names():
    config = acoustic.AcousticConfig(num_mel=MEL, reduction_factor=2, prenet_dims=(6, 6, 6),
                                     prenet_input="all_frames")
    modules = {
        "prenet": acoustic.PreNet(config, 8, rngs=nnx.Rngs(0)),
        "postnet": acoustic.PostNet(config, 8, rngs=nnx.Rngs(0)),
        "stop": acoustic.StopHead(config, 8, rngs=nnx.Rngs(0)),
    }
    seen = set()
    for module in modules.values():
        for _, param in nnx.iter_graph(module):
            if not isinstance(param, nnx.Param):
                continue
            names = param.get_metadata()["out_sharding"]
            assert len(names) == param[...].ndim
            assert set(names) <= KNOWN_AXES
            named = [n for n in names if n is not None]
            assert len(named) == len(set(named)), names  # no axis named twice in one spec
            seen.update(named)
    assert {"mel", "prenet", "embed", "mlp"} <= seen
    kernel = modules["prenet"].hidden_layers[0].kernel
    assert kernel.get_metadata()["out_sharding"] == ("mel", "prenet") and kernel[...].shape == (2 * MEL, 6)


def test_modules_build_abstractly_and_run_under_jit():
    config = acoustic.AcousticConfig(num_mel=MEL, prenet_dims=(6, 6), dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: acoustic.PreNet(config, 8, rngs=nnx.Rngs(0)))
    assert abstract.output_layer.kernel.get_value().shape == (6, 8)
    prenet = acoustic.PreNet(config, 8, rngs=nnx.Rngs(0))

    @nnx.jit
    def apply(module, x):
        return module(x)

    out = apply(prenet, jnp.ones((2, 3, MEL)))
    assert out.shape == (2, 3, 8) and out.dtype == jnp.bfloat16
    again = apply(prenet, jnp.ones((2, 3, MEL)))
    assert not np.array_equal(np.asarray(out, np.float32), np.asarray(again, np.float32))  # fresh masks per call
