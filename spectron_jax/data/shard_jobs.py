"""Shard jobs: one shard of a prepared split, planned, checked for resumption, featurised and written.

A shard job (`ShardJob`) is one output file `<split>.tfrecord-<i:05d>-of-<n:05d>` of a split: the
audio files dealt to it (`plan_shards`: a split's files sorted by path, dealt round-robin to its
shards; DEFAULT ceil(utterances / `DEFAULT_EXAMPLES_PER_SHARD`) shards) and a fingerprint, the
SHA-256 of everything that decides its bytes: `FORMAT_VERSION`, the `PrepareOptions`, and per file
its path, source, size and mtime (local: bytes and ns; object store: its length and mtime; a TFDS
range: none) and its segments.

Running a job:

- `finished_shard`: the job's index record `DIR/shard_index/<shard>.json` if the shard file exists,
  and its fingerprint, byte count and TFRecord count all agree with the record, else None (to write).
- `featurise_file`: one source file's segments, each as (segment, duration s, [frames, num_mel]
  float32 log-mel, [samples] float32 audio at the spec's rate) or (segment, None, `sources.Skip`) for
  one that is skipped (`PrepareOptions.spec`: DEFAULT 128 mel bands of 16 kHz audio).
- `write_shard`: featurises the job's files, splits long utterances at pauses (`splitting`), writes
  the `tf.train.Example`s (`tfrecords` schema; frames stored as `PrepareOptions.frame_dtype`) under a
  temporary hidden name and renames it when complete (an object store: staged locally, uploaded
  whole), then writes the index record atomically: shard, split, fingerprint, examples, bytes,
  seconds, frames, frame_dtype, long_utterances, skipped, stats (`features.StatsAccumulator` sums of
  the stored frames).

A job is a plain (picklable) value, and writing it needs nothing but the job, the options and the
output folder, so any runner can run the jobs: `prepare.run_local` (a process pool) and
`prepare_beam` (an Apache Beam pipeline) write the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from typing import Any, Callable, Sequence

from spectron_jax import filesystem
from spectron_jax.data import audio_input, features, prompt_features, sources, splitting, tfds_source
from spectron_jax.data.prepare_report import INDEX_DIR, skip_dict
from spectron_jax.data.tfrecords import FRAME_DTYPES, count_records, encode_example, shard_name, stored_frames

FORMAT_VERSION = 2  # 2: float16 storage and splitting at pauses
DEFAULT_EXAMPLES_PER_SHARD = 256


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """How utterances are featurised and filtered (part of every shard's fingerprint)."""

    spec: features.FeatureSpec = features.SPECTRON_FEATURES
    min_seconds: float = 0.0  # shorter utterances are skipped ('too_short'). DEFAULT, keeps all.
    frame_dtype: str = "float16"  # storage of the frames (tfrecords.FRAME_DTYPES). DEFAULT.
    split: splitting.SplitConfig = splitting.SplitConfig()  # long utterances, see `splitting`
    prompt: prompt_features.PromptFeatures | None = None  # extra encoder features stored (None: log-mel only)

    def __post_init__(self):
        if self.frame_dtype not in FRAME_DTYPES:
            raise ValueError(f"PrepareOptions.frame_dtype must be one of {FRAME_DTYPES}, got {self.frame_dtype!r}")

    def to_dict(self) -> dict:
        """The options as report.json and the shard fingerprints record them."""
        return {
            "features": self.spec.to_dict(),
            "min_seconds": self.min_seconds,
            "frame_dtype": self.frame_dtype,
            "split": dataclasses.asdict(self.split),
            **({"prompt_features": dataclasses.asdict(self.prompt)} if self.prompt else {}),
        }


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One shard to write: its split, index, the audio files dealt to it and their fingerprint."""

    split: str
    index: int
    num_shards: int
    files: tuple[sources.SourceFile, ...]
    fingerprint: str

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.num_shards)

    @property
    def num_segments(self) -> int:
        return sum(len(f.segments) for f in self.files)


def _file_state(path: str) -> list:
    if tfds_source.is_tfds_path(path):
        return [None, None]
    try:
        if filesystem.is_remote(path):
            st = filesystem.path(path).stat()
            return [int(st.length), st.mtime]
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except (OSError, ValueError):
        return [None, None]


def _file_states(paths: Sequence[str]) -> dict[str, list]:
    """`_file_state` of each path; object-store ones are asked in parallel (a stat is a round trip, and a
    Libri-Light tree on gs:// has ~220k files)."""
    unique = sorted(set(paths))
    remote = [p for p in unique if filesystem.is_remote(p)]
    states = {p: _file_state(p) for p in unique if not filesystem.is_remote(p)}
    if remote:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(min(32, len(remote))) as pool:
            states.update(zip(remote, pool.map(_file_state, remote)))
    return states


def plan_shards(listing: sources.Listing, options: PrepareOptions, num_shards: int | None = None) -> list[ShardJob]:
    """Deals each split's files round-robin (sorted by path) to its shards."""
    by_split: dict[str, list[sources.SourceFile]] = {}
    for source in listing.sources:
        by_split.setdefault(source.split, []).append(source)
    states = _file_states([s.path for s in listing.sources])
    jobs = []
    for split, files in sorted(by_split.items()):
        files.sort(key=lambda s: (s.source, s.path))
        segments = sum(len(f.segments) for f in files)
        count = num_shards or max(1, min(len(files), math.ceil(segments / DEFAULT_EXAMPLES_PER_SHARD)))
        for index in range(count):
            dealt = tuple(files[index::count])
            payload = {
                "version": FORMAT_VERSION,
                **options.to_dict(),
                "files": [
                    [f.path, f.source, states[f.path], [dataclasses.astuple(s) for s in f.segments]] for f in dealt
                ],
            }
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            jobs.append(ShardJob(split, index, count, dealt, digest))
    return jobs


def index_path(output_dir: str, name: str) -> str:
    """Where the index record of shard `name` is: `output_dir/shard_index/<name>.json`."""
    return filesystem.join(output_dir, INDEX_DIR, name + ".json")


def _write_json(path: str, payload: Any) -> None:
    filesystem.write_text(path, json.dumps(payload, indent=1))  # atomic (filesystem.write_bytes)


def finished_shard(output_dir: str, job: ShardJob) -> dict | None:
    """The index record of `job` if its shard is complete and matches the job, else None."""
    try:
        record = json.loads(filesystem.read_text(index_path(output_dir, job.name)))
        path = filesystem.join(output_dir, job.name)
        if record.get("fingerprint") != job.fingerprint or filesystem.size(path) != record["bytes"]:
            return None
        return record if count_records(path) == record["examples"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def featurise_file(source: sources.SourceFile, options: PrepareOptions):
    """Yields (segment, duration s, [frames, mel] log-mel, [samples] its audio) or (segment, None, Skip)."""
    if tfds_source.is_tfds_path(source.path):  # a range of a TFDS split, see tfds_source
        yield from tfds_source.featurise_range(source, options)
        return
    spec = options.spec
    try:
        wave = audio_input.load_audio(source.path, spec)
    except features.AudioError as e:
        for seg in source.segments:
            yield seg, None, sources.Skip(seg.id, source.source, source.split, e.reason, e.detail)
        return
    for seg in source.segments:
        start = int(round(seg.start * spec.sample_rate))
        end = len(wave) if seg.end is None else min(len(wave), int(round(seg.end * spec.sample_rate)))
        piece = wave[start:end]
        duration = piece.size / spec.sample_rate
        if piece.size == 0:
            yield (
                seg,
                None,
                sources.Skip(seg.id, source.source, source.split, "empty_audio", "segment lies past the audio's end"),
            )
        elif duration < options.min_seconds:
            yield seg, None, sources.Skip(seg.id, source.source, source.split, "too_short", f"{duration:.2f} s")
        else:
            try:
                frames = features.log_mel(piece, spec)
            except Exception as e:  # never expected; one bad segment must not stop the shard
                yield seg, None, sources.Skip(seg.id, source.source, source.split, "feature_error", str(e))
                continue
            yield seg, duration, frames, piece


def write_shard(
    job: ShardJob, output_dir: str, options: PrepareOptions, progress: Callable[[int], None] | None = None
) -> dict:
    """Featurises the job's files into its shard (temp name, then rename) and writes its index record.

    Utterances longer than `options.split` allows are written as their pieces (`splitting`); the record
    counts them (`long_utterances`: utterances split, pieces written, stretches dropped).
    """
    import tensorflow as tf

    final = filesystem.join(output_dir, job.name)
    # TFRecordWriter writes local files only: a shard for an object store is staged locally, then uploaded
    staging = tempfile.mkdtemp(prefix="spectron-prepare-") if filesystem.is_remote(output_dir) else output_dir
    tmp = os.path.join(staging, f".tmp-{job.name}-{os.getpid()}")
    stats = features.StatsAccumulator(options.spec)
    skips, examples, seconds, frames_total = [], 0, 0.0, 0
    long = {"split": 0, "pieces": 0, "dropped": 0, "dropped_seconds": 0.0}
    seconds_per_frame = options.spec.hop / options.spec.sample_rate
    try:
        with tf.io.TFRecordWriter(tmp) as writer:
            for source in job.files:
                for segment, duration, result, *audio in featurise_file(source, options):
                    if duration is None:
                        skips.append(skip_dict(result))
                        continue
                    wave = audio[0]  # [samples] of the utterance: prompt features are taken per piece
                    pieces = splitting.split_utterance(
                        segment, result, options.split, options.spec, source.source, source.split
                    )
                    was_split = len(pieces) > 1 or isinstance(pieces[0], sources.Skip) or pieces[0][0] is not segment
                    long["split"] += was_split
                    for piece in pieces:
                        if isinstance(piece, sources.Skip):
                            skips.append(skip_dict(piece))
                            long["dropped"] += piece.reason == "too_long"
                            continue
                        piece_segment, frames = piece
                        if piece_segment is not segment:  # a piece's words start elsewhere: no timings
                            piece_segment = dataclasses.replace(piece_segment, word_starts=None)
                            long["pieces"] += 1
                            duration = frames.shape[0] * seconds_per_frame
                        offset = int(round((piece_segment.start - segment.start) * options.spec.sample_rate))
                        extra = prompt_features.shard_features(wave[offset:], options.prompt)
                        writer.write(encode_example(piece_segment, duration, frames, options.frame_dtype, extra))
                        stats.add(stored_frames(frames, options.frame_dtype))
                        examples += 1
                        seconds += duration
                        frames_total += frames.shape[0]
                    if was_split:
                        kept = sum(p[1].shape[0] for p in pieces if not isinstance(p, sources.Skip))
                        long["dropped_seconds"] += (result.shape[0] - kept) * seconds_per_frame
                if progress is not None:
                    progress(len(source.segments))
        if filesystem.is_remote(final):
            filesystem.copy(tmp, final)
        else:
            os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if staging != output_dir:
            os.rmdir(staging)
    record = {
        "shard": job.name,
        "split": job.split,
        "fingerprint": job.fingerprint,
        "examples": examples,
        "bytes": filesystem.size(final),
        "seconds": seconds,
        "frames": frames_total,
        "frame_dtype": options.frame_dtype,
        "long_utterances": long,
        "skipped": skips,
        "stats": stats.to_dict(),
    }
    _write_json(index_path(output_dir, job.name), record)
    return record
