"""Where a report came from: metrics.json's `provenance`.

    provenance(bundle_meta, decode, scorers, export_dir)
    -> {"checkpoint_step", "export_dir", "bundle", "decode", "scorers", "packages", "spectron_jax",
        "git_commit", "created_utc"}

  checkpoint_step   the step of the exported checkpoint (bundle.json's `step`; None when it has none);
  bundle            bundle.json's scalar fields (format, task, sep_id, ...);
  decode            the decode settings the rows were made with (`decoding.DecodeConfig` as a dict: max
                    frames, temperature, seed, top-k / top-p, pre-net dropout, ...);
  scorers           kind -> the scorer's name (what `runner.Scorers.names` prints);
  packages          the installed versions (importlib.metadata) of the packages the scorers and the
                    model run on; a package that is not installed is left out;
  spectron_jax      this package's version; git_commit: the commit of the source tree it was imported
                    from, with "+dirty" when it has uncommitted changes (None outside a git checkout or
                    without git: never an error);
  created_utc       when the report was written (ISO 8601, UTC).

`spectron_jax.eval` adds `scorer_flags` (the --asr / --text_lm / --speaker / --naturalness specs) and
`floors` (whether the floors were scored).

The rows each figure leaves out, and why, are in metrics.json's `excluded` (`evidence.collect`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import subprocess
from typing import Any, Mapping, Optional

# The distributions whose version a figure depends on (scorers, their runtimes, the model's stack).
PACKAGES = ("spectron_jax", "jax", "jaxlib", "flax", "numpy", "jiwer", "whisper-normalizer", "pocketsphinx",
            "resemblyzer", "speechmos", "onnxruntime", "torch", "transformers", "sentencepiece")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """{distribution: version} of those installed."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit(folder: Optional[str] = None) -> Optional[str]:
    """The HEAD commit of the git checkout holding `folder` (default: this package's source), with
    '+dirty' for uncommitted changes to tracked files; None without git or outside a checkout."""
    folder = folder or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20, check=False)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "") if commit else None


def provenance(bundle_meta: Optional[Mapping[str, Any]], decode: Optional[Mapping[str, Any]],
               scorers: Mapping[str, str], export_dir: Optional[str] = None) -> dict:
    """metrics.json's `provenance` (module docstring)."""
    from spectron_jax import __version__

    meta = dict(bundle_meta or {})
    return {
        "checkpoint_step": meta.get("step"), "export_dir": export_dir,
        "bundle": {k: v for k, v in meta.items() if v is None or isinstance(v, (str, int, float, bool))},
        "decode": dict(decode or {}), "scorers": dict(scorers),
        "packages": package_versions(), "spectron_jax": __version__, "git_commit": git_commit(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
