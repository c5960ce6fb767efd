"""The comparison table of evaluation reports of one suite: a sweep's points side by side, or any named
reports.

    python -m spectron_jax.sweeps.eval_table --eval=paper=runs/eval/paper --eval=no_text_ce=runs/eval/no_text_ce \\
        [--output=docs/experiments/ablations_table.md]
    python -m spectron_jax.sweeps.eval_table --sweep_dir=runs/sweeps/tiny_ablations --suite=continuation

Each `--eval=NAME=DIR` names a folder written by `python -m spectron_jax.eval` (its metrics.json); the
table has a row per name, in the order given, and the paper's values as its first row where it reports
one. Prints the table, and writes it to --output when given.

`--sweep_dir` reads a sweep folder instead (`python -m spectron_jax.sweep`: one sub-folder per point
holding sweep_point.json, its report in POINT/eval/SUITE/ and its training log in POINT/metrics.jsonl)
and writes SWEEP_DIR/eval_SUITE.md and .json (`sweep_markdown`, `sweep_payload`): a row per figure, a
column per point, the paper's value beside them, and the validation losses of each point's last
training evaluation; `python -m spectron_jax.sweep --evaluate=SUITE` writes the same files after
evaluating (`write_table`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from etils import epath

from spectron_jax import cli, filesystem
from spectron_jax.evaluation import evidence, report
from spectron_jax.sweeps import sweep_eval
from spectron_jax.sweeps.sweep_file import Point, SweepError

# Validation losses (MODEL_DIR/metrics.jsonl, teacher-forced on the validation split) shown per point.
# Every term is logged whatever its weight, so points trained without a term are still measured on it.
VALIDATION_FIGURES = (
    ("ce_text", "validation text CE (transcript, teacher-forced) ↓"),
    ("spec_frames", "validation spectrogram L1+L2 (frames, teacher-forced) ↓"),
    ("spec_freq_delta", "validation L1+L2 of the frequency deltas ↓"),
    ("spec_time_delta", "validation L1+L2 of the time deltas (sum over orders) ↓"),
)


def _format(value: Any) -> str:
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:.1f}"
    return report._format(value)


def sweep_payload(sweep: str, suite: str, entries: Sequence[Mapping[str, Any]]) -> dict:
    """The table's data: per point its swept values, folders, figures and validation losses.

    Args:
      sweep: the sweep's name.
      suite: the evaluation suite (a key of `report.PAPER`).
      entries: per point, in order, {name, index, swept, model_dir, export_dir, eval_dir, evaluation (a
        metrics.json payload or None), validation (the last validation record or None)}.
    """
    if suite not in report.PAPER:
        raise ValueError(f"unknown suite {suite!r} (one of {', '.join(report.PAPER)})")
    points = []
    for entry in entries:
        evaluation = entry.get("evaluation")
        if evaluation is not None and evaluation.get("suite") != suite:
            raise ValueError(f"{entry['eval_dir']}: a {evaluation.get('suite')} report, expected {suite}")
        validation = entry.get("validation") or {}
        points.append({
            "name": entry["name"], "index": entry.get("index"), "swept": dict(entry.get("swept") or {}),
            "model_dir": entry.get("model_dir"), "export_dir": entry.get("export_dir"),
            "eval_dir": entry.get("eval_dir"),
            "metrics": None if evaluation is None else dict(evaluation.get("metrics") or {}),
            "intervals": None if evaluation is None else dict(evaluation.get("intervals") or {}),
            "skipped": None if evaluation is None else (evaluation.get("skipped") or {}).get("count", 0),
            "scorers": None if evaluation is None else dict(evaluation.get("scorers") or {}),
            "settings": None if evaluation is None else dict(evaluation.get("settings") or {}),
            "validation_step": validation.get("step"),
            "validation": {k: validation[k] for k, _ in VALIDATION_FIGURES if k in validation},
        })
    figures = [(key, label) for key, label, _, _ in report.PAPER[suite]
               if any(p["metrics"] and key in p["metrics"] for p in points)]
    paper = {key: value for key, _, value, _ in report.PAPER[suite] if value is not None}
    return {"sweep": sweep, "suite": suite, "figures": figures, "validation_figures": list(VALIDATION_FIGURES),
            "paper": paper, "points": points}


def sweep_markdown(payload: Mapping[str, Any]) -> str:
    """`sweep_payload` as markdown: a row per figure, a column per point (n/a: not measured); each cell
    with its 95 % interval, the best point and those whose interval overlaps it marked
    (`evidence.comparison_cells`)."""
    points = payload["points"]
    names = [p["name"] for p in points]
    lines = [f"# Sweep {payload['sweep']}: {payload['suite']}", "",
             "| figure | the paper's Spectron | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |",
             "| examples scored (skipped) | – | " + " | ".join(
                 "not evaluated" if p["metrics"] is None else
                 f"{p['metrics'].get('num_examples', 0)} ({p['skipped']})" for p in points) + " |"]
    for key, label in payload["figures"]:
        theirs = f"{payload['paper'][key]} (the paper's)" if key in payload["paper"] else "–"
        cells = evidence.comparison_cells([p["metrics"] for p in points], [p.get("intervals") for p in points],
                                          key, evidence.direction(label), _format)
        lines.append(f"| {label} | {theirs} | " + " | ".join(cells) + " |")
    steps = sorted({p["validation_step"] for p in points if p["validation_step"] is not None})
    if steps:
        lines.append("| validation step | – | " + " | ".join(
            _format(p["validation_step"]) for p in points) + " |")
        for key, label in payload["validation_figures"]:
            lines.append(f"| {label} | – | " + " | ".join(_format(p["validation"].get(key)) for p in points) + " |")
    lines += ["", "Points:", ""]
    for p in points:
        swept = ", ".join(f"{k}={v}" for k, v in p["swept"].items()) or "no swept values"
        lines.append(f"- `{p['name']}`: {swept}; report {p['eval_dir']}")
    scorers = {json.dumps(p["scorers"], sort_keys=True) for p in points if p["scorers"] is not None}
    if scorers:
        lines += ["", "Scorers:", ""]
        if len(scorers) == 1:
            lines += [f"- {kind}: {name}" for kind, name in json.loads(scorers.pop()).items()] or ["- none"]
        else:
            lines += [f"- `{p['name']}`: " + "; ".join(f"{k}: {v}" for k, v in p["scorers"].items())
                      for p in points if p["scorers"] is not None]
    lines += ["", evidence.COMPARISON_NOTE,
              "", "The paper's column was measured with the paper's scorers and models; compare the points "
              "with each other, and with the paper's column in kind only."]
    return "\n".join(lines) + "\n"


def table_paths(sweep_dir: str, suite: str) -> tuple[str, str]:
    """The table's files in a sweep folder (BASE_MODEL_DIR/SWEEP_NAME): eval_SUITE.md and eval_SUITE.json."""
    return sweep_eval.join(sweep_dir, f"eval_{suite}.md"), sweep_eval.join(sweep_dir, f"eval_{suite}.json")


