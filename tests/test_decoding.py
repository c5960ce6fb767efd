"""decoding.generate: cached generation == the uncached teacher-forced pass; padded-slot guard; pre-net masks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax import decoding
from spectron_jax.models.spectron_model import SpectronModel
from tests.test_spectron import EOS, MEL, SOS, tiny_config

VOCAB = 8  # small, so sampled text hits eos at different steps in different rows


def _model(r, stop_head=False, prenet_at_inference=False):
    cfg = tiny_config(reduction_factor=r, stop_head=stop_head, prenet_at_inference=prenet_at_inference)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, vocab_size=VOCAB),
                              acoustic=dataclasses.replace(cfg.acoustic, prenet_dropout=0.5))
    model = SpectronModel(cfg)
    params, _ = model.init(seed=1)
    return model, params


def _prompts(lengths=(16, 9, 12), length=16, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.normal(size=(len(lengths), length, MEL)).astype(np.float32)
    mask = np.zeros((len(lengths), length), np.int32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        frames[i, n:] = np.nan  # padded prompt frames must not matter
    return frames, mask


@pytest.mark.slow  # two compiles of generate + the teacher-forced pass: ~30 s each on 2 loaded cores
@pytest.mark.parametrize("r", [1, 2])
def test_cached_generation_equals_teacher_forced_forward(r):
    model, params = _model(r, stop_head=True)
    config = decoding.DecodeConfig(max_text_tokens=8, temperature=20.0, max_frames=8 * r, min_frames=r,
                                   frames_per_token=float(r), stop_threshold=1.0, keep_logits=True, seed=3)
    frames, mask = _prompts()
    out = decoding.to_host(decoding.generate(model, params, frames, mask, config))
    lengths, num_frames = out["text_lengths"], out["num_frames"]
    assert len(set(lengths.tolist())) > 1, lengths  # rows switch from text to speech at different steps
    assert len(set(num_frames.tolist())) > 1, num_frames

    # The teacher-forced row: [prefix | sos y_1..y_k | eos pre(g_0) ...] with the generated tokens and frames.
    b, T = len(lengths), config.max_text_tokens
    text_inputs = np.zeros((b, T + 1), np.int32)
    text_weights = np.zeros((b, T + 1), np.float32)
    cont_len = out["frames"].shape[1]
    cont_mask = np.zeros((b, cont_len), np.int32)
    for i in range(b):
        k = lengths[i]
        text_inputs[i, :k + 1] = [SOS] + out["text_tokens"][i, :k].tolist()
        text_weights[i, :k + 1] = 1
        cont_mask[i, :num_frames[i]] = 1
    batch = {"prompt_frames": np.nan_to_num(frames), "prompt_mask": mask, "text_inputs": text_inputs,
             "text_weights": text_weights, "cont_frames": out["frames"], "cont_mask": cont_mask}
    ref = model.merge(params)({k: jnp.asarray(v) for k, v in batch.items()}, deterministic=True)
    ref_logits, ref_frames = np.asarray(ref.text_logits), np.asarray(ref.frames)
    ref_stop = np.asarray(ref.stop_logits)
    for i in range(b):
        sampled = min(lengths[i] + 1, T)
        np.testing.assert_allclose(out["text_logits"][i, :sampled], ref_logits[i, :sampled], atol=1e-5, rtol=1e-5)
        steps = num_frames[i] // r
        np.testing.assert_allclose(out["frames"][i, :num_frames[i]],
                                   ref_frames[i, :steps].reshape(-1, MEL), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(out["stop_logits"][i, :steps], ref_stop[i, :steps], atol=1e-5, rtol=1e-5)
        # The sampled eos ends the text (or the row reached max_text_tokens).
        assert out["text_ended"][i] == (EOS in out["text_tokens"][i].tolist())


def test_first_speech_input_is_the_eos_embedding():
    """Speech step 0 of generation must equal a text step that feeds eos (the same slot)."""
    model, params = _model(1)
    config = decoding.DecodeConfig(max_text_tokens=1, max_frames=1, min_frames=1, frames_per_token=1.0)
    frames, mask = _prompts(lengths=(16,))
    out = decoding.to_host(decoding.generate(model, params, frames, mask, config))
    token = int(out["text_tokens"][0, 0])
    prefix, valid = model.encode_prompt(params, jnp.nan_to_num(jnp.asarray(frames)), jnp.asarray(mask))
    cache = model.init_cache(1, 32)
    inputs = jnp.asarray([[SOS] + ([token] if token != EOS else [])], jnp.int32)
    _, cache = model.prefill(params, prefix, valid, inputs, jnp.ones(inputs.shape, bool), cache)
    module = model.merge(params)
    eos_embedding = module.decoder.embed(jnp.full((1, 1), EOS, jnp.int32))
    hidden, _ = module._step(eos_embedding, jnp.ones((1,), bool), cache)
    expected = np.asarray(module.postnet(hidden))[0, 0]
    np.testing.assert_allclose(out["frames"][0, :1], expected, atol=1e-5, rtol=1e-5)


def test_padded_slots_with_out_of_vocab_ids_and_nan_frames_leave_valid_outputs_unchanged():
    model, params = _model(1)
    rng = np.random.default_rng(0)
    b, P, T, C = 2, 16, 5, 6
    batch = {"prompt_frames": rng.normal(size=(b, P, MEL)).astype(np.float32),
             "prompt_mask": np.array([[1] * P, [1] * 10 + [0] * 6], np.int32),
             "text_inputs": np.array([[SOS, 4, 5, 6, 7], [SOS, 4, 0, 0, 0]], np.int32),
             "text_weights": np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.float32),
             "cont_frames": rng.normal(size=(b, C, MEL)).astype(np.float32),
             "cont_mask": np.array([[1] * C, [1] * 3 + [0] * 3], np.int32)}
    dirty = {k: v.copy() for k, v in batch.items()}
    dirty["text_inputs"][1, 2:] = [VOCAB + 5, 10**6, -3]
    dirty["cont_frames"][1, 3:] = np.nan
    dirty["prompt_frames"][1, 10:] = np.nan
    module = model.merge(params)
    clean_out = module({k: jnp.asarray(v) for k, v in batch.items()}, deterministic=True)
    dirty_out = module({k: jnp.asarray(v) for k, v in dirty.items()}, deterministic=True)
    np.testing.assert_allclose(np.asarray(dirty_out.text_logits)[1, :2], np.asarray(clean_out.text_logits)[1, :2],
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(dirty_out.frames)[1, :3], np.asarray(clean_out.frames)[1, :3], atol=1e-6)
    assert np.all(np.isfinite(np.asarray(dirty_out.frames)[0]))


def test_prenet_dropout_draws_a_fresh_mask_each_step():
    model, params = _model(1, prenet_at_inference=True)
    cache = model.init_cache(1, 8)
    previous = jnp.ones((1, 1, MEL), jnp.float32)
    with pytest.raises(ValueError, match="rng"):
        model.speech_step(params, previous, cache)
    a = model.speech_step(params, previous, cache, rng=jax.random.key(0))[0]
    b = model.speech_step(params, previous, cache, rng=jax.random.key(1))[0]
    a2 = model.speech_step(params, previous, cache, rng=jax.random.key(0))[0]
    assert not np.allclose(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))


def test_frame_budget_counts_the_tokens_after_the_separator():
    tokens = jnp.asarray([[5, 6, 4, 7, 8, 0], [5, 6, 7, 0, 0, 0], [4, 9, 9, 9, 0, 0], [5, 6, 7, 4, 4, 0]], jnp.int32)
    lengths = jnp.asarray([5, 3, 4, 3], jnp.int32)  # row 4: its separators lie past its length
    np.testing.assert_array_equal(decoding.continuation_lengths(tokens, lengths, 4), [2, 3, 3, 3])
    np.testing.assert_array_equal(decoding.continuation_lengths(tokens, lengths, None), lengths)


def _sampling_config(**overrides):
    values = dict(max_text_tokens=6, temperature=1.5, top_k=5, max_frames=12, min_frames=4, frames_per_token=2.0,
                  stop_threshold=0.9, seed=3)
    values.update(overrides)
    return decoding.DecodeConfig(**values)


def _row(out, i):
    return {k: v[i] for k, v in out.items()}


def _assert_same_row(a, b):
    for name in ("text_tokens", "text_lengths", "num_frames", "stopped"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    n = int(a["num_frames"])
    np.testing.assert_allclose(a["frames"][:n], b["frames"][:n], atol=1e-4, rtol=0, err_msg="frames")


@pytest.mark.slow  # two compiles (batch 3 and batch 1) of generate: ~20 s each on 2 loaded cores
def test_a_rows_output_depends_on_its_prompt_seed_and_id_only():
    """With pre-net dropout on and sampling: alone == in a batch == at another position == after a reorder,
    padding dummies change nothing, and another id (or seed) gives another draw."""
    model, params = _model(2, stop_head=True, prenet_at_inference=True)
    config = _sampling_config()
    frames, mask = _prompts()
    batch = decoding.to_host(decoding.generate(model, params, frames, mask, config))  # ids 0, 1, 2
    for i in range(3):  # alone (batch of 1, its own id)
        alone = decoding.to_host(decoding.generate(model, params, frames[i:i + 1], mask[i:i + 1], config,
                                                   row_ids=[i]))
        _assert_same_row(_row(alone, 0), _row(batch, i))
    # Reordered, one row twice under its own id, and a dummy row: the same batch shape, other positions.
    order = [2, 0, 2]
    mixed = decoding.to_host(decoding.generate(model, params, frames[order], mask[order], config,
                                               row_ids=[2, 0, 2], row_valid=[True, True, False]))
    _assert_same_row(_row(mixed, 0), _row(batch, 2))
    _assert_same_row(_row(mixed, 1), _row(batch, 0))
    assert mixed["num_frames"][2] == 0 and mixed["text_lengths"][2] == 0  # the dummy generates nothing
    # The same prompt under three ids (or another seed) draws differently: the keys are not shared.
    same = decoding.to_host(decoding.generate(model, params, frames[[0, 0, 0]], mask[[0, 0, 0]], config,
                                              row_ids=[0, 1, 2]))
    _assert_same_row(_row(same, 0), _row(batch, 0))
    assert not (np.array_equal(same["text_tokens"][0], same["text_tokens"][1])
                and np.allclose(same["frames"][0], same["frames"][1]))
    reseeded = decoding.to_host(decoding.generate(model, params, frames, mask, dataclasses.replace(config, seed=4)))
    assert not np.allclose(reseeded["frames"], batch["frames"])
    # Greedy text with dropout: the pre-net mask alone makes rows differ, and is per row as well.
    greedy = dataclasses.replace(config, temperature=0.0)
    g_batch = decoding.to_host(decoding.generate(model, params, frames[[0, 0, 0]], mask[[0, 0, 0]], greedy,
                                                 row_ids=[5, 6, 5]))
    _assert_same_row(_row(g_batch, 0), _row(g_batch, 2))
    assert not np.allclose(g_batch["frames"][0], g_batch["frames"][1])


def test_traced_knobs_reuse_one_program():
    """Seed, temperature, top-k, top-p, stop threshold, min_frames and frames_per_token do not recompile."""
    model, params = _model(1, stop_head=True, prenet_at_inference=True)
    frames, mask = _prompts()
    base = _sampling_config(max_frames=6, max_text_tokens=3)
    before = decoding.compiled_programs()
    outs = []
    for knobs in [{}, {"seed": 11}, {"temperature": 0.0}, {"temperature": 0.7, "top_k": 2, "top_p": 0.5},
                  {"top_k": 0, "top_p": 0.3}, {"stop_threshold": 0.0, "min_frames": 2}, {"frames_per_token": 0.5}]:
        outs.append(decoding.to_host(decoding.generate(model, params, frames, mask,
                                                       dataclasses.replace(base, **knobs))))
    assert decoding.compiled_programs() - before == 1
    # The knobs took effect: another seed draws differently; threshold 0 stops every row at min_frames.
    assert not np.allclose(outs[0]["frames"], outs[1]["frames"])
    assert np.all(outs[5]["stopped"]) and np.all(outs[5]["num_frames"] == 2)


def test_sample_logits_truncation_matches_a_direct_reference():
    """top-k / top-p with traced scalars: the support of the draws is the reference support."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 16)).astype(np.float32) * 2
    keys = jax.random.split(jax.random.key(0), 4)
    sample = jax.jit(decoding.sample_logits)
    for top_k, top_p in [(3, 1.0), (0, 0.6), (5, 0.5), (1, 1.0)]:
        allowed = []
        for row in logits:
            order = np.argsort(-row)
            keep = order[:top_k] if top_k else order
            p = np.exp(row[keep] - row[keep].max())
            p /= p.sum()
            before = np.cumsum(p) - p
            allowed.append(set(keep[before < top_p].tolist()))
        seen = [set() for _ in range(4)]
        for step in range(60):
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
            tokens = np.asarray(sample(logits, step_keys, 1.0, top_k, top_p))
            for i, t in enumerate(tokens):
                seen[i].add(int(t))
        for i in range(4):
            assert seen[i] <= allowed[i], (top_k, top_p, i, seen[i], allowed[i])
            if len(allowed[i]) > 1:
                assert len(seen[i]) > 1
    np.testing.assert_array_equal(np.asarray(sample(logits, keys, 0.0, 3, 0.5)), np.argmax(logits, axis=-1))


def test_min_frames_bounds_the_stop_head_and_budget_ends_inside_the_last_group():
    model, params = _model(2, stop_head=True)
    frames, mask = _prompts()
    config = decoding.DecodeConfig(max_text_tokens=2, max_frames=12, min_frames=6, frames_per_token=1.0,
                                   stop_threshold=0.0)  # the stop head fires at every step
    out = decoding.to_host(decoding.generate(model, params, frames, mask, config))
    assert np.all(out["stopped"]) and np.all(out["num_frames"] == 6), out["num_frames"]
    # Budget of 5 frames at r = 2: three steps run, the sixth frame is not emitted.
    budget = dataclasses.replace(config, min_frames=5, max_frames=5, stop_threshold=1.0)
    out = decoding.to_host(decoding.generate(model, params, frames, mask, budget))
    assert not np.any(out["stopped"]) and np.all(out["num_frames"] == 5), out["num_frames"]
