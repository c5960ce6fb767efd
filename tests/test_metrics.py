"""Tests of spectron_jax.metrics: FLOP counting, throughput/MFU, peak lookup, TensorBoard writer,
spectrogram images and the progress line."""

import glob
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from spectron_jax import metrics


class _FakeDevice:
    def __init__(self, device_kind):
        self.device_kind = device_kind


class _FakeCompiled:
    def __init__(self, analysis=None, error=None):
        self._analysis = analysis
        self._error = error

    def cost_analysis(self):
        if self._error is not None:
            raise self._error
        return self._analysis


# ------------------------------------------------------------------------------------------------
# FLOPs and throughput.

def test_compiled_flops_of_matmul_is_2mnk():
    m, k, n = 32, 48, 16
    compiled = jax.jit(lambda a, b: jnp.einsum("mk,kn->mn", a, b)).lower(
        jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert metrics.compiled_flops(compiled) == 2 * m * n * k


def test_compiled_flops_of_batched_matmul_is_2bmnk():
    b, m, k, n = 3, 5, 7, 11
    compiled = jax.jit(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y)).lower(
        jnp.ones((b, m, k)), jnp.ones((b, k, n))).compile()
    assert metrics.compiled_flops(compiled) == 2 * b * m * n * k


def test_compiled_flops_of_sharded_matmul_is_per_device():
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    m, k, n = 8 * len(devices), 48, 16
    x = jax.device_put(jnp.ones((m, k)), NamedSharding(mesh, PartitionSpec("data", None)))
    w = jax.device_put(jnp.ones((k, n)), NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(lambda a, b: a @ b).lower(x, w).compile()
    # XLA counts one partition's work: the total over all devices is the full matmul.
    assert metrics.compiled_flops(compiled) * len(devices) == 2 * m * n * k


def test_compiled_flops_accepts_list_form_and_missing_analysis():
    assert metrics.compiled_flops(_FakeCompiled([{"flops": 10.0}, {"flops": 5.0, "bytes accessed": 3.0}])) == 15.0
    assert metrics.compiled_flops(_FakeCompiled({"flops": 7.0})) == 7.0
    assert metrics.compiled_flops(_FakeCompiled(None)) is None
    assert metrics.compiled_flops(_FakeCompiled([{"bytes accessed": 3.0}])) is None
    assert metrics.compiled_flops(_FakeCompiled(error=NotImplementedError("no cost model"))) is None


def test_throughput_matches_hand_computation():
    out = metrics.throughput(0.25, text_tokens=1000, frames=4800, flops_per_step=8e12, num_devices=4,
                             peak_flops_per_device=100e12)
    assert out["steps_per_sec"] == pytest.approx(4.0)
    assert out["text_tokens_per_sec"] == pytest.approx(4000.0)
    assert out["frames_per_sec"] == pytest.approx(19200.0)
    # 8e12 FLOPs over 4 devices in 0.25 s = 8e12 FLOP/s per device.
    assert out["tflops_per_device"] == pytest.approx(8.0)
    assert out["mfu"] == pytest.approx(0.08)


def test_throughput_is_none_safe():
    out = metrics.throughput(2.0, text_tokens=10, flops_per_step=1e9, num_devices=1, peak_flops_per_device=None)
    assert out["mfu"] is None and out["frames_per_sec"] is None
    assert out["tflops_per_device"] == pytest.approx(0.5e-3)
    out = metrics.throughput(2.0, peak_flops_per_device=1e12)
    assert out["mfu"] is None and out["tflops_per_device"] is None and out["steps_per_sec"] == 0.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="step_seconds"):
            metrics.throughput(bad)


def test_measure_peak_flops_is_positive_and_finite():
    small = metrics.measure_peak_flops(size=128, repeats=2, inner=2)
    assert math.isfinite(small) and small > 0
    default = metrics.measure_peak_flops(repeats=2)
    assert math.isfinite(default) and default > 0
    with pytest.raises(ValueError):
        metrics.measure_peak_flops(size=64, repeats=0)


# ------------------------------------------------------------------------------------------------
# Datasheet lookup.

