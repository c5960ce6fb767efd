"""Test set-up: CPU-only JAX with 8 simulated devices, fixed before JAX is first imported."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    """The repository root (where setup.py, data/ and gin/ live)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def embedded_dir() -> pathlib.Path:
    """The embedded corpus: manifest.tsv, audio/*.flac and the tokenizer."""
    return REPO_ROOT / "data" / "embedded"
