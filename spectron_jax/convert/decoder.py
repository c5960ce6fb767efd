"""Importing Gemma-family decoder LMs (Gemma, Gemma 2, Gemma 3 text) from a Hugging Face checkpoint.

    python -m spectron_jax.convert.decoder --format=hf --input=DIR --output=DIR [--no-check] [--check_length=N]

reads `DIR/config.json` and its safetensors weights (sharded or not) and writes

    OUT/params/          orbax pytree of the decoder's parameters, paths at its root ('embedder/table', ...),
                         the layout `PretrainedInit.lm_checkpoint` (and `checkpoints.component_init`) loads
    OUT/decoder.gin      the gin bindings of `DecoderConfig` (and the tokenizer ids) that reproduce the
                         checkpoint's architecture
    OUT/tokenizer.model  the checkpoint's SentencePiece model (when DIR has one; a warning when not)
    OUT/conversion.json  the architecture (every `DecoderConfig` field decoder.gin binds), the source
                         config's hash, family, parameter count and the parity figure of the check;
                         training refuses to load params/ into a decoder of another architecture
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
(2 rows of max(64, sliding window + 16) tokens, so every window is exceeded) and fails above a tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from etils import epath

from spectron_jax import cli
from spectron_jax.convert import hf_checkpoint, metadata
from spectron_jax.models.decoder import DecoderConfig

FAMILIES = ("gemma", "gemma2", "gemma3_text")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
PARAMS_SUBDIR = "params"
GIN_FILENAME = "decoder.gin"
TOKENIZER_FILENAME = "tokenizer.model"
# DecoderConfig fields an imported checkpoint fixes (the rest, dtype / remat_policy / scan_layers / dropout, stay run knobs).
ARCHITECTURE_FIELDS = (
    "vocab_size", "model_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "block",
    "activation", "rope_base", "rope_fraction", "local_rope_base", "tie_embeddings", "scale_tied_logits",
    "embed_scale_by_sqrt_dim", "rmsnorm_add_one", "norm_eps", "post_norms", "qk_norm", "sliding_window",
    "attention_pattern", "final_logit_softcap", "attn_logit_softcap", "query_pre_attn_scalar",
)


class UnsupportedConfig(ValueError):
    """A checkpoint config field our decoder cannot express; the message names the field."""


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
def _prefix(tensors: Mapping[str, np.ndarray]) -> str:
    """The name prefix of the text model's modules ('model.' for Gemma*ForCausalLM)."""
    for name in tensors:
        if name.endswith("embed_tokens.weight"):
            return name[: -len("embed_tokens.weight")]
    raise hf_checkpoint.CheckpointError("checkpoint: no '*embed_tokens.weight' tensor (not a Gemma text model?)")


