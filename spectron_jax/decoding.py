"""Batched, jit-compiled Spectron generation: prompt -> transcript + continuation text -> frames.

The order of paper §6: encode the prompt, prefill `[prefix | sos]` once, then

  text    a `lax.while_loop` of `text_step`s (greedy / temperature / top-k / top-p) until every row
          has sampled `eos` or `max_text_tokens` tokens were sampled;
  speech  a `lax.while_loop` of `speech_step`s: step 0 reads the `eos` embedding, step s reads
          pre-net(group s-1); r frames per step; a row stops when its stop head fires (models with a
          stop head) or its frame budget is spent.

Rows run in lockstep: a row that finished its text writes invisible slots (valid=False) while the others
still write text, so every row's rotary positions and attention see exactly the slots of its own
teacher-forced row (`tests/test_decoding.py` checks cached == uncached at every step).

The frame budget of a row is `clip(ceil(frames_per_token * text tokens), min_frames, max_frames)`
(DEFAULT knobs, not in the paper), the text tokens being those after the separator when the model
writes one (`SpectronConfig.sep_id`: the continuation the speech says), else the whole text. The stop
head cannot end a row before `min_frames`, and a row emits at most its budget: with r > 1 the frames of
the last group beyond the budget are not returned. A row ended by its stop head emits its whole last
group: the head gives one logit per group (trained towards 1 at the group holding the last valid frame,
`acoustic.stop_targets`), so where inside that group the speech ends is not known to the model; cutting
it would need a per-frame stop target.

Randomness is per row: row b's key is fold_in(key(seed), row_ids[b]); its text step i draws from
fold_in(fold_in(row key, 0), i) and its speech step s masks the pre-net with fold_in(fold_in(row key, 1), s).
A row's output therefore depends on its prompt, the seed and its id only, not on the batch it runs in,
its position there or the other rows (up to the rounding a different batch shape gives).

One compile per model, shape and *static* knobs: seed, temperature, top_k, top_p, stop_threshold,
min_frames and frames_per_token are traced arguments (`TRACED_KNOBS`), so changing them reuses the
compiled program. Rows with `row_valid=False` are dummies (padding a ragged batch to its bucket): they
sample nothing, generate no frames and never hold up the loops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax.models.spectron_model import SpectronModel


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Knobs of `generate` (all DEFAULTs: the paper gives none).

    Attributes:
      prompt_seconds: seconds of the input used as the prompt (the paper's 3 s).
      max_text_tokens: text tokens sampled at most (eos included).
      temperature: 0 = greedy; otherwise logits / temperature are sampled.
      top_k: keep the k most likely tokens (0 = all).
      top_p: nucleus sampling mass (1.0 = all).
      max_frames: cap of generated frames per row.
      min_frames: floor of the frame budget; the stop head cannot end a row before it either.
      frames_per_token: frame budget per text token (80 frames/s; ~0.1 s per token).
      stop_threshold: the stop head fires when sigmoid(stop logit) > this.
      prenet_dropout: keep the pre-net's dropout on while generating (Tacotron 2 does); None = the
        model's `prenet_dropout_at_inference`. A fresh mask is drawn at every step.
      keep_logits: also return the text logits of every sampled step (for tests / scoring).
      seed: the PRNG seed of sampling and pre-net dropout (with each row's id: see the module docstring).

    `TRACED_KNOBS` are run-time arguments of the compiled program (changing them does not recompile);
    the others fix the program's shapes or structure. top_k is traced too, its static maximum the
    vocabulary size.
    """

    prompt_seconds: float = 3.0
    max_text_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_frames: int = 800
    min_frames: int = 80
    frames_per_token: float = 8.0
    stop_threshold: float = 0.5
    prenet_dropout: Optional[bool] = None
    keep_logits: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.max_text_tokens < 1:
            raise ValueError(f"DecodeConfig.max_text_tokens must be >= 1, got {self.max_text_tokens}")
        if self.max_frames < 1 or self.min_frames < 1:
            raise ValueError("DecodeConfig.max_frames and min_frames must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"DecodeConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"DecodeConfig.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"DecodeConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.prompt_seconds <= 0:
            raise ValueError(f"DecodeConfig.prompt_seconds must be > 0, got {self.prompt_seconds}")


TRACED_KNOBS = ("seed", "temperature", "top_k", "top_p", "stop_threshold", "min_frames", "frames_per_token")


def _truncate(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [batch, vocab] with every token outside the top-k, then outside the top-p mass, at -inf-ish.

    top_k int32 [] (0 = all), top_p float32 []. Works on the sorted logits, so k needs no static bound
    below the vocabulary size; tokens tied with the last kept one are kept too.
    """
    vocab = logits.shape[-1]
    neg = jnp.finfo(jnp.float32).min
    ordered = -jnp.sort(-logits, axis=-1)  # [batch, vocab], descending
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_k = rank < k
    probs = jax.nn.softmax(jnp.where(in_k, ordered, neg), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above; the first one stays
    kept = jnp.sum((in_k & (before < top_p)).astype(jnp.int32), axis=-1)  # [batch], >= 1
    threshold = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)  # [batch, 1]
    return jnp.where(logits >= threshold, logits, neg)


def sample_logits(logits: jax.Array, keys: jax.Array, temperature: Any, top_k: Any = 0,
                  top_p: Any = 1.0) -> jax.Array:
    """logits float32 [batch, vocab] -> token ids int32 [batch] (greedy where temperature == 0).

    keys: one PRNG key per row ([batch] key array), so a row's draw does not depend on the other rows.
    temperature, top_k, top_p: Python or traced scalars.
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), _truncate, lambda x, *_: x, scaled, top_k, top_p)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def row_keys(seed: Any, row_ids: jax.Array) -> jax.Array:
    """[batch] PRNG keys: fold_in(key(seed), row id) for row ids int [batch]."""
    base = jax.random.key(jnp.asarray(seed, jnp.uint32))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(row_ids, jnp.int32))


