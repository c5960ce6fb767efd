"""TFDS speech datasets as a `prepare` source (`--format=tfds`).

Any TFDS dataset with an audio feature (`tfds.features.Audio`) and a transcript feature can be
prepared: `read_tfds` lists its examples (ids, transcripts, speakers; the audio is read but not
decoded) as a `sources.Listing`, with a progress bar, and `featurise_range` is what `prepare`'s
workers call for the listed examples.

Each `SourceFile` of the listing is a contiguous range of one TFDS split (cut at the dataset's own
file boundaries, at most `EXAMPLES_PER_RANGE` examples), so that a worker reads it sequentially; its
`path` is `tfds:` followed by a JSON reference (dataset, data dir, split, range, feature keys, sample
rate), which also makes it part of the shard fingerprint, so re-runs resume as for the file formats.

Audio: the sample rate is the Audio feature's `sample_rate` (resampled to 16 kHz when it differs);
float samples are taken as they are, integer samples are scaled by `2**(bits - 1)`, where `bits` is
8 or 16 for int8 / int16 features and 16 for int32 / int64 ones (TFDS stores decoded 16-bit PCM in
those wider types), unless `audio_bits` says otherwise. Multi-channel audio is averaged.

Skipped, never fatal: empty transcripts and duplicate ids (while listing); empty audio, NaN or
infinite samples, too-short audio (while featurising).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Iterator

import numpy as np

from spectron_jax import cli
from spectron_jax.data import features, sources

PREFIX = "tfds:"
EXAMPLES_PER_RANGE = 256
# TFDS split name prefix -> our split (longest prefix wins); LibriSpeech's train_* / dev_* / test_*.
DEFAULT_SPLIT_MAP = (("train", "train"), ("dev", "validation"), ("validation", "validation"), ("test", "test"))


@dataclasses.dataclass(frozen=True)
class TfdsOptions:
    """Which TFDS dataset to read and where its features are (LibriSpeech's keys by default)."""

    name: str  # TFDS name, `name[/config][:version]`
    data_dir: str | None = None  # local folder or gs://; None = TFDS's default
    splits: tuple[str, ...] = ()  # TFDS splits to read; () = all
    split_map: tuple[tuple[str, str], ...] = DEFAULT_SPLIT_MAP
    audio_key: str = "speech"
    text_key: str = "text"
    speaker_key: str = "speaker_id"  # missing in the dataset -> empty speaker
    id_key: str = "id"  # missing in the dataset -> `<tfds split>-<index>`
    audio_bits: int | None = None  # bit depth of integer samples; None = from the dtype (see module doc)


def parse_split_map(text: str) -> tuple[tuple[str, str], ...]:
    """`train=train,dev=validation` -> (("train", "train"), ("dev", "validation"))."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        prefix, sep, split = item.partition("=")
        if not sep or not prefix.strip() or not sources.is_valid_split(split.strip()):
            raise ValueError(f"bad entry '{item}' (want TFDS_PREFIX=SPLIT, SPLIT letters, digits or '_')")
        pairs.append((prefix.strip(), split.strip()))
    if not pairs:
        raise ValueError("no entries")
    return tuple(pairs)


def add_flags(parser) -> None:
    """The `--tfds_*` flags of `prepare --format=tfds` (`--input` is the dataset name)."""
    parser.add_argument("--tfds_data_dir", default=None, help="tfds: TFDS data dir, local or gs:// (default: TFDS's)")
    parser.add_argument("--tfds_splits", default=None, help="tfds: comma-separated TFDS splits to read (default: all)")
    parser.add_argument(
        "--tfds_split_map", default=None, help="tfds: TFDS_PREFIX=SPLIT,... (default train=train,dev=validation,test=test)"
    )
    parser.add_argument("--tfds_audio_key", default="speech", help="tfds: the Audio feature")
    parser.add_argument("--tfds_text_key", default="text", help="tfds: the transcript feature")
    parser.add_argument("--tfds_speaker_key", default="speaker_id", help="tfds: the speaker feature (optional)")
    parser.add_argument("--tfds_id_key", default="id", help="tfds: the example id feature (optional)")
    parser.add_argument("--tfds_audio_bits", type=int, default=None, help="tfds: bit depth of integer samples")


def options_from_flags(args) -> TfdsOptions:
    """`TfdsOptions` from `prepare`'s parsed `--input` and `--tfds_*` flags."""
    try:
        split_map = parse_split_map(args.tfds_split_map) if args.tfds_split_map else None
    except ValueError as e:
        raise cli.UsageError(f"--tfds_split_map: {e}") from e
    if args.tfds_audio_bits is not None and not 2 <= args.tfds_audio_bits <= 64:
        raise cli.UsageError(f"--tfds_audio_bits must be in [2, 64], got {args.tfds_audio_bits}")
    return TfdsOptions(
        name=args.input,
        data_dir=args.tfds_data_dir,
        splits=tuple(s.strip() for s in (args.tfds_splits or "").split(",") if s.strip()),
        split_map=split_map or DEFAULT_SPLIT_MAP,
        audio_key=args.tfds_audio_key,
        text_key=args.tfds_text_key,
        speaker_key=args.tfds_speaker_key,
        id_key=args.tfds_id_key,
        audio_bits=args.tfds_audio_bits,
    )


def map_split(tfds_split: str, split_map: tuple[tuple[str, str], ...]) -> str | None:
    """Our split for a TFDS split: the longest matching prefix of `split_map`, else the name itself."""
    matches = [(len(p), s) for p, s in split_map if tfds_split.startswith(p)]
    if matches:
        return max(matches)[1]
    return tfds_split if sources.is_valid_split(tfds_split) else None


@functools.lru_cache(maxsize=4)
def _builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir)


