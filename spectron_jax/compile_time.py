"""Time spent compiling, apart from time spent running: `with CompileTimer() as t: ...; t.seconds`.

JAX reports every trace, lowering and backend compile through `jax.monitoring` duration events; the timer
sums those recorded while it is open (in any thread), and counts the backend compiles. Wall time of the
block minus `seconds` is then the time of the run itself.
"""

from __future__ import annotations

import threading

import jax

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_BACKEND_COMPILE = COMPILE_EVENTS[-1]


class CompileTimer:
    """Context manager: `seconds` (float) of tracing + lowering + compiling, `compiles` (int) backend
    compiles, both for what ran while it was open."""

    def __init__(self):
        self.seconds = 0.0
        self.compiles = 0
        self._lock = threading.Lock()

    def _listen(self, event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self.seconds += float(duration)
                self.compiles += int(event == _BACKEND_COMPILE)

    def __enter__(self) -> "CompileTimer":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


__all__ = ["COMPILE_EVENTS", "CompileTimer"]
