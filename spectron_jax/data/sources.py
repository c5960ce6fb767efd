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
  optionally `id`, `speaker`, `split`, `start`, `end` (seconds); paths are relative to the manifest's
  folder. The default id is the file name without its extension (plus `-<start ms>-<end ms>` when the
  row cuts a segment); the default split is `split=` or `train`.
- `embedded`: the project's corpus, `manifest.tsv` with columns
  `id path transcript speaker passage split duration`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from typing import Iterable, Iterator

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
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _walk_files(root: str, suffix: str) -> Iterator[str]:
    """Files under `root` whose name ends with `suffix`, in sorted order."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(suffix):
                yield os.path.join(folder, name)


def is_valid_split(split: str) -> bool:
    """Split names become file names: letters, digits and underscores only."""
    return bool(_SPLIT_NAME.match(split))


def read_librispeech(root: str, split: str | None = None) -> Listing:
    """Lists a LibriSpeech tree (see the module docstring)."""
    if not os.path.isdir(root):
        raise SourceError(f"{root}: not a folder (--format=librispeech wants a LibriSpeech tree)")
    listing = Listing()
    transcripts = list(_walk_files(root, ".trans.txt"))
    if not transcripts:
        raise SourceError(f"{root}: no LibriSpeech transcripts (<speaker>/<chapter>/<speaker>-<chapter>.trans.txt)")
    seen: set[str] = set()
    for trans in transcripts:
        chapter_dir = os.path.dirname(trans)
        trans_name = _relative(trans, root)
        rel_parts = _relative(chapter_dir, root).split(os.sep)
        if split is not None:
            file_split = split
        else:
            # The folder above <speaker>/<chapter>, or the input folder itself.
            folder = rel_parts[-3] if len(rel_parts) >= 3 else os.path.basename(os.path.abspath(root))
            file_split = librispeech_split(folder)
            if file_split is None:
                raise SourceError(
                    f"{trans}: cannot tell the split from folder '{folder}' (expected train-*, dev-* or test-*); "
                    "pass --split"
                )
        try:
            with open(trans, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            listing.skips.append(Skip("", trans_name, file_split, "unreadable_transcripts", str(e)))
            continue
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.strip().split(maxsplit=1)
            utt_id = fields[0]
            text = fields[1].strip() if len(fields) > 1 else ""
            audio = os.path.join(chapter_dir, utt_id + ".flac")
            if not os.path.exists(audio) and os.path.exists(os.path.join(chapter_dir, utt_id + ".wav")):
                audio = os.path.join(chapter_dir, utt_id + ".wav")
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


def _read_table(path: str) -> tuple[list[str], Iterator[tuple[int, dict | None, str]]]:
    """Rows of a TSV (header row) or JSONL manifest as (line number, row or None if malformed, detail)."""
    if os.path.isdir(path):
        raise SourceError(f"{path}: is a folder, not a manifest file (.tsv or .jsonl)")
    if not os.path.isfile(path):
        raise SourceError(f"{path}: manifest not found")
    suffix = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read manifest ({e})") from e
    if suffix in (".jsonl", ".json", ".ndjson"):
        return [], _jsonl_rows(lines)
    if suffix in (".tsv", ".txt", ".csv") or not suffix:
        body = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        if not body:
            raise SourceError(f"{path}: manifest is empty")
        header = [c.strip() for c in body[0][1].split("\t")]
        return header, _tsv_rows(header, body[1:])
    raise SourceError(f"{path}: unknown manifest type '{suffix}' (use .tsv or .jsonl)")


def _tsv_rows(header: list[str], body: list[tuple[int, str]]) -> Iterator[tuple[int, dict | None, str]]:
    for number, line in body:
        # Transcripts may hold quotes: no CSV quoting.
        fields = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(fields) != len(header):
            yield number, None, f"{len(fields)} fields, header has {len(header)}"
            continue
        yield number, dict(zip(header, fields, strict=True)), ""


def _jsonl_rows(lines: list[str]) -> Iterator[tuple[int, dict | None, str]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield number, None, f"invalid JSON ({e.msg})"
            continue
        if not isinstance(row, dict):
            yield number, None, "not a JSON object"
            continue
        yield number, {k: "" if v is None else str(v) for k, v in row.items()}, ""


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
    base = os.path.dirname(os.path.abspath(path))
    listing = Listing()
    groups: dict[tuple[str, str], list[Segment]] = {}
    display: dict[str, str] = {}
    seen: set[str] = set()
    any_row = False
    for number, row, problem in rows:
        any_row = True
        where = f"{os.path.basename(path)}:{number}"
        if row is None:
            listing.skips.append(Skip("", where, None, "malformed_line", problem))
            continue
        audio = _pick(row, PATH_COLUMNS)
        text = _pick(row, TEXT_COLUMNS)
        if not audio or text is None:
            listing.skips.append(Skip(row.get("id", ""), where, None, "malformed_line", "no audio path or transcript"))
            continue
        row_split = (row.get("split") or "").strip() or split or "train"
        full = audio if os.path.isabs(audio) else os.path.normpath(os.path.join(base, audio))
        try:
            start = _float_or_none(row.get("start")) or 0.0
            end = _float_or_none(row.get("end"))
        except ValueError as e:
            listing.skips.append(Skip(row.get("id", ""), audio, row_split, "malformed_line", f"{where}: {e}"))
            continue
        utt_id = (row.get("id") or "").strip()
        if not utt_id:
            stem = os.path.splitext(os.path.basename(audio))[0]
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
        seen.add(utt_id)
        display[full] = audio
        segment = Segment(utt_id, text.strip(), (row.get("speaker") or "").strip(), start, end)
        groups.setdefault((full, row_split), []).append(segment)
    if not any_row:
        raise SourceError(f"{path}: manifest has no rows")
    for (full, row_split), segments in groups.items():
        listing.sources.append(SourceFile(full, display[full], row_split, tuple(segments)))
    return listing


def read_embedded(path: str, split: str | None = None) -> Listing:
    """Lists the embedded corpus: `path` is its folder (holding manifest.tsv) or the manifest itself."""
    manifest = os.path.join(path, "manifest.tsv") if os.path.isdir(path) else path
    if not os.path.isfile(manifest):
        raise SourceError(f"{manifest}: embedded corpus manifest not found")
    return read_manifest(manifest, split=split, columns=EMBEDDED_COLUMNS)


# ----------------------------------------------------------------------------------------- Libri-Light


def merge_voice_activity(
    intervals: Iterable[tuple[float, float]], max_seconds: float, duration: float | None = None
) -> list[tuple[float, float]]:
    """Joins consecutive voice-activity intervals into segments of at most `max_seconds`.

    Intervals are sorted and clipped to [0, duration]. A segment spans from the start of its first
    interval to the end of its last (the pauses between them included). An interval longer than
    `max_seconds` on its own is cut into equal windows of at most `max_seconds`.
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
        if end - start > max_seconds:  # too long on its own: equal windows
            pieces = math.ceil((end - start) / max_seconds)
            step = (end - start) / pieces
            segments.extend((start + k * step, start + (k + 1) * step) for k in range(pieces))
            current = None
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
    root: str, segmentation: str = "vad", max_seconds: float = 20.0
) -> tuple[list[tuple[str, str, float, float]], list[Skip]]:
    """Cuts every `.flac` under a Libri-Light tree into segments.

    Args:
      root: the tree (`<speaker>/<book>/<name>.flac` + `<name>.json`).
      segmentation: `vad` (merge voice-activity intervals, see `merge_voice_activity`) or `fixed`
        (consecutive windows over the whole file, see `fixed_windows`).
      max_seconds: the longest segment; DEFAULT 20 s, not in the paper.

    Returns:
      ([(segment id, file relative to root, start s, end s)], skips for files without usable VAD).
    """
    import soundfile

    if not os.path.isdir(root):
        raise SourceError(f"{root}: not a folder (--format=librilight wants a Libri-Light tree)")
    files = list(_walk_files(root, ".flac"))
    if not files:
        raise SourceError(f"{root}: no .flac files (Libri-Light layout <speaker>/<book>/<name>.flac)")
    planned, skips = [], []
    for audio in files:
        rel = _relative(audio, root)
        key = _librilight_key(rel)
        duration = None
        try:
            duration = soundfile.info(audio).duration
        except Exception as e:  # corrupt header: the worker will report it if a transcript names it.
            if segmentation == "fixed":
                skips.append(Skip(key, rel, None, "unreadable", " ".join(str(e).split())))
                continue
        if segmentation == "fixed":
            spans = fixed_windows(duration or 0.0, max_seconds)
        else:
            vad_path = os.path.splitext(audio)[0] + ".json"
            try:
                with open(vad_path, encoding="utf-8") as f:
                    intervals = json.load(f)["voice_activity"]
                spans = merge_voice_activity(intervals, max_seconds, duration)
            except (OSError, ValueError, KeyError, TypeError) as e:
                skips.append(Skip(key, rel, None, "no_voice_activity", f"{os.path.basename(vad_path)}: {e}"))
                continue
        planned.extend((segment_id(key, a, b), rel, a, b) for a, b in spans)
    return planned, skips


def read_librilight(
    root: str,
    transcripts: str,
    split: str | None = None,
    segmentation: str = "vad",
    max_seconds: float = 20.0,
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
    if not os.path.isdir(root):
        raise SourceError(f"{root}: not a folder (--format=librilight wants a Libri-Light tree)")
    listing = Listing()
    where = os.path.basename(transcripts)
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
        for number, row, problem in rows:
            if row is None:
                listing.skips.append(Skip("", f"{where}:{number}", split, "malformed_line", problem))
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
        for number, row, problem in rows:
            if row is None:
                listing.skips.append(Skip("", f"{where}:{number}", split, "malformed_line", problem))
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
        listing.sources.append(SourceFile(os.path.join(root, rel), rel, split, tuple(segments)))
    return listing
