"""Readers of speech corpora for `prepare`: they list audio files and the utterances cut from them.

Every reader returns a `Listing`: the `SourceFile`s to featurise (an audio file, its split, and the
`Segment`s to cut from it) plus the `Skip`s found while listing (empty transcript, duplicate id,
malformed manifest line, ...). Readers only look at names and text; decoding audio, and the skips that
need it (missing, corrupt, empty or NaN audio), happen in `prepare`'s workers.

Formats:

- `librispeech`: `[<split folder>/]<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`, each line
  `<id> <TRANSCRIPT>`, next to `<id>.flac`. The split is the folder above the speaker folders
  (`train-*` -> train, `dev-*` -> validation, `test-*` -> test), or `split=` when given.
- `librilight`: `<speaker>/<book>/<name>.flac` with `<name>.json` holding the voice-activity
  intervals `{"voice_activity": [[start_s, end_s], ...]}`; see `read_librilight` for the segmentation
  and the transcript manifest.
- `manifest`: a TSV (header row) or JSONL file with `path` (or `audio`), `transcript` (or `text`) and
  optionally `id`, `speaker`, `split`, `start`, `end` (seconds) and `word_starts` (word timings: the
  start of each transcript word, whitespace-separated, in seconds from the utterance's start, e.g. from a
  forced alignment; the Tasks put phi, the prompt's end in the text, at the nearest one); paths are
  relative to the manifest's folder. The default id is the file name without its extension (plus `-<start ms>-<end ms>` when the
  row cuts a segment); the default split is `split=` or `train`.
- `embedded`: the project's corpus, `manifest.tsv` with columns
  `id path transcript speaker passage split duration`.

Inputs may be local or on an object store (`gs://...`, through `spectron_jax.filesystem`): a
LibriSpeech or Libri-Light tree, a manifest, and the audio paths a manifest names (relative to its
folder, absolute, or URLs).

Text is UTF-8, read line by line: a line that is not valid UTF-8 (a `.trans.txt` line, a manifest
row) is skipped on its own with reason `bad_encoding` and its id where the id itself decodes; the
other lines of the file are used.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import posixpath
import re
from typing import Iterable, Iterator

from spectron_jax import filesystem

LIBRISPEECH_SPLITS = (("train", "train"), ("dev", "validation"), ("test", "test"))
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
PATH_COLUMNS = ("path", "audio", "audio_path")
TEXT_COLUMNS = ("transcript", "text")
EMBEDDED_COLUMNS = ("id", "path", "transcript", "speaker", "passage", "split", "duration")


class SourceError(ValueError):
    """The input as a whole cannot be read (wrong layout, missing or empty manifest)."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """One utterance: a span of a source file and its text."""

    id: str
    transcript: str
    speaker: str
    start: float = 0.0  # seconds into the file
    end: float | None = None  # seconds into the file; None = to the end
    # start of each word of `transcript` (split at whitespace), seconds from `start`; None = not known
    word_starts: tuple[float, ...] | None = None


def parse_word_starts(value: str | None, transcript: str) -> tuple[float, ...] | None:
    """The `word_starts` column: whitespace-separated seconds, one per transcript word, non-decreasing
    and >= 0; None for an empty value. ValueError (naming the column) otherwise."""
    if value is None or not value.strip():
        return None
    try:
        starts = tuple(float(v) for v in value.split())
    except ValueError:
        raise ValueError(f"word_starts {value[:40]!r} is not a list of seconds") from None
    words = len(transcript.split())
    if len(starts) != words:
        raise ValueError(f"word_starts has {len(starts)} times for {words} words")
    if any(not math.isfinite(t) or t < 0 for t in starts) or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError("word_starts must be finite, >= 0 and non-decreasing")
    return starts


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """An audio file and the utterances cut from it (one, spanning the file, for most formats)."""

    path: str  # where to read it
    source: str  # how reports name it (relative to the input where possible)
    split: str
    segments: tuple[Segment, ...]


@dataclasses.dataclass(frozen=True)
class Skip:
    """Something left out, and why (`reason` is a short tag, `detail` a human-readable note)."""

    id: str
    source: str
    split: str | None
    reason: str
    detail: str = ""


@dataclasses.dataclass
class Listing:
    sources: list[SourceFile] = dataclasses.field(default_factory=list)
    skips: list[Skip] = dataclasses.field(default_factory=list)


def segment_id(key: str, start: float, end: float | None) -> str:
    """Id of a cut segment: `<key>-<start ms, 8 digits>-<end ms, 8 digits>` (end omitted if open)."""
    tail = f"-{int(round(start * 1000)):08d}"
    if end is not None:
        tail += f"-{int(round(end * 1000)):08d}"
    return f"{key}{tail}"


def librispeech_split(folder: str) -> str | None:
    """Maps a LibriSpeech folder name (train-clean-100, dev-other, ...) to train/validation/test."""
    name = folder.lower()
    for prefix, split in LIBRISPEECH_SPLITS:
        if name.startswith(prefix):
            return split
    return None


def _relative(path: str, root: str) -> str:
    if filesystem.is_remote(path):
        prefix = root.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _join(folder: str, *names: str) -> str:
    return filesystem.join(folder, *names) if filesystem.is_remote(folder) else os.path.join(folder, *names)


def _dirname(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0] if filesystem.is_remote(path) else os.path.dirname(path)


def _resolve(base: str, path: str) -> str:
    """`path` as named in a manifest in folder `base`: a URL or absolute path as is, else under `base`."""
    if filesystem.is_remote(path) or os.path.isabs(path):
        return path
    if filesystem.is_remote(base):
        scheme, _, rest = base.partition("://")
        bucket, _, folder = rest.partition("/")
        return f"{scheme}://{bucket}/" + posixpath.normpath(posixpath.join(folder, path)).lstrip("/")
    return os.path.normpath(os.path.join(base, path))


def _walk_files(root: str, suffix: str = "") -> Iterator[str]:
    """Files under `root` (local or URL) whose name ends with `suffix`, in sorted order."""
    if filesystem.is_remote(root):
        scheme = root.partition("://")[0]
        found = []
        for folder, _, names in filesystem.path(root).walk():
            folder = os.fspath(folder)  # fsspec's walk may drop the scheme
            folder = folder if "://" in folder else f"{scheme}://{folder.lstrip('/')}"
            found += [f"{folder.rstrip('/')}/{name}" for name in names if name.endswith(suffix)]
        yield from sorted(found)
        return
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(suffix):
                yield os.path.join(folder, name)


def _decoded_lines(data: bytes) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text or None when not UTF-8, problem) for each line of `data` (\n or \r\n ends)."""
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            yield number, raw.decode("utf-8"), ""
        except UnicodeDecodeError as e:
            yield number, None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"


