"""O(1) resume of the input: the epoch order's arithmetic, bounded reads at a late position, and exact
batches after a restore across epoch boundaries on two hosts."""

import collections
import json

import numpy as np
import pytest
import tensorflow as tf

from spectron_jax.data import epoch_order, pipeline, tasks

MEL = 128
TASK = "spectron_librilight"
CONFIG = tasks.TaskConfig(max_continuation_seconds=1.0)
SHAPES = dict(prompt_len=240, text_len=24, cont_len=80, reduction_factor=4)


def _reference_round_robin(counts):
    """Round-robin interleave by simulation: a queue of files, each giving one record per turn."""
    queue = collections.deque((slot, 0) for slot, n in enumerate(counts) if n > 0)
    order = []
    while queue:
        slot, record = queue.popleft()
        order.append((slot, record))
        if record + 1 < counts[slot]:
            queue.append((slot, record + 1))
    return order


@pytest.mark.parametrize("counts", [[5, 2, 7], [3, 0, 3, 1], [4], [1, 1, 9, 2]])
def test_round_robin_starts_anywhere(counts):
    full = _reference_round_robin(counts)
    assert list(epoch_order.round_robin(counts)) == full
    for start in range(len(full) + 1):
        assert list(epoch_order.round_robin(counts, start)) == full[start:], start


def _write_raw_files(folder, counts):
    """TFRecord files (TensorFlow's writer) whose records say which file and index they are."""
    paths = []
    for f, n in enumerate(counts):
        path = str(folder / f"train.tfrecord-{f:05d}-of-{len(counts):05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(n):
                writer.write(f"{f}:{i}:".encode() + bytes(100 + 37 * i % 50))
        paths.append(path)
    return paths


def _label(data):
    file, record, _ = data.split(b":", 2)
    return int(file), int(record)


@pytest.mark.parametrize("counts,num_shards", [([13, 7, 11, 9, 6], 2), ([23], 2), ([10, 12, 8], 1)])
def test_restore_reads_at_most_a_window_and_continues_exactly(tmp_path, counts, num_shards):
    files = _write_raw_files(tmp_path, counts)
    window, cycle = 4, 2
    hosts = []
    for host in range(num_shards):
        def make(host=host):
            return epoch_order.EpochOrder(files, epoch_order.record_counts(files), host, num_shards, seed=7,
                                          shuffle=True, window=window, cycle_length=cycle)

        full = make()
        epochs = [[(_label(d), p) for d, p in full.records(e)] for e in range(2)]
        for e, stream in enumerate(epochs):
            assert [p for _, p in stream] == list(range(full.length))
            hosts.append({label for label, _ in stream})
        # every position, a late one included: at most one window's payloads (record mode: the other
        # hosts' records of it are passed by header), at most one interleave group's files opened
        for e in range(2):
            for start in sorted({full.length - 1, full.length - window - 1, full.length // 2, 1}):
                order = make()
                it = order.records(e, start)
                first = next(it)
                assert (_label(first[0]), first[1]) == epochs[e][start]
                reads = order.read_counts.as_dict()
                assert reads["records_read"] <= window
                assert reads["files_opened"] <= cycle if order.by_file else reads["files_opened"] == 1
                assert reads["records_skipped"] <= sum(counts)  # headers only, within the open files
                assert [(_label(d), p) for d, p in it] == epochs[e][start + 1 :]
        # the uninterrupted pass read each record once
        assert full.read_counts.records_read == 2 * full.length
        # shuffling mixes: not the files' order, not the same twice, windows span files
        labels = [[label for label, _ in stream] for stream in epochs]
        assert labels[0] != labels[1] and labels[0] != sorted(labels[0])
        if len(full.files) > 1:
            assert any(len({f for f, _ in labels[0][i : i + window]}) > 1 for i in range(0, full.length, window))
    # the hosts split each epoch's records: disjoint, covering
    every = {(f, i) for f, n in enumerate(counts) for i in range(n)}
    for e in range(2):
        per_host = hosts[e::2] if num_shards == 2 else [hosts[e]]
        assert set().union(*per_host) == every
        assert sum(len(h) for h in per_host) == len(every)


def test_record_counts_from_report_or_scan(tmp_path):
    files = _write_raw_files(tmp_path, [5, 3])
    assert epoch_order.record_counts(files) == [5, 3]
    shards = [{"file": f.rsplit("/", 1)[1], "examples": n, "bytes": tf.io.gfile.stat(f).length}
              for f, n in zip(files, [5, 3])]
    report = {"splits": {"train": {"shards": shards}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert epoch_order.record_counts(files) == [5, 3]
    shards[0]["examples"] = 6  # a wrong count for the file's size is caught when the file is read
    (tmp_path / "report.json").write_text(json.dumps(report))
    order = epoch_order.EpochOrder(files, epoch_order.record_counts(files), 0, 1, 0, False, 4, 2)
    with pytest.raises(ValueError, match="tfrecord-00000-of-00002: ends after 5 records, but its listing gives 6"):
        list(order.records(0))
    shards[0]["bytes"] += 1  # a report for another file size is not trusted: the headers are scanned
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert epoch_order.record_counts(files) == [5, 3]


# ---- the whole pipeline ----------------------------------------------------------------------------
def _example(number: int, frames: int) -> bytes:
    log_mel = np.full((frames, MEL), -4.0, np.float32)
    log_mel[:, 0] = number
    feature = {
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"u{number}".encode()])),
        "transcript": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"the quick brown fox"])),
        "num_frames": tf.train.Feature(int64_list=tf.train.Int64List(value=[frames])),
        "log_mel": tf.train.Feature(float_list=tf.train.FloatList(value=log_mel.reshape(-1))),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, throwaway_sp_model):
    """4 train files (2 per host) of 20-34 utterances, every seventh under the 280-frame minimum."""
    folder = tmp_path_factory.mktemp("resume_corpus")
    number = 0
    for f, n in enumerate([20, 34, 27, 31]):
        with tf.io.TFRecordWriter(str(folder / f"train.tfrecord-{f:05d}-of-00004")) as writer:
            for _ in range(n):
                writer.write(_example(number, 260 if number % 7 == 3 else 282))
                number += 1
    tasks.register_tasks({TASK: str(folder)}, throwaway_sp_model, CONFIG)
    return folder


