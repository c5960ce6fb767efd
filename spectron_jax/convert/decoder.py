"""Importing Gemma-family decoder LMs (Gemma, Gemma 2, Gemma 3 text) from a Hugging Face checkpoint.

    python -m spectron_jax.convert.decoder --format=hf --input=DIR --output=DIR [--no-check] [--check_length=N]

reads `DIR/config.json` and its safetensors weights (sharded or not) and writes

    OUT/params/          orbax pytree of the decoder's parameters, paths at its root ('embedder/table', ...),
                         the layout `PretrainedInit.lm_checkpoint` (and `checkpoints.component_init`) loads
    OUT/decoder.gin      the gin bindings of `DecoderConfig` (and the tokenizer ids) that reproduce the
                         checkpoint's architecture, and `SEP_ID`: the text separator (`TaskConfig.sep_id`),
                         the tokenizer's first unused piece ('<unused0>' in Gemma's), None if it has none
    OUT/tokenizer.model  the checkpoint's SentencePiece model (when DIR has one; a warning when not)
    OUT/conversion.json  the architecture (every `DecoderConfig` field decoder.gin binds), the source
                         config's hash, family, parameter count, `sep_id` and the parity figure of the
                         check; training refuses to load params/ into a decoder of another architecture
                         (`convert/metadata.py`)

How the Hugging Face modules map onto `DecoderConfig` (read from the transformers sources):

    embedding x sqrt(hidden_size), cast to the dtype    embed_scale_by_sqrt_dim
    RMSNorm x (1 + weight) in float32                   rmsnorm_add_one
    GeGLU with tanh-approximate GELU                    activation='geglu'
    Gemma:   input_layernorm -> attn -> +, post_attention_layernorm -> MLP -> +          block='sequential'
    Gemma 2/3: input_layernorm -> attn -> post_attention_layernorm -> +,
               pre_feedforward_layernorm -> MLP -> post_feedforward_layernorm -> +    post_norms=True
    q_norm / k_norm over head_dim (Gemma 3), before RoPE                                  qk_norm
    layer_types sliding / full, window: kv > q - window (distance < window)             attention_pattern, sliding_window
    RoPE bases of full and sliding layers (Gemma 3: 1e6 / 1e4)                            rope_base, local_rope_base
    attn_logit_softcapping, final_logit_softcapping (Gemma 2)                             *_softcap
    queries x query_pre_attn_scalar**-0.5                                                 query_pre_attn_scalar
    lm_head tied to embed_tokens                                                          tie_embeddings, no 1/sqrt(d)

A config field this decoder cannot express (biases, scaled RoPE, bidirectional attention, another
activation) is refused with a one-line error naming it. `--check` (default when torch and
transformers are installed) runs the source model in transformers and ours on the same random token ids
(2 rows of max(64, sliding window + 16) tokens, so every window is exceeded), compares the logits and
the final hidden state (before the head's soft-cap) in float32 and again in bfloat16, and fails above
`hf_checkpoint.within_tolerance`. Source tensors map onto ours by a name table (`name_map`) checked
against the decoder's traced shapes (`hf_checkpoint.map_tensors`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from etils import epath

from spectron_jax import cli
from spectron_jax.convert import hf_checkpoint, metadata
from spectron_jax.models.decoder import DecoderConfig

FAMILIES = ("gemma", "gemma2", "gemma3_text")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
PARAMS_SUBDIR = hf_checkpoint.PARAMS_SUBDIR
GIN_FILENAME = "decoder.gin"
TOKENIZER_FILENAME = "tokenizer.model"
# DecoderConfig fields an imported checkpoint fixes (the rest, dtype / remat_policy / scan_layers / dropout, stay run knobs).
ARCHITECTURE_FIELDS = (
    "vocab_size", "model_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "block",
    "activation", "rope_base", "rope_fraction", "local_rope_base", "tie_embeddings", "scale_tied_logits",
    "embed_scale_by_sqrt_dim", "rmsnorm_add_one", "norm_eps", "post_norms", "qk_norm", "sliding_window",
    "attention_pattern", "final_logit_softcap", "attn_logit_softcap", "query_pre_attn_scalar",
)


# A checkpoint config field our decoder cannot express (the message names it): the importers' one error type.
UnsupportedConfig = hf_checkpoint.CheckpointError


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The tokenizer ids a checkpoint was trained with (Gemma: pad 0, eos 1, bos 2)."""

    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0


