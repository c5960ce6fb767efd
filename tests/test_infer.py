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
        bundle = types.SimpleNamespace(model=types.SimpleNamespace(config=types.SimpleNamespace(sep_id=sep_id)),
                                       tokenizer=vocab, feature_spec=features.SPECTRON_FEATURES)
        assert infer.Inferencer(bundle).text_ids(text, 0.5) == expected
