"""The Gemma-family decoder importer against transformers: logits, cached greedy decoding, the CLI.

Each test builds a small randomly initialised transformers model from a config, saves it into a
temporary directory (no network), converts it and compares with transformers in float32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from spectron_jax.convert import decoder as convert  # noqa: E402
from spectron_jax.convert import hf_checkpoint  # noqa: E402

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, head_dim=8,
             pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _configs():
    return {
        "gemma": transformers.GemmaConfig(num_hidden_layers=2, num_key_value_heads=1, **SMALL),
        "gemma2": transformers.Gemma2Config(
            num_hidden_layers=3, num_key_value_heads=2, sliding_window=6, query_pre_attn_scalar=12,
            attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **SMALL),
        # a window shorter than the sequence, grouped-query attention (2 kv heads for 4 query heads),
        # local / global layers with their own RoPE bases
        "gemma3_gqa": transformers.Gemma3TextConfig(
            num_hidden_layers=4, num_key_value_heads=2, sliding_window=5, query_pre_attn_scalar=12,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            **SMALL),
        # the published layout: multi-query, five local layers then one global
        "gemma3_mqa": transformers.Gemma3TextConfig(
            num_hidden_layers=6, num_key_value_heads=1, sliding_window=4, query_pre_attn_scalar=8, **SMALL),
    }


MODEL_CLASSES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_gqa": "Gemma3ForCausalLM",
                 "gemma3_mqa": "Gemma3ForCausalLM"}


def _save_random_model(name: str, directory, *, std: float = 0.2, max_shard_size=None):
    """A transformers model with every parameter N(0, std) (norm offsets included), saved to `directory`."""
    torch.manual_seed(hash(name) % 1000)
    config = _configs()[name]
    model = getattr(transformers, MODEL_CLASSES[name])(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(directory), **kwargs)
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long), use_cache=False).logits.float().numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{name: (transformers model, checkpoint dir, DecoderConfig, params)} for every family."""
    out = {}
    for name in MODEL_CLASSES:
        directory = tmp_path_factory.mktemp(name)
        # the Gemma 3 GQA checkpoint is written in shards, the others as one file
        model = _save_random_model(name, directory, max_shard_size="40KB" if name == "gemma3_gqa" else None)
        model.config._attn_implementation = "eager"
        config = hf_checkpoint.read_config(str(directory))
        cfg = convert.decoder_config_from_hf(config)
        params = convert.convert_params(hf_checkpoint.read_tensors(str(directory)), cfg)
        out[name] = (model, directory, cfg, params)
    return out


@pytest.mark.parametrize("name", list(MODEL_CLASSES))
def test_logits_match_transformers(converted, name):
    model, directory, cfg, params = converted[name]
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 24))
    ref = _hf_logits(model, tokens)
    ours = convert.decoder_logits(convert.build_decoder(cfg, params), tokens)
    assert np.max(np.abs(ref)) > 1.0  # the check is not on vanishing logits
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_config_mapping(converted):
    g1, g2, g3, g3m = (converted[n][2] for n in ("gemma", "gemma2", "gemma3_gqa", "gemma3_mqa"))
    assert (g1.block, g1.post_norms, g1.qk_norm, g1.attention_pattern) == ("sequential", False, False, ("global",))
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.sliding_window) == (5.0, 3.0, 6)
    assert g2.attention_pattern == ("local", "global") and g2.query_pre_attn_scalar == 12
    assert g3.qk_norm and g3.post_norms and g3.num_kv_heads == 2 and g3.sliding_window == 5
    assert g3.attention_pattern == ("local", "local", "global")  # cycled: local local global local
    assert (g3.rope_base, g3.local_rope_base) == (1e6, 1e4)
    assert g3m.attention_pattern == ("local",) * 5 + ("global",) and g3m.query_pre_attn_scalar is None


