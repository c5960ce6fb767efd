"""`export`: a trained run's parameters (only), config.gin and tokenizer, for inference and evaluation.

    python -m spectron_jax.export --model_dir=DIR --output_dir=DIR [--dtype=bfloat16] [--step=N]
        [--no-use_ocdbt]

Reads the newest checkpoint of MODEL_DIR (or --step), drops the optimizer state, optionally casts the
floating parameters to bfloat16, and writes (see `spectron_jax.checkpoints.export`):

    OUT/params/          orbax pytree of the parameters (OCDBT, as training checkpoints are by default;
                         `--no-use_ocdbt`: one zarr store per array)
    OUT/config.gin       the run's operative config
    OUT/tokenizer.model  the SentencePiece model of the run
    OUT/export.json      step, dtype, parameter count
    OUT/bundle.json      + parameters per component, reduction factor, stop head, feature spec
                         (`spectron_jax.bundle`; `bundle.load_bundle(OUT)` reads it all back)
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from spectron_jax import cli


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="spectron_jax.export", description="Export a run's parameters for inference.")
    parser.add_argument("--model_dir", required=True, help="the training run's MODEL_DIR")
    parser.add_argument("--output_dir", required=True, help="where the export is written")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--use_ocdbt", action=argparse.BooleanOptionalAction, default=None,
                        help="write params/ in tensorstore's OCDBT format (default: CheckpointConfig.use_ocdbt's, "
                             "on, as training checkpoints); --no-use_ocdbt writes one zarr store per array")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from spectron_jax import filesystem

    if not filesystem.is_dir(args.model_dir):
        raise cli.InputError(f"--model_dir={args.model_dir}: not a directory")
    if filesystem.absolute(args.output_dir).rstrip("/") == filesystem.absolute(args.model_dir).rstrip("/"):
        raise cli.UsageError("--output_dir must differ from --model_dir")
    from spectron_jax import checkpoints

    try:
        use_ocdbt = checkpoints.CheckpointConfig.use_ocdbt if args.use_ocdbt is None else args.use_ocdbt
        info = checkpoints.export(args.model_dir, args.output_dir, dtype=args.dtype, step=args.step,
                                  use_ocdbt=use_ocdbt)
        from spectron_jax import bundle

        bundle.write_bundle_json(args.output_dir, info)
    except (FileNotFoundError, ValueError) as e:
        raise cli.InputError(f"--model_dir={args.model_dir}: {' '.join(str(e).split())}") from None
    print(f"exported step {info['step']} ({info['num_params']:,} parameters, {info['dtype']}) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    cli.run(main)
