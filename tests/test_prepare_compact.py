"""Compact shards: float16 frame storage against a float32 prepare of the same audio, old float32
shards still read; long utterances split at pauses with their transcripts divided at word boundaries."""

import csv
import json
import pathlib

import numpy as np
import pytest
import soundfile

from spectron_jax.data import features, prepare, preprocessors, splitting, sources, tfrecords
from test_prepare import assert_float16_of, chirp, read_shards

SR = 16000


# ----------------------------------------------------------------------------------- float16 storage


@pytest.fixture(scope="module")
def both_dtypes(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    chapter = root / "dev-clean" / "7" / "8"
    chapter.mkdir(parents=True)
    lines = []
    for k in range(3):
        soundfile.write(chapter / f"7-8-{k:04d}.flac", chirp(1.0 + 0.5 * k, f0=100 + 70 * k), SR)
        lines.append(f"7-8-{k:04d} WORDS {k}")
    (chapter / "7-8.trans.txt").write_text("\n".join(lines) + "\n")
    outs = {}
    for dtype in ("float16", "float32"):
        outs[dtype] = root.parent / f"{root.name}_{dtype}"
        args = ["--format=librispeech", f"--input={root}", f"--output_dir={outs[dtype]}", "--num_workers=1"]
        assert prepare.main(args + [f"--frame_dtype={dtype}", "--stats"]) == 0
    return outs


def test_float16_shards_hold_the_float32_features_rounded(both_dtypes):
    half, full = read_shards(both_dtypes["float16"], "validation"), read_shards(both_dtypes["float32"], "validation")
    assert sorted(half) == sorted(full) == ["7-8-0000", "7-8-0001", "7-8-0002"]
    for utt in full:
        assert_float16_of(half[utt]["log_mel"], full[utt]["log_mel"])
        np.testing.assert_array_equal(half[utt]["log_mel"], full[utt]["log_mel"].astype(np.float16).astype(np.float32))
        assert half[utt]["num_frames"] == full[utt]["num_frames"] and half[utt]["transcript"] == full[utt]["transcript"]
    sizes = {d: sum(p.stat().st_size for p in pathlib.Path(o).glob("*.tfrecord-*")) for d, o in both_dtypes.items()}
    assert 0.45 < sizes["float16"] / sizes["float32"] < 0.56, sizes
    for dtype, out in both_dtypes.items():
        report = json.loads((out / "report.json").read_text())
        assert report["frame_dtype"] == dtype and report["splits"]["validation"]["frame_dtype"] == dtype
        (index,) = (out / "shard_index").glob("*.json")
        assert json.loads(index.read_text())["frame_dtype"] == dtype
    # stats.json describes what readers get back: the stored (rounded) frames
    stats = features.FeatureStats.from_json(both_dtypes["float16"] / "stats.json")
    frames = np.concatenate([e["log_mel"] for e in half.values()]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, frames.mean(axis=0), atol=1e-5)


def _old_format_example(utt_id: str, frames: np.ndarray) -> bytes:
    """An Example exactly as the first shard format wrote it: float32 `log_mel` and no float16 field."""
    import tensorflow as tf

    def raw(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))

    feature = {
        "id": raw(utt_id),
        "transcript": raw("OLD WORDS"),
        "speaker": raw("7"),
        "duration": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0])),
        "num_frames": tf.train.Feature(int64_list=tf.train.Int64List(value=[frames.shape[0]])),
        "log_mel": tf.train.Feature(float_list=tf.train.FloatList(value=frames.reshape(-1).tolist())),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_old_float32_and_new_float16_records_read_alike():
    frames = features.log_mel(chirp(0.4))
    old = _old_format_example("old", frames)
    new = tfrecords.encode_example(sources.Segment("new", "NEW WORDS", "7"), 0.4, frames)
    new32 = tfrecords.encode_example(sources.Segment("n32", "NEW WORDS", "7"), 0.4, frames, "float32")
    assert len(new) < 0.6 * len(new32)
    for record, want in ((old, frames), (new32, frames), (new, frames.astype(np.float16).astype(np.float32))):
        for parsed in (tfrecords.parse_example(record), preprocessors.decode_serialized_example(record)):
            got = parsed["log_mel"].numpy()
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="frame_dtype"):
        tfrecords.encode_example(sources.Segment("x", "X", ""), 0.1, frames, "bfloat8")


# ------------------------------------------------------------------------------- splitting, unit level


def test_plan_pieces_prefers_fewest_pieces_then_balanced_and_drops_what_cannot_fit():
    # 0..100 frames, window 40, cuts at 20, 35, 50, 65, 80: three pieces are needed; the balanced
    # choice (35, 65 -> 35/30/35) beats e.g. (20, 50 -> 20/30/50 does not fit) or (35, 65) alternatives.
    pieces = splitting.plan_pieces(100, [20, 35, 50, 65, 80], 40)
    assert [(p.start, p.end, p.kept) for p in pieces] == [(0, 35, True), (35, 65, True), (65, 100, True)]
    # A 50-frame stretch between neighbouring cuts cannot fit a 40-frame window: dropped, the rest kept.
    pieces = splitting.plan_pieces(100, [30, 80], 40)
    assert [(p.start, p.end, p.kept) for p in pieces] == [(0, 30, True), (30, 80, False), (80, 100, True)]
    assert splitting.plan_pieces(30, [], 40) == [splitting.Piece(0, 30, True)]


