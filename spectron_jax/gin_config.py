"""gin plumbing for the entry points: registered configurables, the t5x-style flags, operative config.

Library code never reads gin; entry points do, through this module:

    parser = cli.ArgumentParser(prog="spectron_jax.summary")
    gin_config.add_gin_flags(parser)
    args = gin_config.parse_args(parser, argv)     # splits off --gin.NAME=VALUE, then argparse
    gin_config.parse_gin(args)                      # files, then bindings; errors -> cli.UsageError
    config = gin_config.configured("SpectronConfig")

Flags (as in t5x):
  --gin_file=PATH          repeatable; later files override earlier ones.
  --gin.NAME=VALUE         any number; each becomes the binding `NAME = VALUE` (parsed after the files).
  --gin_search_paths=A,B   extra folders to look files up in. The repository root and its `gin/` folder
                           are always searched, so `--gin_file=gin/models/tiny.gin` and
                           `--gin_file=models/tiny.gin` both work, from any working directory.
  Files, search paths and `include`d files may be on an object store (`gs://bucket/run.gin`), read
  through `spectron_jax.filesystem`.

Configurables are registered under their short class names (`SpectronConfig`, `ConformerConfig`, ...), so
gin files read `SpectronConfig.encoder = @ConformerConfig()`. The logical-axis rules are gin constants:
`%DEFAULT_RULES` (also `%partitioning.DEFAULT_RULES`) and `%MESH_AXES`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import re
import tokenize
from typing import Any, Callable, Iterator, Optional, Sequence

import gin

from spectron_jax import cli, filesystem

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
GIN_DIR = REPO_ROOT / "gin"
CONFIG_FILENAME = "config.gin"

_BINDING_FLAG = "--gin."
_REGISTERED: dict[str, Callable[..., Any]] = {}
_REQUIRED_ERROR = re.compile(r"set to `%gin\.REQUIRED` but not subsequently overridden")


# ---- Registration ----------------------------------------------------------------------------------
def _configurable_classes() -> dict[str, Any]:
    """{short name: class or function} of everything gin files may construct."""
    from spectron_jax import losses, partitioning
    from spectron_jax.data import augment, converter, features, preprocessors, tasks
    from spectron_jax.models import acoustic, conformer, decoder, spectron

    return {
        "ConformerConfig": conformer.ConformerConfig,
        "DecoderConfig": decoder.DecoderConfig,
        "AcousticConfig": acoustic.AcousticConfig,
        "LossWeights": losses.LossWeights,
        "PretrainedInit": spectron.PretrainedInit,
        "SpectronConfig": spectron.SpectronConfig,
        "MeshConfig": partitioning.MeshConfig,
        "TaskConfig": tasks.TaskConfig,
        "SpecAugmentConfig": preprocessors.SpecAugmentConfig,
        "UtteranceAugmentConfig": augment.UtteranceAugmentConfig,
        "FeatureSpec": features.FeatureSpec,
        "SpectronFeatureConverter": converter.SpectronFeatureConverter,
    }


def _constants() -> dict[str, Any]:
    from spectron_jax import partitioning

    return {
        "partitioning.DEFAULT_RULES": partitioning.DEFAULT_RULES,
        "partitioning.MESH_AXES": partitioning.MESH_AXES,
    }


def register_configurables() -> dict[str, Callable[..., Any]]:
    """Registers the config classes and constants with gin; safe to call any number of times.

    Returns:
      {short name: gin-wrapped constructor}; calling a wrapper applies the parsed bindings and returns an
      instance of the original class.
    """
    for name, cls in _configurable_classes().items():
        if name in _REGISTERED:
            continue
        try:
            _REGISTERED[name] = gin.external_configurable(cls, name=name, module="spectron_jax")
        except ValueError:
            # Already registered by an earlier import of this module (e.g. after a reload): reuse it.
            _REGISTERED[name] = gin.get_configurable(f"spectron_jax.{name}")
    for name, value in _constants().items():
        try:
            gin.constant(name, value)
        except ValueError:
            pass  # already defined
    return dict(_REGISTERED)


def configured(name_or_cls: Any, **overrides: Any) -> Any:
    """Builds the configurable `name_or_cls` (short name or class) with the parsed gin bindings applied.

    Keyword `overrides` win over gin bindings.
    """
    registry = register_configurables()
    name = name_or_cls if isinstance(name_or_cls, str) else getattr(name_or_cls, "__name__", "")
    if name not in registry:
        raise KeyError(f"{name_or_cls!r} is not a registered configurable (known: {sorted(registry)})")
    return registry[name](**overrides)


_NO_DEFAULT = object()


def query_macro(name: str, default: Any = _NO_DEFAULT) -> Any:
    """The value bound to the gin macro `name` (`NAME = value` in a file or `--gin.NAME=value`).

    A macro bound to a reference (`@X()`) is evaluated. Raises `cli.UsageError` when the macro is unset
    and no default is given.
    """
    try:
        value = gin.query_parameter(f"{name}/gin.macro.value")
    except ValueError:
        if default is _NO_DEFAULT:
            raise cli.UsageError(f"gin macro {name} is not set (add --gin.{name}=VALUE or bind it in a gin file)")
        return default
    if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
        return value.scoped_configurable_fn()
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn
    if value is gin.REQUIRED:
        raise cli.UsageError(f"gin macro {name} is %gin.REQUIRED: set it with --gin.{name}=VALUE")
    return value


# ---- Command line --------------------------------------------------------------------------------
def add_gin_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds --gin_file (repeatable) and --gin_search_paths; --gin.NAME=VALUE is split off by `parse_args`."""
    parser.add_argument("--gin_file", action="append", default=None, metavar="PATH",
                        help="gin config file; repeatable, later files win. Looked up in the working "
                             "directory, --gin_search_paths, the repository root and its gin/ folder.")
    parser.add_argument("--gin_search_paths", default="", metavar="DIR[,DIR...]",
                        help="comma-separated folders to search for gin files (and their includes).")
    parser.epilog = ((parser.epilog + " ") if parser.epilog else "") + (
        "Any number of --gin.NAME=VALUE flags bind gin parameters or macros after the files are read.")
    return parser


