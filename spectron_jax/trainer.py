"""The train state, the optimizer and learning-rate schedule, and the train / eval steps.

`FunctionalSpectron` exposes the model as pure functions of a params dict; `train_state_layout`
gives the state's init function, shapes and shardings; `make_train_step` the pure step that
`spectron_jax.train` compiles with in/out shardings and a donated state.

The train state is a plain dict of arrays (what checkpoints hold):

    step       int32 []          optimizer updates done
    rng        uint32 [2]        key data of the run's base PRNG key; step s uses fold_in(key, s)
    params     nested dict       the model parameters (`nnx.State.to_pure_dict()`), float32
    opt_state  optax state       moments etc.; frozen parameters have none

The step differentiates a pure `loss_fn(params, batch, rng) -> (loss, metrics)`. Mixed precision: the
parameters and the optimizer stay float32; with `compute_dtype='bfloat16'` floating parameters are cast
to bfloat16 inside the step (the loss itself is computed in float32 by `spectron_jax.losses`), so the
gradients flow back to float32 master weights. Gradient accumulation splits the batch into
`microbatches` strided parts and sums their gradients with a `lax.scan`, each part's loss normalised by
the whole batch's counts (exactly one pass's loss and gradient with dropout off; see `StepConfig`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spectron_jax import losses

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, schedule and clipping (paper.md §5 gives none of these: all DEFAULT, not in the paper).

    Attributes:
      name: 'adamw' or 'adafactor'. DEFAULT: adamw.
      learning_rate: peak learning rate after warm-up. DEFAULT: 3e-4.
      warmup_steps: linear warm-up from 0 to the peak. DEFAULT: 1000.
      decay: 'cosine' (to end_lr_fraction · peak at decay_steps), 'rsqrt' (peak · sqrt(warmup / step)
        after warm-up) or 'constant'. DEFAULT: cosine.
      decay_steps: length of the cosine schedule, warm-up included; None = the run's TRAIN_STEPS.
      end_lr_fraction: final learning rate of the cosine as a fraction of the peak. DEFAULT: 0.1.
      b1, b2, eps: AdamW moments. DEFAULT: 0.9, 0.98 (PaLM-style), 1e-8.
      weight_decay: decoupled weight decay (AdamW; Adafactor's weight_decay_rate). DEFAULT: 0.01.
      adafactor_decay_rate: Adafactor's second-moment decay exponent. DEFAULT: 0.8.
      grad_clip_norm: clip the global gradient norm to this; None = no clipping. DEFAULT: 1.0.
      freeze: regexes over parameter paths ('encoder/...'); matching parameters are not updated and
        carry no optimizer state. DEFAULT: none (the paper trains all modules end to end).
    """

    name: str = "adamw"
    learning_rate: float = 3e-4
    warmup_steps: int = 1000
    decay: str = "cosine"
    decay_steps: Optional[int] = None
    end_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.01
    adafactor_decay_rate: float = 0.8
    grad_clip_norm: Optional[float] = 1.0
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        if self.name not in ("adamw", "adafactor"):
            raise ValueError(f"OptimizerConfig.name must be 'adamw' or 'adafactor', got {self.name!r}")
        if self.decay not in ("cosine", "rsqrt", "constant"):
            raise ValueError(f"OptimizerConfig.decay must be cosine, rsqrt or constant, got {self.decay!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        object.__setattr__(self, "freeze", tuple(self.freeze))
        for pattern in self.freeze:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"OptimizerConfig.freeze: bad regex {pattern!r}: {e}") from None


