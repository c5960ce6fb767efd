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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any, Optional, Sequence

from spectron_jax import cli, filesystem, metric_logs
from spectron_jax.multihost import DistributedConfig

logger = logging.getLogger("spectron_jax.train")
METRICS_JSONL = metric_logs.METRICS_JSONL  # local runs; object stores get pieces (see metric_logs)
SUMMARY_FILENAME = "model_summary.json"


class TrainingDiverged(cli.CLIError):
    """The loss became NaN or Inf (exit 1; no checkpoint is written)."""


def _default_rules():
    from spectron_jax import partitioning
    return partitioning.DEFAULT_RULES


def _default(factory_name: str):
    """A dataclass field whose default is built lazily (keeps this module's import light)."""
    def make():
        from spectron_jax import checkpoints, partitioning, trainer
        return {"mesh": partitioning.MeshConfig, "optimizer": trainer.OptimizerConfig,
                "step": trainer.StepConfig, "checkpoint": checkpoints.CheckpointConfig}[factory_name]()
    return dataclasses.field(default_factory=make)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run besides the model (all DEFAULT, not in the paper, unless noted).

    Attributes:
      batch_size: GLOBAL batch in utterances (the paper gives none; 128-256 suggested for pods).
      seed: parameter initialisation and dropout; the run's base PRNG key.
      data_seed: shuffling of the training data.
      data_dir: the TASK's TFRecord shards (None: the task's default folder).
      vocab_path: the SentencePiece model.
      log_every_steps: TensorBoard scalars and a progress line every this many steps.
      eval_every_steps: evaluation on the validation split every this many steps (0: never).
      eval_batches: batches per evaluation (validation is read from its start each time).
      eval_media: also write a spectrogram image and Griffin-Lim audio at evaluation steps.
      eval_at_start: also evaluate before the first step of a fresh run (the baseline of every term).
      eval_swapped_prefix: also report the text CE terms with each row reading another row's prompt
        (`validation.swap_prefixes`: `ce_*_swapped_prefix`), the check that the text reads the audio.
        DEFAULT False (it doubles the evaluation's text cost).
      peak_flops_per_device: the device peak MFU divides by; None = the datasheet value of the
        accelerator, or a measured matmul peak on CPU.
      mesh: the device mesh; rules: the logical-axis rules table.
      optimizer, step, checkpoint: see `trainer.OptimizerConfig`, `trainer.StepConfig`,
        `checkpoints.CheckpointConfig`.
      init_from: parts of the model copied from other checkpoints at initialisation (not on resume).
      nan_at_step: TEST ONLY: the batch of this step is filled with NaN (checks the divergence stop).
      sigterm_after: TEST ONLY: 'restore', 'save' or 'eval': the process sends itself SIGTERM right
        after its first restore, checkpoint save or evaluation of this run (checks that the notice
        stops every process at one step, whatever the step counters were).
      delay_before_compile_s: TEST ONLY: this process sleeps this long before compiling its step
        functions (checks that processes that reach the first collective far apart still meet).
      distributed: multi-host set-up.
      sharding_tolerance: on a mesh of more than one device, the largest fraction of the parameters
        and optimizer state that may sit in fully replicated large arrays (> 2^20 elements); more is a
        one-line error at start (MaxText's idea and default, 0.02).
      accept_data_change: resume even though the checkpoint's data seed, shard index, shard count,
        input record order version (`pipeline.ORDER_VERSION`) or input fingerprint (train shard files,
        record counts, shuffle_buffer_size, cycle_length: `pipeline.order_fingerprint`) differ from
        this run's (the data then restarts at position 0 of the saved epoch). Without it such a resume
        is a one-line error naming the change.
      profile_steps: (start, stop): a `jax.profiler` trace of steps start..stop (1-based, inclusive)
        written by process 0 to MODEL_DIR/plugins/profile/<run>/ (TensorBoard's profile plugin); None:
        no trace. DEFAULT None.
      compilation_cache_dir: JAX's persistent compilation cache, so a restart on the same topology
        loads the compiled step instead of recompiling. None: JAX's own setting where the environment
        gives one (JAX_COMPILATION_CACHE_DIR), else `default_compilation_cache_dir()` (the user cache);
        '' disables it; any other value is the folder (local or an object store). DEFAULT None.
    """

    batch_size: int = 8
    seed: int = 0
    data_seed: int = 0
    data_dir: Optional[str] = None
    vocab_path: Optional[str] = None
    log_every_steps: int = 10
    eval_every_steps: int = 0
    eval_batches: int = 2
    eval_media: bool = True
    eval_at_start: bool = True
    eval_swapped_prefix: bool = False
    peak_flops_per_device: Optional[float] = None
    mesh: Any = _default("mesh")
    rules: Any = dataclasses.field(default_factory=_default_rules)
    optimizer: Any = _default("optimizer")
    step: Any = _default("step")
    checkpoint: Any = _default("checkpoint")
    init_from: tuple = ()
    nan_at_step: Optional[int] = None
    sigterm_after: Optional[str] = None
    delay_before_compile_s: float = 0.0
    distributed: DistributedConfig = DistributedConfig()
    accept_data_change: bool = False
    sharding_tolerance: float = 0.02
    profile_steps: Optional[tuple] = None
    compilation_cache_dir: Optional[str] = None

    def __post_init__(self):
        for name in ("batch_size", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.profile_steps is not None:
            steps = tuple(self.profile_steps)
            if len(steps) != 2 or not all(isinstance(v, int) for v in steps) or not 1 <= steps[0] <= steps[1]:
                raise ValueError(f"TrainConfig.profile_steps must be (start, stop) with 1 <= start <= stop, "
                                 f"got {self.profile_steps!r}")
            object.__setattr__(self, "profile_steps", steps)
        if self.sigterm_after not in (None, "restore", "save", "eval"):
            raise ValueError(f"TrainConfig.sigterm_after must be None, 'restore', 'save' or 'eval', "
                             f"got {self.sigterm_after!r}")
        if self.eval_every_steps < 0 or self.eval_batches < 1:
            raise ValueError("TrainConfig.eval_every_steps must be >= 0 and eval_batches >= 1")
        object.__setattr__(self, "rules", tuple(tuple(r) for r in self.rules))
        object.__setattr__(self, "init_from", tuple(self.init_from))


_TRAIN_CONFIGURABLES: dict = {}


def register_train_configurables() -> dict:
    """Makes the training configs available to gin files under their short names; returns
    {name: gin-wrapped constructor}."""
    import gin
    from spectron_jax import checkpoints, gin_config, trainer

    gin_config.register_configurables()
    for cls in (TrainConfig, DistributedConfig, trainer.OptimizerConfig, trainer.StepConfig,
                checkpoints.CheckpointConfig, checkpoints.PartialInit):
        if cls.__name__ in _TRAIN_CONFIGURABLES:
            continue
        try:
            _TRAIN_CONFIGURABLES[cls.__name__] = gin.external_configurable(cls, name=cls.__name__, module="spectron_jax")
        except ValueError:  # registered by an earlier import of this module
            _TRAIN_CONFIGURABLES[cls.__name__] = gin.get_configurable(f"spectron_jax.{cls.__name__}")
    return dict(_TRAIN_CONFIGURABLES)


def _build_train_config() -> "TrainConfig":
    """TrainConfig with the parsed gin bindings; a bad value becomes a one-line UsageError."""
    try:
        return register_train_configurables()["TrainConfig"]()
    except cli.CLIError:
        raise
    except Exception as e:  # noqa: BLE001 - a config's __post_init__ rejecting a value
        raise cli.UsageError(f"gin config: cannot build TrainConfig: {' '.join(str(e).split())}") from None


def _data_change(meta: dict, seed: int, shard, process_index: int, order_version: int | None = None,
                 fingerprint: dict | None = None) -> str:
    """What differs between a checkpoint's data stream (its `meta`) and this run's ('' when nothing).

    A checkpoint without `input_order` counted its position in the first record order (version 1).
    `fingerprint` is this run's `pipeline.order_fingerprint`, compared with the meta's
    `input_fingerprint` (absent in older checkpoints: not compared); its order settings only count
    when `order_version` is given (the same process count: an exact resume is attempted).
    """
    from spectron_jax.data import pipeline as pipeline_lib

    changes = []
    if "seed" in meta and int(meta["seed"]) != seed:
        changes.append(f"data_seed {meta['seed']} -> {seed}")
    if order_version is not None and "seed" in meta and int(meta.get("input_order", 1)) != order_version:
        changes.append(f"input record order version {meta.get('input_order', 1)} -> {order_version}")
    if "num_shards" in meta and int(meta["num_shards"]) != shard.count:
        changes.append(f"data shard count {meta['num_shards']} -> {shard.count}")
    saved_index = meta.get("shard_index")
    if isinstance(saved_index, list) and process_index < len(saved_index) and int(saved_index[process_index]) != shard.index:
        changes.append(f"data shard index {saved_index[process_index]} -> {shard.index}")
    if fingerprint is not None:
        changes += pipeline_lib.fingerprint_changes(meta.get("input_fingerprint"), fingerprint,
                                                    settings=order_version is not None)
    return ", ".join(changes)


def _finite_floats(metrics) -> dict:
    import numpy as np
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def _write_summary(model_dir: str, params, config_name: str) -> dict:
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


# ---- Compilation cache and profiler ---------------------------------------------------------------
def default_compilation_cache_dir() -> str:
    """$XDG_CACHE_HOME/spectron_jax/jax_compilation_cache (~/.cache/... without XDG_CACHE_HOME)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "spectron_jax", "jax_compilation_cache")


def configure_compilation_cache(cache_dir: Optional[str], min_compile_seconds: Optional[float] = None) -> Optional[str]:
    """Points JAX's persistent compilation cache at `cache_dir` (see `TrainConfig.compilation_cache_dir`).

    None keeps JAX's setting when JAX_COMPILATION_CACHE_DIR is in the environment (an empty value: off) and
    otherwise uses `default_compilation_cache_dir()`; '' disables the cache. `min_compile_seconds` (None:
    JAX's default, 1 s) is the shortest compilation worth an entry. Returns the folder in use, or None.
    Takes effect for the next compilation, also in a process that has compiled before.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if cache_dir is None:
        if "JAX_COMPILATION_CACHE_DIR" in os.environ:
            return jax.config.values.get("jax_compilation_cache_dir") or None
        cache_dir = default_compilation_cache_dir()
    if min_compile_seconds is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    if cache_dir and not filesystem.is_remote(cache_dir):
        os.makedirs(cache_dir, exist_ok=True)
    if (jax.config.values.get("jax_compilation_cache_dir") or "") != cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir or None)
        compilation_cache.reset_cache()  # JAX decides once per process whether (and where) it caches
    return cache_dir or None


class _Profiler:
    """A `jax.profiler` trace of the steps in `TrainConfig.profile_steps`, on process 0 only (the step is
    one SPMD program: one host's trace shows it; every host writing would also collide on a shared
    MODEL_DIR when two processes share a host name). Call `before(step)` / `after(step, state)` around
    each step (1-based) and `close()` at the end. On an object store the trace is written to a local
    folder and copied into MODEL_DIR/plugins/profile/ when it stops."""

    def __init__(self, steps: Optional[tuple], model_dir: str, enabled: bool):
        self.steps, self.model_dir = steps, model_dir
        self.enabled = enabled and steps is not None
        self.local_dir: Optional[str] = None

    def before(self, step: int):
        """Starts the trace at the first step of the range; returns the step's trace annotation context."""
        import contextlib

        import jax

        if self.enabled and self.local_dir is None and self.steps[0] <= step <= self.steps[1]:
            if filesystem.is_remote(self.model_dir):
                import tempfile
                self.local_dir = tempfile.mkdtemp(prefix="spectron_profile_")
            else:
                self.local_dir = self.model_dir
            jax.profiler.start_trace(self.local_dir)
            print(f"profiling steps {step}-{self.steps[1]} into {self.model_dir}/plugins/profile", flush=True)
        if self.local_dir is None:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, state) -> None:
        if self.local_dir is not None and step >= self.steps[1]:
            self._stop(state)

    def close(self) -> None:
        if self.local_dir is not None:
            self._stop(None)

    def _stop(self, state) -> None:
        import jax

        if state is not None:
            jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
        jax.profiler.stop_trace()
        local, self.local_dir, self.enabled = self.local_dir, None, False
        if local != self.model_dir:
            for folder, _, names in os.walk(local):
                relative = os.path.relpath(folder, local)
                for name in names:
                    filesystem.copy(os.path.join(folder, name), filesystem.join(self.model_dir, relative, name))
            import shutil
            shutil.rmtree(local, ignore_errors=True)


# ---- The run -----------------------------------------------------------------------------------
def train(model_dir: str, train_steps: int, task_name: str, config: TrainConfig, model_config: Any,
          task_config: Any, converter: Any, write_config=None) -> dict:
    """Runs (or resumes) training to `train_steps`; returns the last step's metrics.

    Library entry (the CLI is `main`): every argument is a plain value; `write_config(model_dir)` is
    called once by process 0 to write config.gin.
    """
    import jax
    import numpy as np

    from spectron_jax import (checkpoints, flops as flops_lib, metrics as metrics_lib, multihost, partitioning,
                              trainer, validation)
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
    configure_compilation_cache(config.compilation_cache_dir)
    mesh = partitioning.make_mesh(config.mesh)
    rules = config.rules
    platform = jax.devices()[0].platform
    compute_dtype = config.step.resolved_dtype(platform)
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
    init_state, abstract, state_shardings = layout.init_state, layout.abstract, layout.shardings
    tx, schedule = layout.tx, layout.schedule
    partitioning.check_replication({"params": abstract["params"], "opt_state": abstract["opt_state"]},
                                   {"params": state_shardings["params"], "opt_state": state_shardings["opt_state"]},
                                   config.sharding_tolerance)
    if latest is not None:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_shardings)
        meta = ckpt.meta(latest)
        count = int(meta.get("process_count", jax.process_count()))
        # A new process count is an expected change (handled below); a new seed or sharding is not.
        data_changed = _data_change(meta if count == jax.process_count() else {"seed": meta.get("seed", config.data_seed),
                                                                            "input_fingerprint": meta.get("input_fingerprint")},
                                    config.data_seed, shard, jax.process_index(),
                                    pipeline_lib.ORDER_VERSION if count == jax.process_count() else None,
                                    train_input.order_fingerprint())
        if data_changed and not config.accept_data_change:
            raise cli.InputError(f"{ckpt.directory}/{latest}: the checkpoint's data stream differs from this run's "
                                 f"({data_changed}); set --gin.TrainConfig.accept_data_change=True to resume anyway "
                                 f"(the data restarts at the saved epoch's start)")
        target["input"] = {k: np.zeros((count,), np.int32) for k in checkpoints.INPUT_KEYS}
        restored, _ = ckpt.restore(latest, target)
        sigterm_after("restore")
        input_arrays = restored.pop("input")
        state = restored
        position = None if data_changed else checkpoints.input_state_for_process(
            input_arrays, jax.process_index(), jax.process_count())
        if position is not None:
            position.update(seed=config.data_seed, shard_index=shard.index, num_shards=shard.count)
        else:
            epochs, positions = np.asarray(input_arrays["epoch"]), np.asarray(input_arrays["position"])
            epoch = int(epochs.min())
            # Every process's stream is a permutation of its own files: another count has no position
            # that continues the saved ones, so the oldest saved epoch restarts (see the README).
            from spectron_jax.data import epoch_order
            counts = train_input.record_counts
            saved_indices = meta.get("shard_index")
            if data_changed:
                logger.warning("the data stream changed (%s): data restarts at epoch %d, position 0",
                               data_changed, epoch)
            else:
                replayed = epoch_order.replayed_records(
                    counts, int(meta.get("num_shards", len(epochs))), epochs, positions,
                    saved_indices if isinstance(saved_indices, list) and len(saved_indices) == len(epochs) else None)
                logger.warning("checkpoint written by %d processes, now %d: data restarts at epoch %d, position 0 "
                               "(%d of the %d records of an epoch are seen again)",
                               len(epochs), jax.process_count(), epoch, replayed, sum(counts))
            position = {"epoch": epoch, "position": 0, "batches": 0}
        train_input.restore(position)
        print(f"resumed from step {latest} in {ckpt.directory}", flush=True)
    else:
        state = jax.jit(init_state, out_shardings=state_shardings)()
        inits = list(config.init_from)
        pretrained = getattr(model_config, "pretrained", None)
        for component, path in (("encoder", getattr(pretrained, "encoder_checkpoint", None)),
                                ("decoder", getattr(pretrained, "lm_checkpoint", None))):
            if path:
                inits.append(checkpoints.component_init(path, component))
        if inits:
            params, copied = checkpoints.apply_partial_init(state["params"], inits)
            state["params"] = params
            print(f"initialised {len(copied)} parameter arrays from {len(inits)} checkpoint(s)", flush=True)
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
    step_fn = trainer.make_train_step(model.loss_fn, tx, schedule, config.step, compute_dtype, frozen,
                                      normalizers_fn=model.loss_normalizers)
    batch_spec = train_input.batch_spec
    batch_axes = partitioning.batch_mesh_axes(mesh, rules)

    def global_abstract(shape, dtype):
        rows = shape[0] * shard.count
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            batch_axes if len(batch_axes) != 1 else batch_axes[0], *([None] * (len(shape) - 1))))
        return jax.ShapeDtypeStruct((rows,) + tuple(shape[1:]), dtype, sharding=sharding)

    abstract_batch = {k: global_abstract(s, d) for k, (s, d) in batch_spec.items()}
    if config.delay_before_compile_s:
        time.sleep(config.delay_before_compile_s)
    with partitioning.sharding_context(mesh, rules):
        jitted = jax.jit(step_fn, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                         donate_argnums=(0,))
        compiled = jitted.lower(state, abstract_batch).compile()
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
    if is_main:
        xla = "unknown" if flops_per_step is None else f"{flops_per_step / 1e12:.4g}"
        print(f"TFLOP per step: analytic {analytic_flops / 1e12:.4g}, XLA {xla}", flush=True)
    profiler = _Profiler(config.profile_steps, model_dir, enabled=is_main)

    writer = metrics_lib.MetricsWriter(model_dir, enabled=is_main)
    jsonl = metric_logs.JsonlLog(model_dir, enabled=is_main)
    progress = metrics_lib.ProgressLog(train_steps)
    evaluator = None
    if config.eval_every_steps:
        def validation_data():
            return pipeline_lib.make_pipeline(task_name, "validation", config.batch_size, shard.index, shard.count,
                                              seed=0, shuffle=False, repeat=False, drop_remainder=False, **shapes)

        abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       abstract["params"], state_shardings["params"])
        evaluator = validation.Evaluator(validation.deterministic_model(model_config), validation_data,
                                         config.eval_batches, abstract_params, abstract_batch, mesh, rules,
                                         compute_dtype, microbatches=config.step.microbatches,
                                         media=config.eval_media, writer=writer,
                                         swapped_prefix=config.eval_swapped_prefix)
    # Every step function is compiled: the processes meet before the first collective (multihost.meet).
    multihost.meet("start", config.distributed.barrier_timeout_s)

    def evaluate(step: int) -> None:
        means = evaluator.run(step, state["params"])
        if means:
            writer.scalars(step, {f"eval/{k}": v for k, v in means.items()})
            jsonl.write({"step": step, "split": "validation", **means})
            print("eval " + metrics_lib.ProgressLog().format(step, means), flush=True)
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
    last: dict = {}
    # Metrics stay on the device until a fetch point (logging, saving, evaluating, stopping, the end):
    # no step waits for the host. A NaN / Inf loss is therefore seen at the next fetch point, which
    # always comes before a checkpoint is written.
    pending: list = []  # (step, device metrics) not yet fetched
    window_start, window_steps = None, 0

    def fetch() -> None:
        nonlocal last
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (done, _), values in zip(pending, fetched):
            values = _finite_floats(values)
            if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
                pending.clear()
                ckpt.wait()
                raise TrainingDiverged(
                    f"step {done}: loss is {values['loss']} (grad norm {values['grad_norm']}); stopping. The "
                    f"last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
            jsonl.write({"step": done, "split": "train", **values})
            last = values
        pending.clear()

    try:
        if evaluator is not None and config.eval_at_start and step == 0:
            evaluate(0)
        while step < train_steps:
            host_batch = next(train_input)
            if config.nan_at_step is not None and step + 1 == config.nan_at_step:
                host_batch = dict(host_batch, cont_frames=np.full_like(host_batch["cont_frames"], np.nan))
            batch = partitioning.global_batch_from_host(host_batch, mesh, rules)
            with profiler.before(step + 1):
                state, step_metrics = compiled(state, batch)
            step += 1
            profiler.after(step, state)
            pending.append((step, step_metrics))
            logging_step = step % config.log_every_steps == 0 or step == train_steps
            if window_start is None or logging_step:
                fetch()
            now = time.perf_counter()
            if window_start is None:
                window_start, window_steps = now, 0  # the first step (warm-up) is not timed
            else:
                window_steps += 1
            if logging_step:
                scalars = dict(last)
                if window_steps:
                    rates = metrics_lib.throughput(
                        (now - window_start) / window_steps, text_tokens=last.get("num_text_tokens"),
                        frames=last.get("num_frames"), flops_per_step=flops_per_step,
                        num_devices=jax.device_count(), peak_flops_per_device=peak)
                    scalars.update({k: v for k, v in rates.items() if v is not None})
                    analytic = metrics_lib.throughput((now - window_start) / window_steps, flops_per_step=analytic_flops,
                                                      num_devices=jax.device_count(), peak_flops_per_device=peak)
                    scalars.update({f"analytic_{k}": analytic[k] for k in ("tflops_per_device", "mfu")
                                    if analytic[k] is not None})
                    window_start, window_steps = now, 0
                writer.scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                jsonl.flush()
                writer.flush()
                if is_main:
                    progress.log(step, scalars)
            if stop.reached(step):
                fetch()
                save(step)
                ckpt.wait()
                jsonl.flush()
                print(f"SIGTERM: saved step {step} in {ckpt.directory}; exiting", flush=True)
                return last
            paused = False
            if step % config.checkpoint.save_every_steps == 0 or step == train_steps:
                fetch()
                save(step)
                sigterm_after("save")
                paused = True
            if evaluator is not None and (step % config.eval_every_steps == 0 or step == train_steps):
                fetch()
                evaluate(step)
                paused = True
            if paused:  # saving and evaluating are not training time
                window_start, window_steps = time.perf_counter(), 0
        fetch()
        return last
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


def _tokenizer_of_run(config, model_config, task_config=None):
    """`config` with the run's tokenizer resolved and checked against the model, as are the conversions it loads.

    Every converted checkpoint the run initialises from (`PretrainedInit`, `TrainConfig.init_from`) must
    record the architecture of the model part it fills (`convert/metadata.py`; `PretrainedInit.allow_changes`
    accepts deliberate differences). Without `TrainConfig.vocab_path`, a run initialised from a converted
    LM (`PretrainedInit.lm_checkpoint`) uses that checkpoint's `tokenizer.model` (and is refused when it
    has none). The tokenizer's bos / eos / pad must be the model's sos / eos / pad ids (a converted
    `decoder.gin` binds them) and its pieces must fit the vocabulary. With a text separator
    (`TaskConfig.sep_id`), the model records the same id (`SpectronConfig.sep_id`) and the tokenizer holds
    it as a reserved piece.
    """
    from etils import epath

    from spectron_jax import checkpoints
    from spectron_jax.convert import metadata
    from spectron_jax.data import tasks as tasks_lib

    pretrained = getattr(model_config, "pretrained", None)
    allow = getattr(pretrained, "allow_changes", ())
    loads = [(getattr(pretrained, "encoder_checkpoint", None), "encoder", "PretrainedInit.encoder_checkpoint"),
             (getattr(pretrained, "lm_checkpoint", None), "decoder", "PretrainedInit.lm_checkpoint")]
    loads += [(init.checkpoint, init.target_prefix.split("/")[0] or None, "TrainConfig.init_from")
              for init in config.init_from]
    for path, component, knob in loads:
        record = metadata.read(path) if path and filesystem.is_dir(path) else None
        component = component or (record or {}).get("component")
        part = getattr(model_config, component or "", None)
        if record is None or part is None:
            continue
        try:
            metadata.check_record(path, record, part, component=component, allow=allow)
        except ValueError as e:
            raise cli.UsageError(f"{knob}: {e}") from None
    lm = getattr(pretrained, "lm_checkpoint", None)
    if not config.vocab_path and lm and filesystem.is_dir(lm):
        if not (epath.Path(lm) / checkpoints.TOKENIZER_FILENAME).exists():
            raise cli.UsageError(f"PretrainedInit.lm_checkpoint={lm} has no {checkpoints.TOKENIZER_FILENAME} (its "
                                 "source checkpoint had none): set TrainConfig.vocab_path to the LM's SentencePiece "
                                 "model")
        config = dataclasses.replace(config, vocab_path=str(epath.Path(lm) / checkpoints.TOKENIZER_FILENAME))
    path = config.vocab_path or tasks_lib.DEFAULT_VOCAB_PATH
    try:
        vocabulary = tasks_lib.load_vocabulary(path)
        ids = tasks_lib.token_ids(vocabulary)
    except (FileNotFoundError, ValueError) as e:
        raise cli.InputError(" ".join(str(e).split())) from None
    for name, got in (("sos_id", ids.bos_id), ("eos_id", ids.eos_id), ("pad_id", ids.pad_id)):
        if getattr(model_config, name) != got:
            raise cli.UsageError(f"SpectronConfig.{name}={getattr(model_config, name)} but the tokenizer {path} "
                                 f"has {got} (include the converted LM's decoder.gin or bind SpectronConfig.{name})")
    if ids.vocab_size > model_config.decoder.vocab_size:
        raise cli.UsageError(f"DecoderConfig.vocab_size={model_config.decoder.vocab_size} is smaller than the "
                             f"{ids.vocab_size} pieces of the tokenizer {path}")
    sep_id = getattr(model_config, "sep_id", None)
    if task_config is not None and task_config.sep_id != sep_id:
        raise cli.UsageError(f"TaskConfig.sep_id={task_config.sep_id} but SpectronConfig.sep_id={sep_id}; "
                             "bind both the same (the run gins' SEP_ID)")
    if sep_id is not None:
        try:
            tasks_lib.check_separator(vocabulary, sep_id, path)
        except ValueError as e:
            raise cli.UsageError(f"{e}; rebuild it with a reserved separator or set SEP_ID = None") from None
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads data here: keep its logs quiet
    from spectron_jax import gin_config

    register_train_configurables()
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
    config = _build_train_config()
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
    config = _tokenizer_of_run(config, model_config, task_config)
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
