"""Spectron: a Conformer speech encoder whose projected output is the prefix of a decoder LM.

One decoder row holds three groups of fixed slots (ARCHITECTURE.md §1):

    [ prefix: P(E(prompt))  | text: sos y_1 … y_N (pad) | speech: eos pre(g_0) … pre(g_{S-2}) ]
      bidirectional            causal                      causal

* prefix: the Conformer encodes the prompt's log-mel frames `[batch, prompt_len, mel]` into
  `[batch, F, enc]` (F = prompt_len / 4), and the linear projection P maps them to the LM width. With
  `prompt_features='w2v_bert_fbank'` the prompt is stacked fbank `[batch, prompt_len, 160]` instead and
  F is the encoder's own output length (= prompt_len for w2v-BERT's feature projection).
* text: token embeddings of `text_inputs`; the logits there are trained towards `text_targets`.
* speech: with reduction factor r the continuation `[batch, cont_len, mel]` is S = cont_len / r groups
  g_s of r frames. Step 0 reads the embedding of `eos` (the text→speech delimiter), step s ≥ 1 reads
  pre-net(g_{s-1}); the post-net at step s writes g_s and the optional stop head a stop logit.

Padding may sit inside every group (fixed batch shapes): padded slots are invisible keys and rotary
positions count only valid slots (see `attention.py`), so valid outputs equal those of an unpadded row.

`Spectron` is the NNX module; the functional, t5x-style interface around it (loss, scores, decoding
hooks over a params pytree) is `spectron_jax.models.spectron_model.SpectronModel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from spectron_jax.data import prompt_features as prompt_features_lib
from spectron_jax.losses import LossWeights
from spectron_jax.models import acoustic
from spectron_jax.models.acoustic import AcousticConfig, PostNet, PreNet, StopHead
from spectron_jax.models.attention import DecoderCache
from spectron_jax.models.conformer import ConformerConfig, ConformerEncoder
from spectron_jax.models.decoder import Decoder, DecoderConfig
from spectron_jax.models.encoder_ctc import EncoderCTCHead
from spectron_jax.models.sharding import constrain, logical_param

# A test-sized decoder matching the tiny ConformerConfig defaults (vocabulary of the embedded tokenizer).
TINY_DECODER = DecoderConfig(vocab_size=512, model_dim=64, num_layers=2, num_heads=4, num_kv_heads=1,
                             head_dim=16, mlp_dim=128)


@dataclasses.dataclass(frozen=True)
class PretrainedInit:
    """Checkpoints to initialise parts of the model from (None = random initialisation).

    The paper starts from a pre-trained encoder and a pre-trained LM; the pre-net, post-net and the
    projection P are always random. Loading is done by the training code, not by the model.

    A conversion records its architecture (`convert/metadata.py`); training refuses to load it into an
    encoder / decoder whose config differs in any recorded field, naming each.

    Attributes:
      encoder_checkpoint: path of a converted encoder checkpoint, or None (random encoder).
      lm_checkpoint: path of a converted decoder-LM checkpoint, or None (random LM).
      allow_changes: recorded fields the model deliberately differs in, as 'DecoderConfig.sliding_window' /
        'ConformerConfig.left_relative_distance' (e.g. a longer window than the checkpoint's). Also applies
        to conversions loaded through `TrainConfig.init_from`.
    """

    encoder_checkpoint: Optional[str] = None
    lm_checkpoint: Optional[str] = None
    allow_changes: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "allow_changes", tuple(self.allow_changes))
        known = {"DecoderConfig": DecoderConfig, "ConformerConfig": ConformerConfig}
        for name in self.allow_changes:
            cls, _, field = str(name).partition(".")
            if cls not in known or field not in {f.name for f in dataclasses.fields(known[cls])}:
                raise ValueError(f"PretrainedInit.allow_changes: {name!r} is not 'DecoderConfig.<field>' or "
                                 "'ConformerConfig.<field>'")


@dataclasses.dataclass(frozen=True)
class SpectronConfig:
    """Everything that defines the Spectron model and its objective.

    Attributes:
      encoder: the Conformer speech encoder E.
      decoder: the prefix decoder LM (its `model_dim` is the width P projects to).
      acoustic: pre-net, post-net, stop head and the reduction factor r (the paper: r = 1, no stop head).
      loss_weights: weights of the loss terms (all 1 by default; the paper gives none).
      max_time_delta_order: K, the highest time-delta order of the spectrogram loss (3; paper.md: M).
      sos_id, eos_id, pad_id: token ids of the tokenizer contract (sos = bos = 3, eos = 1, pad = 0).
      sep_id: the reserved separator the model writes between its transcript of the prompt and the text
        continuation (`TaskConfig.sep_id`, the same id; '<sep>' = 4 in the project's tokenizer, an
        unused piece of a converted LM's). None: the paper's text, no marker. Inference and the
        evaluation suites split the text there; the frame budget counts the tokens after it.
      projection_bias: whether P has a bias. DEFAULT, not in the paper ("a linear layer").
      encoder_ctc: an auxiliary CTC head on the encoder output, trained on the prompt's transcript
        (`encoder_ctc.EncoderCTCHead`, weight `LossWeights.ctc`; needs `text_segments`, i.e.
        TaskConfig.phi_split). Beyond the paper (whose encoder is pretrained): it gives a randomly
        initialised encoder a direct signal. Training only; inference never reads it. DEFAULT False.
      pretrained: optional checkpoints for the encoder and the LM (None: random init).
      prompt_features: what the encoder reads (`spectron_jax.data.prompt_features.KINDS`): 'log_mel'
        (the prompt's frames, encoder.input_dim = acoustic.num_mel) or 'w2v_bert_fbank' (stacked fbank,
        encoder.input_dim = 160). The Task's `TaskConfig.prompt_features` must agree.
    """

    encoder: ConformerConfig = ConformerConfig()
    decoder: DecoderConfig = TINY_DECODER
    acoustic: AcousticConfig = AcousticConfig()
    loss_weights: LossWeights = LossWeights()
    max_time_delta_order: int = 3
    sos_id: int = 3
    eos_id: int = 1
    pad_id: int = 0
    sep_id: Optional[int] = None
    projection_bias: bool = True
    encoder_ctc: bool = False
    pretrained: PretrainedInit = PretrainedInit()
    prompt_features: str = "log_mel"

    def __post_init__(self):
        if self.prompt_features not in prompt_features_lib.KINDS:
            raise ValueError(f"SpectronConfig.prompt_features must be one of {prompt_features_lib.KINDS}, "
                             f"got {self.prompt_features!r}")
        if self.prompt_features == "log_mel" and self.encoder.input_dim != self.acoustic.num_mel:
            raise ValueError(f"SpectronConfig: encoder.input_dim ({self.encoder.input_dim}) differs from "
                             f"acoustic.num_mel ({self.acoustic.num_mel}); both are the mel bins of the features "
                             "(an encoder of stacked fbank needs SpectronConfig.prompt_features='w2v_bert_fbank')")
        wanted = prompt_features_lib.FBANK.stacked_dim
        if self.prompt_features == "w2v_bert_fbank" and self.encoder.input_dim != wanted:
            raise ValueError(f"SpectronConfig: prompt_features='w2v_bert_fbank' gives {wanted} values per frame, "
                             f"but encoder.input_dim is {self.encoder.input_dim}")
        if self.max_time_delta_order < 0:
            raise ValueError(f"SpectronConfig.max_time_delta_order must be >= 0, got {self.max_time_delta_order}")
        for name in ("sos_id", "eos_id", "pad_id"):
            value = getattr(self, name)
            if not 0 <= value < self.decoder.vocab_size:
                raise ValueError(f"SpectronConfig.{name}={value} is outside the vocabulary "
                                 f"(decoder.vocab_size={self.decoder.vocab_size})")
        if self.sep_id is not None:
            if not 0 <= self.sep_id < self.decoder.vocab_size:
                raise ValueError(f"SpectronConfig.sep_id={self.sep_id} is outside the vocabulary "
                                 f"(decoder.vocab_size={self.decoder.vocab_size})")
            if self.sep_id in (self.sos_id, self.eos_id, self.pad_id):
                raise ValueError(f"SpectronConfig.sep_id={self.sep_id} is also the sos, eos or pad id")

    @property
    def reduction_factor(self) -> int:
        return self.acoustic.reduction_factor

    @property
    def prompt_dim(self) -> int:
        """Values per prompt frame the encoder reads (128 log-mel bins or 160 stacked fbank values)."""
        return int(self.encoder.input_dim)

    def prefix_len(self, prompt_len: int) -> int:
        """Prefix slots (encoder frames) for `prompt_len` prompt frames (240 -> 60 with the ×4 subsampling)."""
        return int(self.encoder.output_length(prompt_len))

    def speech_steps(self, cont_len: int) -> int:
        """Speech slots S for `cont_len` continuation frames (a multiple of r)."""
        if cont_len % self.reduction_factor:
            raise ValueError(f"cont_len={cont_len} is not a multiple of the reduction factor {self.reduction_factor}")
        return cont_len // self.reduction_factor

    def sequence_len(self, prompt_len: int, text_len: int, cont_len: int) -> int:
        """Decoder slots of one row: prefix + text + speech."""
        return self.prefix_len(prompt_len) + text_len + self.speech_steps(cont_len)


@struct.dataclass
class SpectronOutputs:
    """Teacher-forced outputs of `Spectron.__call__`.

    text_logits: float32 [batch, text_len, vocab], at the text slots (targets: `text_targets`).
    frames: [batch, S, r, mel], post-net output at the speech slots (targets: `cont_frames` grouped).
    stop_logits: [batch, S] or None (no stop head).
    speech_valid: int32 [batch, S], 1 where the step's output group holds a valid frame.
    prefix_valid: bool [batch, F], valid encoder frames.
    ctc_logits: float32 [batch, F, vocab] of the encoder's CTC head, or None (no head).
    """

    text_logits: jax.Array
    frames: jax.Array
    stop_logits: Optional[jax.Array]
    speech_valid: jax.Array
    prefix_valid: jax.Array
    ctc_logits: Optional[jax.Array] = None


class PrefixProjection(nnx.Module):
    """The linear layer P from the encoder width to the LM width.

    Parameters: kernel [enc, embed] (logical (None, 'embed'); the encoder side is left unnamed so no
    mesh axis is named twice), bias [embed].
    """

    def __init__(self, in_dim: int, out_dim: int, *, use_bias: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = logical_param(init, rngs.params(), (in_dim, out_dim), (None, "embed"), param_dtype)
        self.bias = (logical_param(jax.nn.initializers.zeros, None, (out_dim,), ("embed",), param_dtype)
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, frames, enc] -> [batch, frames, embed] in the decoder's computation dtype."""
        y = jnp.einsum("bfe,ed->bfd", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return constrain(y, ("batch", "length", "embed"))


def component_factories(config: SpectronConfig) -> dict[str, Callable[[nnx.Rngs], Optional[nnx.Module]]]:
    """{component name: rngs -> module} in construction order (the order parameters are drawn in)."""
    dec, ac = config.decoder, config.acoustic
    return {
        "encoder": lambda rngs: ConformerEncoder(config.encoder, rngs=rngs),
        "projection": lambda rngs: PrefixProjection(config.encoder.model_dim, dec.model_dim,
                                                    use_bias=config.projection_bias, dtype=dec.dtype,
                                                    param_dtype=dec.param_dtype, rngs=rngs),
        "decoder": lambda rngs: Decoder(dec, rngs=rngs),
        "prenet": lambda rngs: PreNet(ac, dec.model_dim, rngs=rngs),
        "postnet": lambda rngs: PostNet(ac, dec.model_dim, rngs=rngs),
        "stop_head": lambda rngs: StopHead(ac, dec.model_dim, rngs=rngs) if ac.stop_head else None,
        "ctc_head": lambda rngs: (EncoderCTCHead(config.encoder.model_dim, dec.vocab_size, dtype=dec.dtype,
                                                 param_dtype=dec.param_dtype, rngs=rngs)
                                  if config.encoder_ctc else None),
    }


class Spectron(nnx.Module):
    """Encoder E, projection P, decoder LM, pre-net, post-net and optional stop head.

    Dropout: the encoder and the pre-net draw from the streams of the `rngs` they were built with
    (reseed them with `nnx.reseed`); the decoder's residual dropout takes the `rngs` given to a call.
    The pre-net's dropout stays on when `deterministic=True` if `acoustic.prenet_dropout_at_inference`.
    """

    def __init__(self, config: SpectronConfig, *, rngs: Optional[nnx.Rngs],
                 parts: Optional[Mapping[str, Optional[nnx.Module]]] = None):
        """Builds every component from `rngs`, or takes them ready-made from `parts` (see `component_factories`;
        `SpectronModel.abstract_module` builds each part in its own abstract trace, which is much faster)."""
        self.config = config
        factories = component_factories(config)
        if parts is None:
            parts = {name: make(rngs) for name, make in factories.items()}
        if set(parts) != set(factories):
            raise ValueError(f"Spectron parts must be exactly {sorted(factories)}, got {sorted(parts)}")
        self.encoder = parts["encoder"]
        self.projection = parts["projection"]
        self.decoder = parts["decoder"]
        self.prenet = parts["prenet"]
        self.postnet = parts["postnet"]
        self.stop_head = parts["stop_head"]
        self.ctc_head = parts["ctc_head"]

    # ---- pieces of the row ---------------------------------------------------------------------------
    def encode_prompt(self, prompt_frames: jax.Array, prompt_mask: jax.Array, *,
                      deterministic: bool) -> tuple[jax.Array, jax.Array]:
        """Prompt features [batch, prompt_len, encoder.input_dim] + mask [batch, prompt_len] -> prefix
        [batch, F, embed], prefix_valid bool [batch, F] (F = encoder.output_length(prompt_len))."""
        encoded, encoded_mask = self._encode(prompt_frames, prompt_mask, deterministic)
        return self.projection(encoded), encoded_mask

    def _encode(self, prompt_frames: jax.Array, prompt_mask: jax.Array,
                deterministic: bool) -> tuple[jax.Array, jax.Array]:
        """The encoder's output [batch, F, enc] and its valid frames bool [batch, F]."""
        prompt_frames = jnp.where(jnp.asarray(prompt_mask)[..., None] > 0, prompt_frames, 0.0)  # padded: may be NaN
        return self.encoder(prompt_frames, prompt_mask, deterministic=deterministic)

    def _prenet(self, inputs: jax.Array, deterministic: bool, rngs: Optional[nnx.Rngs],
                row_keys: Optional[jax.Array] = None) -> jax.Array:
        """[batch, steps, prenet_input_dim] -> [batch, steps, embed] (`row_keys`: see `PreNet`)."""
        active = (not deterministic) or self.config.acoustic.prenet_dropout_at_inference
        out = self.prenet(inputs, deterministic=not active, rngs=rngs, row_keys=row_keys)
        return out.astype(jnp.dtype(self.config.decoder.dtype))

    def _eos_embedding(self, batch: int) -> jax.Array:
        """[batch, 1, embed]: the embedding of `eos`, the input of speech step 0."""
        return self.decoder.embed(jnp.full((batch, 1), self.config.eos_id, jnp.int32))

    def speech_inputs(self, cont_frames: jax.Array, cont_mask: jax.Array, *, deterministic: bool,
                      rngs: Optional[nnx.Rngs] = None,
                      row_keys: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced speech-slot inputs.

        Args:
          cont_frames: [batch, cont_len, mel], cont_len a multiple of r; padded frames may hold anything.
          cont_mask: [batch, cont_len], 1 = valid frame (a prefix of each row).
          row_keys: a key array [batch]: each row's pre-net dropout mask from its own key (see `PreNet`).

        Returns:
          inputs [batch, S, embed] (step 0: eos embedding; step s: pre-net(group s-1)) and
          step_valid int32 [batch, S].
        """
        cfg = self.config.acoustic
        # Padded frames may hold anything (NaN included): zero them so they cannot reach valid slots.
        cont_frames = jnp.where(jnp.asarray(cont_mask)[..., None] > 0, cont_frames, 0.0)
        raw, step_valid = acoustic.prenet_inputs(cont_frames, cont_mask, cfg.reduction_factor, cfg.prenet_input)
        pre = self._prenet(raw, deterministic, rngs, row_keys)
        inputs = jnp.concatenate([self._eos_embedding(pre.shape[0]).astype(pre.dtype), pre[:, 1:]], axis=1)
        return inputs, step_valid

    def _heads(self, speech_hidden: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
        """[batch, steps, embed] -> frames [batch, steps, r, mel], stop logits [batch, steps] or None."""
        frames = self.postnet(speech_hidden)
        stop = self.stop_head(speech_hidden) if self.stop_head is not None else None
        return frames, stop

    # ---- teacher-forced forward ------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, jax.Array], *, deterministic: bool,
                 rngs: Optional[nnx.Rngs] = None, row_keys: Optional[jax.Array] = None) -> SpectronOutputs:
        """The full teacher-forced pass over a model batch (keys and shapes: the batch contract).

        Args:
          batch: prompt_frames [batch, prompt_len, mel], prompt_mask [batch, prompt_len], text_inputs
            [batch, text_len], text_weights [batch, text_len] (a text slot is valid where its weight is
            > 0), cont_frames [batch, cont_len, mel], cont_mask [batch, cont_len].
          deterministic: disables dropout (and uses batch-norm running statistics in the encoder).
          rngs: an `nnx.Rngs` with a 'dropout' stream for the decoder (and the pre-net); required when
            the decoder has dropout and `deterministic` is False.
          row_keys: a key array [batch]: the pre-net's dropout masks per row from these keys (so a row's
            output does not depend on the other rows), instead of from `rngs`.
        """
        encoded, prefix_valid = self._encode(batch["prompt_frames"], batch["prompt_mask"], deterministic)
        prefix = self.projection(encoded)
        ctc_logits = self.ctc_head(encoded) if self.ctc_head is not None else None
        text = self.decoder.embed(jnp.asarray(batch["text_inputs"], jnp.int32))
        text_valid = jnp.asarray(batch["text_weights"]) > 0
        speech, speech_valid = self.speech_inputs(batch["cont_frames"], batch["cont_mask"],
                                                  deterministic=deterministic, rngs=rngs, row_keys=row_keys)
        num_prefix, num_text = prefix.shape[1], text.shape[1]
        dtype = jnp.dtype(self.config.decoder.dtype)
        x = jnp.concatenate([prefix.astype(dtype), text.astype(dtype), speech.astype(dtype)], axis=1)
        valid = jnp.concatenate([prefix_valid, text_valid, speech_valid > 0], axis=1)
        is_prefix = jnp.zeros(valid.shape, bool).at[:, :num_prefix].set(True)
        hidden, _ = self.decoder(x, valid, is_prefix, deterministic=deterministic, rngs=rngs)
        text_logits = self.decoder.logits(hidden[:, num_prefix:num_prefix + num_text])
        frames, stop = self._heads(hidden[:, num_prefix + num_text:])
        return SpectronOutputs(text_logits=text_logits, frames=frames, stop_logits=stop,
                               speech_valid=speech_valid, prefix_valid=prefix_valid, ctc_logits=ctc_logits)

    # ---- incremental decoding ------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> DecoderCache:
        """An empty KV cache of `max_len` slots (prefix + text + speech) for `batch` rows."""
        return self.decoder.init_cache(batch, max_len)

    def prefill(self, prefix: jax.Array, prefix_valid: jax.Array, tokens: jax.Array, token_valid: jax.Array,
                cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
        """Writes the prefix and the first text slots into an empty cache.

        Args:
          prefix: [batch, F, embed] from `encode_prompt`; prefix_valid: bool [batch, F].
          tokens: int [batch, T] text inputs (sos y_1 … y_k); token_valid: bool [batch, T].
          cache: an empty cache (`init_cache`).

        Returns:
          logits float32 [batch, T, vocab] at the text slots (the next-token distribution of each), and
          the cache with F + T slots written.
        """
        text = self.decoder.embed(jnp.asarray(tokens, jnp.int32))
        dtype = jnp.dtype(self.config.decoder.dtype)
        x = jnp.concatenate([prefix.astype(dtype), text.astype(dtype)], axis=1)
        valid = jnp.concatenate([prefix_valid.astype(bool), token_valid.astype(bool)], axis=1)
        is_prefix = jnp.zeros(valid.shape, bool).at[:, :prefix.shape[1]].set(True)
        hidden, cache = self.decoder(x, valid, is_prefix, deterministic=True, cache=cache)
        return self.decoder.logits(hidden[:, prefix.shape[1]:]), cache

    def _step(self, x: jax.Array, valid: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
        """One causal slot: x [batch, 1, embed], valid bool [batch] -> hidden [batch, 1, embed], cache."""
        valid = jnp.broadcast_to(jnp.asarray(valid, bool), (x.shape[0],))[:, None]
        is_prefix = jnp.zeros_like(valid)
        return self.decoder(x.astype(jnp.dtype(self.config.decoder.dtype)), valid, is_prefix,
                            deterministic=True, cache=cache)

    def text_step(self, tokens: jax.Array, cache: DecoderCache,
                  valid: jax.Array | bool = True) -> tuple[jax.Array, DecoderCache]:
        """Feeds one token per row: tokens int [batch] (valid bool [batch]) -> logits float32 [batch, vocab]."""
        x = self.decoder.embed(jnp.asarray(tokens, jnp.int32)[:, None])
        hidden, cache = self._step(x, valid, cache)
        return self.decoder.logits(hidden)[:, 0], cache

    def speech_step(self, previous: Optional[jax.Array], cache: DecoderCache, *, start: jax.Array | bool = False,
                    valid: jax.Array | bool = True, rngs: Optional[nnx.Rngs] = None,
                    row_keys: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[jax.Array], DecoderCache]:
        """One speech step: previous frame group -> pre-net -> decoder -> post-net.

        Args:
          previous: [batch, r, mel], the group written by the previous step (ignored where `start`);
            None only when every row starts.
          cache: the cache after the text slots (or after earlier speech steps).
          start: bool [batch] or scalar; True where this is speech step 0, whose input is the `eos`
            embedding (the same slot a text step feeding `eos` would write).
          valid: bool [batch] or scalar; False writes an invisible slot for that row.
          rngs: a 'dropout' stream for the pre-net when its dropout is active at inference.
          row_keys: a key array [batch]: each row's pre-net mask from its own key instead (see `PreNet`).

        Returns:
          frames [batch, r, mel] of this step's group, stop logit [batch] or None, updated cache.
        """
        batch = cache.valid.shape[0]
        eos = self._eos_embedding(batch)
        if previous is None:
            x = eos
        else:
            cfg = self.config.acoustic
            group = jnp.asarray(previous)
            step_input = group[:, -1:, :] if cfg.prenet_input == "last_frame" else group.reshape(batch, 1, -1)
            pre = self._prenet(step_input, True, rngs, row_keys)
            start = jnp.broadcast_to(jnp.asarray(start, bool), (batch,))[:, None, None]
            x = jnp.where(start, eos.astype(pre.dtype), pre)
        hidden, cache = self._step(x, valid, cache)
        frames, stop = self._heads(hidden)
        return frames[:, 0], (None if stop is None else stop[:, 0]), cache