def _readable_field(raw: str, index: int, sep: str | None = None) -> str:
    """Field `index` of a line decoded with surrogateescape, '' when that field is not UTF-8 itself."""
    fields = raw.split(sep)
    if index >= len(fields):
        return ""
    field = fields[index].strip()
    return "" if any("\udc80" <= c <= "\udcff" for c in field) else field


def _raw_line(data: bytes, number: int) -> str:
    return data.split(b"\n")[number - 1].decode("utf-8", errors="surrogateescape")


def is_valid_split(split: str) -> bool:
    """Split names become file names: letters, digits and underscores only."""
    return bool(_SPLIT_NAME.match(split))


def read_librispeech(root: str, split: str | None = None) -> Listing:
    """Lists a LibriSpeech tree (see the module docstring)."""
    if not filesystem.is_dir(root):
        raise SourceError(f"{root}: not a folder (--format=librispeech wants a LibriSpeech tree)")
    listing = Listing()
    files = list(_walk_files(root))
    present = set(files)
    transcripts = [f for f in files if f.endswith(".trans.txt")]
    if not transcripts:
        raise SourceError(f"{root}: no LibriSpeech transcripts (<speaker>/<chapter>/<speaker>-<chapter>.trans.txt)")
    seen: set[str] = set()
    for trans in transcripts:
        chapter_dir = _dirname(trans)
        trans_name = _relative(trans, root)
        rel_parts = _relative(chapter_dir, root).replace(os.sep, "/").split("/")
        if split is not None:
            file_split = split
        else:
            # The folder above <speaker>/<chapter>, or the input folder itself.
            folder = rel_parts[-3] if len(rel_parts) >= 3 else filesystem.path(filesystem.absolute(root)).name
            file_split = librispeech_split(folder)
            if file_split is None:
                raise SourceError(
                    f"{trans}: cannot tell the split from folder '{folder}' (expected train-*, dev-* or test-*); "
                    "pass --split"
                )
        try:
            data = filesystem.read_bytes(trans)
        except OSError as e:
            listing.skips.append(Skip("", trans_name, file_split, "unreadable_transcripts", str(e)))
            continue
        for number, line, problem in _decoded_lines(data):
            if line is None:
                utt_id = _readable_field(_raw_line(data, number), 0)
                listing.skips.append(Skip(utt_id, trans_name, file_split, "bad_encoding", f"line {number}: {problem}"))
                continue
            if not line.strip():
                continue
            fields = line.strip().split(maxsplit=1)
            utt_id = fields[0]
            text = fields[1].strip() if len(fields) > 1 else ""
            audio = _join(chapter_dir, utt_id + ".flac")
            if audio not in present and _join(chapter_dir, utt_id + ".wav") in present:
                audio = _join(chapter_dir, utt_id + ".wav")
            source = _relative(audio, root)
            if not text:
                listing.skips.append(Skip(utt_id, source, file_split, "empty_transcript", f"{trans_name}:{number}"))
                continue
            if utt_id in seen:
                listing.skips.append(Skip(utt_id, source, file_split, "duplicate_id", f"{trans_name}:{number}"))
                continue
            seen.add(utt_id)
            speaker = utt_id.split("-", 1)[0]
            listing.sources.append(SourceFile(audio, source, file_split, (Segment(utt_id, text, speaker),)))
    return listing


