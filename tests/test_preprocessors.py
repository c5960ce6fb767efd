"""Preprocessors and feature converter: parsing, the 3 s split, SpecAugment, the phi split, batch rows."""

import fractions
import math

import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from spectron_jax.data import converter as converter_lib
from spectron_jax.data import preprocessors
from spectron_jax.data import tasks

MEL = 128
PROMPT_FRAMES = 240
WORDS = "the quick brown fox jumps over a lazy dog while speech models listen to long spoken stories".split()


def _serialized_example(uid: str, log_mel: np.ndarray, transcript: str = "the fox", num_frames=None) -> bytes:
    """A tf.train.Example in the prepare tool's schema."""
    feature = {
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[uid.encode()])),
        "transcript": tf.train.Feature(bytes_list=tf.train.BytesList(value=[transcript.encode()])),
        "speaker": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"spk1"])),
        "duration": tf.train.Feature(float_list=tf.train.FloatList(value=[len(log_mel) / 80.0])),
        "num_frames": tf.train.Feature(
            int64_list=tf.train.Int64List(value=[len(log_mel) if num_frames is None else num_frames])
        ),
        "log_mel": tf.train.Feature(float_list=tf.train.FloatList(value=log_mel.reshape(-1))),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _parsed_dataset(records: list[bytes], split: str | list[str] | None = None) -> tf.data.Dataset:
    """Serialized records -> parsed utterance dicts, optionally tagged with a split name per record."""
    ds = tf.data.Dataset.from_tensor_slices(records).map(
        lambda s: tf.io.parse_single_example(s, preprocessors.FEATURE_DESCRIPTION)
    )
    if split is not None:
        splits = [split] * len(records) if isinstance(split, str) else split
        tags = tf.data.Dataset.from_tensor_slices(splits)
        ds = tf.data.Dataset.zip(ds, tags).map(lambda ex, tag: {**ex, "split": tag})
    return preprocessors.parse_example(ds)


def _numpy(ds: tf.data.Dataset) -> list[dict]:
    return list(ds.as_numpy_iterator())


@pytest.fixture(scope="module")
def sp_model(throwaway_sp_model) -> str:
    return throwaway_sp_model


def test_parse_example_restores_row_major_frames():
    log_mel = np.random.default_rng(1).normal(size=(7, MEL)).astype(np.float32)
    parsed = preprocessors.decode_serialized_example(tf.constant(_serialized_example("u1", log_mel, "hello there")))
    np.testing.assert_array_equal(parsed["log_mel"].numpy(), log_mel)
    assert parsed["id"].numpy() == b"u1" and parsed["transcript"].numpy() == b"hello there"
    assert set(parsed) == {"id", "transcript", "speaker", "log_mel", "word_starts"}
    assert parsed["word_starts"].shape == (0,)  # a record without word timings


