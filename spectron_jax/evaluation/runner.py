"""What every suite shares: loading audio with skips, batched inference, resumable per-example rows.

A suite turns `EvalExample`s into one JSON row each (`examples.jsonl`): every number that its metrics
are pooled from, so that `metrics.json` is a pure function of the rows and a run that stops can resume
(rows already written for the same suite are reused, their examples not run again). A bad example
(missing or corrupt audio, too short, an inference error) becomes a `Skip` with its reason instead.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from etils import epath
from tqdm import tqdm

from spectron_jax import filesystem, infer
from spectron_jax.data import features
from spectron_jax.evaluation.datasets import EvalExample, Skip

EXAMPLES_FILENAME = "examples.jsonl"


@dataclasses.dataclass(frozen=True)
class Loaded:
    """An example with its audio: wave [samples] float32 16 kHz."""

    example: EvalExample
    wave: np.ndarray


def load_examples(examples: Iterable[EvalExample], skips: list[Skip],
                  min_seconds: float = 0.0) -> Iterator[Loaded]:
    """Reads each example's audio; a missing / corrupt / too-short file is appended to `skips`."""
    for ex in examples:
        try:
            wave = features.load_audio(ex.audio)
        except features.AudioError as e:
            skips.append(Skip(ex.id, ex.audio, None, e.reason, e.detail))
            continue
        seconds = wave.size / features.SPECTRON_FEATURES.sample_rate
        if seconds < min_seconds:
            skips.append(Skip(ex.id, ex.audio, None, "too_short", f"{seconds:.2f} s < {min_seconds:.2f} s"))
            continue
        yield Loaded(ex, wave)


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_batched(inferencer: Any, loaded: Iterable[Loaded], batch_size: int, skips: list[Skip],
                prompt_of: Callable[[Loaded], np.ndarray], total: int, desc: str) -> Iterator[tuple[Loaded, Any]]:
    """Runs `inferencer.run` on the prompts of `batch_size` examples at a time, with a progress bar.

    Each row's randomness (sampling, pre-net dropout) is keyed by its example's id (`example_row_id`),
    so an example's output does not depend on the batch size, the order or which examples a resumed
    run has left to do. An exception from a batch is retried example by example; an example that still
    fails is skipped with reason `inference_error`, so one bad input never ends the suite.
    """
    with tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, leave=False) as bar:
        for chunk in batches(loaded, batch_size):
            try:
                results = inferencer.run([prompt_of(item) for item in chunk],
                                         [example_row_id(item.example) for item in chunk])
                pairs = list(zip(chunk, results, strict=True))
            except Exception:  # noqa: BLE001 - isolate the failing example below
                pairs = []
                for item in chunk:
                    try:
                        pairs.append((item, inferencer.run([prompt_of(item)], [example_row_id(item.example)])[0]))
                    except Exception as e:  # noqa: BLE001 - counted and reported, not fatal
                        skip = scoring_skip(item.example, e)
                        skips.append(dataclasses.replace(skip, reason="inference_error"))
            for pair in pairs:
                yield pair
            bar.update(len(chunk))


def example_row_id(example: EvalExample) -> int:
    """The id that keys an example's PRNG draws at inference: a hash of its (unique) example id."""
    return infer.row_id(0, example.id)


def scoring_skip(example: EvalExample, error: Exception) -> Skip:
    """The skip of an example whose scoring raised (the message, one line, at most 300 characters)."""
    detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return Skip(example.id, example.audio, None, "scoring_error", detail)


class ResumeError(ValueError):
    """OUT/examples.jsonl holds rows of another run (one line: what differs, and what to do)."""


