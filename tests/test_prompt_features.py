"""The w2v-BERT front-end in the data pipeline: prepare stores fbank, the Task normalises and stacks it.

Reference: `features.w2v_bert_features` (NumPy, itself checked against SeamlessM4T's feature extractor in
test_fbank.py) of each utterance's first 3 s of audio, against what the seqio Task yields from shards.
"""

import numpy as np
import pytest
import tensorflow as tf

from spectron_jax import cli
from spectron_jax.data import converter as converter_lib
from spectron_jax.data import features, pipeline, prepare, prompt_features, tasks

FBANK_TASK = tasks.TaskConfig(max_continuation_seconds=1.0, prompt_features="w2v_bert_fbank", spec_augment=None)


def _manifest(embedded_dir, folder, count=3):
    """A manifest of the embedded corpus' first `count` train and 1 validation utterances (absolute paths)."""
    with open(embedded_dir / "manifest.tsv", encoding="utf-8") as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    col = {name: i for i, name in enumerate(header)}
    picked = [r for r in rows if r[col["split"]] == "train"][:count] + \
        [r for r in rows if r[col["split"]] == "validation"][:1]
    path = folder / "manifest.tsv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for r in picked:
            r = list(r)
            r[col["path"]] = str(embedded_dir / r[col["path"]])
            f.write("\t".join(r) + "\n")
    return path, {r[col["id"]]: r[col["path"]] for r in picked}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, embedded_dir):
    root = tmp_path_factory.mktemp("fbank_shards")
    manifest, paths = _manifest(embedded_dir, root)
    out = {}
    for kind in ("log_mel", "w2v_bert_fbank"):
        out[kind] = root / kind
        assert prepare.main(["--format=manifest", f"--input={manifest}", f"--output_dir={out[kind]}",
                             "--num_shards=1", "--num_workers=1", f"--prompt_features={kind}"]) == 0
    return out, {uid: str(embedded_dir / rel) for uid, rel in paths.items()}


def _examples(data_dir, sp_model, config, split):
    task = tasks.register_task("spectron_fbank_test", str(data_dir), tasks.load_vocabulary(sp_model), config)
    return list(task.get_dataset(split=split, shuffle=False).as_numpy_iterator())


def test_frame_counts():
    assert prompt_features.fbank_frames(3.0) == 298 and prompt_features.input_frames("w2v_bert_fbank", 3.0) == 149
    assert prompt_features.input_frames("log_mel", 3.0) == 240
    wave = np.random.default_rng(0).normal(0, 0.1, 48000).astype(np.float32)
    assert features.kaldi_fbank(wave).shape == (298, 80)
    assert prompt_features.encoder_input(np.concatenate([wave, wave]), "w2v_bert_fbank", 3.0).shape == (149, 160)
    with pytest.raises(ValueError, match="prompt features must be one of"):
        prompt_features.check_kind("mfcc")


def test_task_prompt_is_the_stacked_fbank_of_the_first_three_seconds(shards, throwaway_sp_model):
    dirs, paths = shards
    for split in ("train", "validation"):
        fbank = {e["id"].decode(): e for e in _examples(dirs["w2v_bert_fbank"], throwaway_sp_model, FBANK_TASK, split)}
        log_mel = {e["id"].decode(): e for e in _examples(dirs["w2v_bert_fbank"], throwaway_sp_model,
                                                          tasks.TaskConfig(max_continuation_seconds=1.0,
                                                                           spec_augment=None), split)}
        assert fbank and set(fbank) == set(log_mel)
        for uid, example in fbank.items():
            wave = features.load_audio(paths[uid])
            expected = features.w2v_bert_features(wave[:48000])
            assert example["prompt"].shape == (149, 160)
            np.testing.assert_allclose(example["prompt"], expected, atol=2e-5)
            # the regression target is the unchanged log-mel after the 240-frame (3 s) prompt
            np.testing.assert_array_equal(example["continuation"], log_mel[uid]["continuation"])
            # (stored as float16: within its rounding, 2^-11 relative)
            np.testing.assert_allclose(example["continuation"], features.log_mel(wave)[240:320], rtol=2**-10, atol=1e-5)
            assert "prompt_fbank" not in example


