"""`benchmark`: training throughput, MFU, decoding real-time factor and data-side speed on this machine.

    python -m spectron_jax.benchmark --gin_file=gin/models/tiny.gin [--json] [--steps=N] [--gin.NAME=VALUE ...]

One run on whatever devices JAX finds, in four parts:

  peak     the dense-matmul FLOP/s one device reaches in the compute dtype (`metrics.measure_peak_flops`),
           and the datasheet peak when the chip is tabulated (`metrics.device_kind_peak`; null on CPUs).
  train    the real train step (`aot.build_train_program`: the step `train` compiles, sharded over all
           devices) on a synthetic batch whose masks and weights are all valid: median step time over
           `--steps` timed steps after `--warmup` untimed ones, text tokens/s and frames/s, model FLOPs
           per step (XLA's cost analysis, summed over devices) and MFU against both peaks, and beside them
           the analytic FLOPs of the step and its MFU (`flops.step_flops`: the useful work; README "MFU").
  decode   `decoding.generate` on a random-init model rebuilt for r = 1 and r = 4 (or
           `--decode_reduction_factors`), at `--decode_batch` and
           `--decode_large_batch` rows: every row gets a `--decode_frames` budget (the stop head is
           disabled) and at most `--decode_text_tokens` greedy tokens; the Griffin-Lim vocoder runs on
           every row (on the device, one call per batch). times_real_time = generated audio seconds (all
           rows) / end-to-end wall seconds (encode + prefill + text + speech + vocoder); above 1 is faster
           than real time (`real_time_factor`: the same figure, its old name). latency_rtf = wall seconds
           / audio seconds of one row (the usual RTF; below 1 is faster than real time); vocoder_share. `parts` times
           each part as its own jitted call, back to back (their sum is at most `parts_total_seconds`);
           text tokens/s; the speech / text step time against its memory-bandwidth floor (weight bytes
           outside the encoder + allocated KV-cache bytes) / datasheet bandwidth (null where unknown).
  data     featurisation speed (x real time per CPU core) and TFRecord read examples/s
           (`data.benchmark_data` on the embedded corpus or `--data_dir`).

Compute dtype: `auto` (default) is float32 on CPU and bfloat16 (steps and modules) on accelerators.
Timings block on the results (`block_until_ready`); compilation is never in them, but reported apart:
`compile_seconds` of decode is the trace + lowering + compile time of its first (untimed) call. `--json` prints one
JSON object with every field (null where a figure does not exist, e.g. the datasheet peak of a CPU);
otherwise a table. Parameters are random: speed does not depend on their values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

from spectron_jax import cli

FRAMES_PER_SECOND = 80.0  # the feature contract: hop 200 at 16 kHz
COMPUTE_DTYPES = ("auto", "bfloat16", "float32", "config")


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(median, min) wall seconds of `fn()` over `repeats` calls; `fn` must block on its result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def synthetic_batch(batch_spec: dict, vocab_size: int, seed: int = 0) -> dict:
    """A host batch of the model-batch contract with every frame and token valid.

    Args:
      batch_spec: {key: (shape, dtype)} from `SpectronFeatureConverter.batch_spec`.
      vocab_size: token ids are drawn from [4, vocab_size) (above the special ids).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    batch = {}
    for key, (shape, dtype) in batch_spec.items():
        if key in ("prompt_frames", "cont_frames"):
            value = rng.normal(-4.0, 2.0, shape)
        elif key in ("prompt_mask", "cont_mask"):
            value = np.ones(shape)
        elif key == "text_inputs":
            value = rng.integers(4, max(vocab_size, 5), shape)
            value[:, 0] = 3  # sos
        elif key == "text_targets":
            value = rng.integers(4, max(vocab_size, 5), shape)
            value[:, -1] = 1  # eos
        elif key == "text_weights":
            value = np.ones(shape)
        elif key == "text_segments":
            value = np.ones(shape)
            value[:, shape[1] // 2:] = 2
        else:
            raise ValueError(f"synthetic_batch: unknown batch key {key!r}")
        batch[key] = value.astype(dtype)
    return batch


# ---- (a) + (b): peak and the train step ------------------------------------------------------------
def benchmark_train(configs: Any, steps: int, warmup: int, seed: int = 0) -> dict:
    """Times the train step of `configs` (an `aot.RunConfigs`) on all local devices."""
    import jax
    import numpy as np

    from spectron_jax import aot, flops as flops_lib, metrics, partitioning

    devices = jax.devices()
    program = aot.program_for_devices(configs, devices)
    host = synthetic_batch(configs.converter.batch_spec(configs.train.batch_size), configs.model.decoder.vocab_size,
                           seed)
    batch = partitioning.global_batch_from_host(host, program.mesh, program.rules)
    state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
    start = time.perf_counter()
    compiled = aot.compile_program(program)
    compile_seconds = time.perf_counter() - start
    for _ in range(warmup):
        state, step_metrics = compiled(state, batch)
        jax.block_until_ready(step_metrics)

    last: dict = {}

    def one_step():
        nonlocal state
        state, step_metrics = compiled(state, batch)
        last["metrics"] = jax.block_until_ready(step_metrics)
        jax.block_until_ready(state)

    median, fastest = _median_seconds(one_step, steps)
    flops = metrics.compiled_flops(compiled)
    flops_per_step = None if flops is None else flops * len(devices)
    text_tokens = float(np.sum(host["text_weights"]))
    frames = float(np.sum(host["cont_mask"]))
    peak_measured = metrics.measure_peak_flops(program.compute_dtype)
    peak_datasheet = metrics.device_kind_peak(devices[0], program.compute_dtype)
    rates = metrics.throughput(median, text_tokens=text_tokens, frames=frames, flops_per_step=flops_per_step,
                               num_devices=len(devices), peak_flops_per_device=peak_measured)
    mfu_datasheet = None
    if flops_per_step is not None and peak_datasheet:
        mfu_datasheet = flops_per_step / (median * len(devices) * peak_datasheet)
    # The useful work of the step (`flops.step_flops`; every slot of the synthetic batch is valid).
    analytic = flops_lib.step_flops_for_converter(configs.model, configs.converter, configs.train.batch_size,
                                                  configs.train.optimizer.freeze).total
    analytic_datasheet = flops_lib.mfu(analytic, median, len(devices), peak_datasheet) if peak_datasheet else None
    peak = {"compute_dtype": str(np.dtype(program.compute_dtype)),
            "measured_flops_per_sec_per_device": peak_measured,
            "datasheet_flops_per_sec_per_device": peak_datasheet}
    train = {
        "num_params": program.num_params, "batch_size": configs.train.batch_size,
        "mesh": {k: int(v) for k, v in program.mesh.shape.items()},
        "compile_seconds": compile_seconds, "steps": steps, "warmup_steps": warmup,
        "step_seconds_median": median, "step_seconds_min": fastest,
        "text_tokens_per_step": text_tokens, "frames_per_step": frames,
        "text_tokens_per_sec": rates["text_tokens_per_sec"], "frames_per_sec": rates["frames_per_sec"],
        "flops_per_step": flops_per_step, "tflops_per_sec_per_device": rates["tflops_per_device"],
        "mfu_measured_peak": rates["mfu"], "mfu_datasheet_peak": mfu_datasheet,
        "analytic_flops_per_step": analytic,
        "analytic_mfu_measured_peak": flops_lib.mfu(analytic, median, len(devices), peak_measured),
        "analytic_mfu_datasheet_peak": analytic_datasheet,
        "loss": float(np.asarray(jax.device_get(last["metrics"]["loss"]))),
    }
    return {"peak": peak, "train": train}


# ---- (c) decoding -----------------------------------------------------------------------------------
# Vendors' peak memory bandwidth per chip in bytes/s (the decode step's floor), keyed like
# `metrics.DATASHEET_PEAK_FLOPS`. NVIDIA H100 / H200 datasheets (H100 SXM 3.35 TB/s, PCIe 2 TB/s; H200
# SXM 4.8 TB/s); Google Cloud TPU system-architecture pages (v4 1,228 GB/s, v5e 819 GB/s, v5p 2,765 GB/s,
# v6e 1,640 GB/s per chip). CPUs and untabulated chips: unknown (null).
DATASHEET_BANDWIDTH: dict[str, float] = {
    "h100_sxm": 3.35e12, "h100_pcie": 2.0e12, "h200": 4.8e12,
    "tpu_v4": 1.228e12, "tpu_v5e": 0.819e12, "tpu_v5p": 2.765e12, "tpu_v6e": 1.64e12,
}
DECODE_PARTS = ("encode", "prefill", "text", "speech", "vocoder")


def device_bandwidth(device: Any) -> Optional[float]:
    """Datasheet memory bandwidth (bytes/s) of a `jax.Device`, or None when not tabulated (e.g. CPUs)."""
    from spectron_jax import metrics

    chip = metrics.chip_for_device_kind(getattr(device, "device_kind", ""))
    return DATASHEET_BANDWIDTH.get(chip) if chip else None


def _nbytes(tree: Any) -> int:
    import jax

    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def benchmark_decode(model_config: Any, reduction_factor: int, frames: int, batch: int, prompt_len: int,
                     repeats: int, text_tokens: int = 32, seed: int = 0, vocoder: Any = None) -> dict:
    """End-to-end generation speed of `decoding.generate` (+ the vocoder) and its split into parts.

    Args:
      model_config: SpectronConfig; its reduction factor is replaced by `reduction_factor` (the model is
        rebuilt and randomly initialised: speed does not depend on parameter values).
      frames: the frame budget of every row (`DecodeConfig.max_frames = min_frames`; the stop head is
        disabled so every row generates ceil(frames / r) * r frames).
      batch: rows decoded together.
      prompt_len: prompt frames per row (all valid).
      repeats: timed runs after one untimed compile + warm-up run; medians are reported.
      text_tokens: `DecodeConfig.max_text_tokens` (greedy; a row may sample eos earlier).
      vocoder: a `vocoder.Vocoder` (default: Griffin-Lim on the device, `device_vocoder`) run on the padded
        batch through `vocoder.synthesize_batch` (a vocoder with `batch` gets the whole buffer at once).

    Returns a dict of the configuration, `end_to_end_seconds` (the one jitted `generate` call + vocoder),
    `compile_seconds` (tracing + lowering + compiling during the untimed first call, `first_call_seconds`),
    `times_real_time` (generated audio s of all rows / end-to-end wall s; `real_time_factor` is the same
    figure under its old name), `latency_rtf` (end-to-end wall s / audio s of one row: the usual real-time
    factor a caller of this batch waits, below 1 is faster than real time), `vocoder_share` (the
    vocoder's part of `parts_total_seconds`),
    `parts` (encode, prefill, text, speech, vocoder: each its own jitted call on the outputs of the
    previous, timed back to back in one run; `parts_total_seconds` is that run's wall time, so the parts
    add up to no more than it), text tokens/s, and the speech / text step time against the
    memory-bandwidth floor (step weight bytes + allocated KV-cache bytes) / device bandwidth.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from spectron_jax import decoding
    from spectron_jax import vocoder as vocoders
    from spectron_jax.models.spectron_model import SpectronModel

    config = dataclasses.replace(model_config, acoustic=dataclasses.replace(model_config.acoustic,
                                                                            reduction_factor=reduction_factor))
    model = SpectronModel(config)
    params, state = jax.jit(lambda: model.init(seed))()
    state = state if jax.tree.leaves(state) else None
    from spectron_jax import device_vocoder

    vocoder = vocoder or device_vocoder.DeviceGriffinLimVocoder()
    r, mel = reduction_factor, config.acoustic.num_mel
    # stop_threshold 1: sigmoid never exceeds it, so a random stop head cannot end rows early.
    dcfg = decoding.DecodeConfig(max_text_tokens=text_tokens, max_frames=frames, min_frames=frames,
                                 stop_threshold=1.0, seed=seed)
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.normal(-4.0, 2.0, (batch, prompt_len, config.prompt_dim)), jnp.float32)
    prompt_mask = jnp.ones((batch, prompt_len), jnp.int32)
    keys = decoding.row_keys(seed, jnp.arange(batch))  # the per-row keys `generate` derives

    def vocode(frames_out, num_frames):
        frames_out, num_frames = np.asarray(frames_out), np.asarray(num_frames)
        return vocoders.synthesize_batch(vocoder, frames_out, np.maximum(num_frames, 2))

    def end_to_end():
        out = jax.block_until_ready(decoding.generate(model, params, prompt, prompt_mask, dcfg, state=state))
        vocode(out["frames"], out["num_frames"])
        return out

    from spectron_jax import compile_time

    first = time.perf_counter()
    with compile_time.CompileTimer() as compiling:
        out = end_to_end()  # compile + warm-up
    first_call_seconds = time.perf_counter() - first
    e2e_seconds, _ = _median_seconds(end_to_end, repeats)
    text_steps = int(np.max(np.asarray(out["text_lengths"]) + np.asarray(out["text_ended"])))
    speech_steps = int(np.max(np.asarray(out["num_frames"]))) // r
    generated = int(np.sum(np.asarray(out["num_frames"])))
    audio_seconds = generated / FRAMES_PER_SECOND  # summed over rows

    # The same work as `generate`, one jitted call per part (greedy text for `text_steps` steps).
    max_len = decoding.cache_len(config.prefix_len(prompt_len), dcfg, r)
    encode = jax.jit(lambda p, s, x, m: model.encode_prompt(p, x, m, s))

    @jax.jit
    def prefill(p, prefix, prefix_valid):
        cache = model.init_cache(batch, max_len)
        sos = jnp.full((batch, 1), config.sos_id, jnp.int32)
        logits, cache = model.prefill(p, prefix, prefix_valid, sos, jnp.ones((batch, 1), bool), cache)
        return logits[:, 0], cache

    @jax.jit
    def text(p, logits, cache):
        def body(carry, _):
            logits, cache = carry
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logits, cache = model.text_step(p, token, cache)
            return (logits, cache), token

        (_, cache), tokens = jax.lax.scan(body, (logits, cache), None, length=text_steps)
        return tokens, cache  # [text_steps, batch]

    @jax.jit
    def speech(p, cache, keys):
        def body(carry, step):
            previous, cache = carry
            group, _, cache = model.speech_step(p, previous, cache, start=step == 0,
                                                rng=decoding.step_keys(keys, 1, step))
            return (group.astype(previous.dtype), cache), group

        start = (jnp.zeros((batch, r, mel), jnp.float32), cache)
        _, groups = jax.lax.scan(body, start, jnp.arange(speech_steps))
        return jnp.swapaxes(groups, 0, 1).reshape(batch, speech_steps * r, mel)

    lengths = jnp.full((batch,), speech_steps * r, jnp.int32)

    def parts_run() -> dict:
        times, t = {}, time.perf_counter()
        prefix, prefix_valid = jax.block_until_ready(encode(params, state, prompt, prompt_mask))
        times["encode"], t = time.perf_counter() - t, time.perf_counter()
        logits, cache = jax.block_until_ready(prefill(params, prefix, prefix_valid))
        times["prefill"], t = time.perf_counter() - t, time.perf_counter()
        _, cache = jax.block_until_ready(text(params, logits, cache))
        times["text"], t = time.perf_counter() - t, time.perf_counter()
        groups = jax.block_until_ready(speech(params, cache, keys))
        times["speech"], t = time.perf_counter() - t, time.perf_counter()
        vocode(groups, lengths)
        times["vocoder"] = time.perf_counter() - t
        return times

    parts_run()  # compile + warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        times = parts_run()
        runs.append((time.perf_counter() - start, times))
    runs.sort(key=lambda run: run[0])
    parts_total, parts = runs[(len(runs) - 1) // 2]  # the median run, with its own parts

    weight_bytes = _nbytes({k: v for k, v in params.items() if k != "encoder"})  # what a decode step reads
    cache_bytes = _nbytes(model.init_cache(batch, max_len))
    bandwidth = device_bandwidth(jax.devices()[0])
    floor = None if bandwidth is None else (weight_bytes + cache_bytes) / bandwidth
    speech_step_seconds = parts["speech"] / speech_steps
    text_step_seconds = parts["text"] / text_steps
    return {
        "reduction_factor": r, "batch": batch, "prompt_frames": prompt_len, "max_text_tokens": text_tokens,
        "text_steps": text_steps, "speech_steps": speech_steps, "frames_per_row": speech_steps * r,
        "frames": generated, "audio_seconds": audio_seconds,
        "end_to_end_seconds": e2e_seconds, "real_time_factor": audio_seconds / e2e_seconds,
        "times_real_time": audio_seconds / e2e_seconds,
        "latency_rtf": e2e_seconds / (audio_seconds / batch),
        "vocoder_share": parts["vocoder"] / parts_total,
        "compile_seconds": compiling.seconds, "first_call_seconds": first_call_seconds,
        "parts": parts, "parts_total_seconds": parts_total,
        "parts_real_time_factor": audio_seconds / parts_total,
        "text_tokens_per_sec": batch * text_steps / parts["text"],
        "frames_per_sec": generated / parts["speech"],
        "weight_bytes": weight_bytes, "kv_cache_bytes": cache_bytes, "bandwidth_bytes_per_sec": bandwidth,
        "step_floor_seconds": floor,
        "speech_step_seconds": speech_step_seconds, "text_step_seconds": text_step_seconds,
        "speech_step_vs_floor": None if floor is None else speech_step_seconds / floor,
        "text_step_vs_floor": None if floor is None else text_step_seconds / floor,
    }


# ---- The report -------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def format_report(result: dict) -> str:
    """The benchmark result as a two-column markdown table."""
    rows = [("device", f"{result['device']['num_devices']} x {result['device']['device_kind']} "
                       f"({result['device']['platform']})"),
            ("config", " + ".join(result["config"]["gin_files"]))]
    peak, train = result["peak"], result["train"]
    rows += [
        ("compute dtype", peak["compute_dtype"]),
        ("peak matmul FLOP/s per device (measured)", _fmt(peak["measured_flops_per_sec_per_device"])),
        ("peak FLOP/s per device (datasheet)", _fmt(peak["datasheet_flops_per_sec_per_device"])),
        ("parameters", f"{train['num_params']:,}"),
        ("global batch / mesh", f"{train['batch_size']} / " + " x ".join(f"{k} {v}" for k, v in train["mesh"].items())),
        ("train step (median s)", _fmt(train["step_seconds_median"])),
        ("text tokens / s", _fmt(train["text_tokens_per_sec"])),
        ("frames / s", _fmt(train["frames_per_sec"])),
        ("model FLOPs per step (XLA / analytic)", f"{_fmt(train['flops_per_step'])} / "
                                                  f"{_fmt(train['analytic_flops_per_step'])}"),
        ("MFU vs measured peak (XLA / analytic)", f"{_fmt(train['mfu_measured_peak'])} / "
                                                  f"{_fmt(train['analytic_mfu_measured_peak'])}"),
        ("MFU vs datasheet peak (XLA / analytic)", f"{_fmt(train['mfu_datasheet_peak'])} / "
                                                   f"{_fmt(train['analytic_mfu_datasheet_peak'])}"),
    ]
    for name, dec in result["decode"].items():
        tag = f"decode {name} ({dec['frames_per_row']} frames x {dec['batch']} rows)"
        rows.append((f"{tag}: x real time (audio s / wall s, all rows)", _fmt(dec["times_real_time"])))
        rows.append((f"{tag}: latency RTF (wall s / audio s of one row)", _fmt(dec["latency_rtf"])))
        rows.append((f"{tag}: vocoder share of end-to-end", _fmt(dec["vocoder_share"])))
        rows.append((f"{tag}: compile s (first call s)",
                     f"{_fmt(dec['compile_seconds'])} ({_fmt(dec['first_call_seconds'])})"))
        rows.append((f"{tag}: parts s (" + " / ".join(DECODE_PARTS) + ")",
                     " / ".join(_fmt(dec["parts"][part]) for part in DECODE_PARTS)))
        rows.append((f"{tag}: text tokens / s", _fmt(dec["text_tokens_per_sec"])))
        rows.append((f"{tag}: speech step s vs bandwidth floor s",
                     f"{_fmt(dec['speech_step_seconds'])} vs {_fmt(dec['step_floor_seconds'])}"
                     + ("" if dec["step_floor_seconds"] is None else f" ({_fmt(dec['speech_step_vs_floor'])}x)")))
    data = result.get("data") or {}
    if "featurise" in data:
        rows.append(("featurisation (x real time per core)", _fmt(data["featurise"]["x_realtime_per_core"])))
        rows.append(("TFRecord read (examples / s)", _fmt(data["tfrecord"]["read_examples_per_s"])))
    elif data.get("error"):
        rows.append(("data", f"skipped: {data['error']}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'measure':<{width}} | value |", f"| {'-' * width} | --- |"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _parser() -> cli.ArgumentParser:
    from spectron_jax import gin_config

    parser = cli.ArgumentParser(prog="spectron_jax.benchmark",
                                description="Train-step throughput and MFU, decoding real-time factor, data speed.")
    gin_config.add_gin_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps after compilation")
    parser.add_argument("--batch_size", type=int, default=None, help="global batch (default: TrainConfig.batch_size)")
    parser.add_argument("--compute_dtype", default="auto", choices=COMPUTE_DTYPES,
                        help="auto: float32 on CPU, bfloat16 on accelerators")
    parser.add_argument("--decode_frames", type=int, default=400, help="frames generated per decoding run (80 / s)")
    parser.add_argument("--decode_batch", type=int, default=1, help="rows decoded together (the small batch)")
    parser.add_argument("--decode_large_batch", type=int, default=8, help="rows decoded together (the large batch)")
    parser.add_argument("--decode_reduction_factors", default="1,4",
                        help="comma-separated reduction factors the decoding model is rebuilt with")
    parser.add_argument("--decode_text_tokens", type=int, default=32, help="most greedy text tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per decoding measurement")
    parser.add_argument("--data_dir", default=None, help="audio for the data benchmark (default: the embedded corpus)")
    parser.add_argument("--data_files", type=int, default=32, help="audio files featurised")
    parser.add_argument("--data_seconds", type=float, default=2.0, help="minimum TFRecord read time")
    parser.add_argument("--skip_data", action="store_true", help="leave out the data benchmark")
    return parser


def _validate(args) -> None:
    if not args.gin_file:
        raise cli.UsageError("--gin_file is required (e.g. --gin_file=gin/models/tiny.gin)")
    for name in ("steps", "decode_frames", "decode_batch", "decode_large_batch", "decode_text_tokens", "repeats",
                 "data_files"):
        if getattr(args, name) < 1:
            raise cli.UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup",):
        if getattr(args, name) < 0:
            raise cli.UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    try:
        factors = [int(r) for r in args.decode_reduction_factors.split(",")]
    except ValueError:
        factors = []
    if not factors or min(factors) < 1:
        raise cli.UsageError(f"--decode_reduction_factors must be comma-separated integers >= 1, got "
                             f"{args.decode_reduction_factors!r}")
    if args.batch_size is not None and args.batch_size < 1:
        raise cli.UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not args.data_seconds > 0:
        raise cli.UsageError(f"--data_seconds must be > 0, got {args.data_seconds}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise cli.InputError(f"--data_dir={args.data_dir}: not a directory")


def run(args) -> dict:
    """The whole benchmark for parsed flags; returns the JSON-able result."""
    import jax

    from spectron_jax import aot

    device = jax.devices()[0]
    dtype = args.compute_dtype
    if dtype == "auto":
        from spectron_jax import trainer

        dtype = trainer.resolve_compute_dtype("auto", device.platform).name
    configs = aot.configs_from_gin(args.gin_file, args.gin_bindings, args.gin_search_paths, args.batch_size, dtype,
                                   platform=device.platform)
    result = {
        "device": {"platform": device.platform, "device_kind": str(device.device_kind),
                   "num_devices": jax.device_count()},
        "config": {"gin_files": list(args.gin_file), "prompt_len": configs.converter.prompt_len,
                   "text_len": configs.converter.text_len, "cont_len": configs.converter.cont_len,
                   "reduction_factor": configs.model.reduction_factor},
    }
    sections = {}
    start = time.perf_counter()
    result.update(benchmark_train(configs, args.steps, args.warmup))
    sections["train"] = time.perf_counter() - start
    decode = {}
    for r in sorted({int(r) for r in args.decode_reduction_factors.split(",")}):
        for batch in sorted({args.decode_batch, args.decode_large_batch}):
            start = time.perf_counter()
            decode[f"r{r}_b{batch}"] = benchmark_decode(configs.model, r, args.decode_frames, batch,
                                                        configs.converter.prompt_len, args.repeats,
                                                        text_tokens=args.decode_text_tokens)
            sections[f"decode_r{r}_b{batch}"] = time.perf_counter() - start
    result["decode"] = decode
    start = time.perf_counter()
    if args.skip_data:
        result["data"] = {"error": "--skip_data"}
    else:
        from spectron_jax.data import benchmark_data

        try:
            result["data"] = benchmark_data.benchmark_data(args.data_dir, args.data_files,
                                                           min_read_seconds=args.data_seconds)
        except FileNotFoundError as e:
            if args.data_dir is not None:
                raise cli.InputError(f"--data_dir {e}") from None
            result["data"] = {"error": " ".join(str(e).split())}
    sections["data"] = time.perf_counter() - start
    result["section_seconds"] = sections  # wall time of each part, compilation included
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from spectron_jax import gin_config

    args = gin_config.parse_args(_parser(), argv)
    _validate(args)
    result = run(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_report(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    cli.run(main)
