"""Data-side speed: featurisation (x real time per core) and TFRecord read throughput (examples/s).

    python -m spectron_jax.data.benchmark_data [--data_dir=DIR] [--max_files=N] [--json]

`DIR` is any folder holding audio files (searched recursively: .flac, .wav, .ogg, .mp3); the default
is the embedded corpus, `data/embedded/` of the repository. `benchmark_data` returns a dict that
`spectron_jax.benchmark` includes in its own report:

    files, audio_seconds
    featurise: decode_cpu_s, log_mel_cpu_s, cpu_s, wall_s, x_realtime_per_core (audio seconds per CPU
               second of this process: decode + resample + log-mel), x_realtime_wall
    tfrecord:  examples, bytes, write_s, epochs, read_s, read_examples_per_s, read_mb_per_s
               (tf.data TFRecordDataset -> parse_example, parallel map, iterated as NumPy: what the
               input pipeline does before its own preprocessing)

Timings are CPU time of this process (`time.process_time`, all its threads) where it says `cpu`, and
wall-clock time elsewhere.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time
from typing import Sequence

from spectron_jax import cli
from spectron_jax.data import features, sources, tfrecords

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3")
DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "data" / "embedded"


def find_audio(data_dir: str | os.PathLike, max_files: int | None = None) -> list[str]:
    """Audio files under `data_dir`, sorted; at most `max_files` (evenly spaced) when given."""
    found = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(data_dir)
        for name in names
        if name.lower().endswith(AUDIO_SUFFIXES)
    )
    if max_files is not None and len(found) > max_files:
        step = len(found) / max_files
        found = [found[int(k * step)] for k in range(max_files)]
    return found


def _featurise(paths: Sequence[str], spec: features.FeatureSpec) -> tuple[dict, list]:
    """Decodes and featurises every file once; returns the timings and [(id, seconds, [T, mel])]."""
    if paths:  # warm-up: librosa's lazy imports and first-call set-up are not featurisation speed
        features.log_mel(features.load_audio(paths[0], spec)[: spec.sample_rate], spec)
    decode_cpu = mel_cpu = 0.0
    wall_start = time.perf_counter()
    results, failed = [], 0
    for path in paths:
        t0 = time.process_time()
        try:
            wave = features.load_audio(path, spec)
        except features.AudioError:
            failed += 1
            continue
        t1 = time.process_time()
        frames = features.log_mel(wave, spec)
        t2 = time.process_time()
        decode_cpu += t1 - t0
        mel_cpu += t2 - t1
        results.append((pathlib.Path(path).stem, wave.size / spec.sample_rate, frames))
    wall = time.perf_counter() - wall_start
    audio = sum(r[1] for r in results)
    cpu = decode_cpu + mel_cpu
    timings = {
        "files_failed": failed,
        "decode_cpu_s": round(decode_cpu, 4),
        "log_mel_cpu_s": round(mel_cpu, 4),
        "cpu_s": round(cpu, 4),
        "wall_s": round(wall, 4),
        "x_realtime_per_core": round(audio / cpu, 1) if cpu > 0 else None,
        "x_realtime_wall": round(audio / wall, 1) if wall > 0 else None,
    }
    return timings, results


def _tfrecord_throughput(examples: list, min_read_seconds: float, max_epochs: int) -> dict:
    """Writes `examples` to a temporary shard, then reads it back through tf.data until enough time passed."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.tfrecord-00000-of-00001")
        start = time.perf_counter()
        with tf.io.TFRecordWriter(path) as writer:
            for utt_id, seconds, frames in examples:
                writer.write(tfrecords.encode_example(sources.Segment(utt_id, "benchmark", ""), seconds, frames))
        write_s = time.perf_counter() - start
        size = os.path.getsize(path)

        def one_epoch() -> int:
            dataset = tf.data.TFRecordDataset([path]).map(tfrecords.parse_example, num_parallel_calls=tf.data.AUTOTUNE)
            return sum(1 for _ in dataset.prefetch(tf.data.AUTOTUNE).as_numpy_iterator())

        one_epoch()  # warm-up: graph tracing of the map function
        read, epochs, start = 0, 0, time.perf_counter()
        while epochs < max_epochs and (epochs == 0 or time.perf_counter() - start < min_read_seconds):
            read += one_epoch()
            epochs += 1
        read_s = time.perf_counter() - start
    return {
        "examples": len(examples),
        "bytes": size,
        "write_s": round(write_s, 4),
        "epochs": epochs,
        "read_s": round(read_s, 4),
        "read_examples_per_s": round(read / read_s, 1) if read_s > 0 else None,
        "read_mb_per_s": round(epochs * size / read_s / 1e6, 1) if read_s > 0 else None,
    }


def benchmark_data(
    data_dir: str | os.PathLike | None = None,
    max_files: int | None = 128,
    spec: features.FeatureSpec = features.SPECTRON_FEATURES,
    min_read_seconds: float = 2.0,
    max_epochs: int = 50,
) -> dict:
    """Featurisation and TFRecord read speed on the audio under `data_dir` (default: the embedded corpus).

    Raises:
      FileNotFoundError: no audio file under `data_dir` (or it does not exist).
    """
    data_dir = pathlib.Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    paths = find_audio(data_dir, max_files) if data_dir.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no audio files ({', '.join(AUDIO_SUFFIXES)}) found")
    timings, examples = _featurise(paths, spec)
    if not examples:
        raise FileNotFoundError(f"{data_dir}: none of {len(paths)} audio files could be decoded")
    return {
        "data_dir": str(data_dir),
        "files": len(examples),
        "audio_seconds": round(sum(e[1] for e in examples), 3),
        "features": features.describe(spec),
        "featurise": timings,
        "tfrecord": _tfrecord_throughput(examples, min_read_seconds, max_epochs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = cli.ArgumentParser(prog="spectron_jax.data.benchmark_data", description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None, help="folder of audio files (default: the embedded corpus)")
    parser.add_argument("--max_files", type=int, default=128, help="featurise at most this many files")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    if args.max_files < 1:
        raise cli.UsageError(f"--max_files must be at least 1, got {args.max_files}")
    try:
        result = benchmark_data(args.data_dir, args.max_files)
    except FileNotFoundError as e:
        raise cli.InputError(f"--data_dir {e}") from e
    if args.json:
        print(json.dumps(result))
        return 0
    feat, rec = result["featurise"], result["tfrecord"]
    print(f"audio: {result['files']} files, {result['audio_seconds']:.1f} s from {result['data_dir']}")
    print(f"features: {result['features']}")
    print(
        f"featurise: {feat['x_realtime_per_core']}x real time per core (decode {feat['decode_cpu_s']:.2f} s"
        f" + log-mel {feat['log_mel_cpu_s']:.2f} s CPU; {feat['x_realtime_wall']}x wall)"
    )
    print(
        f"tfrecord: {rec['read_examples_per_s']} examples/s, {rec['read_mb_per_s']} MB/s read ({rec['examples']}"
        f" examples, {rec['bytes'] / 1e6:.1f} MB, {rec['epochs']} epochs); write {rec['write_s']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
