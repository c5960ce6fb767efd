"""The training input: per-host, deterministic, exactly resumable batches of a Spectron Task.

`make_pipeline` returns a `SpectronInput`, an iterator of NumPy batch dicts in the model's batch
contract (`spectron_jax.data.converter`), holding this host's rows: global_batch / num_shards of them.

Order. Epoch e of host h is a fixed stream of records computed from the shards' record counts
(`spectron_jax.data.epoch_order`): the host's files in an order drawn from (seed, e), read
`cycle_length` at a time round-robin, cut into windows of `shuffle_buffer_size` records, each window
permuted with a generator seeded by (seed, e, window). The stream is tagged with each record's position
in it *before* any preprocessing, then run through the Task's preprocessors and seqio's output-feature
validation (as `seqio.Task.get_dataset` does: a Task a user registers behaves the same), converted and
batched; SpecAugment is seeded by (SpecAugmentConfig.seed, epoch, example id). Epochs follow each other
without a gap: a batch may hold the last examples of epoch e and the first of e + 1.

Resume. `state()` is {epoch, position, ...} of plain ints: position = records of the current epoch's
stream consumed by the batches returned so far. `restore(state)` starts the stream of that epoch at
`position`, so what comes next is exactly what an uninterrupted iterator would have returned. The cost
does not grow with the position: the reader opens the files of the current interleave group at offsets
given by arithmetic on the record counts (passing earlier records by their length headers only) and
reads at most one window of record payloads before the first record it returns. tf.data's own iterator
checkpoints were not used: they serialise the shuffle buffer (hundreds of MB of spectrograms) instead
of two integers, and `gs://` shards are read by Python, which tf.data cannot checkpoint.

Why not an index-based random-access source (ArrayRecord + Grain): it needs a second shard format and
a dependency, and a window shuffle over a few files gives batches drawn across files as the tf.data
shuffle buffer did; the position arithmetic gives the same O(1) resume over the existing TFRecords.

Multi-host contract. Every process calls
    make_pipeline(..., batch_size=GLOBAL_BATCH, shard_index=jax.process_index(),
                  num_shards=jax.process_count())
and gets rows [GLOBAL_BATCH / process_count, ...]. With at least as many shard files as processes,
each process reads its own files (file i goes to process i mod num_shards); otherwise every process
reads all files and keeps every num_shards-th record. The training code assembles the global batch
with `jax.make_array_from_process_local_data(NamedSharding(mesh, P(batch axes)), local_batch)`, and
saves `state()` of every process separately (states differ between processes); a state restores
only into a pipeline with the same seed, shard_index and num_shards. With repeat=False, processes
may run out after different numbers of batches (uneven files); evaluation code that needs lockstep
should use repeat=False with drop_remainder=False and pad with empty batches on the processes that
end early. A change of process count cannot resume exactly: each process's stream is a permutation of
its own files, not a slice of one global order, so no position of another count continues it; start
the new processes at position 0 of the saved epoch instead (`epoch_order.replayed_records` counts
what that sees again). `order_fingerprint` records what else fixes the order (the shard files, their
record counts, the window and cycle length) so that a resume can check it.

With repeat=True, an epoch read from its start that keeps no example after the length filter is an
error (rather than an iterator that waits forever). The check costs nothing extra: every epoch ends in
a marker row that carries it, and no dataset is read twice; `prepare`'s report gives the utterances per
split.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from spectron_jax.data import converter as converter_lib
from spectron_jax.data import epoch_order
from spectron_jax.data import preprocessors

_log = logging.getLogger(__name__)

_EPOCH = preprocessors.EPOCH_FEATURE  # SpecAugment seeds from it
_POSITION = "_input_position"
_EMPTY_EPOCH = "spectron-input: an epoch kept no example"  # the marker row's assertion message
# The version of the record order a position refers to (saved with checkpoints): 1 was tf.data's
# interleave + shuffle buffer, 2 the computed order of `epoch_order`.
ORDER_VERSION = 2


def order_fingerprint(files: Sequence[str], counts: Sequence[int], shuffle_buffer_size: int, cycle_length: int,
                      shuffle: bool = True) -> dict:
    """A compact record of what, besides seed and sharding, fixes the record order of a split's shards.

    Args:
      files: the split's shard files in the order the pipeline lists them (every host's).
      counts: their record counts.
      shuffle_buffer_size, cycle_length, shuffle: the pipeline's order settings.

    Returns JSON-able {data_files, data_records, data_names, data_counts, shuffle_buffer_size,
    cycle_length, shuffle}: data_names hashes the files' base names in order (so the same shards in
    another folder or bucket match) and data_counts hashes the names with their record counts.
    """
    names = [os.path.basename(str(f).rstrip("/")) for f in files]
    counts = [int(c) for c in counts]
    if len(names) != len(counts):
        raise ValueError(f"order_fingerprint: {len(names)} files but {len(counts)} record counts")

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    return {
        "data_files": len(names),
        "data_records": sum(counts),
        "data_names": digest("\n".join(names)),
        "data_counts": digest("\n".join(f"{n}\t{c}" for n, c in zip(names, counts))),
        "shuffle_buffer_size": int(shuffle_buffer_size),
        "cycle_length": int(cycle_length),
        "shuffle": bool(shuffle),
    }


ORDER_SETTINGS = ("shuffle_buffer_size", "cycle_length", "shuffle")


def fingerprint_changes(saved: Mapping | None, current: Mapping, settings: bool = True) -> list[str]:
    """What differs between a saved `order_fingerprint` and the current one, one phrase per change.

    A field absent from `saved` (a checkpoint written before it was recorded) is unknown, not a
    change; `saved` None compares nothing. settings=False leaves the order settings out (for a resume
    that restarts its epoch anyway).
    """
    if not saved:
        return []
    changes = []

    def differs(key):
        return key in saved and key in current and saved[key] != current[key]

    if differs("data_files") or differs("data_names"):
        detail = (f"data files {saved['data_files']} -> {current['data_files']}" if differs("data_files")
                  else f"data file names changed ({current['data_files']} files)")
        if differs("data_records"):
            detail += f", records {saved['data_records']} -> {current['data_records']}"
        changes.append(detail)
    elif differs("data_records"):
        changes.append(f"data records {saved['data_records']} -> {current['data_records']} (same files)")
    elif differs("data_counts"):
        changes.append(f"per-file record counts changed ({current['data_records']} records in all)")
    if settings:
        changes += [f"{key} {saved[key]} -> {current[key]}" for key in ORDER_SETTINGS if differs(key)]
    return changes


class SpectronInput:
    """An iterator of per-host NumPy batches with a checkpointable position (see the module docstring).

    Each batch is {key: np.ndarray} with the shapes of `batch_spec`; padded final rows (only with
    repeat=False, drop_remainder=False) have every mask and weight 0. Frames and tokens the converter
    cuts are summed in `truncation_counts` and logged (when a kind of cut first happens, then every
    `log_every_batches` batches). `read_counts` sums what the record readers did.
    """

    def __init__(
        self,
        task: seqio.Task,
        split: str,
        per_host_batch_size: int,
        shard_index: int,
        num_shards: int,
        seed: int,
        shuffle: bool,
        repeat: bool,
        shuffle_buffer_size: int,
        converter: converter_lib.SpectronFeatureConverter,
        drop_remainder: bool = True,
        prefetch_batches: int = 2,
        log_every_batches: int = 1000,
        cycle_length: int = 16,
    ):
        self.task = task
        self.split = split
        self.per_host_batch_size = per_host_batch_size
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.seed = seed
        self.shuffle = shuffle
        self.repeat = repeat
        self.shuffle_buffer_size = shuffle_buffer_size
        self.converter = converter
        self.drop_remainder = drop_remainder
        self.prefetch_batches = prefetch_batches
        self.log_every_batches = log_every_batches
        self.cycle_length = cycle_length
        self._parse = _record_parser(task, split)
        self._files = list(task.source.list_shards(split))
        if not self._files:
            pattern = getattr(task.source, "_split_to_filepattern", {}).get(split, "its file pattern")
            raise FileNotFoundError(f"task {task.name!r}, split {split!r}: no shard files match {pattern}")
        self._order: epoch_order.EpochOrder | None = None
        self._counts: list[int] = []
        self._epoch = 0
        self._position = 0
        self._batches = 0
        self._truncated = {key: 0 for key in converter_lib.STATS_KEYS}
        self._iterator: Iterator | None = None

    @property
    def order(self) -> epoch_order.EpochOrder:
        """This host's record order (record counts are read on first use)."""
        if self._order is None:
            self._counts = epoch_order.record_counts(self._files)
            self._order = epoch_order.EpochOrder(
                self._files, self._counts, self.shard_index, self.num_shards,
                self.seed, self.shuffle, self.shuffle_buffer_size, self.cycle_length)
        return self._order

    @property
    def record_counts(self) -> list[int]:
        """Records in each of the split's shard files (every host's, in listing order)."""
        self.order  # noqa: B018 - reads the record counts once
        return list(self._counts)

    def order_fingerprint(self) -> dict:
        """What fixes the record order besides the seed and the sharding: `order_fingerprint` of the
        split's shard files (every host's), their record counts and this pipeline's order settings.
        Costs no reading beyond the record counts the order needs anyway."""
        return order_fingerprint(self._files, self.record_counts, self.shuffle_buffer_size, self.cycle_length,
                                 self.shuffle)

    # ------------------------------------------------------------------------------------------------
    # Position
    # ------------------------------------------------------------------------------------------------

    def state(self) -> dict[str, int]:
        """The position after the last returned batch, as plain ints (save one per process)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "batches": self._batches,
            "seed": self.seed,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
        }

    def restore(self, state: dict) -> None:
        """Continues from `state()` of an earlier pipeline with the same seed and sharding."""
        for key in ("seed", "shard_index", "num_shards"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"input state was saved with {key}={int(state[key])}, this pipeline has "
                    f"{key}={getattr(self, key)}; exact resume needs the same seed and sharding"
                )
        missing = [key for key in ("epoch", "position") if key not in state]
        if missing:
            raise ValueError(f"input state lacks {', '.join(missing)}")
        if int(state["epoch"]) < 0 or int(state["position"]) < 0:
            raise ValueError(f"input state has a negative epoch or position: {dict(state)}")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._batches = int(state.get("batches", 0))
        self._iterator = None

    @property
    def truncation_counts(self) -> dict[str, int]:
        """Totals, over the batches returned so far, of frames and tokens cut to fit the batch shapes."""
        return dict(self._truncated)

    @property
    def read_counts(self) -> dict[str, int]:
        """{records_read, records_skipped (passed by header), files_opened} since construction."""
        return self.order.read_counts.as_dict()

    @property
    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{key: (per-host shape, dtype)} of every batch."""
        return self.converter.batch_spec(self.per_host_batch_size)

    # ------------------------------------------------------------------------------------------------
    # The tf.data graph
    # ------------------------------------------------------------------------------------------------

    @tf.autograph.experimental.do_not_convert
    def _epoch_rows(self, epoch: tf.Tensor, start: tf.Tensor) -> tf.data.Dataset:
        """(row, stats, tags) of `epoch` from position `start` on; with repeat, checked non-empty."""
        order = self.order

        def generate(e, p):
            yield from order.records(int(e), int(p))

        records = tf.data.Dataset.from_generator(
            generate, args=(epoch, start),
            output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)))
        # the generator reads a window in one go: reading the next while this one is consumed keeps
        # training from waiting at every window boundary (memory: up to two windows of records)
        records = records.prefetch(self.shuffle_buffer_size)
        parse = self._parse
        records = records.map(lambda data, i: {**parse(data), _EPOCH: epoch, _POSITION: i})
        examples = self.task.preprocess_precache(records)
        examples = self.task.preprocess_postcache(examples, sequence_length=None)
        examples = self.task._validate_preprocessing(examples)  # seqio's output-feature checks

        def convert(example):
            row, stats = self.converter.convert_example(example)
            return row, stats, {_EPOCH: example[_EPOCH], _POSITION: example[_POSITION]}

        rows = examples.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
        if not self.repeat:
            return rows
        # A marker row (position -1) ends the epoch; reaching it with nothing kept from position 0 on
        # fails the iterator (else repeat=True would wait forever on a split the filter empties).
        marker = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), rows.element_spec)
        marker[2][_EPOCH] = tf.cast(epoch, marker[2][_EPOCH].dtype)
        marker[2][_POSITION] = tf.constant(-1, marker[2][_POSITION].dtype)
        rows = rows.concatenate(tf.data.Dataset.from_tensors(tuple(marker)))

        def check(kept, row):
            is_marker = row[2][_POSITION] < 0
            ok = tf.logical_or(tf.logical_not(is_marker), tf.logical_or(kept > 0, start > 0))
            with tf.control_dependencies([tf.debugging.Assert(ok, [_EMPTY_EPOCH])]):
                return kept + 1, row

        rows = rows.scan(tf.constant(0, tf.int64), check)
        return rows.filter(lambda row, stats, tags: tags[_POSITION] >= 0)

    def _dataset(self) -> tf.data.Dataset:
        """Batches (row, stats, tags) from the current position on."""
        start_epoch = tf.constant(self._epoch, tf.int64)
        start_position = tf.constant(self._position, tf.int64)
        if self.repeat:
            epochs = tf.data.Dataset.counter(self._epoch, dtype=tf.int64)
        else:
            epochs = tf.data.Dataset.range(self._epoch, 1, dtype=tf.int64)
        batches = epochs.flat_map(
            lambda e: self._epoch_rows(e, tf.where(tf.equal(e, start_epoch), start_position, 0))
        )
        batches = batches.batch(self.per_host_batch_size, drop_remainder=self.drop_remainder)
        if not self.drop_remainder:
            batches = batches.map(self._pad_batch)
        options = tf.data.Options()
        options.deterministic = True
        return batches.with_options(options).prefetch(self.prefetch_batches)

    def _pad_batch(self, row: dict, stats: dict, tags: dict):
        """Pads a short final batch to per_host_batch_size rows: empty rows, tags -1."""

        def pad(values, value):
            rows = self.per_host_batch_size - tf.shape(values)[0]
            padding = [[0, rows]] + [[0, 0]] * (values.shape.rank - 1)
            padded = tf.pad(values, padding, constant_values=tf.cast(value, values.dtype))
            return tf.ensure_shape(padded, [self.per_host_batch_size] + values.shape[1:].as_list())

        row = {k: pad(v, self.converter.pad_id if k in ("text_inputs", "text_targets") else 0) for k, v in row.items()}
        stats = {k: pad(v, 0) for k, v in stats.items()}
        tags = {k: pad(v, -1) for k, v in tags.items()}
        return row, stats, tags

    # ------------------------------------------------------------------------------------------------
    # Iteration
    # ------------------------------------------------------------------------------------------------

    def __iter__(self) -> "SpectronInput":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._dataset().as_numpy_iterator()
        try:
            row, stats, tags = next(self._iterator)
        except tf.errors.InvalidArgumentError as e:
            if _EMPTY_EPOCH not in str(e):
                raise
            raise ValueError(
                f"{self.task.name}/{self.split} (shard {self.shard_index} of {self.num_shards}) has no "
                "utterance left after the length filter: check prepare's report.json against TaskConfig"
            ) from None
        valid = np.flatnonzero(tags[_POSITION] >= 0)
        last = valid[-1]
        self._epoch = int(tags[_EPOCH][last])
        self._position = int(tags[_POSITION][last]) + 1
        self._batches += 1
        cut = {key: int(np.sum(value)) for key, value in stats.items()}
        first = [key for key, value in cut.items() if value and not self._truncated[key]]
        for key, value in cut.items():
            self._truncated[key] += value
        if first or (any(self._truncated.values()) and self._batches % self.log_every_batches == 0):
            _log.warning(
                "%s/%s: frames or tokens cut to fit the batch shapes, totals after %d batches: %s",
                self.task.name,
                self.split,
                self._batches,
                self._truncated,
            )
        return row