def test_sliding_window_matters(converted):
    """The Gemma 3 window is shorter than the sequence: widening it changes the logits."""
    import dataclasses

    _, _, cfg, params = converted["gemma3_gqa"]
    tokens = np.random.default_rng(2).integers(0, VOCAB, (1, 24))
    base = convert.decoder_logits(convert.build_decoder(cfg, params), tokens)
    wide = convert.decoder_logits(convert.build_decoder(dataclasses.replace(cfg, sliding_window=64), params), tokens)
    assert np.max(np.abs(base[:, :5] - wide[:, :5])) < 1e-5  # inside the window: identical
    assert np.max(np.abs(base[:, 8:] - wide[:, 8:])) > 1e-3


def _greedy(decoder, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Our KV-cached greedy decoding: one prefill of `prompt` int [batch, P], then one token per call."""
    from flax import nnx

    @nnx.jit
    def feed(decoder, tokens, cache):  # tokens int [batch, T] -> (greedy next token int [batch, 1], cache)
        valid = jnp.ones(tokens.shape, bool)
        hidden, cache = decoder(decoder.embed(tokens), valid, jnp.zeros_like(valid), deterministic=True, cache=cache)
        return jnp.argmax(decoder.logits(hidden[:, -1:]), axis=-1), cache

    batch, length = prompt.shape
    token, cache = feed(decoder, jnp.asarray(prompt, jnp.int32), decoder.init_cache(batch, length + steps))
    out = [np.asarray(token)]
    for _ in range(steps - 1):
        token, cache = feed(decoder, token, cache)
        out.append(np.asarray(token))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3_gqa", "gemma3_mqa"])
def test_cached_greedy_equals_transformers_generate(converted, name):
    model, _, cfg, params = converted[name]
    prompts = np.random.default_rng(3).integers(3, VOCAB, (3, 5))
    steps = 10  # 15 positions: past every sliding window
    with torch.no_grad():
        generated = model.generate(torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=steps, do_sample=False,
                                   eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(prompts.shape,
                                                                                                dtype=torch.long))
    ref = generated[:, prompts.shape[1]:].numpy()
    ours = _greedy(convert.build_decoder(cfg, params), prompts, steps)
    np.testing.assert_array_equal(ours, ref)


def test_unsupported_fields_are_refused():
    base = {"model_type": "gemma3_text", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 8, "sliding_window": 4}
    with pytest.raises(convert.UnsupportedConfig, match="attention_bias"):
        convert.decoder_config_from_hf({**base, "attention_bias": True})
    with pytest.raises(convert.UnsupportedConfig, match="rope_parameters"):
        convert.decoder_config_from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    with pytest.raises(convert.UnsupportedConfig, match="hidden_activation"):
        convert.decoder_config_from_hf({**base, "hidden_activation": "silu"})
    with pytest.raises(convert.UnsupportedConfig, match="model_type"):
        convert.decoder_config_from_hf({**base, "model_type": "llama"})


def test_published_gemma3_configs_match_the_gin_models(repo_root):
    """The config.json of Gemma 3 270M / 1B (as published) maps onto gin/models/gemma3_*.gin."""
    from spectron_jax import gin_config

    published = {
        "270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4),
        "1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4),
    }
    for size, shape in published.items():
        config = {"model_type": "gemma3_text", "vocab_size": 262144, "num_key_value_heads": 1, "head_dim": 256,
                  "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
                  "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
                  "sliding_window": 512, "sliding_window_pattern": 6, "final_logit_softcapping": None,
                  "attn_logit_softcapping": None, "tie_word_embeddings": True, **shape}
        expected = convert.decoder_config_from_hf(config)
        gin_config.parse_gin(gin_files=[f"models/spectron_gemma3_{size}.gin"], gin_search_paths=str(repo_root / "gin"))
        model_config = gin_config.build("SpectronConfig")
        got = model_config.decoder
        assert {f: getattr(got, f) for f in convert.ARCHITECTURE_FIELDS} == \
               {f: getattr(expected, f) for f in convert.ARCHITECTURE_FIELDS}, size
        assert model_config.sos_id == 2


def test_cli_converts_checks_and_writes(tmp_path, capsys):
    source = tmp_path / "hf"
    _save_random_model("gemma3_gqa", source)
    (source / "tokenizer.model").write_bytes(b"spm")
    out = tmp_path / "out"
    assert convert.main(["--format=hf", f"--input={source}", f"--output={out}", "--check_length=12"]) == 0
    printed = capsys.readouterr().out.splitlines()
    line = [l for l in printed if l.startswith("max |logits diff| = ")]
    assert line and float(line[0].split("=")[1].split()[0]) <= 1e-4
    assert any(l.startswith("bfloat16: max |logits diff| = ") for l in printed)
    info = json.loads((out / "conversion.json").read_text())
    # bfloat16 (weights and computation, on both sides): close, though far from the float32 agreement
    assert 1e-3 < info["bf16_max_logits_diff"] <= convert.BF16_TOLERANCE * max(1.0, info["max_logits"])
    assert info["family"] == "gemma3_text" and info["max_logits_diff"] <= 1e-4 and info["tokenizer"]
    assert (out / "tokenizer.model").read_bytes() == b"spm"
    assert "DecoderConfig.sliding_window = 5" in (out / "decoder.gin").read_text()
    assert "SEP_ID = None" in (out / "decoder.gin").read_text() and info["sep_id"] is None  # no SentencePiece
    # the written params restore under the decoder's own layout
    from spectron_jax import checkpoints

    paths = checkpoints.source_param_paths(str(out))
    assert "layers/3/attn/q_norm/scale" in paths and "embedder/table" in paths
    with pytest.raises(Exception, match="already holds"):
        convert.main(["--format=hf", f"--input={source}", f"--output={out}", "--no-check"])


def test_a_converted_gemma_tokenizer_lends_its_first_unused_piece_as_separator(tmp_path, embedded_dir):
    """A Gemma-style tokenizer (pad 0, eos 1, bos 2, unk 3, '<mask>', '<unused0>', '<unused1>') gives
    SEP_ID = the id of '<unused0>' in decoder.gin and conversion.json; training then accepts it."""
    import sentencepiece as spm

    from spectron_jax.data import tasks

    source = tmp_path / "hf"
    _save_random_model("gemma3_gqa", source)
    rows = (embedded_dir / "manifest.tsv").read_text().splitlines()[1:60]
    (tmp_path / "text.txt").write_text("\n".join(r.split("\t")[2] for r in rows))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "text.txt"), model_prefix=str(source / "tokenizer"), vocab_size=100, pad_id=0,
        eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<mask>", "<unused1>", "<unused0>"],
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    expected = sp.piece_to_id("<unused0>")
    assert expected == 6  # after '<mask>' 4 and '<unused1>' 5: the lowest-numbered unused piece, not the first id
    out = tmp_path / "out"
    assert convert.main(["--format=hf", f"--input={source}", f"--output={out}", "--no-check"]) == 0
    assert f"SEP_ID = {expected}" in (out / "decoder.gin").read_text().splitlines()
    assert json.loads((out / "conversion.json").read_text())["sep_id"] == expected
    vocabulary = tasks.load_vocabulary(str(out / "tokenizer.model"))
    tasks.check_separator(vocabulary, expected)
    with pytest.raises(ValueError, match="lacks the separator"):
        tasks.check_separator(vocabulary, sp.piece_to_id("▁the"))


@pytest.mark.parametrize("size, layers, dim, mlp", [("270m", 18, 640, 2048), ("1b", 26, 1152, 6912)])
def test_gemma3_summary_counts(repo_root, size, layers, dim, mlp):
    """`summary` of the Gemma 3 models counts the published decoder sizes (counted by hand here)."""
    from spectron_jax import gin_config, summary

    gin_config.parse_gin(gin_files=[f"models/spectron_gemma3_{size}.gin"], gin_search_paths=str(repo_root / "gin"),
                         bindings=["ConformerConfig.num_layers = 1"])
    counts = summary.count_parameters(gin_config.build("SpectronConfig"))
    heads, kv, head_dim = 4, 1, 256
    per_layer = dim * head_dim * (2 * heads + 2 * kv) + 3 * dim * mlp + 4 * dim + 2 * head_dim
    assert counts["decoder_embedding"] == 262144 * dim
    assert counts["decoder_blocks"] == layers * per_layer + dim
    # 268.1M and 999.9M: the published "270M" and "1B"
    assert abs(counts["decoder"] / 1e6 - {"270m": 268.1, "1b": 999.9}[size]) < 0.1


def test_freeze_lm_option_freezes_exactly_the_decoder(repo_root):
    import jax
    from flax import nnx

    from spectron_jax import gin_config, train, trainer
    from spectron_jax.models.spectron_model import SpectronModel

    import gin

    gin.clear_config()  # unlocks a config an earlier test finalised, so the training configs can register
    train.register_train_configurables()
    gin_config.parse_gin(gin_files=["models/tiny.gin", "options/freeze_lm.gin"],
                         gin_search_paths=str(repo_root / "gin"))
    freeze = train.register_train_configurables()["OptimizerConfig"]().freeze
    params = nnx.state(SpectronModel(gin_config.build("SpectronConfig")).abstract_module(), nnx.Param).to_pure_dict()
    mask = trainer.frozen_mask(params, freeze)
    for top, sub in mask.items():
        assert set(jax.tree.leaves(sub)) == {top == "decoder"}, top


def test_cli_bad_input_and_a_failed_check_write_nothing(tmp_path):
    from spectron_jax import cli

    with pytest.raises(cli.InputError, match="no config.json"):
        convert.main(["--format=hf", f"--input={tmp_path / 'missing'}", f"--output={tmp_path / 'o1'}"])
    source = tmp_path / "hf"
    _save_random_model("gemma2", source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "hidden_activation": "silu"}))
    with pytest.raises(cli.InputError, match="hidden_activation"):
        convert.main(["--format=hf", f"--input={source}", f"--output={tmp_path / 'o2'}", "--no-check"])
    (source / "config.json").write_text(json.dumps(config))
    # float32 round-off alone exceeds a tolerance of 1e-12: the conversion fails and writes nothing
    with pytest.raises(cli.InputError, match="differ from transformers"):
        convert.main(["--format=hf", f"--input={source}", f"--output={tmp_path / 'o3'}", "--check_length=8",
                      "--tolerance=1e-12"])
    assert not (tmp_path / "o3").exists()
    # the bfloat16 run has its own tolerance (float32 passes here; bfloat16 cannot agree to 1e-5)
    with pytest.raises(cli.InputError, match="in bfloat16, logits / final hidden state differ"):
        convert.main(["--format=hf", f"--input={source}", f"--output={tmp_path / 'o4'}", "--check_length=8",
                      "--bf16_tolerance=1e-5"])
    assert not (tmp_path / "o4").exists()


def _convert(source, out, *flags):
    return convert.main(["--format=hf", f"--input={source}", f"--output={out}", *flags])


def test_conversion_records_its_architecture_and_refuses_another(tmp_path, caplog):
    """conversion.json holds every bound DecoderConfig field; a model differing in any is refused (one line)."""
    import dataclasses
    import hashlib

    from spectron_jax.convert import metadata

    source, out = tmp_path / "hf", tmp_path / "out"
    _save_random_model("gemma3_gqa", source)
    assert _convert(source, out, "--no-check") == 0
    record = json.loads((out / "conversion.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    assert record["component"] == "decoder" and set(record["architecture"]) == set(convert.ARCHITECTURE_FIELDS)
    assert record["architecture"]["sliding_window"] == 5 and record["architecture"]["rope_base"] == 1e6
    assert record["architecture"]["attention_pattern"] == ["local", "local", "global"]
    assert record["source_config_sha256"] == hashlib.sha256(
        json.dumps(source_config, sort_keys=True).encode()).hexdigest()
    cfg = convert.decoder_config_from_hf(source_config)
    metadata.check_architecture(str(out), cfg, component="decoder")  # the same architecture: accepted
    # run knobs are not architecture: a scanned, rematerialised bf16 decoder takes the same conversion
    metadata.check_architecture(str(out), dataclasses.replace(cfg, scan_layers=True, remat_policy="full",
                                                              dtype="bfloat16", dropout=0.1), component="decoder")
    wrong = dataclasses.replace(cfg, sliding_window=6, rope_base=1e4)
    with pytest.raises(ValueError) as refused:
        metadata.check_architecture(str(out), wrong, component="decoder")
    message = str(refused.value)
    assert "\n" not in message and str(out) in message
    assert "DecoderConfig.sliding_window: checkpoint 5, model 6" in message
    assert "DecoderConfig.rope_base: checkpoint 1000000.0, model 10000.0" in message
    assert message.count("DecoderConfig.") == 2  # only the differing fields are named
    # a deliberate change is accepted when named; the other one still is not
    metadata.check_architecture(str(out), dataclasses.replace(cfg, sliding_window=6), component="decoder",
                                allow=("DecoderConfig.sliding_window",))
    with pytest.raises(ValueError, match="rope_base"):
        metadata.check_architecture(str(out), wrong, allow=("DecoderConfig.sliding_window",))
    with pytest.raises(ValueError, match="converted decoder, loaded as the encoder"):
        metadata.check_architecture(str(out), cfg, component="encoder")
    # a conversion from before the record: loaded unchecked, with a warning
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "convert.json").write_text(json.dumps({"family": "gemma3_text"}))
    with caplog.at_level("WARNING"):
        metadata.check_architecture(str(legacy), wrong, component="decoder")
    assert "recorded their architecture" in caplog.text


def test_training_refuses_a_conversion_of_another_architecture_and_names_a_missing_tokenizer(tmp_path, capsys):
    """What `train` checks before building anything: the architecture record, then the tokenizer."""
    import dataclasses

    from spectron_jax import checkpoints, cli, train
    from spectron_jax.models.spectron import PretrainedInit, SpectronConfig

    source, out = tmp_path / "hf", tmp_path / "out"
    _save_random_model("gemma3_gqa", source)  # saved without a tokenizer.model
    assert _convert(source, out, "--no-check") == 0
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "tokenizer.model" in warnings[0]
    cfg = convert.decoder_config_from_hf(hf_checkpoint.read_config(str(source)))
    wrong = dataclasses.replace(cfg, sliding_window=6, rope_base=1e4)
    with pytest.raises(cli.UsageError, match=r"PretrainedInit.lm_checkpoint: .*DecoderConfig.sliding_window"):
        train._tokenizer_of_run(train.TrainConfig(), SpectronConfig(
            decoder=wrong, sos_id=2, pretrained=PretrainedInit(lm_checkpoint=str(out))))
    init = checkpoints.PartialInit(str(out), target_prefix="decoder/")
    with pytest.raises(cli.UsageError, match=r"TrainConfig.init_from: .*DecoderConfig.rope_base"):
        train._tokenizer_of_run(train.TrainConfig(init_from=(init,)), SpectronConfig(decoder=wrong, sos_id=2))
    # the same architecture passes that check; the missing tokenizer is then named, not blamed on sos_id
    with pytest.raises(cli.UsageError, match=r"lm_checkpoint=.* has no tokenizer.model.*TrainConfig.vocab_path"):
        train._tokenizer_of_run(train.TrainConfig(), SpectronConfig(
            decoder=dataclasses.replace(cfg, scan_layers=True), sos_id=2,
            pretrained=PretrainedInit(lm_checkpoint=str(out), allow_changes=("DecoderConfig.vocab_size",))))
    with pytest.raises(ValueError, match="allow_changes"):
        PretrainedInit(allow_changes=("sliding_window",))


def test_scanned_and_per_layer_decoders_load_the_same_conversion(tmp_path):
    import dataclasses

    from flax import nnx

    from spectron_jax import checkpoints
    from spectron_jax.models import layer_stacking
    from spectron_jax.models.decoder import Decoder

    source, out = tmp_path / "hf", tmp_path / "out"
    _save_random_model("gemma3_gqa", source)  # 4 layers cycling (local, local, global): a stack of 3 + 1
    assert _convert(source, out, "--no-check") == 0
    cfg = convert.decoder_config_from_hf(hf_checkpoint.read_config(str(source)))
    expected = checkpoints.flatten_paths(
        convert.convert_params(hf_checkpoint.read_tensors(str(source)), cfg))
    for scan in (False, True):
        decoder = Decoder(dataclasses.replace(cfg, scan_layers=scan), rngs=nnx.Rngs(0))
        params = nnx.state(decoder, nnx.Param).to_pure_dict()
        assert bool(layer_stacking.scan_periods(params)) == scan
        loaded, copied = checkpoints.apply_partial_init(params, [checkpoints.PartialInit(str(out))])
        assert len(copied) == len(expected)
        got = checkpoints.flatten_paths(layer_stacking.unstack_layers(loaded))
        assert {str(k) for k in got} == set(expected)
        for path, value in expected.items():
            np.testing.assert_array_equal(np.asarray(got[path]), value)


@pytest.mark.slow  # three conversions with their check (transformers and ours at 86 tokens)
def test_default_check_length_catches_a_window_off_by_one(tmp_path, capsys, monkeypatch):
    """A window mistake is invisible at lengths <= the window: the default check runs 16 tokens past it."""
    import dataclasses

    from spectron_jax import cli

    source = tmp_path / "hf"
    config = transformers.Gemma3TextConfig(num_hidden_layers=2, num_key_value_heads=1, sliding_window=70,
                                           layer_types=["sliding_attention", "full_attention"], **SMALL)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.save_pretrained(str(source))
    assert _convert(source, tmp_path / "right") == 0
    out = capsys.readouterr().out
    assert "2 rows of 86 tokens" in out and "max |final hidden diff| = " in out
    info = json.loads((tmp_path / "right" / "conversion.json").read_text())
    assert info["check_length"] == 86 and info["max_hidden_diff"] <= 1e-4 * max(1.0, info["max_hidden"])

    real = convert.decoder_config_from_hf

    def off_by_one(hf_config, **overrides):  # the converter's window one too wide
        cfg = real(hf_config, **overrides)
        return dataclasses.replace(cfg, sliding_window=cfg.sliding_window + 1)

    monkeypatch.setattr(convert, "decoder_config_from_hf", off_by_one)
    assert _convert(source, tmp_path / "short", "--check_length=64") == 0  # what the old 64-token default let by
    with pytest.raises(cli.InputError, match="differ from transformers"):
        _convert(source, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_multimodal_layout_untied_head_and_the_counts_of_source_tensors(converted):
    """The text model under 'language_model.model.', its untied head under 'language_model.', a vision tower
    beside it: the head is found and converted, the rest counted as left over; errors name the tensor."""
    import dataclasses

    _, directory, cfg, _ = converted["gemma3_mqa"]
    tensors = {"language_model." + name: value for name, value in hf_checkpoint.read_tensors(str(directory)).items()}
    rng = np.random.default_rng(0)
    head = rng.normal(size=(VOCAB, 32)).astype(np.float32)
    tensors["language_model.lm_head.weight"] = head
    tensors["language_model.model.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    tensors["vision_tower.patch_embedding.weight"] = np.ones((4, 3), np.float32)
    tensors["multi_modal_projector.mm_input_projection_weight"] = np.ones((3, 32), np.float32)
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    flat, counts = convert.map_checkpoint(tensors, untied)
    np.testing.assert_array_equal(flat["embedder/output"], head.T)
    assert counts.used == len(flat) == len(convert.expected_shapes(untied)) == 2 + 1 + 6 * 13  # embedding, final norm, head; 13 per layer
    assert counts.ignored == 1
    assert counts.left_over == ("multi_modal_projector.mm_input_projection_weight",
                                "vision_tower.patch_embedding.weight")
    assert "2 left over (multi_modal_projector" in counts.summary()
    with pytest.raises(hf_checkpoint.CheckpointError, match="tie_word_embeddings is true but language_model.lm_head"):
        convert.map_checkpoint(tensors, cfg)
    stray = {**tensors, "language_model.model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float32)}
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"q_proj.bias has no counterpart .* \(1 such"):
        convert.map_checkpoint(stray, untied)
    bad = {**tensors, "language_model.model.layers.2.self_attn.k_proj.weight": np.ones((16, 32), np.float32)}
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"layers.2.self_attn.k_proj.weight has shape \(16, 32\)"):
        convert.map_checkpoint(bad, untied)
    del tensors["language_model.model.layers.5.mlp.up_proj.weight"]
    with pytest.raises(hf_checkpoint.CheckpointError, match="layers.5.mlp.up_proj.weight is missing"):
        convert.map_checkpoint(tensors, untied)
