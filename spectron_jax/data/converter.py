"""The feature converter: preprocessed examples -> fixed-shape model batches (no packing).

Input, one example after the Task's preprocessors (`spectron_jax.data.preprocessors`):

    prompt         float32 [prompt_frames, 128]
    continuation   float32 [cont_frames, 128]
    text           int32   [tokens]            transcript tokens, no bos / eos
    text_segments  int32   [tokens]            optional (phi split): 1 prompt part, 2 continuation part

Output, one row of the model batch (the contract `loss_fn` reads):

    prompt_frames  float32 [prompt_len, 128]   zero-padded (160 values per frame for a w2v-BERT encoder)
    prompt_mask    int32   [prompt_len]        1 = valid frame
    text_inputs    int32   [text_len]          sos y_1 .. y_N, then pad
    text_targets   int32   [text_len]          y_1 .. y_N eos, then pad
    text_weights   float32 [text_len]          1.0 on every real target (eos included)
    text_segments  int32   [text_len]          only with `with_segments`: segment of each target, eos -> 2
    cont_frames    float32 [cont_len, 128]     zero-padded, cont_len a multiple of the reduction factor
    cont_mask      int32   [cont_len]          1 = valid frame (a prefix of the row)

Nothing is dropped silently: what does not fit is cut, and each row reports how much was cut in a
separate stats dict (`truncated_prompt_frames`, `truncated_text_tokens`, `truncated_cont_frames`), which
the input pipeline sums and logs. An over-long transcript keeps its first text_len - 1 tokens and still
ends in eos, so the model always sees the text -> speech delimiter.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from spectron_jax.data import preprocessors

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = 3  # the `sos` token that starts every text input

BATCH_KEYS = (
    "prompt_frames",
    "prompt_mask",
    "text_inputs",
    "text_targets",
    "text_weights",
    "text_segments",
    "cont_frames",
    "cont_mask",
)
STATS_KEYS = ("truncated_prompt_frames", "truncated_text_tokens", "truncated_cont_frames")


def _pad_rows(values: tf.Tensor, length: int, value=0) -> tf.Tensor:
    """Cuts `values` [n, ...] to at most `length` rows, then pads it with `value` to exactly `length`."""
    values = values[:length]
    padding = [[0, length - tf.shape(values)[0]]] + [[0, 0]] * (values.shape.rank - 1)
    return tf.pad(values, padding, constant_values=value)


@dataclasses.dataclass(frozen=True)
class SpectronFeatureConverter:
    """Pads and cuts examples to the fixed batch shapes of the model (see the module docstring)."""

    # Frames of the prompt slot; 3 s = 240 frames fits exactly.
    prompt_len: int = 240
    # Text slots, sos/eos included.
    text_len: int = 128
    # Continuation frames; must be a multiple of `reduction_factor` (10 s = 800 frames by default).
    cont_len: int = 800
    # Spectrogram frames per decoder step (the paper uses 1).
    reduction_factor: int = 1
    # Emit `text_segments` (needs the phi split in the Task).
    with_segments: bool = False
    num_mel_bins: int = preprocessors.NUM_MEL_BINS
    # Values per prompt frame (None: num_mel_bins); 160 for stacked w2v-BERT fbank (prompt_features).
    prompt_dim: int | None = None
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID

    def __post_init__(self):
        if self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.cont_len < 1 or self.cont_len % self.reduction_factor:
            r = self.reduction_factor
            nearest = max(1, -(-self.cont_len // r)) * r
            raise ValueError(
                f"cont_len ({self.cont_len}) must be a positive multiple of the reduction factor r={r}, e.g. {nearest}"
            )
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.prompt_dim is not None and self.prompt_dim < 1:
            raise ValueError(f"prompt_dim must be >= 1 or None, got {self.prompt_dim}")
        if self.text_len < 1:
            raise ValueError(f"text_len must be >= 1 (room for sos / eos), got {self.text_len}")

    @property
    def prompt_values(self) -> int:
        """Values per prompt frame: `prompt_dim`, or the mel bins."""
        return self.num_mel_bins if self.prompt_dim is None else int(self.prompt_dim)

    @property
    def keys(self) -> tuple[str, ...]:
        """The batch keys this converter writes."""
        return tuple(k for k in BATCH_KEYS if k != "text_segments" or self.with_segments)

    def batch_spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{key: (shape, dtype)} of a batch of `batch_size` rows."""
        mel = self.num_mel_bins
        spec = {
            "prompt_frames": ((batch_size, self.prompt_len, self.prompt_values), np.float32),
            "prompt_mask": ((batch_size, self.prompt_len), np.int32),
            "text_inputs": ((batch_size, self.text_len), np.int32),
            "text_targets": ((batch_size, self.text_len), np.int32),
            "text_weights": ((batch_size, self.text_len), np.float32),
            "text_segments": ((batch_size, self.text_len), np.int32),
            "cont_frames": ((batch_size, self.cont_len, mel), np.float32),
            "cont_mask": ((batch_size, self.cont_len), np.int32),
        }
        return {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items() if k in self.keys}

    def convert_example(self, example: dict) -> tuple[dict, dict]:
        """One example -> (row of the batch contract, {stats key: int32 []} of what was cut)."""
        prompt = example["prompt"]  # [prompt_frames, mel]
        continuation = example["continuation"]  # [cont_frames, mel]
        tokens = example["text"]  # [tokens]
        num_prompt = tf.shape(prompt)[0]
        num_cont = tf.shape(continuation)[0]
        num_tokens = tf.shape(tokens)[0]

        kept_prompt = tf.minimum(num_prompt, self.prompt_len)
        kept_cont = tf.minimum(num_cont, self.cont_len)
        kept_tokens = tf.minimum(num_tokens, self.text_len - 1)
        text = tf.cast(tokens[:kept_tokens], tf.int32)
        bos = tf.constant([self.bos_id], tf.int32)
        eos = tf.constant([self.eos_id], tf.int32)

        def pad_text(ids: tf.Tensor) -> tf.Tensor:
            return _pad_rows(ids, self.text_len, self.pad_id)

        row = {
            "prompt_frames": tf.ensure_shape(
                _pad_rows(tf.cast(prompt, tf.float32), self.prompt_len), [self.prompt_len, self.prompt_values]
            ),
            "prompt_mask": tf.sequence_mask(kept_prompt, self.prompt_len, tf.int32),
            "text_inputs": tf.ensure_shape(pad_text(tf.concat([bos, text], 0)), [self.text_len]),
            "text_targets": tf.ensure_shape(pad_text(tf.concat([text, eos], 0)), [self.text_len]),
            "text_weights": tf.sequence_mask(kept_tokens + 1, self.text_len, tf.float32),
            "cont_frames": tf.ensure_shape(
                _pad_rows(tf.cast(continuation, tf.float32), self.cont_len), [self.cont_len, self.num_mel_bins]
            ),
            "cont_mask": tf.sequence_mask(kept_cont, self.cont_len, tf.int32),
        }
        if self.with_segments:
            if "text_segments" not in example:
                raise ValueError("with_segments=True needs 'text_segments' in the examples (TaskConfig.phi_split=True)")
            segments = tf.cast(example["text_segments"][:kept_tokens], tf.int32)
            segments = tf.concat([segments, [preprocessors.CONTINUATION_SEGMENT]], 0)
            row["text_segments"] = tf.ensure_shape(_pad_rows(segments, self.text_len), [self.text_len])
        stats = {
            "truncated_prompt_frames": num_prompt - kept_prompt,
            "truncated_text_tokens": num_tokens - kept_tokens,
            "truncated_cont_frames": num_cont - kept_cont,
        }
        return row, stats

    def __call__(
        self, dataset: tf.data.Dataset, batch_size: int | None = None, drop_remainder: bool = True
    ) -> tf.data.Dataset:
        """Maps a dataset of examples to (row, stats) pairs, batched when `batch_size` is given.

        Returns:
          a dataset of (features, stats): features as in the module docstring (with a leading
          [batch] axis when batched), stats {STATS_KEYS: int32 [] or [batch]}.
        """
        dataset = dataset.map(self.convert_example, num_parallel_calls=tf.data.AUTOTUNE)
        if batch_size is not None:
            dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        return dataset
