"""spectron_jax.evaluation.synthesize_questions: WebQuestions answers parsing, espeak-ng audio, a manifest the suite reads."""

import json
import shutil
import subprocess
import sys

import pytest
import soundfile

from spectron_jax.evaluation import datasets, synthesize_questions


def test_target_answers():
    assert synthesize_questions.target_answers('(list (description "Jazmine Sullivan") (description Paris))') == [
        "Jazmine Sullivan", "Paris"]
    assert synthesize_questions.target_answers('(list (description "The \\"Boss\\""))') == ['The "Boss"']
    assert synthesize_questions.target_answers("") == []


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_speaks_a_manifest_the_web_questions_suite_reads(tmp_path, repo_root):
    questions = tmp_path / "webq.json"
    questions.write_text(json.dumps([
        {"utterance": "where is the louvre?", "targetValue": "(list (description Paris))"},
        {"utterance": "", "targetValue": "(list (description Nothing))"},
        {"utterance": "who wrote hamlet?", "targetValue": "(list (description \"William Shakespeare\"))"}]))
    out = tmp_path / "webq"
    proc = subprocess.run([sys.executable, "-m", "spectron_jax.evaluation.synthesize_questions",
                           f"--questions={questions}", f"--output_dir={out}"], capture_output=True, text=True,
                          cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    examples, skips = datasets.web_questions_examples(str(out / "manifest.jsonl"))
    assert [(e.id, e.text, e.answers) for e in examples] == [
        ("0", "where is the louvre?", ("Paris",)), ("2", "who wrote hamlet?", ("William Shakespeare",))]
    assert not skips
    for e in examples:
        info = soundfile.info(e.audio)
        assert info.samplerate == 16000 and info.channels == 1 and 0.5 < info.duration < 5.0


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_llama_questions_layout_reads_back(tmp_path, repo_root):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "what  color is the sky?", "answers": ["blue", "azure"]}) + "\n"
                         + json.dumps({"question": "no answer", "answers": []}) + "\n")
    out = tmp_path / "llama"
    proc = subprocess.run([sys.executable, "-m", "spectron_jax.evaluation.synthesize_questions",
                           f"--questions={questions}", f"--output_dir={out}", "--layout=llama_questions"],
                          capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    raw = (out / datasets.LLAMA_QUESTIONS_TSV).read_bytes()
    assert raw == b"Questions\tAnswer\tWav Filename\r\nwhat color is the sky?\tblue\t0.wav\r\n"
    examples, skips = datasets.llama_questions_examples(str(out))
    assert [(e.text, e.answers, e.audio) for e in examples] == [("what color is the sky?", ("blue",), str(out / "0.wav"))]
    assert not skips and soundfile.info(str(out / "0.wav")).samplerate == 16000
