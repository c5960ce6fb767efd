"""Puts several evaluation reports of one suite side by side: one markdown table (e.g. a sweep's points).

    python launch/eval_table.py --eval=paper=runs/eval/paper --eval=no_text_ce=runs/eval/no_text_ce \\
        [--output=docs/experiments/ablations_table.md]

Each `--eval=NAME=DIR` names a folder written by `python -m spectron_jax.eval` (its metrics.json); the
table has a row per name, in the order given, and the paper's values as its first row where it reports
one. Prints the table, and writes it to --output when given.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from etils import epath  # noqa: E402

from spectron_jax import cli  # noqa: E402
from spectron_jax.evaluation import report  # noqa: E402


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="eval_table", description="Compare evaluation reports.")
    parser.add_argument("--eval", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
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
