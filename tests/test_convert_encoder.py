"""The w2v-BERT encoder importer against `transformers`' Wav2Vec2BertModel (tiny random models, no network)."""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from spectron_jax.convert import encoder as convert_encoder  # noqa: E402


def _tiny_hf_config(**overrides):
    values = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                  feature_projection_input_dim=10, conv_depthwise_kernel_size=5, left_max_position_embeddings=6,
                  right_max_position_embeddings=2, hidden_dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, feat_proj_dropout=0.0, conformer_conv_dropout=0.0, layerdrop=0.0,
                  mask_time_prob=0.0)
    values.update(overrides)
    return transformers.Wav2Vec2BertConfig(**values)


def _save_random_model(directory, **overrides):
    torch.manual_seed(0)
    model = transformers.Wav2Vec2BertModel(_tiny_hf_config(**overrides)).eval()
    with torch.no_grad():  # move every parameter off its initial value (LayerNorms start at 1 / 0)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return model


def test_hidden_states_match_transformers_on_padded_batch(tmp_path):
    reference = _save_random_model(tmp_path / "hf")
    config = convert_encoder.config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    from spectron_jax.convert import hf_checkpoint

    flat = convert_encoder.convert_tensors(hf_checkpoint.read_tensors(str(tmp_path / "hf")), config)
    # Longer than the left + right window, so the distance clipping is exercised; row 1 is padded.
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 21, 10)).astype(np.float32)
    mask = np.ones((2, 21), np.int64)
    mask[1, 13:] = 0
    garbage = features.copy()
    garbage[1, 13:] = 50.0
    with torch.no_grad():
        outputs = reference(torch.from_numpy(features), attention_mask=torch.from_numpy(mask))
    expected = outputs.last_hidden_state.numpy()
    from flax import nnx

    model = convert_encoder.build_encoder(config, flat)
    ours, ours_mask = nnx.jit(lambda m, f, k: m(f, k, deterministic=True))(model, garbage, mask.astype(bool))
    valid = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(ours_mask), valid)
    assert np.abs(np.asarray(ours)[valid] - expected[valid]).max() <= 1e-4
    assert np.abs(expected).max() > 0.5
    # The importer's own check reports the same agreement.
    assert convert_encoder.parity_check(str(tmp_path / "hf"), config, flat, frames=17) <= 1e-4


def test_cli_converts_checks_and_writes_loadable_checkpoint(tmp_path):
    _save_random_model(tmp_path / "hf")
    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "spectron_jax.convert.encoder", "--format=hf",
                             f"--input={tmp_path / 'hf'}", f"--output={out}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "max |hidden diff| = " in result.stdout
    info = json.loads((out / "conversion.json").read_text())
    assert info["max_hidden_diff"] <= 1e-4
    gin_text = (out / "encoder.gin").read_text()
    assert "ConformerConfig.position_encoding = 'relative_key'" in gin_text
    # and the features that encoder reads, for the model and the Task alike
    assert "SpectronConfig.prompt_features = 'w2v_bert_fbank'" in gin_text
    assert "TaskConfig.prompt_features = 'w2v_bert_fbank'" in gin_text
    # The written tree is what PretrainedInit.encoder_checkpoint reads: placed under 'encoder/'.
    from spectron_jax import checkpoints

    init = checkpoints.component_init(str(out), "encoder")
    assert init.target_prefix == "encoder/"
    paths = checkpoints.source_param_paths(str(out))
    assert "blocks/1/attention/distance_embedding" in paths and "feature_projection/projection/kernel" in paths


@pytest.mark.parametrize("field, value", [("add_adapter", True), ("position_embeddings_type", "rotary"),
                                          ("hidden_act", "gelu")])
def test_cli_refuses_configs_it_cannot_express(tmp_path, field, value):
    _save_random_model(tmp_path / "hf", **{field: value})
    result = subprocess.run([sys.executable, "-m", "spectron_jax.convert.encoder", "--format=hf",
                             f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'out'}", "--no-check"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert field in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_check_above_tolerance_fails_and_writes_nothing(tmp_path):
    from spectron_jax import cli

    _save_random_model(tmp_path / "hf")
    with pytest.raises(cli.InputError, match="differs from transformers"):
        convert_encoder.main(["--format=hf", f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'out'}",
                              "--check", "--tolerance=0"])
    assert not (tmp_path / "out").exists()


