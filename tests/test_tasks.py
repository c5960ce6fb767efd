"""seqio Tasks and the input pipeline: registration, contents, exact resume, per-host sharding."""

import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from spectron_jax.data import pipeline, tasks

MEL = 128
WORDS = "the quick brown fox jumps over a lazy dog while speech models listen to long spoken stories".split()
# A small continuation crop (1 s = 80 frames) keeps batches small: cont_len 80 = 20 steps of r = 4.
CONFIG = tasks.TaskConfig(max_continuation_seconds=1.0, phi_split=True)
SHAPES = dict(prompt_len=240, text_len=40, cont_len=80, reduction_factor=4, with_segments=True)


def _serialized_example(uid: str, log_mel: np.ndarray, transcript: str) -> bytes:
    """A tf.train.Example in the prepare tool's schema."""
    feature = {
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[uid.encode()])),
        "transcript": tf.train.Feature(bytes_list=tf.train.BytesList(value=[transcript.encode()])),
        "speaker": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"spk"])),
        "duration": tf.train.Feature(float_list=tf.train.FloatList(value=[len(log_mel) / 80.0])),
        "num_frames": tf.train.Feature(int64_list=tf.train.Int64List(value=[len(log_mel)])),
        "log_mel": tf.train.Feature(float_list=tf.train.FloatList(value=log_mel.reshape(-1))),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


class Corpus:
    """Shards written here: per split, files of utterances whose bin 0 holds the utterance's number."""

    def __init__(self, root, files_per_split):
        rng = np.random.default_rng(0)
        self.data_dir = str(root / "shards")
        tf.io.gfile.makedirs(self.data_dir)
        self.utterances = {}  # number -> (split, log_mel, transcript)
        number = 0
        for split, (num_files, per_file) in files_per_split.items():
            for f in range(num_files):
                path = f"{self.data_dir}/{split}.tfrecord-{f:05d}-of-{num_files:05d}"
                with tf.io.TFRecordWriter(path) as writer:
                    for _ in range(per_file):
                        frames = int(rng.integers(250, 420))  # some under the 280-frame minimum
                        log_mel = rng.normal(loc=-5.0, size=(frames, MEL)).astype(np.float32)
                        log_mel[:, 0] = number
                        transcript = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
                        writer.write(_serialized_example(f"utt{number:03d}", log_mel, transcript))
                        self.utterances[number] = (split, log_mel, transcript)
                        number += 1

    def kept(self, split):
        """Numbers of the split's utterances that pass the length filter (3.5 s = 280 frames)."""
        return {n for n, (s, m, _) in self.utterances.items() if s == split and len(m) >= 280}


@pytest.fixture(scope="module")
def sp_model(throwaway_sp_model) -> str:
    return throwaway_sp_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sp_model) -> Corpus:
    corpus = Corpus(tmp_path_factory.mktemp("corpus"), {"train": (2, 9), "validation": (1, 7)})
    tasks.register_tasks({"spectron_embedded": corpus.data_dir}, sp_model, CONFIG)
    return corpus


def _number(row_cont_frames: np.ndarray) -> int:
    """The utterance a batch row came from (bin 0 of the never-augmented continuation)."""
    return int(row_cont_frames[0, 0])


def _rows(batch: dict) -> list[int]:
    return [_number(batch["cont_frames"][i]) for i in range(len(batch["cont_frames"])) if batch["cont_mask"][i].any()]


