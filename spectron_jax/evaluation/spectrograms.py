"""Spectrogram panels of a report's rows: the log-mel of each wav a row names, on one colour scale.

A suite writes its audio under OUT/wavs/ and names the files in each row (`row["wavs"]`: kind ->
path relative to OUT, e.g. `{"prompt": "wavs/x_prompt.wav", "generated": ..., "true": ...}`). The
panels are computed from those files, so every row in the folder gets one, the rows a resumed run
reused as well as the rows it scored; the generated panel is the log-mel of the audio the report plays
(the vocoder's output), not the decoder's frames.

All panels of a report share one colour scale (`shared_scale`: the range of every finite value of every
panel), so that a quiet continuation looks quiet beside a loud one instead of each panel being stretched
to its own range.
"""

from __future__ import annotations

import io
import warnings
from typing import Mapping, Sequence

import numpy as np

from spectron_jax import filesystem
from spectron_jax.data import features

CMAP = "magma"
KIND_ORDER = ("prompt", "generated", "true", "resynthesized", "answer")
DRAWN = ("prompt", "generated", "true", "answer")  # report.html plays every wav, draws these (DEFAULT)
MEL_POOL = 2  # report.html draws 64 rows of the 128 mel bins (pairs averaged): half the page size. DEFAULT


def wav_kinds(row: Mapping) -> list[str]:
    """The wav kinds a row names, in `KIND_ORDER` first, then any others alphabetically."""
    named = dict(row.get("wavs") or {})
    return [k for k in KIND_ORDER if k in named] + sorted(k for k in named if k not in KIND_ORDER)


def read_wave(path: str) -> np.ndarray | None:
    """[samples] float32 of a local or object-store wav at the feature rate; None when it cannot be read."""
    try:
        return features.load_audio(path)
    except features.AudioError:
        return None


def row_panels(output_dir: filesystem.PathLike, rows: Sequence[Mapping],
               kinds: Sequence[str] | None = None) -> list[dict]:
    """One panel per row that names wavs: {"id", kind: log-mel [frames, mel] for each readable wav}.

    Args:
      output_dir: the report folder the rows' wav paths are relative to.
      rows: examples.jsonl rows.
      kinds: the wav kinds to read (default: every kind the row names).

    Rows without wavs are left out; a wav that is missing or unreadable is left out of its panel.
    """
    panels = []
    for row in rows:
        wanted = [k for k in wav_kinds(row) if kinds is None or k in kinds]
        if not wanted:
            continue
        panel: dict = {"id": row.get("id", "")}
        for kind in wanted:
            wave = read_wave(filesystem.join(output_dir, row["wavs"][kind]))
            if wave is not None:
                with warnings.catch_warnings():  # a wave shorter than one FFT window: a frame or two, drawn as is
                    warnings.filterwarnings("ignore", message="n_fft=.* is too large", category=UserWarning)
                    panel[kind] = features.log_mel(wave)
        panels.append(panel)
    return panels


def _arrays(panels: Sequence[Mapping]) -> list[np.ndarray]:
    return [np.asarray(v, np.float32) for p in panels for k, v in p.items() if k != "id"]


def shared_scale(panels: Sequence[Mapping]) -> tuple[float, float]:
    """(vmin, vmax): the range of every finite value of every panel ((0, 1) when there is none)."""
    finite = [a[np.isfinite(a)] for a in _arrays(panels) if a.size]
    finite = [a for a in finite if a.size]
    if not finite:
        return 0.0, 1.0
    low, high = float(min(a.min() for a in finite)), float(max(a.max() for a in finite))
    return (low, high) if high > low else (low, low + 1.0)


def png(frames: np.ndarray, scale: tuple[float, float], mel_pool: int = 1) -> bytes:
    """A log-mel [frames, mel] as an 8-bit palette PNG on colour scale `scale` (time left to right, low mel
    at the bottom): value v gets `CMAP`'s colour at (v - low) / (high - low), clipped to [0, 1], as
    matplotlib maps it (256 levels). `mel_pool` averages that many adjacent mel bins into one pixel row."""
    from matplotlib import colormaps
    from PIL import Image

    frames = np.asarray(frames, np.float32)
    if frames.ndim != 2 or not frames.size:
        frames = np.full((1, 1), scale[0], np.float32)
    if mel_pool > 1 and frames.shape[1] % mel_pool == 0:
        frames = frames.reshape(frames.shape[0], -1, mel_pool).mean(-1)
    low, high = scale
    unit = np.clip((np.nan_to_num(frames.T, nan=low) - low) / (high - low), 0.0, 1.0)
    levels = np.minimum((unit * 256).astype(np.int64), 255).astype(np.uint8)[::-1]  # row 0 is the top
    palette = np.round(colormaps[CMAP](np.arange(256))[:, :3] * 255).astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(levels))  # mode L; the palette makes it P
    picture.putpalette(palette.ravel().tolist())
    buffer = io.BytesIO()
    picture.save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def colour_bar_png(width: int = 256, height: int = 12) -> bytes:
    """The colour scale as a PNG, low values on the left."""
    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1)).T  # [width, height]: as frames
    return png(ramp, (0.0, 1.0))
