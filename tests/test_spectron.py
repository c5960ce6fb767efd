"""Spectron assembly and its functional interface: shapes, causality, padding, cached decoding, overfitting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spectron_jax.losses import LossWeights
from spectron_jax.models import acoustic
from spectron_jax.models.acoustic import AcousticConfig
from spectron_jax.models.conformer import ConformerConfig
from spectron_jax.models.decoder import DecoderConfig
from spectron_jax.models.spectron import Spectron, SpectronConfig
from spectron_jax.models.spectron_model import SpectronModel

MEL = 128
VOCAB = 64
SOS, EOS = 3, 1
BATCH, PROMPT_LEN, TEXT_LEN, CONT_LEN = 2, 16, 6, 8


def tiny_config(reduction_factor=1, stop_head=False, prenet_input="last_frame", dropout=0.0, conv_norm="layer",
                prenet_at_inference=False, **overrides) -> SpectronConfig:
    """A very small model; dropout off unless asked for."""
    encoder = ConformerConfig(model_dim=32, num_layers=1, num_heads=2, ffn_dim=64, conv_kernel_size=5,
                              subsampling_channels=4, attention_dropout=dropout, residual_dropout=dropout,
                              conv_dropout=dropout, conv_norm=conv_norm)
    decoder = DecoderConfig(vocab_size=VOCAB, model_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16, mlp_dim=128, dropout=dropout)
    acoustic_cfg = AcousticConfig(reduction_factor=reduction_factor, prenet_dims=(32,), prenet_dropout=dropout * 5,
                                  prenet_dropout_at_inference=prenet_at_inference, prenet_input=prenet_input,
                                  postnet_hidden=128, stop_head=stop_head)
    return SpectronConfig(encoder=encoder, decoder=decoder, acoustic=acoustic_cfg, **overrides)


def make_batch(seed=0, prompt_valid=(16, 11), text_valid=(6, 3), cont_valid=(8, 5), prompt_len=PROMPT_LEN,
               text_len=TEXT_LEN, cont_len=CONT_LEN) -> dict:
    """A zero-padded model batch (the batch contract) with the given valid lengths per row."""
    rng = np.random.default_rng(seed)
    b = len(prompt_valid)
    batch = {
        "prompt_frames": np.zeros((b, prompt_len, MEL), np.float32),
        "prompt_mask": np.zeros((b, prompt_len), np.int32),
        "text_inputs": np.zeros((b, text_len), np.int32),
        "text_targets": np.zeros((b, text_len), np.int32),
        "text_weights": np.zeros((b, text_len), np.float32),
        "cont_frames": np.zeros((b, cont_len, MEL), np.float32),
        "cont_mask": np.zeros((b, cont_len), np.int32),
    }
    for i in range(b):
        p, n, c = prompt_valid[i], text_valid[i], cont_valid[i]
        batch["prompt_frames"][i, :p] = rng.normal(size=(p, MEL))
        batch["prompt_mask"][i, :p] = 1
        tokens = rng.integers(4, VOCAB, n - 1)
        batch["text_inputs"][i, :n] = np.concatenate([[SOS], tokens])
        batch["text_targets"][i, :n] = np.concatenate([tokens, [EOS]])
        batch["text_weights"][i, :n] = 1.0
        batch["cont_frames"][i, :c] = rng.normal(size=(c, MEL))
        batch["cont_mask"][i, :c] = 1
    return batch


def with_garbage(batch: dict, seed=1) -> dict:
    """The batch with large random values / random token ids in every padded position."""
    rng = np.random.default_rng(seed)
    out = {k: v.copy() for k, v in batch.items()}
    pad = out["prompt_mask"] == 0
    out["prompt_frames"][pad] = rng.normal(scale=50.0, size=(pad.sum(), MEL))
    pad = out["cont_mask"] == 0
    out["cont_frames"][pad] = rng.normal(scale=50.0, size=(pad.sum(), MEL))
    pad = out["text_weights"] == 0
    out["text_inputs"][pad] = rng.integers(0, VOCAB, pad.sum())
    out["text_targets"][pad] = rng.integers(0, VOCAB, pad.sum())
    return out


def row(batch: dict, i: int, prompt_len: int, text_len: int, cont_len: int) -> dict:
    """Row i alone, cut to the given lengths (an unpadded layout when they equal its valid lengths)."""
    lengths = {"prompt": prompt_len, "text": text_len, "cont": cont_len}
    return {k: v[i:i + 1, :lengths[k.split("_")[0]]] for k, v in batch.items()}


class Harness:
    """A model, its params and jitted entry points, built once per configuration."""

    def __init__(self, config: SpectronConfig, seed: int = 0):
        self.config = config
        self.model = SpectronModel(config)
        self.params, self.state = self.model.init(seed)
        model = self.model
        self.forward = jax.jit(lambda params, batch: model.merge(params)(batch, deterministic=True))
        self.eval_fn = jax.jit(model.eval_fn)
        self.score = jax.jit(model.score_batch)


@pytest.fixture(scope="module")
def plain():
    return Harness(tiny_config())


@pytest.fixture(scope="module")
def grouped():
    """r = 2 with a stop head and a pre-net reading both frames of the previous group."""
    return Harness(tiny_config(reduction_factor=2, stop_head=True, prenet_input="all_frames"))


def test_output_shapes_and_layout(grouped):
    cfg, batch = grouped.config, make_batch()
    out = grouped.forward(grouped.params, batch)
    steps = CONT_LEN // 2
    assert out.text_logits.shape == (BATCH, TEXT_LEN, VOCAB) and out.text_logits.dtype == jnp.float32
    assert out.frames.shape == (BATCH, steps, 2, MEL)
    assert out.stop_logits.shape == (BATCH, steps)
    assert out.prefix_valid.shape == (BATCH, cfg.prefix_len(PROMPT_LEN)) == (BATCH, 4)
    # valid encoder frames: ceil(ceil(n / 2) / 2) of the valid prompt frames (16 -> 4, 11 -> 3)
    np.testing.assert_array_equal(np.asarray(out.prefix_valid).sum(1), [4, 3])
    # a step is valid when its output group holds a valid frame (5 valid frames -> 3 groups)
    np.testing.assert_array_equal(np.asarray(out.speech_valid).sum(1), [4, 3])
    assert grouped.model.cache_len(PROMPT_LEN, TEXT_LEN, CONT_LEN) == 4 + TEXT_LEN + steps
    module = grouped.model.make_module(0)
    counts = {name: sum(x.size for x in jax.tree.leaves(nnx.state(getattr(module, name), nnx.Param)))
              for name in ("encoder", "projection", "decoder", "prenet", "postnet", "stop_head")}
    assert counts["projection"] == 32 * 64 + 64
    assert counts["prenet"] == (2 * MEL) * 32 + 32 + 32 * 64 + 64  # all_frames reads r * mel inputs
    assert counts["stop_head"] == 64 + 1


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="num_mel"):
        SpectronConfig(acoustic=AcousticConfig(num_mel=80))
    with pytest.raises(ValueError, match="eos_id"):
        tiny_config(eos_id=VOCAB)
    with pytest.raises(ValueError, match="multiple"):
        tiny_config(reduction_factor=2).speech_steps(7)


def test_text_loss_ignores_the_spectrogram_after_it(plain):
    """Causality across the text→speech boundary, and inside the speech slots."""
    batch = make_batch()
    other = dict(batch, cont_frames=np.random.default_rng(5).normal(size=batch["cont_frames"].shape)
                 .astype(np.float32) * batch["cont_mask"][..., None])
    _, m1 = plain.eval_fn(plain.params, batch)
    _, m2 = plain.eval_fn(plain.params, other)
    for name in ("ce_text", "text_loss", "z_loss"):
        assert float(m1[name]) == float(m2[name]), name
    assert abs(float(m1["spec_total"]) - float(m2["spec_total"])) > 1e-3  # the speech part does see them

    # Frame group s is predicted from groups < s only: perturbing frames from group g on leaves the
    # outputs of steps 0..g unchanged and changes step g + 1.
    base = plain.forward(plain.params, batch)
    for g in (1, 4):
        bumped = dict(batch, cont_frames=batch["cont_frames"].copy())
        bumped["cont_frames"][:, g:] += 3.0
        out = plain.forward(plain.params, bumped)
        np.testing.assert_array_equal(np.asarray(out.text_logits), np.asarray(base.text_logits))
        np.testing.assert_allclose(out.frames[:, :g + 1], base.frames[:, :g + 1], atol=1e-6)
        assert float(jnp.max(jnp.abs(out.frames[0, g + 1] - base.frames[0, g + 1]))) > 1e-4


def test_text_loss_gradient_does_not_reach_continuation_frames(plain):
    batch = make_batch()

    def text_ce(cont_frames):
        return plain.model.eval_fn(plain.params, dict(batch, cont_frames=cont_frames))[1]["ce_text"]

    def spec(cont_frames):
        return plain.model.eval_fn(plain.params, dict(batch, cont_frames=cont_frames))[1]["spec_total"]

    frames = jnp.asarray(batch["cont_frames"])
    grad_text, grad_spec = jax.jit(lambda f: (jax.grad(text_ce)(f), jax.grad(spec)(f)))(frames)
    assert float(jnp.max(jnp.abs(grad_text))) == 0.0
    assert float(jnp.max(jnp.abs(grad_spec))) > 0.0


def test_padding_garbage_changes_nothing(grouped):
    batch = make_batch()
    dirty = with_garbage(batch)
    loss, metrics = grouped.eval_fn(grouped.params, batch)
    dirty_loss, dirty_metrics = grouped.eval_fn(grouped.params, dirty)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(dirty_loss), float(loss), rtol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(float(dirty_metrics[name]), float(metrics[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_padded_row_scores_equal_an_unpadded_row(plain):
    """Row 1 (11 prompt frames, 3 text slots, 5 frames) scores the same padded or laid out unpadded."""
    batch = with_garbage(make_batch())
    padded = plain.score(plain.params, batch)
    alone = plain.score(plain.params, row(batch, 1, 11, 3, 5))
    for name in padded:
        np.testing.assert_allclose(np.asarray(padded[name])[1], np.asarray(alone[name])[0], rtol=2e-5, atol=2e-5,
                                   err_msg=name)


def test_score_batch_matches_numpy(plain):
    batch = make_batch()
    scores = plain.score(plain.params, batch)
    out = plain.forward(plain.params, batch)
    logits = np.asarray(out.text_logits, np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs, batch["text_targets"][..., None], -1)[..., 0]
    expected_ll = (picked * batch["text_weights"]).sum(1)
    np.testing.assert_allclose(np.asarray(scores["text_log_likelihood"]), expected_ll, rtol=1e-5)
    pred = np.asarray(out.frames).reshape(BATCH, CONT_LEN, MEL)
    for i, valid in enumerate(batch["cont_mask"].sum(1)):
        expected_l1 = np.abs(pred[i, :valid] - batch["cont_frames"][i, :valid]).mean()
        np.testing.assert_allclose(float(scores["spectrogram_l1"][i]), expected_l1, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(scores["text_tokens"]), [6, 3])


@pytest.mark.parametrize("harness_name", ["plain", "grouped"])
def test_cached_decoding_reproduces_the_full_forward(harness_name, request):
    """encode + prefill (prefix, sos, first token) + text steps + speech steps == teacher-forced pass."""
    h = request.getfixturevalue(harness_name)
    model, params, r = h.model, h.params, h.config.reduction_factor
    batch = make_batch(seed=3)
    full = h.forward(params, batch)

    prefix, prefix_valid = jax.jit(model.encode_prompt)(params, batch["prompt_frames"], batch["prompt_mask"])
    cache = model.init_cache(BATCH, model.cache_len(PROMPT_LEN, TEXT_LEN, CONT_LEN))
    text_valid = batch["text_weights"] > 0
    k = 2
    logits, cache = jax.jit(model.prefill)(params, prefix, prefix_valid, batch["text_inputs"][:, :k],
                                           text_valid[:, :k], cache)
    text_logits = [logits[:, j] for j in range(k)]
    text_step = jax.jit(model.text_step)
    for j in range(k, TEXT_LEN):
        step_logits, cache = text_step(params, batch["text_inputs"][:, j], cache, text_valid[:, j])
        text_logits.append(step_logits)
    text_logits = np.stack([np.asarray(x) for x in text_logits], axis=1)

    groups = np.asarray(acoustic.group_frames(jnp.asarray(batch["cont_frames"]), r))
    step_valid = np.asarray(acoustic.group_mask(jnp.asarray(batch["cont_mask"]), r)) > 0
    speech_step = jax.jit(model.speech_step)
    frames, stops = [], []
    for s in range(CONT_LEN // r):
        previous = groups[:, s - 1] if s > 0 else np.full((BATCH, r, MEL), 7.0, np.float32)  # ignored at start
        out_frames, stop, cache = speech_step(params, previous, cache, start=np.full((BATCH,), s == 0),
                                              valid=step_valid[:, s])
        frames.append(np.asarray(out_frames))
        stops.append(None if stop is None else np.asarray(stop))
    frames = np.stack(frames, axis=1)
    assert int(cache.end_index) == model.cache_len(PROMPT_LEN, TEXT_LEN, CONT_LEN)

    np.testing.assert_allclose(text_logits[text_valid], np.asarray(full.text_logits)[text_valid], atol=1e-5)
    np.testing.assert_allclose(frames[step_valid], np.asarray(full.frames)[step_valid], atol=1e-5)
    if h.config.acoustic.stop_head:
        stops = np.stack(stops, axis=1)
        np.testing.assert_allclose(stops[step_valid], np.asarray(full.stop_logits)[step_valid], atol=1e-5)


def test_dropout_follows_the_rng_and_batch_norm_state_is_threaded():
    h = Harness(tiny_config(dropout=0.1, conv_norm="batch"))
    model, batch = h.model, make_batch()
    assert model.has_state
    with pytest.raises(ValueError, match="state"):
        model.loss_fn(h.params, batch, jax.random.key(0))
    step = jax.jit(jax.value_and_grad(model.loss_and_state_fn, has_aux=True))
    (a, (metrics, new_state)), grads = step(h.params, h.state, batch, jax.random.key(1))
    (b, _), _ = step(h.params, h.state, batch, jax.random.key(1))
    (c, _), _ = step(h.params, h.state, batch, jax.random.key(2))
    # dropout masks are a pure function of the key
    assert float(a) == float(b) and float(a) != float(c)
    assert float(a) == float(metrics["loss"])
    # the running statistics moved and come back as the new state; gradients cover the params only
    old = np.concatenate([np.ravel(x) for x in jax.tree.leaves(h.state)])
    new = np.concatenate([np.ravel(x) for x in jax.tree.leaves(new_state)])
    assert old.shape == new.shape and not np.allclose(old, new)
    assert jax.tree.structure(grads) == jax.tree.structure(h.params)


def test_tiny_model_overfits_one_batch():
    config = tiny_config(loss_weights=LossWeights())
    model = SpectronModel(config)
    params, _ = model.init(0)
    batch = make_batch(prompt_valid=(16, 16), text_valid=(6, 6), cont_valid=(8, 8))
    tx = optax.adam(3e-3)

    @jax.jit
    def train_step(params, opt_state, key):
        (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    first = None
    for i in range(150):
        params, opt_state, loss = train_step(params, opt_state, jax.random.key(i))
        first = float(loss) if first is None else first
    final, _ = model.eval_fn(params, batch)
    assert np.isfinite(first) and first > 5.0
    assert float(final) <= 0.1 * first, (first, float(final))


def test_module_is_an_nnx_module_with_logical_axes(plain, grouped):
    module = grouped.model.abstract_module()
    assert isinstance(module, Spectron)
    params = nnx.state(module, nnx.Param)
    missing = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = leaf.get_metadata().get("out_sharding")
        if axes is None or len(axes) != len(leaf.shape):
            missing.append(jax.tree_util.keystr(path))
    assert not missing, missing
    # the abstract module (built part by part) has the graph of a concrete one, so params merge into it
    concrete = grouped.model.make_module(1)
    assert grouped.model.split(concrete)[0] == grouped.model.graphdef
    assert jax.tree.structure(grouped.model.split(concrete)[1]) == jax.tree.structure(grouped.model.abstract_params)
    kernel = module.projection.kernel
    assert kernel.get_metadata()["out_sharding"] == (None, "embed")
    assert dataclasses.is_dataclass(plain.config)
