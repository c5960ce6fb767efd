"""End to end from both importers: tiny converted Gemma 3 + tiny converted w2v-BERT -> train -> export -> infer.

The transformers models are random and tiny (saved locally, no network). The corpus is a handful of
embedded utterances prepared with the w2v-BERT fbank prompt features. Checks: both importers pass their
own parity check; the run copies every encoder and decoder array from the converted checkpoints; its
step-0 validation text loss is the converted LM's own loss on that batch (computed by transformers); it
trains; the export runs in `infer` on a prompt wave, whose encoder input is the stacked fbank.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_GIN = """
include '{decoder_gin}'
include '{encoder_gin}'
SpectronConfig.encoder = @ConformerConfig()
SpectronConfig.decoder = @DecoderConfig()
SpectronConfig.acoustic = @AcousticConfig()
SpectronConfig.pretrained = @PretrainedInit()
PretrainedInit.lm_checkpoint = '{lm}'
PretrainedInit.encoder_checkpoint = '{encoder}'
AcousticConfig.prenet_dims = (32,)
AcousticConfig.postnet_hidden = 32
MODEL_DIR = %gin.REQUIRED
TRAIN_STEPS = 2
TASK = 'spectron_embedded'
TrainConfig.batch_size = 4
TrainConfig.data_dir = '{data_dir}'
TrainConfig.log_every_steps = 1
TrainConfig.eval_every_steps = 2
TrainConfig.eval_batches = 1
TrainConfig.eval_media = False
TrainConfig.peak_flops_per_device = 1e9
TrainConfig.optimizer = @OptimizerConfig()
OptimizerConfig.learning_rate = 1e-3
OptimizerConfig.warmup_steps = 1
TaskConfig.max_continuation_seconds = 1.0
SpectronFeatureConverter.prompt_len = 152
SpectronFeatureConverter.text_len = 48
SpectronFeatureConverter.cont_len = 80
"""


def _corpus(embedded_dir, folder):
    """Manifest of 4 train + 4 validation embedded utterances (absolute paths) and their transcripts."""
    with open(embedded_dir / "manifest.tsv", encoding="utf-8") as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    col = {name: i for i, name in enumerate(header)}
    picked = [r for r in rows if r[col["split"]] == "train"][:4] + [r for r in rows if r[col["split"]] == "validation"][:4]
    manifest = folder / "manifest.tsv"
    with open(manifest, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for r in picked:
            r = list(r)
            r[col["path"]] = str(embedded_dir / r[col["path"]])
            f.write("\t".join(r) + "\n")
    return manifest, [r[col["transcript"]] for r in rows], str(embedded_dir / picked[0][col["path"]])


def _gemma(folder, transcripts):
    """A tiny random Gemma 3 with a SentencePiece tokenizer of Gemma's ids (pad 0, eos 1, bos 2, unk 3)."""
    import sentencepiece as spm

    folder.mkdir()
    (folder / "text.txt").write_text("\n".join(transcripts))
    spm.SentencePieceTrainer.train(
        input=str(folder / "text.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=120, pad_id=0,
        eos_id=1, bos_id=2, unk_id=3, model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    (folder / "text.txt").unlink()
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    lm = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for param in lm.parameters():
            param.normal_(0.0, 0.3)
    lm.save_pretrained(str(folder))
    return lm


def _w2v_bert(folder):
    """A tiny random Wav2Vec2BertModel reading the real front-end: 160 stacked fbank values per frame."""
    config = transformers.Wav2Vec2BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        feature_projection_input_dim=160, conv_depthwise_kernel_size=5, left_max_position_embeddings=6,
        right_max_position_embeddings=2, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, conformer_conv_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
    torch.manual_seed(1)
    model = transformers.Wav2Vec2BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(folder))


def _env(root):
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true"})
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _records(model_dir, split):
    from spectron_jax import metric_logs

    return {r["step"]: r for r in metric_logs.read_records(model_dir, split=split)}


@pytest.mark.slow  # two conversions, prepare, a 2-step training run (a subprocess), export and infer
def test_converted_gemma3_and_w2v_bert_train_export_and_infer(tmp_path, embedded_dir, capsys):
    from spectron_jax import export as export_cli
    from spectron_jax import infer
    from spectron_jax.convert import decoder as convert_decoder
    from spectron_jax.convert import encoder as convert_encoder
    from spectron_jax.data import features, pipeline, prepare, tasks

    manifest, transcripts, prompt_audio = _corpus(embedded_dir, tmp_path)
    lm = _gemma(tmp_path / "gemma", transcripts)
    _w2v_bert(tmp_path / "w2v")
    lm_dir, encoder_dir, data_dir = tmp_path / "lm", tmp_path / "encoder", tmp_path / "data"
    assert convert_decoder.main(["--format=hf", f"--input={tmp_path / 'gemma'}", f"--output={lm_dir}",
                                 "--check_length=8"]) == 0
    assert convert_encoder.main(["--format=hf", f"--input={tmp_path / 'w2v'}", f"--output={encoder_dir}"]) == 0
    out = capsys.readouterr().out
    for line in ("max |logits diff| = ", "max |hidden diff| = "):
        diffs = [float(l.split("=")[1].split()[0]) for l in out.splitlines() if l.startswith(line)]
        assert diffs and diffs[0] <= 1e-4, out
    assert prepare.main(["--format=manifest", f"--input={manifest}", f"--output_dir={data_dir}", "--num_shards=1",
                         "--num_workers=1", "--prompt_features=w2v_bert_fbank"]) == 0

    gin_file = tmp_path / "run.gin"
    gin_file.write_text(RUN_GIN.format(decoder_gin=lm_dir / "decoder.gin", encoder_gin=encoder_dir / "encoder.gin",
                                       lm=lm_dir, encoder=encoder_dir, data_dir=data_dir))
    model_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "spectron_jax.train", f"--gin_file={gin_file}",
                             f"--gin.MODEL_DIR='{model_dir}'"], env=_env(tmp_path), cwd=REPO,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # every encoder and decoder array came from the two checkpoints (nothing else is pre-trained)
    import jax

    from spectron_jax import checkpoints

    expected = len(checkpoints.source_param_paths(str(lm_dir))) + len(checkpoints.source_param_paths(str(encoder_dir)))
    assert f"initialised {expected} parameter arrays from 2 checkpoint(s)" in result.stdout, result.stdout[-2000:]
    train_records = _records(model_dir, "train")
    assert sorted(train_records) == [1, 2] and all(np.isfinite(r["loss"]) for r in train_records.values())

    # step-0 text loss == the converted LM's own loss on the same validation batch (read unshuffled)
    start = _records(model_dir, "validation")[0]["ce_text"]
    tasks.register_tasks({"spectron_embedded": str(data_dir)}, str(lm_dir / "tokenizer.model"),
                         tasks.TaskConfig(max_continuation_seconds=1.0, prompt_features="w2v_bert_fbank"))
    batch = next(iter(pipeline.make_pipeline("spectron_embedded", "validation", 4, seed=0, shuffle=False,
                                             repeat=False, prompt_len=152, text_len=48, cont_len=80, prompt_dim=160)))
    assert batch["text_inputs"][0, 0] == 2 and batch["prompt_frames"].shape == (4, 152, 160)
    with torch.no_grad():
        logits = lm(input_ids=torch.as_tensor(np.asarray(batch["text_inputs"], np.int64))).logits.double().numpy()
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.sum(np.exp(log_probs), -1, keepdims=True))
    nll = -np.take_along_axis(log_probs, np.asarray(batch["text_targets"], np.int64)[..., None], -1)[..., 0]
    weights = np.asarray(batch["text_weights"], np.float64)
    reference = float(np.sum(nll * weights) / np.sum(weights))
    assert abs(reference - np.log(128)) > 1.0  # the LM is far from a uniform (random-init) model
    # only the prefix (a pre-trained encoder through a random projection) separates the two
    assert abs(start - reference) < 0.05 * reference, (start, reference)

    export_dir = tmp_path / "export"
    assert export_cli.main([f"--model_dir={model_dir}", f"--output_dir={export_dir}"]) == 0
    infer_dir = tmp_path / "infer"
    assert infer.main([f"--export_dir={export_dir}", f"--audio={prompt_audio}", f"--output_dir={infer_dir}",
                       "--max_frames=8", "--max_text_tokens=3"]) == 0
    info = json.loads((infer_dir / "result.json").read_text())
    assert info["prompt_frames"] == 240 and info["generated_frames"] > 0  # log-mel frames of the 3 s prompt
    assert (infer_dir / "continuation.wav").stat().st_size > 0

    # what infer feeds the encoder is the Task's stacked fbank of the same 3 s (the model trained on it)
    from spectron_jax import bundle as bundle_lib

    exported = bundle_lib.load_bundle(str(export_dir))
    assert exported.model.config.prompt_features == "w2v_bert_fbank"
    inferencer = infer.Inferencer(exported)
    wave = features.load_audio(prompt_audio)
    np.testing.assert_allclose(inferencer.encoder_input(wave), features.w2v_bert_features(wave[:48000]), atol=1e-6)
    del jax