def _record_parser(task: seqio.Task, split: str):
    """serialized record (tf.string []) -> the dict the Task's source would yield for it.

    The training input reads the files itself (to start anywhere), so it needs a source of
    uncompressed TFRecord files of tf.train.Examples: a `tasks.SplitTaggedTFExampleSource` or a
    `seqio.TFExampleDataSource` with the default reader.
    """
    source = task.source
    if hasattr(source, "parse_serialized"):
        return lambda serialized: source.parse_serialized(serialized, split)
    if isinstance(source, seqio.TFExampleDataSource) and source.reader_cls is tf.data.TFRecordDataset:
        return source.parse_fn
    raise ValueError(
        f"task {task.name!r}: the training input reads uncompressed TFRecord shards of tf.train.Example "
        f"(a seqio.TFExampleDataSource with reader_cls=tf.data.TFRecordDataset); its source is {source!r}"
    )


def make_pipeline(
    task_name: str,
    split: str,
    batch_size: int,
    shard_index: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    *,
    prompt_len: int = 240,
    text_len: int = 128,
    cont_len: int = 800,
    reduction_factor: int = 1,
    with_segments: bool = False,
    prompt_dim: int | None = None,
    shuffle_buffer_size: int | None = None,
    drop_remainder: bool = True,
    prefetch_batches: int = 2,
    cycle_length: int = 16,
) -> SpectronInput:
    """The input iterator of one host for a registered Spectron Task (see the module docstring).

    Args:
      task_name: a registered seqio Task (`spectron_jax.data.tasks.register_tasks`).
      split: train, validation or test.
      batch_size: the GLOBAL batch; each host yields batch_size / num_shards rows.
      shard_index, num_shards: this host's index and the number of hosts (jax.process_index() /
        jax.process_count()).
      seed: seeds the file order and the record shuffle of every epoch.
      shuffle: shuffle files and records (training); False keeps the files' order.
      repeat: loop over epochs forever; False stops after one epoch.
      prompt_len, text_len, cont_len, reduction_factor, with_segments, prompt_dim: the batch shapes
        (`SpectronFeatureConverter`); cont_len must be a multiple of reduction_factor.
      shuffle_buffer_size: records in a shuffle window (default: the Task's, 1000). Memory is up to
        twice this many serialized utterances (one window read ahead); a restore reads at most one
        window of records.
      cycle_length: files read at once, round-robin (DEFAULT 16, seqio's interleave default).
      drop_remainder: drop a short final batch (repeat=False only); False pads it with empty rows.
      prefetch_batches: batches tf.data prepares ahead.
    """
    if batch_size < 1 or num_shards < 1 or batch_size % num_shards:
        raise ValueError(f"the global batch_size ({batch_size}) must be a positive multiple of num_shards ({num_shards})")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must lie in [0, {num_shards}), got {shard_index}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must lie in [0, 2**31), got {seed}")
    try:
        task = seqio.get_mixture_or_task(task_name)
    except ValueError as e:
        raise ValueError(f"unknown task {task_name!r}: register it first (spectron_jax.data.tasks.register_tasks)") from e
    if split not in task.splits:
        raise ValueError(f"task {task_name!r} has no split {split!r}; splits: {', '.join(task.splits)}")
    converter = converter_lib.SpectronFeatureConverter(
        prompt_len=prompt_len,
        text_len=text_len,
        cont_len=cont_len,
        reduction_factor=reduction_factor,
        with_segments=with_segments,
        prompt_dim=prompt_dim,
        # the special ids follow the Task's tokenizer (ours: bos 3; Gemma's: bos 2)
        bos_id=int(task.output_features["text"].vocabulary.bos_id),
        eos_id=int(task.output_features["text"].vocabulary.eos_id),
        pad_id=int(task.output_features["text"].vocabulary.pad_id),
    )
    return SpectronInput(
        task=task,
        split=split,
        per_host_batch_size=batch_size // num_shards,
        shard_index=shard_index,
        num_shards=num_shards,
        seed=seed,
        shuffle=shuffle,
        repeat=repeat,
        shuffle_buffer_size=shuffle_buffer_size or task.shuffle_buffer_size or 1000,
        converter=converter,
        drop_remainder=drop_remainder,
        prefetch_batches=prefetch_batches,
        cycle_length=cycle_length,
    )
