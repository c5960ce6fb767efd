"""`benchmark`: the JSON report of a short run on the tiny config, the synthetic batch, CLI errors.

Timings are never asserted; the checks are that every figure exists, is positive, and agrees with the
quantities it is derived from (recomputed here).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from spectron_jax import benchmark, cli

# The tiny config cut to one layer per stack and short sequences: a few seconds of compilation per part.
SMALL = [
    "--gin.ConformerConfig.num_layers=1",
    "--gin.DecoderConfig.num_layers=1",
    "--gin.SpectronFeatureConverter.prompt_len=32",
    "--gin.SpectronFeatureConverter.text_len=16",
    "--gin.SpectronFeatureConverter.cont_len=32",
]


@pytest.fixture(scope="module")
def report(repo_root):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "spectron_jax.benchmark", "--gin_file=gin/models/tiny.gin", "--json", "--steps=2",
         "--warmup=1", "--batch_size=2", "--decode_frames=16", "--decode_text_tokens=4", "--repeats=1", "--decode_reduction_factors=4", "--decode_batch=2",
         "--decode_large_batch=2",
         "--data_files=2", "--data_seconds=0.1", *SMALL],
        cwd=repo_root, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in reversed(proc.stdout.splitlines())
                              if line.startswith("{")))  # the JSON line, wherever it is


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix[:-1], tree


# Figures that exist only for tabulated accelerators (null on a CPU).
DATASHEET_ONLY = {"peak.datasheet_flops_per_sec_per_device", "train.mfu_datasheet_peak",
                  "train.analytic_mfu_datasheet_peak"}
DECODE_BANDWIDTH_ONLY = ("bandwidth_bytes_per_sec", "step_floor_seconds", "speech_step_vs_floor",
                         "text_step_vs_floor")


@pytest.mark.slow  # the module's benchmark run compiles six programs: about a minute on 2 cores
def test_every_field_is_present_and_positive(report):
    assert report["device"] == {"platform": "cpu", "device_kind": "cpu", "num_devices": 1}
    for key in ("measured_flops_per_sec_per_device", "datasheet_flops_per_sec_per_device"):
        assert key in report["peak"]
    for key in ("step_seconds_median", "text_tokens_per_sec", "frames_per_sec", "flops_per_step",
                "mfu_measured_peak", "mfu_datasheet_peak", "num_params", "compile_seconds", "loss",
                "analytic_flops_per_step", "analytic_mfu_measured_peak", "analytic_mfu_datasheet_peak"):
        assert key in report["train"]
    assert set(report["decode"]) == {"r4_b2"}  # one decoding configuration keeps the run short
    for dec in report["decode"].values():
        for name in ("real_time_factor", "end_to_end_seconds", "parts_total_seconds", "text_tokens_per_sec",
                     "frames_per_sec", "speech_step_seconds", "text_step_seconds", "weight_bytes", "kv_cache_bytes",
                     "compile_seconds", "first_call_seconds"):
            assert dec[name] > 0, name
        assert set(dec["parts"]) == set(benchmark.DECODE_PARTS)
    assert report["data"]["featurise"]["x_realtime_per_core"] > 0
    assert report["data"]["tfrecord"]["read_examples_per_s"] > 0
    for name in DATASHEET_ONLY:
        section, key = name.split(".")
        assert report[section][key] is None  # no datasheet entry for a CPU
    for dec in report["decode"].values():
        assert all(dec[key] is None for key in DECODE_BANDWIDTH_ONLY)  # a CPU's bandwidth is unknown
    values = dict(_numbers({k: v for k, v in report.items() if k != "data"}))
    assert all(math.isfinite(v) and v > 0 for v in values.values()), {k: v for k, v in values.items() if not v > 0}


@pytest.mark.slow
def test_derived_figures_agree_with_their_inputs(report):
    train, config = report["train"], report["config"]
    # every slot of the synthetic batch is valid: tokens and frames per step are the batch shapes
    assert train["text_tokens_per_step"] == train["batch_size"] * config["text_len"]
    assert train["frames_per_step"] == train["batch_size"] * config["cont_len"]
    step = train["step_seconds_median"]
    assert train["text_tokens_per_sec"] == pytest.approx(train["text_tokens_per_step"] / step)
    assert train["frames_per_sec"] == pytest.approx(train["frames_per_step"] / step)
    peak = report["peak"]["measured_flops_per_sec_per_device"]
    assert train["mfu_measured_peak"] == pytest.approx(train["flops_per_step"] / (step * peak))
    assert train["analytic_mfu_measured_peak"] == pytest.approx(train["analytic_flops_per_step"] / (step * peak))
    # a train step does forward + backward: at least 2 FLOPs per parameter per text slot, far more in all
    assert train["flops_per_step"] > 2 * train["num_params"] * train["batch_size"]
    for name, dec in report["decode"].items():
        r, batch = dec["reduction_factor"], dec["batch"]
        assert name == f"r{r}_b{batch}"
        # the stop head is disabled: every row spends its whole 16-frame budget, r frames per step
        assert dec["frames_per_row"] == 16 and dec["speech_steps"] == 16 // r
        assert dec["frames"] == batch * 16 and dec["audio_seconds"] == pytest.approx(batch * 16 / 80)
        assert 1 <= dec["text_steps"] <= dec["max_text_tokens"] == 4
        assert dec["real_time_factor"] == pytest.approx(dec["audio_seconds"] / dec["end_to_end_seconds"])
        assert dec["times_real_time"] == dec["real_time_factor"]
        assert dec["latency_rtf"] == pytest.approx(dec["end_to_end_seconds"] * batch / dec["audio_seconds"])
        assert dec["vocoder_share"] == pytest.approx(dec["parts"]["vocoder"] / dec["parts_total_seconds"])
        assert 0 < dec["vocoder_share"] < 1
        assert dec["parts_real_time_factor"] == pytest.approx(dec["audio_seconds"] / dec["parts_total_seconds"])
        assert sum(dec["parts"].values()) <= dec["parts_total_seconds"]
        assert dec["compile_seconds"] <= dec["first_call_seconds"]  # the compile is part of the first call
        assert dec["text_tokens_per_sec"] == pytest.approx(batch * dec["text_steps"] / dec["parts"]["text"])
        assert dec["frames_per_sec"] == pytest.approx(dec["frames"] / dec["parts"]["speech"])
        assert dec["speech_step_seconds"] == pytest.approx(dec["parts"]["speech"] / dec["speech_steps"])
        assert dec["text_step_seconds"] == pytest.approx(dec["parts"]["text"] / dec["text_steps"])


def test_bandwidth_table_looks_up_tabulated_chips():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert benchmark.device_bandwidth(Device("NVIDIA H200")) == 4.8e12
    assert benchmark.device_bandwidth(Device("NVIDIA H100 80GB HBM3")) == 3.35e12
    assert benchmark.device_bandwidth(Device("TPU v5 lite")) == 0.819e12
    assert benchmark.device_bandwidth(Device("cpu")) is None


def test_synthetic_batch_follows_the_batch_contract():
    spec = {
        "prompt_frames": ((2, 8, 128), np.dtype(np.float32)), "prompt_mask": ((2, 8), np.dtype(np.int32)),
        "text_inputs": ((2, 5), np.dtype(np.int32)), "text_targets": ((2, 5), np.dtype(np.int32)),
        "text_weights": ((2, 5), np.dtype(np.float32)), "text_segments": ((2, 5), np.dtype(np.int32)),
        "cont_frames": ((2, 12, 128), np.dtype(np.float32)), "cont_mask": ((2, 12), np.dtype(np.int32)),
    }
    batch = benchmark.synthetic_batch(spec, vocab_size=512)
    for key, (shape, dtype) in spec.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype
    assert np.all(batch["text_inputs"][:, 0] == 3) and np.all(batch["text_targets"][:, -1] == 1)
    assert batch["text_inputs"][:, 1:].min() >= 4 and batch["text_inputs"].max() < 512
    assert np.all(batch["prompt_mask"] == 1) and np.all(batch["cont_mask"] == 1) and np.all(batch["text_weights"] == 1)
    assert set(np.unique(batch["text_segments"])) == {1, 2}


@pytest.mark.parametrize("argv, flag", [
    (["--steps=2"], "--gin_file"),
    (["--gin_file=gin/models/tiny.gin", "--steps=0"], "--steps"),
    (["--gin_file=gin/models/tiny.gin", "--decode_frames=0"], "--decode_frames"),
    (["--gin_file=gin/models/tiny.gin", "--warmup=-1"], "--warmup"),
    (["--gin_file=gin/models/tiny.gin", "--decode_large_batch=0"], "--decode_large_batch"),
    (["--gin_file=gin/models/tiny.gin", "--decode_text_tokens=0"], "--decode_text_tokens"),
    (["--gin_file=gin/models/tiny.gin", "--decode_reduction_factors=1,x"], "--decode_reduction_factors"),
    (["--gin_file=gin/models/tiny.gin", "--compute_dtype=fp8"], "--compute_dtype"),
])
def test_bad_flags_raise_usage_errors(argv, flag):
    with pytest.raises(cli.UsageError, match=flag):
        benchmark.main(argv)


def test_missing_data_dir_is_an_input_error(tmp_path):
    with pytest.raises(cli.InputError, match="--data_dir"):
        benchmark.main(["--gin_file=gin/models/tiny.gin", f"--data_dir={tmp_path / 'absent'}"])