def _first_difference(saved: Any, current: Any, where: str = "") -> str:
    """'key: saved vs current' for the first field where two fingerprints differ ('' when equal)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current), key=str):
            found = _first_difference(saved.get(key), current.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return ""
    return "" if saved == current else f"{where or 'fingerprint'}: {saved!r} vs {current!r}"


class RowWriter:
    """Writes one JSON row per example to OUT/examples.jsonl; resumes the rows of an earlier run.

    Every row records `fingerprint` (what made it: the export and its step, the decode settings, the
    scorers, the suite and its data; built by the caller). A resume reuses the rows of an earlier run
    only when each of them has the same fingerprint; otherwise it refuses (`ResumeError`), so that
    rows of two models (or two decode settings) are never pooled into one figure. `overwrite` starts
    afresh instead: the earlier rows are discarded. Values that are not finite (NaN, inf) are written
    as JSON null and named in the row's `non_finite` list (examples.jsonl stays strict JSON;
    `non_finite_counts` counts them per field).
    """

    def __init__(self, output_dir: epath.Path, suite: str, fingerprint: dict | None = None,
                 overwrite: bool = False):
        self.path = output_dir / EXAMPLES_FILENAME
        self.suite = suite
        self.fingerprint = json.loads(_dumps(_strict(dict(fingerprint or {}))))  # as it reads back
        self.rows: list[dict] = []
        if not overwrite and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted write
                if not isinstance(row, dict):
                    continue
                if row.get("suite") != suite or row.get("fingerprint") != self.fingerprint:
                    why = (f"suite: {row.get('suite')!r} vs {suite!r}" if row.get("suite") != suite else
                           "rows written without a fingerprint" if "fingerprint" not in row else
                           _first_difference(row.get("fingerprint"), self.fingerprint))
                    raise ResumeError(f"{self.path}: its rows come from another run ({why}); pass --overwrite "
                                      "to start afresh, or another --output_dir")
                self.rows.append(row)
        self.done = {row["id"] for row in self.rows}
        self._flush_all()

    def _flush_all(self) -> None:
        filesystem.write_text(self.path, "".join(_dumps(row) + "\n" for row in self.rows))

    def add(self, row: dict) -> None:
        """Records one row: appended locally; on an object store (no append) the file is rewritten whole."""
        row = json.loads(_dumps(strict_row({"suite": self.suite, **row, "fingerprint": self.fingerprint})))
        self.rows.append(row)
        self.done.add(row["id"])
        if filesystem.is_remote(self.path):
            self._flush_all()
        else:
            filesystem.append_lines(self.path, [_dumps(row)])


NON_FINITE_FIELD = "non_finite"  # a row's fields whose value was NaN / inf, written as null


def _strict(value: Any, where: str = "", found: list[str] | None = None) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None; their paths go to `found`."""
    if isinstance(value, (float, np.floating)):
        if np.isfinite(value):
            return float(value)
        if found is not None:
            found.append(where)
        return None
    if isinstance(value, dict):
        return {k: _strict(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def _dumps(row: dict) -> str:
    return json.dumps(row, allow_nan=False)


def strict_row(row: dict) -> dict:
    """The row as examples.jsonl holds it: non-finite values null, their fields listed in `non_finite`."""
    found: list[str] = []
    clean = _strict({k: v for k, v in row.items() if k != NON_FINITE_FIELD}, "", found)
    if found:
        clean[NON_FINITE_FIELD] = found
    return clean


def non_finite_counts(rows: Sequence[dict]) -> dict[str, int]:
    """{field: rows where it was NaN / inf (null in examples.jsonl)}: the rows each mean leaves out."""
    counts: dict[str, int] = {}
    for row in rows:
        for name in row.get(NON_FINITE_FIELD, ()):
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def non_finite_note(rows: Sequence[dict]) -> str | None:
    """A report note naming the fields that were not finite in some rows (None when there are none)."""
    counts = non_finite_counts(rows)
    if not counts:
        return None
    listed = ", ".join(f"{name}: {n}" for name, n in counts.items())
    return (f"Rows with a value that is not a finite number (null in examples.jsonl; left out of that "
            f"figure's mean), per field: {listed}.")


# `text_boundary` of a result (`spectron_jax.infer`): split at the separator / not written / not a model's.
SEPARATED, MISSING, UNMARKED = "separator", "missing", "unmarked"


def continuation_text(result: Any) -> str:
    """The model's text after its transcript of the prompt.

    `Inferencer` splits the text at the model's separator (`text_boundary` 'separator'); without one
    (a model without `sep_id`, or a row where it wrote none) the whole text stands for the continuation.
    """
    if getattr(result, "text_boundary", None) == SEPARATED:
        return (result.continuation or "").strip()
    return (result.text or "").strip()


def boundary_note(rows: Sequence[dict]) -> str | None:
    """A report note on rows whose text has no separator (None when every row has one)."""
    kinds = [row.get("text_boundary") for row in rows]
    if not kinds or all(k == SEPARATED for k in kinds):
        return None
    if all(k == UNMARKED for k in kinds):
        return ("This model writes no text separator (its bundle has no sep_id): the continuation figures "
                "score its whole text, and the transcript figures its whole text against the reference.")
    missing = sum(k != SEPARATED for k in kinds)
    return (f"{missing} of {len(kinds)} rows carry no text separator although the model has one: their "
            "continuation figures score the whole text, and the prompt-transcript figures leave them out.")


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    arr = np.asarray([v for v in values if v is not None], np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def safe_name(example_id: str) -> str:
    """An example id as a file name (anything but letters, digits, '-', '_' and '.' becomes '_')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in example_id) or "example"


@dataclasses.dataclass
class Scorers:
    """The scorers a suite uses; None leaves that figure out (the report says which one made which)."""

    asr: Any = None  # asr.Transcriber
    text_lm: Any = None  # text_lm.TextLM
    speaker: Any = None  # speaker.SpeakerEncoder
    dnsmos: Any = None  # naturalness.DNSMOS
    floors: bool = True  # also score each row's floors and ceilings with them (`evaluation.floors`)

    def names(self) -> dict[str, str]:
        """kind -> the name of the system that scores it, for the scorers that are set."""
        return {kind: getattr(getattr(self, kind), "name", type(getattr(self, kind)).__name__)
                for kind in ("asr", "text_lm", "speaker", "dnsmos") if getattr(self, kind) is not None}
