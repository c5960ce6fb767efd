"""`benchmark`: training throughput, MFU, decoding real-time factor and data-side speed on this machine.

    python -m spectron_jax.benchmark --gin_file=gin/models/tiny.gin [--json] [--steps=N] [--gin.NAME=VALUE ...]

One run on whatever devices JAX finds, in four parts:

  peak     the dense-matmul FLOP/s one device reaches in the compute dtype (`metrics.measure_peak_flops`),
           and the datasheet peak when the chip is tabulated (`metrics.device_kind_peak`; null on CPUs).
  train    the real train step (`aot.build_train_program`: the step `train` compiles, sharded over all
           devices) on a synthetic batch whose masks and weights are all valid: median step time over
           `--steps` timed steps after `--warmup` untimed ones, text tokens/s and frames/s, model FLOPs
           per step (XLA's cost analysis, summed over devices) and MFU against both peaks.
  decode   the decoding hooks of `SpectronModel` under one jit each: the prompt is encoded and the
           text prefilled into a KV cache, then a `lax.scan` over `speech_step` generates `--decode_frames`
           frames (r = 1 and r = 4: N / r steps). real_time_factor = generation seconds / (N / 80 s of
           audio); below 1 is faster than real time. Text: a `lax.scan` of greedy `text_step`s, tokens/s.
  data     featurisation speed (x real time per CPU core) and TFRecord read examples/s
           (`data.benchmark_data` on the embedded corpus or `--data_dir`).

Compute dtype: `auto` (default) is float32 on CPU and bfloat16 (steps and modules) on accelerators.
Timings block on the results (`block_until_ready`); compilation is never timed. `--json` prints one
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
DECODE_REDUCTION_FACTORS = (1, 4)
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

    from spectron_jax import aot, metrics, partitioning

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
        "loss": float(np.asarray(jax.device_get(last["metrics"]["loss"]))),
    }
    return {"peak": peak, "train": train}


# ---- (c) decoding -----------------------------------------------------------------------------------
def benchmark_decode(model_config: Any, reduction_factor: int, frames: int, batch: int, prompt_len: int,
                     text_len: int, repeats: int, text_tokens: int = 0, seed: int = 0) -> dict:
    """Real-time factor of spectrogram generation (and text tokens/s) with the decoding hooks.

    Args:
      model_config: SpectronConfig; its reduction factor is replaced by `reduction_factor`.
      frames: frames to generate (rounded up to a multiple of r).
      batch: rows decoded together.
      prompt_len, text_len: prompt frames encoded and text tokens prefilled before speech.
      repeats: timed calls (after one untimed compile + warm-up call); the median is reported.
      text_tokens: > 0 also times that many greedy `text_step`s from the same prefilled cache.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from spectron_jax.models.spectron_model import SpectronModel

    config = dataclasses.replace(model_config, acoustic=dataclasses.replace(model_config.acoustic,
                                                                            reduction_factor=reduction_factor))
    model = SpectronModel(config)
    params = jax.jit(lambda: model.split(model.make_module(seed))[1])()
    r, mel = reduction_factor, config.acoustic.num_mel
    steps = -(-frames // r)
    prefix_len = config.prefix_len(prompt_len)
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.normal(-4.0, 2.0, (batch, prompt_len, mel)), jnp.float32)
    prompt_mask = jnp.ones((batch, prompt_len), jnp.int32)
    tokens = np.asarray(rng.integers(4, config.decoder.vocab_size, (batch, text_len)), np.int32)
    tokens[:, 0] = config.sos_id

    @jax.jit
    def prefill(params, prompt, tokens):
        prefix, prefix_valid = model.encode_prompt(params, prompt, prompt_mask)
        cache = model.init_cache(batch, prefix_len + text_len + max(steps, text_tokens))
        logits, cache = model.prefill(params, prefix, prefix_valid, tokens, jnp.ones(tokens.shape, bool), cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    @jax.jit
    def generate_speech(params, cache, key):
        def body(carry, step):
            previous, cache = carry
            group, _, cache = model.speech_step(params, previous, cache, start=step == 0,
                                                rng=jax.random.fold_in(key, step))
            return (group.astype(previous.dtype), cache), group

        start = (jnp.zeros((batch, r, mel), jnp.float32), cache)
        _, groups = jax.lax.scan(body, start, jnp.arange(steps))
        return groups  # [steps, batch, r, mel]

    key = jax.random.key(seed)
    jax.block_until_ready(prefill(params, prompt, tokens))  # compile + warm-up
    prefill_seconds, _ = _median_seconds(lambda: jax.block_until_ready(prefill(params, prompt, tokens)), repeats)
    first_token, cache = prefill(params, prompt, tokens)
    jax.block_until_ready(generate_speech(params, cache, key))  # compile + warm-up
    speech, _ = _median_seconds(lambda: jax.block_until_ready(generate_speech(params, cache, key)), repeats)
    generated = steps * r
    audio_seconds = generated / FRAMES_PER_SECOND
    result = {
        "reduction_factor": r, "batch": batch, "frames": generated, "decoder_steps": steps,
        "audio_seconds": audio_seconds, "prefill_seconds": prefill_seconds, "generation_seconds": speech,
        "real_time_factor": speech / audio_seconds, "frames_per_sec": batch * generated / speech,
        "steps_per_sec": steps / speech,
    }
    if text_tokens > 0:
        result.update(_benchmark_text(model, params, first_token, cache, text_tokens, repeats))
    return result


def _benchmark_text(model, params, first_token, cache, count: int, repeats: int) -> dict:
    """Greedy text decoding: `count` text_steps from a prefilled cache (first_token int [batch])."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def generate_text(params, first, cache):
        def body(carry, _):
            token, cache = carry
            logits, cache = model.text_step(params, token, cache)
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return (token, cache), token

        _, tokens = jax.lax.scan(body, (first, cache), None, length=count)
        return tokens  # [count, batch]

    jax.block_until_ready(generate_text(params, first_token, cache))  # compile + warm-up
    seconds, _ = _median_seconds(lambda: jax.block_until_ready(generate_text(params, first_token, cache)), repeats)
    batch = first_token.shape[0]
    return {"text_tokens": count, "text_seconds": seconds, "text_tokens_per_sec": batch * count / seconds}


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
        ("model FLOPs per step", _fmt(train["flops_per_step"])),
        ("MFU vs measured peak", _fmt(train["mfu_measured_peak"])),
        ("MFU vs datasheet peak", _fmt(train["mfu_datasheet_peak"])),
    ]
    for name, dec in result["decode"].items():
        rows.append((f"decode {name}: real-time factor ({dec['frames']} frames, batch {dec['batch']})",
                     _fmt(dec["real_time_factor"])))
        rows.append((f"decode {name}: frames / s", _fmt(dec["frames_per_sec"])))
        if "text_tokens_per_sec" in dec:
            rows.append(("decode: text tokens / s (greedy text_step)", _fmt(dec["text_tokens_per_sec"])))
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
    parser.add_argument("--decode_batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--decode_text_tokens", type=int, default=32, help="greedy text steps timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per decoding measurement")
    parser.add_argument("--data_dir", default=None, help="audio for the data benchmark (default: the embedded corpus)")
    parser.add_argument("--data_files", type=int, default=32, help="audio files featurised")
    parser.add_argument("--data_seconds", type=float, default=2.0, help="minimum TFRecord read time")
    parser.add_argument("--skip_data", action="store_true", help="leave out the data benchmark")
    return parser


def _validate(args) -> None:
    if not args.gin_file:
        raise cli.UsageError("--gin_file is required (e.g. --gin_file=gin/models/tiny.gin)")
    for name in ("steps", "decode_frames", "decode_batch", "repeats", "data_files"):
        if getattr(args, name) < 1:
            raise cli.UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "decode_text_tokens"):
        if getattr(args, name) < 0:
            raise cli.UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
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
        dtype = "float32" if device.platform == "cpu" else "bfloat16"
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
    for r in DECODE_REDUCTION_FACTORS:
        start = time.perf_counter()
        decode[f"r{r}"] = benchmark_decode(configs.model, r, args.decode_frames, args.decode_batch,
                                           configs.converter.prompt_len, configs.converter.text_len, args.repeats,
                                           text_tokens=args.decode_text_tokens if r == 1 else 0)
        sections[f"decode_r{r}"] = time.perf_counter() - start
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