def step_keys(keys: jax.Array, stream: int, step: jax.Array) -> jax.Array:
    """[batch] keys of one step: fold_in(fold_in(key, stream), step) per row."""
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, stream), step))(keys)


def _knobs(config: "DecodeConfig") -> dict[str, np.ndarray]:
    """The traced knobs of `config` as arrays (the run-time arguments of the compiled program)."""
    ints = ("seed", "top_k", "min_frames")
    values = {name: getattr(config, name) for name in TRACED_KNOBS}
    values["seed"] = int(values["seed"]) % 2**32
    return {name: np.asarray(v, np.uint32 if name == "seed" else np.int32 if name in ints else np.float32)
            for name, v in values.items()}


def _static(config: "DecodeConfig") -> "DecodeConfig":
    """`config` with its traced knobs at their defaults: the part that keys a compile."""
    defaults = DecodeConfig()
    return dataclasses.replace(config, **{name: getattr(defaults, name) for name in TRACED_KNOBS})


def continuation_lengths(tokens: jax.Array, lengths: jax.Array, sep_id: Optional[int]) -> jax.Array:
    """int32 [batch]: the text tokens the speech says, of tokens int32 [batch, T] (the first `lengths`
    [batch] are real): those after the first separator when the model writes one (`sep_id`), else all."""
    if sep_id is None:
        return lengths
    index = jnp.arange(tokens.shape[1])[None, :]
    is_sep = (tokens == sep_id) & (index < lengths[:, None])
    first = jnp.where(jnp.any(is_sep, axis=1), jnp.argmax(is_sep, axis=1), -1)
    return lengths - (first + 1)


def speech_steps(config: DecodeConfig, reduction_factor: int) -> int:
    """Decoder steps of the speech buffer: ceil(max_frames / r)."""
    return math.ceil(config.max_frames / reduction_factor)


def cache_len(prefix_len: int, config: DecodeConfig, reduction_factor: int) -> int:
    """Slots a row needs: prefix + sos + text tokens + speech steps."""
    return prefix_len + 1 + config.max_text_tokens + speech_steps(config, reduction_factor)


def _with_prenet_dropout(model: SpectronModel, prenet_dropout: Optional[bool]) -> SpectronModel:
    cfg = model.config
    if prenet_dropout is None or prenet_dropout == cfg.acoustic.prenet_dropout_at_inference:
        return model
    acoustic = dataclasses.replace(cfg.acoustic, prenet_dropout_at_inference=bool(prenet_dropout))
    return SpectronModel(dataclasses.replace(cfg, acoustic=acoustic))