def test_register_tasks_registers_all_and_replaces(corpus, sp_model, tmp_path):
    first = tasks.register_tasks({"spectron_embedded": corpus.data_dir}, sp_model, tasks.TaskConfig())
    assert set(first) == set(tasks.TASK_NAMES)
    assert "text_segments" not in seqio.get_mixture_or_task("spectron_embedded").output_features
    again = tasks.register_tasks({"spectron_embedded": corpus.data_dir}, sp_model, CONFIG)
    task = seqio.get_mixture_or_task("spectron_embedded")
    assert task is again["spectron_embedded"] and task is not first["spectron_embedded"]
    assert "text_segments" in task.output_features
    assert task.output_features["prompt"].rank == 2 and task.output_features["prompt"].dtype == tf.float32

    with pytest.raises(ValueError, match="unknown Spectron task"):
        tasks.register_tasks({"spectron_other": corpus.data_dir}, sp_model)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tasks.register_tasks(None, str(tmp_path / "missing.model"))
    folder = tmp_path
    (folder / "c.txt").write_text("\n".join(WORDS * 20))
    spm.SentencePieceTrainer.train(  # sentencepiece's own ids: unk 0, bos 1, eos 2
        input=str(folder / "c.txt"), model_prefix=str(folder / "other"), vocab_size=30,
        hard_vocab_limit=False, minloglevel=2,
    )
    with pytest.raises(ValueError, match="other.model.*eos is 2, expected 1"):
        tasks.register_tasks(None, str(folder / "other.model"))


def test_task_dataset_matches_numpy_reference(corpus, sp_model):
    task = seqio.get_mixture_or_task("spectron_embedded")
    examples = list(task.get_dataset(split="validation", shuffle=False).as_numpy_iterator())
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert sorted(int(ex["id"][3:]) for ex in examples) == sorted(corpus.kept("validation"))
    for ex in examples:
        split, log_mel, transcript = corpus.utterances[int(ex["id"][3:])]
        np.testing.assert_array_equal(ex["prompt"], log_mel[:240])  # validation: no SpecAugment
        np.testing.assert_array_equal(ex["continuation"], log_mel[240:320])
        tokens = sp.encode(transcript)
        kept = (2 * len(tokens) * min(len(log_mel), 320) + len(log_mel)) // (2 * len(log_mel))
        np.testing.assert_array_equal(ex["text"], tokens[:kept])
        assert ex["split"] == b"validation"


