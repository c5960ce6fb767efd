"""The evaluation suites end to end: every report file, skips counted, resume, the bundle text LM, CLI errors.

`ScriptedInferencer` below is a test double of `spectron_jax.infer.Inferencer` (same `run` and
`teacher_forced_frames` contract) so the suites, scorers and reports are exercised on real corpus audio
with real scorers and a real (tiny, random) Spectron decoder as the text LM.
"""

import json
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import sentencepiece as spm

from spectron_jax import eval as eval_cli
from spectron_jax.data import features
from spectron_jax.evaluation import report, runner, text_lm
from spectron_jax.models.acoustic import AcousticConfig
from spectron_jax.models.conformer import ConformerConfig
from spectron_jax.models.decoder import DecoderConfig
from spectron_jax.models.spectron import SpectronConfig
from spectron_jax.models.spectron_model import SpectronModel

PROMPT_FRAMES = features.frames_for_seconds(3.0)


class ScriptedInferencer:
    """Test double of `Inferencer`: answers with fixed text and speaks the reversed prompt back."""

    def __init__(self, text="the keeper climbed the stairs", stop_every=2):
        self.text = text
        self.stop_every = stop_every
        self.prompt_samples: list[int] = []

    def run(self, waves, row_ids=None):
        out = []
        for wave in waves:
            self.prompt_samples.append(int(wave.size))
            reply = np.ascontiguousarray(wave[::-1]).astype(np.float32)
            frames = features.log_mel(reply)
            out.append(types.SimpleNamespace(
                text=f"old maren had kept {self.text}", prompt_transcript="old maren had kept", continuation=self.text,
                text_boundary="separator",
                prompt_frames=features.log_mel(wave), frames=frames, waveform=reply,
                stop_reason="stop_head" if len(self.prompt_samples) % self.stop_every else "budget", timings={}))
        return out

    def teacher_forced_frames(self, waves, transcripts, row_ids=None, log_mels=None):
        return [features.log_mel(w)[PROMPT_FRAMES:] + 0.1 for w in waves]


def tiny_bundle(repo_root):
    tokenizer = spm.SentencePieceProcessor(model_file=str(repo_root / "data/embedded/spm/spectron_tiny.model"))
    config = SpectronConfig(
        encoder=ConformerConfig(model_dim=32, num_layers=1, num_heads=2, ffn_dim=64, conv_kernel_size=5,
                                subsampling_channels=4),
        decoder=DecoderConfig(vocab_size=tokenizer.get_piece_size(), model_dim=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, mlp_dim=128),
        acoustic=AcousticConfig(prenet_dims=(32,), postnet_hidden=64))
    model = SpectronModel(config)
    params, _ = model.init(seed=0)
    return types.SimpleNamespace(model=model, params=params, tokenizer=tokenizer, meta={}, feature_spec=None)


@pytest.fixture(scope="module")
def bundle(repo_root):
    return tiny_bundle(repo_root)


@pytest.mark.slow
def test_bundle_text_lm_equals_stepwise_decoding(bundle):
    """The batched, padded scorer == feeding one token at a time through the KV cache."""
    lm = text_lm.BundleTextLM(bundle, batch_size=2)
    texts = ["the lighthouse keeper", "a small fishing boat drifted far too close", "x"]
    scores = lm.score(texts)
    model, params = bundle.model, bundle.params
    text_step = jax.jit(model.text_step)
    for text, score in zip(texts, scores):
        ids = bundle.tokenizer.encode(text)
        assert score.num_tokens == len(ids)
        cache = model.init_cache(1, len(ids) + 1)
        logits, cache = model.prefill(params, np.zeros((1, 0, 64), np.float32), np.zeros((1, 0), bool),
                                      np.array([[model.config.sos_id]]), np.ones((1, 1), bool), cache)
        logits = logits[:, 0]
        total = 0.0
        for token in ids:
            total += float(jax.nn.log_softmax(logits[0])[token])
            logits, cache = text_step(params, np.array([token]), cache)
        assert score.log_likelihood == pytest.approx(total, rel=1e-4, abs=1e-4)


