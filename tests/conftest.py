"""Test set-up: CPU-only JAX with 8 simulated devices, fixed before JAX is first imported."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No persistent compilation cache unless a test asks for one (train's default would be the user's cache).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import pathlib  # noqa: E402

import spectron_jax  # noqa: E402,F401  (first: TensorFlow's first import, by any test, is then quiet)

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


@pytest.fixture(scope="session")
def throwaway_sp_model(tmp_path_factory) -> str:
    """A small SentencePiece model with the project's ids (pad 0, eos 1, unk 2, bos 3), for data tests."""
    import numpy as np
    import sentencepiece as spm

    words = "the quick brown fox jumps over a lazy dog while speech models listen to long spoken stories".split()
    folder = tmp_path_factory.mktemp("spm")
    rng = np.random.default_rng(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=9)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "m"), vocab_size=60, pad_id=0, eos_id=1, unk_id=2,
        bos_id=3, model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    return str(folder / "m.model")


@pytest.fixture(scope="session")
def gcs_emulator():
    """A local GCS server (`gcp-storage-emulator`, in memory, through `tests/gcs_emulator.py`: with the
    object generations on downloads and the preconditions that tensorstore's OCDBT writes rely on) on a
    free loopback port with a bucket `spectron-test`; yields the env vars that point gcsfs / epath and
    tensorstore at it. Stopped at exit."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emulator = pathlib.Path(__file__).resolve().parent / "gcs_emulator.py"
    server = subprocess.Popen(
        [sys.executable, str(emulator), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                                 data=json.dumps({"name": "spectron-test"}).encode(),
                                                 headers={"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the GCS emulator did not start")
                time.sleep(0.2)
        yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "EPATH_USE_TF": "false",
               "bucket": "spectron-test"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
