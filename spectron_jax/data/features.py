"""Log-mel spectrogram features: the one place that owns the feature numbers.

Spectron reads and writes the same log-mel spectrogram: it is the speech encoder's input and the
decoder's regression target. Every number that defines it lives in a `FeatureSpec`:

    16 kHz audio, Hann window of 800 samples (50 ms) zero-padded to a 1024-point FFT, hop 200 samples
    (12.5 ms, 80 frames per second), 128 mel bands (Slaney mel scale and area normalisation, as
    `librosa.filters.mel`) between 20 Hz and 8 kHz, natural log of the mel *magnitude* with a floor of
    1e-5.

Choices made here (the paper leaves them open):

- Magnitude (power 1), not power (2): the log of a magnitude spectrogram is what Tacotron-style
  vocoders (and WaveFit) consume, and it halves the dynamic range the regression loss sees.
- Frames are centred (`center=True`, zero padding of n_fft // 2 at both ends): a wave of `n` samples
  gives `1 + n // hop` frames, frame `t` centred on sample `t * hop`. So the first 3 s of audio are the
  first `frames_for_seconds(3.0) == 240` frames.
- The STFT and mel projection are computed in float64 and returned as float32, so that the features of
  a file do not depend on the platform's float32 FFT rounding near the log floor.

`SPECTRON_FEATURES` is the regression target. `ENCODER_FEATURES` is the speech encoder's front-end; it
has the same numbers today and is a separate name so that a pretrained encoder may bring its own.

Optional global per-bin normalisation statistics (`FeatureStats`) are accumulated with
`StatsAccumulator` and saved/loaded as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from typing import Any

import numpy as np
import soundfile


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """The numbers that define a log-mel spectrogram."""

    sample_rate: int = 16000  # Hz; audio of any other rate is resampled to this.
    num_mel: int = 128  # mel bands (paper: 128).
    hop: int = 200  # samples between frames: 12.5 ms at 16 kHz (paper: 12.5 ms step).
    window: int = 800  # Hann window length in samples: 50 ms at 16 kHz (paper: 50 ms frame).
    n_fft: int = 1024  # FFT size; the window is zero-padded (centred) to this. DEFAULT, not in the paper.
    fmin: float = 20.0  # lowest mel band edge in Hz (paper: 20 Hz).
    fmax: float = 8000.0  # highest mel band edge in Hz (paper: 8 kHz).
    log_floor: float = 1e-5  # log(max(mel, floor)), natural log. DEFAULT, not in the paper.

    def __post_init__(self):
        if self.sample_rate <= 0 or self.num_mel <= 0 or self.hop <= 0:
            raise ValueError(f"FeatureSpec: sample_rate, num_mel and hop must be positive: {self}")
        if not 0 < self.window <= self.n_fft:
            raise ValueError(f"FeatureSpec: need 0 < window <= n_fft, got window={self.window}, n_fft={self.n_fft}")
        if not 0.0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(
                f"FeatureSpec: need 0 <= fmin < fmax <= sample_rate / 2, got fmin={self.fmin}, fmax={self.fmax}"
            )
        if not self.log_floor > 0:
            raise ValueError(f"FeatureSpec: log_floor must be positive, got {self.log_floor}")

    @property
    def frames_per_second(self) -> float:
        """Frame rate: 80.0 for the default spec."""
        return self.sample_rate / self.hop

    @property
    def num_bins(self) -> int:
        """Linear-frequency STFT bins: n_fft // 2 + 1."""
        return self.n_fft // 2 + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FeatureSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"FeatureSpec: unknown fields {sorted(unknown)}")
        return cls(**values)


SPECTRON_FEATURES = FeatureSpec()
"""The regression target: what the decoder's post-net predicts and the vocoder inverts."""

ENCODER_FEATURES = FeatureSpec()
"""The speech encoder's input features (same numbers as `SPECTRON_FEATURES` today)."""