def _float_or_none(value) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"bad time {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class Row:
    """One manifest line: its number, its fields (None when unusable), and why it is unusable."""

    number: int
    fields: dict | None
    reason: str = ""  # malformed_line / bad_encoding
    detail: str = ""
    id: str = ""  # the row's id where readable, for a skip


def _read_table(path: str) -> tuple[list[str], Iterator[Row]]:
    """Rows of a TSV (header row) or JSONL manifest (local or URL)."""
    if filesystem.is_dir(path):
        raise SourceError(f"{path}: is a folder, not a manifest file (.tsv or .jsonl)")
    if not filesystem.is_file(path):
        raise SourceError(f"{path}: manifest not found")
    suffix = os.path.splitext(path)[1].lower()
    try:
        data = filesystem.read_bytes(path)
    except OSError as e:
        raise SourceError(f"{path}: cannot read manifest ({e})") from e
    lines = list(_decoded_lines(data))
    if lines and lines[-1][1] == "":
        lines.pop()  # the final newline
    if suffix in (".jsonl", ".json", ".ndjson"):
        return [], _jsonl_rows(lines, data)
    if suffix in (".tsv", ".txt", ".csv") or not suffix:
        body = [(n, line, problem) for n, line, problem in lines if line is None or line.strip()]
        if not body:
            raise SourceError(f"{path}: manifest is empty")
        if body[0][1] is None:
            raise SourceError(f"{path}: header line {body[0][0]} is {body[0][2]}")
        header = [c.strip() for c in body[0][1].split("\t")]
        return header, _tsv_rows(header, body[1:], data)
    raise SourceError(f"{path}: unknown manifest type '{suffix}' (use .tsv or .jsonl)")


def _tsv_rows(header: list[str], body: list[tuple[int, str | None, str]], data: bytes) -> Iterator[Row]:
    for number, line, problem in body:
        if line is None:
            raw = _raw_line(data, number)
            row_id = _readable_field(raw, header.index("id"), "\t") if "id" in header else ""
            yield Row(number, None, "bad_encoding", problem, row_id)
            continue
        # Transcripts may hold quotes: no CSV quoting.
        fields = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(fields) != len(header):
            yield Row(number, None, "malformed_line", f"{len(fields)} fields, header has {len(header)}")
            continue
        yield Row(number, dict(zip(header, fields, strict=True)))


