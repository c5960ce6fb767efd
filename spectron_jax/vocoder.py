"""Waveform synthesis from predicted log-mel spectrograms.

Spectron's decoder writes log-mel frames (`spectron_jax.data.features.SPECTRON_FEATURES`); a vocoder
turns them into audio. The paper uses a frozen neural vocoder (WaveFit), which is not public, so the
built-in default is `GriffinLimVocoder`: an NNLS inversion of the mel filterbank to a linear magnitude
spectrogram, then Griffin-Lim phase reconstruction (`features.log_mel_to_audio`). It needs no training
and is good enough to hear what the model says; a trained neural vocoder sounds far better.

Plugging in a neural vocoder
----------------------------
Anything with a `sample_rate` attribute and a `__call__(log_mel) -> wave` method satisfies the
`Vocoder` protocol (no subclassing needed); `isinstance(obj, Vocoder)` checks it at run time. It must
accept the features the decoder predicts: [frames, 128] natural-log mel magnitudes at 80 frames/s
(hop 200 at 16 kHz, see `features.describe()`). A HiFi-GAN / WaveFit-style model trained on those
features would be wrapped as

    class NeuralVocoder:
        sample_rate = 16000
        def __init__(self, params, apply_fn):
            self._generate = jax.jit(lambda log_mel: apply_fn(params, log_mel[None])[0])
        def __call__(self, log_mel):                # [frames, 128] -> [samples] float32
            return limit_peak(np.asarray(self._generate(jnp.asarray(log_mel, jnp.float32))))

and handed to whatever takes a `Vocoder` (the inference and evaluation tools). Keep the output mono
float32 in [-1, 1] (`limit_peak` does that) so `write_wav` stores it without clipping.

Batches
-------
Decoding hands out a padded `[batch, max_frames, 128]` buffer plus per-row lengths; `synthesize_batch`
turns it into one wave per row. A vocoder may define `batch(log_mel, lengths) -> list of waves` (a neural
vocoder would run the padded buffer in one jitted call and cut each row to `(num_frames - 1) * hop`
samples); `synthesize_batch` uses it when present and otherwise calls the vocoder row by row:

    waves = synthesize_batch(vocoder, out["frames"], out["num_frames"])   # list of [samples] float32

`GriffinLimVocoder.batch` is a loop over rows: each row's result must not depend on the others, and
Griffin-Lim's seeded random initial phase and its length-dependent edges (the ISTFT of a padded row
differs from the unpadded one at the end) make a stacked STFT over padded rows differ from row-by-row
synthesis; the loop keeps `batch(...)[i] == vocoder(log_mel[i, :lengths[i]])` exactly. This host path is
the reference; `device_vocoder.DeviceGriffinLimVocoder` (what `infer` uses) runs the same algorithm on
the whole padded batch in one jitted call, each row masked to its length and seeded as librosa seeds it.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from spectron_jax import filesystem
from spectron_jax.data import features
from spectron_jax.data.features import SPECTRON_FEATURES, FeatureSpec

DEFAULT_PEAK = 0.99  # largest absolute sample a vocoder hands out (headroom below 16-bit full scale).
MAX_LOG_MEL = 12.0  # log-mel values above this are clipped before inversion: a full-scale [-1, 1] wave
#                     stays below about 2.5, and exp(12) ~ 1.6e5 cannot overflow the inversion.
#                     DEFAULT, not in the paper.


@runtime_checkable
class Vocoder(Protocol):
    """Log-mel spectrogram -> waveform.

    Attributes:
      sample_rate: Hz of the returned waves.
    """

    sample_rate: int

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        """[frames, mel] log-mel (as `features.log_mel` computes) -> [samples] float32 in [-1, 1]."""
        ...


def limit_peak(wave: np.ndarray, peak: float = DEFAULT_PEAK, normalize: bool = False) -> np.ndarray:
    """Makes a wave safe to store: finite float32 with max |sample| <= `peak`.

    Args:
      wave: [samples] audio.
      peak: the largest absolute sample allowed (0 < peak <= 1).
      normalize: scale every non-silent wave so its peak is exactly `peak`; otherwise only waves
        louder than `peak` are scaled down (quieter ones keep their level).

    Returns:
      [samples] float32. NaN becomes 0 and ±inf the largest finite value of its sign before scaling;
      an all-zero wave stays zero.
    """
    if not 0.0 < peak <= 1.0:
        raise ValueError(f"limit_peak: peak must be in (0, 1], got {peak}")
    wave = np.nan_to_num(np.asarray(wave, dtype=np.float64), nan=0.0)
    wave = np.clip(wave, -np.finfo(np.float32).max, np.finfo(np.float32).max)
    largest = float(np.max(np.abs(wave))) if wave.size else 0.0
    if largest > 0.0 and (normalize or largest > peak):
        wave = wave * (peak / largest)
    return np.clip(wave, -peak, peak).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class GriffinLimVocoder:
    """Griffin-Lim synthesis of log-mel frames; the built-in default `Vocoder`.

    Attributes:
      feature_spec: the features the frames were computed with (fixes rate, hop, window, mel bands).
      n_iter: Griffin-Lim iterations (32: about 0.5 s per 4 s utterance on one CPU core; more
        iterations give slightly cleaner phase). DEFAULT, not in the paper.
      seed: seed of the random initial phase; the output is deterministic given it.
      peak: largest absolute output sample.
      normalize: scale every non-silent output to exactly `peak` (False: only attenuate when louder,
        keeping the level the spectrogram describes).
    """

    feature_spec: FeatureSpec = SPECTRON_FEATURES
    n_iter: int = 32
    seed: int = 0
    peak: float = DEFAULT_PEAK
    normalize: bool = False

    def __post_init__(self):
        if self.n_iter < 1:
            raise ValueError(f"GriffinLimVocoder: n_iter must be at least 1, got {self.n_iter}")
        if not 0.0 < self.peak <= 1.0:
            raise ValueError(f"GriffinLimVocoder: peak must be in (0, 1], got {self.peak}")

    @property
    def sample_rate(self) -> int:
        return self.feature_spec.sample_rate

    def num_samples(self, num_frames: int) -> int:
        """Samples returned for `num_frames` frames: (frames - 1) * hop, the inverse of `features.num_frames`."""
        return (num_frames - 1) * self.feature_spec.hop

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        """Synthesises a wave.

        Args:
          log_mel: [frames, mel] log-mel magnitude, frames >= 2. Non-finite values are treated as
            silence (NaN, -inf) or clipped (+inf); values are clipped to [log(log_floor), MAX_LOG_MEL].

        Returns:
          [(frames - 1) * hop] float32 at `sample_rate`, finite, max |sample| <= `peak`.
        """
        spec = self.feature_spec
        log_mel = np.asarray(log_mel, dtype=np.float64)
        if log_mel.ndim != 2 or log_mel.shape[1] != spec.num_mel:
            raise ValueError(f"GriffinLimVocoder: expected log-mel [frames, {spec.num_mel}], got shape {log_mel.shape}")
        if log_mel.shape[0] < 2:
            raise ValueError(f"GriffinLimVocoder: need at least 2 frames, got {log_mel.shape[0]}")
        floor = math.log(spec.log_floor)
        log_mel = np.nan_to_num(log_mel, nan=floor, neginf=floor, posinf=MAX_LOG_MEL)
        log_mel = np.clip(log_mel, floor, MAX_LOG_MEL)
        wave = features.log_mel_to_audio(log_mel, spec, n_iter=self.n_iter, seed=self.seed)
        return limit_peak(wave, self.peak, self.normalize)

    def batch(self, log_mel: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
        """Synthesises every row of a padded batch (row i equals `self(log_mel[i, :lengths[i]])`).

        Args:
          log_mel: [batch, frames, mel] log-mel; frames past a row's length are ignored.
          lengths: [batch] valid frames per row; a row with fewer than 2 frames gives an empty wave.

        Returns:
          batch waves, row i of shape [(lengths[i] - 1) * hop] float32 ([0] when lengths[i] < 2).
        """
        log_mel, lengths = _check_batch(log_mel, lengths, self.feature_spec.num_mel)
        return [self(row[:n]) if n >= 2 else np.zeros((0,), np.float32) for row, n in zip(log_mel, lengths)]


def _check_batch(log_mel: np.ndarray, lengths: Sequence[int], num_mel: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates a padded batch: ([batch, frames, mel] array, [batch] int lengths within frames)."""
    log_mel = np.asarray(log_mel)
    lengths = np.asarray(lengths).astype(np.int64).reshape(-1)
    if log_mel.ndim != 3 or log_mel.shape[2] != num_mel:
        raise ValueError(f"vocoder batch: expected log-mel [batch, frames, {num_mel}], got shape {log_mel.shape}")
    if lengths.shape[0] != log_mel.shape[0]:
        raise ValueError(f"vocoder batch: {lengths.shape[0]} lengths for {log_mel.shape[0]} rows")
    if np.any(lengths < 0) or np.any(lengths > log_mel.shape[1]):
        raise ValueError(f"vocoder batch: lengths must be in [0, {log_mel.shape[1]}], got {lengths.tolist()}")
    return log_mel, lengths