def test_parse_example_rejects_inconsistent_frame_count():
    record = _serialized_example("bad", np.zeros((5, MEL), np.float32), num_frames=6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_frames"):
        preprocessors.decode_serialized_example(tf.constant(record))


def test_split_gives_3s_prompt_and_the_rest_cropped_and_drops_short():
    config = tasks.TaskConfig(max_continuation_seconds=10.0)
    assert config.prompt_frames == PROMPT_FRAMES  # 3 s at 80 frames/s
    rng = np.random.default_rng(2)
    lengths = [200, 240, 279, 280, 300, 1040, 1100, 1300]
    mels = [rng.normal(size=(n, MEL)).astype(np.float32) for n in lengths]
    records = [_serialized_example(f"u{i}", m) for i, m in enumerate(mels)]
    ds = preprocessors.filter_short(_parsed_dataset(records), min_frames=config.min_frames)
    ds = preprocessors.split_prompt_continuation(
        ds, prompt_frames=config.prompt_frames, max_continuation_frames=config.max_continuation_frames
    )
    out = _numpy(ds)
    # The knobs in seconds: 3 s prompt + 0.5 s minimum continuation = 280 frames; crop at 10 s = 800.
    expected_kept = [i for i, n in enumerate(lengths) if n >= (3.0 + 0.5) * 80]
    assert [ex["id"].decode() for ex in out] == [f"u{i}" for i in expected_kept]
    for ex, i in zip(out, expected_kept):
        assert ex["prompt"].shape == (PROMPT_FRAMES, MEL)
        np.testing.assert_array_equal(ex["prompt"], mels[i][:240])
        joined = np.concatenate([ex["prompt"], ex["continuation"]])
        np.testing.assert_array_equal(joined, mels[i][: 240 + 800])
        assert ex["continuation"].shape[0] == min(lengths[i] - 240, 800)
        assert ex["total_frames"] == lengths[i]


def _augment(records, splits, config, ids=None):
    ds = _parsed_dataset(records, splits)
    ds = preprocessors.split_prompt_continuation(ds, prompt_frames=PROMPT_FRAMES, max_continuation_frames=None)
    return _numpy(preprocessors.spec_augment(ds, config=config, splits=("train",)))


def test_spec_augment_masks_prompt_only_deterministically_and_within_bounds():
    config = preprocessors.SpecAugmentConfig()
    log_mel = np.random.default_rng(3).normal(loc=-4.0, size=(300, MEL)).astype(np.float32)
    n = 12
    records = [_serialized_example(f"utt-{i}", log_mel) for i in range(n)]
    splits = ["train"] * n + ["validation"] * 2
    records += [_serialized_example("val-0", log_mel), _serialized_example("val-1", log_mel)]
    first, second = _augment(records, splits, config), _augment(records, splits, config)

    prompt = log_mel[:PROMPT_FRAMES]
    masks = []
    for ex, again in zip(first, second):
        np.testing.assert_array_equal(ex["prompt"], again["prompt"])  # same example, same masks
        np.testing.assert_array_equal(ex["continuation"], log_mel[PROMPT_FRAMES:])  # never augmented
        changed = ex["prompt"] != prompt
        if ex["split"] == b"validation":
            assert not changed.any()
            continue
        masks.append(changed.tobytes())
        full_frames, full_bins = changed.all(axis=1), changed.all(axis=0)
        # Every masked cell lies in a wholly masked frame or a wholly masked mel bin.
        np.testing.assert_array_equal(changed, full_frames[:, None] | full_bins[None, :])
        assert full_bins.sum() <= config.num_freq_masks * config.max_freq_mask_bins
        assert full_frames.sum() <= config.num_time_masks * math.floor(config.max_time_mask_ratio * PROMPT_FRAMES)
        np.testing.assert_allclose(ex["prompt"][changed], prompt.mean(), rtol=1e-5)
    assert len(set(masks)) == n  # different ids, different masks
    assert sum(np.frombuffer(m, bool).any() for m in masks) >= n - 1


def test_spec_augment_seed_and_zero_fill():
    log_mel = np.random.default_rng(4).normal(loc=-4.0, size=(260, MEL)).astype(np.float32)
    records = [_serialized_example("same-id", log_mel)]
    a = _augment(records, "train", preprocessors.SpecAugmentConfig(seed=0))[0]["prompt"]
    b = _augment(records, "train", preprocessors.SpecAugmentConfig(seed=1, mask_value="zero"))[0]["prompt"]
    changed_b = b != log_mel[:PROMPT_FRAMES]
    assert changed_b.any() and np.all(b[changed_b] == 0.0)
    assert not np.array_equal(a != log_mel[:PROMPT_FRAMES], changed_b)
    with pytest.raises(ValueError, match="mask_value"):
        preprocessors.SpecAugmentConfig(mask_value="noise")


@pytest.mark.parametrize("transcript, share, expected", [
    ("one two three four", 0.5, 2),      # letters 3 3 5 4: starts 0 3 6 11 (of 15), 7.5 is nearest 6
    ("one two three four", 0.6, 3),      # 9 is nearer 11 than 6: phi moves past 'three'
    ("one two three four", 0.0, 0),
    ("one two three four", 1.0, 4),
    ("Hello, world! Fine.", 0.45, 1),    # punctuation is not spoken: letters 5 5 4, 6.3 is nearest 5
    ("a bb ccccccccc", 0.2, 2),          # 2.4 of 12: start 3 (after 'bb') is nearer than 1
    ("single", 0.3, 0),                  # 1.8 of 6: nearer the start than the end
])
def test_phi_by_letters_snaps_to_the_nearest_word_start(transcript, share, expected):
    words = tf.strings.split(tf.constant(transcript))
    assert int(preprocessors.phi_word_index(words, tf.constant(share))) == expected


def test_phi_from_word_timings_takes_the_nearest_word_start():
    words = tf.strings.split(tf.constant("one two three four"))

    def phi(starts, prompt_seconds=3.0, share=0.5):
        return int(preprocessors.phi_word_index(words, tf.constant(share), tf.constant(starts, tf.float32),
                                                tf.constant(prompt_seconds)))

    assert phi([0.1, 0.9, 2.6, 3.2]) == 3   # 3.2 is 0.2 s from the prompt's end, 2.6 is 0.4
    assert phi([0.1, 0.9, 2.6, 3.5]) == 2
    assert phi([0.1, 0.9, 1.5, 2.0], share=0.5) == 3   # the end (6 s) is farther than the start of 'four'
    assert phi([0.1, 0.9, 1.5, 2.0], share=0.9) == 4   # the end (3.33 s) is nearest: all four words
    assert phi([0.1, 3.1, 4.0, 5.0]) == 1
    assert phi([0.5, 1.0]) == 2             # timings that do not match the words: the letter rule (share 0.5)


def test_manifest_word_timings_reach_the_shards_and_place_phi(tmp_path, sp_model):
    """A manifest's `word_starts` column -> Segment -> the record -> phi at the timed boundary; rows whose
    timings do not fit their words are skipped with the column named."""
    from spectron_jax.data import sources, tfrecords

    words = WORDS[:6]
    (tmp_path / "m.tsv").write_text(
        "id\tpath\ttranscript\tword_starts\n"
        f"a\ta.flac\t{' '.join(words)}\t0.0 0.5 1.2 2.0 2.9 4.4\n"
        f"b\tb.flac\t{' '.join(words)}\t0.0 0.5 1.2\n"
        f"c\tc.flac\t{' '.join(words)}\t0.0 0.5 0.4 2.0 2.9 4.4\n"
        f"d\td.flac\t{' '.join(words)}\t\n")
    listing = sources.read_manifest(str(tmp_path / "m.tsv"))
    segments = {seg.id: seg for src in listing.sources for seg in src.segments}
    assert segments["a"].word_starts == (0.0, 0.5, 1.2, 2.0, 2.9, 4.4) and segments["d"].word_starts is None
    assert sorted((k.id, k.reason) for k in listing.skips) == [("b", "malformed_line"), ("c", "malformed_line")]
    assert all("word_starts" in k.detail for k in listing.skips)
    record = tfrecords.encode_example(segments["a"], 6.0, np.zeros((480, MEL), np.float32), "float32")
    ds = preprocessors.parse_example(tf.data.Dataset.from_tensors(record).map(
        lambda r: tf.io.parse_single_example(r, preprocessors.FEATURE_DESCRIPTION)))
    ds = preprocessors.split_prompt_continuation(ds, prompt_frames=PROMPT_FRAMES, max_continuation_frames=None)
    features = {"text": seqio.Feature(seqio.SentencePieceVocabulary(sp_model), add_eos=False)}
    (ex,) = _numpy(preprocessors.tokenize_transcript(ds, features, phi_split=True))
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    head = sp.encode(" ".join(words[:4]))  # 'jumps' starts at 2.9 s, the word start nearest 3 s
    np.testing.assert_array_equal(ex["text_segments"], [1] * len(head) + [2] * (len(ex["text"]) - len(head)))
    assert "word_starts" not in ex


def _tokenized(sp_model, transcript, total_frames, max_cont, sep_id, word_starts=None):
    log_mel = np.zeros((total_frames, MEL), np.float32)
    ds = _parsed_dataset([_serialized_example("u", log_mel, transcript)])
    if word_starts is not None:
        ds = ds.map(lambda ex: {**ex, preprocessors.WORD_STARTS_KEY: tf.constant(word_starts, tf.float32)})
    ds = preprocessors.split_prompt_continuation(ds, prompt_frames=PROMPT_FRAMES, max_continuation_frames=max_cont)
    features = {"text": seqio.Feature(seqio.SentencePieceVocabulary(sp_model), add_eos=False)}
    (ex,) = _numpy(preprocessors.tokenize_transcript(ds, features, phi_split=True, trim_to_kept_audio=True,
                                                     sep_id=sep_id))
    return ex


@pytest.mark.parametrize("total_frames, max_cont", [(600, None), (2000, 800)])
def test_phi_split_writes_the_separator_at_a_word_boundary(embedded_dir, total_frames, max_cont):
    model = str(embedded_dir / "spm" / "spectron_tiny.model")
    sp = spm.SentencePieceProcessor(model_file=model)
    sep = sp.piece_to_id(tasks.SEP_PIECE)
    words = WORDS[:12]
    ex = _tokenized(model, " ".join(words), total_frames, max_cont, sep)
    # the reference: the letters before each word start, the one nearest the prompt's share of them
    starts = np.concatenate([[0], np.cumsum([len(w) for w in words])])
    k = int(np.argmin(np.abs(starts - PROMPT_FRAMES / total_frames * starts[-1])))
    head, tail = sp.encode(" ".join(words[:k])), sp.encode(" ".join(words[k:]))
    assert head + tail == sp.encode(" ".join(words))  # a word boundary: no piece is cut
    kept_cont = len(tail) if max_cont is None else math.floor(
        fractions.Fraction(len(tail) * max_cont, total_frames - PROMPT_FRAMES) + fractions.Fraction(1, 2))
    np.testing.assert_array_equal(ex["text"], head + [sep] + tail[:kept_cont])
    np.testing.assert_array_equal(ex["text_segments"], [1] * (len(head) + 1) + [2] * kept_cont)
    assert list(ex["text"]).count(sep) == 1


def test_phi_split_without_separator_and_with_word_timings(sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    words = WORDS[:6]  # the quick brown fox jumps over; the prompt is 240 of 480 frames = 3 of 6 s
    ex = _tokenized(sp_model, " ".join(words), 480, None, None, word_starts=[0.0, 0.5, 1.2, 2.0, 2.9, 4.4])
    head, tail = sp.encode(" ".join(words[:4])), sp.encode(" ".join(words[4:]))  # 'jumps' starts at 2.9 s
    np.testing.assert_array_equal(ex["text"], head + tail)
    np.testing.assert_array_equal(ex["text_segments"], [1] * len(head) + [2] * len(tail))


def test_converter_row_matches_numpy_construction():
    rng = np.random.default_rng(5)
    prompt = rng.normal(size=(3, MEL)).astype(np.float32)
    cont = rng.normal(size=(5, MEL)).astype(np.float32)
    example = {
        "prompt": tf.constant(prompt),
        "continuation": tf.constant(cont),
        "text": tf.constant([7, 8, 9], tf.int32),
        "text_segments": tf.constant([1, 1, 2], tf.int32),
    }
    conv = converter_lib.SpectronFeatureConverter(
        prompt_len=5, text_len=6, cont_len=8, reduction_factor=4, with_segments=True
    )
    row, stats = conv.convert_example(example)

    expected_prompt = np.zeros((5, MEL), np.float32)
    expected_prompt[:3] = prompt
    expected_cont = np.zeros((8, MEL), np.float32)
    expected_cont[:5] = cont
    expected = {
        "prompt_frames": expected_prompt,
        "prompt_mask": np.array([1, 1, 1, 0, 0], np.int32),
        "text_inputs": np.array([3, 7, 8, 9, 0, 0], np.int32),
        "text_targets": np.array([7, 8, 9, 1, 0, 0], np.int32),
        "text_weights": np.array([1, 1, 1, 1, 0, 0], np.float32),
        "text_segments": np.array([1, 1, 2, 2, 0, 0], np.int32),
        "cont_frames": expected_cont,
        "cont_mask": np.array([1, 1, 1, 1, 1, 0, 0, 0], np.int32),
    }
    assert set(row) == set(expected)
    for key, value in expected.items():
        assert row[key].dtype.as_numpy_dtype == value.dtype, key
        np.testing.assert_array_equal(row[key].numpy(), value, err_msg=key)
    assert {k: int(v) for k, v in stats.items()} == dict.fromkeys(converter_lib.STATS_KEYS, 0)
    spec = conv.batch_spec(2)
    assert {k: (s[1:], d) for k, (s, d) in spec.items()} == {k: (v.shape, v.dtype) for k, v in expected.items()}


def test_converter_cuts_long_text_keeps_eos_and_counts_cuts():
    conv = converter_lib.SpectronFeatureConverter(prompt_len=2, text_len=4, cont_len=4, reduction_factor=2)
    example = {
        "prompt": tf.ones((3, MEL)),
        "continuation": tf.ones((7, MEL)),
        "text": tf.constant([10, 11, 12, 13, 14], tf.int32),
    }
    row, stats = conv.convert_example(example)
    np.testing.assert_array_equal(row["text_inputs"], [3, 10, 11, 12])
    np.testing.assert_array_equal(row["text_targets"], [10, 11, 12, 1])
    np.testing.assert_array_equal(row["text_weights"], [1, 1, 1, 1])
    np.testing.assert_array_equal(row["cont_mask"], [1, 1, 1, 1])
    assert "text_segments" not in row
    assert {k: int(v) for k, v in stats.items()} == {
        "truncated_prompt_frames": 1,
        "truncated_text_tokens": 2,
        "truncated_cont_frames": 3,
    }
    batches = conv(tf.data.Dataset.from_tensors(example).repeat(3), batch_size=2).as_numpy_iterator()
    ((batched_row, batched_stats),) = list(batches)  # the short last batch is dropped
    assert batched_row["cont_frames"].shape == (2, 4, MEL)
    np.testing.assert_array_equal(batched_row["text_targets"], [[10, 11, 12, 1]] * 2)
    np.testing.assert_array_equal(batched_stats["truncated_text_tokens"], [2, 2])


def test_converter_rejects_cont_len_not_multiple_of_r():
    with pytest.raises(ValueError, match="multiple of the reduction factor"):
        converter_lib.SpectronFeatureConverter(cont_len=10, reduction_factor=4)


def test_spec_augment_draws_new_masks_each_epoch_and_repeats_them_on_resume():
    log_mel = np.random.default_rng(5).normal(loc=-4.0, size=(280, MEL)).astype(np.float32)
    records = [_serialized_example("one-utterance", log_mel)] * 6
    epochs = tf.constant([0, 1, 2, 3, 0, 1], tf.int64)  # epochs 0 and 1 read again (a resumed run)

    ds = _parsed_dataset(records, "train")
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.from_tensor_slices(epochs)).map(
        lambda ex, e: {**ex, preprocessors.EPOCH_FEATURE: e})
    ds = preprocessors.split_prompt_continuation(ds, prompt_frames=PROMPT_FRAMES, max_continuation_frames=None)
    out = _numpy(preprocessors.spec_augment(ds, config=preprocessors.SpecAugmentConfig(), splits=("train",)))
    masks = [(ex["prompt"] != log_mel[:PROMPT_FRAMES]).tobytes() for ex in out]
    assert len(set(masks[:4])) == 4  # four epochs, four different masks
    assert masks[4] == masks[0] and masks[5] == masks[1]  # the same (example, epoch), the same masks
    # Literature defaults (Park et al. 2019, LB): one frequency and one time mask.
    changed = np.frombuffer(masks[0], bool).reshape(PROMPT_FRAMES, MEL)
    assert changed.all(axis=0).sum() <= 27 and changed.all(axis=1).sum() <= PROMPT_FRAMES // 3


def test_phi_rule_of_the_tasks_and_of_the_evaluation_agree_on_the_corpus(embedded_dir):
    """The TensorFlow rule (Tasks) and the Python one (`data.phi`, evaluation) cut every transcript alike."""
    from spectron_jax.data import phi

    rows = [line.split("\t") for line in (embedded_dir / "manifest.tsv").read_text().splitlines()[1:]]
    shares = np.random.default_rng(0).uniform(0.0, 1.0, len(rows)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices(([r[2] for r in rows], shares)).map(
        lambda text, share: preprocessors.phi_word_index(tf.strings.split(text), share))
    got = list(ds.as_numpy_iterator())
    assert got == [phi.prompt_word_count(r[2].split(), float(s)) for r, s in zip(rows, shares)]
    assert 0 < np.mean([0 < k < len(r[2].split()) for k, r in zip(got, rows)])  # not all at an end
