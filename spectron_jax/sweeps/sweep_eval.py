"""Evaluating the points of a sweep: where each point's export and report go, the commands, what a point
holds.

A trained point's folder (MODEL_DIR = BASE_MODEL_DIR/SWEEP_NAME/POINT_NAME) gets

    MODEL_DIR/sweep_point.json      the point's record (`record_text`)
    MODEL_DIR/export/               python -m spectron_jax.export --model_dir=MODEL_DIR --output_dir=...
    MODEL_DIR/eval/SUITE/           python -m spectron_jax.eval --export_dir=MODEL_DIR/export --suite=SUITE ...

and `point_entry` gathers what one point holds (its metrics.json and the last validation record of its
training log) for the comparison over the points (`spectron_jax.sweeps.eval_table`). Files are read and
written through `spectron_jax.filesystem` (local or gs://).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from spectron_jax import filesystem, metric_logs
from spectron_jax.sweeps.sweep_file import POINT_FILENAME, Point, Sweep, SweepError

EXPORT_SUBDIR = "export"
EVAL_SUBDIR = "eval"
BUNDLE_FILE = "bundle.json"  # written last by spectron_jax.export: its presence marks a finished export
METRICS_FILE = "metrics.json"
SUITES = ("continuation", "llama_questions", "web_questions")


# ---- Files ----------------------------------------------------------------------------------------------
def join(folder: str, *parts: str) -> str:
    return "/".join([folder.rstrip("/"), *parts])


def write_text(target: str, text: str) -> None:
    """Writes `target` (local or gs://); raises SweepError when it cannot."""
    try:
        filesystem.write_text(target, text)
    except OSError as e:
        raise SweepError(f"cannot write {target}: {' '.join(str(e).split())}") from None


def read_text(target: str) -> Optional[str]:
    """The text of `target`, or None when it does not exist."""
    try:
        return filesystem.read_text(target)
    except FileNotFoundError:
        return None


# ---- Per-point folders and commands ---------------------------------------------------------------------
def export_dir(point: Point) -> str:
    return join(point.model_dir, EXPORT_SUBDIR)


def eval_dir(point: Point, suite: str) -> str:
    return join(point.model_dir, EVAL_SUBDIR, suite)


def export_command(point: Point, python: str) -> list[str]:
    return [python, "-m", "spectron_jax.export", f"--model_dir={point.model_dir}", f"--output_dir={export_dir(point)}"]


def eval_command(point: Point, python: str, suite: str, data_dir: str, limit: Optional[int],
                 extra_args: Sequence[str], fresh: bool) -> list[str]:
    """`spectron_jax.eval` on the point's export; `fresh` (a new export) discards rows of an earlier run."""
    command = [python, "-m", "spectron_jax.eval", f"--export_dir={export_dir(point)}", f"--suite={suite}",
               f"--data_dir={data_dir}", f"--output_dir={eval_dir(point, suite)}"]
    if limit is not None:
        command.append(f"--limit={limit}")
    command += list(extra_args)
    if fresh:
        command.append("--overwrite")
    return command


def has_export(point: Point) -> bool:
    return filesystem.exists(join(export_dir(point), BUNDLE_FILE))


# ---- What a point holds ----------------------------------------------------------------------------------
def last_validation(model_dir: str) -> Optional[dict]:
    """The last `split == "validation"` record of the run's training log (None without one), read by
    `spectron_jax.metric_logs` (a local metrics.jsonl, or the pieces of a run on an object store)."""
    records = metric_logs.read_records(model_dir, split="validation")
    return records[-1] if records else None


def point_entry(point: Point, suite: str) -> dict:
    """What the table knows of one point: its swept values, folders, metrics.json payload and last
    validation record (None for what is missing)."""
    folder = eval_dir(point, suite)
    text = read_text(join(folder, METRICS_FILE))
    payload = None
    if text is not None:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            raise SweepError(f"{join(folder, METRICS_FILE)}: not JSON ({e.msg})") from None
    return {"name": point.name, "index": point.index, "swept": dict(point.swept), "model_dir": point.model_dir,
            "export_dir": export_dir(point), "eval_dir": folder, "evaluation": payload,
            "validation": last_validation(point.model_dir)}


def record_text(point: Point, sweep: Sweep, command: Sequence[str]) -> tuple[str, str]:
    """(path, text) of the point's sweep_point.json."""
    return join(point.model_dir, POINT_FILENAME), json.dumps(point.record(sweep, command), indent=2) + "\n"


def recorded_points(sweep_dir: str) -> list[Point]:
    """The points of a sweep folder (BASE_MODEL_DIR/SWEEP_NAME) rebuilt from the sweep_point.json of each
    sub-folder, in sweep order; their MODEL_DIR is the sub-folder found (wherever the folder now is)."""
    if not filesystem.is_dir(sweep_dir):
        raise SweepError(f"--sweep_dir={sweep_dir}: not a directory")
    points = []
    for name in filesystem.listdir(sweep_dir):
        folder = join(sweep_dir, name)
        record_path = join(folder, POINT_FILENAME)
        if not filesystem.exists(record_path):
            continue
        try:
            record = json.loads(filesystem.read_text(record_path))
            points.append(Point(int(record["index"]), str(record["name"]), tuple(record.get("gin_files", ())),
                                tuple((record.get("bindings") or {}).items()), dict(record.get("swept") or {}),
                                folder))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise SweepError(f"{record_path}: not a sweep point record ({e})") from None
    if not points:
        raise SweepError(f"--sweep_dir={sweep_dir}: no sub-folder holds {POINT_FILENAME}")
    return sorted(points, key=lambda p: p.index)
