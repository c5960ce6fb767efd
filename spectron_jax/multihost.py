"""The processes of a training job: distributed start-up, meeting points, and the preemption stop.

    DistributedConfig      how the processes find each other, and how long they wait for each other
    initialize(config)     `jax.distributed.initialize` for a job of more than one process
    meet(name, config)     a barrier of every process through the coordination service
    PreemptionStop         SIGTERM -> the step at which every process saves and exits

Why `meet` exists. On CPU, JAX's cross-process collectives use Gloo. The first collective over a set
of devices opens a Gloo context, and that rendezvous gives up after 30 s (a constant inside jaxlib
0.10, not configurable): processes that reach a new collective more than 30 s apart abort with
"Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out". Once a context
exists, later collectives on it wait as long as it takes. Processes drift apart at start-up (restore,
initialisation and compilation take different times on different hosts, and a compilation-cache hit
on one host is a miss on another) and wherever one process works alone (process 0 writes the
evaluation's media). So the training loop compiles every step function first and then `meet`s, and
meets again after each evaluation; a barrier of the coordination service waits `barrier_timeout_s`.
On TPU and GPU the barrier is a cheap round trip to the coordinator.

The preemption stop uses one counter: the global step. JAX's sync manager takes the counter of the
last call on each process; a notice makes every process stop at (largest counter) + 1, and
`reached(step)` is True only on an exact match. Two callers with different counters (the steps a
process has run and orbax's own calls with the global step, as before) make the stop unreachable
after a resume; so the training loop is the only caller (`checkpoints.TrainCheckpointer`'s manager
makes none) and it primes the counter with the step it resumes from before the restore starts, so a
notice during the restore stops at the first step after it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Optional

from spectron_jax import cli


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How the processes of a multi-host job find each other (env SPECTRON_COORDINATOR_ADDRESS,
    SPECTRON_NUM_PROCESSES, SPECTRON_PROCESS_ID fill fields left None).

    Attributes:
      coordinator_address: 'host:port' of process 0.
      num_processes: processes in the job; > 1 calls `jax.distributed.initialize`.
      process_id: this process's index.
      auto: call `jax.distributed.initialize()` without process arguments (Cloud TPU pods detect them).
      initialization_timeout_s: how long `jax.distributed.initialize` waits for every process to
        connect (JAX's default, 300).
      heartbeat_timeout_s: a process silent for this long is declared dead and the job ends (JAX's
        default, 100). A worker killed with -9 ends the others after this long at the latest.
      barrier_timeout_s: how long a process waits at a meeting point (`meet`) for the others: after
        start-up (the slowest restore + compilation of the job) and after each evaluation (process 0's
        media). DEFAULT 1800: generous, since a timeout ends the job.
    """

    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    auto: bool = False
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100
    barrier_timeout_s: float = 1800.0

    def __post_init__(self):
        for name in ("initialization_timeout_s", "heartbeat_timeout_s", "barrier_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DistributedConfig.{name} must be > 0, got {getattr(self, name)}")

    def resolved(self) -> "DistributedConfig":
        env = os.environ

        def pick(value, name, cast):
            return value if value is not None else (cast(env[name]) if env.get(name) else None)

        return dataclasses.replace(self, coordinator_address=pick(self.coordinator_address,
                                                                  "SPECTRON_COORDINATOR_ADDRESS", str),
                                   num_processes=pick(self.num_processes, "SPECTRON_NUM_PROCESSES", int),
                                   process_id=pick(self.process_id, "SPECTRON_PROCESS_ID", int))


def initialize(config: DistributedConfig) -> None:
    """`jax.distributed.initialize` when the job has more than one process (or `auto`); else nothing."""
    import jax

    config = config.resolved()
    timeouts = dict(initialization_timeout=int(config.initialization_timeout_s),
                    heartbeat_timeout_seconds=int(config.heartbeat_timeout_s))
    if config.auto:
        jax.distributed.initialize(**timeouts)
    elif (config.num_processes or 1) > 1:
        if config.coordinator_address is None or config.process_id is None:
            raise cli.UsageError("DistributedConfig: num_processes > 1 needs coordinator_address and process_id "
                                 "(or SPECTRON_COORDINATOR_ADDRESS / SPECTRON_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes, process_id=config.process_id, **timeouts)


def _client():
    """The coordination service's client of this process, or None in a single-process job."""
    import jax
    from jax._src import distributed

    return distributed.global_state.client if jax.process_count() > 1 else None


_MEETINGS: dict[str, int] = {}


def meet(name: str, timeout_s: float) -> None:
    """Waits until every process of the job has called `meet(name, ...)` as often as this one (a no-op
    for one process). Every process must call it at the same points, like a collective; it is not one
    (no device takes part), so it may come before any collective has opened its context."""
    client = _client()
    if client is None:
        return
    count = _MEETINGS.get(name, 0) + 1
    _MEETINGS[name] = count
    client.wait_at_barrier(f"spectron_jax/{name}/{count}", int(timeout_s * 1000))


class PreemptionStop:
    """SIGTERM (preemption) -> a step boundary at which every process saves and exits.

    Multi-process jobs use JAX's preemption notifier (it catches SIGTERM from
    `jax.distributed.initialize` on) and `multihost_utils.reached_preemption_sync_point`, with the
    global step as the one counter (see the module docstring); no Python handler is installed then,
    since it would replace the notifier's. A single process installs a Python handler on construction
    (call it before the restore, so a signal during the restore is not lost).

    Use: `prime(resume_step)` once before restoring (0 for a fresh run), then `reached(step)` after
    every step with the global step, on every process.
    """

    def __init__(self):
        self.distributed = _client() is not None
        self.requested = False
        self._previous = None if self.distributed else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def prime(self, step: int) -> None:
        """Reports `step` (the step the run continues from) as this process's counter: a notice before
        the first training step then stops at `step + 1`."""
        if self.distributed:
            from jax.experimental import multihost_utils
            multihost_utils.reached_preemption_sync_point(int(step))

    def reached(self, step: int) -> bool:
        """True at the step where every process saves and exits (all processes call it after every
        step with the global step just completed)."""
        if not self.distributed:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))

    def restore(self) -> None:
        """Puts the previous SIGTERM handler back (single process)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