def test_w2v_bert_gin_is_the_published_config_and_summary_counts_its_parameters(repo_root):
    """gin/encoders/w2v_bert_600m.gin = what the importer derives from facebook/w2v-bert-2.0's config (the
    Wav2Vec2BertConfig defaults), and `summary` counts transformers' parameters (built on the meta device)."""
    import gin

    from spectron_jax import gin_config, summary

    published = transformers.Wav2Vec2BertConfig().to_dict()
    expected = convert_encoder.config_from_hf(published)
    gin.clear_config()
    gin_config.parse_gin(gin_files=["models/tiny.gin", "encoders/w2v_bert_600m.gin"],
                         gin_search_paths=str(repo_root / "gin"))
    model_config = gin_config.build("SpectronConfig")
    got = model_config.encoder
    assert {f: getattr(got, f) for f in convert_encoder.GIN_FIELDS} == \
           {f: getattr(expected, f) for f in convert_encoder.GIN_FIELDS}
    assert model_config.prompt_features == gin_config.build("TaskConfig").prompt_features == "w2v_bert_fbank"
    with torch.device("meta"):
        reference = transformers.Wav2Vec2BertModel(transformers.Wav2Vec2BertConfig())
    # masked_spec_embed (the pre-training mask vector, 1024 values) is not converted
    total = sum(p.numel() for name, p in reference.named_parameters() if name != "masked_spec_embed")
    assert summary.count_parameters(model_config)["encoder"] == total
    assert abs(total / 1e6 - 580.5) < 0.1
    gin.clear_config()


def test_conversion_records_its_architecture_and_refuses_another(tmp_path):
    import dataclasses

    from spectron_jax.convert import metadata

    _save_random_model(tmp_path / "hf")
    out = tmp_path / "out"
    assert convert_encoder.main(["--format=hf", f"--input={tmp_path / 'hf'}", f"--output={out}", "--no-check"]) == 0
    record = json.loads((out / "conversion.json").read_text())
    assert record["component"] == "encoder" and set(record["architecture"]) == set(convert_encoder.GIN_FIELDS)
    assert (record["architecture"]["left_relative_distance"], record["architecture"]["model_dim"]) == (6, 16)
    config = convert_encoder.config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    metadata.check_architecture(str(out), dataclasses.replace(config, scan_layers=True), component="encoder")
    with pytest.raises(ValueError, match=r"ConformerConfig.left_relative_distance: checkpoint 6, model 64 \(include"):
        metadata.check_architecture(str(out), dataclasses.replace(config, left_relative_distance=64))


def test_default_check_frames_catch_an_off_by_one_in_the_left_clipping(tmp_path, capsys):
    """w2v-BERT's left distance (64) exceeds the old 40-frame check: a clipping mistake only shows past it."""
    from spectron_jax.convert import hf_checkpoint

    _save_random_model(tmp_path / "hf", num_hidden_layers=1, left_max_position_embeddings=64,
                       right_max_position_embeddings=8)
    config = convert_encoder.config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    flat = convert_encoder.convert_tensors(hf_checkpoint.read_tensors(str(tmp_path / "hf")), config)
    frames = convert_encoder.default_check_frames(config)
    assert frames == 64 + 8 + 16
    assert convert_encoder.parity_check(str(tmp_path / "hf"), config, flat, frames=frames) <= 1e-4
    # clipping at -63 instead of -64 (a table one row shorter, read from the same rows otherwise)
    import dataclasses

    clipped = dataclasses.replace(config, left_relative_distance=63)
    wrong = {k: (v[1:] if k.endswith("distance_embedding") else v) for k, v in flat.items()}
    assert convert_encoder.parity_check(str(tmp_path / "hf"), clipped, wrong, frames=40) <= 1e-4  # invisible
    assert convert_encoder.parity_check(str(tmp_path / "hf"), clipped, wrong, frames=frames) > 1e-3
    # the CLI checks at that length by default, and at --check_frames when given
    assert convert_encoder.main(["--format=hf", f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'o1'}"]) == 0
    assert "2 rows of 88 frames)" in capsys.readouterr().out
    assert convert_encoder.main(["--format=hf", f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'o2'}",
                                 "--check_frames=30"]) == 0
    assert "2 rows of 30 frames)" in capsys.readouterr().out
    assert json.loads((tmp_path / "o2" / "conversion.json").read_text())["check_frames"] == 30


