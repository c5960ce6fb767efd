"""Evaluating the points of a sweep: where each point's export and report go, the commands, the table.

A trained point's folder (MODEL_DIR = BASE_MODEL_DIR/SWEEP_NAME/POINT_NAME) gets

    MODEL_DIR/export/               python -m spectron_jax.export --model_dir=MODEL_DIR --output_dir=...
    MODEL_DIR/eval/SUITE/           python -m spectron_jax.eval --export_dir=MODEL_DIR/export --suite=SUITE ...

and the sweep folder (BASE_MODEL_DIR/SWEEP_NAME) one comparison over its points,

    eval_SUITE.md    the figures of the suite and the validation losses of the last training evaluation,
                     one column per point (launch/eval_table.py renders it)
    eval_SUITE.json  the same as data: per point its swept values, folders, metrics and validation losses

Files are read and written through `spectron_jax.filesystem` (local or gs://) when the package is
importable; without it, local files go through the standard library and a gs:// sweep_point.json through
`gcloud storage cp`, so that printing and dry runs need only the standard library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional, Sequence

from sweep_file import POINT_FILENAME, REPO_ROOT, Point, Sweep, SweepError

EXPORT_SUBDIR = "export"
EVAL_SUBDIR = "eval"
BUNDLE_FILE = "bundle.json"  # written last by spectron_jax.export: its presence marks a finished export
METRICS_FILE = "metrics.json"
SUITES = ("continuation", "llama_questions", "web_questions")


# ---- Files (through the project's file-system layer when it is importable) -----------------------------
def filesystem():
    """`spectron_jax.filesystem`, or None when the package (or etils) cannot be imported."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))  # an installed package, if any, still comes first
    try:
        from spectron_jax import filesystem as fs
    except ImportError:
        return None
    return fs


def join(folder: str, *parts: str) -> str:
    return "/".join([folder.rstrip("/"), *parts])


def write_text(target: str, text: str) -> None:
    """Writes `target` (local or gs://); raises SweepError when it cannot."""
    fs = filesystem()
    try:
        if fs is not None:
            fs.write_text(target, text)
            return
        if "://" in target:
            subprocess.run(["gcloud", "storage", "cp", "-", target], input=text.encode("utf-8"), check=True)
            return
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SweepError(f"cannot write {target}: {' '.join(str(e).split())}") from None


def _needs_filesystem(target: str):
    fs = filesystem()
    if fs is None and "://" in target:
        raise SweepError(f"{target}: reading an object store needs the spectron_jax package (pip install -e .)")
    return fs


def exists(target: str) -> bool:
    fs = _needs_filesystem(target)
    return fs.exists(target) if fs is not None else os.path.exists(target)


def read_text(target: str) -> Optional[str]:
    """The text of `target`, or None when it does not exist."""
    fs = _needs_filesystem(target)
    try:
        return fs.read_text(target) if fs is not None else open(target, encoding="utf-8").read()
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
    return exists(join(export_dir(point), BUNDLE_FILE))


# ---- The comparison table -------------------------------------------------------------------------------
def last_validation(model_dir: str) -> Optional[dict]:
    """The last `split == "validation"` record of the run's training log (None without one), read by
    `spectron_jax.metric_logs` (a local metrics.jsonl, or the pieces of a run on an object store; the
    table's callers import the package)."""
    if filesystem() is None:
        raise SweepError("reading a training log needs the spectron_jax package (pip install -e .)")
    from spectron_jax import metric_logs

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


def table_paths(sweep: Sweep, base_model_dir: str, suite: str) -> tuple[str, str]:
    folder = join(base_model_dir, sweep.name)
    return join(folder, f"eval_{suite}.md"), join(folder, f"eval_{suite}.json")


def write_table(sweep: Sweep, points: Sequence[Point], base_model_dir: str, suite: str) -> tuple[str, str]:
    """Writes eval_SUITE.md and eval_SUITE.json into the sweep folder; returns their paths."""
    if filesystem() is None:
        raise SweepError("writing the comparison table needs the spectron_jax package (pip install -e .)")
    import eval_table  # launch/, next to this file; imports the package

    entries = [point_entry(p, suite) for p in points]
    payload = eval_table.sweep_payload(sweep.name, suite, entries)
    markdown_path, json_path = table_paths(sweep, base_model_dir, suite)
    write_text(markdown_path, eval_table.sweep_markdown(payload))
    write_text(json_path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return markdown_path, json_path


def record_text(point: Point, sweep: Sweep, command: Sequence[str]) -> tuple[str, str]:
    """(path, text) of the point's sweep_point.json."""
    return join(point.model_dir, POINT_FILENAME), json.dumps(point.record(sweep, command), indent=2) + "\n"