def test_pipeline_batches_follow_the_contract(corpus, sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    inputs = pipeline.make_pipeline("spectron_embedded", "train", batch_size=4, seed=3, **SHAPES)
    batch = next(inputs)
    spec = inputs.batch_spec
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
    assert spec["cont_frames"][0] == (4, 80, MEL)
    augmented = 0
    for i, number in enumerate(_rows(batch)):
        split, log_mel, transcript = corpus.utterances[number]
        assert split == "train" and len(log_mel) >= 280
        cont = log_mel[240:320]
        np.testing.assert_array_equal(batch["cont_frames"][i], np.pad(cont, [(0, 80 - len(cont)), (0, 0)]))
        np.testing.assert_array_equal(batch["cont_mask"][i], np.arange(80) < min(len(log_mel) - 240, 80))
        tokens = sp.encode(transcript)
        kept = (2 * len(tokens) * min(len(log_mel), 320) + len(log_mel)) // (2 * len(log_mel))
        n = len(tokens[:kept])
        np.testing.assert_array_equal(batch["text_inputs"][i][: n + 1], [3] + tokens[:kept])
        np.testing.assert_array_equal(batch["text_targets"][i][: n + 1], tokens[:kept] + [1])
        assert batch["text_weights"][i].sum() == n + 1 and not batch["text_inputs"][i][n + 1 :].any()
        assert batch["text_segments"][i][n] == 2 and set(batch["text_segments"][i][: n + 1]) <= {1, 2}
        assert batch["prompt_mask"][i].all()
        augmented += not np.array_equal(batch["prompt_frames"][i], log_mel[:240])
    assert augmented >= 3  # the training split is SpecAugmented


def test_resume_yields_exactly_the_uninterrupted_batches(corpus):
    def make():
        return pipeline.make_pipeline("spectron_embedded", "train", batch_size=4, seed=11, **SHAPES)

    uninterrupted = make()
    head = [next(uninterrupted) for _ in range(3)]
    state = uninterrupted.state()
    assert all(isinstance(v, int) for v in state.values())
    tail = [next(uninterrupted) for _ in range(5)]  # crosses into the third epoch

    resumed = make()
    next(resumed)  # a restore replaces whatever position it had
    resumed.restore(state)
    for expected in tail:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert resumed.state() == uninterrupted.state()

    # Epochs follow each other without a gap, each a full pass over the kept examples, reshuffled.
    order = [n for batch in head + tail for n in _rows(batch)]
    kept = corpus.kept("train")
    first, second = order[: len(kept)], order[len(kept) : 2 * len(kept)]
    assert set(first) == kept and set(second) == kept and first != second

    with pytest.raises(ValueError, match="num_shards"):
        pipeline.make_pipeline("spectron_embedded", "train", 4, 0, 2, seed=11, **SHAPES).restore(state)


@pytest.mark.parametrize("split", ["train", "validation"])  # 2 files: by file; 1 file: by example
def test_two_hosts_read_disjoint_examples_covering_the_split(corpus, split):
    seen = []
    for host in range(2):
        inputs = pipeline.make_pipeline(
            "spectron_embedded", split, batch_size=4, shard_index=host, num_shards=2, seed=5,
            repeat=False, drop_remainder=False, **SHAPES,
        )
        batches = list(inputs)
        assert all(b["prompt_frames"].shape[0] == 2 for b in batches)  # per-host rows: 4 / 2
        for b in batches:  # padded rows are empty
            empty = ~b["cont_mask"].any(axis=1)
            assert not b["prompt_mask"][empty].any() and not b["text_weights"][empty].any()
        seen.append([n for b in batches for n in _rows(b)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(corpus.kept(split))


def test_pipeline_counts_what_it_cuts(corpus, sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    shapes = dict(SHAPES, text_len=4, cont_len=40, reduction_factor=4)
    inputs = pipeline.make_pipeline("spectron_embedded", "validation", 2, shuffle=False, repeat=False, **shapes)
    numbers = [n for batch in inputs for n in _rows(batch)]
    cut_tokens = cut_frames = 0
    for n in numbers:
        _, log_mel, transcript = corpus.utterances[n]
        tokens = sp.encode(transcript)
        kept = (2 * len(tokens) * min(len(log_mel), 320) + len(log_mel)) // (2 * len(log_mel))
        cut_tokens += max(0, kept - 3)
        cut_frames += max(0, min(len(log_mel) - 240, 80) - 40)
    assert inputs.truncation_counts == {
        "truncated_prompt_frames": 0,
        "truncated_text_tokens": cut_tokens,
        "truncated_cont_frames": cut_frames,
    }
    assert cut_tokens > 0 and cut_frames > 0


def test_make_pipeline_rejects_bad_arguments(corpus, sp_model, tmp_path):
    with pytest.raises(ValueError, match="multiple of num_shards"):
        pipeline.make_pipeline("spectron_embedded", "train", batch_size=3, num_shards=2)
    with pytest.raises(ValueError, match="unknown task"):
        pipeline.make_pipeline("no_such_task", "train", batch_size=2)
    dirs = {"spectron_embedded": corpus.data_dir, "spectron_librilight": str(tmp_path / "empty")}
    tasks.register_tasks(dirs, sp_model, CONFIG)
    with pytest.raises(FileNotFoundError, match="empty"):
        pipeline.make_pipeline("spectron_librilight", "train", batch_size=2)


def test_repeating_pipeline_over_only_short_utterances_is_an_error(corpus, sp_model, tmp_path):
    """Every utterance below the 3.5 s minimum: the first batch raises instead of waiting forever."""
    shards = tmp_path / "short"
    shards.mkdir()
    rng = np.random.default_rng(3)
    with tf.io.TFRecordWriter(str(shards / "train.tfrecord-00000-of-00001")) as writer:
        for i in range(4):
            writer.write(_serialized_example(f"s{i}", rng.normal(size=(200, MEL)).astype(np.float32), "the fox"))
    tasks.register_tasks({"spectron_embedded": corpus.data_dir, "spectron_librispeech": str(shards)}, sp_model, CONFIG)
    short = pipeline.make_pipeline("spectron_librispeech", "train", batch_size=2, **SHAPES)
    with pytest.raises(ValueError, match="no utterance left after the length filter"):
        next(short)
