"""`train`: the Spectron training entry point (t5x-style gin CLI).

    python -m spectron_jax.train --gin_file=gin/runs/tiny_cpu.gin --gin.MODEL_DIR="'runs/tiny_cpu'" \\
        [--gin_file=...] [--gin.NAME=VALUE ...] [--gin_search_paths=DIR,...]

Required gin macros: MODEL_DIR (where checkpoints, metrics and config.gin go), TRAIN_STEPS (the last
step) and TASK (a Spectron seqio Task: spectron_embedded / spectron_librispeech / spectron_librilight).
Everything else is `TrainConfig` and the configs it holds, plus the model's `SpectronConfig`.

What a run does, on every process of a (possibly multi-host) job:
  1. `jax.distributed.initialize` when the job has more than one process (DistributedConfig / env).
  2. Builds the mesh, the train state abstractly, then either restores the newest checkpoint in
     MODEL_DIR (exact resume: state, RNG and data position) or initialises the state directly in its
     shards (never a full copy on one device), optionally copying parts from other checkpoints.
  3. Compiles the step once (in/out shardings, donated state) and reads its FLOPs for MFU, and the
     evaluation's steps (`validation.Evaluator`); then every process meets the others
     (`multihost.meet`) before the first cross-process collective.
  4. Loops: next batch -> step -> metrics (kept on the device, fetched every `log_every_steps`:
     a `metrics.jsonl` record for every step, TensorBoard and a progress line) -> async checkpoint
     every `save_every_steps` -> evaluation on the validation split every `eval_every_steps` (loss
     terms, a predicted-vs-target spectrogram image and Griffin-Lim audio of the teacher-forced
     continuation).
  5. SIGTERM: saves a checkpoint of the step every process agrees on (`multihost.PreemptionStop`, on
     the global step) and exits 0. A NaN / Inf loss stops the run with
     exit 1 and saves nothing (the last good checkpoint stays as it was).

The pieces live in modules named for them: `train_config` (TrainConfig and its gin registration),
`run_checks` (the tokenizer and converted checkpoints against the model), `run_state` (resume or
initialise), `compile_cache`, `step_metrics` (fetch points, divergence, throughput), `profiling` and
`train_validation` (the evaluations of a run); this module is the loop and the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Optional, Sequence

from spectron_jax import cli, filesystem, metric_logs, run_checks, train_config
# The names other modules and scripts use through `train` (they live in the modules named for them).
from spectron_jax.compile_cache import configure_compilation_cache, default_compilation_cache_dir  # noqa: F401
from spectron_jax.run_checks import tokenizer_of_run as _tokenizer_of_run  # noqa: F401
from spectron_jax.run_state import data_change as _data_change  # noqa: F401
from spectron_jax.step_metrics import TrainingDiverged  # noqa: F401
from spectron_jax.train_config import (TrainConfig, build_train_config as _build_train_config,  # noqa: F401
                                       register_train_configurables)

METRICS_JSONL = metric_logs.METRICS_JSONL  # local runs; object stores get pieces (see metric_logs)
SUMMARY_FILENAME = "model_summary.json"


def _write_summary(model_dir: str, params, config_name: str) -> dict:
    """Writes MODEL_DIR/model_summary.json: the parameter counts in total, per component and per module."""
    from spectron_jax import trainer

    counts = trainer.count_params(params)
    detail = {}
    for top, sub in params.items():
        if isinstance(sub, dict):
            for key, value in sub.items():
                detail[f"{top}/{key}"] = trainer.count_params(value)["total"]
    summary = {"model": config_name, "parameters": counts, "by_module": detail}
    filesystem.write_text(filesystem.join(model_dir, SUMMARY_FILENAME), json.dumps(summary, indent=2))
    return summary


def _compile_step(step_fn, state, state_shardings, batch_spec: dict, shard_count: int, mesh, rules):
    """The train step compiled for the state's shardings and the global batch (donated state); returns
    (compiled, abstract global batch {name: ShapeDtypeStruct with its sharding})."""
    import jax

    from spectron_jax import partitioning

    batch_axes = partitioning.batch_mesh_axes(mesh, rules)

    def global_abstract(shape, dtype):
        rows = shape[0] * shard_count
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            batch_axes if len(batch_axes) != 1 else batch_axes[0], *([None] * (len(shape) - 1))))
        return jax.ShapeDtypeStruct((rows,) + tuple(shape[1:]), dtype, sharding=sharding)

    abstract_batch = {k: global_abstract(s, d) for k, (s, d) in batch_spec.items()}
    with partitioning.sharding_context(mesh, rules):
        jitted = jax.jit(step_fn, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                         donate_argnums=(0,))
        compiled = jitted.lower(state, abstract_batch).compile()
    return compiled, abstract_batch


def _step_flops(compiled, config: TrainConfig, model_config, converter, compute_dtype) -> tuple:
    """(XLA's FLOPs of a step on all devices or None, the analytic FLOPs of a step, the peak FLOP/s per
    device MFU divides by)."""
    import jax

    from spectron_jax import flops as flops_lib, metrics as metrics_lib

    flops = metrics_lib.compiled_flops(compiled)
    # XLA counts a loop body once: with accumulation the step runs the microbatch pass M times.
    flops_per_step = None if flops is None else flops * jax.device_count() * config.step.microbatches
    peak = config.peak_flops_per_device or metrics_lib.device_kind_peak(jax.devices()[0], compute_dtype)
    # The useful work of a step (flops.py), logged as analytic_* beside XLA's count of what it compiled.
    analytic_flops = flops_lib.step_flops(model_config, batch_size=config.batch_size, prompt_len=converter.prompt_len,
                                          text_len=converter.text_len, cont_len=converter.cont_len,
                                          frozen=config.optimizer.freeze).total
    if peak is None:
        peak = metrics_lib.measure_peak_flops(compute_dtype)
    return flops_per_step, analytic_flops, peak


# ---- The run -----------------------------------------------------------------------------------
def train(model_dir: str, train_steps: int, task_name: str, config: TrainConfig, model_config: Any,
          task_config: Any, converter: Any, write_config=None) -> dict:
    """Runs (or resumes) training to `train_steps`; returns the last step's metrics.

    Library entry (the CLI is `main`): every argument is a plain value; `write_config(model_dir)` is
    called once by process 0 to write config.gin.
    """
    import jax
    import numpy as np

    from spectron_jax import (checkpoints, compile_cache, metrics as metrics_lib, multihost, partitioning, profiling,
                              run_state, step_metrics, train_validation, trainer)
    from spectron_jax.data import pipeline as pipeline_lib, tasks as tasks_lib

    stop = multihost.PreemptionStop()  # first: a SIGTERM during restore or compilation is not lost
    sent = set()

    def sigterm_after(event: str) -> None:  # TrainConfig.sigterm_after (tests)
        if config.sigterm_after == event and event not in sent:
            sent.add(event)
            os.kill(os.getpid(), signal.SIGTERM)

    is_main = jax.process_index() == 0
    filesystem.makedirs(model_dir)
    ckpt = checkpoints.TrainCheckpointer(model_dir, config.checkpoint)
    latest = ckpt.latest_step()
    stop.prime(latest or 0)  # the preemption counter is the global step from here on
    compile_cache.configure_compilation_cache(config.compilation_cache_dir)
    mesh = partitioning.make_mesh(config.mesh)
    rules = config.rules
    compute_dtype = config.step.resolved_dtype(jax.devices()[0].platform)
    model = trainer.FunctionalSpectron(model_config)

    # -- data
    vocab_path = config.vocab_path or tasks_lib.DEFAULT_VOCAB_PATH
    data_dirs = {task_name: config.data_dir} if config.data_dir else None
    tasks_lib.register_tasks(data_dirs, vocab_path, task_config)
    shard = partitioning.data_shard_info(config.batch_size, mesh, rules)
    shapes = dict(prompt_len=converter.prompt_len, text_len=converter.text_len, cont_len=converter.cont_len,
                  reduction_factor=model_config.reduction_factor, with_segments=converter.with_segments,
                  prompt_dim=converter.prompt_dim)
    train_input = pipeline_lib.make_pipeline(task_name, "train", config.batch_size, shard.index, shard.count,
                                             seed=config.data_seed, shuffle=True, repeat=True, **shapes)

    # -- state: abstract first, then restore or initialise in shards
    layout = trainer.train_state_layout(model, config, train_steps, mesh)
    abstract, state_shardings = layout.abstract, layout.shardings
    partitioning.check_replication({"params": abstract["params"], "opt_state": abstract["opt_state"]},
                                   {"params": state_shardings["params"], "opt_state": state_shardings["opt_state"]},
                                   config.sharding_tolerance)
    if latest is not None:
        state = run_state.restore(ckpt, latest, abstract, state_shardings, config, shard, train_input)
        sigterm_after("restore")
    else:
        state = run_state.initialise(layout.init_state, state_shardings, config, model_config)
    partitioning.report_replicated(state["params"])

    if is_main:
        if write_config is not None:
            write_config(model_dir)
        if filesystem.exists(vocab_path):
            filesystem.copy(vocab_path, filesystem.join(model_dir, checkpoints.TOKENIZER_FILENAME))
        summary = _write_summary(model_dir, abstract["params"], type(model_config).__name__)
        print(f"model: {summary['parameters']['total']:,} parameters "
              + ", ".join(f"{k} {v:,}" for k, v in summary["parameters"].items() if k != "total"), flush=True)

    # -- the compiled step
    frozen = trainer.frozen_mask(abstract["params"], config.optimizer.freeze) if config.optimizer.freeze else None
    step_fn = trainer.make_train_step(model.loss_fn, layout.tx, layout.schedule, config.step, compute_dtype, frozen,
                                      normalizers_fn=model.loss_normalizers)
    if config.delay_before_compile_s:
        time.sleep(config.delay_before_compile_s)
    compiled, abstract_batch = _compile_step(step_fn, state, state_shardings, train_input.batch_spec, shard.count,
                                             mesh, rules)
    flops_per_step, analytic_flops, peak = _step_flops(compiled, config, model_config, converter, compute_dtype)
    if is_main:
        xla = "unknown" if flops_per_step is None else f"{flops_per_step / 1e12:.4g}"
        print(f"TFLOP per step: analytic {analytic_flops / 1e12:.4g}, XLA {xla}", flush=True)
    profiler = profiling.StepProfiler(config.profile_steps, model_dir, enabled=is_main)
    window = step_metrics.ThroughputWindow(flops_per_step, analytic_flops, jax.device_count(), peak)

    writer = metrics_lib.MetricsWriter(model_dir, enabled=is_main)
    jsonl = metric_logs.JsonlLog(model_dir, enabled=is_main)
    progress = metrics_lib.ProgressLog(train_steps)
    metrics = step_metrics.PendingMetrics(jsonl, ckpt)
    validation = None
    if config.eval_every_steps:
        abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       abstract["params"], state_shardings["params"])
        validation = train_validation.TrainValidation(task_name, config, model_config, shard, shapes, abstract_params,
                                                      abstract_batch, mesh, rules, compute_dtype, writer, jsonl)
    # Every step function is compiled: the processes meet before the first collective (multihost.meet).
    multihost.meet("start", config.distributed.barrier_timeout_s)

    def evaluate(step: int) -> None:
        validation.run(step, state["params"])
        sigterm_after("eval")
        multihost.meet("eval", config.distributed.barrier_timeout_s)  # process 0 wrote media alone

    shard_indices = [partitioning.data_shard_info(config.batch_size, mesh, rules, p).index
                     for p in range(jax.process_count())]

    def save(step: int) -> None:
        host_states = checkpoints.gather_input_states(train_input.state())
        full = dict(state, input=checkpoints.input_state_arrays(host_states))
        ckpt.save(step, full, {"seed": config.data_seed, "num_shards": shard.count, "shard_index": shard_indices,
                               "input_order": pipeline_lib.ORDER_VERSION,
                               "input_fingerprint": train_input.order_fingerprint()})

    step = int(jax.device_get(state["step"]))
    # Metrics stay on the device until a fetch point (step_metrics): no step waits for the host.
    try:
        if validation is not None and config.eval_at_start and step == 0:
            evaluate(0)
        while step < train_steps:
            host_batch = next(train_input)
            if config.nan_at_step is not None and step + 1 == config.nan_at_step:
                host_batch = dict(host_batch, cont_frames=np.full_like(host_batch["cont_frames"], np.nan))
            batch = partitioning.global_batch_from_host(host_batch, mesh, rules)
            with profiler.before(step + 1):
                state, device_metrics = compiled(state, batch)
            step += 1
            profiler.after(step, state)
            metrics.add(step, device_metrics)
            logging_step = step % config.log_every_steps == 0 or step == train_steps
            if not window.started or logging_step:
                metrics.fetch()
            window.step_done()  # the first step (warm-up) is not timed
            if logging_step:
                scalars = {**metrics.last, **window.scalars(metrics.last)}
                writer.scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                jsonl.flush()
                writer.flush()
                if is_main:
                    progress.log(step, scalars)
            if stop.reached(step):
                metrics.fetch()
                save(step)
                ckpt.wait()
                jsonl.flush()
                print(f"SIGTERM: saved step {step} in {ckpt.directory}; exiting", flush=True)
                return metrics.last
            paused = False
            if step % config.checkpoint.save_every_steps == 0 or step == train_steps:
                metrics.fetch()
                save(step)
                sigterm_after("save")
                paused = True
            if validation is not None and (step % config.eval_every_steps == 0 or step == train_steps):
                metrics.fetch()
                evaluate(step)
                paused = True
            if paused:  # saving and evaluating are not training time
                window.restart()
        metrics.fetch()
        return metrics.last
    finally:
        profiler.close()
        stop.restore()
        ckpt.close()
        writer.flush()
        writer.close()
        jsonl.close()


# ---- CLI ---------------------------------------------------------------------------------------
def _parser() -> cli.ArgumentParser:
    from spectron_jax import gin_config

    parser = cli.ArgumentParser(prog="spectron_jax.train", description="Train Spectron (gin-configured).")
    gin_config.add_gin_flags(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads data here: keep its logs quiet
    from spectron_jax import gin_config

    train_config.register_train_configurables()
    args = gin_config.parse_args(_parser(), argv)
    if not args.gin_file:
        raise cli.UsageError("--gin_file: at least one gin file is required (e.g. gin/runs/tiny_cpu.gin)")
    gin_config.parse_gin(args)
    model_dir = gin_config.query_macro("MODEL_DIR")
    train_steps = gin_config.query_macro("TRAIN_STEPS")
    task_name = gin_config.query_macro("TASK")
    if not isinstance(model_dir, str) or not model_dir:
        raise cli.UsageError(f"--gin.MODEL_DIR must be a quoted path string, got {model_dir!r}")
    if not isinstance(train_steps, int) or train_steps < 1:
        raise cli.UsageError(f"--gin.TRAIN_STEPS must be a positive integer, got {train_steps!r}")
    from spectron_jax.data import tasks as tasks_lib
    if task_name not in tasks_lib.TASK_NAMES:
        raise cli.UsageError(f"--gin.TASK={task_name!r} is not a Spectron task ({', '.join(tasks_lib.TASK_NAMES)})")
    config = train_config.build_train_config()
    model_config = gin_config.build("SpectronConfig")
    task_config = gin_config.build("TaskConfig")
    if task_config.prompt_features != model_config.prompt_features:
        raise cli.UsageError(f"TaskConfig.prompt_features={task_config.prompt_features!r} but the encoder reads "
                             f"SpectronConfig.prompt_features={model_config.prompt_features!r}; bind both the same")
    converter = gin_config.build("SpectronFeatureConverter", with_segments=task_config.phi_split,
                                 reduction_factor=model_config.reduction_factor, prompt_dim=model_config.prompt_dim)
    from spectron_jax import multihost
    multihost.initialize(config.distributed)
    data_dir = config.data_dir
    if data_dir and not filesystem.is_dir(data_dir):
        raise cli.InputError(f"TrainConfig.data_dir: {data_dir} is not a directory (run spectron_jax.data.prepare)")
    vocab = config.vocab_path
    if vocab and not filesystem.is_file(vocab):
        raise cli.InputError(f"TrainConfig.vocab_path: {vocab} not found")
    config = run_checks.tokenizer_of_run(config, model_config, task_config)
    try:
        train(model_dir, train_steps, task_name, config, model_config, task_config, converter,
              write_config=gin_config.write_operative_config)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, cli.CLIError):
            raise
        raise cli.InputError(" ".join(str(e).split())) from None
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cli.run(main)
