"""Tests of spectron_jax.vocoder: the Vocoder protocol, Griffin-Lim synthesis and WAV writing."""

import csv
import math

import numpy as np
import pytest
import soundfile

from spectron_jax import vocoder
from spectron_jax.data import features

FLOOR = math.log(features.SPECTRON_FEATURES.log_floor)


def _shortest_utterances(embedded_dir, count):
    """Paths of the `count` shortest corpus utterances (skips when the corpus is absent)."""
    manifest = embedded_dir / "manifest.tsv"
    if not manifest.is_file():
        pytest.skip("embedded corpus not built")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rows.sort(key=lambda row: float(row["duration"]))
    return [embedded_dir / row["path"] for row in rows[:count]]


def test_protocol_accepts_any_object_with_rate_and_call():
    class Silence:
        sample_rate = 16000

        def __call__(self, log_mel):
            return np.zeros((len(log_mel) - 1) * 200, np.float32)

    assert isinstance(vocoder.GriffinLimVocoder(), vocoder.Vocoder)
    assert isinstance(Silence(), vocoder.Vocoder)
    assert not isinstance(object(), vocoder.Vocoder)
    assert vocoder.GriffinLimVocoder().sample_rate == 16000


def test_griffin_lim_round_trip_on_a_corpus_utterance(embedded_dir):
    path, other_path = _shortest_utterances(embedded_dir, 2)
    original = features.log_mel(features.load_audio(path))  # [frames, 128]
    voc = vocoder.GriffinLimVocoder()
    wave = voc(original)
    assert wave.dtype == np.float32
    assert wave.shape == (voc.num_samples(original.shape[0]),)
    assert np.all(np.isfinite(wave)) and np.max(np.abs(wave)) <= vocoder.DEFAULT_PEAK

    resynthesised = features.log_mel(wave)
    assert resynthesised.shape == original.shape
    error = np.mean(np.abs(resynthesised - original))
    # Measured 0.14-0.16 on the corpus with 32 iterations; a silent or scrambled output scores > 1.
    assert error < 0.35
    # Control: another utterance (a different sentence) is much further away than the resynthesis.
    other = features.log_mel(features.load_audio(other_path))
    frames = min(len(other), len(original))
    assert np.mean(np.abs(other[:frames] - original[:frames])) > 2.5 * error


def test_griffin_lim_is_deterministic_given_the_seed():
    rng = np.random.default_rng(0)
    log_mel = rng.uniform(-6.0, 0.0, size=(12, 128))
    first = vocoder.GriffinLimVocoder(n_iter=4, seed=3)(log_mel)
    np.testing.assert_array_equal(first, vocoder.GriffinLimVocoder(n_iter=4, seed=3)(log_mel))
    assert not np.array_equal(first, vocoder.GriffinLimVocoder(n_iter=4, seed=4)(log_mel))


@pytest.mark.parametrize("fill", [FLOOR, -np.inf, np.nan, np.inf, 50.0])
def test_silence_and_non_finite_input_give_finite_bounded_output(fill):
    wave = vocoder.GriffinLimVocoder(n_iter=4)(np.full((10, 128), fill))
    assert wave.shape == (9 * 200,)
    assert np.all(np.isfinite(wave)) and np.max(np.abs(wave)) <= vocoder.DEFAULT_PEAK


def test_silence_stays_quiet():
    wave = vocoder.GriffinLimVocoder(n_iter=4)(np.full((10, 128), FLOOR))
    assert np.max(np.abs(wave)) < 1e-3


def test_normalize_sets_the_peak_and_default_keeps_a_quiet_level():
    rng = np.random.default_rng(1)
    quiet = features.log_mel((0.01 * rng.standard_normal(4000)).astype(np.float32))
    kept = vocoder.GriffinLimVocoder(n_iter=4)(quiet)
    assert 0.0 < np.max(np.abs(kept)) < 0.5
    normalized = vocoder.GriffinLimVocoder(n_iter=4, normalize=True)(quiet)
    assert np.max(np.abs(normalized)) == pytest.approx(vocoder.DEFAULT_PEAK, rel=1e-6)
    np.testing.assert_allclose(normalized, kept * (vocoder.DEFAULT_PEAK / np.max(np.abs(kept))), rtol=1e-5, atol=1e-7)


