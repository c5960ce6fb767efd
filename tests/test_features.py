"""Log-mel features against an independent NumPy STFT and Slaney mel filterbank, audio loading, stats."""

import csv
import json

import numpy as np
import pytest
import soundfile

from spectron_jax.data import features
from spectron_jax.data.features import SPECTRON_FEATURES as SPEC


def chirp(sample_rate: int, seconds: float = 1.5, f0: float = 100.0, f1: float = 6000.0) -> np.ndarray:
    """Linear chirp f0 -> f1 with a 50 ms fade-in, [samples] float64, amplitude 0.4."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return 0.4 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))) * np.minimum(1.0, t / 0.05)


# ------------------------------------------------------------------- independent reference (NumPy only)


def slaney_hz_to_mel(hz):
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    linear = hz / f_sp
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, linear)


def slaney_mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def reference_filterbank(spec) -> np.ndarray:
    """Triangular filters on the Slaney mel scale, area-normalised: [mel, n_fft // 2 + 1]."""
    bin_hz = np.arange(spec.n_fft // 2 + 1) * spec.sample_rate / spec.n_fft
    edges = slaney_mel_to_hz(np.linspace(slaney_hz_to_mel(spec.fmin), slaney_hz_to_mel(spec.fmax), spec.num_mel + 2))
    weights = np.zeros((spec.num_mel, bin_hz.size))
    for m in range(spec.num_mel):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (bin_hz - lo) / (mid - lo)
        falling = (hi - bin_hz) / (hi - mid)
        weights[m] = np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (hi - lo)
    return weights


def reference_log_mel(wave: np.ndarray, spec) -> np.ndarray:
    """Centred zero-padded STFT with a periodic Hann window, |.|, mel, natural log with floor: [frames, mel]."""
    n = np.arange(spec.window)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / spec.window)  # periodic
    window = np.zeros(spec.n_fft)
    offset = (spec.n_fft - spec.window) // 2
    window[offset : offset + spec.window] = hann
    padded = np.pad(wave.astype(np.float64), spec.n_fft // 2)
    count = 1 + (padded.size - spec.n_fft) // spec.hop
    frames = np.stack([padded[t * spec.hop : t * spec.hop + spec.n_fft] for t in range(count)])
    magnitude = np.abs(np.fft.rfft(frames * window, axis=1))  # [frames, bins]
    mel = magnitude @ reference_filterbank(spec).T
    return np.log(np.maximum(mel, spec.log_floor))


# ------------------------------------------------------------------------------------------------ tests


def test_filterbank_matches_slaney_formula():
    np.testing.assert_allclose(features.mel_filterbank(SPEC), reference_filterbank(SPEC), rtol=1e-6, atol=1e-9)


def test_log_mel_matches_numpy_stft_reference():
    wave = chirp(16000, seconds=1.3037)  # a length that is not a multiple of the hop
    got = features.log_mel(wave.astype(np.float32), SPEC)
    want = reference_log_mel(wave.astype(np.float32), SPEC)
    assert got.dtype == np.float32
    assert got.shape == (1 + wave.size // SPEC.hop, 128) == want.shape
    assert got.shape[0] == features.num_frames(wave.size, SPEC)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # The chirp's energy moves up the mel axis over time: the loudest band rises.
    loudest = got[10:-10].argmax(axis=1)
    assert np.all(np.diff(loudest) >= -1) and loudest[-1] > loudest[0] + 60


def test_other_spec_follows_its_numbers():
    spec = features.FeatureSpec(num_mel=80, hop=160, window=400, n_fft=512, fmin=0.0, fmax=7600.0)
    wave = chirp(16000, seconds=0.5)
    got = features.log_mel(wave, spec)
    np.testing.assert_allclose(got, reference_log_mel(wave, spec), atol=2e-5, rtol=0)
    assert got.shape == (1 + wave.size // 160, 80)


def test_frames_for_seconds():
    assert features.frames_for_seconds(3.0) == 3 * 16000 // 200 == 240
    assert features.frames_for_seconds(0.0125) == 1
    assert SPEC.frames_per_second == 80.0
    # The first 3 s of a wave are the first 240 frames: frame 239 is centred before 3 s, frame 240 at it.
    assert (features.frames_for_seconds(3.0) - 1) * SPEC.hop < 3 * SPEC.sample_rate


def test_feature_spec_validates_and_round_trips():
    with pytest.raises(ValueError, match="window"):
        features.FeatureSpec(window=2048, n_fft=1024)
    with pytest.raises(ValueError, match="fmax"):
        features.FeatureSpec(fmax=9000.0)
    assert features.FeatureSpec.from_dict(SPEC.to_dict()) == SPEC
    assert features.ENCODER_FEATURES == SPEC


def test_stereo_44k_file_matches_mono_16k_file(tmp_path):
    x44 = chirp(44100)
    tone = 0.2 * np.sin(2 * np.pi * 1000 * np.arange(x44.size) / 44100)
    # Channels x + tone and x - tone: only a true average of the channels cancels the tone.
    soundfile.write(tmp_path / "stereo44.wav", np.stack([x44 + tone, x44 - tone], axis=1), 44100, subtype="PCM_16")
    soundfile.write(tmp_path / "mono16.flac", chirp(16000), 16000, subtype="PCM_16")
    stereo = features.load_audio(tmp_path / "stereo44.wav")
    mono = features.load_audio(tmp_path / "mono16.flac")
    assert stereo.dtype == np.float32 and stereo.ndim == 1 and abs(stereo.size - mono.size) <= 1
    a, b = features.log_mel(stereo), features.log_mel(mono)
    assert a.shape == b.shape
    peak = np.exp(b).max()
    assert np.abs(np.exp(a) - np.exp(b)).max() < 0.01 * peak
    loud = b > np.log(0.01 * peak)
    assert np.median(np.abs(a - b)[loud]) < 0.01


def test_prepare_waveform_scales_integers():
    ints = np.array([-32768, -16384, 0, 16384, 32767], dtype=np.int16)
    np.testing.assert_allclose(features.prepare_waveform(ints, 16000), ints / 32768.0, rtol=0, atol=1e-7)
    unsigned = np.array([0, 64, 128, 192, 255], dtype=np.uint8)
    np.testing.assert_allclose(
        features.prepare_waveform(unsigned, 16000), (unsigned.astype(np.float64) - 128) / 128.0, atol=1e-7
    )
    stereo = np.array([[1000, 3000], [-2000, 2000]], dtype=np.int32) * 65536
    np.testing.assert_allclose(features.prepare_waveform(stereo, 16000), [2000 / 32768, 0.0], atol=1e-7)


def test_load_audio_reports_bad_files(tmp_path):
    (tmp_path / "empty.flac").write_bytes(b"")
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    soundfile.write(tmp_path / "zero.wav", np.zeros(0, np.int16), 16000)
    soundfile.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 100, np.float32), 16000, subtype="FLOAT")
    expected = {
        "missing.flac": "missing_file",
        "empty.flac": "empty_file",
        "corrupt.flac": "unreadable",
        "zero.wav": "empty_audio",
        "nan.wav": "non_finite",
    }
    for name, reason in expected.items():
        with pytest.raises(features.AudioError) as info:
            features.load_audio(tmp_path / name)
        assert info.value.reason == reason and name in str(info.value)


def test_griffin_lim_inverts_log_mel():
    wave = chirp(16000, seconds=1.0, f0=300, f1=3000)
    target = features.log_mel(wave)
    audio = features.log_mel_to_audio(target, n_iter=32, seed=0)
    assert audio.shape == ((target.shape[0] - 1) * SPEC.hop,) and audio.dtype == np.float32
    np.testing.assert_array_equal(audio, features.log_mel_to_audio(target, n_iter=32, seed=0))
    again = features.log_mel(audio)
    loud = target > np.log(0.01 * np.exp(target).max())
    # Phase is lost, magnitude is recovered: close where there is energy, far closer than silence would be.
    assert np.mean(np.abs(again - target)[loud]) < 0.5
    assert np.mean(np.abs(features.log_mel(np.zeros_like(audio)) - target)[loud]) > 5.0


def test_stats_accumulate_merge_and_json(tmp_path):
    rng = np.random.default_rng(0)
    first, second = rng.normal(-3, 2, (50, 128)), rng.normal(1, 0.5, (30, 128))
    a, b = features.StatsAccumulator(), features.StatsAccumulator()
    a.add(first)
    b.add(second)
    a.merge(features.StatsAccumulator.from_dict(json.loads(json.dumps(b.to_dict()))))
    stats = a.finalize()
    both = np.concatenate([first, second])
    np.testing.assert_allclose(stats.mean, both.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.std, both.std(axis=0), rtol=1e-8)
    assert stats.num_frames == 80
    stats.to_json(tmp_path / "stats.json")
    loaded = features.FeatureStats.from_json(tmp_path / "stats.json")
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.std, stats.std)
    normalized = loaded.normalize(both)
    np.testing.assert_allclose(normalized.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(loaded.denormalize(normalized), both, atol=1e-5)
    (tmp_path / "bad.json").write_text('{"mean": [0.0]}')
    with pytest.raises(ValueError, match="bad.json"):
        features.FeatureStats.from_json(tmp_path / "bad.json")


def test_embedded_corpus_file(embedded_dir):
    manifest = embedded_dir / "manifest.tsv"
    if not manifest.exists():
        pytest.skip("embedded corpus not built")
    with open(manifest, encoding="utf-8") as f:
        row = next(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    path = embedded_dir / row["path"]
    info = soundfile.info(path)
    assert info.samplerate == 16000 and info.channels == 1
    frames = features.log_mel(features.load_audio(path))
    assert frames.shape == (features.num_frames(info.frames), 128)
    assert abs(frames.shape[0] / 80.0 - float(row["duration"])) < 0.02
    assert np.all(np.isfinite(frames)) and frames.min() >= np.log(SPEC.log_floor) - 1e-6


def test_the_leading_samples_give_the_prompt_frames_exactly(tmp_path):
    """Featurising only `samples_for_frames(P)` samples (read from the file with `max_samples`) gives the
    first P frames of featurising the whole file, bit for bit at 16 kHz, to resampler rounding otherwise."""
    rng = np.random.default_rng(0)
    wave = (0.2 * rng.standard_normal(16000 * 8)).astype(np.float32)
    for p in (1, 81, 240):
        n = features.samples_for_frames(p, SPEC)
        np.testing.assert_array_equal(features.log_mel(wave[:n], SPEC)[:p], features.log_mel(wave, SPEC)[:p])
        # Without the analysis window's reach past the last frame centre, the last frame changes.
        cut = (p - 1) * SPEC.hop + SPEC.window // 4
        assert not np.allclose(features.log_mel(wave[:cut], SPEC)[p - 1], features.log_mel(wave, SPEC)[p - 1])
    n = features.samples_for_frames(240, SPEC)
    path16 = tmp_path / "long16.wav"
    soundfile.write(str(path16), wave, 16000, subtype="FLOAT")
    head = features.load_audio(str(path16), SPEC, max_samples=n)
    np.testing.assert_array_equal(head, features.load_audio(str(path16), SPEC)[:n])
    path44 = tmp_path / "long44.wav"
    t = np.arange(44100 * 8) / 44100
    soundfile.write(str(path44), (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 44100, subtype="FLOAT")
    full = features.load_audio(str(path44), SPEC)
    head = features.load_audio(str(path44), SPEC, max_samples=n)
    assert head.shape == (n,)
    np.testing.assert_allclose(head, full[:n], atol=1e-6)
    np.testing.assert_allclose(features.log_mel(head, SPEC)[:240], features.log_mel(full, SPEC)[:240], atol=1e-4)
