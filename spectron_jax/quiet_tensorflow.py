"""Quiet TensorFlow start-up: TensorFlow reads data here and must not own an accelerator or flood stderr.

TensorFlow 2.21's C++ runtime writes its start-up lines ("Could not find cuda drivers", "oneDNN custom
operations are on", "failed call to cuInit", the CPU-feature notice) through absl logging *before*
absl's log initialisation, so `TF_CPP_MIN_LOG_LEVEL` does not reach them: they are printed on every
import, twice per process, whatever the environment says.

`install()` (called when the package is imported) puts a finder on `sys.meta_path` that runs the first
`import tensorflow` — by this package, seqio, tensorflow-datasets or user code alike — with file
descriptor 2 pointed at a temporary file. Inside that window it also hides every GPU from TensorFlow
(`tf.config.set_visible_devices([], "GPU")`: JAX owns the accelerators; TensorFlow would otherwise
reserve GPU memory for its input pipeline), which is when the CUDA probe runs. Afterwards it writes
back to stderr every captured line that is not one of the known start-up notices, so a real error or
warning raised during the import still shows.

`SPECTRON_TF_VERBOSE=1` turns the filter off (TensorFlow then prints what it always prints).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from typing import Iterator, Optional

VERBOSE_ENV = "SPECTRON_TF_VERBOSE"

# The start-up notices of TensorFlow's C++ runtime on a machine without CUDA (or with a CPU-only
# jaxlib): each pattern matches one known line and nothing a user would need to see.
_NOISE = tuple(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    r"^[IWE]\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\.",
    r"^[IWE]\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    r"^[IWE]\d{4} [\d:. ]+\d+ cuda_platform\.cc:\d+\] failed call to cuInit",
    r"^[IWE]\d{4} [\d:. ]+\d+ cuda_executor\.cc:\d+\] .*(?:CUDA|cuda)",
    r"^[IWE]\d{4} [\d:. ]+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .*, in other operations, rebuild TensorFlow",
    r"^[IWE]\d{4} [\d:. ]+\d+ gpu_device\.cc:\d+\] Cannot dlopen some GPU libraries",
    r"^Skipping registering GPU devices\.\.\.$",
))


def is_noise(line: str) -> bool:
    """Whether `line` (one line of stderr, without its newline) is a known TensorFlow start-up notice."""
    return any(p.search(line) for p in _NOISE)


def filter_noise(text: str) -> str:
    """`text` without the lines `is_noise` recognises (the rest kept in order, newlines included)."""
    return "".join(line for line in text.splitlines(keepends=True) if not is_noise(line.rstrip("\r\n")))


@contextlib.contextmanager
def _stderr_filtered() -> Iterator[None]:
    """Points fd 2 at a temporary file for the block, then replays its non-noise lines to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = filter_noise(capture.read().decode("utf-8", errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def _hide_gpus(tf_module) -> None:
    """TensorFlow sees no GPU (its device probe runs here, inside the filtered window)."""
    try:
        tf_module.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError, AttributeError):  # devices already initialised, or a partial build
        pass


class _QuietLoader(importlib.abc.Loader):
    """Wraps TensorFlow's own loader: executes the package inside the filtered window."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _stderr_filtered():
            self._loader.exec_module(module)
            _hide_gpus(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level `tensorflow` package with the other finders and gives it `_QuietLoader`."""

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the package, later imports are cached
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Makes the first `import tensorflow` in this process quiet (no-op when TensorFlow is already
    imported, or when SPECTRON_TF_VERBOSE is set to a non-empty value other than 0)."""
    if "tensorflow" in sys.modules or os.environ.get(VERBOSE_ENV, "0") not in ("", "0"):
        return
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
