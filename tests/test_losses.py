"""Tests of the joint loss: every term against an independent NumPy re-computation written with loops."""

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from spectron_jax import losses
from spectron_jax.models import acoustic

MEL = 6
VOCAB = 11


# ------------------------------------------------------------------------------------------------
# NumPy references (loops over rows, frames and bins; no shared code with the library)
# ------------------------------------------------------------------------------------------------


def np_l12(errors):
    """mean |e| + mean e² of a list of scalars (0 for an empty list)."""
    if not errors:
        return 0.0
    e = np.array(errors, np.float64)
    return float(np.mean(np.abs(e)) + np.mean(e * e))


def np_spectrogram_terms(pred, target, mask, k_max):
    batch, total, mel = pred.shape
    frames, freq = [], []
    time = {k: [] for k in range(1, k_max + 1)}
    for b in range(batch):
        for t in range(total):
            if not mask[b, t]:
                continue
            for m in range(mel):
                frames.append(pred[b, t, m] - target[b, t, m])
            for m in range(mel - 1):
                freq.append((pred[b, t, m + 1] - pred[b, t, m]) - (target[b, t, m + 1] - target[b, t, m]))
            for k in range(1, k_max + 1):
                if t + k < total and mask[b, t + k]:
                    for m in range(mel):
                        time[k].append((pred[b, t + k, m] - pred[b, t, m]) - (target[b, t + k, m] - target[b, t, m]))
    terms = {"spec_frames": np_l12(frames), "spec_freq_delta": np_l12(freq)}
    for k in range(1, k_max + 1):
        terms[f"spec_time_delta_{k}"] = np_l12(time[k])
    terms["spec_time_delta"] = sum(terms[f"spec_time_delta_{k}"] for k in range(1, k_max + 1))
    return terms


def np_log_softmax_row(row):
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_z for v in row], log_z


def np_cross_entropy(logits, targets, weights, z_coeff):
    sum_loss = sum_z = sum_w = 0.0
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            w = float(weights[b, i])
            sum_w += w
            if w == 0.0:
                continue
            log_probs, log_z = np_log_softmax_row([float(v) for v in logits[b, i]])
            sum_loss += w * (-log_probs[targets[b, i]] + z_coeff * log_z ** 2)
            sum_z += w * z_coeff * log_z ** 2
    return sum_loss, sum_z, sum_w


def np_stop_loss(logits, targets, step_mask):
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for s in range(logits.shape[1]):
            if step_mask[b, s]:
                p = 1.0 / (1.0 + math.exp(-float(logits[b, s])))
                z = float(targets[b, s])
                total -= z * math.log(p) + (1 - z) * math.log(1 - p)
                count += 1
    return total / count if count else 0.0


# ------------------------------------------------------------------------------------------------
# Random padded inputs
# ------------------------------------------------------------------------------------------------


