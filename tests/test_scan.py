"""Scanned layer stacks: same loss and gradients as per-layer stacks, cached decoding, layout conversion."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from spectron_jax import checkpoints
from spectron_jax.models import layer_stacking
from spectron_jax.models.conformer import ConformerEncoder
from spectron_jax.models.decoder import Decoder
from spectron_jax.models.scanning import REMAT_POLICIES, remat_label
from spectron_jax.models.spectron_model import SpectronModel
from tests.test_spectron import MEL, make_batch, tiny_config


def scan_config(scan: bool, remat_policy: str = "none"):
    """The tiny Spectron config with a 3-layer decoder cycling (local, global): one scanned period of two
    layers plus one unscanned remainder layer; a 2-layer encoder."""
    cfg = tiny_config()
    decoder = dataclasses.replace(cfg.decoder, num_layers=3, attention_pattern=("local", "global"), sliding_window=5,
                                  local_rope_base=100.0, scan_layers=scan, remat_policy=remat_policy)
    encoder = dataclasses.replace(cfg.encoder, num_layers=2, scan_layers=scan, remat_policy=remat_policy)
    return dataclasses.replace(cfg, decoder=decoder, encoder=encoder)


def scanned_copy(model: SpectronModel, params: nnx.State, scanned: SpectronModel) -> nnx.State:
    """`params` of the per-layer `model` moved into the layout of `scanned` (through layer_stacking)."""
    tree = layer_stacking.stack_layers(params, layer_stacking.model_scan_periods(scanned.config))
    target, _ = scanned.init(seed=5)
    nnx.replace_by_pure_dict(target, tree)
    return target


def loss_and_grads(model: SpectronModel, params: nnx.State, batch):
    fn = jax.jit(jax.value_and_grad(lambda p, b: model.loss_fn(p, b, jax.random.key(0), deterministic=True)[0]))
    loss, grads = fn(params, batch)
    return float(loss), grads.to_pure_dict()


@pytest.fixture(scope="module")
def reference():
    model = SpectronModel(scan_config(False))
    params, _ = model.init(seed=0)
    batch = {k: jnp.asarray(v) for k, v in make_batch(seed=2).items()}
    loss, grads = loss_and_grads(model, params, batch)
    return model, params, batch, loss, grads


def test_layouts_have_the_expected_paths_and_stacked_shapes(reference):
    model, params, _, _, _ = reference
    scanned = SpectronModel(scan_config(True))
    abstract = scanned.abstract_params.to_pure_dict()
    dec, enc = abstract["decoder"], abstract["encoder"]
    assert "layers" not in dec and "blocks" not in enc
    assert sorted(dec["scanned_layers"]) == [0, 1] and sorted(dec["remainder_layers"]) == [0]
    per_layer = params.to_pure_dict()["decoder"]["layers"]
    assert dec["scanned_layers"][1]["attn"]["q"].shape == (1,) + per_layer[1]["attn"]["q"].shape
    assert enc["scanned_blocks"][0]["ffn_in"]["hidden"]["kernel"].shape[0] == 2
    q = scanned.abstract_params["decoder"]["scanned_layers"][0]["attn"]["q"]
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")


@pytest.mark.slow  # two compiles of the whole model's loss and gradients: ~25 s on 2 cores
def test_scanned_spectron_gives_the_same_loss_and_gradients(reference):
    """The whole model's loss: per-layer, no remat vs scanned with the same weights (encoder 'full',
    decoder 'save_proj'); every remat policy is compared stack by stack below."""
    model, params, batch, ref_loss, ref_grads = reference
    cfg = scan_config(True, "full")
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, remat_policy="save_proj"))
    scanned = SpectronModel(cfg)
    loss, grads = loss_and_grads(scanned, scanned_copy(model, params, scanned), batch)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    grads = layer_stacking.unstack_layers(grads)
    flat_ref, flat = checkpoints.flatten_paths(ref_grads), checkpoints.flatten_paths(grads)
    assert sorted(flat) == sorted(flat_ref)
    for path, ref in flat_ref.items():
        np.testing.assert_allclose(np.asarray(flat[path]), np.asarray(ref), atol=1e-5, rtol=1e-5, err_msg=path)


def stack_grads(decoder: Decoder, encoder: ConformerEncoder, x, frames, mask):
    """Value and gradients of a scalar of both stacks' outputs (jitted); gradients as per-layer dicts."""
    valid = jnp.ones(x.shape[:2], bool)
    prefix = jnp.broadcast_to(jnp.arange(x.shape[1])[None, :] < 2, x.shape[:2])

    def loss(models):
        dec, enc = models
        hidden = dec(x, valid, prefix, deterministic=True)[0]
        encoded = enc(frames, mask, deterministic=True)[0]
        return jnp.sum(jnp.sin(hidden)) + jnp.sum(jnp.cos(encoded))

    value, grads = nnx.jit(nnx.value_and_grad(loss))((decoder, encoder))
    grads = [layer_stacking.unstack_layers(nnx.state(g, nnx.Param)) for g in grads]
    return float(value), grads


