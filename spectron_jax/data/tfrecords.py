"""The TFRecord format of prepared shards: one `tf.train.Example` per utterance (a contract).

Files `DIR/<split>.tfrecord-<i:05d>-of-<n:05d>` hold Examples with the features

    id          bytes       utterance id
    transcript  bytes       UTF-8 text, as given by the corpus
    speaker     bytes       speaker id ('' when the corpus has none)
    duration    float       seconds of (16 kHz) audio featurised (of a split piece: T * hop / 16000)
    num_frames  int64       frames T of log_mel (= 1 + samples // hop; a piece's own count)
    log_mel     float_list  T * 128 float32 values, row-major [T, 128] (features.SPECTRON_FEATURES)
      or
    log_mel_f16 bytes       T * 128 little-endian IEEE float16 values, row-major [T, 128]

An Example holds exactly one of `log_mel` (float32 storage, the format's first version and
`prepare --frame_dtype=float32`) and `log_mel_f16` (float16 storage, `prepare`'s default: half the
bytes; float16 keeps 11 significant bits, so a value is within 2^-11 of itself relative, e.g. 0.004 at
the log floor's -11.5).
Readers accept both: `log_mel_values` gives float32 [T * 128] for either, so shards of both kinds can
be mixed in one folder. `report.json` names each split's storage dtype.
    word_starts float_list  optional: start of each transcript word, seconds from the utterance's start
                            (a manifest's `word_starts` column; absent: 0 values, phi by letters)
    prompt_fbank float_list optional (prepare --prompt_features=w2v_bert_fbank): raw 80-bin fbank of the
                            first seconds, row-major [F, 80] float32 (spectron_jax.data.prompt_features)

`prepare` writes them (`encode_example`); the seqio tasks read them (`tfrecord_features`). TensorFlow is
imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import struct

import numpy as np

from spectron_jax.data import features

FRAME_DTYPES = ("float16", "float32")  # storage of log_mel; readers cast both to float32


def tfrecord_features() -> dict:
    """`feature_description` of the shards for `tf.io.parse_single_example` (imports TensorFlow).

    log_mel / log_mel_f16 parse flat (one of them empty); `log_mel_values` joins them as float32
    [num_frames * num_mel] and `parse_example` reshapes that.
    """
    import tensorflow as tf

    return {
        "id": tf.io.FixedLenFeature([], tf.string),
        "transcript": tf.io.FixedLenFeature([], tf.string),
        "speaker": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "duration": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
        "num_frames": tf.io.FixedLenFeature([], tf.int64),
        "log_mel": tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
        "log_mel_f16": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "word_starts": tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
    }


def log_mel_values(parsed: dict):
    """float32 [num_frames * num_mel] frames of a parsed Example, whichever storage it used.

    Exactly one of the two fields is non-empty, so their concatenation is that one (no branch).
    """
    import tensorflow as tf

    half = tf.io.decode_raw(parsed["log_mel_f16"], tf.float16, little_endian=True)
    return tf.concat([parsed["log_mel"], tf.cast(half, tf.float32)], axis=0)


def prompt_fbank_feature() -> dict:
    """The optional `prompt_fbank` entry of the `feature_description` (absent in a record: 0 values), parsed
    only by Tasks whose encoder reads it (imports TensorFlow)."""
    import tensorflow as tf

    return {"prompt_fbank": tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True)}


def parse_example(serialized, num_mel: int = features.SPECTRON_FEATURES.num_mel) -> dict:
    """Parses one serialized Example (a scalar tf.string) into tensors; log_mel is [num_frames, num_mel]."""
    import tensorflow as tf

    parsed = tf.io.parse_single_example(serialized, tfrecord_features())
    parsed["log_mel"] = tf.reshape(log_mel_values(parsed), [-1, num_mel])
    del parsed["log_mel_f16"]
    return parsed


def stored_frames(frames, frame_dtype: str = "float16") -> np.ndarray:
    """[T, mel] float32: `frames` as a reader gets them back from storage in `frame_dtype`."""
    return np.asarray(frames, dtype=frame_dtype).astype(np.float32)


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def count_records(path: str) -> int:
    """Number of records in a TFRecord file, from its length headers; ValueError if it is truncated."""
    from spectron_jax import filesystem

    size, count, position = filesystem.size(path), 0, 0
    with filesystem.path(path).open("rb") as f:
        while position < size:
            header = f.read(12)  # uint64 length + uint32 masked crc of the length
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header")
            position += 12 + struct.unpack("<Q", header[:8])[0] + 4
            if position > size:
                raise ValueError(f"{path}: truncated record")
            f.seek(position)
            count += 1
    return count


def encode_example(segment, duration: float, frames, frame_dtype: str = "float16", extra=None) -> bytes:
    """A serialized tf.train.Example of the schema above.

    segment: has `.id`, `.transcript`, `.speaker` and optionally `.word_starts` (a `sources.Segment`);
    frames: [T, mel] float32;
    frame_dtype: their storage, `float16` (`log_mel_f16`) or `float32` (`log_mel`).
    extra: optional {feature name: float array} of the schema's optional features (e.g. prompt_fbank).
    """
    import tensorflow as tf

    def raw(value: str):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode("utf-8")]))

    feature = {
        "id": raw(segment.id),
        "transcript": raw(segment.transcript),
        "speaker": raw(segment.speaker),
        "duration": tf.train.Feature(float_list=tf.train.FloatList(value=[duration])),
        "num_frames": tf.train.Feature(int64_list=tf.train.Int64List(value=[frames.shape[0]])),
    }
    if frame_dtype == "float16":
        half = np.ascontiguousarray(frames, dtype="<f2").tobytes()
        feature["log_mel_f16"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[half]))
    elif frame_dtype == "float32":
        feature["log_mel"] = tf.train.Feature(float_list=packed_float_list(tf, frames))
    else:
        raise ValueError(f"frame_dtype must be one of {FRAME_DTYPES}, got {frame_dtype!r}")
    if getattr(segment, "word_starts", None):
        feature["word_starts"] = tf.train.Feature(float_list=tf.train.FloatList(value=list(segment.word_starts)))
    for name, values in (extra or {}).items():
        feature[name] = tf.train.Feature(float_list=packed_float_list(tf, values))
    # deterministic: map entries sorted by key, so a shard's bytes do not depend on the process's hash seed
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def packed_float_list(tf, values):
    """tf.train.FloatList of `values` (any shape, flattened row-major), built from its wire bytes.

    A FloatList is field 1 as packed little-endian float32: tag 0x0A, varint byte length, the floats.
    Parsing those bytes is ~500x faster than passing a NumPy array to the constructor.
    """
    payload = np.ascontiguousarray(values, dtype="<f4").tobytes()
    length, size = bytearray(), len(payload)
    while True:
        low, size = size & 0x7F, size >> 7
        length.append(low | (0x80 if size else 0))
        if not size:
            break
    float_list = tf.train.FloatList()
    float_list.ParseFromString(b"\x0a" + bytes(length) + payload)
    return float_list
