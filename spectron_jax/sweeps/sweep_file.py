"""The sweep file format: parsing, the cartesian product of its axes, and the points' run names.

A sweep file uses gin's own syntax, one statement per line (a statement may continue over several lines
while a bracket is open; `#` starts a comment):

    sweep_name = 'tiny_lr_x_spec_weight'            # optional; default: the file's name without suffix
    base_gin_files = ['runs/tiny_cpu.gin']          # gin files of every point, in order (required)
    gin_files = ['objectives/paper.gin', 'objectives/no_text_ce.gin']   # optional: an axis of gin files
    TRAIN_STEPS = 200                               # a fixed binding, passed to every point
    MeshConfig.ici = (1, -1, 1)                     # a tuple is a value too: fixed
    OptimizerConfig.learning_rate = [1e-4, 3e-4, 1e-3]  # a LIST is an axis: one point per element
    LossWeights.spectrogram = [0.5, 1.0]
    SpecAugmentConfig.time_masks = [[2, 10]]        # a list value, fixed: a one-element list of it

`base_gin_files`, `gin_files` and `sweep_name` are the only reserved names; any other `NAME = VALUE` is a
gin binding (a macro or `Configurable.parameter`) handed to the training entry point as
`--gin.NAME=VALUE`, with VALUE's text kept exactly as written. Points are the cartesian product of the
axes in file order (`gin_files` first, then the bindings; the last axis varies fastest).

A point's name joins `key=value` for every axis (the key is the parameter's last dotted part, or the
full name when two axes share it; a gin-file axis contributes the file's stem): e.g.
`learning_rate=1e-4_spectrogram=0.5`. It uses only the characters [A-Za-z0-9._=+-]; when cleaning a
value loses information (or the name would be longer than MAX_NAME_CHARS) a short hash of the point's
swept values is appended, so names are filesystem-safe, unique within the sweep and the same every
time the sweep is expanded. Its MODEL_DIR is BASE_MODEL_DIR/SWEEP_NAME/NAME.

Values are checked with gin's own parser; gin files are looked up as the training entry point does.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import re
from typing import Optional, Sequence

import gin.config
import gin.config_parser

from spectron_jax import gin_config

SWEEP_DIR = gin_config.GIN_DIR / "sweeps"
SWEEP_SUFFIX = ".sweep"
POINT_FILENAME = "sweep_point.json"
MAX_NAME_CHARS = 120
SAFE_NAME = re.compile(r"[A-Za-z0-9._=+-]+")
BINDING_NAME = re.compile(r"[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*")  # gin: macro, Configurable.param, scope/...
_OPEN, _CLOSE = "([{", ")]}"


class SweepError(Exception):
    """A problem with the command line or the sweep file; printed as one line."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ---- Parsing ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Statement:
    """One `NAME = VALUE` statement of a sweep file; `line` is where it starts (1-based)."""

    name: str
    value: str
    line: int


def _scan(text: str) -> tuple[list[tuple[int, str]], str | None]:
    """The characters of `text` outside string literals, as (index, character), and the quote of a
    string left open at its end (None when every string is closed; a backslash escapes in strings)."""
    code: list[tuple[int, str]] = []
    quote, i = None, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        else:
            code.append((i, c))
        i += 1
    return code, quote


def _strip_comment(text: str) -> str:
    """`text` without a trailing `# comment` (a `#` inside a string literal is kept)."""
    for i, c in _scan(text)[0]:
        if c == "#":
            return text[:i]
    return text


def _depth_change(text: str, where: str) -> int:
    """Net number of brackets `text` opens (strings skipped); raises on an unterminated string."""
    code, quote = _scan(text)
    if quote:
        raise SweepError(f"{where}: unterminated string")
    return sum(1 if c in _OPEN else -1 if c in _CLOSE else 0 for _, c in code)