def convert_params(tensors: Mapping[str, np.ndarray], cfg: DecoderConfig) -> dict[str, Any]:
    """Our decoder's parameters (the nested `to_pure_dict` layout, float32) from Hugging Face tensors.

    Linear weights are stored [out, in] by torch; ours are [in, ...]: q [embed, heads, head_dim],
    k / v [embed, kv_heads, head_dim], o [heads, head_dim, embed], gate / up [embed, mlp], down [mlp, embed].
    """
    prefix = _prefix(tensors)
    used: set[str] = set()

    def get(name: str, shape: tuple) -> np.ndarray:
        key = prefix + name
        if key not in tensors:
            raise hf_checkpoint.CheckpointError(f"checkpoint: tensor {key} is missing")
        value = np.asarray(tensors[key], np.float32)
        if value.shape != shape:
            raise hf_checkpoint.CheckpointError(f"checkpoint: tensor {key} has shape {value.shape}, config gives {shape}")
        used.add(key)
        return value

    d, n, k, h, m = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    params: dict[str, Any] = {
        "embedder": {"table": get("embed_tokens.weight", (cfg.vocab_size, d))},
        "final_norm": {"scale": get("norm.weight", (d,))},
        "layers": {},
    }
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(tensors["lm_head.weight"], tensors[prefix + "embed_tokens.weight"]):
            raise UnsupportedConfig("checkpoint: tie_word_embeddings is true but lm_head.weight differs from "
                                    "the embedding table")
    if not cfg.tie_embeddings:
        head = "lm_head.weight"
        if head not in tensors:
            raise hf_checkpoint.CheckpointError(f"checkpoint: tie_word_embeddings is false but {head} is missing")
        params["embedder"]["output"] = np.asarray(tensors[head], np.float32).T
        used.add(head)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        attn = {
            "q": get(p + "self_attn.q_proj.weight", (n * h, d)).T.reshape(d, n, h),
            "k": get(p + "self_attn.k_proj.weight", (k * h, d)).T.reshape(d, k, h),
            "v": get(p + "self_attn.v_proj.weight", (k * h, d)).T.reshape(d, k, h),
            "o": get(p + "self_attn.o_proj.weight", (d, n * h)).T.reshape(n, h, d),
        }
        if cfg.qk_norm:
            attn["q_norm"] = {"scale": get(p + "self_attn.q_norm.weight", (h,))}
            attn["k_norm"] = {"scale": get(p + "self_attn.k_norm.weight", (h,))}
        layer = {
            "attn": attn,
            "attn_norm": {"scale": get(p + "input_layernorm.weight", (d,))},
            "mlp": {
                "gate": get(p + "mlp.gate_proj.weight", (m, d)).T,
                "up": get(p + "mlp.up_proj.weight", (m, d)).T,
                "down": get(p + "mlp.down_proj.weight", (d, m)).T,
            },
        }
        if cfg.post_norms:  # Gemma 2 / 3
            layer["post_attn_norm"] = {"scale": get(p + "post_attention_layernorm.weight", (d,))}
            layer["mlp_norm"] = {"scale": get(p + "pre_feedforward_layernorm.weight", (d,))}
            layer["post_mlp_norm"] = {"scale": get(p + "post_feedforward_layernorm.weight", (d,))}
        else:  # Gemma: its 'post_attention_layernorm' is the norm in front of the MLP
            layer["mlp_norm"] = {"scale": get(p + "post_attention_layernorm.weight", (d,))}
        params["layers"][i] = layer
    leftover = sorted(name for name in tensors if name.startswith(prefix) and name not in used
                      and not name.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise UnsupportedConfig(f"checkpoint: tensor {leftover[0]} has no place in the decoder "
                                f"({len(leftover)} unused)")
    return _contiguous(params)


def _contiguous(tree: Any) -> Any:
    """Nested dict with every array made C-contiguous (transposes are views)."""
    return _map(np.ascontiguousarray, tree)


# ---- our decoder from a parameter tree ------------------------------------------------------------
def build_decoder(cfg: DecoderConfig, params: Mapping[str, Any]):
    """A `Decoder` of `cfg` holding `params` (the nested layout of `convert_params`); nothing random."""
    import jax.numpy as jnp
    from flax import nnx

    from spectron_jax.models.decoder import Decoder

    decoder = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(decoder, nnx.Param)
    state.replace_by_pure_dict(_map(lambda a: jnp.asarray(a, jnp.dtype(cfg.param_dtype)), params))
    nnx.update(decoder, state)
    return decoder


def _map(fn, tree):
    if isinstance(tree, Mapping):
        return {key: _map(fn, value) for key, value in tree.items()}
    return fn(tree)


def decoder_logits(decoder, tokens: np.ndarray) -> np.ndarray:
    """Causal LM logits of our decoder: tokens int [batch, length] -> float32 [batch, length, vocab]."""
    import jax.numpy as jnp

    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool)
    hidden, _ = decoder(decoder.embed(tokens), valid, jnp.zeros_like(valid), deterministic=True)
    return np.asarray(decoder.logits(hidden))


# ---- writing ---------------------------------------------------------------------------------------
def gin_bindings(cfg: DecoderConfig, ids: TokenIds, source: str = "") -> str:
    """`decoder.gin`: the architecture of `cfg` and the tokenizer ids, as gin bindings."""
    lines = [f"# Decoder architecture imported from a Hugging Face checkpoint{': ' + source if source else ''}.",
             "# Written by spectron_jax.convert.decoder; include it after a models/ file to swap in this LM.", ""]
    for name in ARCHITECTURE_FIELDS:
        value = getattr(cfg, name)
        lines.append(f"DecoderConfig.{name} = {_gin_literal(value)}")
    lines += ["", "# The checkpoint's tokenizer ids (the text input starts with its bos).",
              f"SpectronConfig.sos_id = {ids.bos_id}", f"SpectronConfig.eos_id = {ids.eos_id}",
              f"SpectronConfig.pad_id = {ids.pad_id}", ""]
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
    """Writes params/, decoder.gin, tokenizer.model (when the source has one) and conversion.json."""
    import orbax.checkpoint as ocp

    out = epath.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saver = ocp.StandardCheckpointer()
    target = out / PARAMS_SUBDIR
    saver.save(target if "://" in str(target) else target.resolve(), dict(params))
    saver.wait_until_finished()
    (out / GIN_FILENAME).write_text(gin_bindings(cfg, ids, str(source_dir)))
    tokenizer = epath.Path(source_dir) / TOKENIZER_FILENAME
    if tokenizer.exists():
        (out / TOKENIZER_FILENAME).write_bytes(tokenizer.read_bytes())
    metadata.write(str(out), component="decoder", config=cfg, fields=ARCHITECTURE_FIELDS, source=str(source_dir),
                   source_config=source_config,
                   info={**info, "tokenizer": TOKENIZER_FILENAME if tokenizer.exists() else None})


