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
  Prepared TFRecord shards hold only log-mel features, not audio, so they are refused with a message
  pointing at the source tree they were prepared from.

`llama_questions` (`llama_questions_examples`): the public LLaMA-Questions layout, `N.wav` files next to
  `llama_questions_300.tsv` with the columns `Questions`, `Answer`, `Wav Filename`. The file has CRLF
  line endings, unescaped `"` inside questions and trailing spaces, so it is split on tabs with quoting
  off and every field is stripped.

`web_questions` (`web_questions_examples`): a manifest of spoken questions, `.tsv` (columns `audio`,
  `question`, `answers`, the answers separated by `|`) or `.jsonl` (`{"audio": ..., "question": ...,
  "answers": [...]}`), audio paths relative to the manifest; `launch/synthesize_questions.py` writes
  one from the WebQuestions JSON.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

from etils import epath

from spectron_jax.data import sources

LLAMA_QUESTIONS_TSV = "llama_questions_300.tsv"
LLAMA_COLUMNS = ("Questions", "Answer", "Wav Filename")
ANSWER_SEPARATOR = "|"


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
    path = os.fspath(data_dir)
    try:
        for folder in (path, os.path.join(path, "embedded")):
            if os.path.isfile(os.path.join(folder, "manifest.tsv")):
                return _examples_of(sources.read_embedded(folder), split or "test")
        if os.path.isfile(path):
            return _examples_of(sources.read_manifest(path, split=split), split)
        if not os.path.isdir(path):
            raise DatasetError(f"--data_dir={data_dir}: no such file or folder")
        if any(name.endswith(".tfrecord") or ".tfrecord-" in name for name in os.listdir(path)):
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
        utt_id = os.path.splitext(os.path.basename(wav))[0] if wav else ""
        if not wav or not answer:
            skips.append(Skip(utt_id, where, None, "malformed_line", "no wav file name or no answer"))
            continue
        if utt_id in seen:
            skips.append(Skip(utt_id, where, None, "duplicate_id", wav))
            continue
        seen.add(utt_id)
        examples.append(EvalExample(utt_id, os.fspath(root / wav), question, "", (answer,)))
    return examples, skips


def _answers_of(value) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = str(value or "").split(ANSWER_SEPARATOR)
    return tuple(a.strip() for a in items if str(a).strip())


def web_questions_examples(manifest: str) -> tuple[list[EvalExample], list[Skip]]:
    """Spoken WebQuestions from a `.tsv` / `.jsonl` manifest (see the module docstring)."""
    path = epath.Path(manifest)
    if path.is_dir():
        candidates = [path / name for name in ("manifest.jsonl", "manifest.tsv") if (path / name).exists()]
        if not candidates:
            raise DatasetError(f"--data_dir={manifest}: no manifest.jsonl or manifest.tsv in this folder")
        path = candidates[0]
    if not path.exists():
        raise DatasetError(f"--data_dir={manifest}: no such file")
    lines = [(n, line) for n, line in enumerate(_read_lines(path), 1) if line.strip()]
    rows: list[tuple[int, dict | None]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            rows.append((number, row if isinstance(row, dict) else None))
    else:
        if not lines:
            raise DatasetError(f"{path}: empty")
        header = _split_tab(lines[0][1])
        for number, line in lines[1:]:
            fields = _split_tab(line)
            rows.append((number, dict(zip(header, fields)) if len(fields) == len(header) else None))
    examples, skips, seen = [], [], set()
    for number, row in rows:
        where = f"{path.name}:{number}"
        if row is None:
            skips.append(Skip("", where, None, "malformed_line", "not a row of audio, question, answers"))
            continue
        audio = str(row.get("audio") or row.get("path") or "").strip()
        answers = _answers_of(row.get("answers", row.get("answer")))
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