def _jsonl_rows(lines: list[tuple[int, str | None, str]], data: bytes) -> Iterator[Row]:
    for number, line, problem in lines:
        if line is None:
            raw = _raw_line(data, number)
            found = re.search(r'"id"\s*:\s*"([^"]*)"', raw)
            row_id = _readable_field(found.group(1), 0) if found else ""
            yield Row(number, None, "bad_encoding", problem, row_id)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(number, None, "malformed_line", f"invalid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            yield Row(number, None, "malformed_line", "not a JSON object")
            continue
        yield Row(number, {k: "" if v is None else str(v) for k, v in row.items()})


def _pick(row: dict, names: Iterable[str]) -> str | None:
    for name in names:
        if name in row:
            return row[name]
    return None


def read_manifest(path: str, split: str | None = None, columns: tuple[str, ...] = ()) -> Listing:
    """Lists a TSV / JSONL manifest (see the module docstring).

    Args:
      path: the manifest file.
      split: default split of rows without a `split` value (`train` when None); it does not override one.
      columns: columns the TSV header must have (the embedded corpus's contract).
    """
    header, rows = _read_table(path)
    if header:
        missing = [c for c in columns if c not in header]
        if missing or not set(PATH_COLUMNS) & set(header) or not set(TEXT_COLUMNS) & set(header):
            want = ", ".join(columns) if columns else "path (or audio), transcript (or text)"
            raise SourceError(f"{path}: header must name the columns {want}; got {', '.join(header)}")
    base = _dirname(filesystem.absolute(path))
    listing = Listing()
    groups: dict[tuple[str, str], list[Segment]] = {}
    display: dict[str, str] = {}
    seen: set[str] = set()
    any_row = False
    for line in rows:
        any_row = True
        number, row = line.number, line.fields
        where = f"{posixpath.basename(path)}:{number}"
        if row is None:
            listing.skips.append(Skip(line.id, where, None, line.reason, line.detail))
            continue
        audio = _pick(row, PATH_COLUMNS)
        text = _pick(row, TEXT_COLUMNS)
        if not audio or text is None:
            listing.skips.append(Skip(row.get("id", ""), where, None, "malformed_line", "no audio path or transcript"))
            continue
        row_split = (row.get("split") or "").strip() or split or "train"
        full = _resolve(base, audio)
        try:
            start = _float_or_none(row.get("start")) or 0.0
            end = _float_or_none(row.get("end"))
        except ValueError as e:
            listing.skips.append(Skip(row.get("id", ""), audio, row_split, "malformed_line", f"{where}: {e}"))
            continue
        utt_id = (row.get("id") or "").strip()
        if not utt_id:
            stem = os.path.splitext(posixpath.basename(audio.replace(os.sep, "/")))[0]
            utt_id = segment_id(stem, start, end) if (start or end is not None) else stem
        if not is_valid_split(row_split):
            listing.skips.append(Skip(utt_id, audio, None, "bad_split", f"{where}: split '{row_split}'"))
            continue
        if not text.strip():
            listing.skips.append(Skip(utt_id, audio, row_split, "empty_transcript", where))
            continue
        if end is not None and end <= start:
            listing.skips.append(Skip(utt_id, audio, row_split, "malformed_line", f"{where}: end <= start"))
            continue
        if utt_id in seen:
            listing.skips.append(Skip(utt_id, audio, row_split, "duplicate_id", where))
            continue
        try:
            word_starts = parse_word_starts(row.get("word_starts"), text)
        except ValueError as e:
            listing.skips.append(Skip(utt_id, audio, row_split, "malformed_line", f"{where}: {e}"))
            continue
        seen.add(utt_id)
        display[full] = audio
        segment = Segment(utt_id, text.strip(), (row.get("speaker") or "").strip(), start, end, word_starts)
        groups.setdefault((full, row_split), []).append(segment)
    if not any_row:
        raise SourceError(f"{path}: manifest has no rows")
    for (full, row_split), segments in groups.items():
        listing.sources.append(SourceFile(full, display[full], row_split, tuple(segments)))
    return listing


def read_embedded(path: str, split: str | None = None) -> Listing:
    """Lists the embedded corpus: `path` is its folder (holding manifest.tsv) or the manifest itself."""
    manifest = _join(path, "manifest.tsv") if filesystem.is_dir(path) else path
    if not filesystem.is_file(manifest):
        raise SourceError(f"{manifest}: embedded corpus manifest not found")
    return read_manifest(manifest, split=split, columns=EMBEDDED_COLUMNS)


# ----------------------------------------------------------------------------------------- Libri-Light


def merge_voice_activity(
    intervals: Iterable[tuple[float, float]], max_seconds: float, duration: float | None = None
) -> list[tuple[float, float]]:
    """Joins consecutive voice-activity intervals into segments of at most `max_seconds`.

    Intervals are sorted and clipped to [0, duration]. A segment spans from the start of its first
    interval to the end of its last (the pauses between them included), so segments start and end
    at the voice-activity boundaries. An interval longer than `max_seconds` on its own stays one
    segment, never cut mid-speech: `prepare` splits it at the pauses it finds in the audio, or drops
    and counts it (`spectron_jax.data.splitting`).
    """
    cleaned = []
    for start, end in sorted((float(a), float(b)) for a, b in intervals):
        start = max(start, 0.0)
        if duration is not None:
            end = min(end, duration)
        if end > start:
            cleaned.append((start, end))
    segments: list[tuple[float, float]] = []
    current: tuple[float, float] | None = None
    for start, end in cleaned:
        if current is not None and end - current[0] <= max_seconds:
            current = (current[0], max(current[1], end))
            continue
        if current is not None:
            segments.append(current)
        current = (start, end)
    if current is not None:
        segments.append(current)
    return segments


def fixed_windows(duration: float, window_seconds: float) -> list[tuple[float, float]]:
    """Consecutive windows of `window_seconds` covering [0, duration] (the last may be shorter)."""
    count = max(1, math.ceil(duration / window_seconds - 1e-9)) if duration > 0 else 0
    return [(k * window_seconds, min((k + 1) * window_seconds, duration)) for k in range(count)]


def _librilight_key(rel_path: str) -> str:
    """`<speaker>/<book>/<name>.flac` -> `<speaker>-<book>-<name>` (ids of its segments start with it)."""
    stem = os.path.splitext(rel_path)[0]
    return stem.replace(os.sep, "-").replace("/", "-")


def _speaker_of(rel_path: str) -> str:
    parts = rel_path.replace(os.sep, "/").split("/")
    return parts[-3] if len(parts) >= 3 else ""


def plan_librilight_segments(
    root: str, segmentation: str = "vad", max_seconds: float = 13.0
) -> tuple[list[tuple[str, str, float, float]], list[Skip]]:
    """Cuts every `.flac` under a Libri-Light tree into segments.

    Args:
      root: the tree (`<speaker>/<book>/<name>.flac` + `<name>.json`).
      segmentation: `vad` (merge voice-activity intervals, see `merge_voice_activity`) or `fixed`
        (consecutive windows over the whole file, see `fixed_windows`).
      max_seconds: the longest merged segment; DEFAULT 13 s (the training window, 3 s prompt + 10 s
        continuation), not in the paper.

    Returns:
      ([(segment id, file relative to root, start s, end s)], skips for files without usable VAD).
    """
    from spectron_jax.data import audio_input

    if not filesystem.is_dir(root):
        raise SourceError(f"{root}: not a folder (--format=librilight wants a Libri-Light tree)")
    files = list(_walk_files(root, ".flac"))
    if not files:
        raise SourceError(f"{root}: no .flac files (Libri-Light layout <speaker>/<book>/<name>.flac)")

    def plan_file(audio: str) -> tuple[list[tuple[str, str, float, float]], Skip | None]:
        rel = _relative(audio, root)
        key = _librilight_key(rel)
        duration = None
        try:
            duration = audio_input.duration_seconds(audio)
        except Exception as e:  # corrupt header: the worker will report it if a transcript names it.
            if segmentation == "fixed":
                return [], Skip(key, rel, None, "unreadable", " ".join(str(e).split()))
        if segmentation == "fixed":
            spans = fixed_windows(duration or 0.0, max_seconds)
        else:
            vad_path = os.path.splitext(audio)[0] + ".json"
            try:
                intervals = json.loads(filesystem.read_text(vad_path))["voice_activity"]
                spans = merge_voice_activity(intervals, max_seconds, duration)
            except (OSError, ValueError, KeyError, TypeError) as e:
                return [], Skip(key, rel, None, "no_voice_activity", f"{posixpath.basename(vad_path)}: {e}")
        return [(segment_id(key, a, b), rel, a, b) for a, b in spans], None

    if filesystem.is_remote(root):  # two round trips a file (header, VAD json): asked 32 files at a time
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(plan_file, files))
    else:
        results = [plan_file(audio) for audio in files]
    planned, skips = [], []
    for spans, skip in results:
        planned.extend(spans)
        if skip is not None:
            skips.append(skip)
    return planned, skips