def make_spectrograms(rng, lengths, r, garbage=1e3):
    """pred [b, T, mel] built as post-net groups, target, mask; T = max length padded to a multiple of r."""
    batch = len(lengths)
    total = -(-max(lengths) // r) * r
    target = rng.normal(size=(batch, total, MEL)).astype(np.float32)
    mask = np.zeros((batch, total), np.int32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    target, mask = (np.asarray(a) for a in acoustic.pad_to_multiple(jnp.asarray(target), jnp.asarray(mask), r))
    groups = rng.normal(size=(batch, total // r, r, MEL)).astype(np.float32)
    pred = np.asarray(acoustic.flatten_groups(jnp.asarray(groups)))
    return pred, target, mask


def with_garbage(array, mask, rng, value=None):
    out = np.array(array, copy=True)
    invalid = mask == 0
    fill = rng.uniform(-1e4, 1e4, size=out.shape).astype(out.dtype) if value is None else value
    out[invalid] = fill[invalid] if value is None else value
    return out


def make_text(rng, lengths, text_len):
    batch = len(lengths)
    logits = (3.0 * rng.normal(size=(batch, text_len, VOCAB))).astype(np.float32)
    targets = np.zeros((batch, text_len), np.int32)
    weights = np.zeros((batch, text_len), np.float32)
    segments = np.zeros((batch, text_len), np.int32)
    for b, n in enumerate(lengths):
        targets[b, :n] = rng.integers(3, VOCAB, size=n)
        targets[b, n - 1] = 1  # eos
        weights[b, :n] = 1.0
        split = max(1, n // 2)
        segments[b, :split] = 1
        segments[b, split:n] = 2
    return logits, targets, weights, segments


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k_max", [1, 2, 3])
@pytest.mark.parametrize("r", [1, 2])
def test_spectrogram_terms_match_numpy(k_max, r):
    rng = np.random.default_rng(100 * k_max + r)
    pred, target, mask = make_spectrograms(rng, [9, 5, 2, 7], r)
    got = losses.spectrogram_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), k_max,
                                  frames_weight=0.5, freq_delta_weight=2.0, time_delta_weight=0.25)
    want = np_spectrogram_terms(pred, target, mask, k_max)
    for name, value in want.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=2e-5, err_msg=name)
    want_total = 0.5 * want["spec_frames"] + 2.0 * want["spec_freq_delta"] + 0.25 * want["spec_time_delta"]
    np.testing.assert_allclose(float(got["spec_total"]), want_total, rtol=2e-5)
    assert float(got["num_frames"]) == mask.sum()
    assert f"spec_time_delta_{k_max + 1}" not in got


@pytest.mark.parametrize("r", [1, 2])
def test_padded_frames_do_not_change_any_term(r):
    rng = np.random.default_rng(7 + r)
    pred, target, mask = make_spectrograms(rng, [8, 3, 6], r)
    clean = losses.spectrogram_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), 3)
    for fill in (None, np.nan, np.inf):
        dirty = losses.spectrogram_loss(jnp.asarray(with_garbage(pred, mask, rng, fill)),
                                        jnp.asarray(with_garbage(target, mask, rng, fill)),
                                        jnp.asarray(mask), 3)
        for name in clean:
            assert float(dirty[name]) == float(clean[name]), (name, fill)


def test_spectrogram_gradient_is_zero_at_padded_frames():
    rng = np.random.default_rng(3)
    pred, target, mask = make_spectrograms(rng, [7, 4, 1], 1)
    pred = with_garbage(pred, mask, rng, np.nan)

    def total(p):
        return losses.spectrogram_loss(p, jnp.asarray(target), jnp.asarray(mask), 3)["spec_total"]

    grad = np.asarray(jax.grad(total)(jnp.asarray(pred)))
    assert np.all(grad[mask == 0] == 0.0)
    assert np.all(np.isfinite(grad))
    assert np.all(np.abs(grad[mask == 1]).sum(axis=-1) > 0)


def test_spectrogram_handles_rows_without_valid_frames_and_bad_shapes():
    pred = jnp.ones((2, 4, MEL))
    got = losses.spectrogram_loss(pred, jnp.zeros((2, 4, MEL)), jnp.zeros((2, 4), jnp.int32), 3)
    assert all(float(v) == 0.0 for v in got.values())
    with pytest.raises(ValueError, match="spectrogram_loss expects"):
        losses.spectrogram_loss(pred, jnp.zeros((2, 5, MEL)), jnp.ones((2, 4)), 3)


@pytest.mark.parametrize("z_coeff", [0.0, 1e-4, 0.1])
def test_weighted_cross_entropy_matches_numpy(z_coeff):
    rng = np.random.default_rng(5)
    logits, targets, weights, _ = make_text(rng, [6, 3, 1], 7)
    weights[0, 2] = 0.5  # a fractional weight is summed as such
    got = losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), z_coeff)
    want = np_cross_entropy(logits, targets, weights, z_coeff)
    for g, w in zip(got, want):
        np.testing.assert_allclose(float(g), w, rtol=1e-5, atol=1e-6)
    assert all(g.dtype == jnp.float32 for g in got)