def read_statements(path: str) -> list[Statement]:
    """Splits a sweep file into statements (joining lines while a bracket is open)."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"--sweep={path}: cannot read the file ({e.__class__.__name__}: {e})")
    statements: list[Statement] = []
    pending, start, depth = "", 0, 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line and not pending:
            continue
        if not pending:
            start = number
        where = f"{path}:{start}"
        pending = f"{pending} {line}".strip()
        depth += _depth_change(line, where)
        if depth < 0:
            raise SweepError(f"{where}: a closing bracket without an opening one")
        if depth == 0:
            statements.append(_split_statement(pending, path, start))
            pending, start = "", 0
    if pending:
        raise SweepError(f"{path}:{start}: a bracket opened here is never closed")
    return statements


def _split_statement(text: str, path: str, line: int) -> Statement:
    where = f"{path}:{line}"
    if "=" not in text:
        raise SweepError(f"{where}: expected NAME = VALUE, got {text!r}")
    name, value = (part.strip() for part in text.split("=", 1))
    if not BINDING_NAME.fullmatch(name):
        raise SweepError(f"{where}: {name!r} is not a gin binding name (macro or Configurable.parameter)")
    if not value:
        raise SweepError(f"{where}: {name} has no value")
    return Statement(name, value, line)


def split_top_level(text: str) -> list[str]:
    """The comma-separated items of `text` (no outer brackets), each stripped; commas inside brackets
    or strings do not split. A trailing comma is allowed."""
    items, depth, quote, current = [], 0, None, []
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            current.append(c)
            if c == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
            current.append(c)
        elif c in _OPEN:
            depth += 1
            current.append(c)
        elif c in _CLOSE:
            depth -= 1
            current.append(c)
        elif c == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(c)
        i += 1
    last = "".join(current).strip()
    if last:
        items.append(last)
    return items


def _is_list(value: str) -> bool:
    """True for a list literal `[...]` whose outer brackets match each other."""
    if not (value.startswith("[") and value.endswith("]")):
        return False
    depth = 0
    for i, c in enumerate(value):  # the first '[' must close at the very end
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0 and i != len(value) - 1:
                return False
    return True


def check_value(value: str, where: str) -> None:
    """Raises SweepError unless gin's parser accepts `value` as a binding's value (a Python literal,
    `@ref`, `@ref()`, `%macro`, ...)."""
    try:
        parser = gin.config_parser.ConfigParser(f"x = {value}\n", gin.config.ParserDelegate(skip_unknown=True))
        for _ in parser:
            pass
    except Exception as e:  # noqa: BLE001 - gin raises SyntaxError / ValueError / ...
        detail = re.sub(r"\s*\(line \d+\)", "", " ".join(str(e).split()).split(" In file")[0])
        raise SweepError(f"{where}: {value!r} is not a gin value ({detail})") from None


# ---- The sweep ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Axis:
    """One swept quantity: a binding name (or `gin_files`) and its values, as written."""

    name: str
    values: tuple[str, ...]
    line: int


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parsed sweep file.

    Attributes:
      path: the file.
      name: the sweep's name (a folder under the base model dir).
      base_gin_files: gin files of every point.
      statements: every binding in file order: (name, fixed value text) or (name, Axis).
      axes: the swept quantities in product order (`gin_files` first when present).
    """

    path: str
    name: str
    base_gin_files: tuple[str, ...]
    statements: tuple[tuple[str, object], ...]
    axes: tuple[Axis, ...]


def _string_list(statement: Statement, path: str, allow_single: bool) -> tuple[str, ...]:
    where = f"{path}:{statement.line}"
    try:
        value = ast.literal_eval(statement.value)
    except (ValueError, SyntaxError):
        value = None
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise SweepError(f"{where}: {statement.name} must be a non-empty list of quoted file names, "
                         f"got {statement.value}")
    return tuple(value)


def _check_gin_file(name: str, where: str, search_paths: Sequence[str]) -> None:
    """Raises unless `name` is found the way the training entry point looks gin files up."""
    roots = ["", *search_paths, str(gin_config.REPO_ROOT), str(gin_config.GIN_DIR)]
    if not any(os.path.isfile(os.path.join(root, name)) for root in roots):
        raise SweepError(f"{where}: gin file {name} not found (looked in the working directory, "
                         "--gin_search_paths, the repository root and gin/)")


def parse_sweep(path: str, search_paths: Sequence[str] = ()) -> Sweep:
    """Reads and checks a sweep file; every error names the file and line.

    `search_paths`: extra folders the gin files may be in (as --gin_search_paths).
    """
    statements = read_statements(path)
    name = pathlib.Path(path).name
    name = name[: -len(SWEEP_SUFFIX)] if name.endswith(SWEEP_SUFFIX) else pathlib.Path(path).stem
    base_files: Optional[tuple[str, ...]] = None
    file_axis: Optional[Axis] = None
    bindings: list[tuple[str, object]] = []
    binding_axes: list[Axis] = []
    seen: dict[str, int] = {}
    for st in statements:
        where = f"{path}:{st.line}"
        if st.name in seen:
            raise SweepError(f"{where}: {st.name} is set twice (first on line {seen[st.name]})")
        seen[st.name] = st.line
        if st.name == "sweep_name":
            try:
                name = ast.literal_eval(st.value)
            except (ValueError, SyntaxError):
                name = None
            if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
                raise SweepError(f"{where}: sweep_name must be a quoted name of letters, digits and . _ = + -")
        elif st.name == "base_gin_files":
            base_files = _string_list(st, path, allow_single=True)
            for f in base_files:
                _check_gin_file(f, where, search_paths)
        elif st.name == "gin_files":
            files = _string_list(st, path, allow_single=True)
            for f in files:
                _check_gin_file(f, where, search_paths)
            if len(set(files)) != len(files):
                raise SweepError(f"{where}: gin_files lists a file twice")
            file_axis = Axis("gin_files", files, st.line)
        elif _is_list(st.value):
            values = tuple(split_top_level(st.value[1:-1]))
            if not values:
                raise SweepError(f"{where}: {st.name} = [] sweeps over nothing")
            for v in values:
                check_value(v, where)
            if len(set(values)) != len(values):
                raise SweepError(f"{where}: {st.name} lists a value twice")
            axis = Axis(st.name, values, st.line)
            bindings.append((st.name, axis))
            binding_axes.append(axis)
        else:
            check_value(st.value, where)
            bindings.append((st.name, st.value))
        if st.name == "MODEL_DIR":
            raise SweepError(f"{where}: MODEL_DIR is set per point from --base_model_dir; remove it")
    if base_files is None:
        raise SweepError(f"{path}: base_gin_files is missing (e.g. base_gin_files = ['runs/tiny_cpu.gin'])")
    axes = ((file_axis,) if file_axis else ()) + tuple(binding_axes)
    return Sweep(path, name, base_files, tuple(bindings), axes)


