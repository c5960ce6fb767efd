"""Bundle round trip: export a training checkpoint of a tiny Spectron model, load it back, same loss; the
export's format (OCDBT or one zarr store per array) follows `use_ocdbt`, and both load back exactly."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax import bundle, checkpoints
from spectron_jax.models.spectron_model import SpectronModel
from tests.test_spectron import make_batch, tiny_config

TINY_GIN = """
SpectronConfig.encoder = @ConformerConfig()
SpectronConfig.decoder = @DecoderConfig()
SpectronConfig.acoustic = @AcousticConfig()
ConformerConfig.model_dim = 32
ConformerConfig.num_layers = 1
ConformerConfig.num_heads = 2
ConformerConfig.ffn_dim = 64
ConformerConfig.conv_kernel_size = 5
ConformerConfig.subsampling_channels = 4
ConformerConfig.attention_dropout = 0.0
ConformerConfig.residual_dropout = 0.0
ConformerConfig.conv_dropout = 0.0
ConformerConfig.conv_norm = 'layer'
DecoderConfig.vocab_size = 64
DecoderConfig.model_dim = 64
DecoderConfig.num_layers = 2
DecoderConfig.num_heads = 4
DecoderConfig.num_kv_heads = 2
DecoderConfig.head_dim = 16
DecoderConfig.mlp_dim = 128
DecoderConfig.dropout = 0.0
AcousticConfig.reduction_factor = 1
AcousticConfig.prenet_dims = (32,)
AcousticConfig.prenet_dropout = 0.0
AcousticConfig.prenet_dropout_at_inference = False
AcousticConfig.prenet_input = 'last_frame'
AcousticConfig.postnet_hidden = 128
AcousticConfig.stop_head = False
"""


def _train_dir(tmp_path):
    model = SpectronModel(tiny_config())
    params, _ = model.init(seed=2)
    params = params.to_pure_dict()
    model_dir = tmp_path / "run"
    ckpt = checkpoints.TrainCheckpointer(str(model_dir))
    ckpt.save(5, {"step": jnp.asarray(5, jnp.int32), "params": params,
                  "opt_state": jax.tree.map(jnp.zeros_like, params)})
    ckpt.close()
    (model_dir / "config.gin").write_text(TINY_GIN)
    return model, params, model_dir


@pytest.mark.slow  # export + load + compile of a tiny model: ~30-60 s on 2 loaded cores
def test_bundle_round_trip_loss_fp32_and_bf16(tmp_path):
    from spectron_jax import export as export_cli

    model, params, model_dir = _train_dir(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    reference, _ = model.eval_fn(params, batch)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert export_cli.main([f"--model_dir={model_dir}", f"--output_dir={out}", f"--dtype={dtype}"]) == 0
        meta = json.loads((out / bundle.BUNDLE_FILENAME).read_text())
        assert meta["step"] == 5 and meta["reduction_factor"] == 1 and meta["stop_head"] is False
        assert sum(meta["num_params_per_component"].values()) == meta["num_params"]
        assert meta["sep_id"] is None  # a model without a text separator
        loaded = bundle.load_bundle(str(out))
        assert loaded.model.config == model.config  # rebuilt from config.gin alone
        assert "opt_state" not in loaded.params and set(loaded.params) == set(params)
        restored = jax.tree.map(lambda x: x.astype(jnp.float32), loaded.params)
        losses[dtype] = float(loaded.model.eval_fn(restored, batch)[0])
    assert losses["float32"] == float(reference)
    # a run with a text separator: bundle.json and the rebuilt model record its id
    marked = tmp_path / "marked"
    shutil.copytree(tmp_path / "float32", marked)
    (marked / "config.gin").write_text((marked / "config.gin").read_text() + "\nSpectronConfig.sep_id = 5\n")
    info = json.loads((marked / "export.json").read_text())
    assert bundle.write_bundle_json(str(marked), info)["sep_id"] == 5
    assert bundle.load_bundle(str(marked)).model.config.sep_id == 5
    # bf16 rounds every weight to 8 bits of mantissa: the loss moves by well under 1%.
    assert abs(losses["bfloat16"] - float(reference)) <= 1e-2 * abs(float(reference))


@pytest.mark.slow  # a tiny model's init, two exports and loads: ~30 s alone on 2 loaded cores
def test_export_format_follows_use_ocdbt_and_both_load_exactly(tmp_path):
    from spectron_jax import export as export_cli

    _, params, model_dir = _train_dir(tmp_path)
    expected = checkpoints.flatten_paths(params)
    for flag, ocdbt in (([], True), (["--no-use_ocdbt"], False)):
        out = tmp_path / f"ocdbt_{ocdbt}"
        assert export_cli.main([f"--model_dir={model_dir}", f"--output_dir={out}", *flag]) == 0
        params_dir = out / checkpoints.EXPORT_PARAMS_SUBDIR
        stores = sorted(p.parent.name for p in params_dir.rglob(".zarray"))
        if ocdbt:  # one database (a manifest and a few data files), no per-array stores
            assert (params_dir / "manifest.ocdbt").is_file() and stores == []
        else:  # one zarr store per array, named by its path
            assert not list(params_dir.rglob("manifest.ocdbt"))
            assert stores == sorted(name.replace("/", ".") for name in expected)
        loaded = checkpoints.flatten_paths(bundle.load_bundle(str(out)).params)
        assert sorted(loaded) == sorted(expected)
        for name, value in expected.items():
            assert loaded[name].dtype == value.dtype, name
            np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(value), err_msg=name)
