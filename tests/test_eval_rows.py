"""Evaluation rows you can pool: independent of the batch and the resume point, of one run, strict JSON.

A row's generated text is keyed by its example id (not its place in a batch), a resume reuses only rows
with the same fingerprint (export, step, decode, scorer and suite settings), the data set's facts are
those of every example, also on a resume, and a value that is not finite is written as null and counted.
"""

import dataclasses
import json
import types

import numpy as np
import pytest

from spectron_jax import decoding, infer, vocoder
from spectron_jax import eval as eval_cli
from spectron_jax.data import features
from spectron_jax.evaluation import runner
from tests.test_eval_suite import ScriptedInferencer, _args, tiny_bundle


def _llama_folder(folder, embedded_dir, seconds=(2.0, 4.3, 1.5)):
    """A LLaMA-Questions layout of corpus audio cut to `seconds` each (1.wav, 2.wav, ...)."""
    rows = [line.split("\t") for line in (embedded_dir / "manifest.tsv").read_text().splitlines()[1:]]
    lines = ["Questions\tAnswer\tWav Filename"]
    for i, s in enumerate(seconds, 1):
        wave = features.load_audio(embedded_dir / rows[i][1])[: int(16000 * s)]
        vocoder.write_wav(folder / f"{i}.wav", wave, 16000)
        lines.append(f"question number {i}?\tanswer {i}\t{i}.wav")
    (folder / "llama_questions_300.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _qa_args(data_dir, out, **kw):
    return _args(suite="llama_questions", data_dir=str(data_dir), output_dir=str(out), asr="none",
                 text_lm="none", speaker="none", naturalness="none", **kw)


def _rows(out):
    return [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]


@pytest.mark.slow  # one compile of generate on a tiny random model: ~10-20 s on 2 loaded cores
def test_generated_text_does_not_depend_on_the_batch_an_example_lands_in(tmp_path, embedded_dir, repo_root):
    data = _llama_folder(tmp_path, embedded_dir, seconds=(1.2, 1.0, 1.4))
    bundle = tiny_bundle(repo_root)
    bundle.feature_spec = features.SPECTRON_FEATURES
    config = decoding.DecodeConfig(max_text_tokens=4, max_frames=8, min_frames=4, temperature=1.0, seed=3)
    inferencers = {}

    def make(seconds):  # one inferencer (one compiled program) for both runs: only the chunking differs
        if seconds not in inferencers:
            inferencers[seconds] = infer.Inferencer(bundle, dataclasses.replace(config, prompt_seconds=seconds),
                                                    batch_size=2, vocoder=lambda f: np.zeros(160, np.float32))
        return inferencers[seconds]

    texts = {}
    for chunk in (3, 1):
        out = tmp_path / f"chunk{chunk}"
        eval_cli.evaluate(_qa_args(data, out, batch_size=chunk), bundle, make, runner.Scorers())
        texts[chunk] = {row["id"]: row["model_text"] for row in _rows(out)}
    assert sorted(texts[3]) == ["1", "2", "3"]
    assert texts[1] == texts[3]  # sampled with temperature 1: the same draws whatever the batch
    # An example's draws are those of its id: alone in a request it gets the same text as in the suite.
    wave = features.load_audio(data / "2.wav")
    alone = make(1.4).run([wave], [runner.example_row_id(types.SimpleNamespace(id="2"))])[0]
    assert alone.text.strip() == texts[3]["2"]


def test_resume_reuses_only_rows_of_the_same_run(tmp_path, embedded_dir):
    (tmp_path / "data").mkdir()
    data = _llama_folder(tmp_path / "data", embedded_dir)
    out = tmp_path / "out"
    export_a = types.SimpleNamespace(meta={"step": 10})
    args = _qa_args(data, out, export_dir=str(tmp_path / "export_a"), decode={"temperature": 0.0, "seed": 0})
    first = ScriptedInferencer()
    values = eval_cli.evaluate(args, export_a, lambda s: first, runner.Scorers())
    assert len(first.prompt_samples) == 3
    rows = _rows(out)
    assert all(r["fingerprint"]["export_dir"] == str(tmp_path / "export_a") and r["fingerprint"]["step"] == 10
               and r["fingerprint"]["decode"] == {"temperature": 0.0, "seed": 0} for r in rows)
    # The same run again: every row is reused, and the data set's facts are those of all examples.
    again = ScriptedInferencer()
    assert eval_cli.evaluate(args, export_a, lambda s: again, runner.Scorers()) == values and again.prompt_samples == []
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["questions_longer_than_prompt"] == 1 and settings["prompt_window_seconds"] == 4.3
    assert "1 questions are longer than the 3 s" in (out / "report.md").read_text()
    before = (out / "examples.jsonl").read_text()
    # Another export, another step of the same export, other decode settings: each refuses in one line.
    for changed, bundle, why in (
            ({"export_dir": str(tmp_path / "export_b")}, export_a, "export_dir"),
            ({}, types.SimpleNamespace(meta={"step": 20}), "step: 10 vs 20"),
            ({"decode": {"temperature": 0.7, "seed": 0}}, export_a, "decode.temperature: 0.0 vs 0.7")):
        other = ScriptedInferencer()
        with pytest.raises(eval_cli.cli.InputError) as e:
            eval_cli.evaluate(types.SimpleNamespace(**{**vars(args), **changed}), bundle, lambda s: other,
                              runner.Scorers())
        message = str(e.value)
        assert "\n" not in message and why in message and "--overwrite" in message, message
        assert other.prompt_samples == [] and (out / "examples.jsonl").read_text() == before
    # --overwrite starts afresh: every example runs again, every row is the new export's.
    args_b = types.SimpleNamespace(**{**vars(args), "export_dir": str(tmp_path / "export_b"), "overwrite": True})
    fresh = ScriptedInferencer()
    eval_cli.evaluate(args_b, export_a, lambda s: fresh, runner.Scorers())
    assert len(fresh.prompt_samples) == 3
    assert {r["fingerprint"]["export_dir"] for r in _rows(out)} == {str(tmp_path / "export_b")}
    assert len(_rows(out)) == 3


def test_a_failed_teacher_forced_pass_is_null_in_strict_json_and_reported(tmp_path, embedded_dir):
    class TeacherFails(ScriptedInferencer):  # test double: the teacher-forced pass raises on one utterance
        def teacher_forced_frames(self, waves, transcripts, row_ids=None, log_mels=None):
            if any(t.startswith("In the middle") for t in transcripts):
                raise RuntimeError("out of memory in the teacher-forced pass")
            return super().teacher_forced_frames(waves, transcripts)

    rows = {r.split("\t")[0]: r.split("\t") for r in (embedded_dir / "manifest.tsv").read_text().splitlines()[1:]}
    manifest = tmp_path / "eval.tsv"
    manifest.write_text("id\tpath\ttranscript\n" + "".join(
        f"{i}\t{embedded_dir / rows[i][1]}\t{rows[i][2]}\n" for i in ("p012_u00", "p001_u00")))
    out = tmp_path / "out"
    args = _args(suite="continuation", data_dir=str(manifest), output_dir=str(out), asr="none", text_lm="none",
                 speaker="none", naturalness="none", wavs=False)
    values = eval_cli.evaluate(args, None, lambda s: TeacherFails(), runner.Scorers())

    def strict(text):  # json.loads accepts NaN / Infinity unless told not to
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    written = {r["id"]: r for r in map(strict, (out / "examples.jsonl").read_text().splitlines())}
    failed, ok = written["p012_u00"], written["p001_u00"]
    assert failed["l1_teacher_forced"] is None and failed["non_finite"] == ["l1_teacher_forced"]
    assert "out of memory" in failed["teacher_forced_error"]
    assert ok["l1_teacher_forced"] == pytest.approx(0.1, abs=1e-5) and "non_finite" not in ok
    assert values["l1_teacher_forced"] == pytest.approx(0.1, abs=1e-5)  # over the row that has it
    payload = strict((out / "metrics.json").read_text())
    notes = " ".join(payload["notes"])
    assert "teacher-forced pass failed on 1 of 2 rows" in notes and "l1_teacher_forced: 1" in notes
    # The null rows resume as they were written.
    assert eval_cli.evaluate(args, None, lambda s: TeacherFails(), runner.Scorers()) == values


def test_rows_of_an_older_version_or_another_suite_are_not_resumed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / runner.EXAMPLES_FILENAME).write_text(json.dumps({"suite": "llama_questions", "id": "1"}) + "\n")
    with pytest.raises(runner.ResumeError, match="rows written without a fingerprint.*--overwrite"):
        runner.RowWriter(out, "llama_questions", {"export_dir": "a"})
    with pytest.raises(runner.ResumeError, match="suite: 'llama_questions' vs 'web_questions'"):
        runner.RowWriter(out, "web_questions", {"export_dir": "a"})
    writer = runner.RowWriter(out, "web_questions", {"export_dir": "a"}, overwrite=True)
    writer.add({"id": "2", "score": float("inf")})
    assert runner.RowWriter(out, "web_questions", {"export_dir": "a"}).rows == [
        {"suite": "web_questions", "id": "2", "score": None, "fingerprint": {"export_dir": "a"},
         "non_finite": ["score"]}]