def learning_rate_schedule(config: OptimizerConfig, train_steps: int) -> optax.Schedule:
    """lr(step): linear warm-up to the peak, then the configured decay (step counts updates from 0)."""
    peak = config.learning_rate
    warmup = config.warmup_steps
    decay_steps = max(config.decay_steps or train_steps, warmup + 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1)) if warmup else 1.0
        if config.decay == "constant":
            return peak * warm
        if config.decay == "rsqrt":
            return peak * warm * jnp.sqrt(max(warmup, 1) / jnp.maximum(step + 1.0, max(warmup, 1)))
        progress = jnp.clip((step - warmup) / (decay_steps - warmup), 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return peak * warm * (config.end_lr_fraction + (1.0 - config.end_lr_fraction) * cosine)

    return schedule


def path_of(key_path) -> str:
    """'encoder/layers/0/kernel' for a pytree key path."""
    parts = []
    for key in key_path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    return "/".join(parts)


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
    """A pytree of bools like `params`: True where a parameter's path matches one of `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(lambda kp, _: any(c.search(path_of(kp)) for c in compiled), params)


def make_optimizer(config: OptimizerConfig, train_steps: int, params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule): clipping + AdamW / Adafactor on trainable leaves, zero on frozen ones."""
    schedule = learning_rate_schedule(config, train_steps)
    if config.name == "adamw":
        base = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    else:
        base = optax.adafactor(schedule, decay_rate=config.adafactor_decay_rate,
                               weight_decay_rate=config.weight_decay or None, clipping_threshold=None)
    parts = ([optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []) + [base]
    tx = optax.chain(*parts)
    if config.freeze:
        mask = frozen_mask(params, config.freeze)
        if not any(jax.tree.leaves(mask)):
            raise ValueError(f"OptimizerConfig.freeze {config.freeze} matches no parameter")
        labels = jax.tree.map(lambda frozen: "frozen" if frozen else "train", mask)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


# ---- Shardings of the state ----------------------------------------------------------------------
def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, params: Any, mesh) -> Any:
    """Shardings for an optax state: a leaf whose key path ends with a parameter's path and has its
    shape takes that parameter's sharding (moments); everything else is replicated (counts, factored
    Adafactor rows / columns)."""
    by_path = {}
    for (kp, p), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings)):
        by_path[tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)] = (tuple(np.shape(p)), s)
    replicated = lambda x: NamedSharding(mesh, PartitionSpec(*([None] * np.ndim(x))))  # noqa: E731

    def one(kp, x):
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in kp)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(np.shape(x)):
                return hit[1]
        return replicated(x)

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def replicated_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ---- The step ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How one step computes.

    Attributes:
      compute_dtype: dtype the parameters are cast to for the forward/backward pass ('float32' or
        'bfloat16'); 'auto' = bfloat16 on TPU / GPU, float32 on CPU.
      microbatches: gradient accumulation: the batch is split into this many strided parts (must
        divide the rows each batch-sharded device holds), whose gradients are summed in a `lax.scan`.
        Every mean of the loss (text cross-entropy, z-loss, frame, frequency- and time-delta terms,
        stop) divides each part's sum by the whole batch's count (`losses.loss_normalizers`), so the
        loss, its gradient and every term equal one pass over the whole batch exactly, however the
        valid tokens and frames fall across the parts; count metrics are summed. That equality holds
        with dropout off. With dropout on, microbatch j draws its masks from fold_in(step key, j)
        (every dropout layer draws one mask for its whole input), so each row gets other masks than
        in one pass: the step is an equally likely sample of the same dropout, not the same numbers,
        and changing `microbatches` changes the masks of a resumed run from then on. Per-row keys
        would need every dropout site to draw masks row by row. DEFAULT: 1.
    """

    compute_dtype: str = "auto"
    microbatches: int = 1

    def __post_init__(self):
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"StepConfig.compute_dtype must be auto, float32 or bfloat16, got {self.compute_dtype!r}")
        if self.microbatches < 1:
            raise ValueError(f"StepConfig.microbatches must be >= 1, got {self.microbatches}")

    def resolved_dtype(self, platform: str) -> jnp.dtype:
        """The compute dtype on `platform` (`resolve_compute_dtype`)."""
        return resolve_compute_dtype(self.compute_dtype, platform)


def resolve_compute_dtype(name: str, platform: str) -> jnp.dtype:
    """'float32' / 'bfloat16' as given; 'auto' = float32 on 'cpu', bfloat16 on any accelerator ('tpu', 'gpu'
    (what JAX calls a CUDA or ROCm device), ...): their matrix units run bfloat16 at full rate."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


