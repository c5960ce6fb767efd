"""The whole recipe on `gs://` paths against a local GCS server (gcp-storage-emulator): prepare writes
shards to the bucket, train reads them, the tokenizer and writes checkpoints / metrics / config there,
a crashed run resumes from its checkpoint in the bucket and reproduces an uninterrupted local run's
losses, and export writes a bundle to the bucket."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_train import MODEL_GIN

RUN_GIN = MODEL_GIN + """
MODEL_DIR = %gin.REQUIRED
DATA_DIR = %gin.REQUIRED
TRAIN_STEPS = 4
TASK = 'spectron_embedded'
TrainConfig.batch_size = 4
TrainConfig.data_dir = %DATA_DIR
TrainConfig.log_every_steps = 2
TrainConfig.eval_every_steps = 4
TrainConfig.eval_batches = 1
TrainConfig.peak_flops_per_device = 1e9
TrainConfig.checkpoint = @CheckpointConfig()
CheckpointConfig.save_every_steps = 2
TaskConfig.max_continuation_seconds = 1.0
SpectronFeatureConverter.prompt_len = 240
SpectronFeatureConverter.text_len = 32
SpectronFeatureConverter.cont_len = 80
"""


@pytest.fixture(scope="module")
def env(gcs_emulator, tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    out = dict(os.environ)
    out.update({k: v for k, v in gcs_emulator.items() if k != "bucket"})
    out.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true",
                "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"})
    return out


def _call(args, env, repo_root, expect=0, timeout=300):
    result = subprocess.run([sys.executable, "-m", *args], env=env, cwd=repo_root, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == expect, (args, result.stdout[-3000:], result.stderr[-3000:])
    return result


def _losses(model_dir) -> dict[int, float]:
    from spectron_jax import metric_logs

    return {r["step"]: r["loss"] for r in metric_logs.read_records(model_dir, split="train")}


@pytest.mark.slow
def test_prepare_train_crash_resume_export_on_gcs(env, gcs_emulator, tmp_path, repo_root, embedded_dir, monkeypatch):
    for key, value in gcs_emulator.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    from spectron_jax import filesystem as fs

    bucket = f"gs://{gcs_emulator['bucket']}/recipe"
    header, *rows = [line.rstrip("\n").split("\t") for line in
                     (embedded_dir / "manifest.tsv").read_text(encoding="utf-8").splitlines() if line.strip()]
    col = {name: i for i, name in enumerate(header)}
    picked = [r for r in rows if r[col["split"]] == "train"][:12] + [r for r in rows if r[col["split"]] == "validation"][:4]
    for r in picked:
        r[col["path"]] = str(embedded_dir / r[col["path"]])
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("\n".join("\t".join(r) for r in [header, *picked]) + "\n", encoding="utf-8")
    data_dir, model_dir, export_dir = f"{bucket}/data", f"{bucket}/run", f"{bucket}/export"
    vocab = f"{bucket}/spm/spectron_tiny.model"
    fs.copy(embedded_dir / "spm" / "spectron_tiny.model", vocab)

    _call(["spectron_jax.data.prepare", "--format=manifest", f"--input={manifest}", f"--output_dir={data_dir}",
           "--num_shards=1", "--num_workers=1"], env, repo_root)
    assert fs.is_file(f"{data_dir}/train.tfrecord-00000-of-00001")
    assert json.loads(fs.read_text(f"{data_dir}/report.json"))["splits"]["train"]["utterances"] == 12

    gin_file = tmp_path / "run.gin"
    gin_file.write_text(RUN_GIN)
    # Checkpoints in the production format (OCDBT: conditional manifest commits on the bucket).
    train = ["spectron_jax.train", f"--gin_file={gin_file}", f"--gin.DATA_DIR='{data_dir}'",
             f"--gin.TrainConfig.vocab_path='{vocab}'"]
    # Uninterrupted reference, on local disk (local shards: a copy of the bucket's).
    local_data = tmp_path / "data"
    for name in fs.listdir(data_dir):
        if ".tfrecord-" in name:
            fs.copy(f"{data_dir}/{name}", local_data / name)
    reference_dir = tmp_path / "reference"
    _call(["spectron_jax.train", f"--gin_file={gin_file}", f"--gin.DATA_DIR='{local_data}'",
           f"--gin.TrainConfig.vocab_path='{embedded_dir / 'spm' / 'spectron_tiny.model'}'",
           f"--gin.MODEL_DIR='{reference_dir}'"], env, repo_root)
    reference = _losses(reference_dir)
    assert sorted(reference) == [1, 2, 3, 4]

    # A run on the bucket that dies at step 3 (a NaN batch: exit 1, nothing saved after step 2) ...
    _call(train + [f"--gin.MODEL_DIR='{model_dir}'", "--gin.TrainConfig.nan_at_step=3"], env, repo_root, expect=1)
    assert fs.is_dir(f"{model_dir}/checkpoints/2") and not fs.exists(f"{model_dir}/checkpoints/3")
    assert fs.is_file(f"{model_dir}/checkpoints/2/state/manifest.ocdbt")  # the production format
    # ... resumes from the bucket's checkpoint and continues exactly.
    result = _call(train + [f"--gin.MODEL_DIR='{model_dir}'"], env, repo_root)
    assert f"resumed from step 2 in {model_dir}/checkpoints" in result.stdout
    losses = _losses(model_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses[s] for s in range(1, 5)], [reference[s] for s in range(1, 5)], rtol=1e-5)
    # Each run's records went up as pieces (one or more per run, numbered on across the resume).
    from spectron_jax import metric_logs

    pieces = [n for n in fs.listdir(model_dir) if n.startswith("metrics")]
    assert len(pieces) >= 2 and pieces == [metric_logs.piece_name(i) for i in range(len(pieces))], pieces
    for name in ("config.gin", "tokenizer.model", "model_summary.json"):
        assert fs.is_file(f"{model_dir}/{name}"), name
    assert fs.read_bytes(f"{model_dir}/tokenizer.model") == (embedded_dir / "spm" / "spectron_tiny.model").read_bytes()
    assert any(".tfevents." in n for n in fs.listdir(model_dir)) or any(
        fs.is_dir(f"{model_dir}/{n}") and any(".tfevents." in m for m in fs.listdir(f"{model_dir}/{n}"))
        for n in fs.listdir(model_dir))

    _call(["spectron_jax.export", f"--model_dir={model_dir}", f"--output_dir={export_dir}"], env, repo_root)
    info = json.loads(fs.read_text(f"{export_dir}/export.json"))
    assert info["step"] == 4 and fs.is_file(f"{export_dir}/config.gin")
    assert fs.is_file(f"{export_dir}/params/manifest.ocdbt")
    # The OCDBT export read back from the bucket equals the same checkpoint exported to local disk as
    # per-array zarr stores (another writer, another file system).
    from spectron_jax import checkpoints

    checkpoints.export(model_dir, str(tmp_path / "zarr_export"), use_ocdbt=False)
    from_bucket = checkpoints.flatten_paths(checkpoints.load_exported_params(export_dir))
    from_disk = checkpoints.flatten_paths(checkpoints.load_exported_params(str(tmp_path / "zarr_export")))
    assert sorted(from_bucket) == sorted(from_disk)
    for name, value in from_disk.items():
        np.testing.assert_array_equal(np.asarray(from_bucket[name]), np.asarray(value), err_msg=name)
