"""Training metrics: TensorBoard event files, throughput and model FLOPs utilisation (MFU).

Four pieces, used by the training loop, the benchmark and the inference tools:

- Peak compute. `DATASHEET_PEAK_FLOPS` holds vendors' dense peak FLOP/s per chip; `device_kind_peak`
  looks a JAX device up in it; `measure_peak_flops` measures the local device with a large jitted
  matmul (for the CPU, which has no datasheet entry, and as a sanity check of the table).
- Work per step. `compiled_flops` reads XLA's cost analysis of a compiled step.
- Rates. `throughput` turns a step time into steps/s, text tokens/s, spectrogram frames/s, TFLOP/s per
  device and MFU, the fraction of the devices' peak that the model's FLOPs use:
  `mfu = flops_per_step / (step_seconds * num_devices * peak_flops_per_device)`.
- Output. `MetricsWriter` writes TensorBoard event files (scalars, images, audio, text; on an object
  store in rolling pieces uploaded in the background, see `spectron_jax.metric_logs`);
  `spectrogram_image` renders log-mel spectrograms; `ProgressLog` formats the one-line stdout log.

The writer needs only TensorFlow (not the `tensorboard` package): it writes through the generic
`tf.summary.write` with the summary metadata TensorBoard's scalar, image, audio and text dashboards
read. TensorFlow is imported when the first enabled writer is made, never by a disabled one.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import socket
import sys
import time
from typing import Any, Callable, Mapping, Sequence, TextIO

import numpy as np

from spectron_jax import metric_logs

# Dense (no structured sparsity) peak FLOP/s per chip, from the vendors' published specifications.
# Keys are dtype names; 'tfloat32' is NVIDIA's TensorFloat-32 tensor-core rate, 'float32' the
# CUDA-core IEEE float32 rate. TPUs publish only bf16 (and int8): their MXUs run float32 matmuls as
# bf16 passes (one pass at JAX's default precision), so `device_kind_peak` uses the bf16 figure.
# JAX exposes one device per chip on all the TPUs listed (v4 and v5p as megacore chips).
DATASHEET_PEAK_FLOPS: dict[str, dict[str, float]] = {
    # Google Cloud TPU documentation, "TPU v4" system architecture page: 275 TFLOP/s bf16 per chip.
    "tpu_v4": {"bfloat16": 275e12},
    # Google Cloud TPU documentation, "TPU v5e" page: 197 TFLOP/s bf16 per chip (394 TOP/s int8).
    "tpu_v5e": {"bfloat16": 197e12},
    # Google Cloud TPU documentation, "TPU v5p" page: 459 TFLOP/s bf16 per chip (918 TOP/s int8).
    "tpu_v5p": {"bfloat16": 459e12},
    # Google Cloud TPU documentation, "TPU v6e" (Trillium) page: 918 TFLOP/s bf16 per chip.
    "tpu_v6e": {"bfloat16": 918e12},
    # NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe list the same peaks): BF16 312, TF32 156
    # (dense; 624 / 312 with sparsity), FP32 19.5 TFLOP/s.
    "a100": {"bfloat16": 312e12, "tfloat32": 156e12, "float32": 19.5e12},
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 1,979 and TF32 989 TFLOP/s are
    # quoted with sparsity, so dense is half; FP32 67 TFLOP/s.
    "h100_sxm": {"bfloat16": 1979e12 / 2, "tfloat32": 989e12 / 2, "float32": 67e12},
    # Same datasheet, H100 PCIe column: BF16 1,513 and TF32 756 TFLOP/s with sparsity; FP32 51.
    "h100_pcie": {"bfloat16": 1513e12 / 2, "tfloat32": 756e12 / 2, "float32": 51e12},
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (same compute as H100 SXM): BF16 1,979
    # and TF32 989 TFLOP/s with sparsity; FP32 67.
    "h200": {"bfloat16": 1979e12 / 2, "tfloat32": 989e12 / 2, "float32": 67e12},
}

# `device.device_kind` (lower-cased) -> key of DATASHEET_PEAK_FLOPS; the first match wins. JAX names
# TPU v5e "TPU v5 lite", v6e "TPU v6 lite" and v5p "TPU v5" (newer runtimes: "TPU v5p"). NVL variants
# of H100/H200 have lower clocks and no entry.
_DEVICE_KIND_TO_CHIP: tuple[tuple[str, str], ...] = (
    (r"^tpu v6 ?(lite|e)\b", "tpu_v6e"),
    (r"^tpu v5 ?(lite|e)\b", "tpu_v5e"),
    (r"^tpu v5p?$", "tpu_v5p"),
    (r"^tpu v4$", "tpu_v4"),
    (r"\bh200\b(?!.*\bnvl\b)", "h200"),
    (r"\bh100\b.*\bpcie\b", "h100_pcie"),
    (r"\bh100\b(?!.*\bnvl\b)", "h100_sxm"),
    (r"\ba100\b", "a100"),
)


def chip_for_device_kind(device_kind: str) -> str | None:
    """The DATASHEET_PEAK_FLOPS key for a `device.device_kind` string ('TPU v5 lite' -> 'tpu_v5e')."""
    kind = " ".join(str(device_kind).lower().replace("-", " ").split())
    for pattern, chip in _DEVICE_KIND_TO_CHIP:
        if re.search(pattern, kind):
            return chip
    return None


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype.lower()
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "f32": "float32",
                "tf32": "tfloat32"}.get(name, name)
    return np.dtype(dtype).name


def device_kind_peak(device: Any, dtype: Any = "bfloat16", matmul_precision: str = "default") -> float | None:
    """Datasheet dense peak FLOP/s of one device for matmuls in `dtype`, or None if not tabulated.

    Args:
      device: a `jax.Device` (anything with a `device_kind` string).
      dtype: the matmul input dtype: bfloat16 / float16, float32, or 'tfloat32'.
      matmul_precision: JAX's matmul precision for float32 inputs. 'default' is what XLA does without
        a precision setting: one bf16 MXU pass on TPU (bf16 peak) and TF32 tensor cores on
        A100/H100/H200 (TF32 peak). 'highest' asks for IEEE float32: the CUDA-core FP32 peak on
        NVIDIA, None on TPU (a multi-pass emulation with no datasheet figure).

    Returns:
      FLOP/s per device, or None (unknown chip, CPU, or no figure for that dtype).
    """
    chip = chip_for_device_kind(getattr(device, "device_kind", ""))
    if chip is None:
        return None
    table = DATASHEET_PEAK_FLOPS[chip]
    name = _dtype_name(dtype)
    if name in ("bfloat16", "float16"):
        return table["bfloat16"]
    if name == "tfloat32":
        return table.get("tfloat32")
    if name == "float32":
        if matmul_precision == "default":
            return table.get("tfloat32", table["bfloat16"])
        if matmul_precision == "highest":
            return table.get("float32")
        raise ValueError(f"device_kind_peak: matmul_precision must be 'default' or 'highest', got {matmul_precision!r}")
    return None


def _default_matmul_size(platform: str) -> tuple[int, int]:
    """(matrix side, matmuls per call): about a second in all on 2 CPU cores; large on accelerators."""
    if platform == "cpu":
        return 1024, 2
    return 8192, 16


def measure_peak_flops(dtype: Any = "float32", size: int | None = None, repeats: int = 5, *, inner: int | None = None,
                       device: Any = None) -> float:
    """Measures the dense matmul FLOP/s one device reaches: the best of `repeats` timed calls.

    One jitted call multiplies a [size, size] matrix `inner` times in a loop carried through the
    result (so nothing can be folded away), 2·size³·inner FLOPs per call. A first call (compilation and
    warm-up) is not timed; every timed call blocks until its result is ready.

    Args:
      dtype: the matrices' dtype (matmuls run at JAX's default precision).
      size: matrix side; default 1024 on CPU, 8192 on accelerators.
      repeats: timed calls; the fastest one gives the result.
      inner: matmuls per call; default 2 on CPU, 16 on accelerators.
      device: the device to measure (default: the first local device).

    Returns:
      FLOP/s (positive, finite).
    """
    import jax
    import jax.numpy as jnp

    device = device if device is not None else jax.local_devices()[0]
    default_size, default_inner = _default_matmul_size(device.platform)
    size = default_size if size is None else int(size)
    inner = default_inner if inner is None else int(inner)
    if size <= 0 or inner <= 0 or repeats <= 0:
        raise ValueError(f"measure_peak_flops: size, inner and repeats must be positive, got {size}, {inner}, {repeats}")

    key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
    # w's entries ~ N(0, 1/size) keep the carried product's scale about constant (no overflow, no denormals).
    x = jax.device_put(jax.random.normal(key_x, (size, size), jnp.float32).astype(dtype), device)
    w = jax.device_put((jax.random.normal(key_w, (size, size), jnp.float32) / math.sqrt(size)).astype(dtype), device)

    @jax.jit
    def chained_matmuls(x, w):
        return jax.lax.fori_loop(0, inner, lambda _, carry: jnp.einsum("ij,jk->ik", carry, w), x)

    chained_matmuls(x, w).block_until_ready()  # compile + warm-up, not timed
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        chained_matmuls(x, w).block_until_ready()
        best = min(best, time.perf_counter() - start)
    best = max(best, 1e-9)
    return 2.0 * size**3 * inner / best


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs XLA's cost model counts for one call of a compiled executable, or None when absent.

    Accepts `jax.jit(f).lower(...).compile()` (anything with `cost_analysis()`). The cost analysis is
    a dict in recent JAX and a list with one dict per module in older versions; both are handled.

    For an SPMD-partitioned program (sharded over N devices) XLA reports the FLOPs of ONE partition:
    multiply by N for the step's total (`throughput` takes the total).
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends / executables have no cost model
        return None
    if analysis is None:
        return None
    if isinstance(analysis, Mapping):
        analysis = [analysis]
    total, found = 0.0, False
    for entry in analysis:
        if isinstance(entry, Mapping) and entry.get("flops") is not None:
            value = float(entry["flops"])
            if math.isfinite(value) and value >= 0:
                total += value
                found = True
    return total if found else None


def throughput(step_seconds: float, *, text_tokens: float | None = None, frames: float | None = None,
               flops_per_step: float | None = None, num_devices: int = 1,
               peak_flops_per_device: float | None = None) -> dict[str, float | None]:
    """Rates of one training (or inference) step.

    Args:
      step_seconds: wall-clock seconds of one step (positive).
      text_tokens: text tokens per step, all devices together (e.g. the sum of `text_weights`).
      frames: spectrogram frames per step, all devices together (e.g. the sum of `cont_mask`).
      flops_per_step: model FLOPs of one step, all devices together (for an SPMD program,
        `compiled_flops(compiled) * num_devices`).
      num_devices: devices the step runs on.
      peak_flops_per_device: peak FLOP/s of one device (`device_kind_peak` or `measure_peak_flops`).

    Returns:
      {'steps_per_sec', 'text_tokens_per_sec', 'frames_per_sec', 'tflops_per_device', 'mfu'}: mfu is a
      fraction (0.013 = 1.3 %); a value is None when what it needs is None.
    """
    step_seconds = float(step_seconds)
    if not (math.isfinite(step_seconds) and step_seconds > 0):
        raise ValueError(f"throughput: step_seconds must be positive and finite, got {step_seconds}")
    if num_devices < 1:
        raise ValueError(f"throughput: num_devices must be at least 1, got {num_devices}")

    def per_second(count):
        return None if count is None else float(count) / step_seconds

    flops_per_device_per_sec = None
    if flops_per_step is not None:
        flops_per_device_per_sec = float(flops_per_step) / num_devices / step_seconds
    mfu = None
    if flops_per_device_per_sec is not None and peak_flops_per_device:
        mfu = flops_per_device_per_sec / float(peak_flops_per_device)
    return {
        "steps_per_sec": 1.0 / step_seconds,
        "text_tokens_per_sec": per_second(text_tokens),
        "frames_per_sec": per_second(frames),
        "tflops_per_device": None if flops_per_device_per_sec is None else flops_per_device_per_sec / 1e12,
        "mfu": mfu,
    }


# --------------------------------------------------------------------------------------------------
# Spectrogram images.

# A perceptually ordered ramp (dark blue-violet -> blue -> teal -> green -> yellow, the viridis family
# of hues) given by five anchor colours, linearly interpolated. Luminance rises strictly from anchor to
# anchor, so darker always means lower energy.
_COLORMAP_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_SEPARATOR_RGB = (255, 255, 255)  # row between target and prediction
_PAD_RGB = (0, 0, 0)  # area right of the shorter spectrogram (not a colormap colour)


def colormap(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] (clipped) to colours: [...] -> [..., 3] uint8."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    position = values * (len(_COLORMAP_ANCHORS) - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), len(_COLORMAP_ANCHORS) - 2)
    fraction = (position - lower)[..., None]
    rgb = _COLORMAP_ANCHORS[lower] * (1.0 - fraction) + _COLORMAP_ANCHORS[lower + 1] * fraction
    return np.round(rgb).astype(np.uint8)


def spectrogram_image(target: np.ndarray, prediction: np.ndarray | None = None) -> np.ndarray:
    """Renders log-mel spectrograms as an RGB image, low frequencies at the bottom.

    Args:
      target: [frames, mel] log-mel.
      prediction: optional [frames', mel] log-mel, drawn below the target after one white separator row,
        on the same colour scale (min..max over both). The narrower panel is padded with black.

    Returns:
      [mel, frames, 3] uint8 for a target alone; [2 * mel + 1, max(frames, frames'), 3] with a prediction.
    """
    panels = [np.asarray(target, dtype=np.float64)]
    if prediction is not None:
        panels.append(np.asarray(prediction, dtype=np.float64))
    for name, panel in zip(("target", "prediction"), panels):
        if panel.ndim != 2 or panel.shape[0] == 0 or panel.shape[1] == 0:
            raise ValueError(f"spectrogram_image: {name} must be a non-empty [frames, mel] array, got {panel.shape}")
    if len(panels) == 2 and panels[0].shape[1] != panels[1].shape[1]:
        raise ValueError(f"spectrogram_image: target {panels[0].shape} and prediction {panels[1].shape} differ in mel bins")

    finite = np.concatenate([p[np.isfinite(p)] for p in panels])
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = high - low if high > low else 1.0
    width = max(p.shape[0] for p in panels)
    rows = []
    for index, panel in enumerate(panels):
        if index:
            rows.append(np.broadcast_to(np.array(_SEPARATOR_RGB, np.uint8), (1, width, 3)))
        scaled = np.nan_to_num((panel - low) / span, nan=0.0, posinf=1.0, neginf=0.0)
        image = colormap(scaled.T[::-1])  # [mel, frames, 3], bin 0 in the last (bottom) row
        if image.shape[1] < width:
            pad = np.broadcast_to(np.array(_PAD_RGB, np.uint8), (image.shape[0], width - image.shape[1], 3))
            image = np.concatenate([image, pad], axis=1)
        rows.append(image)
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


# --------------------------------------------------------------------------------------------------
# TensorBoard event files.

_PLUGIN_SCALARS = "scalars"
_PLUGIN_IMAGES = "images"
_PLUGIN_AUDIO = "audio"
_PLUGIN_TEXT = "text"
# TensorBoard's AudioPluginData proto, serialised by hand: field 2 (encoding, varint) = 11 (WAV).
_AUDIO_PLUGIN_CONTENT = bytes([0x10, 11])


class MetricsWriter:
    """Writes TensorBoard event files under `logdir`.

    Only one process of a multi-host job should write: make the writer with
    `enabled=(jax.process_index() == 0)`; a disabled writer creates no files and every call is a no-op.
    Usable as a context manager (closes on exit).

    A local `logdir` gets one event file, written in place. An object-store `logdir` gets rolling
    pieces (see `spectron_jax.metric_logs`): events go to a local file that a `flush` closes once it
    holds `roll_bytes` or is `roll_seconds` old (and `close` at the end); a closed file is uploaded once,
    from a background thread, through `spectron_jax.filesystem` (TensorFlow's own GCS client is not
    used), and the next event starts a new file, named so that name order is write order (see
    `_piece_name`). `flush` and `close` raise an earlier upload's error.

    Args:
      logdir: the folder of the event files.
      enabled: False makes every call a no-op.
      roll_bytes, roll_seconds: when an object store's event file is closed and uploaded.
      clock: monotonic seconds (for tests).
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True,
                 roll_bytes: int = metric_logs.DEFAULT_ROLL_BYTES,
                 roll_seconds: float | None = metric_logs.DEFAULT_ROLL_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        from spectron_jax import filesystem

        if roll_bytes <= 0 or (roll_seconds is not None and roll_seconds <= 0):
            raise ValueError(f"MetricsWriter: roll_bytes and roll_seconds must be positive, got {roll_bytes}, {roll_seconds}")
        self.logdir = os.fspath(logdir)
        self.enabled = bool(enabled)
        self.roll_bytes, self.roll_seconds = int(roll_bytes), roll_seconds
        self._clock = clock
        self._tf = None
        self._writer = None  # the open event file's writer (object store: made at its first event)
        self._opened = 0.0
        self._staging = None  # object store: a local folder; each event file in a subfolder of its own
        self._piece_dir, self._pieces, self._piece_started = None, 0, 0.0
        self.uploader = metric_logs.Uploader(f"TensorBoard events under {self.logdir}")
        if self.enabled:
            filesystem.makedirs(self.logdir)
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            self._tf = tf
            self._summary_pb2 = summary_pb2
            if filesystem.is_remote(self.logdir):
                import tempfile

                self._staging = tempfile.mkdtemp(prefix="spectron-events-")
                atexit.register(self._close_at_exit)  # uploads the open file when `close` was never reached
            else:
                self._writer = tf.summary.create_file_writer(self.logdir)

    def _metadata(self, plugin: str, data_class: str, content: bytes = b""):
        pb = self._summary_pb2
        metadata = pb.SummaryMetadata(data_class=pb.DataClass.Value(data_class))
        metadata.plugin_data.plugin_name = plugin
        metadata.plugin_data.content = content
        return metadata

    def _write(self, step: int, tag: str, tensor: Any, metadata: Any) -> None:
        if self._writer is None:  # an object store's next event file, in a folder of its own
            self._pieces += 1
            self._piece_dir = os.path.join(self._staging, f"{self._pieces:06d}")
            self._writer = self._tf.summary.create_file_writer(self._piece_dir)
            self._opened, self._piece_started = self._clock(), time.time()
        with self._writer.as_default():
            self._tf.summary.write(tag=tag, tensor=tensor, step=int(step), metadata=metadata)

    def scalars(self, step: int, mapping: Mapping[str, Any]) -> None:
        """Writes each scalar of `mapping` (Python / NumPy / JAX numbers) under its key; None is skipped."""
        if not self.enabled:
            return
        metadata = self._metadata(_PLUGIN_SCALARS, "DATA_CLASS_SCALAR")
        for name, value in mapping.items():
            if value is None:
                continue
            array = np.asarray(value)
            if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
                raise ValueError(f"MetricsWriter.scalars: {name!r} is not a scalar number (shape {array.shape}, {array.dtype})")
            self._write(step, name, self._tf.constant(float(array.reshape(())), self._tf.float32), metadata)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """Writes one [height, width, 3] uint8 RGB image (PNG-encoded)."""
        if not self.enabled:
            return
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(f"MetricsWriter.image: {name!r} must be a [height, width, 3] uint8 image, got {image.shape} {image.dtype}")
        tf = self._tf
        png = tf.io.encode_png(image)
        height, width = image.shape[:2]
        tensor = tf.stack([tf.constant(str(width)), tf.constant(str(height)), png])  # TensorBoard: w, h, images...
        self._write(step, name, tensor, self._metadata(_PLUGIN_IMAGES, "DATA_CLASS_BLOB_SEQUENCE"))

    def audio(self, step: int, name: str, wave: np.ndarray, sample_rate: int) -> None:
        """Writes one mono clip: [samples] float in [-1, 1] (clipped), stored as 16-bit WAV."""
        if not self.enabled:
            return
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"MetricsWriter.audio: {name!r} must be a non-empty [samples] wave, got shape {wave.shape}")
        if int(sample_rate) <= 0:
            raise ValueError(f"MetricsWriter.audio: {name!r} sample_rate must be positive, got {sample_rate}")
        tf = self._tf
        wave = np.clip(np.nan_to_num(wave, nan=0.0), -1.0, 1.0)
        encoded = tf.audio.encode_wav(wave[:, None], sample_rate=int(sample_rate))
        tensor = tf.reshape(tf.stack([encoded, tf.constant("")]), [1, 2])  # [clips, (audio, label)]
        self._write(step, name, tensor, self._metadata(_PLUGIN_AUDIO, "DATA_CLASS_BLOB_SEQUENCE", _AUDIO_PLUGIN_CONTENT))

    def text(self, step: int, name: str, text: str) -> None:
        """Writes a string (TensorBoard renders it as Markdown)."""
        if not self.enabled:
            return
        self._write(step, name, self._tf.constant(str(text)), self._metadata(_PLUGIN_TEXT, "DATA_CLASS_TENSOR"))

    def flush(self) -> None:
        """Writes buffered events; on an object store, closes and uploads the event file when it is due."""
        if not self.enabled:
            return
        if self._writer is not None:
            self._writer.flush()
            if self._staging is not None and self._due():
                self._roll()
        self.uploader.check()

    def _due(self) -> bool:
        if self.roll_seconds is not None and self._clock() - self._opened >= self.roll_seconds:
            return True
        return sum(os.path.getsize(os.path.join(self._piece_dir, n)) for n in os.listdir(self._piece_dir)) >= self.roll_bytes

    def _roll(self) -> None:
        """Closes the open (object-store) event file and queues its upload; the next event opens another."""
        from spectron_jax import filesystem

        self._writer.close()
        self._writer = None
        folder = self._piece_dir
        for i, name in enumerate(sorted(os.listdir(folder))):  # one file (TensorFlow makes one per writer)
            local, remote = os.path.join(folder, name), filesystem.join(self.logdir, self._piece_name(i))

            def upload(local=local, remote=remote):
                filesystem.copy(local, remote)
                os.remove(local)

            self.uploader.submit(name, upload)

    def _piece_name(self, i: int) -> str:
        """The uploaded name of the open piece's file: TensorFlow's form, 'events.out.tfevents.' + the
        start time in seconds + host + pid + the piece number zero-padded, so that name order is write
        order (TensorBoard reads a folder's event files in name order; TensorFlow's own names end in
        an unpadded counter, '...10' before '...2')."""
        return (f"events.out.tfevents.{int(self._piece_started):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{self._pieces:06d}{f'-{i}' if i else ''}.v2")

    def close(self) -> None:
        """Writes and (object store) uploads every event, waits for the uploads, raises an upload error."""
        if not self.enabled:
            return
        self.enabled = False
        if self._writer is not None:
            self._writer.flush()
            if self._staging is not None:
                self._roll()
            else:
                self._writer.close()
                self._writer = None
        atexit.unregister(self._close_at_exit)
        try:
            self.uploader.close()
        finally:
            if self._staging is not None:  # an uploaded file is removed; a failed upload's file stays
                for name in os.listdir(self._staging):
                    if not os.listdir(os.path.join(self._staging, name)):
                        os.rmdir(os.path.join(self._staging, name))
                if os.listdir(self._staging):
                    print(f"MetricsWriter: event files not uploaded to {self.logdir} are kept in {self._staging}",
                          file=sys.stderr, flush=True)
                else:
                    os.rmdir(self._staging)

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except metric_logs.UploadError:
            pass  # printed when it happened

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# The stdout progress line.

def _fixed(digits: int) -> Callable[[float], str]:
    return lambda value: f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f}%"


# (label, metric keys tried in order, formatter, suffix placement): 'loss 3.412', '4.2 steps/s'.
DEFAULT_PROGRESS_FIELDS: tuple[tuple[str, tuple[str, ...], Callable[[float], str], bool], ...] = (
    ("loss", ("loss",), _fixed(3), False),
    ("ce", ("ce", "ce_text"), _fixed(2), False),
    ("spec", ("spec", "spec_total"), _fixed(2), False),
    ("steps/s", ("steps_per_sec",), _fixed(1), True),
    ("mfu", ("mfu",), _percent, False),
)


class ProgressLog:
    """Formats (and prints) the one-line progress log of a run.

    `ProgressLog(2000).format(120, metrics)` ->
    'step 120/2000 | loss 3.412 | ce 2.10 | spec 1.31 | 4.2 steps/s | mfu 1.3%'.
    Fields whose metric is missing or None are left out; non-finite values print as 'nan' / 'inf'.

    Args:
      total_steps: the run's last step (None: 'step 120').
      fields: (label, keys, formatter, label_after_value) entries; the first key present is shown.
    """

    def __init__(self, total_steps: int | None = None,
                 fields: Sequence[tuple[str, Sequence[str], Callable[[float], str], bool]] = DEFAULT_PROGRESS_FIELDS):
        self.total_steps = total_steps
        self.fields = tuple(fields)

    def format(self, step: int, metrics: Mapping[str, Any]) -> str:
        parts = [f"step {int(step)}" + (f"/{int(self.total_steps)}" if self.total_steps is not None else "")]
        for label, keys, formatter, label_after in self.fields:
            key = next((k for k in keys if metrics.get(k) is not None), None)
            if key is None:
                continue
            value = float(np.asarray(metrics[key]).reshape(()))
            shown = formatter(value) if math.isfinite(value) else str(value)
            parts.append(f"{shown} {label}" if label_after else f"{label} {shown}")
        return " | ".join(parts)

    __call__ = format

    def log(self, step: int, metrics: Mapping[str, Any], file: TextIO | None = None) -> str:
        """Prints the line (stdout by default, flushed) and returns it."""
        line = self.format(step, metrics)
        print(line, file=file if file is not None else sys.stdout, flush=True)
        return line


__all__ = [
    "DATASHEET_PEAK_FLOPS",
    "DEFAULT_PROGRESS_FIELDS",
    "MetricsWriter",
    "ProgressLog",
    "chip_for_device_kind",
    "colormap",
    "compiled_flops",
    "device_kind_peak",
    "measure_peak_flops",
    "spectrogram_image",
    "throughput",
]
