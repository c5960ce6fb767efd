"""Tests for spectron_jax.partitioning on 8 simulated CPU devices."""

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.linen import spmd as linen_spmd
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spectron_jax import partitioning as pt


@pytest.fixture(scope="module")
def mesh222():
    return pt.make_mesh(pt.MeshConfig(ici=(2, 2, 2)))


# --------------------------------------------------------------------------------------------------
# Mesh construction
# --------------------------------------------------------------------------------------------------


def test_make_mesh_fills_minus_one_from_device_count():
    mesh = pt.make_mesh(pt.MeshConfig(ici=(2, -1, 1)))
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_explicit_shape_on_a_device_subset():
    devices = jax.devices()[:4]
    mesh = pt.make_mesh(pt.MeshConfig(ici=(1, 2, 2)), devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "model": 2}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


@pytest.mark.parametrize("ici, message", [
    ((3, -1, 1), "does not divide the 8 devices"),
    ((2, 2, 3), "needs 12 devices but there are 8"),
])
def test_make_mesh_rejects_shapes_that_do_not_fit(ici, message):
    with pytest.raises(ValueError, match=message) as info:
        pt.make_mesh(pt.MeshConfig(ici=ici))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ici", [(-1, -1, 1), (2, 0, 4), (2, 4)])
def test_mesh_config_rejects_malformed_shapes(ici):
    with pytest.raises(ValueError, match="MeshConfig.ici"):
        pt.MeshConfig(ici=ici)


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
    """Enough of a device for `mesh_utils` on a non-TPU platform: 2 slices of 4 devices."""

    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "fake"