def _continuation_row(boundary, prompt_transcript, continuation, reference="the keeper climbed the stairs"):
    from spectron_jax.data import phi

    ref_prompt, ref_cont = phi.split_transcript(reference, 0.4)  # 'the keeper' | 'climbed the stairs'
    whole = " ".join(p for p in (prompt_transcript, continuation) if p)
    return {"reference": reference, "reference_prompt": ref_prompt, "reference_continuation": ref_cont,
            "text_boundary": boundary, "prompt_transcript": prompt_transcript if boundary == "separator" else None,
            "text_continuation": continuation if boundary == "separator" else whole, "model_text": whole,
            "stop_reason": "budget", "generated_frames": 10, "true_frames": 10, "generated_seconds": 1.0,
            "true_seconds": 1.0}


def test_continuation_scores_the_prompt_transcript_and_the_continuation_apart():
    from spectron_jax.evaluation import continuation, spoken_qa

    split = _continuation_row("separator", "the keeper", "climbed the hill")
    assert (split["reference_prompt"], split["reference_continuation"]) == ("the keeper", "climbed the stairs")
    missing = _continuation_row("missing", "a b c d", "")
    values = continuation.metrics([split, missing])
    assert values["prompt_transcript_wer"] == 0.0 and values["continuation_wer"] == pytest.approx(1 / 3)
    assert values["separator_fraction"] == 0.5  # the row without a separator is left out of both
    assert values["text_wer"] == pytest.approx((1 + 5) / 10)  # whole texts vs whole references
    assert "1 of 2 rows carry no text separator" in runner.boundary_note([split, missing])
    assert runner.boundary_note([split]) is None
    unmarked = [_continuation_row("unmarked", "the keeper", "climbed the hill")]
    values = continuation.metrics(unmarked)
    assert "prompt_transcript_wer" not in values and "separator_fraction" not in values
    assert "writes no text separator" in runner.boundary_note(unmarked)
    # spoken QA: the answer is the part after the separator; a model without one is scored on its whole text
    qa = [{"question": "who climbed", "text_correct": True, "stop_reason": "budget", "answer_seconds": 1.0,
           "text_boundary": b, "prompt_transcript": t, "model_text": "who climbed the keeper"}
          for b, t in (("separator", "who climbed"), ("missing", None))]
    assert spoken_qa.metrics(qa)["question_wer"] == 0.0 and spoken_qa.metrics(qa)["separator_fraction"] == 0.5
    for row in qa:
        row["text_boundary"], row["prompt_transcript"] = "unmarked", None
    assert spoken_qa.metrics(qa)["question_wer"] == 1.0  # 'who climbed' vs 'who climbed the keeper': 2 inserted


def _args(**kw):
    base = dict(export_dir="tiny", limit=None, batch_size=2, split=None, asr="pocketsphinx", text_lm="bundle",
                speaker="resemblyzer", naturalness="dnsmos", long_questions="full", wavs=True, overwrite=False,
                prompt_seconds=3.0)
    return types.SimpleNamespace(**{**base, **kw})


def _finite(values):
    return all(np.isfinite(v) for v in values.values() if isinstance(v, float))