@pytest.mark.parametrize("kind,chip", [
    ("TPU v4", "tpu_v4"), ("TPU v5 lite", "tpu_v5e"), ("TPU v5e", "tpu_v5e"), ("TPU v5", "tpu_v5p"),
    ("TPU v5p", "tpu_v5p"), ("TPU v6 lite", "tpu_v6e"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"), ("NVIDIA H100 80GB HBM3", "h100_sxm"), ("NVIDIA H100 PCIe", "h100_pcie"),
    ("NVIDIA H200", "h200"), ("NVIDIA H100 NVL", None), ("cpu", None), ("TPU v3", None),
])
def test_chip_for_device_kind(kind, chip):
    assert metrics.chip_for_device_kind(kind) == chip


def test_device_kind_peak_reads_the_table():
    table = metrics.DATASHEET_PEAK_FLOPS
    assert metrics.device_kind_peak(_FakeDevice("TPU v5 lite"), jnp.bfloat16) == 197e12
    # TPU float32 at default precision is one bf16 MXU pass.
    assert metrics.device_kind_peak(_FakeDevice("TPU v5 lite"), jnp.float32) == 197e12
    assert metrics.device_kind_peak(_FakeDevice("TPU v5 lite"), jnp.float32, "highest") is None
    h100 = _FakeDevice("NVIDIA H100 80GB HBM3")
    assert metrics.device_kind_peak(h100, "bfloat16") == table["h100_sxm"]["bfloat16"] == 989.5e12
    assert metrics.device_kind_peak(h100, np.float16) == 989.5e12
    assert metrics.device_kind_peak(h100, np.float32) == table["h100_sxm"]["tfloat32"]
    assert metrics.device_kind_peak(h100, np.float32, "highest") == 67e12
    assert metrics.device_kind_peak(h100, np.int8) is None
    assert metrics.device_kind_peak(jax.devices()[0], jnp.float32) is None  # CPU: no datasheet
    for chip, peaks in table.items():
        assert peaks["bfloat16"] >= peaks.get("tfloat32", 0) >= peaks.get("float32", 0), chip


# ------------------------------------------------------------------------------------------------
# TensorBoard writer.

def _read_events(logdir):
    import tensorflow as tf

    values = {}
    files = glob.glob(f"{logdir}/events.out.tfevents.*")
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values[(value.tag, event.step)] = (value.metadata.plugin_data.plugin_name,
                                                   tf.make_ndarray(value.tensor))
    return files, values


def test_metrics_writer_round_trip(tmp_path):
    import tensorflow as tf

    logdir = tmp_path / "tb"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    wave = (0.5 * np.sin(np.arange(1600) * 0.05)).astype(np.float32)
    with metrics.MetricsWriter(logdir) as writer:
        writer.scalars(5, {"loss": 3.25, "mfu": np.float32(0.125), "lr": jnp.asarray(1e-4), "skipped": None})
        writer.scalars(6, {"loss": 2.5})
        writer.image(5, "spectrogram", image)
        writer.audio(5, "continuation", wave, 16000)
        writer.text(5, "transcript", "the cat sat")
        writer.flush()
    files, values = _read_events(logdir)
    assert len(files) == 1
    assert values[("loss", 5)][0] == "scalars" and float(values[("loss", 5)][1]) == 3.25
    assert float(values[("loss", 6)][1]) == 2.5
    assert float(values[("mfu", 5)][1]) == 0.125
    assert float(values[("lr", 5)][1]) == pytest.approx(1e-4, rel=1e-6)
    assert ("skipped", 5) not in values

    plugin, blob = values[("spectrogram", 5)]
    assert plugin == "images"
    assert (int(blob[0]), int(blob[1])) == (23, 17)  # width, height
    np.testing.assert_array_equal(tf.io.decode_png(blob[2]).numpy(), image)

    plugin, clips = values[("continuation", 5)]
    assert plugin == "audio" and clips.shape == (1, 2)
    decoded, rate = tf.audio.decode_wav(clips[0, 0])
    assert int(rate) == 16000 and decoded.shape == (1600, 1)
    np.testing.assert_allclose(decoded.numpy()[:, 0], wave, atol=1 / 16000)

    plugin, text = values[("transcript", 5)]
    assert plugin == "text" and text.item().decode() == "the cat sat"


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    logdir = tmp_path / "never"
    writer = metrics.MetricsWriter(logdir, enabled=False)
    writer.scalars(1, {"loss": 1.0})
    writer.image(1, "x", np.zeros((2, 2, 3), np.uint8))
    writer.audio(1, "a", np.zeros(10, np.float32), 16000)
    writer.text(1, "t", "x")
    writer.flush()
    writer.close()
    assert not logdir.exists()


def test_metrics_writer_rejects_bad_values(tmp_path):
    with metrics.MetricsWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="'vec'"):
            writer.scalars(1, {"vec": np.ones(3)})
        with pytest.raises(ValueError, match="'img'"):
            writer.image(1, "img", np.zeros((4, 4), np.uint8))
        with pytest.raises(ValueError, match="'wav'"):
            writer.audio(1, "wav", np.zeros((4, 2), np.float32), 16000)