def test_multi_slice_grid_puts_one_slice_per_replica():
    devices = [_FakeDevice(id=i, slice_index=i // 4, process_index=i // 4) for i in range(8)]
    config = pt.MeshConfig(ici=(2, 1, -1), dcn=(-1, 1, 1, 1))
    grid = pt.device_grid(config, devices)
    assert config.axis_names == ("replica", "data", "fsdp", "model")
    assert grid.shape == (2, 2, 1, 2)
    for replica in range(2):
        assert {d.slice_index for d in grid[replica].flat} == {replica}
    assert sorted(d.id for d in grid.flat) == list(range(8))
    with pytest.raises(ValueError, match="dcn shape"):
        pt.device_grid(pt.MeshConfig(ici=(-1, 1, 1), dcn=(3, 1, 1, 1)), devices)


# --------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# --------------------------------------------------------------------------------------------------


def test_resolution_matches_flax_reading_of_the_rules_when_everything_divides(mesh222):
    # flax.linen resolves the same table independently (no shapes, no absent-axis pruning).
    rules = tuple((name, axes if axes != ("replica", "data", "fsdp") else ("data", "fsdp"))
                  for name, axes in pt.DEFAULT_RULES)
    cases = [("embed", "mlp"), ("vocab", "embed"), ("embed", "heads", "head_dim"), ("norm",),
             ("batch", "length", "mlp"), ("heads", "head_dim", "embed"), ("mel", "prenet"),
             ("conv_kernel", "conv_in", "conv_out"), ("batch", "frames", "mel")]
    for axes in cases:
        expected = linen_spmd.logical_to_mesh_axes(axes, rules)
        assert pt.logical_to_mesh_spec(axes, pt.DEFAULT_RULES, mesh222, shape=(8,) * len(axes)) == expected, axes


def test_resolution_replicates_what_does_not_divide_and_says_why(mesh222):
    res = pt.resolve_logical_axes(("embed", "kv_heads", "head_dim"), pt.DEFAULT_RULES, mesh222, shape=(16, 1, 8))
    assert res.spec == P("fsdp", None, None)
    assert len(res.notes) == 1 and "kv_heads, size 1" in res.notes[0] and "'model'" in res.notes[0]
    # batch of 2 keeps 'data' but not 'fsdp' (2 % 4); 'embed' then takes the free 'fsdp'.
    res = pt.resolve_logical_axes(("batch", "length", "embed"), pt.DEFAULT_RULES, mesh222, shape=(2, 5, 8))
    assert res.spec == P("data", None, "fsdp")
    # batch of 8 takes data and fsdp, so 'embed' cannot reuse 'fsdp'.
    res = pt.resolve_logical_axes(("batch", "length", "embed"), pt.DEFAULT_RULES, mesh222, shape=(8, 5, 8))
    assert res.spec == P(("data", "fsdp"), None, None)
    assert any("already used" in note for note in res.notes)


def test_resolution_fallback_rules_and_unknown_names(mesh222):
    rules = (("heads", "model"), ("mlp", "model"), ("mlp", "fsdp"))
    res = pt.resolve_logical_axes(("heads", "mlp"), rules, mesh222, shape=(4, 4))
    assert res.spec == P("model", "fsdp")  # 'model' is taken by heads, so mlp falls back to fsdp
    res = pt.resolve_logical_axes(("no_such_axis", "mlp"), rules, mesh222)
    assert res.spec == P(None, "model")
    assert "no rule for logical axis 'no_such_axis'" in res.notes[0]


# --------------------------------------------------------------------------------------------------
# Sharded initialisation
# --------------------------------------------------------------------------------------------------


def _named(rngs, shape, axes, scale=1.0):
    value = scale * jax.random.normal(rngs.params(), shape)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class _Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = _named(rngs, (8, 16), ("embed", "mlp"))
        self.table = _named(rngs, (32, 8), ("vocab", "embed"))
        self.q = _named(rngs, (8, 4, 6), ("embed", "heads", "head_dim"))
        self.scale = _named(rngs, (8,), ("norm",))
        self.k = _named(rngs, (8, 1, 6), ("embed", "kv_heads", "head_dim"))  # MQA: 1 kv head
        self.prenet = _named(rngs, (128, 24), ("mel", "prenet"))  # 3072 elements, all replicated
        self.plain = nnx.Param(jnp.zeros((3,)))  # no logical names


EXPECTED_SPECS = {
    "up": P("fsdp", "model"),
    "table": P("model", "fsdp"),
    "q": P("fsdp", "model", None),
    "scale": P(None),
    "k": P("fsdp", None, None),
    "prenet": P(None, None),
    "plain": P(None),
}


def _shard_shape(shape, spec, mesh):
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
        out.append(dim // int(np.prod([mesh.shape[a] for a in axes])))
    return tuple(out)


def _unsharded_state(factory):
    """The reference: the same initialisation, compiled for one device without any sharding."""
    with jax.default_device(jax.devices()[0]):
        state = jax.jit(lambda: nnx.state(factory()))()
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(state))
    return state


@pytest.fixture(scope="module")
def toy(mesh222):
    return pt.sharded_init(lambda: _Toy(nnx.Rngs(3)), pt.DEFAULT_RULES, mesh222)


def test_sharded_init_places_params_by_rules_and_matches_unsharded_values(toy, mesh222):
    reference = _unsharded_state(lambda: _Toy(nnx.Rngs(3)))
    for name, spec in EXPECTED_SPECS.items():
        value = getattr(toy, name).get_value()
        full = np.asarray(reference[name].get_value())
        assert value.sharding.spec == spec, name
        assert len(value.addressable_shards) == 8
        for shard in value.addressable_shards:
            assert shard.data.shape == _shard_shape(full.shape, spec, mesh222), name
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
        np.testing.assert_array_equal(np.asarray(value), full)


def test_abstract_state_carries_shardings_without_allocating(mesh222):
    _, abstract, _ = pt.abstract_sharded_state(lambda: _Toy(nnx.Rngs(0)), pt.DEFAULT_RULES, mesh222)
    flat = dict(nnx.to_flat_state(abstract))
    assert isinstance(flat[("up",)].get_value(), jax.ShapeDtypeStruct)
    assert flat[("up",)].get_value().sharding == NamedSharding(mesh222, P("fsdp", "model"))
    assert flat[("k",)].get_value().sharding.spec == P("fsdp", None, None)


def test_non_divisible_dims_are_reported_and_big_replicated_params_flagged(mesh222, caplog):
    abstract = nnx.state(nnx.eval_shape(lambda: _Toy(nnx.Rngs(0))))
    notes = pt.sharding_notes(abstract, pt.DEFAULT_RULES, mesh222)
    assert len(notes) == 1 and notes[0].startswith("k: dim 1 (kv_heads, size 1)")
    shardings = pt.param_shardings(abstract, pt.DEFAULT_RULES, mesh222)
    with caplog.at_level(logging.WARNING, logger="spectron_jax.partitioning"):
        found = pt.report_replicated(abstract, shardings, min_size=1000)
    # Only 'prenet' (128 x 24 = 3072 > 1000, fully replicated); 'k' is replicated on 2 of 3 dims only.
    assert len(found) == 1 and found[0].startswith("prenet: shape (128, 24)")
    assert "fully replicated" in caplog.text
    # The threshold is respected, and a one-device mesh never counts as replication.
    assert pt.report_replicated(abstract, shardings, min_size=4000) == []
    single = pt.make_mesh(pt.MeshConfig(ici=(1, 1, 1)), devices=jax.devices()[:1])
    assert pt.report_replicated(abstract, pt.param_shardings(abstract, pt.DEFAULT_RULES, single), 0) == []


def test_report_replicated_reads_shardings_of_concrete_arrays(toy):
    found = pt.report_replicated(nnx.state(toy), min_size=1000)
    assert [line.split(":")[0] for line in found] == ["prenet"]


def test_optimizer_state_shardings_mirror_the_params(toy, mesh222):
    optimizer = nnx.eval_shape(lambda: nnx.Optimizer(_Toy(nnx.Rngs(0)), optax.adamw(1e-3), wrt=nnx.Param))
    shardings = dict(nnx.to_flat_state(pt.param_shardings(nnx.state(optimizer), pt.DEFAULT_RULES, mesh222)))
    for path, sharding in shardings.items():
        if "mu" in path or "nu" in path:
            assert sharding.get_value().spec == EXPECTED_SPECS[path[-1]], path
        else:  # step and count
            assert sharding.get_value().spec == P()
    # A plain optax state over a plain params dict: the moments take the params' shardings.
    params = nnx.to_pure_dict(nnx.state(toy, nnx.Param))
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    mirrored = pt.mirror_param_shardings(opt_state, params, param_sh, mesh222)
    assert mirrored[0].mu == param_sh and mirrored[0].nu == param_sh
    assert mirrored[0].count == NamedSharding(mesh222, P())
    placed = jax.jit(optax.adamw(1e-3).init, out_shardings=mirrored)(params)
    assert placed[0].mu["up"].sharding.spec == P("fsdp", "model")


# --------------------------------------------------------------------------------------------------
# Activation constraints
# --------------------------------------------------------------------------------------------------


def test_with_logical_constraint_sets_the_output_sharding_under_the_context(mesh222):
    x = jnp.arange(2 * 5 * 8, dtype=jnp.float32).reshape(2, 5, 8)

    def f(x):
        return pt.with_logical_constraint(x * 2.0, ("batch", "length", "embed"))

    with pt.sharding_context(mesh222, pt.DEFAULT_RULES):
        out = jax.jit(f)(x)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh222, P("data", None, "fsdp")), 3)
    np.testing.assert_array_equal(np.asarray(out), 2.0 * np.asarray(x))
    # Outside the context the constraint is a no-op (the input comes back unchanged).
    assert pt.with_logical_constraint(x, ("batch", "length", "embed")) is x


