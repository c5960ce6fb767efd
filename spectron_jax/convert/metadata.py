"""The record a converter writes beside the parameters, and the check of a model against it at load.

Both importers write `OUT/conversion.json`:

    component             'decoder' or 'encoder' (where the parameters go in a Spectron model)
    config_class          'DecoderConfig' / 'ConformerConfig'
    architecture          {field: value} of every config field the conversion binds (what its gin file binds)
    source                the checkpoint converted
    source_config_sha256  SHA-256 of the source config.json (its keys sorted)
    ...                   the converter's own figures (parameter count, the parity check)

`check_architecture` compares the `architecture` with the config of the model being trained and refuses
a difference in one line naming every differing field; names in `allow` (e.g. 'DecoderConfig.sliding_window'
for a deliberately longer window) are accepted. A conversion written before the record existed
(`convert.json`, or a `conversion.json` without `architecture`) loads with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, Mapping, Optional, Sequence

from etils import epath

logger = logging.getLogger(__name__)

METADATA_FILENAME = "conversion.json"
LEGACY_FILENAMES = ("convert.json",)  # what the decoder importer wrote before the record


def source_config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of a source config dict, independent of key order."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    """A config value as JSON reads it back (tuples are lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def architecture(config: Any, fields: Sequence[str]) -> dict[str, Any]:
    """{field: value} of `config` (a frozen config dataclass), JSON-ready."""
    return {name: _plain(getattr(config, name)) for name in fields}


def write(output_dir: str, *, component: str, config: Any, fields: Sequence[str], source: str,
          source_config: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """Writes `output_dir/conversion.json` (see the module docstring); returns what it wrote."""
    record = {"component": component, "config_class": type(config).__name__,
              "architecture": architecture(config, fields), "source": str(source),
              "source_config_sha256": source_config_hash(source_config), **info}
    (epath.Path(output_dir) / METADATA_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read(checkpoint: str) -> Optional[dict[str, Any]]:
    """The record of a converted checkpoint folder; None (with a warning for an older conversion) without one."""
    folder = epath.Path(checkpoint)
    path = folder / METADATA_FILENAME
    record = json.loads(path.read_text()) if path.exists() else None
    if isinstance(record, dict) and isinstance(record.get("architecture"), dict):
        return record
    if record is not None or any((folder / name).exists() for name in LEGACY_FILENAMES):
        logger.warning("%s: converted before conversions recorded their architecture; loaded without checking "
                       "it against the model (convert it again to have it checked)", checkpoint)
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b if isinstance(a, bool) and isinstance(b, bool) else False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def mismatches(record: Mapping[str, Any], config: Any, allow: Sequence[str] = ()) -> list[str]:
    """'Class.field: checkpoint X, model Y' for every recorded field `config` differs in (minus `allow`)."""
    cls = record.get("config_class", type(config).__name__)
    known = {f.name for f in dataclasses.fields(config)}
    out = []
    for name, recorded in record["architecture"].items():
        qualified = f"{cls}.{name}"
        if qualified in allow or name not in known:
            continue
        value = _plain(getattr(config, name))
        if not _same(recorded, value):
            out.append(f"{qualified}: checkpoint {recorded!r}, model {value!r}")
    return out


def check_architecture(checkpoint: str, config: Any, *, component: Optional[str] = None,
                       allow: Sequence[str] = ()) -> None:
    """Refuses to load the conversion `checkpoint` into a model whose `config` differs from its record.

    Args:
      checkpoint: a converted folder (nothing is checked for a folder without a record).
      config: the `DecoderConfig` / `ConformerConfig` of the model part the checkpoint fills.
      component: the part the caller loads it as ('decoder', 'encoder'); a record of another is refused.
      allow: 'Class.field' names whose difference is deliberate (`PretrainedInit.allow_changes`).

    Raises:
      ValueError: one line naming the checkpoint and each differing field.
    """
    record = read(checkpoint)
    if record is not None:
        check_record(checkpoint, record, config, component=component, allow=allow)


def check_record(checkpoint: str, record: Mapping[str, Any], config: Any, *, component: Optional[str] = None,
                 allow: Sequence[str] = ()) -> None:
    """`check_architecture` on a record already read."""
    if component is not None and record.get("component", component) != component:
        raise ValueError(f"{checkpoint}: holds a converted {record['component']}, loaded as the {component}")
    diffs = mismatches(record, config, allow)
    if diffs:
        raise ValueError(f"{checkpoint}: converted for another architecture than the model's: " + "; ".join(diffs)
                         + " (include the conversion's gin file, or list a deliberate change in "
                         "PretrainedInit.allow_changes)")