# ------------------------------------------------------------------------------------------------
# Spectrogram images.

def _luminance(rgb):
    """Relative luminance of sRGB colours [..., 3] uint8 (linearised, Rec. 709 weights)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])


def test_colormap_luminance_is_monotone():
    luminance = _luminance(metrics.colormap(np.linspace(0.0, 1.0, 64)))
    assert np.all(np.diff(luminance) > 0)
    np.testing.assert_array_equal(metrics.colormap(np.array([-3.0, np.nan])), metrics.colormap(np.array([0.0, 0.0])))
    np.testing.assert_array_equal(metrics.colormap(np.array(7.0)), metrics.colormap(np.array(1.0)))


def test_spectrogram_image_shape_and_orientation():
    frames = np.full((30, 128), -11.5, np.float32)
    frames[:, 0] = 2.0  # energy only in the lowest mel bin
    image = metrics.spectrogram_image(frames)
    assert image.shape == (128, 30, 3) and image.dtype == np.uint8
    luminance = _luminance(image)
    assert np.all(luminance[-1] > luminance[:-1].max())  # bottom row lights up
    np.testing.assert_array_equal(image[-1, 0], metrics.colormap(np.array(1.0)))
    np.testing.assert_array_equal(image[0, 0], metrics.colormap(np.array(0.0)))


def test_spectrogram_image_with_prediction_shares_the_scale():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(40, 16))
    image = metrics.spectrogram_image(target, target)
    assert image.shape == (33, 40, 3)
    np.testing.assert_array_equal(image[:16], image[17:])
    np.testing.assert_array_equal(image[16], np.full((40, 3), 255, np.uint8))  # separator row
    # A prediction uniformly 1 higher is drawn brighter on the shared scale (not re-normalised).
    brighter = metrics.spectrogram_image(target, target + 1.0)
    assert _luminance(brighter[17:]).mean() > _luminance(brighter[:16]).mean()
    # Independent reference for the colours: min..max over both, bin 0 at the bottom.
    low, high = target.min(), target.max() + 1.0
    np.testing.assert_array_equal(brighter[:16], metrics.colormap(((target - low) / (high - low)).T[::-1]))


def test_spectrogram_image_pads_shorter_prediction_and_rejects_bad_shapes():
    target = np.zeros((10, 8))
    prediction = np.full((6, 8), np.nan)
    image = metrics.spectrogram_image(target, prediction)
    assert image.shape == (17, 10, 3)
    np.testing.assert_array_equal(image[9:, 6:], np.zeros((8, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="mel"):
        metrics.spectrogram_image(target, np.zeros((10, 9)))
    with pytest.raises(ValueError, match="target"):
        metrics.spectrogram_image(np.zeros(10))


# ------------------------------------------------------------------------------------------------
# Progress line.

def test_progress_log_format():
    log = metrics.ProgressLog(2000)
    line = log.format(120, {"loss": 3.4123, "ce_text": 2.1, "spec_total": np.float32(1.31),
                            "steps_per_sec": 4.2, "mfu": 0.013, "grad_norm": 9.0})
    assert line == "step 120/2000 | loss 3.412 | ce 2.10 | spec 1.31 | 4.2 steps/s | mfu 1.3%"
    assert metrics.ProgressLog().format(7, {"loss": float("nan"), "mfu": None}) == "step 7 | loss nan"
    stream = io.StringIO()
    assert log.log(3, {"ce": 1.0}, file=stream) == "step 3/2000 | ce 1.00"
    assert stream.getvalue() == "step 3/2000 | ce 1.00\n"