def test_cross_entropy_ignores_zero_weight_positions():
    rng = np.random.default_rng(6)
    logits, targets, weights, _ = make_text(rng, [5, 2], 6)
    clean = losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), 1e-3)
    dirty_logits = np.where(weights[..., None] == 0, np.float32(np.nan), logits).astype(np.float32)
    dirty_targets = np.where(weights == 0, 10 ** 6, targets).astype(np.int32)  # out of the vocabulary
    dirty = losses.weighted_cross_entropy(jnp.asarray(dirty_logits), jnp.asarray(dirty_targets),
                                          jnp.asarray(weights), 1e-3)
    for c, d in zip(clean, dirty):
        assert float(c) == float(d)


def test_cross_entropy_in_bfloat16_is_computed_in_float32():
    rng = np.random.default_rng(8)
    logits, targets, weights, _ = make_text(rng, [4], 5)
    low = jnp.asarray(logits, jnp.bfloat16)
    got = losses.weighted_cross_entropy(low, jnp.asarray(targets), jnp.asarray(weights))
    want = np_cross_entropy(np.asarray(low.astype(jnp.float32)), targets, weights, 0.0)
    np.testing.assert_allclose(float(got[0]), want[0], rtol=1e-5)


def test_stop_loss_matches_numpy():
    rng = np.random.default_rng(9)
    _, _, mask = make_spectrograms(rng, [8, 5, 2], 2)
    step_mask = np.asarray(acoustic.group_mask(jnp.asarray(mask), 2))
    targets = np.asarray(acoustic.stop_targets(jnp.asarray(mask), 2))
    logits = (4.0 * rng.normal(size=targets.shape)).astype(np.float32)
    logits[step_mask == 0] = np.nan
    got = losses.stop_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(step_mask))
    np.testing.assert_allclose(float(got), np_stop_loss(logits, targets, step_mask), rtol=1e-5)


def _batch_and_outputs(rng, r, with_segments=True, with_stop=True):
    text_lengths = [6, 4, 2]
    logits, targets, text_weights, segments = make_text(rng, text_lengths, 7)
    pred, cont, mask = make_spectrograms(rng, [9, 4, 6], r)
    batch = {
        "text_inputs": np.zeros_like(targets),
        "text_targets": targets,
        "text_weights": text_weights,
        "cont_frames": cont,
        "cont_mask": mask,
        "prompt_frames": np.zeros((3, 4, MEL), np.float32),
        "prompt_mask": np.ones((3, 4), np.int32),
    }
    if with_segments:
        batch["text_segments"] = segments
    stop_logits = rng.normal(size=(3, mask.shape[1] // r)).astype(np.float32) if with_stop else None
    return logits, batch, pred, stop_logits


@pytest.mark.parametrize("r", [1, 2])
def test_spectron_loss_combines_terms_like_numpy(r):
    rng = np.random.default_rng(20 + r)
    logits, batch, pred, stop_logits = _batch_and_outputs(rng, r)
    weights = losses.LossWeights(text=0.7, asr=2.0, lm=0.5, spectrogram=1.5, spec_frames=1.0, freq_delta=0.3,
                                 time_delta=0.2, stop=0.9, z_loss=1e-2)
    grouped_pred = np.asarray(acoustic.group_frames(jnp.asarray(pred), r))  # what the post-net emits
    jitted = jax.jit(losses.spectron_loss, static_argnames=("weights", "max_time_delta_order"))
    total, metrics = jitted(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in batch.items()},
                            jnp.asarray(grouped_pred), jnp.asarray(stop_logits), weights=weights,
                            max_time_delta_order=3)

    targets, text_weights, segments = batch["text_targets"], batch["text_weights"], batch["text_segments"]
    n_tokens = text_weights.sum()
    ce_sum, _, _ = np_cross_entropy(logits, targets, text_weights, 0.0)
    _, z_sum, _ = np_cross_entropy(logits, targets, text_weights, weights.z_loss)
    asr_w = np.where(segments == 1, text_weights, 0.0)
    lm_w = np.where(segments == 2, text_weights, 0.0)
    asr_sum, _, asr_n = np_cross_entropy(logits, targets, asr_w, 0.0)
    lm_sum, _, lm_n = np_cross_entropy(logits, targets, lm_w, 0.0)
    spec = np_spectrogram_terms(pred, batch["cont_frames"], batch["cont_mask"], 3)
    step_mask = np.asarray(acoustic.group_mask(jnp.asarray(batch["cont_mask"]), r))
    stop_targets = np.asarray(acoustic.stop_targets(jnp.asarray(batch["cont_mask"]), r))
    stop = np_stop_loss(stop_logits, stop_targets, step_mask)

    want = {
        "ce_text": ce_sum / n_tokens,
        "ce_asr": asr_sum / asr_n,
        "ce_lm": lm_sum / lm_n,
        "z_loss": z_sum / n_tokens,
        "text_loss": weights.text * (weights.asr * asr_sum + weights.lm * lm_sum) / n_tokens,
        "stop": stop,
        "num_text_tokens": n_tokens,
        "num_frames": batch["cont_mask"].sum(),
        **spec,
    }
    want["spec_total"] = (weights.spec_frames * spec["spec_frames"] + weights.freq_delta * spec["spec_freq_delta"]
                          + weights.time_delta * spec["spec_time_delta"])
    want["loss"] = (want["text_loss"] + want["z_loss"] + weights.spectrogram * want["spec_total"]
                    + weights.stop * stop)
    for name, value in want.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=3e-5, err_msg=name)
    assert float(total) == float(metrics["loss"])