def read_librilight(
    root: str,
    transcripts: str,
    split: str | None = None,
    segmentation: str = "vad",
    max_seconds: float = 13.0,
) -> Listing:
    """Lists Libri-Light segments that have a transcript.

    The transcript manifest is a TSV with a header row, in one of two forms:

    - `id<TAB>transcript`: `id` names a segment of the planned segmentation
      (`plan_librilight_segments`; `prepare --write_segments=FILE` lists them with their times), e.g.
      `100-7733-sample_64kb-00000400-00012320`. Planned segments without a transcript are skipped
      (`no_transcript`); transcript ids that name no planned segment are reported (`unknown_segment`).
    - `file<TAB>start<TAB>end<TAB>transcript`: the rows themselves define the segments; `file` is
      relative to `root` (the `.flac` extension may be left out), `start`/`end` in seconds. The
      segmentation knobs are unused.

    Each segment's speaker is the `<speaker>` folder; its split is `split` (default `train`).
    """
    split = split or "train"
    header, rows = _read_table(transcripts)
    if not header or "transcript" not in header or not ("id" in header or {"file", "start", "end"} <= set(header)):
        raise SourceError(
            f"{transcripts}: header must be 'id<TAB>transcript' or 'file<TAB>start<TAB>end<TAB>transcript'"
        )
    if not filesystem.is_dir(root):
        raise SourceError(f"{root}: not a folder (--format=librilight wants a Libri-Light tree)")
    listing = Listing()
    where = posixpath.basename(transcripts)
    by_file: dict[str, list[Segment]] = {}
    seen: set[str] = set()

    def add(seg_id, rel, start, end, text, line):
        if not text.strip():
            listing.skips.append(Skip(seg_id, rel, split, "empty_transcript", f"{where}:{line}"))
        elif seg_id in seen:
            listing.skips.append(Skip(seg_id, rel, split, "duplicate_id", f"{where}:{line}"))
        else:
            seen.add(seg_id)
            by_file.setdefault(rel, []).append(Segment(seg_id, text.strip(), _speaker_of(rel), start, end))

    if "file" in header:
        for line in rows:
            number, row = line.number, line.fields
            if row is None:
                listing.skips.append(Skip(line.id, f"{where}:{number}", split, line.reason, line.detail))
                continue
            rel = row["file"] if row["file"].endswith(".flac") else row["file"] + ".flac"
            try:
                start, end = _float_or_none(row["start"]), _float_or_none(row["end"])
                if start is None or end is None or end <= start:
                    raise ValueError("need 0 <= start < end")
            except ValueError as e:
                listing.skips.append(Skip("", f"{where}:{number}", split, "malformed_line", str(e)))
                continue
            add(segment_id(_librilight_key(rel), start, end), rel, start, end, row["transcript"], number)
    else:
        texts: dict[str, tuple[str, int]] = {}
        for line in rows:
            number, row = line.number, line.fields
            if row is None:
                listing.skips.append(Skip(line.id, f"{where}:{number}", split, line.reason, line.detail))
                continue
            texts.setdefault(row["id"].strip(), (row["transcript"], number))
        planned, skips = plan_librilight_segments(root, segmentation, max_seconds)
        listing.skips.extend(dataclasses.replace(s, split=split) for s in skips)
        for seg_id, rel, start, end in planned:
            if seg_id not in texts:
                listing.skips.append(Skip(seg_id, rel, split, "no_transcript"))
                continue
            text, number = texts.pop(seg_id)
            add(seg_id, rel, start, end, text, number)
        for seg_id, (_, number) in texts.items():
            listing.skips.append(
                Skip(seg_id, f"{where}:{number}", split, "unknown_segment", "no planned segment has this id")
            )
    for rel, segments in sorted(by_file.items()):
        listing.sources.append(SourceFile(_join(root, rel), rel, split, tuple(segments)))
    return listing
