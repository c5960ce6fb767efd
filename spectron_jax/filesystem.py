"""The one file-system layer: every path the project reads or writes (local or `gs://`).

Backend. `etils.epath.Path` over fsspec (`gcsfs` for `gs://`), never TensorFlow's GCS file system:

  * epath picks TensorFlow's `tf.io.gfile` for `gs://` whenever TensorFlow is installed, unless
    `EPATH_USE_TF=false`. This module sets that default before any path is opened, so epath (and orbax,
    which writes its metadata through epath) always goes through gcsfs. Importing this module is
    what fixes the choice; every module that touches a run's files imports it.
  * TensorFlow's GCS file system has a hard-coded endpoint and ignores `STORAGE_EMULATOR_HOST`, so a
    local emulator cannot stand in for it; gcsfs honours `STORAGE_EMULATOR_HOST` and tensorstore (the
    array writer under orbax) honours `TENSORSTORE_GCS_HTTP_URL`. With this choice production and the
    emulator test run the same code.
  * Training data on `gs://` is read through this layer too (`tfrecord_dataset`: TFRecord framing
    parsed in Python from an epath stream), not through `tf.data.TFRecordDataset`, for the same reason;
    local shards keep TensorFlow's native reader.

Object stores cannot append or rename atomically: `write_text` / `write_bytes` write a temporary
sibling then rename (atomic on local disks, a copy + delete on GCS, where a single-object write is
itself atomic), and `append_lines` rewrites the whole file on an object store (O(size) bytes per call:
a log that grows with a run goes through `spectron_jax.metric_logs`, which uploads pieces instead).
"""

from __future__ import annotations

import os
import struct
import tempfile
import uuid
from typing import Iterable, Iterator, Union

os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

PathLike = Union[str, os.PathLike]


def path(p: PathLike) -> epath.Path:
    """`p` as an `epath.Path` (local, or `gs://bucket/...`)."""
    return epath.Path(p)


def is_remote(p: PathLike) -> bool:
    """True for an object-store URL (`gs://`, `s3://`, ...)."""
    return "://" in os.fspath(p)


def join(p: PathLike, *parts: str) -> str:
    """`p / parts...` as a string (keeps `gs://` intact, unlike `os.path.join` of an absolute part)."""
    return os.fspath(path(p).joinpath(*parts))


def absolute(p: PathLike) -> str:
    """A local path made absolute; a URL unchanged."""
    return os.fspath(p) if is_remote(p) else os.path.abspath(os.fspath(p))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def is_dir(p: PathLike) -> bool:
    return path(p).is_dir()


def is_file(p: PathLike) -> bool:
    q = path(p)
    return q.exists() and not q.is_dir()


def makedirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
    """Names of the entries of folder `p` (sorted; [] when it does not exist)."""
    q = path(p)
    if not q.is_dir():
        return []
    return sorted(child.name for child in q.iterdir())


def glob(pattern: PathLike) -> list[str]:
    """Paths matching `pattern` (glob syntax in the last components), sorted."""
    pattern = os.fspath(pattern)
    folder, _, name = pattern.rpartition("/")
    if not folder:
        folder, name = ".", pattern
    root = path(folder)
    if not root.is_dir():
        return []
    return sorted(os.fspath(p) for p in root.glob(name))


def read_text(p: PathLike) -> str:
    return path(p).read_text(encoding="utf-8")


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes `data` to `p` atomically (a reader sees the old file or the new one, never a part)."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(p):  # a single-object upload is atomic on GCS
        target.write_bytes(data)
        return
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(os.fspath(tmp), os.fspath(target))
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def append_lines(p: PathLike, lines: Iterable[str]) -> None:
    """Appends text lines to `p` (local: a real append; object store: the file is rewritten).

    A torn last line (a killed writer) is ended with a newline first.
    """
    lines = [line if line.endswith("\n") else line + "\n" for line in lines]
    if not lines:
        return
    target = path(p)
    if is_remote(p):
        old = target.read_text(encoding="utf-8") if target.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        write_text(p, old + "".join(lines))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    torn = target.exists() and target.stat().length > 0 and not _ends_with_newline(target)
    with open(os.fspath(target), "a", encoding="utf-8") as f:
        if torn:
            f.write("\n")
        f.writelines(lines)


def _ends_with_newline(target: epath.Path) -> bool:
    with open(os.fspath(target), "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def size(p: PathLike) -> int:
    """Bytes in file `p`."""
    return int(path(p).stat().length)


def copy(source: PathLike, destination: PathLike, chunk_bytes: int = 16 << 20) -> None:
    """Copies one file (any combination of local and remote), streaming `chunk_bytes` at a time, so
    that `destination` appears whole or not at all: a local destination is written under a temporary
    name, then renamed; a remote one is a single upload, finished only when everything was sent and
    cancelled on any error (an object store shows an object when its upload completes, and fsspec's
    files would otherwise complete a half-sent upload when closed by the error)."""
    target = path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target if is_remote(destination) else target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        with path(source).open("rb") as src:
            dst = partial.open("wb")
            try:
                while chunk := src.read(chunk_bytes):
                    dst.write(chunk)
            except BaseException:
                if partial is target and callable(getattr(dst, "discard", None)):
                    dst.discard()  # fsspec: cancel the upload...
                    dst.closed = True  # ...and never finish it, not even when garbage-collected
                else:
                    dst.close()
                raise
            dst.close()
        if partial != target:
            os.replace(os.fspath(partial), os.fspath(target))
    finally:
        if partial != target and partial.exists():
            partial.unlink()


def remove_tree(p: PathLike) -> None:
    q = path(p)
    if q.exists():
        q.rmtree() if q.is_dir() else q.unlink()


def local_copy(p: PathLike) -> str:
    """A local file with `p`'s bytes: `p` itself when local, else a download into a temporary folder
    (for libraries that read only local paths, e.g. SentencePiece). The copy lives until exit."""
    if not is_remote(p):
        return os.fspath(p)
    folder = tempfile.mkdtemp(prefix="spectron-fs-")
    local = os.path.join(folder, path(p).name)
    with open(local, "wb") as f:
        f.write(read_bytes(p))
    return local


# ---- TFRecord files through this layer -----------------------------------------------------------
def iterate_tfrecords(p: PathLike) -> Iterator[bytes]:
    """The records of TFRecord file `p` (uint64 length, uint32 crc, data, uint32 crc each; CRCs are
    not checked). ValueError on a truncated file."""
    with path(p).open("rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise ValueError(f"{p}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                raise ValueError(f"{p}: truncated record")
            yield data


def tfrecord_reader(data_dir: PathLike):
    """seqio's `reader_cls` for shards under `data_dir`: a function (scalar tf.string file name ->
    `tf.data.Dataset` of serialized records).

    Local folders get `tf.data.TFRecordDataset`; object-store folders a reader over
    `iterate_tfrecords` (see the module docstring for why), usable inside seqio's interleave.
    """
    import tensorflow as tf

    if not is_remote(data_dir):
        return tf.data.TFRecordDataset

    def generate(name):
        yield from iterate_tfrecords(name.decode("utf-8") if isinstance(name, bytes) else str(name))

    def read(filename):
        return tf.data.Dataset.from_generator(generate, args=(filename,),
                                              output_signature=tf.TensorSpec([], tf.string))

    return read