@pytest.fixture(scope="module")
def stacks():
    cfg = scan_config(False)
    decoder, encoder = Decoder(cfg.decoder, rngs=nnx.Rngs(0)), ConformerEncoder(cfg.encoder, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, cfg.decoder.model_dim)), jnp.float32)
    frames = jnp.asarray(rng.normal(size=(2, 12, MEL)), jnp.float32)
    mask = jnp.asarray(np.arange(12)[None, :] < np.array([[12], [9]]))
    return cfg, decoder, encoder, (x, frames, mask), stack_grads(decoder, encoder, x, frames, mask)


# Every policy runs scanned at least once: 'none' and 'dots_saveable' here, 'full' (encoder) and
# 'save_proj' (decoder) in the whole-model test above; per-block remat without scanning with 'save_proj'
# here and 'full' in test_decoder.py. (Each case is a compile of its own; this keeps the file near 60 s.)
@pytest.mark.parametrize("scan,policy", [(True, "none"), (True, "dots_saveable"), (False, "save_proj")])
def test_remat_policies_give_the_same_stack_gradients(stacks, scan, policy):
    """Decoder (one scanned period + a remainder layer) and Conformer, scanned or not, with `policy`,
    against the per-layer stacks without remat holding the same weights."""
    cfg, decoder, encoder, inputs, (ref_value, ref_grads) = stacks
    dec_cfg = dataclasses.replace(cfg.decoder, scan_layers=scan, remat_policy=policy)
    enc_cfg = dataclasses.replace(cfg.encoder, scan_layers=scan, remat_policy=policy)
    dec, enc = Decoder(dec_cfg, rngs=nnx.Rngs(3)), ConformerEncoder(enc_cfg, rngs=nnx.Rngs(4))
    for target, source, periods in ((dec, decoder, layer_stacking.model_scan_periods(dec_cfg)),
                                    (enc, encoder, layer_stacking.model_scan_periods(enc_cfg))):
        nnx.update(target, nnx.State(layer_stacking.stack_layers(nnx.state(source, nnx.Param), periods)))
    value, grads = stack_grads(dec, enc, *inputs)
    assert abs(value - ref_value) <= 1e-5 * max(1.0, abs(ref_value))
    for got, ref in zip(grads, ref_grads):
        flat, flat_ref = checkpoints.flatten_paths(got), checkpoints.flatten_paths(ref)
        assert sorted(flat) == sorted(flat_ref)
        for path, want in flat_ref.items():
            np.testing.assert_allclose(np.asarray(flat[path]), np.asarray(want), atol=1e-5, rtol=1e-5, err_msg=path)


def test_remat_policies_change_what_the_backward_pass_saves():
    """'none' has no rematerialisation; the others wrap each block in a checkpoint with their policy."""
    cfg = scan_config(True).decoder
    x = jax.random.normal(jax.random.key(0), (1, 6, cfg.model_dim))
    valid, prefix = jnp.ones((1, 6), bool), jnp.zeros((1, 6), bool)
    jaxprs = {}
    for policy in REMAT_POLICIES:
        model = Decoder(dataclasses.replace(cfg, remat_policy=policy), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(x, valid, prefix, deterministic=True)[0])  # noqa: E731
        jaxprs[policy] = str(jax.make_jaxpr(jax.grad(loss))(state))
    assert "checkpoint" not in jaxprs["none"] and "remat" not in jaxprs["none"]
    for policy in ("full", "dots_saveable", "save_proj"):
        assert "checkpoint" in jaxprs[policy] or "remat" in jaxprs[policy], policy
    assert "q_proj" in jaxprs["save_proj"] and "mlp_out" in jaxprs["save_proj"]


