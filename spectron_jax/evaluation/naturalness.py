"""Automatic naturalness: DNSMOS (P.808 MOS and P.835 SIG / BAK / OVRL) through `speechmos`.

    scorer = DNSMOS()
    scorer.score(wave)   # [samples] float32 16 kHz -> {"p808_mos", "sig_mos", "bak_mos", "ovrl_mos"}

The paper's N-MOS comes from human raters; DNSMOS is a learned non-intrusive predictor of those
ratings (its ONNX models ship in the `speechmos` wheel and run with `onnxruntime`), so it is a proxy:
compare systems scored the same way (generated, ground truth, and ground truth resynthesised by the
vocoder, which bounds what any generated speech can reach through it), not against the paper's values.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
KEYS = ("p808_mos", "sig_mos", "bak_mos", "ovrl_mos")
MIN_SAMPLES = SAMPLE_RATE // 2  # shorter audio gets no score (DNSMOS frames 9 s windows of 10 ms hops)


class DNSMOS:
    """DNSMOS P.808 + P.835 (non-personalised models) from the `speechmos` wheel."""

    name = "DNSMOS (speechmos 0.0.1.1, onnxruntime)"

    def __init__(self):
        from speechmos import dnsmos

        self._dnsmos = dnsmos

    def score(self, wave: np.ndarray) -> dict[str, float]:
        """[samples] float32 16 kHz audio in [-1, 1] -> the four MOS values (NaN for < 0.5 s of audio)."""
        wave = np.clip(np.nan_to_num(np.asarray(wave, np.float32)), -1.0, 1.0)
        if wave.size < MIN_SAMPLES:
            return {key: float("nan") for key in KEYS}
        result = self._dnsmos.run(wave, sr=SAMPLE_RATE)
        return {key: float(result[key]) for key in KEYS}
