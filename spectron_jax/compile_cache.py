"""JAX's persistent compilation cache for training runs: a restart on the same topology loads the
compiled step instead of recompiling it.

`configure_compilation_cache(TrainConfig.compilation_cache_dir)` is called once at the start of a run;
the default folder is the user cache (`default_compilation_cache_dir()`), an environment setting
(JAX_COMPILATION_CACHE_DIR, empty: off) wins over it, and any folder, local or on an object store,
can be given.
"""

from __future__ import annotations

import os
from typing import Optional

from spectron_jax import filesystem


def default_compilation_cache_dir() -> str:
    """$XDG_CACHE_HOME/spectron_jax/jax_compilation_cache (~/.cache/... without XDG_CACHE_HOME)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "spectron_jax", "jax_compilation_cache")


def configure_compilation_cache(cache_dir: Optional[str], min_compile_seconds: Optional[float] = None) -> Optional[str]:
    """Points JAX's persistent compilation cache at `cache_dir` (see `TrainConfig.compilation_cache_dir`).

    None keeps JAX's setting when JAX_COMPILATION_CACHE_DIR is in the environment (an empty value: off) and
    otherwise uses `default_compilation_cache_dir()`; '' disables the cache. `min_compile_seconds` (None:
    JAX's default, 1 s) is the shortest compilation worth an entry. Returns the folder in use, or None.
    Takes effect for the next compilation, also in a process that has compiled before.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if cache_dir is None:
        if "JAX_COMPILATION_CACHE_DIR" in os.environ:
            return jax.config.values.get("jax_compilation_cache_dir") or None
        cache_dir = default_compilation_cache_dir()
    if min_compile_seconds is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    if cache_dir and not filesystem.is_remote(cache_dir):
        os.makedirs(cache_dir, exist_ok=True)
    if (jax.config.values.get("jax_compilation_cache_dir") or "") != cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir or None)
        compilation_cache.reset_cache()  # JAX decides once per process whether (and where) it caches
    return cache_dir or None