def split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--gin.NAME=VALUE` (or `--gin.NAME VALUE`) flags from the other arguments.

    Returns:
      (bindings, rest): bindings as gin strings `NAME = VALUE`, in command-line order; rest is what
      argparse should see.
    """
    bindings: list[str] = []
    rest: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg.startswith(_BINDING_FLAG):
            body = arg[len(_BINDING_FLAG):]
            if "=" in body:
                name, value = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                name, value = body, argv[i + 1]
                i += 1
            else:
                raise cli.UsageError(f"{arg}: expected --gin.NAME=VALUE")
            name = name.strip()
            if not name or not re.fullmatch(r"[\w./]+", name):
                raise cli.UsageError(f"{arg}: '{name}' is not a gin parameter or macro name")
            if not value.strip():
                raise cli.UsageError(f"{arg}: missing VALUE in --gin.NAME=VALUE")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
        i += 1
    return bindings, rest


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Splits off the --gin.NAME=VALUE bindings, parses the rest; the bindings land in `args.gin_bindings`."""
    import sys

    bindings, rest = split_gin_bindings(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    args.gin_bindings = bindings
    return args


def search_paths(extra: str | Sequence[str] = "") -> list[str]:
    """Folders searched for gin files, in order: the working directory, `extra` (local or object-store
    folders), repo root, `gin/`."""
    if isinstance(extra, str):
        extra = [p.strip() for p in extra.split(",")]
    paths = [p for p in extra if p]
    for path in paths:
        if not (filesystem.is_dir(path) if _is_url(path) else os.path.isdir(path)):
            raise cli.UsageError(f"--gin_search_paths: {path} is not a directory")
    return [""] + paths + [str(REPO_ROOT), str(GIN_DIR)]


# gin files (and the files they include) on object stores are read through the file-system layer: gin
# tries its readers in turn, and this one takes the paths that start with a URL scheme (`gs://...`).
# An include resolves as gin's own do: as given, then under each search path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _is_url(path: str) -> bool:
    return bool(_URL.match(str(path)))


def _is_url_file(path: str) -> bool:
    return _is_url(path) and filesystem.is_file(path)


def _is_file(path: str) -> bool:
    return _is_url_file(path) if _is_url(path) else os.path.isfile(path)


def _open_url(path: str):
    """A text file object of `path` (a context manager, like `open`)."""
    return filesystem.path(path).open("r", encoding="utf-8")


