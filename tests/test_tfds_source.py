"""`prepare --format=tfds`: an offline-built TFDS LibriSpeech equals `--format=librispeech`; mocked TFDS data.

One TFDS dataset (`local_librispeech`, built from a LibriSpeech-layout tree of embedded-corpus audio)
and its two preparations are shared by the module; the mocked datasets need no files.
"""

import json
import pathlib

import numpy as np
import pytest
import soundfile

from spectron_jax import cli
from spectron_jax.data import features, prepare, tfds_source

from test_prepare import read_shards

# LibriSpeech folder -> [(utterance id, embedded-corpus clip, transcript)]
TREE = {
    "train-clean-100": [("19-198-0000", "p001_u00", "OLD MAREN KEPT THE LIGHTHOUSE"), ("19-198-0001", "p001_u01", "EVERY EVENING")],
    "dev-clean": [("27-300-0000", "p001_u02", "ONE STORMY AUTUMN NIGHT")],
    "test-clean": [("31-400-0000", "p002_u00", "A SMALL FISHING BOAT")],
}
SPLITS = {"train-clean-100": "train", "dev-clean": "validation", "test-clean": "test"}


def make_tree(root: pathlib.Path, embedded_dir: pathlib.Path) -> None:
    """A LibriSpeech tree of the first 1.2 s of embedded-corpus clips (16 kHz int16 flac)."""
    for folder, utterances in TREE.items():
        lines: dict[pathlib.Path, list[str]] = {}
        for utt, clip, text in utterances:
            speaker, chapter, _ = utt.split("-")
            chapter_dir = root / folder / speaker / chapter
            chapter_dir.mkdir(parents=True, exist_ok=True)
            wave, rate = soundfile.read(embedded_dir / "audio" / f"{clip}.flac", dtype="int16")
            soundfile.write(chapter_dir / f"{utt}.flac", wave[: int(1.2 * rate)], rate, subtype="PCM_16")
            lines.setdefault(chapter_dir / f"{speaker}-{chapter}.trans.txt", []).append(f"{utt} {text}")
        for path, body in lines.items():
            path.write_text("\n".join(body) + "\n")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, embedded_dir):
    from spectron_jax.data import local_librispeech

    root = tmp_path_factory.mktemp("tfds")
    make_tree(root / "LibriSpeech", embedded_dir)
    local_librispeech.build(str(root / "LibriSpeech"), str(root / "tfds_data"))
    common = ["--num_workers=1"]
    assert prepare.main(["--format=tfds", "--input=local_librispeech", f"--tfds_data_dir={root / 'tfds_data'}",
                         f"--output_dir={root / 'from_tfds'}", *common]) == 0
    assert prepare.main(["--format=librispeech", f"--input={root / 'LibriSpeech'}",
                         f"--output_dir={root / 'from_files'}", *common]) == 0
    return root


def test_tfds_shards_equal_the_librispeech_format(prepared):
    for folder, split in SPLITS.items():
        from_tfds = read_shards(prepared / "from_tfds", split)
        from_files = read_shards(prepared / "from_files", split)
        assert sorted(from_tfds) == sorted(u for u, _, _ in TREE[folder])
        assert sorted(from_files) == sorted(from_tfds)
        for utt, _, text in TREE[folder]:
            a, b = from_tfds[utt], from_files[utt]
            assert a["transcript"].decode() == text
            assert a["speaker"].decode() == utt.split("-")[0] == b["speaker"].decode()
            assert a["num_frames"] == b["num_frames"]
            np.testing.assert_array_equal(a["log_mel"], b["log_mel"])
            assert a["duration"] == pytest.approx(b["duration"])


def test_tfds_report_and_resume(prepared):
    report = json.loads((prepared / "from_tfds" / "report.json").read_text())
    assert report["format"] == "tfds" and report["input"] == "local_librispeech"
    assert {s: v["utterances"] for s, v in report["splits"].items()} == {"train": 2, "validation": 1, "test": 1}
    assert report["totals"]["skipped"] == 0
    again = prepare.main(["--format=tfds", "--input=local_librispeech", f"--tfds_data_dir={prepared / 'tfds_data'}",
                          f"--output_dir={prepared / 'from_tfds'}", "--num_workers=1", "--splits=validation"])
    assert again == 0
    rerun = json.loads((prepared / "from_tfds" / "report.json").read_text())["run"]
    assert rerun["shards_written"] == 0 and rerun["shards_resumed"] == 1


