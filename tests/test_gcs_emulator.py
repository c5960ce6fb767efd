"""The test GCS server (`tests/gcs_emulator.py`) answers tensorstore as GCS does: a downloaded object
carries the generation its upload returned, preconditions give 304 / 412, and orbax's OCDBT checkpoints
(the production format) round-trip through it every time."""

import numpy as np
import pytest


@pytest.fixture()
def kvstore(gcs_emulator, monkeypatch):
    for key, value in gcs_emulator.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    import tensorstore as ts

    return ts.KvStore.open({"driver": "gcs", "bucket": gcs_emulator["bucket"], "path": "kv/"}).result()


def test_generations_and_preconditions(kvstore):
    written = kvstore.write("x", b"one").result().generation
    assert written  # b'': the write did not happen
    read = kvstore.read("x").result()
    assert read.value == b"one" and read.stamp.generation == written  # not generation 0
    # Unchanged since `written`: 304, no body.
    assert kvstore.read("x", if_not_equal=written).result().state == "unspecified"
    replaced = kvstore.write("x", b"two", if_equal=written).result().generation
    assert replaced and replaced != written
    # A write conditioned on a generation that is gone is refused (412) and changes nothing.
    assert kvstore.write("x", b"three", if_equal=written).result().generation == b""
    changed = kvstore.read("x", if_not_equal=written).result()
    assert changed.value == b"two" and changed.stamp.generation == replaced
    assert kvstore.read("missing").result().state == "missing"


def test_ocdbt_checkpoints_round_trip(gcs_emulator, monkeypatch):
    for key, value in gcs_emulator.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    import orbax.checkpoint as ocp

    # 100 small arrays, saved 4 times: each save revalidates its manifest while arrays are still being
    # committed (the reads that got generation 0 from the released emulator, half of the saves failing).
    tree = {f"a{i}": np.arange(12, dtype=np.float32).reshape(3, 4) + i for i in range(100)}
    for trial in range(4):
        path = f"gs://{gcs_emulator['bucket']}/ocdbt/{trial}"
        with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=True)) as checkpointer:
            checkpointer.save(path, args=ocp.args.StandardSave(tree))
            restored = checkpointer.restore(path)
        assert sorted(restored) == sorted(tree)
        for name, value in tree.items():
            np.testing.assert_array_equal(np.asarray(restored[name]), value, err_msg=f"{trial}/{name}")