class AudioError(ValueError):
    """An audio file that cannot be used; `reason` is a short machine-readable tag.

    Reasons: `missing_file`, `empty_file` (zero bytes), `unreadable` (not decodable), `empty_audio`
    (decodes to zero samples), `non_finite` (NaN or infinite samples).
    """

    def __init__(self, reason: str, path: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reason = reason
        self.path = path
        self.detail = detail


def frames_for_seconds(seconds: float, spec: FeatureSpec = SPECTRON_FEATURES) -> int:
    """Number of frames whose centres fall in the first `seconds` of audio (240 for 3 s)."""
    return int(round(seconds * spec.frames_per_second))


def num_frames(num_samples: int, spec: FeatureSpec = SPECTRON_FEATURES) -> int:
    """Frames `log_mel` returns for a wave of `num_samples` samples (centred frames)."""
    return 1 + num_samples // spec.hop


def samples_for_frames(num_frames: int, spec: FeatureSpec = SPECTRON_FEATURES) -> int:
    """Leading samples that determine the first `num_frames` frames of `log_mel`.

    Frame t reads samples [t * hop - n_fft / 2, t * hop + n_fft / 2) (centred, zero-padded), so
    featurising only the first (num_frames - 1) * hop + n_fft // 2 samples gives those frames exactly.
    """
    return max(0, int(num_frames) - 1) * spec.hop + spec.n_fft // 2


RESAMPLE_MARGIN_SECONDS = 0.25  # extra input read past a cut before resampling (DEFAULT).


def prepare_waveform(wave: np.ndarray, sample_rate: int, spec: FeatureSpec = SPECTRON_FEATURES) -> np.ndarray:
    """Converts a decoded waveform to what `log_mel` takes.

    Args:
      wave: [samples] or [samples, channels] (soundfile's layout); float in [-1, 1] or integer PCM
        (scaled by the integer type's range; unsigned types are centred first).
      sample_rate: the rate of `wave` in Hz.
      spec: target features; `wave` is resampled (soxr, high quality) to `spec.sample_rate`.

    Returns:
      [samples'] float32 mono at `spec.sample_rate` (channels averaged).
    """
    wave = np.asarray(wave)
    if wave.ndim == 2:
        wave = _to_float(wave).mean(axis=1)
    elif wave.ndim == 1:
        wave = _to_float(wave)
    else:
        raise ValueError(f"prepare_waveform: expected [samples] or [samples, channels], got shape {wave.shape}")
    if sample_rate <= 0:
        raise ValueError(f"prepare_waveform: sample_rate must be positive, got {sample_rate}")
    if sample_rate != spec.sample_rate and wave.size:
        import librosa  # deferred: librosa's first import is slow and most callers never resample.

        wave = librosa.resample(
            wave.astype(np.float64), orig_sr=sample_rate, target_sr=spec.sample_rate, res_type="soxr_hq"
        )
    return np.ascontiguousarray(wave, dtype=np.float32)


def _to_float(wave: np.ndarray) -> np.ndarray:
    """Integer PCM -> float64 in [-1, 1); float input is returned as float64."""
    if np.issubdtype(wave.dtype, np.floating):
        return wave.astype(np.float64)
    if np.issubdtype(wave.dtype, np.unsignedinteger):
        info = np.iinfo(wave.dtype)
        half = (int(info.max) + 1) / 2
        return (wave.astype(np.float64) - half) / half
    if np.issubdtype(wave.dtype, np.signedinteger):
        return wave.astype(np.float64) / (int(np.iinfo(wave.dtype).max) + 1)
    raise ValueError(f"unsupported sample type {wave.dtype}")


def load_audio(path: str | os.PathLike, spec: FeatureSpec = SPECTRON_FEATURES,
               max_samples: int | None = None) -> np.ndarray:
    """Reads any file libsndfile decodes (WAV, FLAC, OGG, MP3, ...) as mono float32 at the spec's rate.

    `path` may be local or on an object store (`gs://...`, read whole through `spectron_jax.filesystem`).

    Args:
      max_samples: read only the first `max_samples` samples (at the spec's rate) of the file; a file at
        another rate is read `RESAMPLE_MARGIN_SECONDS` further so the resampler's edge stays past the cut.

    Returns:
      [samples] float32 (at most `max_samples`).

    Raises:
      AudioError: missing, empty, undecodable, zero-sample or non-finite audio (see its `reason`).
    """
    path = os.fspath(path)
    source: Any = path
    if "://" in path:  # an object store (gs://...): the bytes through the file-system layer
        from spectron_jax import filesystem

        if not filesystem.is_file(path):
            raise AudioError("missing_file", path, "no such file")
        source = io.BytesIO(filesystem.read_bytes(path))
        if not source.getbuffer().nbytes:
            raise AudioError("empty_file", path, "file is empty (0 bytes)")
    elif not os.path.isfile(path):
        raise AudioError("missing_file", path, "no such file")
    elif os.path.getsize(path) == 0:
        raise AudioError("empty_file", path, "file is empty (0 bytes)")
    try:
        frames = -1
        if max_samples is not None:
            rate = soundfile.info(source).samplerate
            frames = int(np.ceil(max_samples * rate / spec.sample_rate))
            if rate != spec.sample_rate:
                frames += int(np.ceil(RESAMPLE_MARGIN_SECONDS * rate))
            if not isinstance(source, str):
                source.seek(0)
        data, rate = soundfile.read(source, frames=frames, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for corrupt input.
        raise AudioError("unreadable", path, f"cannot decode audio: {' '.join(str(e).split())}") from e
    if data.shape[0] == 0:
        raise AudioError("empty_audio", path, "audio has zero samples")
    if not np.all(np.isfinite(data)):
        raise AudioError("non_finite", path, "audio contains NaN or infinite samples")
    wave = prepare_waveform(data, rate, spec)
    return wave if max_samples is None else wave[:max_samples]


@functools.lru_cache(maxsize=8)
def mel_filterbank(spec: FeatureSpec = SPECTRON_FEATURES) -> np.ndarray:
    """Slaney-style mel filterbank (librosa's default), [mel, n_fft // 2 + 1] float64, read-only."""
    import librosa

    weights = librosa.filters.mel(
        sr=spec.sample_rate,
        n_fft=spec.n_fft,
        n_mels=spec.num_mel,
        fmin=spec.fmin,
        fmax=spec.fmax,
        htk=False,
        norm="slaney",
        dtype=np.float64,
    )
    weights.setflags(write=False)
    return weights


def _stft_kwargs(spec: FeatureSpec) -> dict[str, Any]:
    return dict(
        n_fft=spec.n_fft, hop_length=spec.hop, win_length=spec.window, window="hann", center=True, pad_mode="constant"
    )


def log_mel(wave: np.ndarray, spec: FeatureSpec = SPECTRON_FEATURES) -> np.ndarray:
    """Log-mel magnitude spectrogram.

    Args:
      wave: [samples] float mono audio at `spec.sample_rate` (see `prepare_waveform` / `load_audio`).
      spec: the feature numbers.

    Returns:
      [frames, mel] float32 with frames = 1 + samples // hop: log(max(mel_weights @ |STFT|, log_floor)).
    """
    import librosa

    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"log_mel: expected a mono wave [samples], got shape {wave.shape}")
    if not wave.size:
        raise ValueError("log_mel: the wave is empty")
    # [bins, frames] magnitude, complex128 STFT of the float64 wave.
    magnitude = np.abs(librosa.stft(wave.astype(np.float64), **_stft_kwargs(spec)))
    mel = np.einsum("mf,ft->tm", mel_filterbank(spec), magnitude)  # m: mel band, f: STFT bin, t: frame
    return np.log(np.maximum(mel, spec.log_floor)).astype(np.float32)


def log_mel_to_audio(
    log_mel_frames: np.ndarray, spec: FeatureSpec = SPECTRON_FEATURES, n_iter: int = 32, seed: int = 0
) -> np.ndarray:
    """Inverts a log-mel spectrogram to a waveform: NNLS mel -> linear magnitude, then Griffin-Lim.

    Args:
      log_mel_frames: [frames, mel] log-mel magnitude (as `log_mel` returns).
      spec: the feature numbers it was computed with.
      n_iter: Griffin-Lim iterations.
      seed: seed of Griffin-Lim's random initial phase (the result is deterministic given it).

    Returns:
      [(frames - 1) * hop] float32 waveform at `spec.sample_rate`.
    """
    import librosa

    log_mel_frames = np.asarray(log_mel_frames, dtype=np.float64)
    if log_mel_frames.ndim != 2 or log_mel_frames.shape[1] != spec.num_mel:
        raise ValueError(f"log_mel_to_audio: expected [frames, {spec.num_mel}], got shape {log_mel_frames.shape}")
    mel = np.exp(log_mel_frames).T  # [mel, frames]
    magnitude = librosa.feature.inverse.mel_to_stft(
        mel,
        sr=spec.sample_rate,
        n_fft=spec.n_fft,
        power=1.0,
        fmin=spec.fmin,
        fmax=spec.fmax,
        htk=False,
        norm="slaney",
    )
    kwargs = _stft_kwargs(spec)
    wave = librosa.griffinlim(
        magnitude,
        n_iter=n_iter,
        hop_length=kwargs["hop_length"],
        win_length=kwargs["win_length"],
        n_fft=kwargs["n_fft"],
        window=kwargs["window"],
        center=True,
        length=(log_mel_frames.shape[0] - 1) * spec.hop,
        random_state=seed,
    )
    return wave.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStats:
    """Global per-bin statistics of log-mel frames, for optional mean/variance normalisation.

    Attributes:
      mean: [mel] float64 mean of every frame's bin.
      std: [mel] float64 standard deviation, at least `min_std` (see `StatsAccumulator.finalize`).
      num_frames: how many frames they were computed from.
      spec: the features they describe.
    """

    mean: np.ndarray
    std: np.ndarray
    num_frames: int
    spec: FeatureSpec = SPECTRON_FEATURES

    def normalize(self, frames: np.ndarray) -> np.ndarray:
        """[..., mel] log-mel -> [..., mel] zero-mean unit-variance per bin (float32)."""
        return ((np.asarray(frames) - self.mean) / self.std).astype(np.float32)

    def denormalize(self, frames: np.ndarray) -> np.ndarray:
        """Inverse of `normalize`: [..., mel] -> [..., mel] float32."""
        return (np.asarray(frames) * self.std + self.mean).astype(np.float32)

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes {'mean', 'std', 'num_frames', 'features'} (atomically: temp file, then rename)."""
        payload = {
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "num_frames": int(self.num_frames),
            "features": self.spec.to_dict(),
        }
        from spectron_jax import filesystem

        filesystem.write_text(path, json.dumps(payload, indent=1))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "FeatureStats":
        """Reads what `to_json` wrote (a local or object-store path); raises ValueError naming the file if
        it is missing or malformed."""
        from spectron_jax import filesystem

        try:
            payload = json.loads(filesystem.read_text(path))
            spec = FeatureSpec.from_dict(payload.get("features", {}))
            mean = np.asarray(payload["mean"], dtype=np.float64)
            std = np.asarray(payload["std"], dtype=np.float64)
            count = int(payload["num_frames"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{os.fspath(path)}: not a feature statistics file ({e})") from e
        if mean.shape != (spec.num_mel,) or std.shape != (spec.num_mel,) or not np.all(std > 0):
            raise ValueError(f"{os.fspath(path)}: mean/std must be {spec.num_mel} values with std > 0")
        return cls(mean=mean, std=std, num_frames=count, spec=spec)


class StatsAccumulator:
    """Running float64 sums of log-mel frames per bin; mergeable across shards and processes."""

    def __init__(self, spec: FeatureSpec = SPECTRON_FEATURES):
        self.spec = spec
        self.total = np.zeros(spec.num_mel, np.float64)  # [mel] sum of values
        self.total_sq = np.zeros(spec.num_mel, np.float64)  # [mel] sum of squared values
        self.count = 0  # frames

    def add(self, frames: np.ndarray) -> None:
        """Adds [frames, mel] log-mel frames."""
        frames = np.asarray(frames, dtype=np.float64)
        self.total += frames.sum(axis=0)
        self.total_sq += np.square(frames).sum(axis=0)
        self.count += frames.shape[0]

    def merge(self, other: "StatsAccumulator") -> None:
        self.total += other.total
        self.total_sq += other.total_sq
        self.count += other.count

    def to_dict(self) -> dict[str, Any]:
        return {"sum": self.total.tolist(), "sum_sq": self.total_sq.tolist(), "count": self.count}

    @classmethod
    def from_dict(cls, values: dict[str, Any], spec: FeatureSpec = SPECTRON_FEATURES) -> "StatsAccumulator":
        acc = cls(spec)
        acc.total = np.asarray(values["sum"], np.float64)
        acc.total_sq = np.asarray(values["sum_sq"], np.float64)
        acc.count = int(values["count"])
        return acc

    def finalize(self, min_std: float = 1e-3) -> FeatureStats:
        """Mean and standard deviation per bin; std is floored at `min_std` (a constant bin)."""
        if self.count == 0:
            raise ValueError("StatsAccumulator.finalize: no frames were added")
        mean = self.total / self.count
        variance = np.maximum(self.total_sq / self.count - np.square(mean), 0.0)
        std = np.maximum(np.sqrt(variance), min_std)
        return FeatureStats(mean=mean, std=std, num_frames=self.count, spec=self.spec)


# ---- The w2v-BERT 2.0 front-end: Kaldi-style 80-bin fbank, stacked in pairs ------------------------------


@dataclasses.dataclass(frozen=True)
class FbankSpec:
    """The input features of w2v-BERT 2.0 (SeamlessM4T's feature extractor), as that model was trained.

    Per 25 ms frame (400 samples, hop 160 = 10 ms, no centring: ``1 + (n - 400) // 160`` frames) of
    the wave scaled to 16-bit range: remove the frame's mean, pre-emphasis 0.97 (first sample times
    0.03), a Povey window (Hann ** 0.85, symmetric), the power spectrum of a 512-point FFT, 80
    triangular filters laid out on the Kaldi mel scale (1127 ln(1 + f / 700)) from 20 Hz to 8 kHz and
    triangular in mel, a floor of float32 epsilon, natural log. Then each mel bin is normalised to zero
    mean and unit variance (ddof 1) over the utterance, and each pair of frames is concatenated: 160
    values per 20 ms. These numbers belong to the pretrained encoder; none is a knob.
    """

    sample_rate: int = 16000
    window: int = 400
    hop: int = 160
    n_fft: int = 512
    num_mel: int = 80
    fmin: float = 20.0
    preemphasis: float = 0.97
    mel_floor: float = 1.192092955078125e-07
    stride: int = 2

    @property
    def stacked_dim(self) -> int:
        return self.num_mel * self.stride


W2V_BERT_FBANK = FbankSpec()


@functools.lru_cache(maxsize=4)
def kaldi_mel_filterbank(spec: FbankSpec = W2V_BERT_FBANK) -> np.ndarray:
    """``[n_fft // 2 + 1, num_mel]`` float64 triangular filters, triangular on the Kaldi mel scale."""
    def mel(hz):
        return 1127.0 * np.log(1.0 + np.asarray(hz, np.float64) / 700.0)

    edges = np.linspace(mel(spec.fmin), mel(spec.sample_rate / 2), spec.num_mel + 2)
    bins = mel(np.arange(spec.n_fft // 2 + 1) * spec.sample_rate / spec.n_fft)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower) / (centre - lower)
    falling = (upper - bins[:, None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def kaldi_fbank(wave: np.ndarray, spec: FbankSpec = W2V_BERT_FBANK) -> np.ndarray:
    """Log fbank of a mono 16 kHz float wave ``[samples]`` in [-1, 1] -> ``[frames, num_mel]`` float32.

    ``frames = 1 + (samples - window) // hop`` (0 for a wave shorter than one window). Not normalised.
    """
    wave = np.asarray(wave, np.float64).reshape(-1) * 32768.0
    count = 0 if wave.size < spec.window else 1 + (wave.size - spec.window) // spec.hop
    if count == 0:
        return np.zeros((0, spec.num_mel), np.float32)
    starts = np.arange(count)[:, None] * spec.hop
    frames = wave[starts + np.arange(spec.window)[None, :]]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * (1.0 - spec.preemphasis),
                             frames[:, 1:] - spec.preemphasis * frames[:, :-1]], axis=1)
    n = np.arange(spec.window)
    povey = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (spec.window - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames * povey, n=spec.n_fft, axis=1)) ** 2
    return np.log(np.maximum(spec.mel_floor, power @ kaldi_mel_filterbank(spec))).astype(np.float32)


def stack_fbank(fbank: np.ndarray, spec: FbankSpec = W2V_BERT_FBANK) -> np.ndarray:
    """Per-bin normalised, pair-stacked encoder input: ``[frames, num_mel] -> [frames // stride, stacked_dim]``.

    Statistics are over all the given frames (the encoder's whole input, e.g. the prompt). Row ``k``
    is ``[frame 2k, frame 2k + 1]``; a trailing odd frame is dropped (SeamlessM4T pads it and masks the
    stacked frame out).
    """
    fbank = np.asarray(fbank, np.float64)
    if fbank.shape[0] > 1:
        fbank = (fbank - fbank.mean(axis=0)) / np.sqrt(fbank.var(axis=0, ddof=1) + 1e-7)
    else:
        fbank = np.zeros_like(fbank)
    usable = fbank.shape[0] // spec.stride * spec.stride
    return fbank[:usable].reshape(-1, spec.stacked_dim).astype(np.float32)


def w2v_bert_features(wave: np.ndarray, spec: FbankSpec = W2V_BERT_FBANK) -> np.ndarray:
    """The w2v-BERT 2.0 encoder's input for a 16 kHz wave: ``[samples] -> [frames, 160]`` (20 ms each)."""
    return stack_fbank(kaldi_fbank(wave, spec), spec)


def describe(spec: FeatureSpec = SPECTRON_FEATURES) -> str:
    """One line naming the numbers, for logs and reports."""
    return (
        f"{spec.sample_rate} Hz, {spec.num_mel} mel {spec.fmin:g}-{spec.fmax:g} Hz, hop {spec.hop} "
        f"({1000 * spec.hop / spec.sample_rate:g} ms), window {spec.window}, n_fft {spec.n_fft}, "
        f"log floor {spec.log_floor:g}, {spec.frames_per_second:g} frames/s"
    )


__all__ = [
    "AudioError",
    "ENCODER_FEATURES",
    "FeatureSpec",
    "FbankSpec",
    "FeatureStats",
    "SPECTRON_FEATURES",
    "StatsAccumulator",
    "W2V_BERT_FBANK",
    "RESAMPLE_MARGIN_SECONDS",
    "describe",
    "frames_for_seconds",
    "kaldi_fbank",
    "kaldi_mel_filterbank",
    "load_audio",
    "log_mel",
    "log_mel_to_audio",
    "mel_filterbank",
    "num_frames",
    "prepare_waveform",
    "samples_for_frames",
    "stack_fbank",
    "w2v_bert_features",
]
