"""The offline scorers on corpus audio: resemblyzer speaker similarity, DNSMOS, PocketSphinx."""

import itertools

import numpy as np
import pytest

from spectron_jax.data import features
from spectron_jax.evaluation import asr, naturalness, speaker


def _corpus(embedded_dir, speakers, per_speaker):
    rows = [line.split("\t") for line in (embedded_dir / "manifest.tsv").read_text().splitlines()[1:]]
    picked = []
    for spk in speakers:
        mine = [r for r in rows if r[3] == spk][:per_speaker]
        picked += [(r[3], features.load_audio(embedded_dir / r[1]), r[2]) for r in mine]
    return picked


@pytest.fixture(scope="module")
def encoder():
    return speaker.SpeakerEncoder()


@pytest.fixture(scope="module")
def dnsmos():
    return naturalness.DNSMOS()


@pytest.mark.slow
def test_same_voice_pairs_rank_above_different_voice_pairs(encoder, embedded_dir):
    utterances = _corpus(embedded_dir, ["spk01", "spk03", "spk06", "spk08"], 3)
    emb = encoder.embed([wave for _, wave, _ in utterances])
    assert emb.shape == (12, speaker.EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    same, different = [], []
    for i, j in itertools.combinations(range(len(utterances)), 2):
        (same if utterances[i][0] == utterances[j][0] else different).append(speaker.cosine(emb[i], emb[j]))
    # Relative order over all (same, different) pairs of pairs, not a fixed threshold.
    wins = np.mean([s > d for s in same for d in different])
    assert wins > 0.8, (wins, np.mean(same), np.mean(different))


def test_cosine_reference_and_degenerate_inputs(encoder):
    a, b = np.array([1.0, 2.0, 2.0]), np.array([2.0, 0.0, 1.0])
    assert speaker.cosine(a, b) == pytest.approx(4.0 / (3.0 * np.sqrt(5.0)))
    assert np.isnan(speaker.cosine(a, np.zeros(3)))
    emb = encoder.embed([np.zeros(16000, np.float32), np.zeros(10, np.float32)])
    assert np.all(np.isnan(emb))  # silence and 10 samples have no speaker


def test_dnsmos_prefers_speech_to_noise_and_clipping(dnsmos, embedded_dir):
    (_, wave, _), = _corpus(embedded_dir, ["spk02"], 1)
    noise = np.random.default_rng(0).normal(0.0, 0.3, wave.size).astype(np.float32)
    clipped = np.clip(wave * 50.0, -0.05, 0.05) * 10.0  # heavily clipped copy at a similar level
    clean, hiss, harsh = dnsmos.score(wave), dnsmos.score(noise), dnsmos.score(clipped)
    for key in ("p808_mos", "ovrl_mos", "sig_mos"):
        assert clean[key] > hiss[key] and clean[key] > harsh[key], (key, clean, hiss, harsh)
    assert all(np.isnan(v) for v in dnsmos.score(wave[:100]).values())


@pytest.mark.slow
def test_pocketsphinx_transcribes_corpus_speech_better_than_noise(embedded_dir):
    from spectron_jax.evaluation import text_metrics

    recogniser = asr.make_asr("pocketsphinx")
    utterances = _corpus(embedded_dir, ["spk05"], 1)
    texts = recogniser.transcribe([wave for _, wave, _ in utterances] + [np.zeros(0, np.float32)])
    assert texts[-1] == "" and len(texts) == 2
    # Weak on synthetic voices, but it shares words with the reference (a random guess shares none).
    refs = {w for _, _, ref in utterances for w in text_metrics.normalize(ref).split()}
    assert refs & set(text_metrics.normalize(" ".join(texts)).split())
    with pytest.raises(ValueError, match="unknown ASR"):
        asr.make_asr("kaldi")


@pytest.mark.slow
def test_pocketsphinx_transcript_does_not_depend_on_what_came_before(embedded_dir):
    """A, then B, then noise, then A gives A's fresh-decoder transcript each time, in any batch or order."""
    a = features.load_audio(embedded_dir / "audio/p012_u00.flac")
    b = features.load_audio(embedded_dir / "audio/p001_u00.flac")
    noise = np.random.default_rng(0).normal(0.0, 0.3, 2 * 16000).astype(np.float32)
    # The reference: a recogniser built afresh for every utterance.
    fresh = {name: asr.PocketSphinxASR().transcribe([wave])[0] for name, wave in (("a", a), ("b", b), ("n", noise))}
    assert fresh["a"] and fresh["b"] and fresh["a"] != fresh["b"]
    recogniser = asr.PocketSphinxASR()
    assert recogniser.transcribe([a, b, a, noise, a]) == [fresh["a"], fresh["b"], fresh["a"], fresh["n"], fresh["a"]]
    # Batch size and order: one at a time on the same recogniser, and reversed, give the same texts.
    assert [recogniser.transcribe([w])[0] for w in (noise, b, a)] == [fresh["n"], fresh["b"], fresh["a"]]


@pytest.mark.slow  # DNSMOS on about twenty 9 s windows, twice: ~20 s on 2 loaded cores
def test_batched_scorers_equal_each_wave_scored_alone(dnsmos, encoder, embedded_dir):
    """DNSMOS's windows of several clips in one ONNX call == speechmos's own `run` on each clip; the
    speaker encoder's partials of several waves in one batch == resemblyzer's `embed_utterance` on each."""
    from speechmos import dnsmos as speechmos_dnsmos

    waves = [wave for _, wave, _ in _corpus(embedded_dir, ["spk02", "spk05"], 1)]
    waves = [waves[0][:16000 * 3], waves[1], waves[0][:100], waves[1][:int(16000 * 4.2)]]  # 3 s, all, 100, 4.2 s
    batched = dnsmos.score_batch(waves)
    for wave, got in zip(waves, batched):
        if wave.size < naturalness.MIN_SAMPLES:
            assert all(np.isnan(v) for v in got.values())
            continue
        alone = speechmos_dnsmos.run(np.clip(wave, -1.0, 1.0), sr=16000)
        for key in naturalness.KEYS:
            assert got[key] == pytest.approx(float(alone[key]), abs=1e-4), key
    emb = encoder.embed(waves)
    for row, wave in enumerate(waves):
        if wave.size < speaker.MIN_SAMPLES:
            assert np.all(np.isnan(emb[row]))
            continue
        np.testing.assert_allclose(emb[row], encoder._encoder.embed_utterance(wave), atol=1e-5)
