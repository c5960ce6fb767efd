"""Export bundles: what inference and evaluation load (params only, no optimizer state, no data).

    EXPORT/params/          orbax pytree of the parameters (float32 or bfloat16)
    EXPORT/config.gin       the run's operative config
    EXPORT/tokenizer.model  the SentencePiece model
    EXPORT/export.json      step, dtype, parameter count (written by `checkpoints.export`)
    EXPORT/bundle.json      the above plus per-component parameter counts, reduction factor, stop head,
                            training task, the text separator `sep_id` (null: none) and the
                            feature spec (`data/features.py`)

`load_bundle(EXPORT)` rebuilds the `SpectronModel` from config.gin (no gin search path is needed: the
operative config is self-contained) and reads the parameters onto one device.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

import jax
import numpy as np
from etils import epath

from spectron_jax import checkpoints
from spectron_jax.data import features

BUNDLE_FILENAME = "bundle.json"


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A loaded export.

    Attributes:
      model: the `SpectronModel` of config.gin.
      params: nested dict of arrays (what `SpectronModel`'s pure functions take).
      tokenizer: the `seqio.SentencePieceVocabulary` (None when the export has no tokenizer).
      meta: the parsed bundle.json.
      feature_spec: the `features.FeatureSpec` the model reads and writes.
      export_dir: where it was loaded from.
    """

    model: Any
    params: Any
    tokenizer: Any
    meta: dict
    feature_spec: features.FeatureSpec
    export_dir: str = ""


def _gin_error(error: Exception, config_text: str) -> str:
    """A one-line 'line N: message: the line' of a gin parse error."""
    message = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
    line = getattr(error, "lineno", None)
    found = re.search(r"\bline (\d+)", str(error))
    if found:
        line = int(found.group(1))
    elif line is None and len(error.args) > 1 and isinstance(error.args[1], tuple):  # tokenize.TokenError
        line = int(error.args[1][0])
        message = str(error.args[0])
    message = re.sub(r"\s*\(line \d+\)$", "", message).rstrip(".")
    lines = config_text.splitlines()
    if line is not None and 1 <= line <= len(lines):
        return f"line {line}: {message}: {lines[line - 1].strip()}"
    return f"line {line}: {message}" if line is not None else message


def _model_config_from_gin(config_text: str, source: str = checkpoints.CONFIG_FILENAME):
    """The `SpectronConfig` bound in a config.gin text; `cli.UsageError` naming `source` and the line."""
    import gin

    from spectron_jax import cli, gin_config, train

    train.register_train_configurables()  # the operative config of a run also binds the training configs
    gin_config.parse_gin(gin_files=[], bindings=[], finalize=False)  # registers and clears
    try:
        gin.parse_config(config_text)
    except Exception as e:  # noqa: BLE001 - gin raises ValueError, SyntaxError, TokenError...
        raise cli.UsageError(f"{source}: {_gin_error(e, config_text)}") from None
    try:
        return gin_config.build("SpectronConfig")
    except cli.CLIError as e:
        raise cli.UsageError(f"{source}: {' '.join(str(e).split())}") from None


def _task_name(config_text: str) -> Optional[str]:
    match = re.search(r"^\s*(?:TASK_NAME|task_name|MIXTURE_OR_TASK_NAME)\s*=\s*['\"]([^'\"]+)['\"]", config_text,
                      re.MULTILINE)
    return match.group(1) if match else None


def component_param_counts(params: Any) -> dict[str, int]:
    """{top-level component: parameter count} of a params tree."""
    return {str(name): int(sum(np.prod(x.shape) for x in jax.tree.leaves(sub))) for name, sub in params.items()}


def write_bundle_json(export_dir: str, info: dict) -> dict:
    """Adds bundle.json to an export folder written by `checkpoints.export` (`info`: its export.json)."""
    from spectron_jax import cli

    root = epath.Path(export_dir)
    config_text = (root / checkpoints.CONFIG_FILENAME).read_text()
    params = checkpoints.load_exported_params(str(export_dir))
    meta = {
        **info,
        "format": 1,
        "num_params_per_component": component_param_counts(params),
        "task": _task_name(config_text),
        "feature_spec": features.SPECTRON_FEATURES.to_dict(),
    }
    try:
        model_config = _model_config_from_gin(config_text)
    except cli.CLIError:  # a config.gin without a Spectron model (e.g. a bare decoder run)
        model_config = None
    if model_config is not None:
        meta.update(reduction_factor=int(model_config.reduction_factor),
                    stop_head=bool(model_config.acoustic.stop_head),
                    vocab_size=int(model_config.decoder.vocab_size),
                    sep_id=None if model_config.sep_id is None else int(model_config.sep_id))
    (root / BUNDLE_FILENAME).write_text(json.dumps(meta, indent=2))
    return meta


def load_bundle(export_dir: str) -> Bundle:
    """Loads an export folder (local or gs://).

    Raises:
      FileNotFoundError: not an export folder (no bundle.json / export.json / config.gin / params).
    """
    from spectron_jax.models.spectron_model import SpectronModel

    root = epath.Path(export_dir)
    if not (root / checkpoints.CONFIG_FILENAME).exists():
        raise FileNotFoundError(f"{export_dir}: no {checkpoints.CONFIG_FILENAME} (not an export folder?)")
    meta_path = root / BUNDLE_FILENAME
    if not meta_path.exists():
        meta_path = root / checkpoints.EXPORT_INFO_FILENAME
    if not meta_path.exists():
        raise FileNotFoundError(f"{export_dir}: no {BUNDLE_FILENAME} (not an export folder?)")
    meta = json.loads(meta_path.read_text())
    config_path = root / checkpoints.CONFIG_FILENAME
    model_config = _model_config_from_gin(config_path.read_text(), str(config_path))
    # orbax stores list indices as strings; the module's graph wants them back as ints.
    params = checkpoints.unflatten_paths(checkpoints.flatten_paths(checkpoints.load_exported_params(str(export_dir))))
    spec = features.FeatureSpec.from_dict(meta["feature_spec"]) if "feature_spec" in meta else features.SPECTRON_FEATURES
    tokenizer = None
    if (root / checkpoints.TOKENIZER_FILENAME).exists():
        from spectron_jax.data import tasks

        tokenizer = tasks.load_vocabulary(str(root / checkpoints.TOKENIZER_FILENAME))
    return Bundle(model=SpectronModel(model_config), params=params, tokenizer=tokenizer, meta=meta,
                  feature_spec=spec, export_dir=str(export_dir))


__all__ = ["BUNDLE_FILENAME", "Bundle", "component_param_counts", "load_bundle", "write_bundle_json"]