def test_divide_transcript_keeps_every_word_in_order():
    text = "alpha be c delta epsilon zeta eta theta"
    rng = np.random.default_rng(0)
    for count in (1, 2, 3, 5, 8):
        weights = list(rng.uniform(0.1, 1.0, size=count))
        parts = splitting.divide_transcript(text, weights)
        assert len(parts) == count and " ".join(parts) == text and all(parts)
    # proportional to letters: the first half of the speech gets the words holding about half the letters
    assert splitting.divide_transcript("aaaa bbbb cccc dddd", [1.0, 1.0]) == ["aaaa bbbb", "cccc dddd"]
    assert splitting.divide_transcript("aaaaaaaaaaaa b c d", [1.0, 1.0]) == ["aaaaaaaaaaaa", "b c d"]


# ------------------------------------------------------------------------------ splitting in prepare


def _embedded_rows(embedded_dir, count):
    with open(embedded_dir / "manifest.tsv", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r["split"] == "train"]
    return rows[:count]


def _prompt_fbanks(out, split: str) -> dict:
    """{id: [frames, 80] prompt_fbank} of a split's shards, parsed from the raw Examples."""
    import tensorflow as tf

    found = {}
    for path in sorted(out.glob(f"{split}.tfrecord-*")):
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            example = tf.train.Example.FromString(record).features.feature
            values = np.asarray(example["prompt_fbank"].float_list.value, np.float32)
            found[example["id"].bytes_list.value[0].decode()] = values.reshape(-1, 80)
    return found


def test_long_utterance_is_split_at_pauses_into_pieces_that_fit(tmp_path, embedded_dir):
    if not (embedded_dir / "manifest.tsv").exists():
        pytest.skip("embedded corpus not built")
    rows = _embedded_rows(embedded_dir, 4)
    gap = np.zeros(int(0.5 * SR), np.float32)
    parts = []
    for row in rows:
        parts += [features.load_audio(embedded_dir / row["path"]), gap]
    long_wave = np.concatenate(parts[:-1])
    transcript = " ".join(r["transcript"] for r in rows)
    assert long_wave.size / SR > 16.0  # longer than the 13 s window
    chapter = tmp_path / "in" / "train-clean-100" / "5" / "6"
    chapter.mkdir(parents=True)
    soundfile.write(chapter / "5-6-0000.wav", long_wave, SR, subtype="FLOAT")
    soundfile.write(chapter / "5-6-0001.wav", chirp(15.0), SR, subtype="FLOAT")  # 15 s without a pause
    soundfile.write(chapter / "5-6-0002.wav", chirp(2.0), SR, subtype="FLOAT")  # short: untouched
    (chapter / "5-6.trans.txt").write_text(
        f"5-6-0000 {transcript}\n5-6-0001 A TONE WITH NO PAUSE AT ALL\n5-6-0002 SHORT ONE\n"
    )
    out = tmp_path / "out"
    args = ["--format=librispeech", f"--input={tmp_path / 'in'}", f"--output_dir={out}", "--num_workers=1"]
    assert prepare.main(args + ["--frame_dtype=float32", "--prompt_features=w2v_bert_fbank"]) == 0
    examples = read_shards(out, "train")
    pieces = sorted((e for k, e in examples.items() if k.startswith("5-6-0000-")), key=lambda e: e["id"])
    fbanks = _prompt_fbanks(out, "train")
    assert len(pieces) >= 2 and "5-6-0000" not in examples
    whole = features.log_mel(long_wave)
    window = splitting.SplitConfig().max_frames(features.SPECTRON_FEATURES)
    assert window == 1040  # 3 s prompt + 10 s continuation at 80 frames / s
    assert " ".join(p["transcript"].decode() for p in pieces) == transcript
    position = 0
    for piece in pieces:
        frames = piece["log_mel"]
        assert 0 < frames.shape[0] <= window
        np.testing.assert_array_equal(frames, whole[position : position + frames.shape[0]])  # a slice, in order
        start_ms = int(piece["id"].decode().split("-")[-2])
        assert abs(start_ms - position * 12.5) <= 0.5
        assert piece["duration"] == pytest.approx(frames.shape[0] / 80, abs=1e-6)
        # the encoder's stored prompt features are those of the piece's own first 3 s
        start = position * features.SPECTRON_FEATURES.hop
        expected = features.kaldi_fbank(long_wave[start : start + 3 * SR], features.W2V_BERT_FBANK)
        np.testing.assert_allclose(fbanks[piece["id"].decode()], expected, rtol=1e-5, atol=1e-4)
        position += frames.shape[0]
    assert position == whole.shape[0]  # nothing dropped
    # each cut lies in one of the inserted 0.5 s silences (the speech itself has shorter pauses, if any)
    bounds = np.cumsum([features.load_audio(embedded_dir / r["path"]).size + gap.size for r in rows])[:-1]
    for cut in np.cumsum([p["log_mel"].shape[0] for p in pieces])[:-1]:
        assert np.min(np.abs(cut * 200 - (bounds - gap.size // 2))) <= gap.size // 2
    assert "5-6-0002" in examples and examples["5-6-0002"]["transcript"] == b"SHORT ONE"
    report = json.loads((out / "report.json").read_text())["splits"]["train"]
    assert report["long_utterances"]["split"] == 2 and report["long_utterances"]["dropped"] == 1
    assert report["long_utterances"]["pieces"] == len(pieces)
    assert report["long_utterances"]["dropped_hours"] == pytest.approx(features.num_frames(15 * SR) / 80 / 3600, 1e-4)
    assert report["skipped"]["by_reason"] == {"too_long": 1}
    assert report["skipped"]["examples"]["too_long"][0]["id"].startswith("5-6-0001-")
    assert report["utterances"] == len(pieces) + 1
    # with splitting off, the long utterance is written whole (the pipeline's crop applies then)
    out2 = tmp_path / "whole"
    assert prepare.main([*args[:2], f"--output_dir={out2}", "--num_workers=1", "--max_utterance_seconds=0"]) == 0
    assert sorted(read_shards(out2, "train")) == ["5-6-0000", "5-6-0001", "5-6-0002"]