def cast_floating(tree: Any, dtype) -> Any:
    """Floating leaves of `tree` cast to `dtype` (others untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _split_microbatches(batch: Mapping[str, jax.Array], microbatches: int) -> dict[str, jax.Array]:
    """{key: [microbatches, batch / microbatches, ...]}, microbatch j = rows j, j + M, j + 2M, ...

    Strided, not blocked: with the batch sharded in contiguous blocks over D devices (and
    batch / D divisible by M), every microbatch keeps batch / (D M) rows on every device, so the
    split moves no data and each pass uses every device.
    """
    out = {}
    for key, value in batch.items():
        rows = value.shape[0]
        if rows % microbatches:
            raise ValueError(f"batch of {rows} rows does not split into {microbatches} microbatches")
        strided = value.reshape((rows // microbatches, microbatches) + value.shape[1:])
        out[key] = jnp.swapaxes(strided, 0, 1)
    return out


# Metrics that are counts: summed over microbatches even when the loss has no normalisers.
_COUNT_TERMS = ("num_text_tokens", "num_frames")


def make_microbatch_pass(loss_fn: LossFn, compute_dtype, scale: float = 1.0) -> Callable:
    """`grad_pass(params, one, rng, normalizers) -> ((loss, metrics), grads)`: one microbatch's loss
    (times `scale`) and its gradient; `normalizers` (or None) go into the microbatch under
    `losses.NORMALIZERS_KEY`, so every mean divides by the whole batch's count."""

    def microbatch_loss(params, one, rng, normalizers):
        if normalizers is not None:
            one = dict(one, **{losses.NORMALIZERS_KEY: normalizers})
        loss, metrics = loss_fn(cast_floating(params, compute_dtype), one, rng)
        return loss.astype(jnp.float32) * scale, metrics

    return jax.value_and_grad(microbatch_loss, has_aux=True)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: StepConfig, compute_dtype, frozen: Any = None,
                    normalizers_fn: Optional[Callable] = None) -> Callable:
    """`train_step(state, batch) -> (state, metrics)` (pure; jit it with shardings and donation).

    Args:
      loss_fn: `(params, batch, rng) -> (loss float32 [], metrics {name: float32 []})`.
      tx, schedule: from `make_optimizer`.
      config: dtype and accumulation.
      compute_dtype: the resolved compute dtype.
      frozen: bool pytree like params (True = frozen) or None; frozen gradients are left out of the
        gradient norm.
      normalizers_fn: `batch -> {name: float32 []}`, the normaliser of every mean of `loss_fn`
        (`FunctionalSpectron.loss_normalizers`); with accumulation, each microbatch divides by the
        whole batch's, so the microbatch losses, gradients and metrics add up to one pass's exactly.
        None (a loss without masks): microbatch means are averaged with equal weights, which is
        exact for a per-row mean over equal microbatches.

    Metrics returned: every term of `loss_fn`'s metrics, plus `grad_norm` (global L2 norm of the
    trainable gradients before clipping), `learning_rate` (of this step) and `param_norm`.
    """
    micro_count = config.microbatches

    def train_step(state, batch):
        params = state["params"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if micro_count == 1:
            (loss, metrics), grads = make_microbatch_pass(loss_fn, compute_dtype)(params, batch, rng, None)
        else:
            micro = _split_microbatches(batch, micro_count)
            normalizers = None if normalizers_fn is None else normalizers_fn(batch)
            scale = 1.0 if normalizers is not None else 1.0 / micro_count
            grad_pass = make_microbatch_pass(loss_fn, compute_dtype, scale)
            (_, metrics_shape), _ = jax.eval_shape(
                grad_pass, params, jax.tree.map(lambda x: x[0], micro), rng, normalizers)

            def accumulate(carry, inputs):
                index, one = inputs
                (loss_i, metrics_i), grads_i = grad_pass(params, one, jax.random.fold_in(rng, index), normalizers)
                grads_sum, loss_sum, metrics_sum = carry
                metrics_i = {k: v if k in _COUNT_TERMS else v * scale for k, v in metrics_i.items()}
                return (jax.tree.map(jnp.add, grads_sum, grads_i), loss_sum + loss_i,
                        jax.tree.map(jnp.add, metrics_sum, metrics_i)), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
                     jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics_shape))
            (grads, loss, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(micro_count), micro))
        trainable = grads if frozen is None else jax.tree.map(
            lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(trainable)
        metrics["param_norm"] = optax.global_norm(new_params)
        metrics["learning_rate"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        new_state = {"step": state["step"] + 1, "rng": state["rng"], "params": new_params, "opt_state": opt_state}
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return train_step


def count_params(params: Any) -> dict[str, int]:
    """{'total': n, <top-level name>: n, ...} parameter counts of a nested dict of arrays."""
    counts = {"total": int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))}
    if isinstance(params, Mapping):
        for key, value in params.items():
            counts[str(key)] = int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(value)))
    return counts