def _generate(model: SpectronModel, config: DecodeConfig, params: Any, prompt_frames: jax.Array,
              prompt_mask: jax.Array, keys: jax.Array, row_valid: jax.Array, knobs: dict[str, jax.Array],
              state: Any = None) -> dict[str, jax.Array]:
    cfg = model.config
    r = cfg.reduction_factor
    batch = prompt_frames.shape[0]
    num_mel = cfg.acoustic.num_mel  # the prompt may hold other features (e.g. 160 stacked fbank values)
    T = config.max_text_tokens
    S = speech_steps(config, r)

    prefix, prefix_valid = model.encode_prompt(params, prompt_frames, prompt_mask, state)
    cache = model.init_cache(batch, cache_len(prefix.shape[1], config, r))
    sos = jnp.full((batch, 1), cfg.sos_id, jnp.int32)
    logits, cache = model.prefill(params, prefix, prefix_valid, sos, jnp.ones((batch, 1), bool), cache)
    logits = logits[:, 0]
    vocab = logits.shape[-1]

    text_init = {
        "i": jnp.zeros((), jnp.int32), "logits": logits, "cache": cache,
        "tokens": jnp.full((batch, T), cfg.pad_id, jnp.int32), "lengths": jnp.zeros((batch,), jnp.int32),
        "done": ~row_valid, "ended": jnp.zeros((batch,), bool),
    }
    if config.keep_logits:
        text_init["all_logits"] = jnp.zeros((batch, T, vocab), jnp.float32)

    def text_cond(c):
        return (c["i"] < T) & ~jnp.all(c["done"])

    def text_body(c):
        i = c["i"]
        token = sample_logits(c["logits"], step_keys(keys, 0, i), knobs["temperature"], knobs["top_k"],
                              knobs["top_p"])
        emit = ~c["done"]
        is_eos = token == cfg.eos_id
        feed = emit & ~is_eos
        out = dict(c)
        out["tokens"] = c["tokens"].at[:, i].set(jnp.where(emit, token, cfg.pad_id))
        if config.keep_logits:
            out["all_logits"] = c["all_logits"].at[:, i].set(jnp.where(emit[:, None], c["logits"], 0.0))
        out["lengths"] = c["lengths"] + feed.astype(jnp.int32)
        out["ended"] = c["ended"] | (emit & is_eos)
        out["done"] = c["done"] | is_eos
        out["logits"], out["cache"] = model.text_step(params, jnp.where(feed, token, cfg.pad_id), c["cache"], feed)
        out["i"] = i + 1
        return out

    text = jax.lax.while_loop(text_cond, text_body, text_init)

    min_frames = jnp.minimum(knobs["min_frames"], config.max_frames)
    spoken = continuation_lengths(text["tokens"], text["lengths"], getattr(cfg, "sep_id", None))
    budget_frames = jnp.clip(jnp.ceil(knobs["frames_per_token"] * jnp.maximum(spoken, 1)),
                             min_frames, config.max_frames).astype(jnp.int32)
    budget_steps = -(-budget_frames // r)
    min_steps = -(-min_frames // r)  # the stop head may fire from the step that reaches min_frames
    has_stop = cfg.acoustic.stop_head
    speech_init = {
        "s": jnp.zeros((), jnp.int32), "previous": jnp.zeros((batch, r, num_mel), prompt_frames.dtype),
        "cache": text["cache"], "frames": jnp.zeros((batch, S, r, num_mel), jnp.float32),
        "stop_logits": jnp.zeros((batch, S), jnp.float32), "active": jnp.ones((batch,), bool),
        "steps": jnp.zeros((batch,), jnp.int32), "stopped": jnp.zeros((batch,), bool),
    }
    speech_init["active"] = row_valid

    def speech_cond(c):
        return (c["s"] < S) & jnp.any(c["active"])

    def speech_body(c):
        s, active = c["s"], c["active"]
        group, stop, cache = model.speech_step(params, c["previous"], c["cache"], start=s == 0, valid=active,
                                               rng=step_keys(keys, 1, s))
        group = group.astype(jnp.float32)
        out = dict(c)
        out["cache"] = cache
        out["frames"] = c["frames"].at[:, s].set(jnp.where(active[:, None, None], group, 0.0))
        out["previous"] = group.astype(c["previous"].dtype)
        out["steps"] = c["steps"] + active.astype(jnp.int32)
        fire = jnp.zeros_like(active)
        if has_stop:
            stop = stop.astype(jnp.float32)
            out["stop_logits"] = c["stop_logits"].at[:, s].set(jnp.where(active, stop, 0.0))
            fire = (jax.nn.sigmoid(stop) > knobs["stop_threshold"]) & (s + 1 >= min_steps)
        out["stopped"] = c["stopped"] | (active & fire)
        out["active"] = active & ~fire & (s + 1 < budget_steps)
        out["s"] = s + 1
        return out

    speech = jax.lax.while_loop(speech_cond, speech_body, speech_init)
    result = {
        "text_tokens": text["tokens"],            # [batch, T], eos included where sampled, pad after
        "text_lengths": text["lengths"],          # [batch], tokens before eos
        "text_ended": text["ended"],              # [batch], True where eos was sampled
        "frames": speech["frames"].reshape(batch, S * r, num_mel),  # [batch, S*r, mel]
        # [batch]: a row stopped by its budget ends at the budget, not at the end of its last group
        "num_frames": jnp.where(speech["stopped"], speech["steps"] * r, jnp.minimum(speech["steps"] * r,
                                                                                     budget_frames)),
        "stopped": speech["stopped"],             # [batch], True where the stop head fired
        "stop_logits": speech["stop_logits"],     # [batch, S]
        "prefix_len": jnp.sum(prefix_valid.astype(jnp.int32), axis=1),
    }
    if config.keep_logits:
        result["text_logits"] = text["all_logits"]  # [batch, T, vocab]
    return result


_PROGRAMS: "weakref.WeakSet" = weakref.WeakSet()


@functools.lru_cache(maxsize=16)
def _jitted(model: SpectronModel, config: DecodeConfig):
    """The jitted `_generate` of a model and the static part of a config (`_static`)."""
    model = _with_prenet_dropout(model, config.prenet_dropout)
    fn = jax.jit(functools.partial(_generate, model, config))
    _PROGRAMS.add(fn)
    return fn


def compiled_programs() -> int:
    """How many programs `generate` has compiled in this process (one per static config and shape)."""
    return sum(fn._cache_size() for fn in list(_PROGRAMS))


def generate(model: SpectronModel, params: Any, prompt_frames: Any, prompt_mask: Any, config: DecodeConfig,
             rng: Optional[jax.Array] = None, state: Any = None, *, row_ids: Any = None,
             row_valid: Any = None) -> dict[str, jax.Array]:
    """Generates text then frames for a batch of prompts (one compile per model, static config and shape).

    Args:
      model: the `SpectronModel`.
      params: its params (nested dict or `nnx.State`).
      prompt_frames: [batch, prompt_len, mel] log-mel prompts (padded frames may hold anything).
      prompt_mask: [batch, prompt_len], 1 = valid frame (a prefix of each row).
      config: the decoding knobs.
      rng: per-row PRNG keys [batch] of sampling and pre-net dropout (default: `row_keys(config.seed,
        row_ids)`).
      state: non-parameter model state (batch-norm statistics), if the model has it.
      row_ids: int [batch], each row's id in the request (default 0..batch-1): with the seed it keys the
        row's randomness, so give a row the same id wherever it runs.
      row_valid: bool [batch] (default all True): False marks a dummy row that pads the batch.

    Returns:
      text_tokens int32 [batch, max_text_tokens], text_lengths int32 [batch] (tokens before eos),
      text_ended bool [batch], frames float32 [batch, ceil(max_frames / r) * r, mel], num_frames int32
      [batch], stopped bool [batch] (stop head fired, else budget), stop_logits float32 [batch, steps],
      prefix_len int32 [batch]; text_logits float32 [batch, max_text_tokens, vocab] with `keep_logits`.
    """
    prompt_frames = jnp.asarray(prompt_frames, jnp.float32)
    prompt_mask = jnp.asarray(prompt_mask)
    if prompt_frames.ndim != 3 or prompt_mask.shape != prompt_frames.shape[:2]:
        raise ValueError(f"generate: prompt_frames must be [batch, frames, mel] with a [batch, frames] mask, got "
                         f"{prompt_frames.shape} and {prompt_mask.shape}")
    # Padded prompt frames may hold NaN: zero them so nothing non-finite reaches the encoder.
    prompt_frames = jnp.where(prompt_mask[..., None] > 0, jnp.nan_to_num(prompt_frames), 0.0)
    batch = prompt_frames.shape[0]
    row_ids = np.arange(batch, dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32)
    row_valid = np.ones((batch,), bool) if row_valid is None else np.asarray(row_valid, bool)
    if row_ids.shape != (batch,) or row_valid.shape != (batch,):
        raise ValueError(f"generate: row_ids and row_valid must be [{batch}], got {row_ids.shape} and "
                         f"{row_valid.shape}")
    knobs = _knobs(config)
    keys = _row_keys_jit(knobs["seed"], row_ids) if rng is None else rng
    if keys.shape != (batch,):
        raise ValueError(f"generate: rng must hold one key per row ([{batch}]), got shape {keys.shape}")
    return _jitted(model, _static(config))(params, prompt_frames, prompt_mask, keys, row_valid, knobs, state)


_row_keys_jit = jax.jit(row_keys)


def to_host(out: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """`generate`'s output as NumPy arrays."""
    return {k: np.asarray(v) for k, v in out.items()}


__all__ = ["DecodeConfig", "TRACED_KNOBS", "cache_len", "compiled_programs", "generate", "row_keys", "sample_logits",
           "speech_steps", "step_keys", "to_host"]