def test_a_wrapping_model_converts_through_its_base_and_output_needs_overwrite(tmp_path, capsys):
    """Wav2Vec2BertForCTC: its `wav2vec2_bert.` base is converted (the same as that base saved alone), the CTC
    head is counted and named; an existing output is replaced only with --overwrite."""
    from spectron_jax import cli
    from spectron_jax.convert import hf_checkpoint

    torch.manual_seed(0)
    ctc = transformers.Wav2Vec2BertForCTC(_tiny_hf_config(vocab_size=12)).eval()
    with torch.no_grad():
        for p in ctc.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ctc.save_pretrained(str(tmp_path / "ctc"))
    ctc.wav2vec2_bert.save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "out"
    assert convert_encoder.main([f"--input={tmp_path / 'ctc'}", f"--output={out}"]) == 0
    printed = capsys.readouterr().out
    assert "ignored by rule, 2 left over (lm_head.bias, lm_head.weight)" in printed
    diff = float(printed.split("max |hidden diff| = ")[1].split()[0])
    assert diff <= 1e-4
    config = convert_encoder.config_from_hf(json.loads((tmp_path / "base" / "config.json").read_text()))
    from_ctc = convert_encoder.convert_tensors(hf_checkpoint.read_tensors(str(tmp_path / "ctc")), config)
    from_base = convert_encoder.convert_tensors(hf_checkpoint.read_tensors(str(tmp_path / "base")), config)
    assert set(from_ctc) == set(from_base)
    for path, value in from_base.items():
        np.testing.assert_array_equal(from_ctc[path], value)
    assert json.loads((out / "conversion.json").read_text())["left_over"] == ["lm_head.bias", "lm_head.weight"]
    with pytest.raises(cli.InputError, match="already holds params/ \\(pass --overwrite\\)"):
        convert_encoder.main([f"--input={tmp_path / 'base'}", f"--output={out}", "--no-check"])
    assert convert_encoder.main([f"--input={tmp_path / 'base'}", f"--output={out}", "--no-check", "--overwrite"]) == 0
    assert json.loads((out / "conversion.json").read_text())["left_over"] == []


def test_both_importers_share_flags_tolerance_rule_and_error_type():
    from spectron_jax.convert import decoder as convert_decoder
    from spectron_jax.convert import hf_checkpoint

    def options(module):
        return {a.dest: a for a in module._parser()._actions if a.option_strings and a.dest != "help"}

    dec, enc = options(convert_decoder), options(convert_encoder)
    shared = {"format", "input", "output", "check", "tolerance", "overwrite"}
    assert shared <= set(dec) and shared <= set(enc)
    for name in shared:
        assert (dec[name].default, dec[name].required) == (enc[name].default, enc[name].required), name
    assert dec["tolerance"].help == enc["tolerance"].help == hf_checkpoint.TOLERANCE_HELP
    assert "max(1, max |transformers|)" in hf_checkpoint.TOLERANCE_HELP
    assert (dec["check_length"].default, enc["check_frames"].default) == (None, None)  # derived from the windows
    assert hf_checkpoint.within_tolerance(0.5, 10_000.0, 1e-4) and not hf_checkpoint.within_tolerance(2e-4, 0.5, 1e-4)
    assert hf_checkpoint.is_remote("gs://bucket/gemma") and not hf_checkpoint.is_remote("/data/gemma")
    assert convert_decoder.UnsupportedConfig is hf_checkpoint.CheckpointError
    with pytest.raises(hf_checkpoint.CheckpointError, match="add_adapter"):
        convert_encoder.config_from_hf({"add_adapter": True})
