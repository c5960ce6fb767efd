"""infer CLI: every output written for a good prompt; one-line errors for bad files; batch mode skips them."""

import json

import numpy as np
import pytest
import soundfile

from spectron_jax import cli, infer
from tests.test_bundle import _train_dir

FLAGS = ["--max_frames=24", "--max_text_tokens=3"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from spectron_jax import export as export_cli

    tmp = tmp_path_factory.mktemp("infer")
    _, _, model_dir = _train_dir(tmp)
    assert export_cli.main([f"--model_dir={model_dir}", f"--output_dir={tmp / 'export'}"]) == 0
    return tmp / "export"


def _write(path, wave, rate=22050, channels=2, subtype="PCM_16"):
    wave = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    soundfile.write(str(path), wave, rate, subtype=subtype)
    return path


def _speechlike(seconds=1.0, rate=22050):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.mark.slow  # export + load + compile of a tiny model: ~30-60 s on 2 loaded cores
def test_infer_writes_every_output_and_rejects_bad_files(export_dir, tmp_path):
    good = _write(tmp_path / "good.flac", _speechlike())  # stereo flac at 22.05 kHz: mixed down, resampled
    out = tmp_path / "out"
    assert infer.main([f"--export_dir={export_dir}", f"--audio={good}", f"--output_dir={out}", *FLAGS]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["generated_frames"] > 0 and result["stop_reason"] == "budget"
    assert result["prompt_frames"] == 81  # 1 s (shorter than the 3 s prompt): 16000 / 200 + 1 frames
    # a model without a separator: its text is reported whole, not as a transcript
    assert result["text_boundary"] == "unmarked" and result["prompt_transcript"] is None
    for name in ("continuation.wav", "prompt_plus_continuation.wav", "spectrogram.png"):
        assert (out / name).stat().st_size > 0, name
    cont, rate = soundfile.read(str(out / "continuation.wav"))
    both, _ = soundfile.read(str(out / "prompt_plus_continuation.wav"))
    assert rate == 16000 and len(cont) > 0 and len(both) > len(cont)

    bad = {
        "missing": tmp_path / "nope.wav",
        "empty": tmp_path / "empty.wav",
        "corrupt": tmp_path / "corrupt.wav",
        "silent": _write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000, 1),
        "short": _write(tmp_path / "short.wav", _speechlike(0.02, 16000), 16000, 1),
        "nan": _write(tmp_path / "nan.wav", np.full(16000, np.nan, np.float32), 16000, 1, "FLOAT"),
    }
    bad["empty"].write_bytes(b"")
    bad["corrupt"].write_bytes(b"RIFF not really a wave file")
    for case, path in bad.items():
        with pytest.raises(cli.InputError) as e:
            infer.main([f"--export_dir={export_dir}", f"--audio={path}", f"--output_dir={tmp_path / case}", *FLAGS])
        message = str(e.value)
        assert "\n" not in message and str(path) in message, (case, message)

    manifest = tmp_path / "list.tsv"
    manifest.write_text("\n".join([f"{good}\tfirst", *(str(p) for p in bad.values()), f"{good}\tsecond"]) + "\n")
    batch_out = tmp_path / "batch"
    assert infer.main([f"--export_dir={export_dir}", f"--manifest={manifest}", f"--output_dir={batch_out}",
                       *FLAGS]) == 0
    assert sorted(p.name for p in batch_out.iterdir()) == ["first", "second"]
    assert (batch_out / "second" / "result.json").exists()


def test_teacher_forced_frames_shape(export_dir):
    from spectron_jax import bundle as bundle_lib, decoding

    class Chars:  # a stand-in vocabulary: ids of characters, inside the tiny model's 64 ids
        def encode(self, text):
            return [4 + (ord(c) % 60) for c in text]

    loaded = bundle_lib.load_bundle(str(export_dir))
    loaded = bundle_lib.Bundle(model=loaded.model, params=loaded.params, tokenizer=Chars(), meta=loaded.meta,
                               feature_spec=loaded.feature_spec)
    inferencer = infer.Inferencer(loaded, decoding.DecodeConfig(prompt_seconds=0.5))
    wave = _speechlike(1.0, 16000)
    frames = inferencer.teacher_forced_frames([wave], ["ab"])
    assert frames[0].shape == (81 - 40, 128) and np.all(np.isfinite(frames[0]))


def test_text_is_split_at_the_separator_and_reported_whole_without_one(embedded_dir, tmp_path):
    from spectron_jax.data import tasks

    vocab = tasks.load_vocabulary(str(embedded_dir / "spm" / "spectron_tiny.model"))
    head, tail = vocab.encode("old maren had kept"), vocab.encode("the lighthouse on gull point")
    assert infer.split_text(head + [4] + tail, vocab, 4) == (
        "old maren had kept the lighthouse on gull point", "old maren had kept", "the lighthouse on gull point",
        infer.SEPARATED)
    assert infer.split_text([4] + tail, vocab, 4)[1:] == ("", "the lighthouse on gull point", infer.SEPARATED)
    # a model with a separator that wrote none, and a model without one: the text whole, no parts
    assert infer.split_text(head + tail, vocab, 4) == ("old maren had kept the lighthouse on gull point", None, None,
                                                       infer.MISSING)
    assert infer.split_text(head + tail, vocab, None)[1:] == (None, None, infer.UNMARKED)

    frames = np.zeros((4, 128), np.float32)
    result = infer.InferenceResult(text="a b", prompt_transcript=None, continuation=None, text_boundary=infer.MISSING,
                                   prompt_frames=frames, frames=frames, waveform=np.zeros(800, np.float32),
                                   stop_reason="budget", timings={})
    info = infer.write_outputs(result, np.zeros(1600, np.float32), str(tmp_path), 16000)
    written = json.loads((tmp_path / "result.json").read_text())
    assert written == info and written["text"] == "a b" and written["text_boundary"] == "missing"
    assert written["prompt_transcript"] is None and written["continuation"] is None


def test_teacher_forced_text_carries_the_separator_at_phi(embedded_dir):
    import types

    from spectron_jax.data import features, tasks

    vocab = tasks.load_vocabulary(str(embedded_dir / "spm" / "spectron_tiny.model"))
    text = "old maren had kept the lighthouse"  # letters 3 5 3 4 3 10 of 28: half is 14, nearest start 15
    for sep_id, expected in ((4, vocab.encode("old maren had kept") + [4] + vocab.encode("the lighthouse")),
                             (None, vocab.encode(text))):
        bundle = types.SimpleNamespace(model=types.SimpleNamespace(config=types.SimpleNamespace(
            sep_id=sep_id, prompt_features="log_mel")),
                                       tokenizer=vocab, feature_spec=features.SPECTRON_FEATURES)
        assert infer.Inferencer(bundle).text_ids(text, 0.5) == expected


def _dropout_bundle(export_dir):
    """The export with pre-net dropout 0.5 kept on at inference (the tiny export trains without it)."""
    import dataclasses

    from spectron_jax import bundle as bundle_lib
    from spectron_jax.models.spectron_model import SpectronModel

    loaded = bundle_lib.load_bundle(str(export_dir))
    cfg = loaded.model.config
    cfg = dataclasses.replace(cfg, acoustic=dataclasses.replace(cfg.acoustic, prenet_dropout=0.5,
                                                                prenet_dropout_at_inference=True))
    return dataclasses.replace(loaded, model=SpectronModel(cfg))


def _assert_same_results(a, b):
    assert (a.text, a.prompt_transcript, a.continuation) == (b.text, b.prompt_transcript, b.continuation)
    assert a.stop_reason == b.stop_reason and a.frames.shape == b.frames.shape
    np.testing.assert_allclose(a.frames, b.frames, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(a.prompt_frames, b.prompt_frames)


@pytest.mark.slow  # two compiles (batch 2 and batch 1) of generate on the tiny export: ~40 s on 2 loaded cores
def test_inferencer_rows_are_batch_independent_and_compile_once(export_dir):
    import dataclasses

    from spectron_jax import decoding

    loaded = _dropout_bundle(export_dir)
    config = decoding.DecodeConfig(prompt_seconds=0.5, max_text_tokens=3, max_frames=12, min_frames=4,
                                   temperature=1.0, seed=7)
    # Prompts shorter than, equal to and longer than the 0.5 s window; three rows: a ragged last batch of 2.
    waves = [_speechlike(s, 16000) * g for s, g in ((0.3, 1.0), (0.5, 0.5), (0.9, 2.0))]
    before = decoding.compiled_programs()
    pairs = infer.Inferencer(loaded, config, batch_size=2, vocoder=lambda f: np.zeros(1, np.float32))
    batched = pairs.run(waves)
    assert decoding.compiled_programs() - before == 1  # both batches (the second padded) share one program
    assert batched[0].timings["compile"] > 0 and batched[2].timings["compile"] == 0
    single = infer.Inferencer(loaded, config, batch_size=1, vocoder=lambda f: np.zeros(1, np.float32))
    alone = single.run(waves)
    for a, b in zip(alone, batched):
        _assert_same_results(a, b)
    reordered = pairs.run([waves[2], waves[0], waves[1]], row_ids=[2, 0, 1])
    for j, i in enumerate([2, 0, 1]):
        _assert_same_results(reordered[j], batched[i])
    # Other seeds, temperatures, top-k / top-p and stop thresholds reuse the batch-2 program.
    compiled = decoding.compiled_programs()
    for knobs in ({"seed": 8}, {"temperature": 0.0}, {"temperature": 0.6, "top_k": 3, "top_p": 0.8},
                  {"stop_threshold": 0.2}):
        again = infer.Inferencer(loaded, dataclasses.replace(config, **knobs), batch_size=2,
                                 vocoder=lambda f: np.zeros(1, np.float32)).run(waves)
        assert all(r.timings["compile"] == 0 for r in again)
    assert decoding.compiled_programs() == compiled
    other = infer.Inferencer(loaded, dataclasses.replace(config, seed=8), batch_size=2,
                             vocoder=lambda f: np.zeros(1, np.float32)).run(waves)
    assert any(not np.allclose(o.frames, b.frames) for o, b in zip(other, batched))


@pytest.mark.slow  # infer CLI twice on three rows (compile + Griffin-Lim): ~40 s on 2 loaded cores
def test_manifest_rows_keep_their_output_under_reordering_and_batch_size(export_dir, tmp_path):
    names = ["alpha", "beta", "gamma"]
    paths = [_write(tmp_path / f"{n}.wav", _speechlike(0.4 + 0.2 * i, 16000), 16000, 1) for i, n in enumerate(names)]
    first, second = tmp_path / "first.tsv", tmp_path / "second.tsv"
    first.write_text("".join(f"{p}\t{n}\n" for p, n in zip(paths, names)))
    second.write_text("".join(f"{paths[i]}\t{names[i]}\n" for i in (2, 0, 1)))
    flags = [*FLAGS, "--temperature=1.0", "--prompt_seconds=0.5", "--seed=3"]
    for manifest, batch, out in ((first, 2, "a"), (second, 1, "b")):
        assert infer.main([f"--export_dir={export_dir}", f"--manifest={manifest}",
                           f"--output_dir={tmp_path / out}", f"--batch_size={batch}", *flags]) == 0
    for name in names:
        a = json.loads((tmp_path / "a" / name / "result.json").read_text())
        b = json.loads((tmp_path / "b" / name / "result.json").read_text())
        assert set(a["timings"]) == {"features", "compile", "generate", "vocoder"}
        a.pop("timings"), b.pop("timings")
        assert a == b, name
        wave_a, _ = soundfile.read(str(tmp_path / "a" / name / "continuation.wav"))
        wave_b, _ = soundfile.read(str(tmp_path / "b" / name / "continuation.wav"))
        # Griffin-Lim's iterations amplify the ~1e-6 rounding of another batch shape to ~1e-3 of a sample.
        np.testing.assert_allclose(wave_a, wave_b, atol=1e-2)


def test_bad_batch_size_and_bad_config_gin_are_one_line_errors(export_dir, tmp_path):
    import shutil

    audio = _write(tmp_path / "a.wav", _speechlike(0.5, 16000), 16000, 1)
    for value in ("0", "-1"):
        with pytest.raises(cli.UsageError) as e:
            infer.main([f"--export_dir={export_dir}", f"--audio={audio}", f"--output_dir={tmp_path / 'o'}",
                        f"--batch_size={value}"])
        assert "--batch_size" in str(e.value) and "\n" not in str(e.value)
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    text = (broken / "config.gin").read_text().splitlines()
    text.insert(3, "SpectronConfig.no_such_knob = 3")
    (broken / "config.gin").write_text("\n".join(text) + "\n")
    with pytest.raises(cli.InputError) as e:
        infer.main([f"--export_dir={broken}", f"--audio={audio}", f"--output_dir={tmp_path / 'o'}"])
    message = str(e.value)
    assert "\n" not in message and str(broken / "config.gin") in message and "line 4" in message, message
    assert "no_such_knob" in message


@pytest.mark.slow  # compiles of the teacher-forced pass (batch 3 and 1) and generate + vocoder: ~40 s loaded
def test_teacher_forced_pass_is_batched_per_row_and_compiles_once(export_dir):
    """Batched and jitted, a row's teacher-forced frames equal that row run alone (pre-net dropout on,
    masks keyed per row); one compile covers ragged batches, other texts and other lengths."""
    import dataclasses

    from spectron_jax import decoding
    from spectron_jax.data import features

    class Chars:  # a stand-in vocabulary: ids of characters, inside the tiny model's 64 ids
        def encode(self, text):
            return [4 + (ord(c) % 60) for c in text]

    loaded = dataclasses.replace(_dropout_bundle(export_dir), tokenizer=Chars())
    config = decoding.DecodeConfig(prompt_seconds=0.5, max_text_tokens=3, max_frames=12, min_frames=4)
    waves = [_speechlike(s, 16000) * g for s, g in ((0.8, 1.0), (1.3, 0.5), (0.6, 2.0), (1.0, 1.5))]
    texts = ["ab", "a longer text", "c", "de"]
    before = infer.teacher_forced_compiles()
    batched = infer.Inferencer(loaded, config, batch_size=3)
    rows = batched.teacher_forced_frames(waves, texts, row_ids=[5, 6, 7, 8])  # a ragged second batch
    again = batched.teacher_forced_frames(waves[1:3], texts[2:0:-1], row_ids=[9, 10])
    assert infer.teacher_forced_compiles() - before == 1
    alone = infer.Inferencer(loaded, config, batch_size=1)
    for wave, text, i, row in zip(waves, texts, [5, 6, 7, 8], rows):
        n = features.num_frames(wave.size) - features.frames_for_seconds(0.5)
        assert row.shape == (n, 128) and np.all(np.isfinite(row))
        np.testing.assert_allclose(row, alone.teacher_forced_frames([wave], [text], row_ids=[i])[0], atol=1e-4)
    assert again[0].shape == rows[1].shape
    # the row's key drives its pre-net masks: another id, other frames
    assert not np.allclose(alone.teacher_forced_frames([waves[0]], [texts[0]], row_ids=[99])[0], rows[0], atol=1e-3)


@pytest.mark.slow  # generate + device Griffin-Lim over three batches: ~30 s on 2 loaded cores
def test_overlapped_batches_equal_each_batch_run_alone(export_dir):
    """`Inferencer.stream` queues batch k+1's generation behind batch k's vocoder: the waves and frames
    are exactly those of each batch run on its own."""
    from spectron_jax import decoding

    loaded = _dropout_bundle(export_dir)
    config = decoding.DecodeConfig(prompt_seconds=0.5, max_text_tokens=3, max_frames=24, min_frames=8,
                                   temperature=1.0, seed=4)
    inferencer = infer.Inferencer(loaded, config, batch_size=2)
    waves = [_speechlike(0.4 + 0.1 * i, 16000) * (1 + 0.2 * i) for i in range(5)]
    overlapped = inferencer.run(waves, row_ids=[10, 11, 12, 13, 14])
    for start in range(0, 5, 2):
        ids = [10 + i for i in range(start, min(start + 2, 5))]
        for a, b in zip(inferencer.run(waves[start:start + 2], row_ids=ids), overlapped[start:start + 2]):
            np.testing.assert_array_equal(a.frames, b.frames)
            np.testing.assert_array_equal(a.waveform, b.waveform)
            assert a.waveform.size == (len(a.frames) - 1) * 200 > 0
