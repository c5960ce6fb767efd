"""seqio preprocessors: parse, filter, prompt/continuation split, tokenisation and SpecAugment.

Every function here maps one `tf.data.Dataset` of example dicts to another with pure TensorFlow ops,
so the whole chain runs inside the tf.data graph. The order a Task applies them in is

    parse_example -> filter_short -> split_prompt_continuation -> tokenize_transcript -> spec_augment

and, for an encoder that reads w2v-BERT fbank (`TaskConfig.prompt_features`), `fbank_prompt` right
after the split and `stack_prompt` at the end (so SpecAugment masks the 80-bin fbank, as in
Park et al. 2019, not the stacked pairs):

    after fbank_prompt              prompt: float32 [298, 80]  normalised fbank of the first 3 s
    after stack_prompt              prompt: float32 [149, 160] pairs of frames, 50 per second

and the example dict grows like this (frames at 80 per second, 128 mel bins):

    after parse_example             id, transcript, speaker: tf.string []
                                    log_mel: float32 [frames, 128]
    after split_prompt_continuation prompt: float32 [prompt_frames, 128]    (the first 3 s = 240 frames)
                                    continuation: float32 [cont_frames, 128] (the rest, cropped)
                                    total_frames: int32 []                   (before the crop)
    after tokenize_transcript       text: int32 [tokens]                     (no bos, no eos; with sep_id
                                                                             the separator at phi)
                                    text_segments: int32 [tokens]            (with phi_split: 1 / 2)
    after spec_augment              prompt masked (training split only)

Keys a function does not know about (for instance the `split` tag the Task's data source adds, or the
position tags of the input pipeline) pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import seqio
import tensorflow as tf

from spectron_jax.data import features as features_lib
from spectron_jax.data import prompt_features
from spectron_jax.data import tfrecords

# Mel bins per frame (the feature module owns the number: 128).
NUM_MEL_BINS = features_lib.SPECTRON_FEATURES.num_mel

FBANK = prompt_features.FBANK

# Optional word timings of an example: float32 [words], the start of each transcript word in seconds.
WORD_STARTS_KEY = "word_starts"

# Segment ids of `text_segments` (and of the batch's `text_segments`).
PROMPT_SEGMENT = 1
CONTINUATION_SEGMENT = 2

# The TFRecord schema written by `spectron_jax.data.prepare`: one tf.train.Example per utterance.
FEATURE_DESCRIPTION = tfrecords.tfrecord_features()


@dataclasses.dataclass(frozen=True)
class SpecAugmentConfig:
    """SpecAugment of the prompt spectrogram (frequency and time masks, no time warp).

    The paper applies SpecAugment to the prompt but gives no values. The defaults are the LibriSpeech
    basic policy "LB" of Park et al. 2019 (SpecAugment, Interspeech, Table 1: one frequency mask of
    F = 27 bins, one time mask of T = 100 frames of 10 ms = 1 s, upper bound p = 1.0), which was chosen
    for utterances of a few seconds; the time width is given here as a fraction of the prompt, 1 s of a
    3 s prompt. Masks then cover about a quarter of a 3 s prompt's cells on average (the Conformer's
    long-utterance policy of 10 time masks of up to 5 % covered 38 %).
    """

    # Number of frequency masks. DEFAULT, not in the paper: 1 (Park et al. 2019, LB).
    num_freq_masks: int = 1
    # Largest frequency-mask width in mel bins; each width is drawn from 0..max. DEFAULT: 27 (LB).
    max_freq_mask_bins: int = 27
    # Number of time masks. DEFAULT, not in the paper: 1 (LB).
    num_time_masks: int = 1
    # Largest time-mask width as a fraction of the prompt's frame count. DEFAULT: 1/3 (LB's T = 1 s
    # on a 3 s prompt).
    max_time_mask_ratio: float = 1.0 / 3.0
    # What masked cells become: "mean" (the prompt's mean log-mel) or "zero". Zero in the log domain is
    # loud (mel magnitude 1), so the mean is the neutral choice for unnormalised log-mel.
    # DEFAULT, not in the paper.
    mask_value: str = "mean"
    # Mixed with a hash of each example's id and the epoch to seed its masks: an example gets new masks
    # every epoch, the same ones again when a run resumes. DEFAULT, not in the paper.
    seed: int = 0

    def __post_init__(self):
        if self.mask_value not in ("mean", "zero"):
            raise ValueError(f"SpecAugmentConfig.mask_value must be 'mean' or 'zero', got {self.mask_value!r}")
        if min(self.num_freq_masks, self.max_freq_mask_bins, self.num_time_masks) < 0:
            raise ValueError("SpecAugmentConfig mask counts and widths must be >= 0")
        if not 0.0 <= self.max_time_mask_ratio <= 1.0:
            raise ValueError(f"SpecAugmentConfig.max_time_mask_ratio must lie in [0, 1], got {self.max_time_mask_ratio}")


# ----------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------


@seqio.map_over_dataset
def parse_example(features: Mapping[str, tf.Tensor], num_mel_bins: int = NUM_MEL_BINS) -> dict:
    """Shapes a parsed tf.train.Example (see FEATURE_DESCRIPTION) into an utterance dict.

    Args:
      features: `id`, `transcript`, `speaker` (tf.string []), `num_frames` (int64 []), `duration`
        (float32 []) and `log_mel` (float32 [num_frames * num_mel_bins], row-major) or, in float16 shards,
        `log_mel_f16` (its float16 bytes; cast to float32 here, see `tfrecords.log_mel_values`).
      num_mel_bins: mel bins per frame.

    Returns:
      `id`, `transcript`, `speaker` (tf.string []), `log_mel` float32 [frames, num_mel_bins], `word_starts`
      float32 [words] (0 values in shards without word timings) and, when the
      Task parses it (`tfrecords.prompt_fbank_feature`), `prompt_fbank` float32 [fbank_frames, 80] (0 frames
      in shards written without it); any other key outside the TFRecord schema passes through.
    """
    flat = tfrecords.log_mel_values(features) if "log_mel_f16" in features else features["log_mel"]
    num_frames = tf.cast(features["num_frames"], tf.int32)
    check = tf.debugging.assert_equal(
        tf.size(flat),
        num_frames * num_mel_bins,
        message=f"TFRecord example: log_mel holds a number of values other than num_frames * {num_mel_bins}",
    )
    with tf.control_dependencies([check]):
        log_mel = tf.reshape(flat, [num_frames, num_mel_bins])
    out = {k: v for k, v in features.items() if k not in FEATURE_DESCRIPTION}
    out.update(
        id=features["id"],
        transcript=features["transcript"],
        speaker=features["speaker"],
        log_mel=log_mel,
    )
    if WORD_STARTS_KEY in features:
        out[WORD_STARTS_KEY] = features[WORD_STARTS_KEY]
    if prompt_features.FBANK_KEY in features:
        out[prompt_features.FBANK_KEY] = tf.reshape(features[prompt_features.FBANK_KEY], [-1, FBANK.num_mel])
    return out


def decode_serialized_example(serialized: tf.Tensor, num_mel_bins: int = NUM_MEL_BINS) -> dict:
    """Parses one serialised tf.train.Example (tf.string []) into the dict `parse_example` returns."""
    features = tf.io.parse_single_example(serialized, FEATURE_DESCRIPTION)
    return parse_example.__wrapped__(features, num_mel_bins=num_mel_bins)


# ----------------------------------------------------------------------------------------------------
# Length filter and the prompt / continuation split
# ----------------------------------------------------------------------------------------------------


def filter_short(dataset: tf.data.Dataset, min_frames: int) -> tf.data.Dataset:
    """Drops utterances with fewer than `min_frames` log-mel frames.

    `min_frames` is `TaskConfig.min_frames` (prompt plus minimum continuation, 280 frames by default):
    an utterance must cover the whole prompt and leave some continuation to predict.
    """
    return dataset.filter(lambda ex: tf.shape(ex["log_mel"])[0] >= min_frames)


@seqio.map_over_dataset
def split_prompt_continuation(
    features: Mapping[str, tf.Tensor], prompt_frames: int, max_continuation_frames: int | None
) -> dict:
    """Cuts `log_mel` [frames, mel] into the prompt (first `prompt_frames`) and the continuation.

    Args:
      features: an utterance dict with `log_mel` float32 [frames, mel].
      prompt_frames: frames of the prompt (3 s = 240 in the paper).
      max_continuation_frames: the continuation is cropped to this many frames (None: no crop).

    Returns:
      the dict without `log_mel`, plus `prompt` float32 [min(frames, prompt_frames), mel],
      `continuation` float32 [cont_frames, mel] (the frames right after the prompt, at most
      `max_continuation_frames`) and `total_frames` int32 [] (the utterance's frames before the crop).
    """
    log_mel = features["log_mel"]
    out = {k: v for k, v in features.items() if k != "log_mel"}
    out["prompt"] = log_mel[:prompt_frames]
    end = None if max_continuation_frames is None else prompt_frames + max_continuation_frames
    out["continuation"] = log_mel[prompt_frames:end]
    out["total_frames"] = tf.shape(log_mel)[0]
    return out


# ----------------------------------------------------------------------------------------------------
# The w2v-BERT front-end: stored fbank -> normalised, stacked prompt
# ----------------------------------------------------------------------------------------------------


@seqio.map_over_dataset
def fbank_prompt(features: Mapping[str, tf.Tensor], num_frames: int) -> dict:
    """Replaces the log-mel `prompt` by the normalised fbank of the prompt window.

    Args:
      features: an utterance dict with `prompt_fbank` float32 [stored_frames, 80] (`parse_example`).
      num_frames: fbank frames of the prompt window (`prompt_features.fbank_frames(prompt_seconds)`,
        298 for 3 s); the shards must hold at least as many (else an InvalidArgumentError naming the flag).

    Returns:
      the dict without `prompt_fbank`, with `prompt` float32 [num_frames, 80]: each
      bin minus its mean over those frames, over sqrt(sample variance (ddof 1) + 1e-7), as
      `features.stack_fbank` and SeamlessM4T's feature extractor normalise.
    """
    fbank = features[prompt_features.FBANK_KEY]
    # `filter_short` keeps only utterances longer than the prompt window, so all of it must be stored
    check = tf.debugging.assert_greater_equal(
        tf.shape(fbank)[0], num_frames,
        message="TFRecord example holds too few prompt_fbank frames for the prompt window: re-run "
                "spectron_jax.data.prepare with --prompt_features=w2v_bert_fbank (and --prompt_feature_seconds "
                "at least the Task's prompt_seconds)")
    with tf.control_dependencies([check]):
        window = tf.cast(fbank[:num_frames], tf.float64)
    count = tf.cast(tf.shape(window)[0], tf.float64)
    mean = tf.reduce_mean(window, axis=0)
    variance = tf.reduce_sum(tf.square(window - mean), axis=0) / tf.maximum(count - 1.0, 1.0)
    normalised = tf.where(count > 1.0, (window - mean) / tf.sqrt(variance + 1e-7), tf.zeros_like(window))
    out = {k: v for k, v in features.items() if k != prompt_features.FBANK_KEY}
    out["prompt"] = tf.cast(normalised, tf.float32)
    return out


@seqio.map_over_dataset
def stack_prompt(features: Mapping[str, tf.Tensor], stride: int = FBANK.stride) -> dict:
    """`prompt` [frames, bins] -> [frames // stride, stride * bins]: row k is frames stride*k .. stride*k+stride-1
    side by side (a trailing partial group is dropped, as `features.stack_fbank` does)."""
    prompt = features["prompt"]
    bins = prompt.shape[-1]
    usable = tf.shape(prompt)[0] // stride * stride
    out = dict(features)
    out["prompt"] = tf.reshape(prompt[:usable], [-1, stride * bins])
    return out


# ----------------------------------------------------------------------------------------------------
# Tokenisation and the phi split of the transcript
# ----------------------------------------------------------------------------------------------------


def _round_div(numerator: tf.Tensor, denominator: tf.Tensor) -> tf.Tensor:
    """round(numerator / denominator) for non-negative int64 tensors, halves rounded up, in integers."""
    return (2 * numerator + denominator) // (2 * denominator)


def spoken_letters(words: tf.Tensor) -> tf.Tensor:
    """int32 [words]: the letters and digits of each word of `words` (tf.string [words]), what is spoken."""
    return tf.strings.length(tf.strings.regex_replace(words, r"[^\pL\pN]", ""), unit="UTF8_CHAR")


def phi_word_index(words: tf.Tensor, prompt_share: tf.Tensor, word_starts: tf.Tensor | None = None,
                   prompt_seconds: tf.Tensor | None = None) -> tf.Tensor:
    """phi at a word boundary: how many of `words` the prompt's transcript holds (int32 [], 0..words).

    With word timings (`word_starts` float32 [words], seconds from the utterance's start, one per word):
    the word start nearest to `prompt_seconds` (the end of the utterance counts as the start past the
    last word). Without them: the prompt's share of the duration `prompt_share` (float []) of the
    utterance's letters (letters and digits: what is spoken, no spaces or punctuation), snapped to the
    nearest word start. Ties go to the earlier boundary.

    Args:
      words: tf.string [words], the transcript split at whitespace.
      prompt_share: float32 [], prompt frames / total frames.
      word_starts: optional float32 [words] (or [0]: none known, the letter rule applies).
      prompt_seconds: float32 [], the prompt's length, with `word_starts`.
    """
    letters = spoken_letters(words)
    starts = tf.concat([[0.0], tf.cumsum(tf.cast(letters, tf.float32))], 0)  # [words + 1]
    by_letters = tf.argmin(tf.abs(starts - tf.cast(prompt_share, tf.float32) * starts[-1]), output_type=tf.int32)
    if word_starts is None:
        return by_letters
    num_words = tf.size(words)
    timed = tf.size(word_starts) == num_words
    # the start past the last word: the end of the utterance (prompt_seconds / prompt_share)
    end = tf.cast(prompt_seconds, tf.float32) / tf.maximum(tf.cast(prompt_share, tf.float32), 1e-6)
    padded = tf.concat([tf.cast(word_starts, tf.float32), tf.reshape(end, [1])], 0)
    by_time = tf.argmin(tf.abs(padded - tf.cast(prompt_seconds, tf.float32)), output_type=tf.int32)
    return tf.where(timed & (num_words > 0), tf.minimum(by_time, num_words), by_letters)


@seqio.map_over_dataset
def _tokenize_and_split(
    features: Mapping[str, tf.Tensor],
    vocabulary: seqio.Vocabulary,
    phi_split: bool,
    trim_to_kept_audio: bool,
    sep_id: int | None,
    seconds_per_frame: float,
) -> dict:
    total = tf.maximum(tf.cast(features["total_frames"], tf.int64), 1)
    prompt = tf.cast(tf.shape(features["prompt"])[0], tf.int64)
    kept = prompt + tf.cast(tf.shape(features["continuation"])[0], tf.int64)
    out = {k: v for k, v in features.items() if k != WORD_STARTS_KEY}
    if not phi_split and sep_id is None:  # the paper's target: the whole transcript, no boundary needed
        tokens = vocabulary.encode_tf(features["transcript"])
        num_tokens = tf.cast(tf.size(tokens), tf.int64)
        num_kept = _round_div(num_tokens * kept, total) if trim_to_kept_audio else num_tokens
        out["text"] = tf.cast(tokens[:num_kept], tf.int32)
        return out
    # phi at a word boundary: the prompt's words and the rest, tokenised apart (SentencePiece pieces never
    # cross whitespace, so the two together are the whole transcript's tokens)
    words = tf.strings.split(features["transcript"])
    share = tf.cast(prompt, tf.float32) / tf.cast(total, tf.float32)
    word_starts = features.get(WORD_STARTS_KEY)
    k = phi_word_index(words, share, word_starts, tf.cast(prompt, tf.float32) * seconds_per_frame)
    head = tf.strings.reduce_join(words[:k], separator=" ")
    tail = tf.strings.reduce_join(words[k:], separator=" ")
    # a tokenizer without a dummy prefix (Gemma's) needs the space that precedes a word mid-sentence
    tail = tf.where((k > 0) & (k < tf.size(words)), tf.strings.join([" ", tail]), tail)
    prompt_tokens = tf.cast(vocabulary.encode_tf(head), tf.int32)
    cont_tokens = tf.cast(vocabulary.encode_tf(tail), tf.int32)
    if sep_id is not None:
        prompt_tokens = tf.concat([prompt_tokens, tf.constant([sep_id], tf.int32)], 0)
    num_prompt = tf.cast(tf.size(prompt_tokens), tf.int64)
    num_cont = tf.cast(tf.size(cont_tokens), tf.int64)
    if trim_to_kept_audio:  # the continuation's tokens in proportion to its kept audio
        num_cont = tf.minimum(num_cont, _round_div(num_cont * (kept - prompt), tf.maximum(total - prompt, 1)))
    out["text"] = tf.concat([prompt_tokens, cont_tokens[:num_cont]], 0)
    if phi_split:
        positions = tf.range(num_prompt + num_cont)
        out["text_segments"] = tf.cast(tf.where(positions < num_prompt, PROMPT_SEGMENT, CONTINUATION_SEGMENT),
                                       tf.int32)
    return out


def tokenize_transcript(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    phi_split: bool = False,
    trim_to_kept_audio: bool = True,
    text_key: str = "text",
    sep_id: int | None = None,
    seconds_per_frame: float = 1.0 / features_lib.SPECTRON_FEATURES.frames_per_second,
) -> tf.data.Dataset:
    """Tokenises `transcript` into `text` int32 [tokens] with the `text` feature's vocabulary.

    The whole transcript is the text target (the paper's loss needs no alignment). phi, the map from
    the prompt's end to a token index, falls at a word boundary (`phi_word_index`): from the word
    timings when the example has them (`word_starts`), else by the prompt's share of the utterance's
    letters, snapped to the nearest word start. It is an approximation (speaking rate is not constant)
    where no timings are known, not a forced alignment.

    Args:
      dataset: examples after `split_prompt_continuation` (`prompt`, `continuation`, `total_frames`), with
        an optional `word_starts` float32 [words].
      output_features: the Task's features; `output_features[text_key].vocabulary` tokenises.
      phi_split: also write `text_segments` int32 [tokens]: 1 for the prompt's transcript (and the
        separator), 2 for the rest.
      trim_to_kept_audio: when the continuation was cropped, keep only its share of the tokens in
        proportion to the kept continuation frames (without phi: round(tokens * kept frames / total
        frames) of the whole transcript), so the text does not run past the audio. Without a crop this
        keeps every token.
      text_key: the output feature holding the tokens.
      sep_id: the reserved separator token written at phi (between the prompt's transcript and the
        continuation's); None writes none (the paper's target).
      seconds_per_frame: the frame hop, to place the prompt's end among the word timings.
    """
    return _tokenize_and_split(
        dataset,
        vocabulary=output_features[text_key].vocabulary,
        phi_split=phi_split,
        trim_to_kept_audio=trim_to_kept_audio,
        sep_id=sep_id,
        seconds_per_frame=seconds_per_frame,
    )


# ----------------------------------------------------------------------------------------------------
# SpecAugment
# ----------------------------------------------------------------------------------------------------


# The input pipeline tags every record with its epoch under this key (spectron_jax.data.pipeline).
EPOCH_FEATURE = "_input_epoch"
_EPOCH_STRIDE = 1_000_003


def example_seed(example_id: tf.Tensor, seed: int, epoch: tf.Tensor | int = 0) -> tf.Tensor:
    """A stateless-RNG seed int64 [2] from (seed * 1000003 + epoch, a stable 62-bit fingerprint hash of
    the example id)."""
    digest = tf.strings.to_hash_bucket_fast(example_id, 2**62)
    mixed = tf.constant(seed, tf.int64) * _EPOCH_STRIDE + tf.cast(epoch, tf.int64)
    return tf.stack([mixed, digest])


def _stripe_mask(
    seed: tf.Tensor, num_masks: int, max_width: tf.Tensor, size: tf.Tensor
) -> tf.Tensor:
    """bool [size]: the union of `num_masks` stripes, widths uniform in 0..max_width, starts uniform."""
    if num_masks == 0:
        return tf.zeros([size], tf.bool)
    width_seed, start_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    max_width = tf.minimum(max_width, size)
    unit_width = tf.random.stateless_uniform([num_masks], seed=width_seed)
    widths = tf.cast(unit_width * tf.cast(max_width + 1, tf.float32), tf.int32)
    widths = tf.minimum(widths, max_width)
    unit_start = tf.random.stateless_uniform([num_masks], seed=start_seed)
    starts = tf.cast(unit_start * tf.cast(size - widths + 1, tf.float32), tf.int32)
    starts = tf.minimum(starts, size - widths)
    index = tf.range(size)[:, None]  # [size, 1]
    inside = (index >= starts[None, :]) & (index < (starts + widths)[None, :])  # [size, num_masks]
    return tf.reduce_any(inside, axis=1)


def spec_augment_mask(num_frames: tf.Tensor, num_bins: int, seed: tf.Tensor, config: SpecAugmentConfig) -> tf.Tensor:
    """bool [num_frames, num_bins]: True where SpecAugment masks (whole frames or whole mel bins).

    Time-mask widths are drawn from 0..floor(max_time_mask_ratio * num_frames), frequency-mask widths
    from 0..max_freq_mask_bins; every draw comes from the stateless RNG under `seed` (int64 [2]).
    """
    time_seed, freq_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    num_frames = tf.cast(num_frames, tf.int32)
    max_time = tf.cast(tf.floor(config.max_time_mask_ratio * tf.cast(num_frames, tf.float32)), tf.int32)
    time_mask = _stripe_mask(time_seed, config.num_time_masks, max_time, num_frames)  # [frames]
    freq_mask = _stripe_mask(
        freq_seed, config.num_freq_masks, tf.constant(config.max_freq_mask_bins, tf.int32), tf.constant(num_bins)
    )  # [bins]
    return time_mask[:, None] | freq_mask[None, :]


@seqio.map_over_dataset
def _spec_augment_prompt(
    features: Mapping[str, tf.Tensor], config: SpecAugmentConfig, splits: Sequence[str] | None
) -> dict:
    prompt = features["prompt"]  # [frames, mel]
    mask = spec_augment_mask(tf.shape(prompt)[0], prompt.shape[-1], example_seed(features["id"], config.seed, features.get(EPOCH_FEATURE, 0)), config)
    fill = tf.reduce_mean(prompt) if config.mask_value == "mean" else tf.constant(0.0, prompt.dtype)
    masked = tf.where(mask, fill, prompt)
    if splits is not None:
        if "split" not in features:
            raise ValueError("spec_augment: the examples carry no 'split' tag; pass splits=None to augment all")
        is_augmented = tf.reduce_any(tf.equal(features["split"], tf.constant(list(splits), tf.string)))
        masked = tf.where(is_augmented, masked, prompt)
    out = dict(features)
    out["prompt"] = masked
    return out


def spec_augment(
    dataset: tf.data.Dataset,
    config: SpecAugmentConfig = SpecAugmentConfig(),
    splits: Sequence[str] | None = ("train",),
) -> tf.data.Dataset:
    """Masks the `prompt` float32 [frames, mel] with SpecAugment; the continuation is never touched.

    Masks are deterministic per (example, epoch): seeded by (config.seed, the epoch tag
    `EPOCH_FEATURE` the input pipeline adds, 0 without it, hash of `id`), so each epoch draws new masks
    and a resumed input pipeline sees the same masks again; no seed depends on an example's position
    in the stream.

    Args:
      dataset: examples with `id` (tf.string []) and `prompt`.
      config: mask counts, widths and fill value.
      splits: augment only examples whose `split` tag (added by the Task's data source) is one of these;
        None augments every example.
    """
    return _spec_augment_prompt(dataset, config=config, splits=None if splits is None else tuple(splits))