# ---- config.json -> DecoderConfig --------------------------------------------------------------
def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The text-decoder part of a config: itself, or `text_config` of a multimodal Gemma 3."""
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), Mapping):
        return {"model_type": "gemma3_text", **config["text_config"]}
    return dict(config)


def _rope(config: Mapping[str, Any], family: str) -> tuple[float, Optional[float]]:
    """(base of full-attention layers, base of sliding layers or None) from either config format."""
    defaults = {"gemma": (10000.0, None), "gemma2": (10000.0, None), "gemma3_text": (1e6, 1e4)}[family]
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
        per_kind = {kind: dict(params.get(kind) or {}) for kind in ("full_attention", "sliding_attention")}
    else:
        common = dict(params or {})
        scaling = config.get("rope_scaling")
        if isinstance(scaling, Mapping):
            common.update(scaling)
        full = {"rope_theta": config.get("rope_theta", defaults[0]), **common}
        local = dict(full)
        if family == "gemma3_text":
            local = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", defaults[1])}
        per_kind = {"full_attention": full, "sliding_attention": local}
    for kind, p in per_kind.items():
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type != "default" or p.get("factor", 1.0) not in (1, 1.0):
            raise UnsupportedConfig(f"config.json: rope_parameters[{kind!r}] = {p} (only unscaled 'default' RoPE)")
    full = float(per_kind["full_attention"].get("rope_theta", defaults[0]))
    local = per_kind["sliding_attention"].get("rope_theta", defaults[1])
    return full, (None if local is None or float(local) == full else float(local))


def _layer_kinds(config: Mapping[str, Any], family: str, num_layers: int) -> list[str]:
    """'global' / 'local' of every layer, as transformers derives them."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        if family == "gemma":
            layer_types = ["full_attention"] * num_layers
        elif family == "gemma2":
            layer_types = ["sliding_attention" if not bool(i % 2) else "full_attention" for i in range(num_layers)]
        else:
            period = int(config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6)))
            layer_types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise UnsupportedConfig(f"config.json: layer_types has {len(layer_types)} entries for {num_layers} layers")
    kinds = {"full_attention": "global", "sliding_attention": "local"}
    unknown = sorted(set(layer_types) - set(kinds))
    if unknown:
        raise UnsupportedConfig(f"config.json: layer_types {unknown} (only full_attention / sliding_attention)")
    return [kinds[t] for t in layer_types]


def _shortest_cycle(kinds: Sequence[str]) -> tuple[str, ...]:
    """The shortest pattern that, cycled, reproduces `kinds` (DecoderConfig cycles its pattern)."""
    for period in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
            return tuple(kinds[:period])
    return tuple(kinds)


