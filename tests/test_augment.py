"""Utterance augmentation: speed, mel shift and later start against NumPy, per-split and per-epoch draws."""

import numpy as np
import pytest
import tensorflow as tf

from spectron_jax.data import augment, preprocessors, tasks

MEL = 128
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel".split()


def _example(uid="u1", frames=400, split="train", word_starts=None, epoch=0, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "id": tf.constant(uid), "transcript": tf.constant(" ".join(WORDS)), "split": tf.constant(split),
        "log_mel": tf.constant(rng.normal(size=(frames, MEL)).astype(np.float32)),
        "word_starts": tf.constant(np.zeros([0], np.float32) if word_starts is None else np.float32(word_starts)),
        preprocessors.EPOCH_FEATURE: tf.constant(epoch, tf.int64),
    }


def _run(example, config, **kwargs):
    (out,) = list(augment.augment_utterance(tf.data.Dataset.from_tensors(example), config, **kwargs)
                  .as_numpy_iterator())
    return out


@pytest.mark.parametrize("speed", [0.87, 1.0, 1.13])
def test_resample_time_is_linear_interpolation(speed):
    log_mel = np.random.default_rng(1).normal(size=(97, 5)).astype(np.float32)
    got = augment.resample_time(tf.constant(log_mel), tf.constant(speed, tf.float32)).numpy()
    out_frames = max(int(round(97 / np.float32(speed))), 1)
    positions = np.minimum(np.arange(out_frames, dtype=np.float32) * np.float32(speed), 96)
    want = np.stack([np.interp(positions, np.arange(97), log_mel[:, b]) for b in range(5)], axis=1)
    assert got.shape == (out_frames, 5)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("shift", [-2, 0, 3])
def test_shift_mel_moves_bins_and_repeats_the_edges(shift):
    log_mel = np.random.default_rng(2).normal(size=(7, 12)).astype(np.float32)
    got = augment.shift_mel(tf.constant(log_mel), tf.constant(shift)).numpy()
    want = log_mel[:, np.clip(np.arange(12) - shift, 0, 11)]
    np.testing.assert_array_equal(got, want)


def test_later_start_cuts_the_words_at_their_letter_share():
    config = augment.UtteranceAugmentConfig(max_start_words=4, start_margin_seconds=0.0)
    example = _example(frames=800)
    log_mel = example["log_mel"].numpy()
    seen = set()
    for epoch in range(12):
        out = _run({**example, preprocessors.EPOCH_FEATURE: tf.constant(epoch, tf.int64)}, config, min_frames=100)
        words = out["transcript"].decode().split()
        cut = len(WORDS) - len(words)
        assert words == WORDS[cut:] and 0 <= cut <= 4
        letters = [len(w) for w in WORDS]
        first = int(round(sum(letters[:cut]) / sum(letters) * 10.0 * 80))  # 800 frames = 10 s
        np.testing.assert_array_equal(out["log_mel"], log_mel[first:])
        seen.add(cut)
    assert len(seen) >= 3  # epochs draw different starts


def test_later_start_follows_word_timings_and_shifts_them():
    starts = [0.1, 0.9, 1.6, 2.2, 3.0, 3.9, 4.5, 5.2]
    config = augment.UtteranceAugmentConfig(max_start_words=3, start_margin_seconds=0.05)
    for epoch in range(8):
        out = _run(_example(frames=560, word_starts=starts, epoch=epoch), config, min_frames=100)
        cut = len(WORDS) - len(out["transcript"].decode().split())
        if cut == 0:
            assert out["log_mel"].shape[0] == 560
            continue
        start_s = starts[cut] - 0.05
        assert out["log_mel"].shape[0] == 560 - int(round(start_s * 80))
        np.testing.assert_allclose(out["word_starts"], np.float32(starts[cut:]) - np.float32(start_s), atol=1e-6)


def test_draws_are_per_example_and_epoch_and_other_splits_pass_untouched():
    config = augment.UtteranceAugmentConfig(min_speed=0.8, max_speed=1.2, max_mel_shift=3, max_start_words=2)
    a0 = _run(_example(epoch=0), config, min_frames=100)
    again = _run(_example(epoch=0), config, min_frames=100)
    np.testing.assert_array_equal(a0["log_mel"], again["log_mel"])
    differ = [not np.array_equal(a0["log_mel"], _run(_example(epoch=e), config, min_frames=100)["log_mel"])
              for e in (1, 2, 3)]
    assert all(differ)
    assert a0["log_mel"].shape[0] != 400 or not np.array_equal(a0["log_mel"], _example()["log_mel"].numpy())
    held_out = _example(split="validation")
    out = _run(held_out, config, min_frames=100)
    np.testing.assert_array_equal(out["log_mel"], held_out["log_mel"].numpy())
    assert out["transcript"].decode() == " ".join(WORDS)


def test_no_draw_makes_a_kept_utterance_shorter_than_the_minimum():
    config = augment.UtteranceAugmentConfig(min_speed=1.0, max_speed=1.5, max_start_words=6)
    for epoch in range(20):
        out = _run(_example(frames=300, epoch=epoch), config, min_frames=280)
        assert out["log_mel"].shape[0] >= 280


def test_task_chain_augments_training_examples_only(tmp_path, throwaway_sp_model):
    """Through the Task's preprocessors: training prompts change, validation ones are the stored frames."""
    config = tasks.TaskConfig(spec_augment=None, max_continuation_seconds=1.0,
                              utterance_augment=augment.UtteranceAugmentConfig(min_speed=0.9, max_speed=1.1,
                                                                               max_mel_shift=2))
    chain = tasks.task_preprocessors(config)
    assert chain[1].func is augment.augment_utterance
    with pytest.raises(ValueError, match="utterance_augment needs prompt_features='log_mel'"):
        tasks.TaskConfig(prompt_features="w2v_bert_fbank", utterance_augment=config.utterance_augment)
    for split, changed in (("train", True), ("validation", False)):
        example = _example(split=split)
        ds = tf.data.Dataset.from_tensors(example)
        ds = chain[1](ds)
        ds = chain[2](ds)
        ds = chain[3](ds)
        (out,) = list(ds.as_numpy_iterator())
        same = np.array_equal(out["prompt"], example["log_mel"].numpy()[:240])
        assert same != changed


def test_config_rejects_bad_ranges():
    with pytest.raises(ValueError, match="min_speed <= max_speed"):
        augment.UtteranceAugmentConfig(min_speed=1.2, max_speed=1.1)
    with pytest.raises(ValueError, match="must be >= 0"):
        augment.UtteranceAugmentConfig(max_mel_shift=-1)
    assert not augment.UtteranceAugmentConfig().active
