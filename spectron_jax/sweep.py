"""Expands a sweep file into training runs (the cartesian product of gin bindings) and launches them.

    python -m spectron_jax.sweep --sweep=gin/sweeps/tiny_lr_x_spec_weight.sweep --base_model_dir=runs/sweeps \\
        [--runner=local|tpu_vm|print] [--dry_run] [--only=NAME_OR_INDEX ...] [--gin_search_paths=DIRS] \\
        [--gin.NAME=VALUE ...]          (bindings added to every point, e.g. a data folder)

A sweep file (format: `spectron_jax.sweeps.sweep_file`; examples in gin/sweeps/) is gin syntax:
`base_gin_files = [...]`, an optional `gin_files = [...]` axis, and `NAME = VALUE` bindings where a list
value is an axis. Each point of the cartesian product runs

    python -m spectron_jax.train --gin_file=BASE... [--gin_file=AXIS_FILE] --gin.NAME=VALUE... \\
        --gin.MODEL_DIR="'BASE_MODEL_DIR/SWEEP_NAME/POINT_NAME'"

with POINT_NAME made from its swept values (e.g. `learning_rate=1e-4_spectrogram=0.5`: filesystem-safe,
unique, stable). When a point is run, its bindings are written to MODEL_DIR/sweep_point.json.

Evaluation (`spectron_jax.sweeps.sweep_eval`): with `--evaluate=SUITE --eval_data_dir=DIR
[--eval_limit=N] [--eval_arg=FLAG ...]`, each point that trains is then exported (MODEL_DIR/export) and
scored by `python -m spectron_jax.eval` (MODEL_DIR/eval/SUITE), and one comparison over the points is
written to BASE_MODEL_DIR/SWEEP_NAME/eval_SUITE.md and .json (`spectron_jax.sweeps.eval_table`).
`--mode=evaluate` does only that, over points trained before: a point is exported unless
MODEL_DIR/export/bundle.json exists (or always with --reexport), and an evaluation resumes the rows
already written unless the point was just exported. Evaluation runs on this machine (with --python)
whatever the runner; it reads gs:// folders through the package's file-system layer.

    python -m spectron_jax.sweep --sweep=tiny_ablations --base_model_dir=runs/sweeps --runner=local \
        --evaluate=continuation --eval_data_dir=data
    python -m spectron_jax.sweep --sweep=tiny_ablations --base_model_dir=runs/sweeps --mode=evaluate \
        --runner=local --evaluate=continuation --eval_data_dir=data --eval_limit=8

Runners: `local` runs the points one after another on this machine; `tpu_vm` runs
`launch/tpu_vm.sh train --wait ...` per point (its settings come from the environment: PROJECT, ZONE,
TPU_NAME, BUCKET, ...; the base model dir must be gs://); `print` (or --dry_run with any runner)
prints the commands and runs nothing. sweep_point.json and the table are written through
`spectron_jax.filesystem` (local or gs://).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Optional, Sequence

from spectron_jax import gin_config
from spectron_jax.sweeps import eval_table, sweep_eval
from spectron_jax.sweeps.sweep_file import (SWEEP_DIR, SWEEP_SUFFIX, Point, Sweep, SweepError, BINDING_NAME,
                                            check_value, expand, parse_sweep)

LAUNCH_DIR = gin_config.REPO_ROOT / "launch"  # the shell launchers (tpu_vm.sh for the tpu_vm runner)

# ---- Shell quoting (for printed commands) ----------------------------------------------------------
_BARE = re.compile(r"[A-Za-z0-9_./:=,+@%^-]+")
_FLAG = re.compile(r"(--?[A-Za-z0-9_.-]+=)(.+)", re.S)


def shell_quote(arg: str) -> str:
    """`arg` quoted for a POSIX shell, readably: --gin.MODEL_DIR="'dir'" rather than shlex's form."""
    if arg and _BARE.fullmatch(arg):
        return arg
    m = _FLAG.fullmatch(arg)
    if m:
        return m.group(1) + shell_quote(m.group(2))
    if not any(c in arg for c in "\"$`\\!"):
        return f'"{arg}"'
    return "'" + arg.replace("'", "'\\''") + "'"


