"""Evaluation sets: what each suite reads from `--data_dir`.

Every loader returns `(examples, skips)`: the `EvalExample`s to run and the `Skip`s found while listing
(malformed rows, empty answers, ...). Audio is not opened here; the suites load it and count a missing
or corrupt file as a skip of its own.

`continuation` (`continuation_examples`), whole utterances whose first 3 s are the prompt:
  - `data` (a folder holding `embedded/manifest.tsv`) or `data/embedded`: the embedded corpus, its
    `test` split;
  - a LibriSpeech tree (`<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` next to `<id>.flac`), e.g.
    `LibriSpeech/test-clean`: every utterance in it;
  - a manifest file (`.tsv` with a header or `.jsonl`; columns `path`/`audio`, `transcript`/`text`,
    optional `id`, `speaker`, `split`): every row, or the rows of `split` when given.
  The folder or file may be local or on an object store (`gs://...`, through `spectron_jax.filesystem`).
  Prepared TFRecord shards hold only log-mel features, not audio, so they are refused with a message
  pointing at the source tree they were prepared from.

`llama_questions` (`llama_questions_examples`): the public LLaMA-Questions layout, `N.wav` files next to
  `llama_questions_300.tsv` with the columns `Questions`, `Answer`, `Wav Filename`. The file has CRLF
  line endings, unescaped `"` inside questions and trailing spaces, so it is split on tabs with quoting
  off and every field is stripped. An example's id is its wav's path without the extension (`6.wav`
  -> `6`, `sub/6.wav` -> `sub/6`), so files of one name in two folders stay apart.

`web_questions` (`web_questions_examples`): a manifest of spoken questions, `.tsv` (a header with the
  columns `audio` (or `path`), `question`, `answers` (or `answer`), the answers separated by `|`),
  `.jsonl` (one `{"audio": ..., "question": ..., "answers": [...]}` per line) or `.json` (an array of
  such objects), audio paths relative to the manifest; `synthesize_questions` (this package) writes one
  from the WebQuestions JSON. A null among the answers is dropped (a row left with none is skipped); the
  id is the row's `id`, else its audio file's name without the extension.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

from etils import epath

from spectron_jax import filesystem
from spectron_jax.data import sources

LLAMA_QUESTIONS_TSV = "llama_questions_300.tsv"
LLAMA_COLUMNS = ("Questions", "Answer", "Wav Filename")
ANSWER_SEPARATOR = "|"
# Columns of a WebQuestions .tsv manifest: each entry is a column and the other name it may go by.
WEB_QUESTIONS_COLUMNS = (("audio", "path"), ("question", None), ("answers", "answer"))


class DatasetError(ValueError):
    """`--data_dir` as a whole cannot be read as the suite's data (one line, names the path)."""


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One utterance to evaluate.

    Attributes:
      id: unique name (report rows and wav file names use it).
      audio: path of the audio file.
      text: reference text of the whole utterance (continuation) or of the question (QA).
      speaker: speaker id, '' when unknown.
      answers: accepted answers (QA only).
    """

    id: str
    audio: str
    text: str
    speaker: str = ""
    answers: tuple[str, ...] = ()


Skip = sources.Skip


def _examples_of(listing: sources.Listing, split: str | None) -> tuple[list[EvalExample], list[Skip]]:
    examples = []
    for source in listing.sources:
        if split is not None and source.split != split:
            continue
        for seg in source.segments:
            examples.append(EvalExample(seg.id, source.path, seg.transcript, seg.speaker))
    return examples, list(listing.skips)


def continuation_examples(data_dir: str, split: str | None = None) -> tuple[list[EvalExample], list[Skip]]:
    """Utterances for the continuation suite from `data_dir` (see the module docstring).

    Args:
      data_dir: the embedded corpus (`data` or `data/embedded`), a LibriSpeech tree or a manifest file.
      split: rows of this split only; default `test` for the embedded corpus and every row otherwise.
    """
    path = os.fspath(data_dir).rstrip("/") if filesystem.is_remote(data_dir) else os.fspath(data_dir)
    try:
        for folder in (path, filesystem.join(path, "embedded")):
            if filesystem.is_file(filesystem.join(folder, "manifest.tsv")):
                return _examples_of(sources.read_embedded(folder), split or "test")
        if filesystem.is_file(path):
            return _examples_of(sources.read_manifest(path, split=split), split)
        if not filesystem.is_dir(path):
            raise DatasetError(f"--data_dir={data_dir}: no such file or folder")
        if any(name.endswith(".tfrecord") or ".tfrecord-" in name for name in filesystem.listdir(path)):
            raise DatasetError(f"--data_dir={data_dir}: prepared TFRecord shards hold log-mel features, not audio; "
                               "pass the corpus they were prepared from (a LibriSpeech tree or a manifest)")
        return _examples_of(sources.read_librispeech(path, split="test"), None)
    except sources.SourceError as e:
        raise DatasetError(f"--data_dir={data_dir}: {e}") from None


def _read_lines(path: epath.Path) -> list[str]:
    try:
        # splitlines() drops CRLF as well as LF; utf-8-sig drops a byte-order mark.
        return path.read_bytes().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({' '.join(str(e).split())})") from None


def _split_tab(line: str) -> list[str]:
    return [field.strip() for field in next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))]


def llama_questions_examples(data_dir: str) -> tuple[list[EvalExample], list[Skip]]:
    """The LLaMA-Questions set in `data_dir` (`llama_questions_300.tsv` + the wavs it names)."""
    root = epath.Path(data_dir)
    table = root / LLAMA_QUESTIONS_TSV
    if not table.exists():
        raise DatasetError(f"--data_dir={data_dir}: no {LLAMA_QUESTIONS_TSV} (the LLaMA-Questions layout)")
    lines = [(n, line) for n, line in enumerate(_read_lines(table), 1) if line.strip()]
    if not lines:
        raise DatasetError(f"{table}: empty")
    header = _split_tab(lines[0][1])
    missing = [c for c in LLAMA_COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{table}: header lacks the column(s) {', '.join(missing)}; got {', '.join(header)}")
    col = {name: header.index(name) for name in LLAMA_COLUMNS}
    examples, skips, seen = [], [], set()
    for number, line in lines[1:]:
        fields = _split_tab(line)
        where = f"{LLAMA_QUESTIONS_TSV}:{number}"
        if len(fields) < len(header):
            skips.append(Skip("", where, None, "malformed_line", f"{len(fields)} fields, header has {len(header)}"))
            continue
        question, answer, wav = (fields[col[c]] for c in LLAMA_COLUMNS)
        utt_id = _id_of_path(wav)
        if not wav or not answer:
            skips.append(Skip(utt_id, where, None, "malformed_line", "no wav file name or no answer"))
            continue
        if utt_id in seen:
            skips.append(Skip(utt_id, where, None, "duplicate_id", wav))
            continue
        seen.add(utt_id)
        examples.append(EvalExample(utt_id, os.fspath(root / wav), question, "", (answer,)))
    return examples, skips


def _id_of_path(audio: str) -> str:
    """An example id from its audio path: the path without its extension, '/'-separated ('' for '')."""
    if not audio:
        return ""
    return os.path.splitext(os.path.normpath(audio).replace(os.sep, "/"))[0]


def _answers_of(value) -> tuple[str, ...] | None:
    """Accepted answers of a row: a list (nulls dropped) or a '|'-separated string; None when a list
    holds something that is not a string or a number (an object, a list)."""
    if isinstance(value, (list, tuple)):
        kept = [v for v in value if v is not None]
        if any(isinstance(v, (dict, list, bool)) for v in kept):
            return None
        items = [str(v) for v in kept]
    else:
        items = str("" if value is None else value).split(ANSWER_SEPARATOR)
    return tuple(a.strip() for a in items if a.strip())


def _json_rows(path: epath.Path, lines: list[tuple[int, str]]) -> list[tuple[str, dict | None]]:
    """(where, row) of a `.jsonl` manifest (one object per line) or a `.json` one (an array of objects)."""
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            rows.append((f"{path.name}:{number}", row if isinstance(row, dict) else None))
        return rows
    try:
        data = json.loads("\n".join(line for _, line in lines))  # `lines` keeps blank ones for .json
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not JSON ({e.msg} at line {e.lineno}); a manifest of one object per "
                           "line is a .jsonl file") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a .json manifest is an array of objects, got a {type(data).__name__}")
    return [(f"{path.name}[{i}]", row if isinstance(row, dict) else None) for i, row in enumerate(data)]


def _tsv_rows(path: epath.Path, lines: list[tuple[int, str]]) -> list[tuple[str, dict | None]]:
    """(where, row) of a `.tsv` manifest, its header checked for the columns it needs."""
    if not lines:
        raise DatasetError(f"{path}: empty")
    header = _split_tab(lines[0][1])
    missing = [name if other is None else f"{name} (or {other})" for name, other in WEB_QUESTIONS_COLUMNS
               if name not in header and other not in header]
    if missing:
        raise DatasetError(f"{path}: header lacks the column(s) {', '.join(missing)}; got {', '.join(header)}")
    rows = []
    for number, line in lines[1:]:
        fields = _split_tab(line)
        rows.append((f"{path.name}:{number}", dict(zip(header, fields)) if len(fields) == len(header) else None))
    return rows


def web_questions_examples(manifest: str) -> tuple[list[EvalExample], list[Skip]]:
    """Spoken WebQuestions from a `.tsv` / `.jsonl` / `.json` manifest (see the module docstring)."""
    path = epath.Path(manifest)
    if path.is_dir():
        candidates = [path / name for name in ("manifest.jsonl", "manifest.json", "manifest.tsv")
                      if (path / name).exists()]
        if not candidates:
            raise DatasetError(f"--data_dir={manifest}: no manifest.jsonl, manifest.json or manifest.tsv in this "
                               "folder")
        path = candidates[0]
    if not path.exists():
        raise DatasetError(f"--data_dir={manifest}: no such file")
    lines = [(n, line) for n, line in enumerate(_read_lines(path), 1)]
    if path.suffix.lower() == ".json":
        rows = _json_rows(path, lines)
    elif path.suffix.lower() == ".jsonl":
        rows = _json_rows(path, [(n, line) for n, line in lines if line.strip()])
    else:
        rows = _tsv_rows(path, [(n, line) for n, line in lines if line.strip()])
    examples, skips, seen = [], [], set()
    for where, row in rows:
        if row is None:
            skips.append(Skip("", where, None, "malformed_line", "not a row of audio, question, answers"))
            continue
        audio = str(row.get("audio") or row.get("path") or "").strip()
        answers = _answers_of(row.get("answers", row.get("answer")))
        if answers is None:
            skips.append(Skip(str(row.get("id", "")), where, None, "malformed_line",
                              "answers: a list of strings (or numbers) expected"))
            continue
        if not audio or not answers:
            skips.append(Skip(str(row.get("id", "")), where, None, "malformed_line", "no audio path or no answers"))
            continue
        utt_id = str(row.get("id") or os.path.splitext(os.path.basename(audio))[0]).strip()
        if utt_id in seen:
            skips.append(Skip(utt_id, where, None, "duplicate_id", audio))
            continue
        seen.add(utt_id)
        full = audio if audio.startswith(("/", "gs://")) else os.fspath(path.parent / audio)
        examples.append(EvalExample(utt_id, full, str(row.get("question", "")).strip(), "", answers))
    return examples, skips
