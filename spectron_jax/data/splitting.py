"""Splitting long utterances at pauses (in `prepare`), so that no example is cropped mid-sentence.

Training reads an utterance as a 3 s prompt plus a continuation of at most 10 s (`tasks.TaskConfig`),
and crops the rest. An utterance whose log-mel is longer than that window (`SplitConfig.max_seconds`,
DEFAULT 13 s = 1040 frames, the TaskConfig defaults' prompt + continuation) is cut here into pieces
that fit, at pauses, and its transcript is divided between the pieces at word boundaries.

The rule (all knobs DEFAULTs, not in the paper):

1. Frame loudness: `20 log10(mean over mel bins of exp(log_mel))` per frame, in dB (the log-mel's
   magnitude, so the same frames the shard stores decide).
2. Silent frames: quieter than the utterance's 95th-percentile loudness minus `pause_db` (35 dB).
   A **pause** is a run of at least `min_pause_seconds` (0.2 s = 16 frames) of silent frames; the
   candidate cut is its middle frame.
3. Cuts: among the candidate cuts, the set that first loses the fewest frames, then makes the fewest
   pieces, then makes the shortest piece as long as possible (a dynamic programme over the cuts), with
   every kept piece at most `max_seconds`. A stretch between two neighbouring candidates (or the
   utterance's ends) that is itself longer than `max_seconds` cannot be split at a pause: it is
   **dropped** and counted (reason `too_long`), never cut mid-speech.
4. Transcript: the words are divided in order, in proportion to **speech** (non-silent frames) per
   piece, measured in letters: the boundary after piece k is the word boundary whose letters-so-far
   come nearest to the piece's share of speech so far, with at least one word per piece where the
   words suffice. The pieces' transcripts joined with single spaces equal the original transcript (its
   whitespace runs collapsed to single spaces); words of a dropped stretch are dropped with it. This
   is an approximation: no word alignment is used, so a word at a boundary can land in the piece next
   to the one where it is spoken.

Pieces are cut from the stored log-mel frames (`frames[a:b]`): the cut lies inside a pause of at least
0.2 s, so each boundary frame's 64 ms FFT window sees only the pause. A piece's id is
`<id>-<start ms, 8 digits>-<end ms, 8 digits>` (file times, as `sources.segment_id`), its duration
`frames * hop / sample_rate`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spectron_jax.data import features, sources


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How `prepare` splits utterances longer than the training window (see the module docstring)."""

    max_seconds: float | None = 13.0  # longest example; None or 0 keeps every utterance whole. DEFAULT.
    min_pause_seconds: float = 0.2  # shortest pause to cut at. DEFAULT.
    pause_db: float = 35.0  # silence: this far below the 95th-percentile frame loudness. DEFAULT.

    def __post_init__(self):
        if self.max_seconds is not None and self.max_seconds < 0:
            raise ValueError(f"SplitConfig.max_seconds must be >= 0 or None, got {self.max_seconds}")
        if not self.min_pause_seconds > 0:
            raise ValueError(f"SplitConfig.min_pause_seconds must be > 0, got {self.min_pause_seconds}")
        if not self.pause_db > 0:
            raise ValueError(f"SplitConfig.pause_db must be > 0, got {self.pause_db}")

    def max_frames(self, spec: features.FeatureSpec) -> int | None:
        """The window in frames (1040 for 13 s), None when splitting is off."""
        return features.frames_for_seconds(self.max_seconds, spec) if self.max_seconds else None


@dataclasses.dataclass(frozen=True)
class Piece:
    """Frames [start, end) of an utterance; `kept` False for a stretch too long to keep."""

    start: int
    end: int
    kept: bool


def silent_frames(log_mel: np.ndarray, pause_db: float) -> np.ndarray:
    """[frames] bool: frames quieter than the 95th-percentile loudness minus `pause_db` (log_mel [T, mel])."""
    loudness = 20.0 * np.log10(np.maximum(np.exp(log_mel.astype(np.float64)).mean(axis=1), 1e-30))
    return loudness < np.percentile(loudness, 95) - pause_db