def write_table(sweep_name: str, sweep_dir: str, points: Sequence[Point], suite: str) -> str:
    """Writes eval_SUITE.md and eval_SUITE.json into `sweep_dir` from what each point holds; returns the
    markdown."""
    payload = sweep_payload(sweep_name, suite, [sweep_eval.point_entry(p, suite) for p in points])
    markdown_path, json_path = table_paths(sweep_dir, suite)
    text = sweep_markdown(payload)
    sweep_eval.write_text(markdown_path, text)
    sweep_eval.write_text(json_path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return text


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="spectron_jax.sweeps.eval_table", description="Compare evaluation reports.")
    parser.add_argument("--eval", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--sweep_dir", default=None, help="a sweep folder (BASE_MODEL_DIR/SWEEP_NAME)")
    parser.add_argument("--suite", default="continuation", choices=tuple(report.PAPER),
                        help="with --sweep_dir: the suite whose reports are compared")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if bool(args.eval) == bool(args.sweep_dir):
        raise cli.UsageError("give either --eval=NAME=DIR (repeatable) or --sweep_dir=DIR")
    if args.sweep_dir:
        try:
            points = sweep_eval.recorded_points(args.sweep_dir)
            table = write_table(filesystem.path(args.sweep_dir).name, args.sweep_dir, points, args.suite)
        except (ValueError, SweepError) as e:
            raise cli.InputError(str(e)) from None
    else:
        entries = {}
        for item in args.eval:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise cli.UsageError(f"--eval={item}: expected NAME=DIR")
            path = epath.Path(folder) / "metrics.json"
            if not path.exists():
                raise cli.InputError(f"--eval={item}: {path} not found (run spectron_jax.eval into it first)")
            try:
                entries[name] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise cli.InputError(f"{path}: not JSON ({e.msg})") from None
        try:
            table = report.comparison_markdown(entries)
        except ValueError as e:
            raise cli.InputError(str(e)) from None
    if args.output:
        out = epath.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    cli.run(main)
