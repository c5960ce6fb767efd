"""Utterance augmentation before the prompt split: speed, a mel-bin shift and a later prompt start.

A small corpus (the embedded one has 394 training utterances) is memorised long before the model learns
to read speech. These transforms make each epoch see a different rendering of every utterance, while the
whole example stays consistent (prompt, continuation and transcript are transformed together):

- **speed** `f` drawn uniformly from `[min_speed, max_speed]`: the log-mel is resampled along time by
  linear interpolation, `frames' = round(frames / f)` (f > 1 speaks faster). Pitch is unchanged, as in
  the tempo perturbation of Ko et al. 2015 (Audio augmentation for speech recognition), which perturbs
  by 0.9 / 1.0 / 1.1; here a continuous range.
- **mel shift** `s` drawn from `-max_mel_shift..max_mel_shift`: every frame's bins move by `s` (edge bins
  repeated), a coarse vocal-tract / pitch change in the spirit of VTLP (Jaitly & Hinton 2013). The
  speaker's voice moves as a whole, prompt and continuation alike.
- **later start** (`max_start_words` > 0): the utterance starts at the `w`-th word, `w` drawn from
  `0..min(max_start_words, words - 2)`, so the 3 s prompt window covers other words than always the
  first ones. The cut is at the word's start from the word timings when the example has them, else at
  its letter share of the utterance's duration (the rule `phi` uses), minus `start_margin_seconds`; the
  transcript loses the first `w` words.

Draws are deterministic per (example, epoch), from the stateless RNG under `preprocessors.example_seed`,
so each epoch differs and a resumed input pipeline sees the same draws again. Only examples of the
`splits` (training by default) are changed; others pass through untouched (no op runs on their frames).

Shapes (80 frames per second, 128 mel bins):

    in   log_mel float32 [frames, mel], transcript tf.string [], word_starts float32 [words] or [0]
    out  log_mel float32 [frames', mel], transcript with the first w words removed, word_starts
         (shifted and scaled, when they were given) float32 [words - w] or [0]

Every knob is a DEFAULT, not in the paper (which trains on 60k hours and augments only the prompt with
SpecAugment).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import seqio
import tensorflow as tf

from spectron_jax.data import preprocessors

# Offsets of the augmentation's draws in the stateless RNG (they share the example's seed).
_SPEED, _SHIFT, _START = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class UtteranceAugmentConfig:
    """Knobs of `augment_utterance`; the defaults change nothing (every transform off).

    Attributes:
      min_speed, max_speed: the range of the speed factor (1.0, 1.0: off). DEFAULT, not in the paper.
      max_mel_shift: largest mel-bin shift either way (0: off). DEFAULT, not in the paper.
      max_start_words: largest number of leading words cut (0: off). DEFAULT, not in the paper.
      start_margin_seconds: the cut is this much before the word's estimated start, so that a timing
        error does not cut into the word. DEFAULT, not in the paper: 0.05 s.
      seed: mixed with the example's id and epoch. DEFAULT: 0.
    """

    min_speed: float = 1.0
    max_speed: float = 1.0
    max_mel_shift: int = 0
    max_start_words: int = 0
    start_margin_seconds: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.min_speed <= self.max_speed:
            raise ValueError(f"UtteranceAugmentConfig: need 0 < min_speed <= max_speed, got "
                             f"{self.min_speed}, {self.max_speed}")
        if self.max_mel_shift < 0 or self.max_start_words < 0 or self.start_margin_seconds < 0:
            raise ValueError("UtteranceAugmentConfig.max_mel_shift, max_start_words and start_margin_seconds "
                             "must be >= 0")

    @property
    def active(self) -> bool:
        """Whether any transform is on."""
        return self.max_speed != 1.0 or self.min_speed != 1.0 or self.max_mel_shift > 0 or self.max_start_words > 0


def resample_time(log_mel: tf.Tensor, speed: tf.Tensor) -> tf.Tensor:
    """log_mel float32 [frames, mel] -> [round(frames / speed), mel] by linear interpolation in time.

    Output frame j reads input position j * speed (clamped to the last frame)."""
    frames = tf.shape(log_mel)[0]
    out_frames = tf.maximum(tf.cast(tf.round(tf.cast(frames, tf.float32) / speed), tf.int32), 1)
    position = tf.minimum(tf.cast(tf.range(out_frames), tf.float32) * speed, tf.cast(frames - 1, tf.float32))
    lower = tf.cast(tf.floor(position), tf.int32)
    upper = tf.minimum(lower + 1, frames - 1)
    weight = (position - tf.cast(lower, tf.float32))[:, None]  # [frames', 1]
    return (1.0 - weight) * tf.gather(log_mel, lower) + weight * tf.gather(log_mel, upper)


def shift_mel(log_mel: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """log_mel float32 [frames, mel] with bin b taking bin clip(b - shift) (edge bins repeated)."""
    bins = tf.shape(log_mel)[1]
    source = tf.clip_by_value(tf.range(bins) - tf.cast(shift, tf.int32), 0, bins - 1)
    return tf.gather(log_mel, source, axis=1)


def word_start_seconds(words: tf.Tensor, duration: tf.Tensor, word_starts: tf.Tensor | None) -> tf.Tensor:
    """float32 [words]: each word's start, from `word_starts` when it holds one per word, else its
    letter share (letters and digits before it over all of them) of `duration` seconds."""
    letters = preprocessors.spoken_letters(words)
    before = tf.cumsum(tf.cast(letters, tf.float32), exclusive=True)
    by_letters = before / tf.maximum(tf.reduce_sum(tf.cast(letters, tf.float32)), 1.0) * duration
    if word_starts is None:
        return by_letters
    timed = tf.size(word_starts) == tf.size(words)
    return tf.cond(timed, lambda: tf.reshape(tf.cast(word_starts, tf.float32), [-1]), lambda: by_letters)


def _augment(features: Mapping[str, tf.Tensor], config: UtteranceAugmentConfig, frames_per_second: float,
             min_frames: int) -> dict:
    seeds = tf.random.experimental.stateless_split(
        preprocessors.example_seed(features["id"], config.seed, features.get(preprocessors.EPOCH_FEATURE, 0)), 3)
    log_mel = features["log_mel"]
    transcript = features["transcript"]
    word_starts = features.get(preprocessors.WORD_STARTS_KEY)
    out = dict(features)

    if config.max_start_words > 0:
        words = tf.strings.split(transcript)
        num_words = tf.size(words)
        duration = tf.cast(tf.shape(log_mel)[0], tf.float32) / frames_per_second
        highest = tf.maximum(tf.minimum(config.max_start_words, num_words - 2), 0)
        cut = tf.random.stateless_uniform([], seed=seeds[_START], minval=0, maxval=highest + 1, dtype=tf.int32)
        starts = word_start_seconds(words, duration, word_starts)
        start_s = tf.where(cut > 0, tf.maximum(tf.gather(starts, tf.minimum(cut, tf.maximum(num_words - 1, 0)))
                                               - config.start_margin_seconds, 0.0), 0.0)
        first = tf.cast(tf.round(start_s * frames_per_second), tf.int32)
        # no cut where what is left (at the fastest speed) would fall under the Task's shortest utterance
        fits = tf.cast(tf.shape(log_mel)[0] - first, tf.float32) / config.max_speed >= min_frames
        cut = tf.where(fits, cut, 0)
        start_s = tf.where(fits, start_s, 0.0)
        first = tf.where(fits, first, 0)
        log_mel = log_mel[first:]
        transcript = tf.strings.reduce_join(words[cut:], separator=" ")
        if word_starts is not None:
            timed = tf.size(word_starts) == num_words
            word_starts = tf.cond(timed, lambda: word_starts[cut:] - start_s, lambda: word_starts)

    if config.max_speed != 1.0 or config.min_speed != 1.0:
        speed = tf.random.stateless_uniform([], seed=seeds[_SPEED], minval=config.min_speed, maxval=config.max_speed)
        # never so fast that a kept utterance falls under the Task's shortest one
        longest = tf.cast(tf.shape(log_mel)[0], tf.float32) / float(max(min_frames, 1))
        speed = tf.minimum(speed, tf.maximum(longest, min(config.min_speed, 1.0)))
        log_mel = resample_time(log_mel, speed)
        if word_starts is not None:
            word_starts = word_starts / speed

    if config.max_mel_shift > 0:
        shift = tf.random.stateless_uniform([], seed=seeds[_SHIFT], minval=-config.max_mel_shift,
                                            maxval=config.max_mel_shift + 1, dtype=tf.int32)
        log_mel = shift_mel(log_mel, shift)

    out["log_mel"] = log_mel
    out["transcript"] = transcript
    if word_starts is not None:
        out[preprocessors.WORD_STARTS_KEY] = word_starts
    return out


@seqio.map_over_dataset
def _augment_examples(features: Mapping[str, tf.Tensor], config: UtteranceAugmentConfig,
                      splits: Sequence[str] | None, frames_per_second: float, min_frames: int) -> dict:
    if splits is None:
        return _augment(features, config, frames_per_second, min_frames)
    if "split" not in features:
        raise ValueError("augment_utterance: the examples carry no 'split' tag; pass splits=None to augment all")
    chosen = tf.reduce_any(tf.equal(features["split"], tf.constant(list(splits), tf.string)))
    keys = [preprocessors.WORD_STARTS_KEY] if preprocessors.WORD_STARTS_KEY in features else []
    changed = ["log_mel", "transcript"] + keys
    branch = tf.cond(chosen, lambda: {k: v for k, v in _augment(features, config, frames_per_second, min_frames).items()
                                      if k in changed},
                     lambda: {k: features[k] for k in changed})
    return {**features, **branch}


def augment_utterance(dataset: tf.data.Dataset, config: UtteranceAugmentConfig,
                      splits: Sequence[str] | None = ("train",),
                      frames_per_second: float = 80.0, min_frames: int = 0) -> tf.data.Dataset:
    """Speed, mel shift and later start of each example of `splits` (see the module docstring).

    Args:
      dataset: utterance dicts after `preprocessors.parse_example` (`id`, `transcript`, `log_mel`
        float32 [frames, mel], optional `word_starts` float32 [words]; the `split` tag with `splits`).
      config: the transforms' ranges.
      splits: augment only examples whose `split` tag is one of these; None augments every example.
      frames_per_second: the log-mel frame rate (80).
      min_frames: the Task's shortest kept utterance (`TaskConfig.min_frames`): no draw makes a long
        enough utterance shorter than this (a later start is skipped, the speed capped), so augmentation
        never drops an example that the length filter would keep.
    """
    if not config.active:
        return dataset
    return _augment_examples(dataset, config=config, splits=None if splits is None else tuple(splits),
                             frames_per_second=frames_per_second, min_frames=min_frames)
