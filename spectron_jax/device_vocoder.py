"""Griffin-Lim on the device: the mel inversion, STFT and inverse STFT of a whole padded batch in `jnp`.

`DeviceGriffinLimVocoder` is a `vocoder.Vocoder` whose `batch(log_mel, lengths)` runs one jitted call on
the `[batch, frames, mel]` buffer decoding hands out. Each row is masked to its own length: frames past it
carry no magnitude, no window weight and no samples, so a row's wave equals that row vocoded alone. Its
random initial phase is librosa's (`RandomState(seed).random((bins, frames))` of the row's own frame
count), so for the same magnitude the iterations follow `librosa.griffinlim` (up to float32 rounding).

Steps (frames-major layout, K = n_fft / 2 + 1 bins):
  mel inversion  non-negative least squares min ||S A^T - exp(log_mel)||, S >= 0 (A the mel filterbank
                 [mel, K]), by `nnls_iter` accelerated projected-gradient (FISTA) steps from the clipped
                 pseudo-inverse; librosa solves the same problem with L-BFGS-B.
  Griffin-Lim    `n_iter` fast Griffin-Lim iterations (momentum 0.99, as librosa), centred Hann STFT with
                 zero padding, window-sum-square normalised inverse STFT.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax import vocoder as vocoder_lib
from spectron_jax.data import features
from spectron_jax.data.features import SPECTRON_FEATURES, FeatureSpec

MOMENTUM = 0.99  # librosa.griffinlim's default.


def _window(spec: FeatureSpec) -> np.ndarray:
    """[n_fft] periodic Hann of `spec.window` samples, zero-padded to n_fft (centred), as librosa."""
    n = spec.window
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    left = (spec.n_fft - n) // 2
    return np.pad(hann, (left, spec.n_fft - n - left))


def initial_phase(num_frames: int, spec: FeatureSpec, seed: int) -> np.ndarray:
    """[frames, bins] in [0, 1): librosa's Griffin-Lim draw for `random_state=seed` (transposed)."""
    bins = spec.n_fft // 2 + 1
    return np.random.RandomState(seed).random((bins, num_frames)).T


def stft(wave: jax.Array, num_frames: int, spec: FeatureSpec) -> jax.Array:
    """wave float32 [batch, samples] -> complex64 [batch, num_frames, bins]: centred, zero-padded frames."""
    half = spec.n_fft // 2
    padded = jnp.pad(wave, ((0, 0), (half, half + spec.n_fft)))
    index = np.arange(num_frames)[:, None] * spec.hop + np.arange(spec.n_fft)[None, :]
    return jnp.fft.rfft(padded[:, index] * _window(spec).astype(np.float32), axis=-1)


def istft(spectrum: jax.Array, frame_valid: jax.Array, num_samples: int, spec: FeatureSpec) -> jax.Array:
    """complex [batch, frames, bins] -> float32 [batch, num_samples]: overlap-add of the windowed inverse
    FFTs over each row's valid frames, divided by their window-sum-square, centre trimmed."""
    batch, frames, _ = spectrum.shape
    window = _window(spec).astype(np.float32)
    chunks = jnp.fft.irfft(spectrum, n=spec.n_fft, axis=-1) * window * frame_valid[..., None]
    index = np.arange(frames)[:, None] * spec.hop + np.arange(spec.n_fft)[None, :]
    total = spec.n_fft + spec.hop * (frames - 1)
    wave = jnp.zeros((batch, total), jnp.float32).at[:, index].add(chunks)
    weight = jnp.zeros((batch, total), jnp.float32).at[:, index].add(
        frame_valid[..., None].astype(jnp.float32) * window ** 2)
    tiny = jnp.finfo(jnp.float32).tiny
    wave = jnp.where(weight > tiny, wave / jnp.where(weight > tiny, weight, 1.0), wave)
    half = spec.n_fft // 2
    return wave[:, half:half + num_samples]


def nnls(mel: jax.Array, basis: np.ndarray, iterations: int) -> jax.Array:
    """min ||S basis^T - mel||_F over S >= 0: mel float32 [batch, frames, mel], basis [mel, bins] ->
    S [batch, frames, bins], by FISTA from the clipped pseudo-inverse solution."""
    basis64 = np.asarray(basis, np.float64)
    step = 1.0 / float(np.linalg.norm(basis64, 2) ** 2)
    a = jnp.asarray(basis64, jnp.float32)
    pinv = jnp.asarray(np.linalg.pinv(basis64).T, jnp.float32)  # [mel, bins]
    x0 = jnp.maximum(mel @ pinv, 0.0)

    def body(_, carry):
        x, y, t = carry
        grad = (y @ a.T - mel) @ a
        x_new = jnp.maximum(y - step * grad, 0.0)
        t_new = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
        return x_new, x_new + ((t - 1.0) / t_new) * (x_new - x), t_new

    x, _, _ = jax.lax.fori_loop(0, iterations, body, (x0, x0, jnp.float32(1.0)))
    return x