@pytest.mark.slow
def test_continuation_suite_writes_every_report_file_and_counts_bad_audio(tmp_path, embedded_dir, bundle):
    rows = [line.split("\t") for line in (embedded_dir / "manifest.tsv").read_text().splitlines()[1:]]
    test_rows = [r for r in rows if r[5] == "test"][:2]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wav file at all")
    manifest = tmp_path / "eval.tsv"
    manifest.write_text("id\tpath\ttranscript\tspeaker\n" + "".join(
        f"{r[0]}\t{embedded_dir / r[1]}\t{r[2]}\t{r[3]}\n" for r in test_rows)
        + "broken\tcorrupt.wav\tsome words\tspk99\nabsent\tnot_there.flac\tother words\tspk99\n")
    out = tmp_path / "out"
    args = _args(suite="continuation", data_dir=str(manifest), output_dir=str(out),
                 decode={"temperature": 0.0, "seed": 0, "max_frames": 800})
    scorers = eval_cli.make_scorers(args, bundle)
    double = ScriptedInferencer()
    values = eval_cli.evaluate(args, bundle, lambda seconds: double, scorers)
    for name in report.REPORT_FILES + ("plots/spectrograms.png", "plots/speaker_similarity.png", "plots/dnsmos.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["skipped"]["by_reason"] == {"unreadable": 1, "missing_file": 1}
    assert values["num_examples"] == 2 and _finite(values)
    for key in ("text_wer", "asr_log_ppl", "continuation_text_ppl", "speaker_sim_generated", "speaker_sim_true",
                "dnsmos_generated_p808_mos", "dnsmos_resynthesized_p808_mos", "l1_free_running"):
        assert key in values, key
    assert values["l1_teacher_forced"] == pytest.approx(0.1, abs=1e-5)
    assert values["stop_head_fraction"] == 0.5 and values["length_ratio"] > 0
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [e["id"] for e in examples] == [r[0] for r in test_rows]
    for e in examples:
        for rel in e["wavs"].values():
            assert features.load_audio(out / rel).size > 0
    text = (out / "report.md").read_text()
    assert "the paper's" in text and "126.08" in text and "unreadable: 1" in text and "pocketsphinx" in text
    # Floors and ceilings beside the figures, from the same scorers on the same utterances; intervals for
    # every pooled figure; where the figures came from.
    for key in ("speaker_sim_noise_floor", "speaker_sim_other_speaker_floor", "dnsmos_silence_p808_mos",
                "dnsmos_noise_p808_mos", "asr_true_wer", "asr_silence_word_fraction", "speech_text_wer_silence_floor"):
        assert key in values and np.isfinite(values[key]), key
    assert all(e["floors"]["other_speaker_id"] not in (None, e["id"]) for e in examples)  # two speakers here
    assert values["speaker_sim_true"] > values["speaker_sim_noise_floor"]  # real speech beats noise
    assert set(payload["intervals"]) >= {"asr_log_ppl", "text_wer", "speaker_sim_generated", "speaker_sim_noise_floor"}
    assert payload["bootstrap"]["resamples"] == 1000
    for key, span in payload["intervals"].items():
        assert span is None or span[0] <= span[1], key
    assert payload["references"]["speaker_sim_generated"][-1]["kind"] == "ceiling"
    assert payload["provenance"]["decode"] == args.decode and payload["provenance"]["created_utc"].endswith("+00:00")
    assert payload["provenance"]["packages"]["whisper-normalizer"] == "0.1.15"
    assert "## Floors and ceilings" in text and "prompt vs white noise" in text and "## Provenance" in text
    # A rerun into the same folder resumes: no example is run again, the figures are the same.
    again = ScriptedInferencer()
    assert eval_cli.evaluate(args, bundle, lambda seconds: again, scorers) == values
    assert again.prompt_samples == []


@pytest.mark.slow
def test_llama_questions_suite_feeds_long_questions_whole(tmp_path, embedded_dir):
    rows = [line.split("\t") for line in (embedded_dir / "manifest.tsv").read_text().splitlines()[1:]]
    short = features.load_audio(embedded_dir / rows[0][1])[:16000 * 2]  # 2 s
    long = features.load_audio(embedded_dir / rows[1][1])[: int(16000 * 4.3)]  # 4.3 s
    from spectron_jax import vocoder

    vocoder.write_wav(tmp_path / "1.wav", short, 16000)
    vocoder.write_wav(tmp_path / "2.wav", long, 16000)
    (tmp_path / "llama_questions_300.tsv").write_bytes(
        b"Questions\tAnswer\tWav Filename\r\nWho climbed the \"stairs? \tthe keeper \t1.wav\r\n"
        b"What did she carry?\ta lantern\t2.wav\r\nWhere is it?\tnowhere\t3.wav\r\n")
    out = tmp_path / "out"
    args = _args(suite="llama_questions", data_dir=str(tmp_path), output_dir=str(out), text_lm="none",
                 speaker="none", naturalness="none")
    scorers = eval_cli.make_scorers(args, None)
    windows, double = [], ScriptedInferencer()

    def make(seconds):
        windows.append(seconds)
        return double

    values = eval_cli.evaluate(args, None, make, scorers)
    assert windows == [4.3] and sorted(double.prompt_samples) == [short.size, long.size]  # nothing cut
    assert values["num_examples"] == 2 and values["text_accuracy"] == 50.0  # "the keeper" is in its text
    assert 0.0 <= values["speech_accuracy"] <= 100.0 and _finite(values)
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["skipped"]["by_reason"] == {"missing_file": 1}
    assert payload["settings"]["questions_longer_than_prompt"] == 1
    # The ASR on silence of each question's length (the speech accuracy's floor) and on the question.
    assert 0.0 <= values["speech_accuracy_silence_floor"] <= 100.0 and 0.0 <= values["asr_question_wer"]
    assert payload["references"]["speech_accuracy"][0]["figure"] == "speech_accuracy_silence_floor"
    assert payload["intervals"]["text_accuracy"] is not None
    assert payload["excluded"]["speech_accuracy"] == {"rows_used": 2, "rows_excluded": {}}
    assert "1 questions are longer than the 3 s" in (out / "report.md").read_text()
    assert (out / "plots" / "accuracy.png").is_file()
    cut = _args(suite="llama_questions", data_dir=str(tmp_path), output_dir=str(tmp_path / "cut"), text_lm="none",
                speaker="none", naturalness="none", long_questions="truncate", asr="none")
    double = ScriptedInferencer()

    class FailingOnLongASR:  # test double: a recogniser that fails on one answer
        name = "failing"

        def transcribe(self, waves):
            if waves[0].size == 3 * 16000:
                raise RuntimeError("recogniser crashed")
            return ["a lantern"]

    values = eval_cli.evaluate(cut, None, lambda seconds: double, runner.Scorers(asr=FailingOnLongASR()))
    assert max(double.prompt_samples) == 3 * 16000  # the 4.3 s question was cut to the window
    payload = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert payload["skipped"]["by_reason"] == {"missing_file": 1, "scoring_error": 1}
    assert "recogniser crashed" in json.dumps(payload["skipped"]["examples"])
    assert values["num_examples"] == 1 and values["speech_accuracy"] == 0.0  # "a lantern" is question 2's answer


def test_eval_cli_errors_are_one_line(tmp_path):
    def call(*flags):
        proc = subprocess.run([sys.executable, "-m", "spectron_jax.eval", *flags], capture_output=True, text=True)
        return proc.returncode, proc.stderr.strip().splitlines()

    code, err = call("--export_dir=x", f"--data_dir={tmp_path / 'nope'}", "--suite=continuation",
                     f"--output_dir={tmp_path / 'o'}")
    assert code == 1 and len(err) == 1 and "--data_dir" in err[0] and "no such file" in err[0]
    code, err = call("--export_dir=x", f"--data_dir={tmp_path}", "--suite=continuation",
                     f"--output_dir={tmp_path / 'o'}", "--batch_size=0")
    assert code == 2 and len(err) == 1 and "--batch_size" in err[0]
    with pytest.raises(eval_cli.cli.InputError, match="llama_questions_300.tsv"):
        eval_cli.evaluate(_args(suite="llama_questions", data_dir=str(tmp_path), output_dir=str(tmp_path / "o")),
                          None, lambda s: None, runner.Scorers())
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