# ---- the parity check -------------------------------------------------------------------------------
def transformers_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def reference_outputs(source_dir: str, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The source checkpoint run in transformers (eager, float32) on tokens int [batch, length]:
    (logits [batch, length, vocab], final hidden state after the last norm [batch, length, embed])."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(source_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)), use_cache=False,
                    output_hidden_states=True)
    return out.logits.float().numpy(), out.hidden_states[-1].float().numpy()


MIN_CHECK_LENGTH = 64


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
        """Both differences <= tolerance x max(1, max |reference|)."""
        return (self.logits_diff <= tolerance * max(1.0, self.logits_scale)
                and self.hidden_diff <= tolerance * max(1.0, self.hidden_scale))


def parity(source_dir: str, cfg: DecoderConfig, params: Mapping[str, Any], *, batch: int = 2, length: int = 64,
           seed: int = 0) -> Parity:
    """Our decoder of `cfg` holding `params` against the source checkpoint on random token ids [batch, length]."""
    import jax.numpy as jnp

    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))
    ref_logits, ref_hidden = reference_outputs(source_dir, tokens)
    decoder = build_decoder(cfg, params)
    ids = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(ids.shape, bool)
    hidden, _ = decoder(decoder.embed(ids), valid, jnp.zeros_like(valid), deterministic=True)
    logits = np.asarray(decoder.logits(hidden))
    hidden = np.asarray(hidden, np.float32)
    return Parity(float(np.max(np.abs(logits - ref_logits))), float(np.max(np.abs(ref_logits))),
                  float(np.max(np.abs(hidden - ref_hidden))), float(np.max(np.abs(ref_hidden))))


# ---- CLI ----------------------------------------------------------------------------------------------
def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="spectron_jax.convert.decoder",
                                description="Import a Gemma-family decoder LM from a Hugging Face checkpoint.")
    parser.add_argument("--format", default="hf", choices=("hf",), help="the source layout (Hugging Face)")
    parser.add_argument("--input", required=True, help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="where the converted checkpoint is written")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                        help="compare logits with transformers (default: on when torch and transformers import)")
    parser.add_argument("--check_length", type=int, default=None,
                        help=f"tokens per row of the check (default: max({MIN_CHECK_LENGTH}, sliding window + 16))")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="the check fails above tolerance * max(1, max |logits|)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing converted checkpoint")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.check_length is not None and args.check_length < 1:
        raise cli.UsageError("--check_length must be >= 1")
    out = epath.Path(args.output)
    if (out / PARAMS_SUBDIR).exists() and not args.overwrite:
        raise cli.InputError(f"--output={args.output}: already holds {PARAMS_SUBDIR}/ (pass --overwrite)")
    remote = "://" in str(args.input)  # transformers reads local directories only
    check = (transformers_available() and not remote) if args.check is None else args.check
    if check and remote:
        raise cli.UsageError(f"--check needs a local --input (got {args.input}); pass --no-check")
    if check and not transformers_available():
        raise cli.UsageError("--check needs torch and transformers (pip install -e '.[convert]')")
    try:
        config = hf_checkpoint.read_config(args.input)
        cfg = decoder_config_from_hf(config)
        ids = token_ids(config)
        params = convert_params(hf_checkpoint.read_tensors(args.input), cfg)
    except (hf_checkpoint.CheckpointError, UnsupportedConfig, KeyError, ValueError) as e:
        message = f"missing field {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise cli.InputError(f"--input={args.input}: {message}") from None
    count = int(sum(a.size for a in _leaves(params)))
    info: dict[str, Any] = {"source": str(args.input), "family": text_config(config)["model_type"],
                            "num_params": count}
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
    if (out / PARAMS_SUBDIR).exists():
        (out / PARAMS_SUBDIR).rmtree()
    if not (epath.Path(args.input) / TOKENIZER_FILENAME).exists():
        print(f"warning: --input={args.input} has no {TOKENIZER_FILENAME}; the conversion has none, so training "
              "with it needs TrainConfig.vocab_path (the checkpoint's SentencePiece model)", file=sys.stderr,
              flush=True)
    write_converted(args.output, params, cfg, ids, args.input, info, config)
    print(f"converted {info['family']} ({count:,} parameters) to {args.output}", flush=True)
    return 0


def _leaves(tree):
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


if __name__ == "__main__":
    cli.run(main)