def griffin_lim(magnitude: jax.Array, lengths: jax.Array, phase: jax.Array, spec: FeatureSpec,
                n_iter: int) -> jax.Array:
    """Fast Griffin-Lim of a padded batch.

    Args:
      magnitude: float32 [batch, frames, bins] linear STFT magnitude (frames past a row's length ignored).
      lengths: int32 [batch] valid frames per row (>= 1).
      phase: float32 [batch, frames, bins] initial phase in turns ([0, 1)).
      n_iter: iterations.

    Returns:
      float32 [batch, (frames - 1) * hop]; row i is zero past (lengths[i] - 1) * hop samples.
    """
    frames = magnitude.shape[1]
    num_samples = (frames - 1) * spec.hop
    frame_valid = jnp.arange(frames)[None, :] < lengths[:, None]
    sample_valid = jnp.arange(num_samples)[None, :] < ((lengths - 1) * spec.hop)[:, None]
    magnitude = jnp.where(frame_valid[..., None], magnitude, 0.0)
    eps = jnp.finfo(jnp.float32).tiny

    def inverse(angles):
        return jnp.where(sample_valid, istft(angles, frame_valid, num_samples, spec), 0.0)

    def body(_, carry):
        angles, previous = carry
        rebuilt = stft(inverse(angles), frames, spec)
        update = rebuilt - (MOMENTUM / (1.0 + MOMENTUM)) * previous
        update = update / (jnp.abs(update) + eps)
        return update * magnitude, rebuilt

    start = magnitude * jnp.exp(2j * jnp.pi * phase).astype(jnp.complex64)
    angles, _ = jax.lax.fori_loop(0, n_iter, body, (start, jnp.zeros_like(start)))
    return inverse(angles)


@functools.lru_cache(maxsize=8)
def _program(spec: FeatureSpec, n_iter: int, nnls_iter: int):
    basis = features.mel_filterbank(spec)

    def run(log_mel, lengths, phase):
        mel = jnp.exp(log_mel)
        magnitude = nnls(mel, basis, nnls_iter)
        return griffin_lim(magnitude, lengths, phase, spec, n_iter)

    return jax.jit(run)


@dataclasses.dataclass(frozen=True)
class DeviceGriffinLimVocoder:
    """`GriffinLimVocoder`'s synthesis as one jitted, batched device call (see the module docstring).

    Attributes:
      feature_spec, n_iter, seed, peak, normalize: as `vocoder.GriffinLimVocoder`.
      nnls_iter: projected-gradient steps of the mel inversion. DEFAULT: 50.
    """

    feature_spec: FeatureSpec = SPECTRON_FEATURES
    n_iter: int = 32
    seed: int = 0
    peak: float = vocoder_lib.DEFAULT_PEAK
    normalize: bool = False
    nnls_iter: int = 50

    def __post_init__(self):
        if self.n_iter < 1 or self.nnls_iter < 1:
            raise ValueError(f"DeviceGriffinLimVocoder: n_iter and nnls_iter must be >= 1, got {self.n_iter}, "
                             f"{self.nnls_iter}")
        if not 0.0 < self.peak <= 1.0:
            raise ValueError(f"DeviceGriffinLimVocoder: peak must be in (0, 1], got {self.peak}")

    @property
    def sample_rate(self) -> int:
        return self.feature_spec.sample_rate

    def num_samples(self, num_frames: int) -> int:
        return (num_frames - 1) * self.feature_spec.hop

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        """[frames >= 2, mel] log-mel -> [(frames - 1) * hop] float32 (as `GriffinLimVocoder.__call__`)."""
        log_mel = np.asarray(log_mel)
        if log_mel.ndim != 2 or log_mel.shape[0] < 2:
            raise ValueError(f"DeviceGriffinLimVocoder: expected log-mel [frames >= 2, mel], got {log_mel.shape}")
        return self.batch(log_mel[None], [log_mel.shape[0]])[0]

    def batch(self, log_mel: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
        """[batch, frames, mel] + [batch] lengths -> waves [(lengths[i] - 1) * hop] ([0] below 2 frames)."""
        return self.dispatch(log_mel, lengths)()

    def dispatch(self, log_mel: np.ndarray, lengths: Sequence[int]) -> Callable[[], list[np.ndarray]]:
        """`batch`, asynchronously: starts the device call and returns a function that waits for it and
        returns the waves (so the host can queue more device work, e.g. the next generation, meanwhile)."""
        spec = self.feature_spec
        log_mel, lengths = vocoder_lib._check_batch(log_mel, lengths, spec.num_mel)
        batch, frames = log_mel.shape[:2]
        if frames < 2:
            return lambda: [np.zeros((0,), np.float32) for _ in range(batch)]
        floor = math.log(spec.log_floor)
        clean = np.clip(np.nan_to_num(np.asarray(log_mel, np.float64), nan=floor, neginf=floor,
                                      posinf=vocoder_lib.MAX_LOG_MEL), floor, vocoder_lib.MAX_LOG_MEL)
        phase = np.zeros((batch, frames, spec.n_fft // 2 + 1), np.float32)
        for i, n in enumerate(lengths):
            if n >= 2:
                phase[i, :n] = initial_phase(int(n), spec, self.seed)
        used = np.maximum(lengths, 1).astype(np.int32)
        running = _program(spec, self.n_iter, self.nnls_iter)(clean.astype(np.float32), used, phase)

        def collect() -> list[np.ndarray]:
            waves = np.asarray(running)
            return [vocoder_lib.limit_peak(waves[i, :self.num_samples(n)], self.peak, self.normalize) if n >= 2
                    else np.zeros((0,), np.float32) for i, n in enumerate(lengths)]

        return collect


__all__ = ["DeviceGriffinLimVocoder", "griffin_lim", "initial_phase", "istft", "nnls", "stft"]