def test_limit_peak():
    np.testing.assert_allclose(vocoder.limit_peak(np.array([0.5, -2.0])), [0.2475, -0.99], rtol=1e-6)
    np.testing.assert_array_equal(vocoder.limit_peak(np.array([0.25, -0.5])), np.float32([0.25, -0.5]))
    np.testing.assert_allclose(vocoder.limit_peak(np.array([0.25, -0.5]), normalize=True), [0.495, -0.99], rtol=1e-6)
    np.testing.assert_array_equal(vocoder.limit_peak(np.zeros(4), normalize=True), np.zeros(4, np.float32))
    out = vocoder.limit_peak(np.array([np.nan, np.inf, -1.0]))
    assert np.all(np.isfinite(out)) and out[0] == 0.0 and out[1] == pytest.approx(0.99)


def test_bad_input_is_rejected():
    voc = vocoder.GriffinLimVocoder()
    with pytest.raises(ValueError, match=r"\[frames, 128\]"):
        voc(np.zeros((10, 80)))
    with pytest.raises(ValueError, match="at least 2 frames"):
        voc(np.zeros((1, 128)))
    with pytest.raises(ValueError, match="n_iter"):
        vocoder.GriffinLimVocoder(n_iter=0)


def test_write_wav_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    wave = rng.uniform(-0.9, 0.9, size=3000).astype(np.float32)
    wave[:2] = [1.7, -3.0]  # out of range: clipped
    path = tmp_path / "nested" / "dir" / "out.wav"
    assert vocoder.write_wav(path, wave, 16000) == str(path)
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
    data, rate = soundfile.read(str(path), dtype="float32")
    assert rate == 16000 and data.shape == wave.shape
    expected = np.clip(wave, -1.0, 1.0)
    np.testing.assert_allclose(data, expected, atol=1.0 / 32767)
    with pytest.raises(ValueError, match="out.wav"):
        vocoder.write_wav(path, np.zeros((10, 2)), 16000)


def test_batch_equals_per_row_synthesis_for_rows_of_different_lengths():
    rng = np.random.default_rng(5)
    lengths = [9, 14, 1, 7]  # a row shorter than 2 frames gives an empty wave
    padded = np.full((4, 16, 128), np.nan)  # padding past each row's length must be ignored
    rows = [rng.uniform(-6.0, 0.0, size=(n, 128)) for n in lengths]
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    voc = vocoder.GriffinLimVocoder(n_iter=4, seed=2)
    for waves in (voc.batch(padded, lengths), vocoder.synthesize_batch(voc, padded, np.int32(lengths))):
        assert len(waves) == 4
        for wave, row, n in zip(waves, rows, lengths):
            assert wave.dtype == np.float32 and wave.shape == (max(n - 1, 0) * 200,)
            if n >= 2:
                np.testing.assert_array_equal(wave, voc(row))


def test_synthesize_batch_loops_over_a_vocoder_without_batch_method():
    class Level:  # a wave whose constant level is the row's mean, so each row is recognisable
        sample_rate = 16000

        def __call__(self, log_mel):
            return np.full((len(log_mel) - 1) * 200, np.mean(log_mel), np.float32)

    padded = np.zeros((2, 6, 128))
    padded[0, :3] = 0.25
    padded[1, :6] = -0.5
    padded[0, 3:] = 100.0  # padding: must not reach row 0
    waves = vocoder.synthesize_batch(Level(), padded, [3, 6])
    np.testing.assert_array_equal(waves[0], np.full(400, 0.25, np.float32))
    np.testing.assert_array_equal(waves[1], np.full(1000, -0.5, np.float32))
    with pytest.raises(ValueError, match="lengths"):
        vocoder.synthesize_batch(Level(), padded, [3, 7])
    with pytest.raises(ValueError, match=r"\[batch, frames, 128\]"):
        vocoder.GriffinLimVocoder().batch(np.zeros((6, 128)), [6])
