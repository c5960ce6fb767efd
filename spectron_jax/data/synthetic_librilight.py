"""A synthetic corpus in the Libri-Light layout, for measuring and testing `prepare` without the download.

    python -m spectron_jax.data.synthetic_librilight --output=DIR [--hours=1] [--file_seconds=60] [--seed=0]

writes `DIR/audio/<speaker>/<book>/<name>.flac` (16 kHz mono) with `<name>.json` beside each
(`{"voice_activity": [[start_s, end_s], ...]}`, the true intervals of the signal), and
`DIR/transcripts.tsv` in the `id<TAB>transcript` form that `prepare --format=librilight` reads: one
made-up line per planned segment (`sources.plan_librilight_segments` with the default VAD
segmentation, 13 s). Then:

    python -m spectron_jax.data.prepare --format=librilight --input=DIR/audio --transcripts=DIR/transcripts.tsv ...

The signal is speech-like for the featuriser and the splitter: "words" of 0.2-0.6 s (a few harmonics
of a gliding pitch, amplitude-shaped) in "phrases" of 1-5 s separated by 0.3-1.0 s of faint noise;
only its duration and structure matter, not its content. Deterministic for a seed.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from spectron_jax import cli

SAMPLE_RATE = 16000
_WORDS = "the of and to a in was he that it his her with as had for you she not on at but be by is".split()


def _phrase(rng: np.random.Generator, seconds: float) -> np.ndarray:
    parts = []
    left = seconds
    while left > 0.05:
        word = min(left, rng.uniform(0.2, 0.6))
        t = np.arange(int(word * SAMPLE_RATE)) / SAMPLE_RATE
        f0 = rng.uniform(90, 240) * (1 + 0.15 * t / max(word, 1e-3))
        wave = sum((0.5 / k) * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) for k in range(1, 6))
        parts.append(wave * np.hanning(t.size) * rng.uniform(0.2, 0.5))
        gap = min(left - word, rng.uniform(0.0, 0.08))
        parts.append(np.zeros(int(max(gap, 0) * SAMPLE_RATE)))
        left -= word + max(gap, 0)
    return np.concatenate(parts) if parts else np.zeros(0)


def synthesise_file(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, list[list[float]]]:
    """([samples] float32 audio of `seconds`, its voice-activity intervals in seconds)."""
    total = int(round(seconds * SAMPLE_RATE))
    audio = rng.normal(0, 1e-4, total)  # faint noise where nobody speaks
    intervals, at = [], rng.uniform(0.1, 0.5)
    while True:
        length = rng.uniform(1.0, 5.0)
        if at + length > seconds - 0.1:
            break
        phrase = _phrase(rng, length)
        start = int(round(at * SAMPLE_RATE))
        audio[start : start + phrase.size] += phrase
        intervals.append([round(at, 3), round(at + phrase.size / SAMPLE_RATE, 3)])
        at += phrase.size / SAMPLE_RATE + rng.uniform(0.3, 1.0)
    return audio.astype(np.float32), intervals


def write_corpus(output: str, hours: float = 1.0, file_seconds: float = 60.0, seed: int = 0) -> dict:
    """Writes the corpus (see the module docstring); returns {files, audio_seconds, segments, transcripts}."""
    import soundfile

    from spectron_jax.data import sources

    rng = np.random.default_rng(seed)
    audio_root = os.path.join(output, "audio")
    count = max(1, int(round(hours * 3600 / file_seconds)))
    seconds = 0.0
    for k in range(count):
        speaker, book = 100 + k % 7, 200 + k % 3
        folder = os.path.join(audio_root, str(speaker), str(book))
        os.makedirs(folder, exist_ok=True)
        audio, intervals = synthesise_file(rng, file_seconds)
        name = f"chapter_{k:04d}_64kb"
        soundfile.write(os.path.join(folder, name + ".flac"), audio, SAMPLE_RATE)
        with open(os.path.join(folder, name + ".json"), "w", encoding="utf-8") as f:
            json.dump({"voice_activity": intervals}, f)
        seconds += audio.size / SAMPLE_RATE
    planned, _ = sources.plan_librilight_segments(audio_root)
    transcripts = os.path.join(output, "transcripts.tsv")
    with open(transcripts, "w", encoding="utf-8") as f:
        f.write("id\ttranscript\n")
        for seg_id, _, start, end in planned:
            words = rng.choice(_WORDS, size=max(1, int((end - start) * 2.5)))
            f.write(f"{seg_id}\t{' '.join(words)}\n")
    return {"files": count, "audio_seconds": seconds, "segments": len(planned), "transcripts": transcripts}


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="spectron_jax.data.synthetic_librilight", description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="folder to write (audio/ and transcripts.tsv)")
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--file_seconds", type=float, default=60.0, help="length of each audio file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.hours > 0 or not args.file_seconds >= 2:
        raise cli.UsageError(f"--hours must be > 0 and --file_seconds >= 2, got {args.hours} and {args.file_seconds}")
    made = write_corpus(args.output, args.hours, args.file_seconds, args.seed)
    print(f"wrote {made['files']} files ({made['audio_seconds'] / 3600:.3f} h, {made['segments']} segments) "
          f"and {made['transcripts']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
