"""A run's growing logs (the `metrics.jsonl` records, TensorBoard event files) on any file system.

An object store cannot append to an object: rewriting a growing log at every logging step would upload
O(steps^2) bytes, and doing it in the training loop would make every host wait on process 0's network.
So, on an object store (`gs://` MODEL_DIR), logs are written in rolling pieces, each uploaded exactly
once, from a background thread:

  * records: `JsonlLog` keeps the records of the open piece in memory and closes it (a roll) at a
    `flush` once it holds `roll_bytes` or is `roll_seconds` old, and at `close`. A closed piece is
    uploaded as MODEL_DIR/metrics-00000.jsonl, metrics-00001.jsonl, ... numbered after the pieces already
    there (a resumed run continues the numbering). A local MODEL_DIR keeps one `metrics.jsonl`, appended
    record by record.
  * TensorBoard events: `metrics.MetricsWriter` writes a local event file and, at a roll, closes it,
    hands it to an `Uploader` and starts a new one (TensorBoard reads every event file of a folder).
  * `Uploader`: one daemon thread running upload jobs in submission order. The training loop only
    enqueues; `flush` raises the first upload error not yet reported (it is also printed to stderr when it
    happens), `close` waits for every queued upload, then raises likewise. A process that exits without
    `close` still drains the queue at interpreter exit.

What a hard kill (SIGKILL, a crash of the machine) loses on an object store: the open pieces, i.e. up to
`roll_seconds` of records and events. SIGTERM (preemption) closes the logs normally, losing nothing.

`read_records(model_dir)` returns every record of a run in the order written, from `metrics.jsonl` and
then the pieces; everything that reads a run's records goes through it.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import sys
import threading
import time
from concurrent import futures
from typing import Any, Callable, Optional

from spectron_jax import filesystem

METRICS_JSONL = "metrics.jsonl"  # the local log (and a log written before pieces existed)
_PIECE = re.compile(r"^metrics-(\d+)\.jsonl$")

# Defaults of both logs on object stores: a piece is closed once it holds this many bytes or is this
# old (checked at each flush). A long run makes about one piece per log every DEFAULT_ROLL_SECONDS.
DEFAULT_ROLL_BYTES = 8 << 20
DEFAULT_ROLL_SECONDS = 300.0


def piece_name(index: int) -> str:
    """The object name of records piece `index` (0, 1, ...): 'metrics-00000.jsonl'."""
    return f"metrics-{int(index):05d}.jsonl"


def log_files(model_dir: filesystem.PathLike) -> list[str]:
    """The files holding a run's records, in the order they were written: `metrics.jsonl` (when it
    exists), then the pieces `metrics-N.jsonl` by N."""
    names = filesystem.listdir(model_dir)
    pieces = sorted((int(m.group(1)), name) for name in names if (m := _PIECE.match(name)))
    ordered = ([METRICS_JSONL] if METRICS_JSONL in names else []) + [name for _, name in pieces]
    return [filesystem.join(model_dir, name) for name in ordered]


def parse_records(text: str) -> list[dict]:
    """The JSON-object lines of `text`; other lines (one cut short by a killed writer) are skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_records(model_dir: filesystem.PathLike, split: Optional[str] = None) -> list[dict]:
    """Every record of the run in `model_dir`, in the order written ([] when there is none).

    Args:
      model_dir: the run's folder (local or an object store URL).
      split: keep only records whose 'split' is this ('train', 'validation'); None keeps all.

    A step logged twice (a run resumed from a checkpoint older than its last records) appears twice, the
    later record last.
    """
    files = log_files(model_dir)
    if len(files) > 1 and filesystem.is_remote(model_dir):
        with futures.ThreadPoolExecutor(min(16, len(files))) as pool:
            texts = list(pool.map(filesystem.read_text, files))
    else:
        texts = [filesystem.read_text(f) for f in files]
    records = [record for text in texts for record in parse_records(text)]
    return records if split is None else [r for r in records if r.get("split") == split]


class UploadError(RuntimeError):
    """A background upload failed (raised at the log's next flush or close)."""