# ---- Points ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep.

    Attributes:
      index: position in the expansion (0-based).
      name: the run's folder name under BASE_MODEL_DIR/SWEEP_NAME.
      gin_files: base files, then the file of the `gin_files` axis (if any).
      bindings: (name, value text) for every binding, in file order, fixed and swept.
      swept: {axis name: value text} of this point.
      model_dir: BASE_MODEL_DIR/SWEEP_NAME/NAME.
    """

    index: int
    name: str
    gin_files: tuple[str, ...]
    bindings: tuple[tuple[str, str], ...]
    swept: dict
    model_dir: str

    def train_args(self, gin_search_paths: str = "") -> list[str]:
        """Arguments of `python -m spectron_jax.train` for this point (MODEL_DIR last, so it wins)."""
        args = [f"--gin_file={f}" for f in self.gin_files]
        if gin_search_paths:
            args.append(f"--gin_search_paths={gin_search_paths}")
        args += [f"--gin.{k}={v}" for k, v in self.bindings]
        args.append(f"--gin.MODEL_DIR='{self.model_dir}'")
        return args

    def record(self, sweep: Sweep, command: Sequence[str]) -> dict:
        """What sweep_point.json holds."""
        return {"sweep": sweep.name, "sweep_file": sweep.path, "index": self.index, "name": self.name,
                "model_dir": self.model_dir, "gin_files": list(self.gin_files),
                "bindings": dict(self.bindings), "swept": dict(self.swept), "command": list(command)}


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_.") or "x"


def _value_label(value: str) -> tuple[str, bool]:
    """A filesystem-safe label of a value text and whether it is exact (the value is recoverable)."""
    try:
        literal = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        literal = None
    if isinstance(literal, str):
        label = _clean(literal)
        return label, label == literal
    label = _clean(value)
    return label, label == value


def _axis_keys(axes: Sequence[Axis]) -> dict[str, str]:
    """Short keys for the axes: the last dotted part of each name unless two axes share it."""
    short = {a.name: a.name.rsplit("/", 1)[-1].rsplit(".", 1)[-1] for a in axes}
    counts: dict[str, int] = {}
    for key in short.values():
        counts[key] = counts.get(key, 0) + 1
    return {name: (key if counts[key] == 1 else _clean(name)) for name, key in short.items()}


def _digest(pairs: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(list(pairs)).encode("utf-8")).hexdigest()[:8]


def expand(sweep: Sweep, base_model_dir: str, extra_bindings: Sequence[tuple[str, str]] = ()) -> list[Point]:
    """The points of `sweep`: the cartesian product of its axes, last axis fastest.

    `extra_bindings` ((name, value text), e.g. from the command line) are added to every point after
    the sweep's own bindings; they do not enter the point names.
    """
    base = base_model_dir.rstrip("/") or base_model_dir
    keys = _axis_keys(sweep.axes)
    points = []
    for index, combo in enumerate(itertools.product(*(a.values for a in sweep.axes))):
        swept = {a.name: v for a, v in zip(sweep.axes, combo)}
        parts, exact = [], True
        for axis, value in zip(sweep.axes, combo):
            if axis.name == "gin_files":
                parts.append(_clean(pathlib.PurePosixPath(value).name.removesuffix(".gin")))
                continue
            label, is_exact = _value_label(value)
            exact &= is_exact
            parts.append(f"{keys[axis.name]}={label}")
        name = "_".join(parts) or "base"
        if not exact or len(name) > MAX_NAME_CHARS:
            name = f"{name[:MAX_NAME_CHARS]}-{_digest(sorted(swept.items()))}"
        if name[0] in "-.":
            name = "p" + name
        files = sweep.base_gin_files + ((swept["gin_files"],) if "gin_files" in swept else ())
        bindings = tuple((k, swept[k] if isinstance(v, Axis) else v) for k, v in sweep.statements)
        bindings += tuple(extra_bindings)
        points.append(Point(index, name, files, bindings, swept, ""))
    # Two points whose names collide (e.g. gin files with the same stem) get the hash as well.
    counts: dict[str, int] = {}
    for p in points:
        counts[p.name] = counts.get(p.name, 0) + 1
    final = []
    for p in points:
        name = p.name if counts[p.name] == 1 else f"{p.name[:MAX_NAME_CHARS]}-{_digest(sorted(p.swept.items()))}"
        final.append(dataclasses.replace(p, name=name, model_dir=f"{base}/{sweep.name}/{name}"))
    if len({p.name for p in final}) != len(final):
        raise SweepError(f"{sweep.path}: two points of the sweep would share a MODEL_DIR")
    return final