def test_spectron_loss_without_segments_or_stop_uses_plain_token_mean():
    rng = np.random.default_rng(31)
    logits, batch, pred, _ = _batch_and_outputs(rng, 1, with_segments=False, with_stop=False)
    total, metrics = losses.spectron_loss(jnp.asarray(logits), batch, jnp.asarray(pred),
                                          weights=losses.LossWeights(asr=5.0, lm=0.0, z_loss=0.0),
                                          max_time_delta_order=2)
    ce_sum, _, n = np_cross_entropy(logits, batch["text_targets"], batch["text_weights"], 0.0)
    spec = np_spectrogram_terms(pred, batch["cont_frames"], batch["cont_mask"], 2)
    assert "ce_asr" not in metrics and "stop" not in metrics and "spec_time_delta_3" not in metrics
    np.testing.assert_allclose(float(metrics["text_loss"]), ce_sum / n, rtol=2e-5)
    want = ce_sum / n + spec["spec_frames"] + spec["spec_freq_delta"] + spec["spec_time_delta"]
    np.testing.assert_allclose(float(total), want, rtol=2e-5)


def test_spectron_loss_ignores_padding_everywhere():
    rng = np.random.default_rng(40)
    logits, batch, pred, stop_logits = _batch_and_outputs(rng, 2)
    clean_total, clean = losses.spectron_loss(jnp.asarray(logits), batch, jnp.asarray(pred), jnp.asarray(stop_logits))
    dirty_batch = dict(batch)
    dirty_batch["cont_frames"] = with_garbage(batch["cont_frames"], batch["cont_mask"], rng)
    dirty_logits = np.where(batch["text_weights"][..., None] == 0, np.float32(1e4), logits).astype(np.float32)
    step_mask = np.asarray(acoustic.group_mask(jnp.asarray(batch["cont_mask"]), 2))
    dirty_stop = np.where(step_mask == 0, np.float32(np.nan), stop_logits).astype(np.float32)
    dirty_total, dirty = losses.spectron_loss(jnp.asarray(dirty_logits), dirty_batch,
                                              jnp.asarray(with_garbage(pred, batch["cont_mask"], rng, np.nan)),
                                              jnp.asarray(dirty_stop))
    assert float(dirty_total) == float(clean_total)
    for name in clean:
        assert float(dirty[name]) == float(clean[name]), name


def test_loss_weights_reject_negative_values():
    with pytest.raises(ValueError, match="LossWeights.freq_delta"):
        losses.LossWeights(freq_delta=-1.0)
