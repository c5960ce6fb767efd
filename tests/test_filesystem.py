"""The file-system layer against a real (local) GCS server: epath through gcsfs, TFRecord shards read
into tf.data, orbax checkpoints through tensorstore, and the same calls on local paths."""

import os

import numpy as np
import pytest


@pytest.fixture()
def gcs(gcs_emulator, monkeypatch):
    for key, value in gcs_emulator.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    return f"gs://{gcs_emulator['bucket']}"


def _write_tfrecords(path_fn, records):
    import tensorflow as tf

    local = path_fn()
    with tf.io.TFRecordWriter(local) as w:
        for r in records:
            w.write(r)
    return local


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_text_bytes_append_glob_and_tfrecords(where, gcs, tmp_path):
    import tensorflow as tf
    from spectron_jax import filesystem as fs

    root = fs.join(gcs, "fs-test", where) if where == "gcs" else str(tmp_path / "root")
    fs.makedirs(fs.join(root, "sub"))
    fs.write_text(fs.join(root, "a.txt"), "hello")
    assert fs.read_text(fs.join(root, "a.txt")) == "hello"
    fs.write_text(fs.join(root, "a.txt"), "again")  # overwrite
    assert fs.read_text(fs.join(root, "a.txt")) == "again"
    fs.append_lines(fs.join(root, "log.jsonl"), ['{"a": 1}'])
    fs.append_lines(fs.join(root, "log.jsonl"), ['{"a": 2}', '{"a": 3}'])
    assert fs.read_text(fs.join(root, "log.jsonl")).splitlines() == ['{"a": 1}', '{"a": 2}', '{"a": 3}']
    assert fs.is_file(fs.join(root, "a.txt")) and not fs.is_dir(fs.join(root, "a.txt"))
    assert not fs.exists(fs.join(root, "missing"))

    records = [bytes([i]) * (i * 37 + 1) for i in range(12)]
    local = str(tmp_path / "x.tfrecord")
    _write_tfrecords(lambda: local, records)
    for i in range(2):
        fs.copy(local, fs.join(root, f"train.tfrecord-{i:05d}-of-00002"))
    files = fs.glob(fs.join(root, "train.tfrecord-*"))
    assert [os.path.basename(f) for f in files] == ["train.tfrecord-00000-of-00002", "train.tfrecord-00001-of-00002"]
    assert list(fs.iterate_tfrecords(files[0])) == records
    reader = fs.tfrecord_reader(root)
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(reader, cycle_length=2, block_length=1)
    got = [x.numpy() for x in ds]
    assert got == [r for r in records for _ in range(2)]
    if where == "local":
        assert fs.tfrecord_reader(root) is tf.data.TFRecordDataset


def test_orbax_checkpoint_round_trip_on_gcs(gcs):
    import jax
    import orbax.checkpoint as ocp
    from spectron_jax import filesystem as fs  # noqa: F401 - fixes epath's backend

    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((5,), np.int32)}
    directory = fs.join(gcs, "fs-test", "ckpt")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    restored = checkpointer.restore(directory, abstract)
    for key in tree:
        np.testing.assert_array_equal(np.asarray(restored[key]), tree[key])


def test_gin_files_and_their_includes_are_read_from_gcs(gcs, tmp_path):
    from spectron_jax import cli, gin_config
    from spectron_jax import filesystem as fs

    folder = fs.join(gcs, "fs-test", "gin")
    fs.write_text(fs.join(folder, "models", "base.gin"), "A = 1\nB = 'base'\nC = 'base'\n")
    fs.write_text(fs.join(folder, "models", "extra.gin"), "D = 'found under the search path'\n")
    local = tmp_path / "local.gin"
    local.write_text("C = 'local'\n")
    # an include by URL, one relative to a search path on GCS, and one of a local file
    fs.write_text(fs.join(folder, "run.gin"), f"include '{fs.join(folder, 'models', 'base.gin')}'\n"
                                              f"include 'models/extra.gin'\ninclude '{local}'\nB = 'run'\n")
    gin_config.parse_gin(gin_files=[fs.join(folder, "run.gin")], bindings=["A = 2"], gin_search_paths=folder)
    assert [gin_config.query_macro(name) for name in "ABCD"] == [2, "run", "local", "found under the search path"]
    with pytest.raises(cli.UsageError, match=r"^--gin_file=gs://.*/missing\.gin: file not found$"):
        gin_config.parse_gin(gin_files=[fs.join(folder, "missing.gin")])
    fs.write_text(fs.join(folder, "bad_include.gin"), "include 'gs://spectron-test/nowhere.gin'\n")
    with pytest.raises(cli.UsageError, match=r"bad_include\.gin: .*nowhere\.gin"):
        gin_config.parse_gin(gin_files=[fs.join(folder, "bad_include.gin")])
    with pytest.raises(cli.UsageError, match="--gin_search_paths: .* is not a directory"):
        gin_config.search_paths(fs.join(gcs, "no-such-folder"))


def test_feature_stats_round_trip_on_gcs(gcs):
    from spectron_jax import filesystem as fs
    from spectron_jax.data import features

    accumulator = features.StatsAccumulator()
    frames = np.random.default_rng(0).normal(-2, 3, (40, 128))
    accumulator.add(frames)
    stats = accumulator.finalize()
    path = fs.join(gcs, "fs-test", "stats", "stats.json")
    stats.to_json(path)
    loaded = features.FeatureStats.from_json(path)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_allclose(loaded.std, frames.std(axis=0), rtol=1e-8)
    assert loaded.num_frames == 40
    with pytest.raises(ValueError, match=r"gs://.*/absent\.json: not a feature statistics file"):
        features.FeatureStats.from_json(fs.join(gcs, "fs-test", "stats", "absent.json"))


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_copy_that_fails_midway_leaves_nothing(where, gcs, tmp_path, monkeypatch):
    """A copy whose source fails after the first chunk was sent leaves no object or file at all."""
    from spectron_jax import filesystem as fs

    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 << 20))
    root = fs.join(gcs, "copy-test") if where == "gcs" else str(tmp_path / "out")
    destination = fs.join(root, "shard.tfrecord")
    fs.copy(str(source), fs.join(root, "whole.tfrecord"), chunk_bytes=1 << 20)
    assert fs.read_bytes(fs.join(root, "whole.tfrecord")) == source.read_bytes()

    class FailingReader:  # the source's file: its second read fails, as a broken disk or network would
        def __init__(self, f):
            self.f, self.reads = f, 0

        def read(self, n):
            self.reads += 1
            if self.reads == 2:
                raise OSError("read failed")
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_path = fs.path

    class Source:
        def __init__(self, p):
            self.p = p

        def open(self, mode):
            return FailingReader(open(self.p, mode))

    monkeypatch.setattr(fs, "path", lambda p: Source(p) if str(p) == str(source) else real_path(p))
    with pytest.raises(OSError, match="read failed"):
        fs.copy(str(source), destination, chunk_bytes=1 << 20)
    monkeypatch.setattr(fs, "path", real_path)
    import gc

    gc.collect()  # an upload left open would be finished by its file's finaliser
    assert not fs.exists(destination)
    assert [os.path.basename(p) for p in fs.glob(fs.join(root, "*"))] == ["whole.tfrecord"]