def test_cached_decoding_with_scanned_layers_reproduces_the_full_forward(stacks):
    """Scanned decoder (local/global period + remainder): prefill of 5 slots + 2 single steps == full pass."""
    cfg, decoder, _, (x, _, _), _ = stacks
    dec_cfg = dataclasses.replace(cfg.decoder, scan_layers=True)
    model = Decoder(dec_cfg, rngs=nnx.Rngs(3))
    nnx.update(model, nnx.State(layer_stacking.stack_layers(nnx.state(decoder, nnx.Param),
                                                            layer_stacking.model_scan_periods(dec_cfg))))
    valid = jnp.asarray([[True] * 7, [True] * 6 + [False]])
    prefix = jnp.broadcast_to(jnp.arange(7)[None, :] < 2, (2, 7))
    full = nnx.jit(lambda m, x: m(x, valid, prefix, deterministic=True)[0])(model, x)
    cache = model.init_cache(2, 9)
    assert len(cache.scanned) == 2 and cache.scanned[0].k.shape[:2] == (1, 2) and len(cache.layers) == 1
    spectron_cache = SpectronModel(scan_config(True)).init_cache(2, 9)
    assert jax.tree.map(jnp.shape, spectron_cache) == jax.tree.map(jnp.shape, cache)
    step = nnx.jit(lambda m, x, v, p, c: m(x, v, p, deterministic=True, cache=c))
    hidden, cache = step(model, x[:, :5], valid[:, :5], prefix[:, :5], cache)
    pieces = [hidden]
    for j in (5, 6):
        hidden, cache = step(model, x[:, j:j + 1], valid[:, j:j + 1], prefix[:, j:j + 1], cache)
        pieces.append(hidden)
    cached = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    keep = np.asarray(valid)
    np.testing.assert_allclose(cached[keep], np.asarray(full)[keep], atol=1e-5)
    assert int(cache.end_index) == 7


def test_conversion_round_trips_exactly(reference):
    model, params, _, _, _ = reference
    scanned = SpectronModel(scan_config(True))
    periods = layer_stacking.model_scan_periods(scanned.config)
    assert periods == {"encoder/blocks": 1, "decoder/layers": 2}
    tree = params.to_pure_dict()
    stacked = layer_stacking.stack_layers(params, periods)
    assert layer_stacking.scan_periods(stacked) == periods
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), scanned.abstract_params.to_pure_dict())
    assert jax.tree.map(lambda x: (x.shape, x.dtype), stacked) == shapes
    back = layer_stacking.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restacked = layer_stacking.stack_layers(back, periods)
    for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Shapes only (checkpoint metadata) convert too.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    assert jax.tree.map(lambda x: x.shape, layer_stacking.stack_layers(abstract, periods)) == \
        jax.tree.map(lambda x: x[0], shapes, is_leaf=lambda x: isinstance(x, tuple))


def test_scanned_model_initialised_from_a_per_layer_checkpoint_equals_it(reference, tmp_path):
    """A converter-style bare decoder checkpoint (per-layer paths) loads into a scanned model's decoder."""
    model, params, _, _, _ = reference
    tree = params.to_pure_dict()
    saver = ocp.StandardCheckpointer()
    saver.save(str(tmp_path / "lm"), jax.tree.map(np.asarray, tree["decoder"]))
    saver.wait_until_finished()
    scanned = SpectronModel(scan_config(True))
    fresh, _ = scanned.init(seed=9)
    loaded, copied = checkpoints.apply_partial_init(
        fresh.to_pure_dict(), [checkpoints.component_init(str(tmp_path / "lm"), "decoder")])
    assert copied and all(path.startswith("decoder/") for path in copied)
    expected = layer_stacking.stack_layers(tree, layer_stacking.model_scan_periods(scanned.config))
    flat, flat_expected = checkpoints.flatten_paths(loaded), checkpoints.flatten_paths(expected)
    flat_fresh = checkpoints.flatten_paths(fresh.to_pure_dict())
    assert sorted(flat) == sorted(flat_expected)
    for path, value in flat.items():
        want = flat_expected[path] if path.startswith("decoder/") else flat_fresh[path]
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want), err_msg=path)
        assert value.shape == flat_fresh[path].shape


def test_remat_label_names_the_policies():
    assert remat_label(scan_config(True, "full")) == "full+scan"
    cfg = scan_config(False)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, remat_policy="save_proj"))
    assert remat_label(cfg) == "enc:none dec:save_proj"
    with pytest.raises(ValueError, match="remat_policy"):
        dataclasses.replace(cfg.decoder, remat_policy="sometimes")
