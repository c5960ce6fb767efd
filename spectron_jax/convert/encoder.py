"""Importer of w2v-BERT 2.0 encoders (`Wav2Vec2BertModel` in `transformers`) onto our Conformer.

    python -m spectron_jax.convert.encoder --format=hf --input=DIR --output=DIR [--check | --no-check]
        [--check_frames=N]

Reads a Hugging Face checkpoint directory (config.json + safetensors, sharded or not; a checkpoint of
`Wav2Vec2BertModel` or of a model wrapping it under `wav2vec2_bert.`) and writes

    OUTPUT/params/        the encoder's parameters (an orbax pytree at the encoder's root, as
                          `PretrainedInit.encoder_checkpoint` expects)
    OUTPUT/encoder.gin    the `ConformerConfig` bindings that reproduce the architecture
    OUTPUT/conversion.json  the architecture (every `ConformerConfig` field encoder.gin binds), the source
                          config's hash, parameter count and the --check result; training refuses to load
                          params/ into an encoder of another architecture (`convert/metadata.py`)

How the two structures correspond (each point checked against `modeling_wav2vec2_bert.py`):

* front-end: `feature_projection` (LayerNorm + Linear over 160 stacked fbank values) ->
  `frontend='feature_projection'`; no subsampling, so encoder frames = input frames (20 ms each).
* blocks: ffn1 / self-attention / conv / ffn2 / final norm, macaron factor 0.5, swish everywhere — the
  same block as ours. Attention: q / k / v / out linears with biases; positions `relative_key`: a
  `[left + right + 1, head_dim]` table indexed by `clip(key - query, -left, right) + left`.
* conv module: pointwise convs and the depthwise conv without biases (`conv_bias=False`), the depthwise
  conv left-padded by K - 1 (`causal_conv=True`), a LayerNorm after it (`conv_norm='layer'`). The GLU
  takes the first half as value and the second as gate, as ours does.
* padding: transformers zeroes padded frames before the conv module and hides padded keys; so do we.
  Its outputs at padded frames are not zero; ours are. `--check` compares valid frames only.

Not expressible (refused with a one-line error naming the config field): `position_embeddings_type`
other than 'relative_key', an activation other than swish, the adapter (`add_adapter`; the intermediate
FFN before it only exists with the adapter).

A wrapping model (`Wav2Vec2BertForCTC`, `...ForSequenceClassification`, ...) is converted through its
`wav2vec2_bert.` base; the tensors outside it (the task head) are counted and named in the output, not
converted.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from spectron_jax import cli
from spectron_jax.convert import hf_checkpoint, metadata
from spectron_jax.models.conformer import ConformerConfig

PARAMS_SUBDIR = hf_checkpoint.PARAMS_SUBDIR
GIN_FILENAME = "encoder.gin"
DEFAULT_TOLERANCE = hf_checkpoint.DEFAULT_TOLERANCE
# Structural fields written to encoder.gin (dropout rates stay the run's choice).
GIN_FIELDS = ("input_dim", "model_dim", "num_layers", "num_heads", "ffn_dim", "conv_kernel_size", "conv_norm",
              "norm_epsilon", "frontend", "position_encoding", "left_relative_distance",
              "right_relative_distance", "causal_conv", "conv_bias")
_WRAPPER_PREFIX = "wav2vec2_bert."
_IGNORED = (r"(^|\.)masked_spec_embed$",)  # the pre-training mask vector; unused at encoding time


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ConformerConfig:
    """The `ConformerConfig` equal to a `Wav2Vec2BertConfig` dict; CheckpointError naming a field we lack."""
    def refuse(field, why):
        raise hf_checkpoint.CheckpointError(f"config.json: {field}={hf.get(field)!r} is not supported ({why})")

    if hf.get("position_embeddings_type", "relative_key") != "relative_key":
        refuse("position_embeddings_type", "only 'relative_key' maps onto our encoder")
    if hf.get("hidden_act", "swish") not in ("swish", "silu"):
        refuse("hidden_act", "our Conformer uses swish")
    if hf.get("add_adapter", False):
        refuse("add_adapter", "the adapter is not implemented; convert the base model")
    if int(hf.get("conv_depthwise_kernel_size", 31)) % 2 == 0:
        refuse("conv_depthwise_kernel_size", "transformers requires an odd kernel")
    values = dict(
        input_dim=int(hf.get("feature_projection_input_dim", 160)),
        model_dim=int(hf.get("hidden_size", 1024)),
        num_layers=int(hf.get("num_hidden_layers", 24)),
        num_heads=int(hf.get("num_attention_heads", 16)),
        ffn_dim=int(hf.get("intermediate_size", 4096)),
        conv_kernel_size=int(hf.get("conv_depthwise_kernel_size", 31)),
        conv_norm="layer",
        norm_epsilon=float(hf.get("layer_norm_eps", 1e-5)),
        frontend="feature_projection",
        position_encoding="relative_key",
        left_relative_distance=int(hf.get("left_max_position_embeddings", 64)),
        right_relative_distance=int(hf.get("right_max_position_embeddings", 8)),
        causal_conv=True,
        conv_bias=False,
    )
    values.update(overrides)
    return ConformerConfig(**values)


def _linear(prefix: str, heads: tuple[int, int] | None = None, heads_in: bool = False) -> dict:
    """Rules for a torch Linear `prefix` ([out, in] weight): our kernel [in, out] (optionally split into heads)."""
    def kernel(w):
        k = w.T
        if heads is not None:
            k = k.reshape(*heads, k.shape[1]) if heads_in else k.reshape(k.shape[0], *heads)
        return k

    def bias(b):
        return b.reshape(heads) if heads is not None and not heads_in else b

    return {f"{prefix}.weight": ("kernel", kernel), f"{prefix}.bias": ("bias", bias)}


def _norm(prefix: str) -> dict:
    return {f"{prefix}.weight": ("scale", None), f"{prefix}.bias": ("bias", None)}


def name_map(config: ConformerConfig, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """{transformers tensor name: (our parameter path, transform of the NumPy tensor or None)}; names start
    with `prefix` ('wav2vec2_bert.' in a wrapping model's checkpoint)."""
    heads = (config.num_heads, config.model_dim // config.num_heads)
    rules: dict[str, tuple[str, Any]] = {}

    def add(ours: str, table: dict):
        for name, (leaf, fn) in table.items():
            rules[name] = (f"{ours}/{leaf}", fn)

    add("feature_projection/norm", _norm("feature_projection.layer_norm"))
    add("feature_projection/projection", _linear("feature_projection.projection"))
    for i in range(config.num_layers):
        hf, ours = f"encoder.layers.{i}", f"blocks/{i}"
        for hf_ffn, our_ffn in (("ffn1", "ffn_in"), ("ffn2", "ffn_out")):
            add(f"{ours}/{our_ffn}/norm", _norm(f"{hf}.{hf_ffn}_layer_norm"))
            add(f"{ours}/{our_ffn}/hidden", _linear(f"{hf}.{hf_ffn}.intermediate_dense"))
            add(f"{ours}/{our_ffn}/output", _linear(f"{hf}.{hf_ffn}.output_dense"))
        add(f"{ours}/attention_norm", _norm(f"{hf}.self_attn_layer_norm"))
        for hf_name, our_name in (("linear_q", "query"), ("linear_k", "key"), ("linear_v", "value")):
            for name, (leaf, fn) in _linear(f"{hf}.self_attn.{hf_name}", heads).items():
                rules[name] = (f"{ours}/attention/{our_name}_{leaf}", fn)
        for name, (leaf, fn) in _linear(f"{hf}.self_attn.linear_out", heads, heads_in=True).items():
            rules[name] = (f"{ours}/attention/output_{leaf}", fn)
        rules[f"{hf}.self_attn.distance_embedding.weight"] = (f"{ours}/attention/distance_embedding", None)
        conv = f"{hf}.conv_module"
        add(f"{ours}/conv/norm", _norm(f"{conv}.layer_norm"))
        rules[f"{conv}.pointwise_conv1.weight"] = (f"{ours}/conv/pointwise_in/kernel", lambda w: w[:, :, 0].T)
        rules[f"{conv}.depthwise_conv.weight"] = (f"{ours}/conv/depthwise_kernel", lambda w: w[:, 0, :].T)
        add(f"{ours}/conv/conv_norm", _norm(f"{conv}.depthwise_layer_norm"))
        rules[f"{conv}.pointwise_conv2.weight"] = (f"{ours}/conv/pointwise_out/kernel", lambda w: w[:, :, 0].T)
        add(f"{ours}/final_norm", _norm(f"{hf}.final_layer_norm"))
    return {prefix + name: rule for name, rule in rules.items()}


def expected_shapes(config: ConformerConfig) -> dict[str, tuple[int, ...]]:
    """{parameter path: shape} of our encoder, traced without allocating."""
    from flax import nnx

    from spectron_jax.models.conformer import ConformerEncoder

    return hf_checkpoint.traced_shapes(lambda: ConformerEncoder(config, rngs=nnx.Rngs(0)))


def base_prefix(tensors: Mapping[str, Any]) -> str:
    """'wav2vec2_bert.' when the checkpoint is of a model wrapping the encoder, else ''."""
    return _WRAPPER_PREFIX if any(name.startswith(_WRAPPER_PREFIX) for name in tensors) else ""


def map_checkpoint(tensors: Mapping[str, np.ndarray],
                   config: ConformerConfig) -> tuple[dict[str, np.ndarray], hf_checkpoint.Counts]:
    """Our flat parameters {path: float32 array} and the counts of the source tensors (a wrapper's head is
    left over); CheckpointError on any mismatch."""
    prefix = base_prefix(tensors)
    return hf_checkpoint.map_tensors(tensors, name_map(config, prefix), expected_shapes(config), scope=prefix,
                                     ignore=_IGNORED, what="encoder")


def convert_tensors(tensors: Mapping[str, np.ndarray], config: ConformerConfig) -> dict[str, np.ndarray]:
    """`map_checkpoint` without the counts."""
    return map_checkpoint(tensors, config)[0]


def build_encoder(config: ConformerConfig, flat: Mapping[str, np.ndarray]):
    """A `ConformerEncoder` holding the converted parameters."""
    import jax.numpy as jnp
    from flax import nnx

    from spectron_jax.checkpoints import unflatten_paths
    from spectron_jax.models.conformer import ConformerEncoder

    model = ConformerEncoder(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    params.replace_by_pure_dict(unflatten_paths({k: jnp.asarray(v) for k, v in flat.items()}))
    nnx.update(model, params)
    return model


MIN_CHECK_FRAMES = 40


def default_check_frames(config: ConformerConfig) -> int:
    """Frames per row of `--check`: the relative-position window (left + right + 1) and 16 beyond, so
    the distance clipping on both sides is exercised."""
    return max(MIN_CHECK_FRAMES, config.left_relative_distance + config.right_relative_distance + 16)


def parity(input_dir: str, config: ConformerConfig, flat: Mapping[str, np.ndarray], *,
           frames: int = MIN_CHECK_FRAMES, seed: int = 0) -> tuple[float, float]:
    """(max |ours - transformers|, max |transformers|) over valid frames of a padded batch of random
    features, in float32.

    Batch: two rows of ``frames`` random stacked-fbank frames, the second padded after 60 % of them.
    """
    import torch
    from flax import nnx
    from transformers import Wav2Vec2BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    reference = Wav2Vec2BertModel.from_pretrained(input_dir, attn_implementation="eager").float().eval()
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2, frames, config.input_dim)).astype(np.float32)
    mask = np.ones((2, frames), np.int64)
    mask[1, int(0.6 * frames):] = 0
    with torch.no_grad():
        expected = reference(torch.from_numpy(features), attention_mask=torch.from_numpy(mask)).last_hidden_state
    model = build_encoder(config, flat)
    ours, _ = nnx.jit(lambda m, f, k: m(f, k, deterministic=True))(model, features, mask.astype(bool))
    valid = mask.astype(bool)
    expected = expected.numpy()[valid]
    return float(np.abs(np.asarray(ours)[valid] - expected).max()), float(np.abs(expected).max())


def parity_check(input_dir: str, config: ConformerConfig, flat: Mapping[str, np.ndarray], *,
                 frames: int = MIN_CHECK_FRAMES, seed: int = 0) -> float:
    """max |ours - transformers| of `parity`."""
    return parity(input_dir, config, flat, frames=frames, seed=seed)[0]


def gin_bindings(config: ConformerConfig, source: str) -> str:
    lines = [f"# ConformerConfig of the w2v-BERT encoder converted from {source}.",
             "# Written by spectron_jax.convert.encoder; include it after the model's gin file."]
    for field in GIN_FIELDS:
        lines.append(f"ConformerConfig.{field} = {getattr(config, field)!r}")
    lines += ["# Its input: stacked w2v-BERT fbank (shards from prepare --prompt_features=w2v_bert_fbank).",
              "SpectronConfig.prompt_features = 'w2v_bert_fbank'",
              "TaskConfig.prompt_features = 'w2v_bert_fbank'"]
    return "\n".join(lines) + "\n"


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="spectron_jax.convert.encoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", default="hf", choices=("hf",), help="the source layout (Hugging Face)")
    parser.add_argument("--input", required=True,
                        help="checkpoint directory (config.json + safetensors) of Wav2Vec2BertModel or a model "
                             "wrapping it")
    parser.add_argument("--output", required=True, help="where the converted checkpoint is written")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with transformers (default: on when torch and transformers import and "
                             "--input is local)")
    parser.add_argument("--check_frames", type=int, default=None,
                        help=f"frames per row of the check (default: max({MIN_CHECK_FRAMES}, left + right + 16))")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help=hf_checkpoint.TOLERANCE_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing converted checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.check_frames is not None and args.check_frames < 2:
        raise cli.UsageError("--check_frames must be >= 2")
    if (epath.Path(args.output) / PARAMS_SUBDIR).exists() and not args.overwrite:
        raise cli.InputError(f"--output={args.output}: already holds {PARAMS_SUBDIR}/ (pass --overwrite)")
    remote = hf_checkpoint.is_remote(args.input)  # transformers reads local directories only
    check = (hf_checkpoint.transformers_available() and not remote) if args.check is None else args.check
    if check and remote:
        raise cli.UsageError(f"--check needs a local --input (got {args.input}); pass --no-check")
    if check and not hf_checkpoint.transformers_available():
        raise cli.UsageError("--check needs torch and transformers (pip install -e '.[convert]')")
    try:
        hf = hf_checkpoint.read_config(args.input)
        if hf.get("model_type", "wav2vec2-bert") != "wav2vec2-bert":
            raise hf_checkpoint.CheckpointError(f"config.json: model_type {hf.get('model_type')!r} is not "
                                                "wav2vec2-bert")
        config = config_from_hf(hf)
        flat, counts = map_checkpoint(hf_checkpoint.read_tensors(args.input), config)
    except hf_checkpoint.CheckpointError as e:
        raise cli.InputError(f"--input={args.input}: {' '.join(str(e).split())}") from None
    diff = scale = frames = None
    if check:
        frames = args.check_frames or default_check_frames(config)
        diff, scale = parity(args.input, config, flat, frames=frames)
        print(f"max |hidden diff| = {diff:.3e} (max |hidden| = {scale:.3g}; 2 rows of {frames} frames)", flush=True)
        if not hf_checkpoint.within_tolerance(diff, scale, args.tolerance):
            raise cli.InputError(f"--input={args.input}: converted encoder differs from transformers by {diff:.3e}, "
                                 f"above --tolerance={args.tolerance:g} x max(1, {scale:.3g}); nothing written")
    hf_checkpoint.write_params(args.output, flat)
    output = epath.Path(args.output)
    (output / GIN_FILENAME).write_text(gin_bindings(config, str(args.input)))
    info = metadata.write(str(output), component="encoder", config=config, fields=GIN_FIELDS, source=str(args.input),
                          source_config=hf, info={"format": args.format, "input": str(args.input),
                                                  "num_params": int(sum(v.size for v in flat.values())),
                                                  "max_hidden_diff": diff, "max_hidden": scale,
                                                  "check_frames": frames, "tensors_used": counts.used,
                                                  "tensors_ignored": counts.ignored,
                                                  "left_over": list(counts.left_over)})
    print(f"source tensors: {counts.summary()}", flush=True)
    print(f"wrote {info['num_params']} encoder parameters to {output}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