# ---- The model as functions of a params dict, and the state's layout ------------------------------
class FunctionalSpectron:
    """`SpectronModel` over params held as a plain nested dict (what the train state and checkpoints hold).

    init_params(seed) -> params dict; loss_fn(params, batch, rng) -> (loss, metrics);
    predict_frames(params, batch) -> float32 [batch, cont_len, mel] (teacher-forced post-net output);
    param_shardings(rules, mesh) -> dict of NamedSharding like params.
    """

    def __init__(self, config):
        from spectron_jax.models import spectron_model

        self.model = spectron_model.SpectronModel(config)
        if self.model.has_state:
            raise ValueError("ConformerConfig.conv_norm='batch' keeps running statistics, which training "
                             "does not thread yet; use 'layer' or 'group'")
        abstract = self.model.abstract_params
        self._treedef = jax.tree.structure(abstract)
        # `to_state` relies on the params dict and the nnx.State flattening in the same order.
        pure_paths = [path_of(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))]
        state_paths = [path_of(kp).removesuffix("/value")
                       for kp, _ in jax.tree_util.tree_leaves_with_path(abstract)]
        if pure_paths != state_paths:
            raise RuntimeError("the params dict and the model's nnx.State flatten in different orders")

    def init_params(self, seed: int):
        with nnx.use_eager_sharding(False):
            module = self.model.module_factory(seed)()
        _, params, _ = self.model.split(module)
        return nnx.to_pure_dict(params)

    def to_state(self, params):
        return jax.tree.unflatten(self._treedef, jax.tree.leaves(params))

    def loss_fn(self, params, batch, rng):
        return self.model.loss_fn(self.to_state(params), batch, rng)

    def loss_normalizers(self, batch):
        """The normaliser of every mean of `loss_fn` for `batch` (`losses.loss_normalizers`)."""
        config = self.model.config
        stop = config.reduction_factor if config.acoustic.stop_head else None
        return losses.loss_normalizers(batch, config.max_time_delta_order, stop)

    def eval_fn(self, params, batch):
        """The loss terms with dropout off (the model's deterministic eval function)."""
        return self.model.eval_fn(self.to_state(params), batch)

    def predict_frames(self, params, batch):
        from spectron_jax.models import acoustic
        out = self.model.merge(self.to_state(params))(batch, deterministic=True)
        return acoustic.flatten_groups(out.frames)

    def param_shardings(self, rules, mesh):
        from spectron_jax import partitioning

        return nnx.to_pure_dict(partitioning.param_shardings(self.model.abstract_params, rules, mesh))


@dataclasses.dataclass
class TrainStateLayout:
    """What the train state looks like before any array exists.

    init_state: zero-argument function building the state (jit it with out_shardings=shardings);
    abstract: its `jax.ShapeDtypeStruct` tree; shardings: a `NamedSharding` per leaf;
    tx, schedule: the optimizer and learning-rate schedule.
    """

    init_state: Any
    abstract: Any
    shardings: Any
    tx: Any
    schedule: Any


def train_state_layout(model: FunctionalSpectron, config: Any, train_steps: int, mesh) -> TrainStateLayout:
    """The train state's init function, shapes and shardings (parameters by their logical axes and
    `config.rules`, optimizer moments like their parameters, step / rng replicated).

    `config` is a `train.TrainConfig` (fields seed, rules, optimizer are read).
    """

    def init_state():
        params = model.init_params(config.seed)
        tx, _ = make_optimizer(config.optimizer, train_steps, params)
        return {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(config.seed + 1)),
                "params": params, "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init_state)
    param_shardings = model.param_shardings(config.rules, mesh)
    tx, schedule = make_optimizer(config.optimizer, train_steps, abstract["params"])
    shardings = {
        "step": replicated_sharding(mesh), "rng": replicated_sharding(mesh),
        "params": param_shardings,
        "opt_state": opt_state_shardings(abstract["opt_state"], param_shardings, abstract["params"], mesh),
    }
    return TrainStateLayout(init_state, abstract, shardings, tx, schedule)
