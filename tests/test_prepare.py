"""`prepare`: TFRecord shards read back and compared with `log_mel` on the sources; skips; resume; CLI errors."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from spectron_jax import cli
from spectron_jax.data import features, prepare, sources, tfrecords


def chirp(seconds: float, f0: float = 150.0, f1: float = 4000.0, sample_rate: int = 16000) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))).astype(np.float32)


def read_shards(output_dir, split) -> dict:
    """All examples of a split, parsed with tfrecords.parse_example: {id: {feature: numpy}}."""
    import tensorflow as tf

    files = sorted(str(p) for p in pathlib.Path(output_dir).glob(f"{split}.tfrecord-*"))
    examples = {}
    for raw in tf.data.TFRecordDataset(files):
        example = {k: v.numpy() for k, v in tfrecords.parse_example(raw).items()}
        assert example["log_mel"].shape == (int(example["num_frames"]), 128)
        examples[example["id"].decode()] = example
    return examples


def assert_float16_of(got, want):
    """`got` holds `want` [T, mel] float32 as float16 storage gives it back: within half a float16 ulp."""
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_less(np.abs(got - want), np.abs(want) * 2.0**-11 + 1e-7)


def source_log_mel(path, start=0.0, end=None) -> np.ndarray:
    wave = features.load_audio(path)
    stop = None if end is None else int(round(end * 16000))
    return features.log_mel(wave[int(round(start * 16000)) : stop])


def mtimes(output_dir) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in pathlib.Path(output_dir).glob("*.tfrecord-*")}


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "spectron_jax.data.prepare", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


# ------------------------------------------------------------------------------------------ LibriSpeech

GOOD = {
    "train": ["19-198-0000", "19-198-0001", "19-198-0002", "19-198-0003"],
    "validation": ["27-300-0000", "27-300-0001"],
}
BAD = {
    "19-198-0100": "unreadable",
    "19-198-0101": "empty_file",
    "19-198-0102": "empty_audio",
    "19-198-0103": "non_finite",
    "19-198-0104": "missing_file",
    "19-198-0105": "empty_transcript",
}


def build_librispeech(root: pathlib.Path) -> None:
    train, dev = root / "train-clean-100" / "19" / "198", root / "dev-clean" / "27" / "300"
    train.mkdir(parents=True)
    dev.mkdir(parents=True)
    lines = []
    for k, utt in enumerate(GOOD["train"]):
        if k == 3:  # 44.1 kHz stereo: resampled and mixed down
            wave = chirp(1.2, sample_rate=44100)
            soundfile.write(train / f"{utt}.flac", np.stack([wave, 0.5 * wave], axis=1), 44100)
        else:
            soundfile.write(train / f"{utt}.flac", chirp(0.8 + 0.3 * k, f0=100 + 50 * k), 16000)
        lines.append(f"{utt} SPOKEN WORDS NUMBER {k}")
    (train / "19-198-0100.flac").write_bytes(b"fLaC" + bytes(range(256)) * 8)
    (train / "19-198-0101.flac").write_bytes(b"")
    soundfile.write(train / "19-198-0102.flac", np.zeros(0, np.int16), 16000, format="WAV")
    nan_wave = chirp(0.5)
    nan_wave[100] = np.nan
    soundfile.write(train / "19-198-0103.flac", nan_wave, 16000, format="WAV", subtype="FLOAT")
    soundfile.write(train / "19-198-0105.flac", chirp(0.5), 16000)
    lines += [
        f"{u} TEXT OF A BAD FILE" for u in ("19-198-0100", "19-198-0101", "19-198-0102", "19-198-0103", "19-198-0104")
    ]
    lines.append("19-198-0105")
    (train / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    for k, utt in enumerate(GOOD["validation"]):
        soundfile.write(dev / f"{utt}.flac", chirp(0.6 + 0.2 * k, f1=2000.0), 16000)
    (dev / "27-300.trans.txt").write_text(
        "".join(f"{u} A VALIDATION LINE {k}\n" for k, u in enumerate(GOOD["validation"]))
    )


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
    root = tmp_path_factory.mktemp("librispeech")
    build_librispeech(root)
    out = root.parent / (root.name + "_out")
    args = ["--format=librispeech", f"--input={root}", f"--output_dir={out}", "--stats", "--num_workers=2"]
    assert prepare.main(args + ["--num_shards=2"]) == 0
    return root, out, args


def test_librispeech_every_good_file_written_with_its_features(librispeech):
    root, out, _ = librispeech
    for split, chapter in (
        ("train", root / "train-clean-100" / "19" / "198"),
        ("validation", root / "dev-clean" / "27" / "300"),
    ):
        examples = read_shards(out, split)
        assert sorted(examples) == GOOD[split]
        for utt, example in examples.items():
            want = source_log_mel(chapter / f"{utt}.flac")
            assert_float16_of(example["log_mel"], want)
            assert example["num_frames"] == want.shape[0]
            assert example["speaker"].decode() == utt.split("-")[0]
            assert example["transcript"].decode().startswith("SPOKEN WORDS" if split == "train" else "A VALIDATION")
            assert abs(example["duration"] - soundfile.info(chapter / f"{utt}.flac").duration) < 1e-3


def test_librispeech_report_counts_every_bad_file_with_its_reason(librispeech):
    _, out, _ = librispeech
    report = json.loads((out / "report.json").read_text())
    train = report["splits"]["train"]
    reported = {e["id"]: reason for reason, items in train["skipped"]["examples"].items() for e in items}
    assert reported == BAD
    assert train["skipped"]["total"] == len(BAD) and sum(train["skipped"]["by_reason"].values()) == len(BAD)
    assert train["utterances"] == 4 and report["splits"]["validation"]["utterances"] == 2
    assert report["splits"]["validation"]["skipped"]["total"] == 0
    examples = read_shards(out, "train")
    assert train["hours"] == pytest.approx(sum(float(e["duration"]) for e in examples.values()) / 3600, abs=1e-6)
    assert train["frames"] == sum(int(e["num_frames"]) for e in examples.values())
    shards = {s["file"]: s["examples"] for s in train["shards"]}
    assert sorted(shards) == ["train.tfrecord-00000-of-00002", "train.tfrecord-00001-of-00002"]
    for name, count in shards.items():
        assert tfrecords.count_records(str(out / name)) == count
    assert report["totals"] == {
        "utterances": 6,
        "hours": pytest.approx(train["hours"] + report["splits"]["validation"]["hours"]),
        "skipped": 6,
    }


def test_stats_json_matches_train_frames(librispeech):
    _, out, _ = librispeech
    stats = features.FeatureStats.from_json(out / "stats.json")
    frames = np.concatenate([e["log_mel"] for e in read_shards(out, "train").values()]).astype(np.float64)
    assert stats.num_frames == frames.shape[0]
    np.testing.assert_allclose(stats.mean, frames.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(stats.std, np.maximum(frames.std(axis=0), 1e-3), atol=1e-5)


def test_rerun_skips_finished_shards(librispeech):
    _, out, args = librispeech
    before = mtimes(out)
    assert prepare.main(args + ["--num_shards=2", "--num_workers=1"]) == 0
    assert mtimes(out) == before
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["shards_written"] == 0 and report["run"]["shards_resumed"] == 4
    assert report["splits"]["train"]["skipped"]["total"] == len(BAD)  # skips recalled from the shard index


def test_cli_errors_are_one_line(tmp_path, repo_root):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--format=librispeech", f"--input={tmp_path / 'empty'}", f"--output_dir={tmp_path / 'o'}"], 1, "empty"),
        (["--format=manifest", f"--input={tmp_path / 'nope.tsv'}", f"--output_dir={tmp_path / 'o'}"], 1, "nope.tsv"),
        (
            ["--format=librispeech", f"--input={tmp_path}", f"--output_dir={tmp_path / 'o'}", "--num_shards=0"],
            2,
            "--num_shards",
        ),
        (["--format=librilight", f"--input={tmp_path}", f"--output_dir={tmp_path / 'o'}"], 2, "--transcripts"),
    ]
    for args, code, named in cases:
        result = run_cli(*args, cwd=repo_root)
        assert result.returncode == code, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_nothing_usable_is_an_input_error(tmp_path):
    chapter = tmp_path / "test-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2.trans.txt").write_text("1-2-0000\n1-2-0001\n")  # transcripts all empty
    with pytest.raises(cli.InputError, match="nothing usable.*empty_transcript: 2"):
        prepare.main(["--format=librispeech", f"--input={tmp_path}", f"--output_dir={tmp_path / 'o'}"])
    (chapter / "1-2.trans.txt").write_text("1-2-0000 WORDS\n")  # audio missing: written, then an error
    with pytest.raises(cli.InputError, match="no utterance could be prepared"):
        prepare.main(["--format=librispeech", f"--input={tmp_path}", f"--output_dir={tmp_path / 'o'}"])
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["splits"]["test"]["skipped"]["by_reason"] == {"missing_file": 1}


# -------------------------------------------------------------------------------------------- manifest


def write_manifest_inputs(root: pathlib.Path):
    (root / "wav").mkdir()
    rows = []
    for k in range(4):
        soundfile.write(root / "wav" / f"utt{k}.flac", chirp(0.7 + 0.1 * k, f0=120 + 40 * k), 16000)
        rows.append(
            {
                "path": f"wav/utt{k}.flac",
                "transcript": f'she said "hi" {k}',
                "speaker": f"s{k % 2}",
                "split": "validation" if k == 3 else "train",
            }
        )
    rows.append(
        {
            "id": "cut",
            "path": "wav/utt2.flac",
            "transcript": "a cut",
            "speaker": "s0",
            "split": "train",
            "start": "0.2",
            "end": "0.6",
        }
    )
    return rows


@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_manifest_formats(tmp_path, kind):
    rows = write_manifest_inputs(tmp_path)
    columns = ["id", "path", "transcript", "speaker", "split", "start", "end"]
    if kind == "tsv":
        text = "\t".join(columns) + "\n" + "".join("\t".join(r.get(c, "") for c in columns) + "\n" for r in rows)
        text += "only\ttwo\n"  # malformed
        (tmp_path / "m.tsv").write_text(text)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n"
        (tmp_path / "m.jsonl").write_text(text)
    out = tmp_path / "out"
    assert (
        prepare.main(
            ["--format=manifest", f"--input={tmp_path / ('m.' + kind)}", f"--output_dir={out}", "--num_workers=1"]
        )
        == 0
    )
    train, validation = read_shards(out, "train"), read_shards(out, "validation")
    assert sorted(train) == ["cut", "utt0", "utt1", "utt2"] and sorted(validation) == ["utt3"]
    for utt in ("utt0", "utt1", "utt2"):
        assert_float16_of(train[utt]["log_mel"], source_log_mel(tmp_path / "wav" / f"{utt}.flac"))
        assert train[utt]["transcript"].decode() == f'she said "hi" {utt[-1]}'
    assert_float16_of(train["cut"]["log_mel"], source_log_mel(tmp_path / "wav" / "utt2.flac", 0.2, 0.6))
    assert train["cut"]["duration"] == pytest.approx(0.4, abs=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_without_split"]["by_reason"] == {"malformed_line": 1}


def test_changed_input_rewrites_only_its_shard(tmp_path):
    write_manifest_inputs(tmp_path)
    (tmp_path / "m.tsv").write_text("path\ttranscript\n" + "".join(f"wav/utt{k}.flac\twords {k}\n" for k in range(3)))
    out = tmp_path / "out"
    args = ["--format=manifest", f"--input={tmp_path / 'm.tsv'}", f"--output_dir={out}", "--num_workers=1"]
    assert prepare.main(args + ["--num_shards=3"]) == 0
    before = mtimes(out)
    # utt1 is the second file in path order: round-robin puts it in shard 1.
    soundfile.write(tmp_path / "wav" / "utt1.flac", chirp(0.5, f0=900), 16000)
    with open(out / "train.tfrecord-00002-of-00003", "r+b") as f:  # a truncated shard
        f.truncate(100)
    assert prepare.main(args + ["--num_shards=3"]) == 0
    after = mtimes(out)
    assert after["train.tfrecord-00000-of-00003"] == before["train.tfrecord-00000-of-00003"]
    assert after["train.tfrecord-00001-of-00003"] != before["train.tfrecord-00001-of-00003"]
    assert tfrecords.count_records(str(out / "train.tfrecord-00002-of-00003")) == 1
    examples = read_shards(out, "train")
    assert_float16_of(examples["utt1"]["log_mel"], source_log_mel(tmp_path / "wav" / "utt1.flac"))
    assert prepare.main(args + ["--num_shards=1"]) == 0  # another shard count replaces the old shards
    assert sorted(mtimes(out)) == ["train.tfrecord-00000-of-00001"]
    assert sorted(read_shards(out, "train")) == ["utt0", "utt1", "utt2"]
    assert not list(out.glob(".tmp-*"))


# ------------------------------------------------------------------------------------------ Libri-Light


def test_merge_voice_activity():
    intervals = [[9.5, 10.0], [0.0, 1.0], [1.5, 2.0], [2.5, 9.0]]
    got = sources.merge_voice_activity(intervals, max_seconds=4.0)
    assert got == [(0.0, 2.0), (2.5, 9.0), (9.5, 10.0)]  # the long interval stays whole (prepare splits it)
    assert sources.merge_voice_activity([[0.0, 3.0], [3.5, 30.0]], 20.0, duration=12.0) == [(0.0, 12.0)]
    assert sources.fixed_windows(10.0, 4.0) == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]


def test_librilight(tmp_path):
    book = tmp_path / "ll" / "100" / "7733"
    book.mkdir(parents=True)
    wave = np.concatenate([chirp(4.0, f0=200), chirp(4.0, f0=500), chirp(4.0, f0=800)])
    soundfile.write(book / "reading_01.flac", wave, 16000)
    (book / "reading_01.json").write_text(json.dumps({"voice_activity": [[0.5, 3.0], [3.2, 6.0], [6.5, 11.5]]}))
    soundfile.write(book / "no_vad.flac", chirp(1.0), 16000)
    root = tmp_path / "ll"
    segments_tsv = tmp_path / "segments.tsv"
    assert (
        prepare.main(
            [
                "--format=librilight",
                f"--input={root}",
                "--output_dir=unused",
                "--max_segment_seconds=6",
                f"--write_segments={segments_tsv}",
            ]
        )
        == 0
    )
    with open(segments_tsv) as f:
        planned = list(csv.DictReader(f, delimiter="\t"))
    assert [(p["start"], p["end"]) for p in planned] == [("0.500", "6.000"), ("6.500", "11.500")]
    first, second = planned[0]["id"], planned[1]["id"]
    assert first == "100-7733-reading_01-00000500-00006000"
    (tmp_path / "by_id.tsv").write_text(f"id\ttranscript\n{first}\tthe first words\nnot-a-segment\tstray\n")
    out = tmp_path / "out"
    common = [f"--input={root}", "--max_segment_seconds=6", "--num_workers=1"]
    assert (
        prepare.main(["--format=librilight", *common, f"--transcripts={tmp_path / 'by_id.tsv'}", f"--output_dir={out}"])
        == 0
    )
    examples = read_shards(out, "train")
    assert sorted(examples) == [first]
    assert_float16_of(examples[first]["log_mel"], source_log_mel(book / "reading_01.flac", 0.5, 6.0))
    assert examples[first]["speaker"] == b"100" and examples[first]["transcript"] == b"the first words"
    skipped = json.loads((out / "report.json").read_text())["splits"]["train"]["skipped"]
    assert skipped["by_reason"] == {"no_transcript": 1, "no_voice_activity": 1, "unknown_segment": 1}
    assert skipped["examples"]["no_transcript"][0]["id"] == second
    # Rows that name file + times define the segments themselves.
    (tmp_path / "by_time.tsv").write_text("file\tstart\tend\ttranscript\n100/7733/reading_01\t1.0\t2.5\tcut here\n")
    out2 = tmp_path / "out2"
    assert (
        prepare.main(
            ["--format=librilight", *common, f"--transcripts={tmp_path / 'by_time.tsv'}", f"--output_dir={out2}"]
        )
        == 0
    )
    (only,) = read_shards(out2, "train").values()
    assert only["id"] == b"100-7733-reading_01-00001000-00002500"
    assert_float16_of(only["log_mel"], source_log_mel(book / "reading_01.flac", 1.0, 2.5))


# ------------------------------------------------------------------------------------- embedded corpus


def test_embedded_corpus_split(tmp_path, embedded_dir):
    manifest = embedded_dir / "manifest.tsv"
    if not manifest.exists():
        pytest.skip("embedded corpus not built")
    with open(manifest, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r["split"] == "test"]
    out = tmp_path / "out"
    assert (
        prepare.main(
            ["--format=embedded", f"--input={embedded_dir}", f"--output_dir={out}", "--splits=test", "--num_workers=1"]
        )
        == 0
    )
    examples = read_shards(out, "test")
    assert sorted(examples) == sorted(r["id"] for r in rows)
    for row in rows:
        example = examples[row["id"]]
        assert example["transcript"].decode() == row["transcript"] and example["speaker"].decode() == row["speaker"]
        assert abs(float(example["duration"]) - float(row["duration"])) < 1e-3
    assert sorted(p.name for p in out.glob("*.tfrecord-*")) == ["test.tfrecord-00000-of-00001"]


def test_packed_float_list_holds_the_values():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for size in (0, 1, 31, 32, 4096, 40000):  # byte lengths on both sides of the varint's 1/2/3-byte limits
        values = rng.normal(size=size).astype(np.float32)
        slow = tf.train.FloatList(value=values.tolist())
        fast = tfrecords.packed_float_list(tf, values)
        np.testing.assert_array_equal(np.array(fast.value, np.float32), values)
        assert tf.train.FloatList.FromString(fast.SerializeToString()) == slow


def test_benchmark_data_on_generated_audio(tmp_path):
    from spectron_jax.data import benchmark_data

    for k in range(3):
        soundfile.write(tmp_path / f"a{k}.flac", chirp(0.5 + 0.25 * k), 16000)
    (tmp_path / "notes.txt").write_text("not audio")
    result = benchmark_data.benchmark_data(tmp_path, min_read_seconds=0.0, max_epochs=1)
    assert result["files"] == 3 and result["featurise"]["files_failed"] == 0
    assert result["audio_seconds"] == pytest.approx(0.5 + 0.75 + 1.0, abs=1e-3)
    assert result["tfrecord"]["examples"] == 3 and result["tfrecord"]["epochs"] == 1
    assert result["featurise"]["x_realtime_per_core"] > 0 and result["tfrecord"]["read_examples_per_s"] > 0
    with pytest.raises(FileNotFoundError, match="no audio"):
        benchmark_data.benchmark_data(tmp_path / "nothing")
