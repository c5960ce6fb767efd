"""A training run's step metrics: kept on the device until a fetch point, checked for divergence,
written to metrics.jsonl, and timed over logging windows for throughput and MFU.

Fetch points are the logging steps, checkpoint saves, evaluations, a SIGTERM stop and the end of the
run: no other step waits for the host. A NaN / Inf loss is therefore seen at the next fetch point,
which always comes before a checkpoint is written.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

from spectron_jax import cli


class TrainingDiverged(cli.CLIError):
    """The loss became NaN or Inf (exit 1; no checkpoint is written)."""


def finite_floats(metrics) -> dict:
    """{name: float} of one step's metrics (device or host scalars)."""
    import numpy as np

    return {k: float(np.asarray(v)) for k, v in metrics.items()}


class PendingMetrics:
    """The steps' metrics not yet fetched from the device.

    Args:
      jsonl: `metric_logs.JsonlLog`; every fetched step becomes a record {"step", "split": "train", ...}.
      checkpointer: `checkpoints.TrainCheckpointer` (a divergence waits for its saves in flight and names
        its newest step).
    """

    def __init__(self, jsonl: Any, checkpointer: Any):
        self.jsonl, self.checkpointer = jsonl, checkpointer
        self.pending: list = []  # (step, device metrics)
        self.last: dict = {}  # the newest fetched step's metrics (host floats)

    def add(self, step: int, device_metrics: dict) -> None:
        self.pending.append((step, device_metrics))

    def fetch(self) -> None:
        """Fetches every pending step, writes its record and keeps the newest in `last`; raises
        `TrainingDiverged` at the first step whose loss or gradient norm is not finite."""
        import jax

        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        for (done, _), values in zip(self.pending, fetched):
            values = finite_floats(values)
            if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
                self.pending.clear()
                self.checkpointer.wait()
                raise TrainingDiverged(
                    f"step {done}: loss is {values['loss']} (grad norm {values['grad_norm']}); stopping. The "
                    f"last good checkpoint is step {self.checkpointer.latest_step()} in {self.checkpointer.directory}")
            self.jsonl.write({"step": done, "split": "train", **values})
            self.last = values
        self.pending.clear()


class ThroughputWindow:
    """Step time over the steps since the last logging step, as throughput scalars.

    The first step of a run (compilation warm-up) is not timed; `restart()` after time that is not
    training (saving, evaluating) starts a new window.

    Args:
      flops_per_step: XLA's count of the compiled step (all devices), or None.
      analytic_flops: the model's useful work per step (`flops.step_flops`).
      num_devices, peak_flops_per_device: what MFU divides by.
    """

    def __init__(self, flops_per_step: Optional[float], analytic_flops: float, num_devices: int, peak: float):
        self.flops_per_step, self.analytic_flops = flops_per_step, analytic_flops
        self.num_devices, self.peak = num_devices, peak
        self.start: Optional[float] = None
        self.steps = 0

    @property
    def started(self) -> bool:
        return self.start is not None

    def step_done(self) -> None:
        """Marks the end of a step (the first one opens the window)."""
        if self.start is None:
            self.start, self.steps = time.perf_counter(), 0
        else:
            self.steps += 1

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def scalars(self, last: dict) -> dict:
        """The window's throughput (`metrics.throughput`: tokens, frames, TFLOP/s per device, MFU; the
        analytic count as `analytic_*`) with the step's token and frame counts from `last`; {} for an
        empty window. Starts the next window."""
        from spectron_jax import metrics as metrics_lib

        if not self.steps:
            return {}
        now = time.perf_counter()
        seconds = (now - self.start) / self.steps
        rates = metrics_lib.throughput(seconds, text_tokens=last.get("num_text_tokens"), frames=last.get("num_frames"),
                                       flops_per_step=self.flops_per_step, num_devices=self.num_devices,
                                       peak_flops_per_device=self.peak)
        scalars = {k: v for k, v in rates.items() if v is not None}
        analytic = metrics_lib.throughput(seconds, flops_per_step=self.analytic_flops, num_devices=self.num_devices,
                                          peak_flops_per_device=self.peak)
        scalars.update({f"analytic_{k}": analytic[k] for k in ("tflops_per_device", "mfu") if analytic[k] is not None})
        self.start, self.steps = now, 0
        return scalars
