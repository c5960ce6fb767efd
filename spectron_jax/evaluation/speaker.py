"""Speaker similarity: cosine of resemblyzer speaker embeddings (its weights ship in the wheel).

    encoder = SpeakerEncoder()
    emb = encoder.embed([wave, ...])          # [n, 256] float32, L2-normalised rows
    cosine(emb[0], emb[1])

The paper reports the cosine similarity of prompt vs generated continuation under a speaker encoder it
does not name; resemblyzer's GE2E encoder is the offline stand-in, so absolute values are not the
paper's scale. The continuation suite also scores prompt vs the true continuation, the ceiling for the
same utterance.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

SAMPLE_RATE = 16000
EMBEDDING_DIM = 256
RATE, MIN_COVERAGE = 1.3, 0.75  # resemblyzer's `embed_utterance` defaults: partials per second, last one's cover
MIN_SAMPLES = 1600  # 0.1 s: resemblyzer needs at least one of its 1.6 s windows' worth of partials


class SpeakerEncoder:
    """resemblyzer's `VoiceEncoder` on the CPU."""

    name = "resemblyzer 0.1.4 GE2E speaker encoder"

    def __init__(self):
        with warnings.catch_warnings():  # webrtcvad imports the deprecated pkg_resources
            warnings.simplefilter("ignore", UserWarning)
            from resemblyzer import VoiceEncoder

        self._encoder = VoiceEncoder("cpu", verbose=False)

    def embed(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """Each [samples] float32 16 kHz wave -> [n, 256] float32 unit-norm embeddings (NaN rows for
        waves shorter than 0.1 s or silent, which have no speaker).

        As `VoiceEncoder.embed_utterance` per wave (1.6 s partials at its default rate and coverage,
        their mean embedding normalised), but the partials of all waves go through the network in one
        batch; each row equals the wave embedded alone up to float rounding.
        """
        import torch
        from resemblyzer import audio

        out = np.full((len(waves), EMBEDDING_DIM), np.nan, np.float32)
        owners, mels = [], []
        for row, wave in enumerate(waves):
            wave = np.nan_to_num(np.asarray(wave, np.float32))
            if wave.size < MIN_SAMPLES or not np.any(wave):
                continue
            wave_slices, mel_slices = self._encoder.compute_partial_slices(len(wave), RATE, MIN_COVERAGE)
            if wave_slices[-1].stop >= len(wave):
                wave = np.pad(wave, (0, wave_slices[-1].stop - len(wave)), "constant")
            mel = audio.wav_to_mel_spectrogram(wave)
            for s in mel_slices:
                owners.append(row)
                mels.append(mel[s])
        if not mels:
            return out
        with torch.no_grad():
            partials = self._encoder(torch.from_numpy(np.asarray(mels, np.float32))).cpu().numpy()
        owners = np.asarray(owners)
        for row in sorted(set(owners.tolist())):
            raw = np.mean(partials[owners == row], axis=0)
            out[row] = raw / np.linalg.norm(raw, 2)
        return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two [dim] vectors; NaN if either is NaN or zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if not np.isfinite(norm) or norm == 0.0:
        return float("nan")
    return float(np.dot(a, b) / norm)