def _numbers(batch):
    return [int(row[0, 0]) for row in batch["cont_frames"]]


@pytest.mark.parametrize("host", [0, 1])
def test_pipeline_restores_late_in_an_epoch_exactly_after_a_bounded_read(corpus, host):
    def make():
        return pipeline.make_pipeline(TASK, "train", batch_size=8, shard_index=host, num_shards=2, seed=3,
                                      shuffle_buffer_size=6, cycle_length=2, **SHAPES)

    uninterrupted = make()
    length = uninterrupted.order.length  # this host's records per epoch (51 or 58)
    batches = []
    while uninterrupted.state()["epoch"] < 1 or uninterrupted.state()["position"] < length - 9:
        batches.append(next(uninterrupted))
    state = uninterrupted.state()  # late in epoch 1
    tail = [next(uninterrupted) for _ in range(8)]  # crosses into epoch 2
    assert uninterrupted.state()["epoch"] == 2
    epochs = [n for b in batches for n in _numbers(b)]
    kept = {n for n in epochs}
    first = epochs[: len(kept)]
    assert first != sorted(first) and first != epochs[len(kept) : 2 * len(kept)]

    resumed = make()
    resumed.restore(state)
    for expected in tail:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert resumed.state() == uninterrupted.state()
    # Reads: the records the 8 batches span, plus less than one window of the restore's, plus tf.data's
    # read-ahead (2 prefetched batches, the parallel maps' buffers); rebuilding the epoch and skipping
    # would read `position` (> 36) more.
    spanned = (length - state["position"]) + resumed.state()["position"]
    assert state["position"] > 36
    assert resumed.read_counts["records_read"] - spanned <= 6 + 24


def test_a_user_task_gets_seqio_output_feature_validation(corpus):
    """A Task registered by hand runs through seqio's own output-feature checks, as with get_dataset."""
    import seqio

    base = seqio.get_mixture_or_task(TASK)
    features = dict(base.output_features, prompt=seqio.ContinuousFeature(dtype=tf.float32, rank=3))
    seqio.TaskRegistry.remove("user_task")
    seqio.TaskRegistry.add("user_task", source=base.source, preprocessors=base.preprocessors,
                           output_features=features)
    with pytest.raises(ValueError, match="incorrect rank for feature 'prompt'"):
        next(pipeline.make_pipeline("user_task", "train", batch_size=2, seed=0, **SHAPES))
    seqio.TaskRegistry.remove("user_task")
    text = seqio.TextLineDataSource({"train": str(corpus / "train.tfrecord-00000-of-00004")})
    seqio.TaskRegistry.add("user_task", source=text, preprocessors=[], output_features=base.output_features)
    with pytest.raises(ValueError, match="reads uncompressed TFRecord shards"):
        pipeline.make_pipeline("user_task", "train", batch_size=2, seed=0, **SHAPES)
    seqio.TaskRegistry.remove("user_task")


