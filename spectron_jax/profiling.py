"""A `jax.profiler` trace of a range of training steps (`TrainConfig.profile_steps`), for TensorBoard's
profile plugin (MODEL_DIR/plugins/profile/<run>/)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, ContextManager, Optional

from spectron_jax import filesystem


class StepProfiler:
    """Traces the steps `steps = (start, stop)` (1-based, inclusive) on process 0 only.

    The step is one SPMD program: one host's trace shows it (every host writing would also collide on a
    shared MODEL_DIR when two processes share a host name). Call `before(step)` / `after(step, state)`
    around each step and `close()` at the end. On an object store the trace is written to a local folder
    and copied into MODEL_DIR/plugins/profile/ when it stops.

    Args:
      steps: (start, stop), or None for no trace.
      model_dir: the run's folder (local or an object store).
      enabled: whether this process traces (process 0).
    """

    def __init__(self, steps: Optional[tuple], model_dir: str, enabled: bool):
        self.steps, self.model_dir = steps, model_dir
        self.enabled = enabled and steps is not None
        self.local_dir: Optional[str] = None

    def before(self, step: int) -> ContextManager:
        """Starts the trace at the first step of the range; returns the step's trace annotation context."""
        import jax

        if self.enabled and self.local_dir is None and self.steps[0] <= step <= self.steps[1]:
            if filesystem.is_remote(self.model_dir):
                self.local_dir = tempfile.mkdtemp(prefix="spectron_profile_")
            else:
                self.local_dir = self.model_dir
            jax.profiler.start_trace(self.local_dir)
            print(f"profiling steps {step}-{self.steps[1]} into {self.model_dir}/plugins/profile", flush=True)
        if self.local_dir is None:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, state: Any) -> None:
        """Stops the trace after the last step of the range (waiting for `state`, the step's output)."""
        if self.local_dir is not None and step >= self.steps[1]:
            self._stop(state)

    def close(self) -> None:
        """Stops a trace still running (a run that ended inside the range)."""
        if self.local_dir is not None:
            self._stop(None)

    def _stop(self, state: Any) -> None:
        import jax

        if state is not None:
            jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
        jax.profiler.stop_trace()
        local, self.local_dir, self.enabled = self.local_dir, None, False
        if local != self.model_dir:
            for folder, _, names in os.walk(local):
                relative = os.path.relpath(folder, local)
                for name in names:
                    filesystem.copy(os.path.join(folder, name), filesystem.join(self.model_dir, relative, name))
            shutil.rmtree(local, ignore_errors=True)