def test_tfds_split_choice_and_map(prepared, tmp_path):
    out = tmp_path / "out"
    assert prepare.main(["--format=tfds", "--input=local_librispeech", f"--tfds_data_dir={prepared / 'tfds_data'}",
                         "--tfds_splits=dev_clean,test_clean", "--tfds_split_map=dev=heldout,test_clean=heldout",
                         f"--output_dir={out}", "--num_workers=1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {s: v["utterances"] for s, v in report["splits"].items()} == {"heldout": 2}


def test_tfds_errors_are_one_line(prepared, tmp_path):
    base = ["--format=tfds", f"--tfds_data_dir={prepared / 'tfds_data'}", f"--output_dir={tmp_path / 'o'}"]
    with pytest.raises(cli.InputError, match="no split nope"):
        prepare.main([*base, "--input=local_librispeech", "--tfds_splits=nope"])
    with pytest.raises(cli.InputError, match="no feature 'words'"):
        prepare.main([*base, "--input=local_librispeech", "--tfds_text_key=words"])
    with pytest.raises(cli.InputError, match="no_such_dataset_xyz"):
        prepare.main([*base, "--input=no_such_dataset_xyz"])
    with pytest.raises(cli.UsageError, match="--tfds_split_map"):
        prepare.main([*base, "--input=local_librispeech", "--tfds_split_map=dev"])


# ------------------------------------------------------------------------------------------- mocked


@pytest.mark.filterwarnings("ignore:n_fft=1024 is too large")  # mock audio is 5-50 samples long
def test_mocked_librispeech(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        expected = list(tfds.as_numpy(tfds.load("librispeech", split="dev_clean", data_dir=str(tmp_path))))
        assert prepare.main(["--format=tfds", "--input=librispeech", f"--tfds_data_dir={tmp_path}",
                             "--tfds_splits=dev_clean", f"--output_dir={tmp_path / 'out'}", "--num_workers=1",
                             "--frame_dtype=float32"]) == 0
    shards = read_shards(tmp_path / "out", "validation")
    assert len(shards) == 4
    for example in expected:
        got = shards[example["id"].decode()]
        assert got["transcript"].decode() == " ".join(example["text"].decode().split())
        assert got["speaker"].decode() == str(example["speaker_id"])
        assert example["speech"].dtype == np.int16
        reference = features.log_mel(example["speech"].astype(np.float32) / 32768.0)
        np.testing.assert_allclose(got["log_mel"], reference, rtol=0, atol=1e-5)


def _mock_examples(examples, audio_key="speech"):
    """An `as_dataset_fn` for `tfds.testing.mock_data` yielding `examples` (dicts of numpy values)."""
    import tensorflow as tf

    def as_dataset(self, split, decoders=None, **kwargs):
        feats = self.info.features
        signature = {k: tf.TensorSpec(shape=feats[k].shape, dtype=feats[k].dtype) for k in examples[0]}
        ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)
        return ds

    return as_dataset


def test_mocked_bad_examples_are_counted(tmp_path):
    import tensorflow_datasets as tfds

    tone = (3000 * np.sin(np.arange(8000) / 7.0)).astype(np.int16)
    examples = [
        {"id": "1-2-0000", "text": "GOOD ONE", "speaker_id": 1, "chapter_id": 2, "speech": tone},
        {"id": "1-2-0001", "text": "NO AUDIO", "speaker_id": 1, "chapter_id": 2, "speech": np.zeros(0, np.int16)},
        {"id": "1-2-0002", "text": "  ", "speaker_id": 1, "chapter_id": 2, "speech": tone},
    ]
    with tfds.testing.mock_data(as_dataset_fn=_mock_examples(examples), policy=tfds.testing.MockPolicy.USE_CODE):
        assert prepare.main(["--format=tfds", "--input=librispeech", f"--tfds_data_dir={tmp_path}",
                             "--tfds_splits=test_other", f"--output_dir={tmp_path / 'out'}", "--num_workers=1"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())["splits"]["test"]
    assert report["utterances"] == 1
    assert report["skipped"]["by_reason"] == {"empty_audio": 1, "empty_transcript": 1}
    assert [e["id"] for e in report["skipped"]["examples"]["empty_audio"]] == ["1-2-0001"]
    assert [e["id"] for e in report["skipped"]["examples"]["empty_transcript"]] == ["1-2-0002"]
    assert sorted(read_shards(tmp_path / "out", "test")) == ["1-2-0000"]


def test_integer_scaling_and_channels():
    pcm = np.array([[-32768, 16384], [0, 32767]], dtype=np.int16)
    np.testing.assert_allclose(tfds_source.to_float_audio(pcm), pcm / 32768.0)
    wide = pcm.astype(np.int64)  # 16-bit PCM held in int64, TFDS's default Audio dtype
    np.testing.assert_allclose(tfds_source.to_float_audio(wide), pcm / 32768.0)
    np.testing.assert_allclose(tfds_source.to_float_audio(wide * 65536, audio_bits=32), pcm / 32768.0)
    np.testing.assert_allclose(tfds_source.to_float_audio(np.array([0, 128, 255], np.uint8)), [-1, 0, 127 / 128])
    assert tfds_source.map_split("train_clean360", tfds_source.DEFAULT_SPLIT_MAP) == "train"
    assert tfds_source.map_split("dev_other", tfds_source.DEFAULT_SPLIT_MAP) == "validation"
    assert tfds_source.map_split("test", tfds_source.DEFAULT_SPLIT_MAP) == "test"


# ----------------------------------------------------- sample types and rates other than 16 kHz int16


def _tone(rate: int, seconds: float = 0.9) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.4 * np.sin(2 * np.pi * (220 * t + 900 * t**2))


def _tone_builder():
    """A TFDS builder of chirps whose configs store float32 at 22.05 kHz or int16 at 8 kHz."""
    import tensorflow_datasets as tfds

    class Config(tfds.core.BuilderConfig):
        def __init__(self, *, dtype, rate, **kwargs):
            super().__init__(**kwargs)
            self.dtype, self.rate = dtype, rate

    class ToneSpeech(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [
            Config(name="float22k", dtype=np.float32, rate=22050),
            Config(name="int16_8k", dtype=np.int16, rate=8000),
        ]

        def _info(self):
            return tfds.core.DatasetInfo(  # not dataset_info_from_configs: it reads package files
                builder=self,
                features=tfds.features.FeaturesDict({
                    "audio": tfds.features.Audio(sample_rate=self.builder_config.rate, dtype=self.builder_config.dtype),
                    "sentence": tfds.features.Text(),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            config = self.builder_config
            for k in range(2):
                wave = _tone(config.rate, 0.7 + 0.2 * k)
                if config.dtype == np.int16:
                    wave = np.round(wave * 32767).astype(np.int16)
                yield k, {"audio": wave.astype(config.dtype), "sentence": f"TONE NUMBER {k}"}

    return ToneSpeech


ToneSpeech = _tone_builder()


@pytest.mark.parametrize("config", ["float22k", "int16_8k"])
def test_mocked_float_and_int16_audio_at_other_rates(tmp_path, config):
    """Shards of a mocked dataset equal the features of the same samples read from a file at that rate."""
    import tensorflow_datasets as tfds

    builder = ToneSpeech(config=config, data_dir=str(tmp_path))
    examples = [ex for _, ex in builder._generate_examples()]
    with tfds.testing.mock_data(as_dataset_fn=_mock_examples(examples), policy=tfds.testing.MockPolicy.USE_CODE):
        assert prepare.main([
            "--format=tfds", f"--input=tone_speech/{config}", f"--tfds_data_dir={tmp_path}", "--tfds_audio_key=audio",
            "--tfds_text_key=sentence", "--tfds_splits=train", f"--output_dir={tmp_path / 'out'}", "--num_workers=1",
            "--frame_dtype=float32",
        ]) == 0
    shards = read_shards(tmp_path / "out", "train")
    assert sorted(shards) == ["train-00000000", "train-00000001"]
    rate = builder.builder_config.rate
    for k, example in enumerate(examples):
        wav = tmp_path / f"{k}.wav"
        soundfile.write(wav, example["audio"], rate, subtype="FLOAT" if config == "float22k" else "PCM_16")
        reference = features.log_mel(features.load_audio(wav))  # soundfile's scaling, the same resampler
        got = shards[f"train-{k:08d}"]
        assert got["transcript"].decode() == f"TONE NUMBER {k}" and got["speaker"].decode() == ""
        assert got["duration"] == pytest.approx(len(example["audio"]) / rate, abs=1e-3)
        np.testing.assert_allclose(got["log_mel"], reference, rtol=0, atol=1e-4)


def test_ranges_follow_the_dataset_files():
    assert tfds_source._ranges(5, []) == [(0, 5)]
    assert tfds_source._ranges(5, [2, 3]) == [(0, 2), (2, 5)]
    # files longer than EXAMPLES_PER_RANGE are cut into equal pieces; every example once, in order
    ranges = tfds_source._ranges(700, [600, 100])
    assert ranges == [(0, 200), (200, 400), (400, 600), (600, 700)]
    assert tfds_source._ranges(10, [3, 3]) == [(0, 10)]  # lengths that do not add up are ignored


def test_mocked_non_finite_audio_is_counted(tmp_path):
    import tensorflow_datasets as tfds

    good = _tone(22050).astype(np.float32)
    bad = good.copy()
    bad[100] = np.nan
    examples = [{"audio": good, "sentence": "FINE"}, {"audio": bad, "sentence": "HAS A NAN"}]
    with tfds.testing.mock_data(as_dataset_fn=_mock_examples(examples), policy=tfds.testing.MockPolicy.USE_CODE):
        assert prepare.main([
            "--format=tfds", "--input=tone_speech/float22k", f"--tfds_data_dir={tmp_path}", "--tfds_audio_key=audio",
            "--tfds_text_key=sentence", "--tfds_splits=train", f"--output_dir={tmp_path / 'out'}", "--num_workers=1",
        ]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())["splits"]["train"]
    assert report["utterances"] == 1 and report["skipped"]["by_reason"] == {"non_finite": 1}
    assert report["skipped"]["examples"]["non_finite"][0]["id"] == "train-00000001"