def _open(options: TfdsOptions):
    """The builder and its audio feature, or SourceError naming what is wrong."""
    import tensorflow_datasets as tfds

    try:
        builder = _builder(options.name, options.data_dir)
    except Exception as e:  # DatasetNotFoundError, bad version / config, unreadable data dir
        raise sources.SourceError(f"--input {options.name}: {_one_line(e)}") from e
    feats = builder.info.features
    for key in (options.audio_key, options.text_key):
        if key not in feats:
            raise sources.SourceError(
                f"--input {options.name}: no feature '{key}' (features: {', '.join(sorted(feats.keys()))})"
            )
    audio = feats[options.audio_key]
    if not isinstance(audio, tfds.features.Audio):
        raise sources.SourceError(f"--input {options.name}: feature '{options.audio_key}' is not tfds.features.Audio")
    if not audio.sample_rate:
        raise sources.SourceError(f"--input {options.name}: feature '{options.audio_key}' declares no sample_rate")
    return builder, audio


def _one_line(error: Exception) -> str:
    """The first line of an error's message (TFDS's go on with e.g. every available dataset)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value.item())
    return str(value)


def _example_id(example: dict, key: str, tfds_split: str, index: int) -> str:
    return _text(example[key]).strip() if key in example else f"{tfds_split}-{index:08d}"


def _iterate(builder, split: str, skip_audio: str | None = None) -> Iterator[dict]:
    """Numpy examples of `split` in the dataset's order; `skip_audio` names a feature left undecoded.

    Every feature is read in both passes (listing and featurising), so that the two see the same
    examples even where examples are generated per feature set (`tfds.testing.mock_data`).
    """
    import tensorflow_datasets as tfds

    decoders = {skip_audio: tfds.decode.SkipDecoding()} if skip_audio else None
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    return iter(tfds.as_numpy(ds))


def _ranges(count: int, shard_lengths: list[int]) -> list[tuple[int, int]]:
    """[start, end) ranges over `count` examples, cut at the dataset's file boundaries, each <= the limit."""
    bounds = [0]
    if sum(shard_lengths) == count:
        for length in shard_lengths:
            bounds.append(bounds[-1] + length)
    else:
        bounds.append(count)
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        pieces = max(1, -(-(end - start) // EXAMPLES_PER_RANGE))
        edges = [start + (end - start) * k // pieces for k in range(pieces + 1)]
        out.extend((a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a)
    return out


def _list_split(builder, options: TfdsOptions, tfds_split: str, split: str, seen: set, listing) -> list:
    """[one Segment per example of `tfds_split`, or None where it is skipped (the Skip goes to `listing`)]."""
    import tqdm

    try:
        total = int(builder.info.splits[tfds_split].num_examples) or None
    except Exception:  # metadata without split sizes
        total = None
    examples = _iterate(builder, tfds_split, skip_audio=options.audio_key)
    bar = tqdm.tqdm(examples, total=total, unit="utt", desc=f"list {tfds_split}", disable=None, file=sys.stderr)
    segments: list[sources.Segment | None] = []
    for index, example in enumerate(bar):
        utt_id = _example_id(example, options.id_key, tfds_split, index)
        where = f"{options.name}/{tfds_split}[{index}]"
        text = " ".join(_text(example[options.text_key]).split())
        segment = None
        if not text:
            listing.skips.append(sources.Skip(utt_id, where, split, "empty_transcript"))
        elif utt_id in seen:
            listing.skips.append(sources.Skip(utt_id, where, split, "duplicate_id"))
        else:
            seen.add(utt_id)
            speaker = _text(example[options.speaker_key]).strip() if options.speaker_key in example else ""
            segment = sources.Segment(utt_id, text, speaker)
        segments.append(segment)
    return segments


def read_tfds(options: TfdsOptions) -> sources.Listing:
    """Lists the examples of the chosen TFDS splits (ids, transcripts, speakers; audio left undecoded)."""
    builder, audio = _open(options)
    available = list(builder.info.splits.keys())
    chosen = list(options.splits) or available
    if not chosen:
        raise sources.SourceError(f"--input {options.name}: the dataset names no splits; pass --tfds_splits")
    unknown = [s for s in chosen if available and s not in available]
    if unknown:
        raise sources.SourceError(
            f"--tfds_splits: {options.name} has no split {', '.join(unknown)} (splits: {', '.join(available)})"
        )
    listing = sources.Listing()
    seen: set[str] = set()
    for tfds_split in chosen:
        split = map_split(tfds_split, options.split_map)
        if split is None:
            raise sources.SourceError(f"--tfds_split_map: cannot map TFDS split '{tfds_split}' to a split name")
        try:
            segments = _list_split(builder, options, tfds_split, split, seen, listing)
        except Exception as e:  # data not prepared in data_dir, unreadable files
            raise sources.SourceError(f"--input {options.name} split {tfds_split}: {_one_line(e)}") from e
        try:
            shard_lengths = list(builder.info.splits[tfds_split].shard_lengths)
        except Exception:  # metadata without shard lengths
            shard_lengths = []
        for start, end in _ranges(len(segments), shard_lengths):
            kept = tuple(s for s in segments[start:end] if s is not None)
            if not kept:
                continue
            ref = {
                "name": options.name,
                "data_dir": options.data_dir,
                "version": str(builder.info.version),
                "split": tfds_split,
                "start": start,
                "end": end,
                "audio_key": options.audio_key,
                "id_key": options.id_key,
                "sample_rate": int(audio.sample_rate),
                "audio_bits": options.audio_bits,
            }
            display = f"{options.name}/{tfds_split}[{start}:{end}]"
            listing.sources.append(sources.SourceFile(PREFIX + json.dumps(ref, sort_keys=True), display, split, kept))
    return listing


def is_tfds_path(path: str) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def to_float_audio(samples: np.ndarray, audio_bits: int | None = None) -> np.ndarray:
    """TFDS audio [samples] or [samples, channels] of any numeric dtype -> float64 in [-1, 1].

    Integer samples are divided by 2**(bits - 1): `audio_bits`, else 8 / 16 for int8 / int16 and 16
    for int32 / int64; uint8 is centred on 128.
    """
    samples = np.asarray(samples)
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float64)
    if samples.dtype == np.uint8:
        return (samples.astype(np.float64) - 128.0) / 128.0
    if np.issubdtype(samples.dtype, np.signedinteger):
        bits = audio_bits or min(16, np.iinfo(samples.dtype).bits)
        return samples.astype(np.float64) / float(2 ** (bits - 1))
    raise ValueError(f"unsupported sample type {samples.dtype}")


def featurise_range(source: sources.SourceFile, options) -> Iterator[tuple]:
    """`shard_jobs.featurise_file` for a TFDS range: (segment, seconds, [frames, mel], [samples] audio) or
    (segment, None, Skip).

    Args:
      source: a SourceFile listed by `read_tfds`.
      options: `shard_jobs.PrepareOptions` (feature spec, min_seconds).
    """
    ref = json.loads(source.path[len(PREFIX) :])
    spec = options.spec
    wanted = {s.id: s for s in source.segments}
    builder = _builder(ref["name"], ref["data_dir"])
    tfds_split = ref["split"]
    examples = _iterate(builder, f"{tfds_split}[{ref['start']}:{ref['end']}]")
    for offset, example in enumerate(examples):
        index = ref["start"] + offset
        segment = wanted.pop(_example_id(example, ref["id_key"], tfds_split, index), None)
        if segment is None:  # skipped while listing
            continue
        where = f"{ref['name']}/{tfds_split}[{index}]"

        def skip(reason, detail=""):
            return segment, None, sources.Skip(segment.id, where, source.split, reason, detail)

        try:
            samples = to_float_audio(example[ref["audio_key"]], ref["audio_bits"])
        except ValueError as e:
            yield skip("unreadable", str(e))
            continue
        if samples.size == 0:
            yield skip("empty_audio", "audio has zero samples")
        elif not np.all(np.isfinite(samples)):
            yield skip("non_finite", "audio contains NaN or infinite samples")
        else:
            try:
                wave = features.prepare_waveform(samples, ref["sample_rate"], spec)
                duration = wave.size / spec.sample_rate
                if duration < options.min_seconds:
                    yield skip("too_short", f"{duration:.2f} s")
                    continue
                frames = features.log_mel(wave, spec)
            except Exception as e:  # never expected; one bad example must not stop the shard
                yield skip("feature_error", _one_line(e))
                continue
            yield segment, duration, frames, wave
    for segment in wanted.values():  # the dataset changed since it was listed
        yield segment, None, sources.Skip(segment.id, source.source, source.split, "missing_example", "not in the range")
