"""The embedded corpus: the manifest agrees with the audio, splits are disjoint, the tokenizer round-trips."""

import collections
import csv
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf

COLUMNS = ["id", "path", "transcript", "speaker", "passage", "split", "duration"]


def read_manifest(corpus_dir: pathlib.Path) -> list[dict]:
    with open(corpus_dir / "manifest.tsv", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        assert reader.fieldnames == COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def rows(embedded_dir):
    return read_manifest(embedded_dir)


def test_manifest_matches_audio_files(rows, embedded_dir):
    assert len(rows) >= 400
    assert len({r["id"] for r in rows}) == len(rows)
    listed = {r["path"] for r in rows}
    on_disk = {f"audio/{p.name}" for p in (embedded_dir / "audio").iterdir()}
    assert listed == on_disk, "audio files and manifest rows differ"
    for r in rows:
        info = sf.info(str(embedded_dir / r["path"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), r["id"]
        assert info.format == "FLAC", r["id"]
        seconds = info.frames / info.samplerate
        assert seconds == pytest.approx(float(r["duration"]), abs=1e-3), r["id"]
        assert 3.5 <= seconds <= 8.0, r["id"]
        assert r["transcript"].strip() == r["transcript"] and r["transcript"], r["id"]


def test_audio_is_speech_not_silence(rows, embedded_dir):
    for r in rows[::25]:
        wave, _ = sf.read(str(embedded_dir / r["path"]), dtype="float32")
        assert np.isfinite(wave).all()
        rms = np.sqrt(np.mean(wave**2))
        assert rms > 0.01, f"{r['id']} is nearly silent (rms {rms:.4f})"


def test_splits_are_disjoint_by_passage(rows):
    splits_of_passage = collections.defaultdict(set)
    for r in rows:
        splits_of_passage[r["passage"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of_passage.values())
    counts = collections.Counter(r["split"] for r in rows)
    assert set(counts) == {"train", "validation", "test"}
    assert counts["train"] > counts["validation"] > 0 and counts["test"] > 0
    assert len(splits_of_passage) >= 60


def test_speakers_are_many_and_in_every_split(rows):
    speakers = {r["speaker"] for r in rows}
    assert len(speakers) >= 8
    for split in ("train", "validation", "test"):
        assert {r["speaker"] for r in rows if r["split"] == split} == speakers, split


def test_passages_follow_the_text_file(rows, repo_root):
    """Each passage's utterances, in order, spell out its sentences from passages.json."""
    spec = json.loads((repo_root / "data" / "passages.json").read_text())
    sentences = {p["id"]: " ".join(p["sentences"]) for p in spec["passages"]}
    spoken = collections.defaultdict(list)
    for r in sorted(rows, key=lambda r: r["id"]):
        spoken[r["passage"]].append(r["transcript"])
    for pid, parts in spoken.items():
        where = [sentences[pid].find(part) for part in parts]
        assert -1 not in where, pid
        assert where == sorted(where), f"{pid}: utterances out of order"


def test_tokenizer_round_trips_every_transcript(rows, embedded_dir):
    sp = spm.SentencePieceProcessor(model_file=str(embedded_dir / "spm" / "spectron_tiny.model"))
    assert sp.get_piece_size() == 512
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, 3)
    assert sp.piece_to_id("<sep>") == 4  # the reserved separator (TaskConfig.sep_id)
    for r in rows:
        ids = sp.encode(r["transcript"])
        assert sp.unk_id() not in ids and 4 not in ids, r["id"]
        assert sp.decode(ids) == r["transcript"], r["id"]


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")), reason="needs espeak-ng and sox")
def test_build_script_reproduces_the_committed_audio(rows, repo_root, embedded_dir, tmp_path):
    """Re-running the build script on the first two passages gives the committed samples and rows."""
    spec = json.loads((repo_root / "data" / "passages.json").read_text())
    subset = {"passages": spec["passages"][:2], "extra_text": spec["extra_text"] + [
        s for p in spec["passages"][2:] for s in p["sentences"]]}
    (tmp_path / "passages.json").write_text(json.dumps(subset))
    out = tmp_path / "embedded"
    subprocess.run([sys.executable, str(repo_root / "data" / "build_corpus.py"), "--passages",
                    str(tmp_path / "passages.json"), "--output_dir", str(out)], check=True, capture_output=True)
    rebuilt = read_manifest(out)
    committed = [r for r in rows if r["passage"] in {p["id"] for p in subset["passages"]}]
    assert rebuilt == committed
    for r in rebuilt:
        a, _ = sf.read(str(out / r["path"]), dtype="int16")
        b, _ = sf.read(str(embedded_dir / r["path"]), dtype="int16")
        np.testing.assert_array_equal(a, b)