def _one_line(error: BaseException, limit: int = 400) -> str:
    """A gin error message cut to its informative head, on one line."""
    text = str(error)
    # Some gin messages append the whole config string; keep what comes before it.
    text = re.split(r"\s+in config string:", text, maxsplit=1)[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _QuietGinSearch(logging.Filter):
    """Drops the error gin's package-resource reader logs for every search prefix a file is not under."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


def _never_raises(exists: Callable[[str], bool]) -> Callable[[str], bool]:
    def safe(path: str) -> bool:
        try:
            return bool(exists(path))
        except Exception:  # noqa: BLE001 - e.g. gin's resource reader on a namespace package
            return False

    return safe


@contextlib.contextmanager
def _quiet_gin_search() -> Iterator[None]:
    """Parses without gin's search noise, and without its resource reader crashing when a folder named
    like the first part of a gin path (e.g. `runs/`) sits in the working directory."""
    root = logging.getLogger()
    quiet = _QuietGinSearch()
    root.addFilter(quiet)
    readers = list(gin.config._FILE_READERS)
    gin.config._FILE_READERS[:] = [(reader, _never_raises(exists)) for reader, exists in readers]
    try:
        yield
    finally:
        gin.config._FILE_READERS[:] = readers
        root.removeFilter(quiet)


def parse_gin(args: argparse.Namespace | None = None, *, gin_files: Sequence[str] | None = None,
              bindings: Sequence[str] | None = None, gin_search_paths: str | Sequence[str] = "",
              finalize: bool = True) -> None:
    """Clears gin, then parses the gin files (in order) and the bindings (after them); locks the config.

    Either pass the Namespace from `parse_args` (fields gin_file, gin_bindings, gin_search_paths) or the
    keyword arguments. Every gin error (missing file, unknown configurable or parameter, malformed value,
    a `%gin.REQUIRED` left unset, an undefined macro) becomes a one-line `cli.UsageError` naming the
    file or the binding.
    """
    if args is not None:
        gin_files = getattr(args, "gin_file", None) or []
        bindings = getattr(args, "gin_bindings", None) or []
        gin_search_paths = getattr(args, "gin_search_paths", "") or ""
    gin_files = list(gin_files or [])
    bindings = list(bindings or [])
    prefixes = search_paths(gin_search_paths)
    for path in gin_files:  # checked before the (slow) registration, so a typo fails fast
        absolute = os.path.isabs(path) or _is_url(path)
        if not absolute and not any(_is_file(os.path.join(p, path)) for p in prefixes):
            searched = ", ".join(p or "." for p in prefixes)
            raise cli.UsageError(f"--gin_file={path}: file not found (searched {searched})")
        if absolute and not _is_file(path):
            raise cli.UsageError(f"--gin_file={path}: file not found")

    register_configurables()
    gin.config.register_file_reader(_open_url, _is_url_file)
    gin.clear_config()
    gin.config._LOCATION_PREFIXES[:] = prefixes  # gin keeps its search path in this module-level list

    for path in gin_files:
        try:
            with _quiet_gin_search():
                gin.parse_config_file(path)
        except Exception as e:  # noqa: BLE001 - IOError (an include), ValueError, SyntaxError, TypeError...
            raise cli.UsageError(f"--gin_file={path}: {_one_line(e)}") from None

    for binding in bindings:
        try:
            gin.parse_config(binding)
        except Exception as e:  # noqa: BLE001
            flag = f"--gin.{binding.replace(' = ', '=', 1)}"
            if isinstance(e, (SyntaxError, tokenize.TokenError)):
                raise cli.UsageError(f"{flag}: the value is not a valid gin literal or reference") from None
            raise cli.UsageError(f"{flag}: {_one_line(e)}") from None

    if finalize:
        try:
            gin.finalize()
        except Exception as e:  # noqa: BLE001
            message = _one_line(e)
            if _REQUIRED_ERROR.search(message):
                key = message.split(" set to ", 1)[0]
                macro = key.split("/", 1)[0] if key.endswith("macro.value") else key
                message = f"{macro} is %gin.REQUIRED and was not set (add --gin.{macro}=VALUE)"
            raise cli.UsageError(f"gin config ({', '.join(gin_files) or 'bindings'}): {message}") from None


def build(name_or_cls: Any, **overrides: Any) -> Any:
    """`configured`, with a bad value in the bound config turned into a one-line `cli.UsageError`."""
    try:
        return configured(name_or_cls, **overrides)
    except cli.CLIError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a config's __post_init__ rejecting a value
        name = name_or_cls if isinstance(name_or_cls, str) else getattr(name_or_cls, "__name__", "?")
        raise cli.UsageError(f"gin config: cannot build {name}: {_one_line(e)}") from None


# ---- Operative config -------------------------------------------------------------------------------
def write_operative_config(model_dir: str) -> str:
    """Writes `MODEL_DIR/config.gin`: the operative config (the values actually used), or the full parsed
    config when nothing has been built from gin yet. Returns the file's path (local or `gs://`, through
    `spectron_jax.filesystem`).
    """
    text = gin.operative_config_str()
    if not _has_bindings(text):
        text = "# Nothing was built from gin yet: the complete parsed config follows.\n" + gin.config_str()
    from spectron_jax import filesystem

    path = filesystem.join(model_dir, CONFIG_FILENAME)
    filesystem.write_text(path, text)
    return path


def _has_bindings(config_text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in config_text.splitlines())
