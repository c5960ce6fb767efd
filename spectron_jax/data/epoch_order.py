"""The record order of one host's epoch, computed from the shards' record counts, and a reader that can
start anywhere in it after reading a bounded number of records.

An epoch of host h over shard files F (with record counts n_f) is, in index arithmetic only:

  1. Files. With at least as many files as hosts the host takes files h, h + H, h + 2H, ... (the
     assignment of `seqio.ShardInfo`); otherwise it takes all of them and keeps every H-th record of
     step 2's stream, starting at record h ("record mode"). The files are permuted with a generator
     seeded by (seed, epoch) when shuffling.
  2. Interleave. The permuted files are cut into consecutive groups of `cycle_length`; a group's
     records are taken round-robin, one per file per round (a file that runs out leaves the round),
     and the groups follow each other. This is stream G; in record mode the host's stream keeps
     G[h], G[h + H], ...
  3. Windows. The host's stream is cut into windows of `window` consecutive records, and each window
     is permuted with a generator seeded by (seed, epoch, window index) when shuffling.

`position` p is the index in the resulting stream. Resuming at p opens the files of the group holding
window p // window at the per-file offsets the round-robin arithmetic gives (reaching an offset reads
only the 12-byte length headers of the records before it), reads the records of that window still to
come, and continues from there: at most `window` record payloads (times H in record mode, where the
other hosts' records are skipped by header) are read before the first record after p, whatever p is.

Shuffle quality: a batch draws from one window, which holds about window / cycle_length consecutive
records of each of cycle_length files picked at random for this epoch, permuted uniformly; windows
never exchange records, and each epoch re-draws the file order and every window's permutation.

Reading is done here, in Python, from the file-system layer (`spectron_jax.filesystem`), for local and
`gs://` shards alike: uncompressed TFRecord framing (uint64 length, uint32 crc, data, uint32 crc;
CRCs are not checked). Record counts come from `prepare`'s report.json next to the shards when it lists
a file with its current size, else from one scan of the file's headers (cached per process).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Iterator, Sequence

import numpy as np

from spectron_jax import filesystem

REPORT_FILENAME = "report.json"
_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the data
_COUNT_CACHE: dict[tuple[str, int], int] = {}
_COUNT_LOCK = threading.Lock()


class ReadCounts:
    """Running totals of what the readers did: payloads read, payloads passed by header, files opened."""

    def __init__(self):
        self.records_read = 0
        self.records_skipped = 0
        self.files_opened = 0

    def as_dict(self) -> dict[str, int]:
        return {"records_read": self.records_read, "records_skipped": self.records_skipped,
                "files_opened": self.files_opened}


# ---- Record counts -------------------------------------------------------------------------------
def _report_counts(folder: str) -> dict[str, tuple[int, int]]:
    """{file name: (records, bytes)} of every shard report.json in `folder` lists ({} without one)."""
    path = filesystem.join(folder, REPORT_FILENAME)
    if not filesystem.exists(path):
        return {}
    try:
        report = json.loads(filesystem.read_text(path))
        return {os.path.basename(shard["file"]): (int(shard["examples"]), int(shard["bytes"]))
                for entry in report.get("splits", {}).values() for shard in entry.get("shards", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # an unreadable report only costs a scan


def scan_count(path: str) -> int:
    """Records in TFRecord file `path`, from its length headers alone; ValueError when it is truncated."""
    total, count = filesystem.size(path), 0
    with filesystem.path(path).open("rb") as f:
        position = 0
        while position < total:
            header = f.read(_HEADER)
            if len(header) < _HEADER:
                raise ValueError(f"{path}: truncated record header")
            position += _HEADER + struct.unpack("<Q", header[:8])[0] + _FOOTER
            if position > total:
                raise ValueError(f"{path}: truncated record")
            f.seek(position)
            count += 1
    return count


def record_counts(files: Sequence[str]) -> list[int]:
    """Records per file: from report.json where it lists the file with its current size, else a scan."""
    reports: dict[str, dict] = {}
    counts = []
    for path in files:
        folder = os.path.dirname(path) if not filesystem.is_remote(path) else path.rpartition("/")[0]
        if folder not in reports:
            reports[folder] = _report_counts(folder or ".")
        size = filesystem.size(path)
        listed = reports[folder].get(os.path.basename(path))
        if listed is not None and listed[1] == size:
            counts.append(listed[0])
            continue
        with _COUNT_LOCK:
            cached = _COUNT_CACHE.get((path, size))
        if cached is None:
            cached = scan_count(path)
            with _COUNT_LOCK:
                _COUNT_CACHE[(path, size)] = cached
        counts.append(cached)
    return counts


# ---- Index arithmetic ----------------------------------------------------------------------------
def round_robin(counts: Sequence[int], start: int = 0) -> Iterator[tuple[int, int]]:
    """(slot, record index) of a round-robin interleave of files with `counts` records, from its
    `start`-th element on; computed without walking the first `start` elements."""
    n = np.asarray(counts, np.int64)
    if n.size == 0 or start >= int(n.sum()):
        return
    low, high = 0, int(n.max())  # the largest r with sum(min(n, r)) <= start: complete rounds
    while low < high:
        mid = (low + high + 1) // 2
        if int(np.minimum(n, mid).sum()) <= start:
            low = mid
        else:
            high = mid - 1
    r = low
    rest = start - int(np.minimum(n, r).sum())
    active = np.flatnonzero(n > r)
    for slot in active[rest:]:
        yield int(slot), r
    r += 1
    while True:
        active = np.flatnonzero(n > r)
        if active.size == 0:
            return
        for slot in active:
            yield int(slot), r
        r += 1


def host_lengths(counts: Sequence[int], num_shards: int) -> list[int]:
    """Records in one epoch of each of `num_shards` hosts over files with `counts` records
    (`EpochOrder.length` of every host, without building them)."""
    counts = [int(c) for c in counts]
    if len(counts) >= num_shards:
        return [sum(counts[h::num_shards]) for h in range(num_shards)]
    total = sum(counts)
    return [len(range(h, total, num_shards)) for h in range(num_shards)]


def replayed_records(counts: Sequence[int], num_shards: int, epochs: Sequence[int], positions: Sequence[int],
                     shard_indices: Sequence[int] | None = None) -> int:
    """Records seen again when a run restarts at position 0 of the oldest saved epoch (how a new
    process count resumes): every record its `num_shards` data shards consumed from that epoch's start on.

    Args:
      counts: records per shard file.
      num_shards: the saved run's data shard count.
      epochs, positions: the saved (epoch, position) of every process.
      shard_indices: each process's data shard (None: process i read shard i); processes sharing a
        shard read the same stream and count once.
    """
    lengths = host_lengths(counts, num_shards)
    indices = range(len(epochs)) if shard_indices is None else shard_indices
    streams = {}
    for index, epoch, position in zip(indices, epochs, positions):
        streams.setdefault(int(index), (int(epoch), int(position)))
    oldest = min(epoch for epoch, _ in streams.values())
    return sum((epoch - oldest) * lengths[index] + position for index, (epoch, position) in streams.items())


class EpochOrder:
    """One host's record order of every epoch (see the module docstring); all methods are pure index
    arithmetic except `records`, which reads."""

    def __init__(self, files: Sequence[str], counts: Sequence[int], shard_index: int, num_shards: int,
                 seed: int, shuffle: bool, window: int, cycle_length: int):
        if window < 1 or cycle_length < 1:
            raise ValueError(f"the shuffle window ({window}) and cycle_length ({cycle_length}) must be >= 1")
        self.by_file = len(files) >= num_shards
        keep = slice(shard_index, None, num_shards) if self.by_file else slice(None)
        self.files = list(files)[keep]
        self.counts = np.asarray(list(counts)[keep], np.int64)
        self.shard_index, self.num_shards = shard_index, num_shards
        self.seed, self.shuffle = seed, shuffle
        self.window, self.cycle_length = window, cycle_length
        total = int(self.counts.sum())
        self.length = total if self.by_file else len(range(shard_index, total, num_shards))
        self.read_counts = ReadCounts()

    def file_order(self, epoch: int) -> np.ndarray:
        """Indices into `files` in the order epoch `epoch` reads them."""
        if not self.shuffle:
            return np.arange(len(self.files))
        return np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.files))

    def window_permutation(self, epoch: int, index: int, size: int) -> np.ndarray:
        """The order of the `size` records of window `index` (identity without shuffling)."""
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, 1, index]).permutation(size)

    def stream(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """(file index, record index) of stream G (all kept files, before host sharding by record)
        from its `start`-th element on."""
        order = self.file_order(epoch)
        groups = [order[i : i + self.cycle_length] for i in range(0, len(order), self.cycle_length)]
        ends = np.cumsum([int(self.counts[g].sum()) for g in groups]) if groups else np.zeros(0, np.int64)
        first = int(np.searchsorted(ends, start, side="right"))
        for k in range(first, len(groups)):
            offset = start - (int(ends[k - 1]) if k else 0) if k == first else 0
            for slot, record in round_robin(self.counts[groups[k]], offset):
                yield int(groups[k][slot]), record

    def host_stream(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int, bool]]:
        """(file, record, kept) of G from host record `start` on; kept is False for other hosts'
        records (record mode), which come between this host's."""
        if self.by_file:
            for file, record in self.stream(epoch, start):
                yield file, record, True
            return
        g = start * self.num_shards + self.shard_index
        for i, (file, record) in enumerate(self.stream(epoch, g)):
            yield file, record, i % self.num_shards == 0

    def records(self, epoch: int, start: int = 0) -> Iterator[tuple[bytes, int]]:
        """(serialized record, position) of epoch `epoch` from `position` start on."""
        if start >= self.length:
            return
        pool = _ReaderPool(self.files, self.counts, self.read_counts)
        source = self.host_stream(epoch, (start // self.window) * self.window)
        try:
            for w in range(start // self.window, -(-self.length // self.window)):
                low = w * self.window
                size = min(self.window, self.length - low)
                perm = self.window_permutation(epoch, w, size)
                skip = start - low if low < start else 0
                wanted = np.zeros(size, bool)
                wanted[perm[skip:]] = True
                payloads: dict[int, bytes] = {}
                j = 0
                while j < size:
                    file, record, kept = next(source)
                    data = pool.take(file, record, read=kept and bool(wanted[j]))
                    if kept:
                        if data is not None:
                            payloads[j] = data
                        j += 1
                for k, local in enumerate(perm[skip:]):
                    yield payloads.pop(int(local)), low + skip + k
        finally:
            pool.close()


# ---- Reading -------------------------------------------------------------------------------------
class _Reader:
    """Sequential reader of one TFRecord file from record `start` on (earlier records passed by header)."""

    def __init__(self, path: str, start: int, count: int, counts: ReadCounts):
        self.path, self.count, self.counts = path, count, counts
        self.file = filesystem.path(path).open("rb")
        counts.files_opened += 1
        self.next_index = 0
        while self.next_index < start:
            self._pass()

    def _length(self) -> int:
        header = self.file.read(_HEADER)
        if len(header) < _HEADER:
            raise ValueError(f"{self.path}: ends after {self.next_index} records, but its listing gives {self.count} "
                             f"(a stale report.json or a truncated shard)")
        return struct.unpack("<Q", header[:8])[0]

    def _pass(self) -> None:
        self.file.seek(self._length() + _FOOTER, 1)
        self.next_index += 1
        self.counts.records_skipped += 1

    def take(self, read: bool) -> bytes | None:
        if read:
            length = self._length()
            data = self.file.read(length)
            if len(data) < length or len(self.file.read(_FOOTER)) < _FOOTER:
                raise ValueError(f"{self.path}: truncated record {self.next_index}")
            self.next_index += 1
            self.counts.records_read += 1
        else:
            self._pass()
            data = None
        if self.done and self.file.read(1):
            raise ValueError(f"{self.path}: holds more records than the {self.count} its listing gives "
                             f"(a stale report.json)")
        return data

    @property
    def done(self) -> bool:
        return self.next_index >= self.count

    def close(self) -> None:
        self.file.close()


class _ReaderPool:
    """Open readers of the files an interleave group is reading (each opened at its first record asked)."""

    def __init__(self, files: Sequence[str], counts: np.ndarray, read_counts: ReadCounts):
        self.files, self.counts, self.read_counts = files, counts, read_counts
        self.open: dict[int, _Reader] = {}

    def take(self, file: int, record: int, read: bool) -> bytes | None:
        reader = self.open.get(file)
        if reader is None:
            reader = self.open[file] = _Reader(self.files[file], record, int(self.counts[file]), self.read_counts)
        if reader.next_index != record:  # the index arithmetic always asks in order
            raise RuntimeError(f"{self.files[file]}: record {record} asked after {reader.next_index - 1}")
        data = reader.take(read)
        if reader.done:
            reader.close()
            del self.open[file]
        return data

    def close(self) -> None:
        for reader in self.open.values():
            reader.close()
        self.open.clear()
