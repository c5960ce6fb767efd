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
        waves shorter than 0.1 s or silent, which have no speaker)."""
        out = np.full((len(waves), EMBEDDING_DIM), np.nan, np.float32)
        for row, wave in enumerate(waves):
            wave = np.nan_to_num(np.asarray(wave, np.float32))
            if wave.size < MIN_SAMPLES or not np.any(wave):
                continue
            out[row] = self._encoder.embed_utterance(wave)
        return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two [dim] vectors; NaN if either is NaN or zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if not np.isfinite(norm) or norm == 0.0:
        return float("nan")
    return float(np.dot(a, b) / norm)
