"""`prepare` on bad and remote inputs: truncated WAVs, non-UTF-8 transcript lines and manifest rows,
split-by-split runs that keep each other's report and stats, a killed run resumed to the same shards,
and LibriSpeech trees / manifests with audio on `gs://` (a local GCS emulator)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile

from spectron_jax.data import audio_input, features, prepare
from test_prepare import chirp, read_shards

SR = 16000


def _chapter(root: pathlib.Path, split_folder: str, speaker: int, chapter: int, lines: list[bytes], seconds=0.6):
    """Writes `<split_folder>/<speaker>/<chapter>/` with a FLAC per line id and the raw `.trans.txt` bytes."""
    folder = root / split_folder / str(speaker) / str(chapter)
    folder.mkdir(parents=True)
    for k, line in enumerate(lines):
        utt = line.split(b" ", 1)[0].decode("utf-8", errors="replace")
        if utt.isascii() and "\ufffd" not in utt:
            soundfile.write(folder / f"{utt}.flac", chirp(seconds + 0.1 * k, f0=110 + 30 * k), SR)
    (folder / f"{speaker}-{chapter}.trans.txt").write_bytes(b"\n".join(lines) + b"\n")
    return folder


def _report(out) -> dict:
    return json.loads((pathlib.Path(out) / "report.json").read_text())


# ------------------------------------------------------------------------------------------ bad input


def test_truncated_wav_is_refused(tmp_path):
    folder = _chapter(tmp_path / "in", "test-clean", 1, 2, [b"1-2-0000 GOOD ONE", b"1-2-0001 CUT ONE"])
    for name in ("1-2-0000", "1-2-0001"):
        (folder / f"{name}.flac").unlink()
        soundfile.write(folder / f"{name}.wav", chirp(0.8), SR, subtype="PCM_16")
    full = (folder / "1-2-0001.wav").read_bytes()
    (folder / "1-2-0001.wav").write_bytes(full[: len(full) // 2])  # the header still says 0.8 s
    assert soundfile.info(folder / "1-2-0001.wav").frames < 0.8 * SR  # libsndfile alone would accept the part
    np.testing.assert_array_equal(audio_input.load_audio(str(folder / "1-2-0000.wav")),
                                  features.load_audio(folder / "1-2-0000.wav"))
    with pytest.raises(features.AudioError, match="declares") as caught:
        audio_input.load_audio(str(folder / "1-2-0001.wav"))
    assert caught.value.reason == "truncated"
    out = tmp_path / "out"
    assert prepare.main(["--format=librispeech", f"--input={tmp_path / 'in'}", f"--output_dir={out}",
                         "--num_workers=1"]) == 0
    assert sorted(read_shards(out, "test")) == ["1-2-0000"]
    skipped = _report(out)["splits"]["test"]["skipped"]
    assert skipped["by_reason"] == {"truncated": 1} and skipped["examples"]["truncated"][0]["id"] == "1-2-0001"


def test_bad_bytes_in_trans_txt_skip_only_those_lines(tmp_path):
    lines = [b"3-4-0000 FIRST LINE", b"3-4-0001 CAF\xe9 AU LAIT", b"3-4-0002 THIRD LINE", b"3-4-\xff003 BAD ID",
             b"3-4-0004 FIFTH LINE"]
    _chapter(tmp_path / "in", "train-clean-100", 3, 4, lines)
    out = tmp_path / "out"
    assert prepare.main(["--format=librispeech", f"--input={tmp_path / 'in'}", f"--output_dir={out}",
                         "--num_workers=1"]) == 0
    examples = read_shards(out, "train")
    assert sorted(examples) == ["3-4-0000", "3-4-0002", "3-4-0004"]
    assert examples["3-4-0002"]["transcript"] == b"THIRD LINE"
    skipped = _report(out)["splits"]["train"]["skipped"]
    assert skipped["total"] == 2 and skipped["by_reason"] == {"bad_encoding": 2}
    bad = skipped["examples"]["bad_encoding"]
    assert [b["id"] for b in bad] == ["3-4-0001", ""]  # the id where it decodes
    assert "line 2" in bad[0]["detail"] and "0xe9" in bad[0]["detail"] and "line 4" in bad[1]["detail"]


@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_non_utf8_manifest_rows_are_counted_not_fatal(tmp_path, kind):
    (tmp_path / "wav").mkdir()
    for k in range(3):
        soundfile.write(tmp_path / "wav" / f"u{k}.flac", chirp(0.5 + 0.1 * k), SR)
    rows = [("u0", "words zero"), ("u1", "caf\xe9 words"), ("u2", "words two")]
    if kind == "tsv":
        data = b"id\tpath\ttranscript\n" + b"".join(
            f"{i}\twav/{i}.flac\t".encode() + t.encode("latin-1") + b"\n" for i, t in rows)
    else:
        data = b"".join(b'{"id": "%s", "path": "wav/%s.flac", "transcript": "' % (i.encode(), i.encode())
                        + t.encode("latin-1") + b'"}\n' for i, t in rows)
    (tmp_path / f"m.{kind}").write_bytes(data)
    out = tmp_path / "out"
    assert prepare.main(["--format=manifest", f"--input={tmp_path / f'm.{kind}'}", f"--output_dir={out}",
                         "--num_workers=1"]) == 0
    assert sorted(read_shards(out, "train")) == ["u0", "u2"]
    report = _report(out)
    bad = report["skipped_without_split"]
    assert bad["by_reason"] == {"bad_encoding": 1} and bad["examples"]["bad_encoding"][0]["id"] == "u1"
    assert report["totals"]["skipped"] == 1
    (tmp_path / "h.tsv").write_bytes(b"p\xe4th\ttranscript\n")
    with pytest.raises(Exception, match="h.tsv: header line 1 is not UTF-8"):
        prepare.main(["--format=manifest", f"--input={tmp_path / 'h.tsv'}", f"--output_dir={out}"])


def test_one_split_at_a_time_keeps_the_other_splits_report_and_stats(tmp_path):
    root = tmp_path / "in"
    _chapter(root, "train-clean-100", 5, 6, [b"5-6-0000 TRAIN ONE", b"5-6-0001 TRAIN TWO"], seconds=1.0)
    _chapter(root, "dev-clean", 7, 8, [b"7-8-0000 DEV ONE"])
    out = tmp_path / "out"
    base = ["--format=librispeech", f"--input={root}", f"--output_dir={out}", "--num_workers=1", "--stats"]
    assert prepare.main(base) == 0
    everything, stats = _report(out), (out / "stats.json").read_text()
    assert sorted(everything["splits"]) == ["train", "validation"]
    assert prepare.main(base + ["--splits=validation"]) == 0  # re-run of one split
    again = _report(out)
    assert again["splits"] == everything["splits"] and again["totals"] == everything["totals"]
    assert again["run"]["splits_kept"] == ["train"] and (out / "stats.json").read_text() == stats
    # split by split into a fresh folder: the same report and the train split's stats
    out2 = tmp_path / "out2"
    base2 = [a if not a.startswith("--output_dir") else f"--output_dir={out2}" for a in base]
    assert prepare.main(base2 + ["--splits=train"]) == 0
    assert prepare.main(base2 + ["--splits=validation"]) == 0
    assert _report(out2)["splits"] == everything["splits"]
    assert (out2 / "stats.json").read_text() == stats
    train_frames = sum(int(e["num_frames"]) for e in read_shards(out, "train").values())
    assert json.loads(stats)["num_frames"] == train_frames


def _shard_bytes(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).glob("*.tfrecord-*"))}


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A tree of 8 utterances in 4 shards and the shards of an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    lines = [f"9-10-{k:04d} WORDS {k}".encode() for k in range(8)]
    _chapter(root / "in", "train-clean-100", 9, 10, lines, seconds=1.5)
    args = ["--format=librispeech", f"--input={root / 'in'}", "--num_shards=4", "--num_workers=1"]
    assert prepare.main(args + [f"--output_dir={root / 'reference'}"]) == 0
    return root, args, _shard_bytes(root / "reference")


def test_interrupted_states_resume_to_the_same_shards(resumable):
    root, args, reference = resumable
    out = root / "interrupted"
    assert prepare.main(args + [f"--output_dir={out}"]) == 0
    names = sorted(reference)
    # The states a kill leaves: a partial temporary file, a shard renamed but without its index
    # record, a shard whose file is cut short, a shard never started.
    (out / f".tmp-{names[0]}-4242").write_bytes(reference[names[0]][:100])
    (out / prepare.INDEX_DIR / f"{names[1]}.json").unlink()
    with open(out / names[2], "r+b") as f:
        f.truncate(50)
    (out / names[3]).unlink()
    (out / prepare.INDEX_DIR / f"{names[3]}.json").unlink()
    assert prepare.main(args + [f"--output_dir={out}"]) == 0
    assert _shard_bytes(out) == reference
    assert _report(out)["run"]["shards_written"] == 3 and not list(out.glob(".tmp-*"))


@pytest.mark.slow  # a subprocess that imports TensorFlow
def test_killed_prepare_resumes_to_the_same_shards(resumable, repo_root):
    root, args, reference = resumable
    out = root / "killed"
    env = dict(os.environ, PYTHONPATH=str(repo_root), TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen([sys.executable, "-m", "spectron_jax.data.prepare", *args, f"--output_dir={out}"],
                               cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if list((out / prepare.INDEX_DIR).glob("*.json")):  # one shard finished: kill it now
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    assert prepare.main(args + [f"--output_dir={out}"]) == 0
    assert _shard_bytes(out) == reference
    run = _report(out)["run"]
    assert run["shards_written"] + run["shards_resumed"] == 4 and not list(out.glob(".tmp-*"))
    if process.returncode == -signal.SIGKILL:  # killed after its first shard (not when it had finished first)
        assert run["shards_resumed"] >= 1


# ------------------------------------------------------------------------------------------ gs:// input


@pytest.fixture()
def gcs(gcs_emulator, monkeypatch):
    for key, value in gcs_emulator.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    return f"gs://{gcs_emulator['bucket']}"


def test_librispeech_tree_and_manifest_read_from_gcs(tmp_path, gcs):
    from spectron_jax import filesystem as fs

    local = tmp_path / "in"
    _chapter(local, "dev-clean", 11, 12, [b"11-12-0000 REMOTE ONE", b"11-12-0001 REMOTE TWO"])
    remote = fs.join(gcs, "prepare-input", "LibriSpeech")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.copy(str(path), fs.join(remote, str(path.relative_to(local))))
    common = ["--num_workers=1"]
    assert prepare.main(["--format=librispeech", f"--input={local}", f"--output_dir={tmp_path / 'l'}", *common]) == 0
    assert prepare.main(["--format=librispeech", f"--input={remote}", f"--output_dir={tmp_path / 'r'}", *common]) == 0
    want = read_shards(tmp_path / "l", "validation")
    assert sorted(want) == ["11-12-0000", "11-12-0001"]

    def same(got):
        assert sorted(got) == sorted(want)
        for key, example in want.items():
            for name, value in example.items():
                np.testing.assert_array_equal(got[key][name], value)

    same(read_shards(tmp_path / "r", "validation"))
    assert _report(tmp_path / "r")["splits"]["validation"]["shards"] == _report(tmp_path / "l")["splits"][
        "validation"]["shards"]
    # manifests: a local one naming gs:// audio, and one in the bucket naming audio relative to itself
    chapter = fs.join(remote, "dev-clean", "11", "12")
    rows = "".join(f"{u}\t{chapter}/{u}.flac\tREMOTE {w}\t11\tvalidation\n" for u, w in
                   (("11-12-0000", "ONE"), ("11-12-0001", "TWO")))
    header = "id\tpath\ttranscript\tspeaker\tsplit\n"
    (tmp_path / "m.tsv").write_text(header + rows)
    fs.write_text(fs.join(remote, "m.tsv"), header + rows.replace(f"{chapter}/", "dev-clean/11/12/"))
    for name, manifest in (("m1", str(tmp_path / "m.tsv")), ("m2", fs.join(remote, "m.tsv"))):
        assert prepare.main(["--format=manifest", f"--input={manifest}", f"--output_dir={tmp_path / name}",
                             *common]) == 0
        same(read_shards(tmp_path / name, "validation"))
    missing = tmp_path / "missing.tsv"
    missing.write_text(f"path\ttranscript\n{chapter}/nope.flac\tWORDS\n")
    with pytest.raises(Exception, match="no utterance could be prepared"):
        prepare.main(["--format=manifest", f"--input={missing}", f"--output_dir={tmp_path / 'm3'}", *common])
    assert _report(tmp_path / "m3")["splits"]["train"]["skipped"]["by_reason"] == {"missing_file": 1}
