"""The functional, t5x-style interface to Spectron: pure functions of a params pytree.

    model = SpectronModel(config)
    module = model.make_module(seed=0)                 # or partitioning.sharded_init(model.module_factory(0), ...)
    graphdef, params, state = model.split(module)
    (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, rng)

State handling:
  * `params` is the `nnx.State` of every `nnx.Param`: what the optimizer updates and checkpoints hold.
  * `state` is every other variable except random-number streams: the running statistics of the
    encoder's batch norm when `ConformerConfig.conv_norm == 'batch'`, and empty otherwise. `loss_fn`
    reads it (default: empty) and drops updates; a training loop with batch norm calls
    `loss_and_state_fn`, whose aux output carries the new `state`, and keeps that for the next step.
  * random streams are not state: every call rebuilds them from its `rng` argument (dropout is a pure
    function of `rng`), so no call depends on the calls before it.

Decoding hooks (all deterministic, cache threaded explicitly; jit them with the model bound):
  encode_prompt -> prefix; init_cache; prefill(prefix + sos + text so far); text_step (one token);
  speech_step (one frame group through pre-net, decoder, post-net).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from spectron_jax import losses
from spectron_jax.models import acoustic
from spectron_jax.models.attention import DecoderCache, init_cache
from spectron_jax.models.spectron import Spectron, SpectronConfig, component_factories

Batch = Mapping[str, jax.Array]
_NON_PARAM_STATE = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))


class SpectronModel:
    """Builds `Spectron` from a `SpectronConfig` and exposes loss, scores and decoding hooks as pure
    functions of `(params, state, ...)`. A plain object: bind it into closures, `jax.jit` its methods."""

    def __init__(self, config: SpectronConfig):
        self.config = config

    # ---- construction --------------------------------------------------------------------------------
    def module_factory(self, seed: int = 0) -> Callable[[], Spectron]:
        """A zero-argument constructor (what `partitioning.sharded_init` and `nnx.eval_shape` take)."""
        return functools.partial(_build, self.config, seed)

    def make_module(self, seed: int = 0) -> Spectron:
        """A concrete, randomly initialised module (parameters drawn from `seed`)."""
        return self.module_factory(seed)()

    def abstract_module(self) -> Spectron:
        """The module with `jax.ShapeDtypeStruct` leaves: no memory allocated, any size.

        Each component is traced on its own: building every random draw of a 1B model in one trace
        costs time quadratic in the trace length.
        """
        parts = {name: nnx.eval_shape(functools.partial(_build_part, make))
                 for name, make in component_factories(self.config).items()}
        return Spectron(self.config, rngs=None, parts=parts)

    @functools.cached_property
    def _abstract(self) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
        graphdef, params, rng_state, state = nnx.split(self.abstract_module(), nnx.Param, nnx.RngState,
                                                       _NON_PARAM_STATE)
        return graphdef, params, rng_state, state

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self._abstract[0]

    @property
    def abstract_params(self) -> nnx.State:
        """The params pytree with `jax.ShapeDtypeStruct` leaves (logical axes in the metadata)."""
        return self._abstract[1]

    @property
    def has_state(self) -> bool:
        """Whether the model has non-parameter state (batch-norm statistics) to thread."""
        return bool(jax.tree.leaves(self._abstract[3]))

    def split(self, module: Spectron) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
        """`(graphdef, params, state)` of a module; random streams are left out (see the module docstring)."""
        graphdef, params, _, state = nnx.split(module, nnx.Param, nnx.RngState, _NON_PARAM_STATE)
        return graphdef, params, state

    def init(self, seed: int = 0) -> tuple[nnx.State, nnx.State]:
        """`(params, state)` of a fresh module."""
        _, params, state = self.split(self.make_module(seed))
        return params, state

    def merge(self, params: nnx.State, state: Optional[nnx.State] = None,
              rng: Optional[jax.Array] = None) -> Spectron:
        """A module holding `params` and `state`, its random streams seeded from `rng` (default key 0)."""
        if state is None:
            state = self._abstract[3]  # placeholders: must not be read (see _check_state)
        else:
            # Fresh Variable objects at the current trace level, so the module may update them even
            # when `state` comes from an enclosing transformation (e.g. jit around grad).
            state = jax.tree.map(lambda x: x, state)
        return nnx.merge(self.graphdef, params, self._fresh_rng_state(rng), state)

    def _fresh_rng_state(self, rng: Optional[jax.Array]) -> nnx.State:
        """New random-stream variables: stream i gets key fold_in(rng, i) and count 0.

        A stream of a scanned stack holds one key per layer ([layers]): split from fold_in(rng, i).
        """
        rng = jax.random.key(0) if rng is None else rng
        leaves, treedef = jax.tree.flatten(self._abstract[2])
        fresh = []
        for i, leaf in enumerate(leaves):
            if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                key = jax.random.fold_in(rng, i)
                fresh.append(jax.random.split(key, leaf.shape) if leaf.shape else key)
            else:
                fresh.append(jnp.zeros(leaf.shape, leaf.dtype))
        return jax.tree.unflatten(treedef, fresh)

    def _check_state(self, state: Optional[nnx.State]) -> None:
        if state is None and self.has_state:
            raise ValueError("this Spectron model has batch-norm statistics (conv_norm='batch'): pass `state` "
                             "from SpectronModel.split")

    # ---- training and evaluation -----------------------------------------------------------------------
    def _loss(self, module: Spectron, batch: Batch, rng: Optional[jax.Array],
              deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        rngs = None if rng is None else nnx.Rngs(dropout=rng)
        out = module(batch, deterministic=deterministic, rngs=rngs)
        return losses.spectron_loss(out.text_logits, batch, out.frames, out.stop_logits,
                                    self.config.loss_weights, self.config.max_time_delta_order,
                                    ctc_logits=out.ctc_logits, ctc_valid=out.prefix_valid,
                                    blank_id=self.config.pad_id)

    def loss_and_state_fn(self, params: nnx.State, state: Optional[nnx.State], batch: Batch, rng: jax.Array, *,
                          deterministic: bool = False) -> tuple[jax.Array, tuple[dict[str, jax.Array], nnx.State]]:
        """The training loss, and the non-parameter state after the step.

        Args:
          params: the params pytree (differentiate with respect to this argument).
          state: non-parameter state from `split` (None: the model must have none).
          batch: a model batch (see the batch contract).
          rng: a PRNG key; every dropout mask is drawn from it.
          deterministic: True turns dropout off (and uses batch-norm running statistics).

        Returns:
          (loss float32 [], (metrics {name: float32 []}, new state)).
        """
        self._check_state(state)
        stream_key, call_key = jax.random.split(rng)
        module = self.merge(params, state, stream_key)
        loss, metrics = self._loss(module, batch, call_key, deterministic)
        return loss, (metrics, nnx.state(module, _NON_PARAM_STATE))

    def loss_fn(self, params: nnx.State, batch: Batch, rng: jax.Array, state: Optional[nnx.State] = None, *,
                deterministic: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training loss `(loss float32 [], metrics)`, for `jax.value_and_grad(..., has_aux=True)`.

        Dropout is keyed from `rng`. Updates of `state` (batch-norm statistics) are dropped: use
        `loss_and_state_fn` to keep them.
        """
        loss, (metrics, _) = self.loss_and_state_fn(params, state, batch, rng, deterministic=deterministic)
        return loss, metrics

    def eval_fn(self, params: nnx.State, batch: Batch, state: Optional[nnx.State] = None,
                rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The loss and its terms with dropout off (the pre-net keeps it if configured for inference)."""
        rng = jax.random.key(0) if rng is None else rng
        return self.loss_fn(params, batch, rng, state, deterministic=True)

    def score_batch(self, params: nnx.State, batch: Batch, state: Optional[nnx.State] = None,
                    rng: Optional[jax.Array] = None) -> dict[str, jax.Array]:
        """Per-example scores of a teacher-forced, deterministic pass.

        Returns:
          text_log_likelihood float32 [batch]: Σ log p(target) over the row's valid text targets;
          text_tokens float32 [batch]: the number of those targets;
          spectrogram_l1 float32 [batch]: mean |post-net frame − target| over valid frames × mel bins;
          num_frames float32 [batch]: valid continuation frames.
        """
        self._check_state(state)
        module = self.merge(params, state, rng)
        out = module(batch, deterministic=True)
        weights = jnp.asarray(batch["text_weights"], jnp.float32)
        nll, _ = losses.token_nll_and_log_z(out.text_logits, batch["text_targets"], weights)
        valid = jnp.asarray(batch["cont_mask"]) > 0  # [batch, cont_len]
        pred = acoustic.flatten_groups(out.frames).astype(jnp.float32)
        error = jnp.where(valid[..., None], jnp.abs(pred - jnp.asarray(batch["cont_frames"], jnp.float32)), 0.0)
        num_frames = jnp.sum(valid.astype(jnp.float32), axis=1)
        l1 = jnp.sum(error, axis=(1, 2)) / jnp.maximum(num_frames * pred.shape[-1], 1.0)
        return {
            "text_log_likelihood": -jnp.sum(nll * weights, axis=1),
            "text_tokens": jnp.sum(weights, axis=1),
            "spectrogram_l1": l1,
            "num_frames": num_frames,
        }

    # ---- decoding hooks --------------------------------------------------------------------------------
    def cache_len(self, prompt_len: int, text_len: int, cont_len: int) -> int:
        """Slots a cache needs for a whole row: prefix + text + speech steps."""
        return self.config.sequence_len(prompt_len, text_len, cont_len)

    def init_cache(self, batch: int, max_len: int) -> DecoderCache:
        """An empty KV cache for `batch` rows of `max_len` slots (see `cache_len`)."""
        cfg = self.config.decoder
        return init_cache(batch, max_len, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, dtype=cfg.dtype, scan_period=cfg.scan_period)

    def encode_prompt(self, params: nnx.State, prompt_frames: jax.Array, prompt_mask: jax.Array,
                      state: Optional[nnx.State] = None) -> tuple[jax.Array, jax.Array]:
        """Prompt log-mel [batch, prompt_len, mel] + mask [batch, prompt_len] ->
        (prefix [batch, F, embed], prefix_valid bool [batch, F]), deterministically."""
        self._check_state(state)
        return self.merge(params, state).encode_prompt(prompt_frames, prompt_mask, deterministic=True)

    def prefill(self, params: nnx.State, prefix: jax.Array, prefix_valid: jax.Array, tokens: jax.Array,
                token_valid: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
        """Writes prefix [batch, F, embed] and text tokens int [batch, T] (sos y_1 … y_k; token_valid bool
        [batch, T]) into an empty cache. Returns (logits float32 [batch, T, vocab], cache)."""
        return self.merge(params).prefill(prefix, prefix_valid, tokens, token_valid, cache)

    def text_step(self, params: nnx.State, tokens: jax.Array, cache: DecoderCache,
                  valid: jax.Array | bool = True) -> tuple[jax.Array, DecoderCache]:
        """Feeds tokens int [batch]; returns (next-token logits float32 [batch, vocab], cache)."""
        return self.merge(params).text_step(tokens, cache, valid)

    def speech_step(self, params: nnx.State, previous: Optional[jax.Array], cache: DecoderCache, *,
                    start: jax.Array | bool = False, valid: jax.Array | bool = True,
                    rng: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[jax.Array], DecoderCache]:
        """One speech step (see `Spectron.speech_step`): previous group [batch, r, mel] (or the eos
        embedding where `start`) -> (frames [batch, r, mel], stop logit [batch] or None, cache).

        `rng` keys the pre-net's inference-time dropout (`prenet_dropout_at_inference`); pass a fresh key
        per step for Tacotron-style variation. A key array [batch] gives each row its own key: a row's mask
        then depends on its key only, not on the batch it runs in.
        """
        if rng is None and self.config.acoustic.prenet_dropout_at_inference and previous is not None:
            # Without a key every call would rebuild the same stream and so draw the same mask.
            raise ValueError("speech_step: the pre-net keeps dropout at inference; pass a fresh `rng` per step")
        if rng is not None and jnp.ndim(rng) == 1:
            return self.merge(params).speech_step(previous, cache, start=start, valid=valid, row_keys=rng)
        module = self.merge(params, rng=rng)
        rngs = None if rng is None else nnx.Rngs(dropout=jax.random.fold_in(rng, 1))
        return module.speech_step(previous, cache, start=start, valid=valid, rngs=rngs)


def _build(config: SpectronConfig, seed: int) -> Spectron:
    # One stream: dropout modules fork it, and every call reseeds the forks from its own rng anyway.
    return Spectron(config, rngs=nnx.Rngs(seed))


def _build_part(make: Callable[[nnx.Rngs], Any], seed: int = 0) -> Any:
    return make(nnx.Rngs(seed))

