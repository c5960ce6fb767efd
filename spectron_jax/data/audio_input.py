"""Reading a corpus's audio files for `prepare`: local or object-store paths, and no partial audio.

`load_audio` is `features.load_audio` with two differences that matter for a corpus:

- Paths may be `gs://...` (or any URL `spectron_jax.filesystem` opens): the file is opened through that
  layer and decoded by libsndfile from the stream, so no local copy is made.
- A **truncated** file is refused (`AudioError` with reason `truncated`) instead of being decoded as the
  part that is there: libsndfile silently shortens a WAV whose `data` chunk claims more bytes than the
  file holds, which would put the first half of an utterance under its whole transcript. Two checks:
  the RIFF/RIFX/RF64 `data` chunk's declared size against the bytes after it (WAV), and the decoded
  sample count against the header's frame count (every format with one, e.g. FLAC's STREAMINFO).

Other refusals keep `features.AudioError`'s reasons: `missing_file`, `empty_file`, `unreadable`,
`empty_audio`, `non_finite`.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import soundfile

from spectron_jax import filesystem
from spectron_jax.data import features

_STREAMING_SIZES = (0xFFFFFFFF, 0)  # a `data` size writers use when the length was unknown


def _declared_wav_data(header: bytes, file_size: int) -> tuple[int, int] | None:
    """(declared bytes of the `data` chunk, bytes present after its header) of a RIFF/RIFX WAV, else None.

    `header` is the file's first bytes (enough to reach the `data` chunk header). RF64 files declare
    their sizes in the `ds64` chunk.
    """
    if len(header) < 12 or header[8:12] != b"WAVE" or header[:4] not in (b"RIFF", b"RIFX", b"RF64"):
        return None
    endian = ">" if header[:4] == b"RIFX" else "<"
    position, ds64_data = 12, None
    while position + 8 <= len(header):
        chunk_id = header[position : position + 4]
        (size,) = struct.unpack(endian + "I", header[position + 4 : position + 8])
        if chunk_id == b"ds64" and position + 8 + 16 <= len(header):
            ds64_data = struct.unpack("<Q", header[position + 16 : position + 24])[0]
        if chunk_id == b"data":
            if header[:4] == b"RF64" and size == 0xFFFFFFFF and ds64_data is not None:
                size = ds64_data
            elif size in _STREAMING_SIZES:
                return None
            return size, file_size - (position + 8)
        position += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def load_audio(path: str, spec: features.FeatureSpec = features.SPECTRON_FEATURES) -> np.ndarray:
    """Mono float32 audio at the spec's rate from a local or object-store file.

    Returns:
      [samples] float32.

    Raises:
      features.AudioError: missing, empty, undecodable, truncated, zero-sample or non-finite audio.
    """
    path = os.fspath(path)
    try:
        if not filesystem.is_file(path):
            raise features.AudioError("missing_file", path, "no such file")
        file_size = filesystem.size(path)
    except OSError as e:
        raise features.AudioError("missing_file", path, f"cannot stat ({' '.join(str(e).split())})") from e
    if file_size == 0:
        raise features.AudioError("empty_file", path, "file is empty (0 bytes)")
    try:
        with filesystem.path(path).open("rb") as f:
            data = f.read() if filesystem.is_remote(path) else None
            stream = io.BytesIO(data) if data is not None else f
            declared = _declared_wav_data(stream.read(1 << 16), file_size)
            stream.seek(0)
            with soundfile.SoundFile(stream) as sound:
                header_frames, rate = sound.frames, sound.samplerate
                wave = sound.read(dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for corrupt input.
        raise features.AudioError("unreadable", path, f"cannot decode audio: {' '.join(str(e).split())}") from e
    if declared is not None and declared[0] > declared[1]:
        raise features.AudioError(
            "truncated", path, f"WAV data chunk declares {declared[0]} bytes, the file holds {max(declared[1], 0)}"
        )
    if 0 < header_frames < 2**62 and wave.shape[0] < header_frames:
        raise features.AudioError(
            "truncated", path, f"header declares {header_frames} frames, {wave.shape[0]} could be decoded"
        )
    if wave.shape[0] == 0:
        raise features.AudioError("empty_audio", path, "audio has zero samples")
    if not np.all(np.isfinite(wave)):
        raise features.AudioError("non_finite", path, "audio contains NaN or infinite samples")
    return features.prepare_waveform(wave, rate, spec)


def duration_seconds(path: str) -> float:
    """Seconds of audio the header of a local or object-store file declares (reads only the header)."""
    with filesystem.path(path).open("rb") as f:
        return soundfile.info(f).duration
