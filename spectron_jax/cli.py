"""Shared command-line plumbing: one-line errors and non-zero exits for every entry point.

Every `python -m spectron_jax.<tool>` entry point is written as

    def main(argv: list[str] | None = None) -> int: ...
    if __name__ == "__main__":
        cli.run(main)

and reports bad flags or bad input by raising `cli.UsageError` (exit 2) or `cli.InputError` (exit 1)
with a message that names the flag or file and what is wrong. `run` prints that message as one line on
stderr, with no traceback, and exits with the error's code. Argument parsing goes through
`ArgumentParser`, whose errors are raised as `UsageError` rather than printed as a usage block.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence


class CLIError(Exception):
    """An error meant for the person at the terminal: printed as one line, no traceback."""

    exit_code = 1


class UsageError(CLIError):
    """A missing, unknown or malformed flag."""

    exit_code = 2


class InputError(CLIError):
    """An input file, folder or value that cannot be used as given."""

    exit_code = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Runs `main(argv)` and exits: 0 on success, the error's code with a one-line message on failure."""
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv else "spectron_jax"
    try:
        code = main(argv)
    except CLIError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"error: {prog} interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))
