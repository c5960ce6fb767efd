"""Automatic naturalness: DNSMOS (P.808 MOS and P.835 SIG / BAK / OVRL) through `speechmos`.

    scorer = DNSMOS()
    scorer.score(wave)   # [samples] float32 16 kHz -> {"p808_mos", "sig_mos", "bak_mos", "ovrl_mos"}
    scorer.score_batch([wave, ...])   # the same per wave, every 9 s window of all of them in one ONNX call

The paper's N-MOS comes from human raters; DNSMOS is a learned non-intrusive predictor of those
ratings (its ONNX models ship in the `speechmos` wheel and run with `onnxruntime`), so it is a proxy:
compare systems scored the same way (generated, ground truth, and ground truth resynthesised by the
vocoder, which bounds what any generated speech can reach through it), not against the paper's values.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

SAMPLE_RATE = 16000
KEYS = ("p808_mos", "sig_mos", "bak_mos", "ovrl_mos")
WINDOWS_PER_CALL = 8  # 9 s windows per ONNX call (DEFAULT: batching more saves no time, costs memory)
MIN_SAMPLES = SAMPLE_RATE // 2  # shorter audio gets no score (DNSMOS frames 9 s windows of 10 ms hops)


class DNSMOS:
    """DNSMOS P.808 + P.835 (non-personalised models) from the `speechmos` wheel.

    `score_batch` follows `speechmos.dnsmos.run` clip by clip (a clip shorter than its 9.01 s window is
    repeated until it fills one; windows hop 1 s; each MOS is the mean over windows; P.835 through its
    polynomial fit) but feeds the windows of every clip through each ONNX model in one call (both
    models take a batch axis): each clip's values equal `speechmos.dnsmos.run` on it alone up to float
    rounding (tests/test_eval_scorers.py).
    """

    name = "DNSMOS (speechmos 0.0.1.1, onnxruntime)"

    def __init__(self):
        from speechmos import dnsmos

        self._dnsmos = dnsmos
        here = os.path.dirname(os.path.abspath(dnsmos.__file__))
        self._model = dnsmos.DNSMOS(os.path.join(here, "dnsmos_models", "sig_bak_ovr.onnx"),
                                    os.path.join(here, "dnsmos_models", "model_v8.onnx"))

    def score(self, wave: np.ndarray) -> dict[str, float]:
        """[samples] float32 16 kHz audio in [-1, 1] -> the four MOS values (NaN for < 0.5 s of audio)."""
        return self.score_batch([wave])[0]

    def _windows(self, wave: np.ndarray) -> list[np.ndarray]:
        """The [INPUT_LENGTH * 16 kHz] windows speechmos scores of one clip."""
        dnsmos = self._dnsmos
        size = int(dnsmos.INPUT_LENGTH * SAMPLE_RATE)
        audio = wave
        while len(audio) < size:
            audio = np.append(audio, audio)
        hops = int(np.floor(len(audio) / SAMPLE_RATE) - dnsmos.INPUT_LENGTH) + 1
        windows = [audio[int(i * SAMPLE_RATE): int((i + dnsmos.INPUT_LENGTH) * SAMPLE_RATE)] for i in range(hops)]
        return [w for w in windows if len(w) >= size]

    def score_batch(self, waves: Sequence[np.ndarray]) -> list[dict[str, float]]:
        """Each [samples] float32 16 kHz wave -> its four MOS values (NaN for < 0.5 s of audio)."""
        owners, windows = [], []
        for i, wave in enumerate(waves):
            wave = np.clip(np.nan_to_num(np.asarray(wave, np.float32)), -1.0, 1.0)
            if wave.size >= MIN_SAMPLES:
                for window in self._windows(wave):
                    owners.append(i)
                    windows.append(window)
        out = [{key: float("nan") for key in KEYS} for _ in waves]
        if not windows:
            return out
        model, p808_mos, raw = self._model, [], []
        for start in range(0, len(windows), WINDOWS_PER_CALL):  # bounded memory per ONNX call
            chunk = windows[start:start + WINDOWS_PER_CALL]
            p835 = np.stack([np.asarray(w, np.float32) for w in chunk])  # [windows, samples]
            p808 = np.stack([np.asarray(model.audio_melspec(audio=w[:-160]), np.float32) for w in chunk])
            p808_mos.append(model.p808_onnx_sess.run(None, {"input_1": p808})[0][:, 0])  # [windows]
            raw.append(model.onnx_sess.run(None, {"input_1": p835})[0])  # [windows, 3]: sig, bak, ovrl
        p808_mos, raw = np.concatenate(p808_mos), np.concatenate(raw)
        sig, bak, ovr = model.get_polyfit_val(raw[:, 0], raw[:, 1], raw[:, 2], False)
        owners = np.asarray(owners)
        for i in sorted(set(owners.tolist())):
            mine = owners == i
            out[i] = {"p808_mos": float(np.mean(p808_mos[mine])), "sig_mos": float(np.mean(sig[mine])),
                      "bak_mos": float(np.mean(bak[mine])), "ovrl_mos": float(np.mean(ovr[mine]))}
        return out
