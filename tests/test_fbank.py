"""The w2v-BERT 2.0 front-end (Kaldi-style fbank, per-bin normalisation, pair stacking) against
`transformers`' SeamlessM4TFeatureExtractor."""

import numpy as np
import pytest

from spectron_jax.data import features


def _waves():
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * 1.37)) / 16000
    long = (0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 1.5 * t)
            + 0.05 * rng.normal(size=t.size)).astype(np.float32)
    return [long, long[2000:13001].copy()]  # 1.37 s and an odd number of fbank frames


def test_frame_counts_and_stacking_layout():
    wave = _waves()[1]
    raw = features.kaldi_fbank(wave)
    assert raw.shape == (1 + (wave.size - 400) // 160, 80) and raw.shape[0] % 2 == 1
    stacked = features.stack_fbank(raw)
    assert stacked.shape == (raw.shape[0] // 2, 160)
    raw64 = raw.astype(np.float64)
    normed = (raw64 - raw64.mean(0)) / np.sqrt(raw64.var(0, ddof=1) + 1e-7)
    np.testing.assert_allclose(stacked[3], np.concatenate([normed[6], normed[7]]), atol=1e-5)
    assert features.kaldi_fbank(np.zeros(399, np.float32)).shape == (0, 80)


def test_matches_seamless_m4t_feature_extractor_on_padded_batch():
    transformers = pytest.importorskip("transformers")
    extractor = transformers.SeamlessM4TFeatureExtractor()
    waves = _waves()
    reference = extractor(waves, sampling_rate=16000, return_tensors="np")
    for row, wave in enumerate(waves):
        np.testing.assert_allclose(features.kaldi_fbank(wave), extractor._extract_fbank_features(wave),
                                   atol=1e-4, rtol=0)
        ours = features.w2v_bert_features(wave)
        valid = int(reference["attention_mask"][row].sum())
        assert ours.shape == (valid, 160)
        np.testing.assert_allclose(ours, reference["input_features"][row, :valid], atol=5e-4, rtol=0)