def command_line(argv: Sequence[str]) -> str:
    return " ".join(shell_quote(a) for a in argv)


# ---- Running -----------------------------------------------------------------------------------------
def _write_record(point: Point, sweep: Sweep, command: Sequence[str], dry_run: bool) -> None:
    """Writes MODEL_DIR/sweep_point.json (a dry run writes nothing; it notes a gs:// upload)."""
    target, text = sweep_eval.record_text(point, sweep, command)
    if dry_run:
        if "://" in target:
            print(f"# writes {target}", flush=True)
        return
    sweep_eval.write_text(target, text)


def point_command(point: Point, sweep: Sweep, runner: str, python: str, gin_search_paths: str) -> list[str]:
    if runner == "tpu_vm":
        run_name = f"{sweep.name}.{point.name}"[:200]
        script = os.path.relpath(LAUNCH_DIR / "tpu_vm.sh")
        return ["bash", script, "train", "--wait", f"--run_name={run_name}",
                *point.train_args(gin_search_paths)]
    return [python, "-m", "spectron_jax.train", *point.train_args(gin_search_paths)]


def resolve_sweep_path(value: str) -> str:
    """The sweep file: as given, or a name under gin/sweeps/ (with or without the .sweep suffix)."""
    candidates = [value, str(SWEEP_DIR / value), str(SWEEP_DIR / (value + SWEEP_SUFFIX))]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate if candidate == value else os.path.relpath(candidate)
    raise SweepError(f"--sweep={value}: no such file (also looked in gin/sweeps/)", exit_code=2)


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2
            raise SweepError(f"spectron_jax.sweep: {message}", exit_code=2)

    p = Parser(prog="spectron_jax.sweep", description="Expand a sweep file into training runs and launch them.")
    p.add_argument("--sweep", required=True, help="sweep file, or its name under gin/sweeps/")
    p.add_argument("--base_model_dir", required=True,
                   help="each point's MODEL_DIR is BASE_MODEL_DIR/SWEEP_NAME/POINT_NAME (gs:// for tpu_vm)")
    p.add_argument("--runner", choices=("local", "tpu_vm", "print"), default="print",
                   help="local: run the points one after another here; tpu_vm: launch/tpu_vm.sh train "
                        "--wait per point; print: print the commands (default)")
    p.add_argument("--dry_run", action="store_true", help="print the commands and run nothing")
    p.add_argument("--only", action="append", default=[], metavar="NAME_OR_INDEX",
                   help="run only these points (repeatable)")
    p.add_argument("--gin_search_paths", default="", help="passed to the training entry point")
    p.add_argument("--python", default=sys.executable, help="interpreter of the local runner")
    p.add_argument("--keep_going", action="store_true", help="local/tpu_vm: go on after a failed point")
    p.add_argument("--mode", choices=("train", "evaluate"), default="train",
                   help="train: train the points (and evaluate them with --evaluate); evaluate: only "
                        "export and evaluate points trained before")
    p.add_argument("--evaluate", choices=sweep_eval.SUITES, default=None,
                   help="after training, export each point and run this spectron_jax.eval suite on it")
    p.add_argument("--eval_data_dir", default=None, help="the suite's --data_dir (e.g. data)")
    p.add_argument("--eval_limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--eval_arg", action="append", default=[], metavar="FLAG",
                   help="a further spectron_jax.eval flag, e.g. --eval_arg=--asr=none (repeatable)")
    p.add_argument("--reexport", action="store_true", help="evaluate mode: export even where an export exists")
    return p


