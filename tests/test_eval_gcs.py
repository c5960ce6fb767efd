"""eval and infer on gs:// (the local GCS emulator): every write goes through the file-system layer,
rows survive without append, a gs:// --data_dir is read, and nothing lands in a local `gs:` folder."""

import io
import json

import numpy as np
import pytest
import soundfile

from spectron_jax import eval as eval_cli
from spectron_jax import filesystem, infer, vocoder
from spectron_jax.data import features
from spectron_jax.evaluation import datasets, runner
from tests.test_eval_export import export_dir  # noqa: F401 - the tiny export fixture


@pytest.fixture
def gcs(gcs_emulator, monkeypatch, tmp_path):
    for key, value in gcs_emulator.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # a write that missed the layer would land here, under ./gs:
    yield f"gs://{gcs_emulator['bucket']}/{tmp_path.name}"
    assert not (tmp_path / "gs:").exists()


def _decode(url):
    wave, rate = soundfile.read(io.BytesIO(filesystem.read_bytes(url)), dtype="float32")
    return wave, rate


def _upload_test_utterances(embedded_dir, url, count=3):
    """The first `count` test rows of the embedded corpus as an embedded-layout folder at `url`/embedded."""
    lines = (embedded_dir / "manifest.tsv").read_text().splitlines()
    rows = [line for line in lines[1:] if line.split("\t")[5] == "test"][:count]
    filesystem.write_text(f"{url}/embedded/manifest.tsv", "\n".join([lines[0], *rows]) + "\n")
    for row in rows:
        audio = row.split("\t")[1]
        filesystem.write_bytes(f"{url}/embedded/{audio}", (embedded_dir / audio).read_bytes())
    return [row.split("\t")[0] for row in rows]


def test_wavs_and_rows_are_written_to_gcs_without_append(gcs):
    wave = np.sin(np.linspace(0, 200, 8000)).astype(np.float32) * 0.5
    assert vocoder.write_wav(f"{gcs}/wavs/a.wav", wave, 16000) == f"{gcs}/wavs/a.wav"
    back, rate = _decode(f"{gcs}/wavs/a.wav")
    assert rate == 16000 and np.max(np.abs(back - wave)) < 1e-4
    out = filesystem.path(f"{gcs}/rows")
    writer = runner.RowWriter(out, "continuation", {"export_dir": "x"})
    for i in range(3):
        writer.add({"id": f"u{i}", "value": float(i)})
    lines = filesystem.read_text(f"{gcs}/rows/{runner.EXAMPLES_FILENAME}").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["u0", "u1", "u2"]
    resumed = runner.RowWriter(out, "continuation", {"export_dir": "x"})
    assert resumed.done == {"u0", "u1", "u2"}


def test_a_gcs_data_dir_lists_and_loads_like_a_local_one(gcs, embedded_dir):
    ids = _upload_test_utterances(embedded_dir, f"{gcs}/data")
    examples, skips = datasets.continuation_examples(f"{gcs}/data")
    local, _ = datasets.continuation_examples(str(embedded_dir))
    assert [ex.id for ex in examples] == ids and skips == []
    assert all(ex.audio.startswith(f"{gcs}/data/embedded/audio/") for ex in examples)
    by_id = {ex.id: ex for ex in local}
    for ex in examples:
        assert ex.text == by_id[ex.id].text
        np.testing.assert_array_equal(features.load_audio(ex.audio), features.load_audio(by_id[ex.id].audio))
        np.testing.assert_array_equal(features.load_audio(ex.audio, max_samples=4000),
                                      features.load_audio(by_id[ex.id].audio, max_samples=4000))
    with pytest.raises(features.AudioError, match="no such file"):
        features.load_audio(f"{gcs}/data/embedded/audio/nope.flac")


@pytest.mark.slow  # load + compile of a tiny export
def test_infer_reads_and_writes_gcs(export_dir, gcs, embedded_dir):  # noqa: F811
    filesystem.write_bytes(f"{gcs}/in/prompt.flac", (embedded_dir / "audio/p012_u00.flac").read_bytes())
    assert infer.main([f"--export_dir={export_dir}", f"--audio={gcs}/in/prompt.flac", f"--output_dir={gcs}/out",
                       "--max_frames=24", "--max_text_tokens=3"]) == 0
    result = json.loads(filesystem.read_text(f"{gcs}/out/result.json"))
    assert result["generated_frames"] > 0
    cont, rate = _decode(f"{gcs}/out/continuation.wav")
    both, _ = _decode(f"{gcs}/out/prompt_plus_continuation.wav")
    assert rate == 16000 and 0 < len(cont) < len(both)
    assert filesystem.read_bytes(f"{gcs}/out/spectrogram.png")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # two eval runs of a tiny export
def test_eval_on_gcs_resumes_and_keeps_every_row(export_dir, gcs, embedded_dir):  # noqa: F811
    ids = _upload_test_utterances(embedded_dir, f"{gcs}/data")
    out = f"{gcs}/report"
    flags = [f"--export_dir={export_dir}", "--suite=continuation", f"--data_dir={gcs}/data", f"--output_dir={out}",
             "--batch_size=2", "--max_frames=24", "--asr=none", "--text_lm=none", "--speaker=none",
             "--naturalness=none"]
    assert eval_cli.main(flags + ["--limit=2"]) == 0
    first = filesystem.read_text(f"{out}/examples.jsonl").splitlines()
    assert [json.loads(line)["id"] for line in first] == ids[:2]
    assert eval_cli.main(flags + ["--limit=3"]) == 0
    lines = filesystem.read_text(f"{out}/examples.jsonl").splitlines()
    assert len(lines) == 3 and lines[:2] == first  # the first two reused, the third added
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == ids
    payload = json.loads(filesystem.read_text(f"{out}/metrics.json"))
    assert payload["metrics"]["num_examples"] == 3
    for name in ("report.md", "report.html", *payload["plots"]):
        assert filesystem.is_file(f"{out}/{name}"), name
    page = filesystem.read_text(f"{out}/report.html")
    for row in rows:
        for kind, relative in row["wavs"].items():
            wave, rate = _decode(f"{out}/{relative}")
            assert rate == 16000 and wave.size > 0, (row["id"], kind)
            assert f"src='{relative}'" in page