class Uploader:
    """Runs upload jobs one after the other on a background thread (started at the first job).

    Args:
      name: what the uploads are for, in error messages and the thread's name.
    """

    def __init__(self, name: str):
        self.name = name
        self._jobs: "queue.Queue[Optional[tuple[str, Callable[[], Any]]]]" = queue.Queue()
        self._errors: list[UploadError] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.uploaded = 0  # jobs finished without error

    def submit(self, what: str, job: Callable[[], Any]) -> None:
        """Queues `job` (a function doing one upload; `what` names it in an error) and returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"upload {self.name}", daemon=True)
            self._thread.start()
            atexit.register(self._drain_at_exit)
        self._jobs.put((what, job))

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            try:
                if item is None:
                    return
                what, job = item
                try:
                    job()
                    self.uploaded += 1
                except Exception as e:  # kept for the next check(), and said now
                    error = UploadError(f"{self.name}: writing {what} failed: {type(e).__name__}: {e}")
                    error.__cause__ = e
                    print(f"ERROR {error}", file=sys.stderr, flush=True)
                    with self._lock:
                        self._errors.append(error)
            finally:
                self._jobs.task_done()

    def check(self) -> None:
        """Raises the first upload error not raised before (UploadError; later ones are dropped,
        they were printed)."""
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def drain(self) -> None:
        """Waits until every queued upload has run."""
        if self._thread is not None:
            self._jobs.join()

    def close(self) -> None:
        """Waits for every queued upload, stops the thread, then raises a pending error."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
            atexit.unregister(self._drain_at_exit)
        self.check()

    def _drain_at_exit(self) -> None:
        try:
            self.close()
        except UploadError:
            pass  # printed when it happened


class JsonlLog:
    """One JSON line per record (process 0 writes, others pass `enabled=False`).

    A local `model_dir` gets MODEL_DIR/metrics.jsonl, appended at every `write` (a line cut short by a
    killed writer is ended first). An object store gets rolling pieces MODEL_DIR/metrics-N.jsonl, each
    uploaded once from a background thread (see the module docstring); nothing here waits on the network.

    Args:
      model_dir: the run's folder.
      enabled: False makes every call a no-op.
      roll_bytes: an object-store piece is closed by the `write` that makes it hold this many bytes ...
      roll_seconds: ... or by the first `flush` this many seconds after its first record (None: size only).
      clock: monotonic seconds (for tests).
    """

    def __init__(self, model_dir: filesystem.PathLike, enabled: bool = True, *, roll_bytes: int = DEFAULT_ROLL_BYTES,
                 roll_seconds: Optional[float] = DEFAULT_ROLL_SECONDS, clock: Callable[[], float] = time.monotonic):
        if roll_bytes <= 0 or (roll_seconds is not None and roll_seconds <= 0):
            raise ValueError(f"JsonlLog: roll_bytes and roll_seconds must be positive, got {roll_bytes}, {roll_seconds}")
        self.model_dir = os.fspath(model_dir)
        self.enabled = bool(enabled)
        self.remote = filesystem.is_remote(self.model_dir)
        self.roll_bytes, self.roll_seconds, self._clock = int(roll_bytes), roll_seconds, clock
        self._lines: list[str] = []  # the open piece (object store)
        self._bytes = 0
        self._opened = 0.0
        self._next_index: Optional[int] = None  # owned by the upload thread
        self.uploader = Uploader(f"records under {self.model_dir}")
        if self.enabled and self.remote:
            atexit.register(self._close_at_exit)  # uploads the open piece when `close` was never reached

    @property
    def path(self) -> str:
        """The local log file (object stores: the folder of the pieces)."""
        return self.model_dir if self.remote else filesystem.join(self.model_dir, METRICS_JSONL)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        if not self.remote:
            filesystem.append_lines(self.path, [line])
            return
        if not self._lines:
            self._opened = self._clock()
        self._lines.append(line)
        self._bytes += len(line.encode("utf-8"))
        if self._bytes >= self.roll_bytes:
            self.roll()

    def flush(self) -> None:
        """Closes the open piece when it is due; raises an earlier background upload's error."""
        if not self.enabled:
            return
        if self._lines and self.roll_seconds is not None and self._clock() - self._opened >= self.roll_seconds:
            self.roll()
        self.uploader.check()

    def roll(self) -> None:
        """Closes the open piece now (if it holds records) and queues its upload."""
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8")
        self._lines, self._bytes = [], 0
        self.uploader.submit(f"a records piece ({len(data)} bytes)", lambda: self._upload(data))

    def _upload(self, data: bytes) -> None:
        if self._next_index is None:
            taken = [int(m.group(1)) for name in filesystem.listdir(self.model_dir) if (m := _PIECE.match(name))]
            self._next_index = max(taken, default=-1) + 1
        filesystem.write_bytes(filesystem.join(self.model_dir, piece_name(self._next_index)), data)
        self._next_index += 1

    def close(self) -> None:
        """Uploads the open piece, waits for every upload and raises a background error."""
        if not self.enabled:
            return
        self.roll()
        self.enabled = False
        atexit.unregister(self._close_at_exit)
        self.uploader.close()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except UploadError:
            pass  # printed when it happened

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["DEFAULT_ROLL_BYTES", "DEFAULT_ROLL_SECONDS", "JsonlLog", "METRICS_JSONL", "UploadError", "Uploader",
           "log_files", "parse_records", "piece_name", "read_records"]