def split_extra_bindings(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Separates `--gin.NAME=VALUE` flags (bindings added to every point) from the other arguments."""
    extra, rest = [], []
    for arg in argv:
        if not arg.startswith("--gin."):
            rest.append(arg)
            continue
        name, sep, value = arg[len("--gin."):].partition("=")
        if not sep or not BINDING_NAME.fullmatch(name) or not value.strip():
            raise SweepError(f"{arg}: expected --gin.NAME=VALUE", exit_code=2)
        if name == "MODEL_DIR":
            raise SweepError(f"{arg}: MODEL_DIR is set per point; use --base_model_dir", exit_code=2)
        check_value(value.strip(), arg)
        extra.append((name, value.strip()))
    return extra, rest


def main(argv: Optional[Sequence[str]] = None) -> int:
    extra, rest = split_extra_bindings(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(rest)
    base = args.base_model_dir
    if not base or any(c in base for c in "'\"\\\n"):
        raise SweepError(f"--base_model_dir={base!r}: give a path without quotes or backslashes", exit_code=2)
    if args.runner == "tpu_vm" and not base.startswith("gs://"):
        raise SweepError(f"--base_model_dir={base}: the tpu_vm runner needs a gs:// path", exit_code=2)
    search_paths = [p.strip() for p in args.gin_search_paths.split(",") if p.strip()]
    sweep = parse_sweep(resolve_sweep_path(args.sweep), search_paths)
    points = expand(sweep, base, extra)
    if args.only:
        wanted = set(args.only)
        unknown = wanted - {p.name for p in points} - {str(p.index) for p in points}
        if unknown:
            raise SweepError(f"--only={sorted(unknown)[0]}: not a point of {sweep.path} "
                             f"(points: {', '.join(p.name for p in points)})", exit_code=2)
        points = [p for p in points if p.name in wanted or str(p.index) in wanted]
    if args.mode == "evaluate" and not args.evaluate:
        raise SweepError("--mode=evaluate needs --evaluate=SUITE", exit_code=2)
    if args.evaluate and not args.eval_data_dir:
        raise SweepError(f"--evaluate={args.evaluate} needs --eval_data_dir", exit_code=2)
    if args.eval_limit is not None and args.eval_limit < 1:
        raise SweepError(f"--eval_limit={args.eval_limit}: must be at least 1", exit_code=2)
    for flag in args.eval_arg:
        if not flag.startswith("--"):
            raise SweepError(f"--eval_arg={flag}: expected a flag of spectron_jax.eval (--name=value)", exit_code=2)
    dry_run = args.dry_run or args.runner == "print"
    runner = "local" if args.runner == "print" else args.runner
    print(f"# sweep {sweep.name}: {len(points)} point(s) from {sweep.path}", flush=True)
    failures = []

    def attempt(point: Point, command: list[str], what: str) -> bool:
        """Runs `command` (prints it first); False when it fails and --keep_going allows going on."""
        print(command_line(command), flush=True)
        if dry_run:
            return True
        try:
            result = subprocess.run(command)  # in the caller's folder, like the printed command
        except OSError as e:
            raise SweepError(f"cannot run {command[0]}: {e}") from None
        if not result.returncode:
            return True
        failures.append(point.name)
        print(f"# [{point.index}] {point.name}: {what} failed with exit code {result.returncode}", flush=True)
        if not args.keep_going:
            raise SweepError(f"point {point.name}: {what} failed with exit code {result.returncode}; "
                             "stopping (use --keep_going to continue)", exit_code=max(result.returncode, 1))
        return False

    for point in points:
        print(f"# [{point.index}] {point.name}", flush=True)
        fresh = True
        if args.mode == "train":
            command = point_command(point, sweep, runner, args.python, args.gin_search_paths)
            _write_record(point, sweep, command, dry_run)
            if not attempt(point, command, "training"):
                continue
        elif not args.reexport and not dry_run and sweep_eval.has_export(point):
            fresh = False
            print(f"# {sweep_eval.export_dir(point)} holds an export; evaluating it (--reexport to export again)",
                  flush=True)
        if not args.evaluate:
            continue
        if fresh and not attempt(point, sweep_eval.export_command(point, args.python), "export"):
            continue
        attempt(point, sweep_eval.eval_command(point, args.python, args.evaluate, args.eval_data_dir,
                                               args.eval_limit, args.eval_arg, fresh), "evaluation")
    if args.evaluate:
        sweep_dir = sweep_eval.join(base, sweep.name)
        markdown_path, json_path = eval_table.table_paths(sweep_dir, args.evaluate)
        if not dry_run:
            eval_table.write_table(sweep.name, sweep_dir, points, args.evaluate)
        print(f"# table: {markdown_path} and {json_path}", flush=True)
    if failures:
        raise SweepError(f"{len(failures)} point(s) failed: {', '.join(failures)}")
    return 0


def run(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return main(argv)
    except SweepError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: sweep interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