def test_model_constraint_reads_the_same_context(mesh222):
    sharding = pytest.importorskip("spectron_jax.models.sharding")
    x = jnp.ones((8, 4, 16))
    with pt.sharding_context(mesh222, pt.DEFAULT_RULES):
        out = jax.jit(lambda x: sharding.constrain(x + 1.0, ("batch", "length", "mlp")))(x)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh222, P(("data", "fsdp"), None, "model")), 3)


# --------------------------------------------------------------------------------------------------
# Host data layout
# --------------------------------------------------------------------------------------------------


def test_global_batch_from_host_on_one_process(mesh222):
    host = {"prompt_frames": np.random.default_rng(0).normal(size=(8, 6, 3)).astype(np.float32),
            "text_inputs": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    info = pt.data_shard_info(8, mesh222)
    assert (info.index, info.count, info.per_host_batch) == (0, 1, 8)
    assert pt.host_batch_slice(8, mesh222) == slice(0, 8)
    batch = pt.global_batch_from_host(host, mesh222)
    for name, value in host.items():
        array = batch[name]
        expected = NamedSharding(mesh222, P(("data", "fsdp"), *([None] * (value.ndim - 1))))
        assert array.sharding.is_equivalent_to(expected, value.ndim)
        np.testing.assert_array_equal(np.asarray(array), value)
        for shard in array.addressable_shards:
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
    with pytest.raises(ValueError, match="global batch 6 is not divisible by the 4 batch shards"):
        pt.data_shard_info(6, mesh222)


def test_data_layout_over_two_processes():
    names = ("data", "fsdp", "model")
    coords = np.indices((2, 2, 2))
    # Processes split along 'data': each reads its own half of the batch.
    by_data = pt._shard_info_from_grid(coords[0], names, ("data", "fsdp"), 16, process=1)
    assert (by_data.index, by_data.count, by_data.per_host_batch) == (1, 2, 8)
    # Processes split along 'model': both hold every batch shard, so both read the same rows.
    for process in (0, 1):
        by_model = pt._shard_info_from_grid(coords[2], names, ("data", "fsdp"), 16, process=process)
        assert (by_model.index, by_model.count, by_model.per_host_batch) == (0, 1, 16)
    # Processes split along 'fsdp' (minor batch axis): process 1 holds blocks 1 and 3 of 4.
    by_fsdp = pt._shard_info_from_grid(coords[1], names, ("data", "fsdp"), 16, process=1)
    assert (by_fsdp.index, by_fsdp.count, by_fsdp.per_host_batch) == (1, 2, 8)


# --------------------------------------------------------------------------------------------------
# The real decoder
# --------------------------------------------------------------------------------------------------


def test_sharded_init_of_the_decoder(mesh222):
    decoder = pytest.importorskip("spectron_jax.models.decoder")
    cfg = decoder.DecoderConfig(vocab_size=64, model_dim=16, num_layers=1, num_heads=4, num_kv_heads=1,
                                head_dim=8, mlp_dim=32)
    model = pt.sharded_init(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)), pt.DEFAULT_RULES, mesh222)
    reference = _unsharded_state(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
    layer = model.layers[0]
    assert model.embedder.table.get_value().sharding.spec == P("model", "fsdp")
    assert layer.mlp.gate.get_value().sharding.spec == P("fsdp", "model")
    assert layer.mlp.down.get_value().sharding.spec == P("model", "fsdp")
    assert layer.attn.q.get_value().sharding.spec == P("fsdp", "model", None)
    assert layer.attn.o.get_value().sharding.spec == P("model", None, "fsdp")
    assert layer.attn.k.get_value().sharding.spec == P("fsdp", None, None)  # one kv head: not on 'model'
    assert layer.mlp.gate.get_value().addressable_shards[0].data.shape == (8, 16)
    reference = dict(nnx.to_flat_state(reference))
    for path, value in nnx.to_flat_state(nnx.state(model)):
        np.testing.assert_array_equal(np.asarray(value.get_value()),
                                      np.asarray(reference[path].get_value()), err_msg=str(path))
    # Only small vectors (norm scales) are left fully replicated.
    assert pt.report_replicated(nnx.state(model), min_size=cfg.model_dim) == []


_TWO_PROCESS_SCRIPT = r"""
import json
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from spectron_jax import partitioning as pt

mesh = pt.make_mesh(pt.MeshConfig(ici=(2, 2, 2)))
canonical = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # the loader's global order
info = pt.data_shard_info(8, mesh)
rows = canonical[pt.host_batch_slice(8, mesh)]
batch = pt.global_batch_from_host({"x": rows}, mesh)["x"]
assert batch.shape == (8, 3) and batch.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
total = float(jax.jit(lambda x: (x * x).sum())(batch))
assert total == float((canonical * canonical).sum()), total
local = np.concatenate([np.asarray(s.data) for s in sorted(batch.addressable_shards, key=lambda s: s.index[0].start)
                        if s.replica_id == 0])
assert np.array_equal(local, rows)
from pod_step import pod_step_values  # the same code the test runs on one process
values = pod_step_values(pt.make_mesh(pt.MeshConfig(ici=(1, -1, 1))))
with open(sys.argv[3], "w") as f:  # the result goes to a file: stdout may carry anything after it
    f.write(json.dumps({"shard": [info.index, info.count, info.per_host_batch], "values": values}))
"""

# Two train steps of a tiny Spectron (stop head, r = 2) with an FSDP mesh over every device, two
# microbatches and uneven masks, then the evaluation loss and the media forward (predicted frames).
_POD_STEP = r"""
import jax
import jax.numpy as jnp
import numpy as np

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def pod_step_values(mesh):
    import test_spectron as ts
    from spectron_jax import partitioning as pt, train, trainer, validation

    model = trainer.FunctionalSpectron(ts.tiny_config(reduction_factor=2, stop_head=True))
    config = train.TrainConfig(step=trainer.StepConfig(compute_dtype="float32", microbatches=2),
                               optimizer=trainer.OptimizerConfig(warmup_steps=0, learning_rate=1e-2))
    layout = trainer.train_state_layout(model, config, 10, mesh)
    full = ts.make_batch(seed=0, prompt_valid=(16, 4, 9, 16, 2, 12, 7, 16) * 2,
                         text_valid=(6, 1, 3, 6, 2, 5, 6, 4) * 2, cont_valid=(8, 2, 6, 0, 8, 1, 4, 8) * 2)
    batch = pt.global_batch_from_host({k: v[pt.host_batch_slice(16, mesh)] for k, v in full.items()}, mesh)
    step = trainer.make_train_step(model.loss_fn, layout.tx, layout.schedule, config.step, jnp.float32,
                                   normalizers_fn=model.loss_normalizers)
    values = {}
    with pt.sharding_context(mesh, config.rules):
        state = jax.jit(layout.init_state, out_shardings=layout.shardings)()
        compiled = jax.jit(step, in_shardings=(layout.shardings, None), out_shardings=(layout.shardings, None)
                           ).lower(state, batch).compile(FAST_COMPILE)
        for i in (1, 2):
            state, metrics = compiled(state, batch)
            values.update({f"train{i}/{k}": float(metrics[k])
                           for k in ("loss", "stop", "spec_time_delta_1", "grad_norm")})
        eval_step = validation.make_eval_step(model.eval_fn, jnp.float32, microbatches=2)

        def evaluate(p, b):
            return eval_step(p, b, model.loss_normalizers(b))["loss"], jnp.sum(jnp.abs(model.predict_frames(p, b)))

        eval_loss, media = jax.jit(evaluate)(state["params"], batch)
        values.update({"eval/loss": float(eval_loss), "media/abs_sum": float(media)})
    return values
"""


@pytest.mark.slow
def test_global_batch_from_host_and_a_pod_step_on_two_processes(repo_root, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    script = tmp_path / "two_process.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    (tmp_path / "pod_step.py").write_text(_POD_STEP)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(repo_root), str(repo_root / "tests"), str(tmp_path)]))
    outputs = [tmp_path / f"result_{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), address, str(i), str(outputs[i])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    got = [json.loads(path.read_text()) for path in outputs]
    # The mesh splits 'data' across the processes: each reads its own half of the batch.
    assert sorted(r["shard"] for r in got) == [[0, 2, 4], [1, 2, 4]]
    # FSDP over both processes (4 devices each) with accumulation, evaluation and the media forward
    # gives what one process with all 8 devices computes from the same code.
    namespace = {}
    exec(compile(_POD_STEP, "pod_step", "exec"), namespace)
    reference = namespace["pod_step_values"](pt.make_mesh(pt.MeshConfig(ici=(1, -1, 1))))
    assert got[0]["values"] == got[1]["values"]
    assert sorted(got[0]["values"]) == sorted(reference)
    for key, value in reference.items():
        assert got[0]["values"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_check_replication_refuses_a_replicated_large_state():
    mesh = pt.make_mesh(pt.MeshConfig(ici=(-1, 1, 1)))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    big, small = jax.ShapeDtypeStruct((2048, 1024), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.float32)
    state = {"embed": big, "scale": small}
    with pytest.raises(ValueError, match=r"100% of the train state.*embed \(2048, 1024\)"):
        pt.check_replication(state, {"embed": replicated, "scale": replicated}, tolerance=0.02)
    assert pt.check_replication(state, {"embed": sharded, "scale": replicated}, tolerance=0.02) == 0.0
    single = jax.sharding.NamedSharding(pt.make_mesh(pt.MeshConfig(ici=(1, 1, 1)), devices=jax.devices()[:1]),
                                        jax.sharding.PartitionSpec())
    assert pt.check_replication(state, {"embed": single, "scale": single}, tolerance=0.0) == 0.0