def synthesize_batch(vocoder: Vocoder, log_mel: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    """One wave per row of a padded decoder output, with any `Vocoder`.

    Args:
      vocoder: uses its `batch(log_mel, lengths)` when it has one, else calls it on each row.
      log_mel: [batch, frames, mel] log-mel (e.g. `decoding.generate`'s "frames").
      lengths: [batch] valid frames per row (its "num_frames").

    Returns:
      batch float32 waves at `vocoder.sample_rate`; rows with fewer than 2 frames give [0].
    """
    batch_fn = getattr(vocoder, "batch", None)
    if callable(batch_fn):
        return [np.asarray(w, np.float32) for w in batch_fn(log_mel, lengths)]
    log_mel, lengths = _check_batch(log_mel, lengths, np.asarray(log_mel).shape[-1])
    return [np.asarray(vocoder(row[:n]), np.float32) if n >= 2 else np.zeros((0,), np.float32)
            for row, n in zip(log_mel, lengths)]


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int) -> str:
    """Writes a mono wave as a 16-bit PCM WAV file (local or `gs://`, through `spectron_jax.filesystem`).

    The file is encoded in memory and then written in one piece (atomically: a reader sees no partial
    file), creating missing parent folders.

    Args:
      path: output file.
      wave: [samples] float in [-1, 1] (values outside are clipped; NaN is written as 0).
      sample_rate: Hz.

    Returns:
      The path written, as a string.
    """
    import soundfile

    path = os.fspath(path)
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"write_wav: {path}: expected a mono wave [samples], got shape {wave.shape}")
    if int(sample_rate) <= 0:
        raise ValueError(f"write_wav: {path}: sample_rate must be positive, got {sample_rate}")
    wave = np.clip(np.nan_to_num(wave.astype(np.float64), nan=0.0), -1.0, 1.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, int(sample_rate), subtype="PCM_16", format="WAV")
    filesystem.write_bytes(path, buffer.getvalue())
    return path


__all__ = ["DEFAULT_PEAK", "GriffinLimVocoder", "MAX_LOG_MEL", "Vocoder", "limit_peak", "synthesize_batch", "write_wav"]
