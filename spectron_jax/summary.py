"""Parameter counts of a Spectron configuration, per component, without allocating the model.

    python -m spectron_jax.summary --gin_file=gin/models/spectron_1b.gin [--json] [--gin.NAME=VALUE ...]

The model is built abstractly (`nnx.eval_shape`), so even the 1B configuration is counted in seconds
on a laptop. Components: the Conformer encoder, the projection P, the decoder LM (with its token
embedding also shown on its own), the pre-net, the post-net and the stop head. `--json` prints one
JSON object instead of the table:

    {"encoder": int, "projection": int, "decoder": int, "decoder_embedding": int,
     "decoder_blocks": int, "prenet": int, "postnet": int, "stop_head": int, "total": int,
     "param_bytes": int, "gin_files": [str, ...]}

`decoder` includes `decoder_embedding` (the tied table, or table + output projection when untied);
`decoder_blocks` is the rest (layers and final norm). `param_bytes` is the storage at the configured
parameter dtypes.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from spectron_jax import cli, gin_config

COMPONENTS = ("encoder", "projection", "decoder", "prenet", "postnet", "stop_head", "ctc_head")


def count_parameters(config) -> dict[str, int]:
    """{component: parameter count} of the model `config` (a SpectronConfig) describes, plus `total`,
    `decoder_embedding`, `decoder_blocks` and `param_bytes`. Nothing is allocated."""
    import jax
    import numpy as np
    from flax import nnx

    from spectron_jax.models.spectron_model import SpectronModel

    abstract = nnx.state(SpectronModel(config).abstract_module(), nnx.Param)
    counts = {name: 0 for name in COMPONENTS}
    counts["decoder_embedding"] = 0
    param_bytes = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
        top = str(keys[0])
        if top not in counts:
            raise ValueError(f"parameter {'/'.join(map(str, keys))} belongs to no known component")
        size = int(np.prod(leaf.shape, dtype=np.int64))
        counts[top] += size
        if top == "decoder" and len(keys) > 1 and str(keys[1]) == "embedder":
            counts["decoder_embedding"] += size
        param_bytes += size * np.dtype(leaf.dtype).itemsize
    counts["decoder_blocks"] = counts["decoder"] - counts["decoder_embedding"]
    counts["total"] = sum(counts[name] for name in COMPONENTS)
    counts["param_bytes"] = param_bytes
    return counts


def _millions(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def format_table(counts: dict[str, int], config) -> str:
    """A fixed-width table of `count_parameters` output, with the main shapes of `config`."""
    enc, dec, ac = config.encoder, config.decoder, config.acoustic
    rows = [
        ("encoder", counts["encoder"], f"Conformer {enc.num_layers} x {enc.model_dim}, {enc.num_heads} heads"),
        ("projection", counts["projection"], f"{enc.model_dim} -> {dec.model_dim}"),
        ("decoder", counts["decoder"],
         f"{dec.num_layers} x {dec.model_dim}, {dec.num_heads}/{dec.num_kv_heads} q/kv heads x {dec.head_dim}, "
         f"mlp {dec.mlp_dim}"),
        ("  embedding", counts["decoder_embedding"],
         f"vocab {dec.vocab_size}, {'tied' if dec.tie_embeddings else 'untied'}"),
        ("  blocks", counts["decoder_blocks"], "layers and final norm"),
        ("prenet", counts["prenet"], f"{ac.prenet_input_dim} -> {' -> '.join(map(str, ac.prenet_dims))} -> "
                                     f"{dec.model_dim}"),
        ("postnet", counts["postnet"], f"{dec.model_dim} -> {ac.postnet_hidden or ''}{' -> ' if ac.postnet_hidden else ''}"
                                       f"{ac.reduction_factor} x {ac.num_mel}"),
        ("stop_head", counts["stop_head"], "on" if ac.stop_head else "off"),
        ("total", counts["total"], f"{counts['param_bytes'] / 2**30:.2f} GiB of parameters"),
    ]
    width = max(len(f"{n:,}") for _, n, _ in rows)
    lines = [f"{'component':<12} {'parameters':>{width}} {'':>8}  notes"]
    for name, n, note in rows:
        lines.append(f"{name:<12} {n:>{width},} {_millions(n):>8}  {note}")
    return "\n".join(lines)


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="spectron_jax.summary",
                                description="Parameter counts of a Spectron gin configuration, per component.")
    gin_config.add_gin_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = gin_config.parse_args(_parser(), argv)
    if not args.gin_file:
        raise cli.UsageError("--gin_file is required (e.g. --gin_file=gin/models/tiny.gin)")
    gin_config.parse_gin(args)
    config = gin_config.build("SpectronConfig")
    counts = count_parameters(config)
    if args.json:
        print(json.dumps({**counts, "gin_files": list(args.gin_file)}, sort_keys=True))
    else:
        print(format_table(counts, config))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    cli.run(main)