def test_spec_augment_masks_whole_fbank_frames_and_bins_before_stacking(shards, throwaway_sp_model):
    dirs, _ = shards
    augmented = tasks.TaskConfig(max_continuation_seconds=1.0, prompt_features="w2v_bert_fbank")
    clean = {e["id"]: e["prompt"] for e in _examples(dirs["w2v_bert_fbank"], throwaway_sp_model, FBANK_TASK, "train")}
    masked_any = False
    for example in _examples(dirs["w2v_bert_fbank"], throwaway_sp_model, augmented, "train"):
        before = clean[example["id"]].reshape(298, 80)  # unstack: row k -> fbank frames 2k, 2k + 1
        after = example["prompt"].reshape(298, 80)
        changed = after != before
        frames, bins = changed.all(axis=1), changed.all(axis=0)
        # every changed cell lies in a fully masked fbank frame or a fully masked mel bin
        assert not np.any(changed & ~frames[:, None] & ~bins[None, :])
        if changed.any():
            fill = np.unique(after[changed])
            assert fill.size == 1 and abs(fill[0] - before.mean()) < 1e-5  # the prompt's mean
            masked_any = True
    assert masked_any


def test_shards_without_fbank_give_a_message_naming_the_flag(shards, throwaway_sp_model):
    dirs, _ = shards
    with pytest.raises(tf.errors.InvalidArgumentError, match="--prompt_features=w2v_bert_fbank"):
        _examples(dirs["log_mel"], throwaway_sp_model, FBANK_TASK, "train")
    # and the fbank shards still serve a log-mel encoder, byte for byte like shards without the feature
    config = tasks.TaskConfig(max_continuation_seconds=1.0, spec_augment=None)
    plain = _examples(dirs["log_mel"], throwaway_sp_model, config, "train")
    extended = _examples(dirs["w2v_bert_fbank"], throwaway_sp_model, config, "train")
    for a, b in zip(plain, extended):
        np.testing.assert_array_equal(a["prompt"], b["prompt"])


def test_pipeline_batches_carry_160_values_per_prompt_frame(shards, throwaway_sp_model):
    dirs, _ = shards
    tasks.register_task("spectron_fbank_test", str(dirs["w2v_bert_fbank"]),
                        tasks.load_vocabulary(throwaway_sp_model), FBANK_TASK)
    data = pipeline.make_pipeline("spectron_fbank_test", "train", 2, shuffle=False, repeat=False, prompt_len=152,
                                  text_len=32, cont_len=80, prompt_dim=160)
    batch = next(data)
    assert data.batch_spec["prompt_frames"] == ((2, 152, 160), np.float32)
    assert batch["prompt_frames"].shape == (2, 152, 160) and batch["cont_frames"].shape == (2, 80, 128)
    np.testing.assert_array_equal(batch["prompt_mask"].sum(axis=1), [149, 149])
    np.testing.assert_array_equal(batch["prompt_frames"][:, 149:], 0.0)
    with pytest.raises(ValueError, match="prompt_dim"):
        converter_lib.SpectronFeatureConverter(prompt_dim=0)


def test_prepare_refuses_bad_prompt_feature_flags(tmp_path, embedded_dir):
    manifest, _ = _manifest(embedded_dir, tmp_path, count=1)
    with pytest.raises(cli.UsageError, match="--prompt_feature_seconds"):
        prepare.main(["--format=manifest", f"--input={manifest}", f"--output_dir={tmp_path / 'o'}",
                      "--prompt_features=w2v_bert_fbank", "--prompt_feature_seconds=0"])
    with pytest.raises(cli.UsageError, match="invalid choice"):
        prepare.main(["--format=manifest", f"--input={manifest}", f"--output_dir={tmp_path / 'o'}",
                      "--prompt_features=mfcc"])


def test_model_config_checks_the_encoder_input():
    from spectron_jax.models.conformer import ConformerConfig
    from spectron_jax.models.spectron import SpectronConfig

    w2v = ConformerConfig(input_dim=160, frontend="feature_projection", position_encoding="relative_key")
    config = SpectronConfig(encoder=w2v, prompt_features="w2v_bert_fbank")
    assert config.prompt_dim == 160 == prompt_features.input_dim("w2v_bert_fbank")
    assert config.prefix_len(149) == 149  # no subsampling: one prefix slot per 20 ms
    assert SpectronConfig().prefix_len(240) == 60
    with pytest.raises(ValueError, match="encoder.input_dim is 128"):
        SpectronConfig(prompt_features="w2v_bert_fbank")
    with pytest.raises(ValueError, match="differs from"):
        SpectronConfig(encoder=w2v)