def find_pauses(silent: np.ndarray, min_frames: int) -> list[tuple[int, int]]:
    """Runs [start, end) of at least `min_frames` True frames in `silent` [frames]."""
    padded = np.concatenate([[False], silent, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    runs = zip(edges[0::2], edges[1::2])
    return [(int(a), int(b)) for a, b in runs if b - a >= min_frames]


def plan_pieces(num_frames: int, cuts: list[int], max_frames: int) -> list[Piece]:
    """Pieces covering [0, num_frames) cut at a subset of `cuts` (sorted frame indices), see rule 3."""
    points = [0] + [c for c in sorted(set(cuts)) if 0 < c < num_frames] + [num_frames]
    # best[j]: (frames dropped, pieces kept, -shortest kept piece) of the best plan of [0, points[j]).
    best: list[tuple | None] = [None] * len(points)
    back: list[tuple[int, bool] | None] = [None] * len(points)
    best[0] = (0, 0, -num_frames)
    for j in range(1, len(points)):
        for i in range(j - 1, -1, -1):
            length = points[j] - points[i]
            if length > max_frames and i < j - 1:
                break  # longer spans from further back cannot fit either
            if best[i] is None:
                continue
            dropped, pieces, neg_short = best[i]
            if length <= max_frames:
                option = (dropped, pieces + 1, max(neg_short, -length))
            else:  # the stretch between neighbouring cuts is too long: drop it
                option = (dropped + length, pieces, neg_short)
            if best[j] is None or option < best[j]:
                best[j], back[j] = option, (i, length <= max_frames)
    pieces, j = [], len(points) - 1
    while j > 0:
        i, kept = back[j]
        pieces.append(Piece(points[i], points[j], kept))
        j = i
    return pieces[::-1]


def divide_transcript(text: str, weights: list[float]) -> list[str]:
    """Splits `text`'s words into len(weights) consecutive groups in proportion to `weights` (rule 4)."""
    words = text.split()
    count = len(weights)
    letters = np.concatenate([[0], np.cumsum([len(w) for w in words])])
    total_weight = float(sum(weights))
    cumulative = np.cumsum(weights) / total_weight if total_weight > 0 else np.arange(1, count + 1) / count
    bounds, previous = [0], 0
    for k in range(count - 1):
        spare = len(words) >= count  # enough words for one per piece
        low = previous + 1 if spare else previous
        high = len(words) - (count - 1 - k) if spare else len(words)
        target = cumulative[k] * letters[-1]
        candidates = np.arange(low, max(low, high) + 1)
        choice = int(candidates[np.argmin(np.abs(letters[candidates] - target))])
        bounds.append(choice)
        previous = choice
    bounds.append(len(words))
    return [" ".join(words[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def split_utterance(
    segment: sources.Segment,
    log_mel: np.ndarray,
    config: SplitConfig,
    spec: features.FeatureSpec,
    source: str = "",
    split: str | None = None,
) -> list[tuple[sources.Segment, np.ndarray] | sources.Skip]:
    """The pieces of one utterance (itself when it fits or splitting is off), see the module docstring.

    Args:
      segment: the utterance (id, transcript, speaker, start s in its file).
      log_mel: [frames, mel] its features.
      config, spec: the split knobs and the feature numbers.
      source, split: what a Skip of a dropped stretch names.

    Returns:
      In order, (piece Segment, [piece frames, mel]) for each kept piece and a Skip (`too_long`, or
      `empty_transcript` for a piece left without words) for each dropped one.
    """
    max_frames = config.max_frames(spec)
    if not max_frames or log_mel.shape[0] <= max_frames:
        return [(segment, log_mel)]
    silent = silent_frames(log_mel, config.pause_db)
    min_frames = max(1, features.frames_for_seconds(config.min_pause_seconds, spec))
    cuts = [(a + b) // 2 for a, b in find_pauses(silent, min_frames)]
    pieces = plan_pieces(log_mel.shape[0], cuts, max_frames)
    speech = [float(np.count_nonzero(~silent[p.start : p.end])) for p in pieces]
    texts = divide_transcript(segment.transcript, speech)
    seconds_per_frame = spec.hop / spec.sample_rate
    out: list = []
    for piece, text in zip(pieces, texts):
        start = segment.start + piece.start * seconds_per_frame
        end = segment.start + piece.end * seconds_per_frame
        piece_id = sources.segment_id(segment.id, start, end)
        seconds = (piece.end - piece.start) * seconds_per_frame
        if not piece.kept:
            words = len(text.split())
            detail = f"{seconds:.2f} s without a pause of {config.min_pause_seconds} s; {words} words dropped"
            out.append(sources.Skip(piece_id, source, split, "too_long", detail))
        elif not text:
            out.append(sources.Skip(piece_id, source, split, "empty_transcript", "no words left for this piece"))
        else:
            piece_segment = dataclasses.replace(segment, id=piece_id, transcript=text, start=start, end=end)
            out.append((piece_segment, log_mel[piece.start : piece.end]))
    return out