def test_a_checkpoint_of_another_record_order_is_a_data_change():
    import types

    from spectron_jax import train

    shard = types.SimpleNamespace(index=0, count=1)
    now = pipeline.ORDER_VERSION
    assert train._data_change({"seed": 0, "input_order": now}, 0, shard, 0, now) == ""
    assert train._data_change({"seed": 0}, 0, shard, 0, now) == f"input record order version 1 -> {now}"
    assert train._data_change({"seed": 0}, 0, shard, 0, None) == ""  # another process count restarts anyway
    # The fingerprint of the data files: compared when present, unknown (not a change) when absent.
    fingerprint = pipeline.order_fingerprint(["train.tfrecord-00000-of-00001"], [32], 1000, 16)
    moved = pipeline.order_fingerprint(["train.tfrecord-00000-of-00001", "train.tfrecord-00001-of-00001"],
                                       [32, 32], 1000, 16)
    meta = {"seed": 0, "input_order": now, "input_fingerprint": fingerprint}
    assert train._data_change(meta, 0, shard, 0, now, fingerprint) == ""
    assert train._data_change({"seed": 0, "input_order": now}, 0, shard, 0, now, moved) == ""
    assert train._data_change(meta, 0, shard, 0, now, moved) == "data files 1 -> 2, records 32 -> 64"
    assert train._data_change(meta, 0, shard, 0, None, dict(fingerprint, cycle_length=4)) == ""


def test_order_fingerprint_names_what_changed(tmp_path):
    def fingerprint(folder, counts, window=1000, cycle=16, names=None):
        folder.mkdir(exist_ok=True)
        files = _write_raw_files(folder, counts)
        if names is not None:
            files = [str(p.rename(folder / n)) for p, n in zip(map(type(folder), files), names)]
        return pipeline.order_fingerprint(files, epoch_order.record_counts(files), window, cycle)

    base = fingerprint(tmp_path / "a", [5, 3])
    assert base["data_files"] == 2 and base["data_records"] == 8
    # the same shards in another folder (or bucket) are the same data
    assert pipeline.fingerprint_changes(base, fingerprint(tmp_path / "b", [5, 3])) == []
    cases = {
        "added": ([5, 3, 2], {}, ["data files 2 -> 3, records 8 -> 10"]),
        "grown": ([5, 4], {}, ["data records 8 -> 9 (same files)"]),
        "moved": ([4, 4], {}, ["per-file record counts changed (8 records in all)"]),
        "renamed": ([5, 3], {"names": ["train.tfrecord-00000-of-00002", "train.tfrecord-00009-of-00002"]},
                    ["data file names changed (2 files)"]),
        "window": ([5, 3], {"window": 500}, ["shuffle_buffer_size 1000 -> 500"]),
        "cycle": ([5, 3], {"cycle": 8, "window": 10}, ["shuffle_buffer_size 1000 -> 10", "cycle_length 16 -> 8"]),
    }
    for name, (counts, kwargs, expected) in cases.items():
        assert pipeline.fingerprint_changes(base, fingerprint(tmp_path / name, counts, **kwargs)) == expected, name
    # order settings are left out when the epoch restarts anyway (another process count)
    changed = fingerprint(tmp_path / "settings", [5, 3], window=7, cycle=3)
    assert pipeline.fingerprint_changes(base, changed, settings=False) == []
    # a checkpoint written before a field was recorded: the field is unknown, not changed
    assert pipeline.fingerprint_changes(None, changed) == []
    assert pipeline.fingerprint_changes({"data_files": 2}, changed) == []
    assert pipeline.fingerprint_changes({"cycle_length": 16}, changed) == ["cycle_length 16 -> 3"]


def test_a_pipeline_fingerprints_every_hosts_files_without_reading_records(corpus):
    host = pipeline.make_pipeline(TASK, "train", batch_size=8, shard_index=1, num_shards=2, seed=3,
                                  shuffle_buffer_size=6, cycle_length=2, **SHAPES)
    fingerprint = host.order_fingerprint()
    files = sorted(str(p) for p in corpus.glob("train.tfrecord-*"))
    assert fingerprint == pipeline.order_fingerprint(files, [20, 34, 27, 31], 6, 2)
    assert host.record_counts == [20, 34, 27, 31] and host.read_counts["records_read"] == 0


@pytest.mark.parametrize("counts,num_shards", [([13, 7, 11, 9, 6], 2), ([23], 3), ([4, 4, 4], 3)])
def test_replayed_records_after_a_process_count_change(counts, num_shards):
    lengths = [epoch_order.EpochOrder([f"f{i}" for i in range(len(counts))], counts, h, num_shards, 0, True, 4, 2).length
               for h in range(num_shards)]
    assert epoch_order.host_lengths(counts, num_shards) == lengths
    assert sum(lengths) == sum(counts)
    epochs = [3] + [2] * (num_shards - 1)  # host 0 is one epoch ahead
    positions = [1] + [lengths[h] - 1 for h in range(1, num_shards)]
    # restarting epoch 2 replays host 0's whole epoch 2 and 1 record of epoch 3, the others' positions
    expected = lengths[0] + 1 + sum(positions[1:])
    assert epoch_order.replayed_records(counts, num_shards, epochs, positions) == expected
    # two processes per data shard (model parallel across hosts): a shared stream counts once
    doubled = [value for value in epochs for _ in range(2)], [value for value in positions for _ in range(2)]
    indices = [h for h in range(num_shards) for _ in range(2)]
    assert epoch_order.replayed_records(counts, num_shards, *doubled, shard_indices=indices) == expected
