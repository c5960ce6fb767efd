"""Checkpoints: save / restore round trips (also onto another mesh), keep-last-N, input positions,
partial initialisation by path, and export (params only, bfloat16)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spectron_jax import checkpoints, partitioning, trainer


def _mesh(ici):
    return partitioning.make_mesh(partitioning.MeshConfig(ici=ici))


def _state(mesh, seed=0):
    """A small train state: a [16, 8] kernel sharded over every mesh axis it can use, AdamW moments."""
    rng = np.random.default_rng(seed)
    params = {"encoder": {"kernel": rng.normal(size=(16, 8)).astype(np.float32)},
              "decoder": {"layers": {0: {"w": rng.normal(size=(8,)).astype(np.float32)}}}}
    kernel_sharding = NamedSharding(mesh, P(("data", "fsdp"), "model"))
    shardings = {"encoder": {"kernel": kernel_sharding},
                 "decoder": {"layers": {0: {"w": NamedSharding(mesh, P())}}}}
    params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    state = {"step": jnp.asarray(7, jnp.int32), "rng": jax.random.key_data(jax.random.key(seed)),
             "params": params, "opt_state": opt_state,
             "input": checkpoints.input_state_arrays([{"epoch": 1, "position": 40, "batches": 12}])}
    return state, shardings


def _abstract(state, mesh, kernel_spec):
    def one(kp, x):
        path = trainer.path_of(kp)
        spec = kernel_spec if path.endswith("encoder/kernel") else P()
        if isinstance(x, np.ndarray):
            return np.zeros(x.shape, x.dtype)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
    return jax.tree_util.tree_map_with_path(one, state)


def _assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_onto_another_mesh_and_keep_last(tmp_path):
    mesh = _mesh((8, 1, 1))
    state, _ = _state(mesh)
    ckpt = checkpoints.TrainCheckpointer(str(tmp_path), checkpoints.CheckpointConfig(save_every_steps=1, keep_last=2))
    for step in (1, 2, 3):
        assert ckpt.save(step, state, {"seed": 5})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]  # keep-last-2
    assert not ckpt.save(3, state)  # an existing step is never overwritten

    other = _mesh((2, 2, 2))
    abstract = _abstract(state, other, P(("data", "fsdp"), "model"))
    restored, meta = ckpt.restore(ckpt.latest_step(), abstract)
    _assert_trees_equal(restored, state)
    kernel = restored["params"]["encoder"]["kernel"]
    assert kernel.sharding.spec == P(("data", "fsdp"), "model")
    assert kernel.sharding.mesh.shape == other.shape
    # The kernel now lives in 8 distinct shards of the new mesh.
    assert len({str(s.index) for s in kernel.addressable_shards}) == 8
    assert meta["seed"] == 5 and meta["step"] == 3
    ckpt.close()


def test_input_state_round_trip_and_process_count_change():
    states = [{"epoch": 0, "position": 10, "batches": 3}, {"epoch": 0, "position": 12, "batches": 3}]
    arrays = checkpoints.input_state_arrays(states)
    assert arrays["position"].tolist() == [10, 12]
    got = checkpoints.input_state_for_process(arrays, 1, 2)
    assert got == {"epoch": 0, "position": 12, "batches": 3}
    assert checkpoints.input_state_for_process(arrays, 0, 1) is None


def test_paths_flatten_round_trip():
    tree = {"a": {"b": np.ones(2), "layers": {0: {"k": np.zeros(1)}, 1: {"k": np.zeros(3)}}}, "c": np.ones(1)}
    flat = checkpoints.flatten_paths(tree)
    assert sorted(flat) == ["a/b", "a/layers/0/k", "a/layers/1/k", "c"]
    back = checkpoints.unflatten_paths(flat)
    assert jax.tree.structure(back) == jax.tree.structure(tree)


def test_partial_init_copies_only_matching_paths(tmp_path):
    mesh = _mesh((8, 1, 1))
    source, _ = _state(mesh, seed=1)
    ckpt = checkpoints.TrainCheckpointer(str(tmp_path / "source"))
    ckpt.save(5, source)
    ckpt.close()
    fresh, _ = _state(mesh, seed=2)
    params, copied = checkpoints.apply_partial_init(
        fresh["params"], [checkpoints.PartialInit(checkpoint=str(tmp_path / "source"), include="^encoder/")])
    assert copied == ["encoder/kernel"]
    np.testing.assert_array_equal(params["encoder"]["kernel"], source["params"]["encoder"]["kernel"])
    assert params["encoder"]["kernel"].sharding == fresh["params"]["encoder"]["kernel"].sharding
    np.testing.assert_array_equal(params["decoder"]["layers"][0]["w"], fresh["params"]["decoder"]["layers"][0]["w"])
    with pytest.raises(ValueError, match="no parameter matches"):
        checkpoints.apply_partial_init(fresh["params"], [checkpoints.PartialInit(str(tmp_path / "source"), "^nothing")])
    with pytest.raises(ValueError, match="lacks"):
        checkpoints.apply_partial_init(fresh["params"], [checkpoints.PartialInit(
            str(tmp_path / "source"), "^encoder/", target_prefix="other/")])


def test_export_params_only_bfloat16(tmp_path):
    mesh = _mesh((8, 1, 1))
    state, _ = _state(mesh)
    model_dir = tmp_path / "run"
    ckpt = checkpoints.TrainCheckpointer(str(model_dir))
    ckpt.save(4, state)
    ckpt.close()
    (model_dir / "config.gin").write_text("X = 1\n")
    (model_dir / "tokenizer.model").write_bytes(b"spm")
    info = checkpoints.export(str(model_dir), str(tmp_path / "export"), dtype="bfloat16")
    assert info["step"] == 4 and info["dtype"] == "bfloat16" and info["num_params"] == 16 * 8 + 8
    assert (tmp_path / "export" / "config.gin").read_text() == "X = 1\n"
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == b"spm"
    assert json.loads((tmp_path / "export" / "export.json").read_text())["tokenizer"] == "tokenizer.model"
    params = checkpoints.load_exported_params(str(tmp_path / "export"))
    assert set(params) == {"encoder", "decoder"}  # no optimizer state, no step
    kernel = params["encoder"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    expected = np.asarray(state["params"]["encoder"]["kernel"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel), expected)
    # Partial init also reads export folders (here: the decoder, cast back to the target dtype).
    fresh, _ = _state(mesh, seed=3)
    fresh_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), fresh["params"])
    params2, copied = checkpoints.apply_partial_init(
        fresh_bf16, [checkpoints.PartialInit(str(tmp_path / "export"), include="^decoder/")])
    assert copied == ["decoder/layers/0/w"]
    np.testing.assert_array_equal(np.asarray(params2["decoder"]["layers"][0]["w"]),
                                  np.asarray(state["params"]["decoder"]["layers"][0]["w"]).astype(jnp.bfloat16))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.export(str(tmp_path / "empty"), str(tmp_path / "out"))


def test_export_cli(tmp_path):
    from spectron_jax import cli, export as export_cli

    mesh = _mesh((8, 1, 1))
    state, _ = _state(mesh)
    model_dir = tmp_path / "run"
    ckpt = checkpoints.TrainCheckpointer(str(model_dir))
    ckpt.save(2, state)
    ckpt.save(6, state)
    ckpt.close()
    (model_dir / "config.gin").write_text("X = 1\n")
    assert export_cli.main([f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'out'}", "--step=2"]) == 0
    assert json.loads((tmp_path / "out" / "export.json").read_text())["step"] == 2
    assert export_cli.main([f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'out'}"]) == 0
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["step"] == 6 and info["dtype"] == "float32" and info["tokenizer"] is None
    with pytest.raises(cli.InputError, match="--model_dir"):
        export_cli.main([f"--model_dir={tmp_path / 'missing'}", f"--output_dir={tmp_path / 'o'}"])
    with pytest.raises(cli.InputError, match="step 9 not found"):
        export_cli.main([f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'o'}", "--step=9"])
    with pytest.raises(cli.UsageError, match="--dtype"):
        export_cli.main([f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'o'}", "--dtype=int8"])
