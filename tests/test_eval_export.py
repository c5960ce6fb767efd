"""`python -m spectron_jax.eval` on a real (tiny, random) export: bundle loading, decoding, every report file."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from spectron_jax import bundle as bundle_lib
from spectron_jax import checkpoints
from spectron_jax import eval as eval_cli

TINY_GIN = """
SpectronConfig.encoder = @ConformerConfig()
SpectronConfig.decoder = @DecoderConfig()
SpectronConfig.acoustic = @AcousticConfig()
ConformerConfig.input_dim = 128
ConformerConfig.model_dim = 32
ConformerConfig.num_layers = 1
ConformerConfig.num_heads = 2
ConformerConfig.ffn_dim = 64
ConformerConfig.conv_kernel_size = 5
ConformerConfig.subsampling_channels = 4
DecoderConfig.vocab_size = 512
DecoderConfig.model_dim = 64
DecoderConfig.num_layers = 1
DecoderConfig.num_heads = 2
DecoderConfig.num_kv_heads = 1
DecoderConfig.head_dim = 32
DecoderConfig.mlp_dim = 128
AcousticConfig.num_mel = 128
AcousticConfig.prenet_dims = (32,)
AcousticConfig.postnet_hidden = 64
"""


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, repo_root):
    """An export folder as `spectron_jax.export` writes it, of a randomly initialised tiny model."""
    import orbax.checkpoint as ocp

    out = tmp_path_factory.mktemp("export")
    (out / checkpoints.CONFIG_FILENAME).write_text(TINY_GIN)
    config = bundle_lib._model_config_from_gin(TINY_GIN)
    from spectron_jax.models.spectron_model import SpectronModel

    params, _ = SpectronModel(config).init(seed=0)
    pure = nnx.to_pure_dict(params)
    saver = ocp.StandardCheckpointer()
    saver.save(str(out / checkpoints.EXPORT_PARAMS_SUBDIR), pure)
    saver.wait_until_finished()
    shutil.copyfile(repo_root / "data/embedded/spm/spectron_tiny.model", out / checkpoints.TOKENIZER_FILENAME)
    info = {"step": 0, "dtype": "float32", "num_params": int(sum(np.prod(x.shape) for x in __import__("jax").tree.leaves(pure)))}
    (out / checkpoints.EXPORT_INFO_FILENAME).write_text(json.dumps(info))
    bundle_lib.write_bundle_json(str(out), info)
    return out


@pytest.mark.slow
def test_eval_cli_on_an_export_writes_every_report_file(export_dir, tmp_path, embedded_dir):
    rows = [line.split("\t") for line in (embedded_dir / "manifest.tsv").read_text().splitlines()[1:]]
    test_rows = [r for r in rows if r[5] == "test"][:2]
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC garbage")
    manifest = tmp_path / "eval.tsv"
    manifest.write_text("id\tpath\ttranscript\n" + "".join(f"{r[0]}\t{embedded_dir / r[1]}\t{r[2]}\n" for r in test_rows)
                        + "bad\tcorrupt.flac\tsome words\ngone\tmissing.wav\tother words\n")
    out = tmp_path / "report"
    code = eval_cli.main([f"--export_dir={export_dir}", "--suite=continuation", f"--data_dir={manifest}",
                          f"--output_dir={out}", "--batch_size=2", "--max_frames=24", "--asr=none",
                          "--speaker=none", "--naturalness=none"])
    assert code == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["metrics"]["num_examples"] == 2, payload["skipped"]
    for name in ("metrics.json", "report.md", "examples.jsonl", "plots/spectrograms.png"):
        assert (out / name).is_file(), name
    payload = json.loads((out / "metrics.json").read_text())
    values = payload["metrics"]
    assert values["num_examples"] == 2 and payload["skipped"]["by_reason"] == {"unreadable": 1, "missing_file": 1}
    for key in ("text_wer", "text_cer", "l1_teacher_forced", "l1_free_running", "length_ratio", "stop_head_fraction"):
        assert values[key] is not None and np.isfinite(values[key]), key
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert all(0 < e["generated_frames"] <= 24 for e in examples)
    assert payload["scorers"]["text_lm"].endswith("(proxy LM)")


def test_eval_cli_rejects_a_folder_that_is_not_an_export(tmp_path, repo_root):
    with pytest.raises(eval_cli.cli.InputError, match="--export_dir"):
        eval_cli.main([f"--export_dir={tmp_path}", "--suite=continuation", f"--data_dir={repo_root / 'data'}",
                       f"--output_dir={tmp_path / 'o'}"])
