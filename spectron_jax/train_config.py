"""`TrainConfig`: every knob of a training run besides the model, and its gin registration.

The CLI (`train.main`) builds it from the parsed gin bindings (`build_train_config`); library callers
construct it directly. The configs it holds (`trainer.OptimizerConfig`, `trainer.StepConfig`,
`checkpoints.CheckpointConfig`, `partitioning.MeshConfig`) are built lazily so that importing this
module stays light.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from spectron_jax import cli
from spectron_jax.multihost import DistributedConfig


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
        gives one (JAX_COMPILATION_CACHE_DIR), else `compile_cache.default_compilation_cache_dir()` (the
        user cache); '' disables it; any other value is the folder (local or an object store). DEFAULT
        None.
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


def build_train_config() -> "TrainConfig":
    """TrainConfig with the parsed gin bindings; a bad value becomes a one-line UsageError."""
    try:
        return register_train_configurables()["TrainConfig"]()
    except cli.CLIError:
        raise
    except Exception as e:  # noqa: BLE001 - a config's __post_init__ rejecting a value
        raise cli.UsageError(f"gin config: cannot build TrainConfig: {' '.join(str(e).split())}") from None