def decoder_config_from_hf(config: Mapping[str, Any], **overrides) -> DecoderConfig:
    """Our `DecoderConfig` for a Gemma / Gemma 2 / Gemma 3 text `config.json` (overrides: dtype etc.).

    Raises:
      UnsupportedConfig: a field our decoder cannot express (the message names it).
    """
    config = text_config(config)
    family = config.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedConfig(f"config.json: model_type {family!r} is not one of {', '.join(FAMILIES)} (or gemma3)")
    for field in ("attention_bias", "use_bidirectional_attention"):
        if config.get(field):
            raise UnsupportedConfig(f"config.json: {field} = {config[field]} is not supported")
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act == "gelu" and family == "gemma":
        act = "gelu_pytorch_tanh"  # transformers reads Gemma's legacy 'gelu' as the tanh approximation
    if act not in GELU_TANH:
        raise UnsupportedConfig(f"config.json: hidden_activation {act!r} (only tanh-approximate GELU)")
    num_layers = int(config["num_hidden_layers"])
    num_heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // num_heads)
    kinds = _layer_kinds(config, family, num_layers)
    window = config.get("sliding_window") if "local" in kinds else None
    if "local" in kinds and not window:
        raise UnsupportedConfig("config.json: sliding_attention layers but no sliding_window")
    rope_base, local_base = _rope(config, family)
    gemma1 = family == "gemma"
    query_scalar = None if gemma1 else float(config.get("query_pre_attn_scalar", 256))
    if query_scalar is not None and query_scalar == head_dim:
        query_scalar = None
    values = dict(
        vocab_size=int(config["vocab_size"]), model_dim=int(config["hidden_size"]), num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=int(config.get("num_key_value_heads") or num_heads), head_dim=head_dim,
        mlp_dim=int(config["intermediate_size"]), block="sequential", activation="geglu", rope_base=rope_base,
        rope_fraction=1.0, local_rope_base=local_base if "local" in kinds else None,
        tie_embeddings=bool(config.get("tie_word_embeddings", True)), scale_tied_logits=False,
        embed_scale_by_sqrt_dim=True, rmsnorm_add_one=True, norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        post_norms=not gemma1, qk_norm=family == "gemma3_text", sliding_window=int(window) if window else None,
        attention_pattern=_shortest_cycle(kinds),
        final_logit_softcap=None if gemma1 else config.get("final_logit_softcapping"),
        attn_logit_softcap=None if gemma1 else config.get("attn_logit_softcapping"),
        query_pre_attn_scalar=query_scalar,
    )
    values.update(overrides)
    return DecoderConfig(**values)


def token_ids(config: Mapping[str, Any]) -> TokenIds:
    """The bos / eos / pad ids of a checkpoint config (a list of eos ids gives its first)."""
    full = dict(config)
    merged = {**text_config(config), **{k: full[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                        if full.get(k) is not None}}
    eos = merged.get("eos_token_id", 1)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return TokenIds(bos_id=int(merged.get("bos_token_id", 2)), eos_id=int(eos),
                    pad_id=int(merged.get("pad_token_id") if merged.get("pad_token_id") is not None else 0))


# ---- safetensors -> our parameter tree ------------------------------------------------------------
# Source tensors dropped on purpose: RoPE frequency buffers (recomputed from the config).
_IGNORED = (r"rotary_emb\.inv_freq$",)


def _prefix(tensors: Mapping[str, np.ndarray]) -> str:
    """The name prefix of the text model's modules ('model.' for Gemma*ForCausalLM, 'model.language_model.'
    or 'language_model.model.' in a multimodal Gemma 3)."""
    for name in tensors:
        if name.endswith("embed_tokens.weight") and "vision" not in name:
            return name[: -len("embed_tokens.weight")]
    raise hf_checkpoint.CheckpointError("checkpoint: no '*embed_tokens.weight' tensor (not a Gemma text model?)")


def _head_name(tensors: Mapping[str, np.ndarray]) -> Optional[str]:
    """The output head's tensor name ('lm_head.weight', 'language_model.lm_head.weight', ...) or None."""
    names = sorted(name for name in tensors if name == "lm_head.weight" or name.endswith(".lm_head.weight"))
    if len(names) > 1:
        raise hf_checkpoint.CheckpointError(f"checkpoint: several output heads ({', '.join(names)})")
    return names[0] if names else None


def name_map(cfg: DecoderConfig, prefix: str = "model.", head: Optional[str] = None) -> dict[str, tuple[str, Any]]:
    """{Hugging Face tensor name: (our parameter path, transform of the NumPy tensor or None)}.

    Linear weights are stored [out, in] by torch; ours are [in, ...]: q [embed, heads, head_dim],
    k / v [embed, kv_heads, head_dim], o [heads, head_dim, embed], gate / up [embed, mlp], down [mlp, embed].
    `head` (the untied output head's name) is mapped when `cfg.tie_embeddings` is false.
    """
    d, n, k, h = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rules: dict[str, tuple[str, Any]] = {
        prefix + "embed_tokens.weight": ("embedder/table", None),
        prefix + "norm.weight": ("final_norm/scale", None),
    }
    if not cfg.tie_embeddings and head is not None:
        rules[head] = ("embedder/output", lambda w: w.T)
    norms = {"input_layernorm": "attn_norm"}
    if cfg.post_norms:  # Gemma 2 / 3
        norms.update(post_attention_layernorm="post_attn_norm", pre_feedforward_layernorm="mlp_norm",
                     post_feedforward_layernorm="post_mlp_norm")
    else:  # Gemma: its 'post_attention_layernorm' is the norm in front of the MLP
        norms.update(post_attention_layernorm="mlp_norm")
    for i in range(cfg.num_layers):
        src, ours = f"{prefix}layers.{i}.", f"layers/{i}/"
        rules.update({
            src + "self_attn.q_proj.weight": (ours + "attn/q", lambda w: w.T.reshape(d, n, h)),
            src + "self_attn.k_proj.weight": (ours + "attn/k", lambda w: w.T.reshape(d, k, h)),
            src + "self_attn.v_proj.weight": (ours + "attn/v", lambda w: w.T.reshape(d, k, h)),
            src + "self_attn.o_proj.weight": (ours + "attn/o", lambda w: w.T.reshape(n, h, d)),
            src + "mlp.gate_proj.weight": (ours + "mlp/gate", lambda w: w.T),
            src + "mlp.up_proj.weight": (ours + "mlp/up", lambda w: w.T),
            src + "mlp.down_proj.weight": (ours + "mlp/down", lambda w: w.T),
        })
        if cfg.qk_norm:
            rules[src + "self_attn.q_norm.weight"] = (ours + "attn/q_norm/scale", None)
            rules[src + "self_attn.k_norm.weight"] = (ours + "attn/k_norm/scale", None)
        for theirs, mine in norms.items():
            rules[f"{src}{theirs}.weight"] = (f"{ours}{mine}/scale", None)
    return rules


def expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """{parameter path: shape} of our decoder (per-layer), traced without allocating."""
    from flax import nnx

    from spectron_jax.models.decoder import Decoder

    return hf_checkpoint.traced_shapes(lambda: Decoder(dataclasses.replace(cfg, scan_layers=False),
                                                       rngs=nnx.Rngs(0)))


def map_checkpoint(tensors: Mapping[str, np.ndarray],
                   cfg: DecoderConfig) -> tuple[dict[str, np.ndarray], hf_checkpoint.Counts]:
    """Our flat float32 parameters {path: array} and the counts of the source tensors (a multimodal
    checkpoint's vision tower is left over; a tied head equal to the embedding is ignored).

    Raises:
      CheckpointError: a tensor missing, misshapen or without counterpart in the text model; a head that
        contradicts tie_word_embeddings.
    """
    prefix = _prefix(tensors)
    head = _head_name(tensors)
    ignore = list(_IGNORED)
    if cfg.tie_embeddings and head is not None:
        if not np.array_equal(tensors[head], tensors[prefix + "embed_tokens.weight"]):
            raise UnsupportedConfig(f"checkpoint: tie_word_embeddings is true but {head} differs from the "
                                    "embedding table")
        ignore.append("^" + re.escape(head) + "$")
    if not cfg.tie_embeddings and head is None:
        raise hf_checkpoint.CheckpointError("checkpoint: tie_word_embeddings is false but there is no lm_head.weight")
    flat, counts = hf_checkpoint.map_tensors(tensors, name_map(cfg, prefix, head), expected_shapes(cfg), scope=prefix,
                                             ignore=ignore, what="decoder")
    if cfg.tie_embeddings and head in counts.left_over:  # ignored by rule, though outside the text model's prefix
        left_over = tuple(name for name in counts.left_over if name != head)
        counts = hf_checkpoint.Counts(counts.used, counts.ignored + 1, left_over)
    return flat, counts


def convert_params(tensors: Mapping[str, np.ndarray], cfg: DecoderConfig) -> dict[str, Any]:
    """Our decoder's parameters (the nested `to_pure_dict` layout, float32) from Hugging Face tensors."""
    from spectron_jax.checkpoints import unflatten_paths

    return unflatten_paths(map_checkpoint(tensors, cfg)[0])


# ---- our decoder from a parameter tree ------------------------------------------------------------
def build_decoder(cfg: DecoderConfig, params: Mapping[str, Any]):
    """A `Decoder` of `cfg` holding `params` (the nested layout of `convert_params`); nothing random."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from spectron_jax.models.decoder import Decoder

    decoder = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(decoder, nnx.Param)
    state.replace_by_pure_dict(jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(cfg.param_dtype)), dict(params)))
    nnx.update(decoder, state)
    return decoder


def decoder_logits(decoder, tokens: np.ndarray) -> np.ndarray:
    """Causal LM logits of our decoder: tokens int [batch, length] -> float32 [batch, length, vocab]."""
    import jax.numpy as jnp

    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool)
    hidden, _ = decoder(decoder.embed(tokens), valid, jnp.zeros_like(valid), deterministic=True)
    return np.asarray(decoder.logits(hidden))


# ---- writing ---------------------------------------------------------------------------------------
def separator_id(tokenizer_bytes: bytes) -> Optional[int]:
    """The id of the piece a converted tokenizer lends as the text separator: its '<sep>', else its first
    '<unusedN>' piece (Gemma's '<unused0>'); None when it has neither or is no SentencePiece model."""
    from spectron_jax.data import tasks

    try:
        return tasks.separator_candidate(tokenizer_bytes)
    except Exception:  # noqa: BLE001 - a file sentencepiece cannot parse lends no separator
        return None


def gin_bindings(cfg: DecoderConfig, ids: TokenIds, source: str = "", sep_id: Optional[int] = None) -> str:
    """`decoder.gin`: the architecture of `cfg`, the tokenizer ids and the separator macro, as gin bindings."""
    lines = [f"# Decoder architecture imported from a Hugging Face checkpoint{': ' + source if source else ''}.",
             "# Written by spectron_jax.convert.decoder; include it after a models/ file to swap in this LM.", ""]
    for name in ARCHITECTURE_FIELDS:
        value = getattr(cfg, name)
        lines.append(f"DecoderConfig.{name} = {_gin_literal(value)}")
    lines += ["", "# The checkpoint's tokenizer ids (the text input starts with its bos).",
              f"SpectronConfig.sos_id = {ids.bos_id}", f"SpectronConfig.eos_id = {ids.eos_id}",
              f"SpectronConfig.pad_id = {ids.pad_id}", "",
              "# The text separator the run gins bind to TaskConfig.sep_id and SpectronConfig.sep_id: the",
              "# tokenizer's first unused piece (None: it has none, the text carries no separator).",
              f"SEP_ID = {sep_id}", ""]
    return "\n".join(lines)


def _gin_literal(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_gin_literal(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def write_converted(output_dir: str, params: Mapping[str, Any], cfg: DecoderConfig, ids: TokenIds,
                    source_dir: str, info: Mapping[str, Any], source_config: Mapping[str, Any]) -> None:
    """Writes params/ (replacing an older one), decoder.gin, tokenizer.model (when the source has one) and
    conversion.json."""
    from spectron_jax.checkpoints import flatten_paths

    out = epath.Path(output_dir)
    hf_checkpoint.write_params(str(out), flatten_paths({str(k): v for k, v in params.items()}))
    tokenizer = epath.Path(source_dir) / TOKENIZER_FILENAME
    sep_id = None
    if tokenizer.exists():
        (out / TOKENIZER_FILENAME).write_bytes(tokenizer.read_bytes())
        sep_id = separator_id(tokenizer.read_bytes())
    (out / GIN_FILENAME).write_text(gin_bindings(cfg, ids, str(source_dir), sep_id))
    metadata.write(str(out), component="decoder", config=cfg, fields=ARCHITECTURE_FIELDS, source=str(source_dir),
                   source_config=source_config,
                   info={**info, "tokenizer": TOKENIZER_FILENAME if tokenizer.exists() else None, "sep_id": sep_id})


# ---- the parity check -------------------------------------------------------------------------------
transformers_available = hf_checkpoint.transformers_available


def reference_outputs(source_dir: str, tokens: np.ndarray,
                      dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """The source checkpoint run in transformers (eager, weights and computation in `dtype`) on tokens
    int [batch, length]: float32 (logits [batch, length, vocab], final hidden state after the last norm
    [batch, length, embed])."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(source_dir), dtype=getattr(torch, dtype), attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)), use_cache=False,
                    output_hidden_states=True)
    return out.logits.float().numpy(), out.hidden_states[-1].float().numpy()


MIN_CHECK_LENGTH = 64
BF16_TOLERANCE = 0.1  # random tiny Gemma / Gemma 2 / Gemma 3 models differ by 2-6 % of max |logits| in bf16


def default_check_length(cfg: DecoderConfig) -> int:
    """Tokens per row of `--check`: past the sliding window by 16, so a window mistake changes the logits
    (at a length <= the window, any window >= the length gives the same result)."""
    return max(MIN_CHECK_LENGTH, (cfg.sliding_window or 0) + 16)


@dataclasses.dataclass(frozen=True)
class Parity:
    """Our decoder against transformers on the same tokens: max |difference| and max |reference| of the
    logits and of the final hidden state (before the head and its soft-cap, which can hide a difference)."""

    logits_diff: float
    logits_scale: float
    hidden_diff: float
    hidden_scale: float

    def within(self, tolerance: float) -> bool:
        """Both differences within `hf_checkpoint.within_tolerance` of their reference's scale."""
        return (hf_checkpoint.within_tolerance(self.logits_diff, self.logits_scale, tolerance)
                and hf_checkpoint.within_tolerance(self.hidden_diff, self.hidden_scale, tolerance))


def parity(source_dir: str, cfg: DecoderConfig, params: Mapping[str, Any], *, batch: int = 2, length: int = 64,
           seed: int = 0, dtype: str = "float32") -> Parity:
    """Our decoder of `cfg` holding `params` against the source checkpoint on random token ids [batch, length],
    both with weights and computation in `dtype` ('float32' or 'bfloat16')."""
    import jax.numpy as jnp

    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))
    ref_logits, ref_hidden = reference_outputs(source_dir, tokens, dtype)
    decoder = build_decoder(dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype), params)
    ids = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(ids.shape, bool)
    hidden, _ = decoder(decoder.embed(ids), valid, jnp.zeros_like(valid), deterministic=True)
    logits = np.asarray(decoder.logits(hidden))
    hidden = np.asarray(hidden.astype(jnp.float32))
    return Parity(float(np.max(np.abs(logits - ref_logits))), float(np.max(np.abs(ref_logits))),
                  float(np.max(np.abs(hidden - ref_hidden))), float(np.max(np.abs(ref_hidden))))


# ---- CLI ----------------------------------------------------------------------------------------------
def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="spectron_jax.convert.decoder",
                                description="Import a Gemma-family decoder LM from a Hugging Face checkpoint.")
    parser.add_argument("--format", default="hf", choices=("hf",), help="the source layout (Hugging Face)")
    parser.add_argument("--input", required=True, help="checkpoint directory (config.json + safetensors) of a "
                        "Gemma / Gemma 2 / Gemma 3 (text or multimodal) model")
    parser.add_argument("--output", required=True, help="where the converted checkpoint is written")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with transformers (default: on when torch and transformers import and "
                             "--input is local)")
    parser.add_argument("--check_length", type=int, default=None,
                        help=f"tokens per row of the check (default: max({MIN_CHECK_LENGTH}, sliding window + 16))")
    parser.add_argument("--tolerance", type=float, default=hf_checkpoint.DEFAULT_TOLERANCE,
                        help=hf_checkpoint.TOLERANCE_HELP)
    parser.add_argument("--check_bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="with --check, also run both models in bfloat16 (weights and computation)")
    parser.add_argument("--bf16_tolerance", type=float, default=BF16_TOLERANCE,
                        help="the tolerance of the bfloat16 run, by the same rule (bfloat16 keeps 8 bits of "
                             "mantissa: two implementations differ by a few %% of the output's scale)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing converted checkpoint")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.check_length is not None and args.check_length < 1:
        raise cli.UsageError("--check_length must be >= 1")
    out = epath.Path(args.output)
    if (out / PARAMS_SUBDIR).exists() and not args.overwrite:
        raise cli.InputError(f"--output={args.output}: already holds {PARAMS_SUBDIR}/ (pass --overwrite)")
    remote = hf_checkpoint.is_remote(args.input)  # transformers reads local directories only
    check = (transformers_available() and not remote) if args.check is None else args.check
    if check and remote:
        raise cli.UsageError(f"--check needs a local --input (got {args.input}); pass --no-check")
    if check and not transformers_available():
        raise cli.UsageError("--check needs torch and transformers (pip install -e '.[convert]')")
    try:
        config = hf_checkpoint.read_config(args.input)
        cfg = decoder_config_from_hf(config)
        ids = token_ids(config)
        flat, counts = map_checkpoint(hf_checkpoint.read_tensors(args.input), cfg)
    except (hf_checkpoint.CheckpointError, KeyError, ValueError) as e:
        message = f"config.json: missing field {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise cli.InputError(f"--input={args.input}: {message}") from None
    from spectron_jax.checkpoints import unflatten_paths

    params = unflatten_paths(flat)
    count = int(sum(a.size for a in flat.values()))
    info: dict[str, Any] = {"source": str(args.input), "family": text_config(config)["model_type"],
                            "num_params": count, "tensors_used": counts.used, "tensors_ignored": counts.ignored,
                            "left_over": list(counts.left_over)}
    if check:
        length = args.check_length or default_check_length(cfg)
        result = parity(args.input, cfg, params, length=length)
        print(f"max |logits diff| = {result.logits_diff:.3g} (max |logits| = {result.logits_scale:.3g}; "
              f"2 rows of {length} tokens)", flush=True)
        print(f"max |final hidden diff| = {result.hidden_diff:.3g} (max |hidden| = {result.hidden_scale:.3g})",
              flush=True)
        info.update(max_logits_diff=result.logits_diff, max_logits=result.logits_scale,
                    max_hidden_diff=result.hidden_diff, max_hidden=result.hidden_scale, check_length=length)
        if not result.within(args.tolerance):
            raise cli.InputError(
                f"--input={args.input}: logits / final hidden state differ from transformers by "
                f"{result.logits_diff:.3g} / {result.hidden_diff:.3g}, above --tolerance={args.tolerance:g} x "
                f"max(1, {result.logits_scale:.3g} / {result.hidden_scale:.3g}); nothing written")
        if args.check_bf16:
            bf16 = parity(args.input, cfg, params, length=length, dtype="bfloat16")
            print(f"bfloat16: max |logits diff| = {bf16.logits_diff:.3g}, max |final hidden diff| = "
                  f"{bf16.hidden_diff:.3g}", flush=True)
            info.update(bf16_max_logits_diff=bf16.logits_diff, bf16_max_hidden_diff=bf16.hidden_diff)
            if not bf16.within(args.bf16_tolerance):
                raise cli.InputError(
                    f"--input={args.input}: in bfloat16, logits / final hidden state differ from transformers by "
                    f"{bf16.logits_diff:.3g} / {bf16.hidden_diff:.3g}, above --bf16_tolerance="
                    f"{args.bf16_tolerance:g} x max(1, {bf16.logits_scale:.3g} / {bf16.hidden_scale:.3g}); "
                    "nothing written")
    if not (epath.Path(args.input) / TOKENIZER_FILENAME).exists():
        print(f"warning: --input={args.input} has no {TOKENIZER_FILENAME}; the conversion has none, so training "
              "with it needs TrainConfig.vocab_path (the checkpoint's SentencePiece model)", file=sys.stderr,
              flush=True)
    write_converted(args.output, params, cfg, ids, args.input, info, config)
    print(f"source tensors: {counts.summary()}", flush=True)
    print(f"converted {info['family']} ({count:,} parameters) to {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
