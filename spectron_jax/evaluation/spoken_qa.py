"""The spoken question-answering suites `llama_questions` and `web_questions` (the paper's §7, Table 2).

Zero-shot, as in the paper: the spoken question is the prompt; the model writes text (its transcript of
the question, then a continuation, which is its answer) and then speaks. Two accuracies:

  text_accuracy    a normalised reference answer occurs in the model's text continuation;
  speech_accuracy  it occurs in the ASR transcript of the model's spoken continuation.

(`text_metrics.answer_found`: whole-word match after the evaluation's one normaliser.) The answer is
the model's text after its separator (`SpectronConfig.sep_id`): its transcript of the question is not
searched, so an answer that the question itself contains does not count. When the model writes no
separator (a bundle without `sep_id`: the report says so; or a row where it wrote none) its whole text
is searched (`runner.continuation_text`), so an answer inside the question then counts too. Each row
also holds its `floors` (`evaluation.floors`): the ASR's transcript of silence of the question's length
(an answer found there is the speech accuracy's floor) and of the spoken question (the ASR's own WER).
`question_wer` is the model's transcript of the question (the text before the separator) vs the
question text, over the rows with a separator; for a model without one, its whole text (as before the
separator existed).

Questions longer than the prompt window: 122 of LLaMA-Questions' 300 are longer than 3 s. The paper's
questions were synthesised to fit the window; the released audio was not. `QAConfig.long_questions`
says what to do, and the report states it:
  - `full` (default): the whole question is the prompt (the encoder takes any length; cutting it would
    drop the end of the question, where the asked-for thing often is), i.e. the prompt window is
    widened to the longest question of the set;
  - `truncate`: the first `prompt_seconds` only, as in training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np
from etils import epath

from spectron_jax import vocoder as vocoder_lib
from spectron_jax.data import features
from spectron_jax.evaluation import floors, runner, text_metrics
from spectron_jax.evaluation.datasets import EvalExample, Skip

LONG_QUESTION_POLICIES = ("full", "truncate")


@dataclasses.dataclass(frozen=True)
class QAConfig:
    """prompt_seconds: the training prompt window; long_questions: `full` or `truncate` (module docstring);
    batch_size: questions per inference call; write_wavs: the spoken answers as wavs; overwrite: discard
    the rows of an earlier run in the output folder instead of resuming it (`runner.RowWriter`)."""

    prompt_seconds: float = 3.0
    long_questions: str = "full"
    batch_size: int = 4
    write_wavs: bool = True
    overwrite: bool = False

    def __post_init__(self):
        if self.long_questions not in LONG_QUESTION_POLICIES:
            raise ValueError(f"long_questions must be one of {LONG_QUESTION_POLICIES}, got {self.long_questions!r}")


def prompt_window(waves: Sequence[np.ndarray], config: QAConfig) -> float:
    """Seconds of prompt the inferencer must accept: the longest question under `full`, else the window."""
    if config.long_questions == "truncate" or not waves:
        return config.prompt_seconds
    longest = max(w.size for w in waves) / features.SPECTRON_FEATURES.sample_rate
    return max(config.prompt_seconds, math.ceil(longest * 10) / 10)


def _score(item: runner.Loaded, result: Any, scorers: runner.Scorers, config: QAConfig, wav_dir: epath.Path,
           samples: int) -> dict:
    """One question's row; writes its spoken answer."""
    spec = features.SPECTRON_FEATURES
    ex = item.example
    answer_wave = np.asarray(result.waveform, np.float32)
    row = {
        "id": ex.id, "question": ex.text, "answers": list(ex.answers),
        "question_seconds": item.wave.size / spec.sample_rate,
        "truncated": bool(item.wave.size > samples),
        "text_boundary": result.text_boundary, "model_text": (result.text or "").strip(),
        "prompt_transcript": result.prompt_transcript, "text_answer": runner.continuation_text(result),
        "text_correct": text_metrics.any_answer_found(ex.answers, runner.continuation_text(result)),
        "stop_reason": result.stop_reason, "answer_seconds": answer_wave.size / spec.sample_rate,
    }
    if scorers.asr is not None:
        row["asr_answer"] = scorers.asr.transcribe([answer_wave])[0]
        row["speech_correct"] = text_metrics.any_answer_found(ex.answers, row["asr_answer"])
    if config.write_wavs:
        name = runner.safe_name(ex.id)
        vocoder_lib.write_wav(wav_dir / f"{name}_answer.wav", answer_wave, spec.sample_rate)
        row["wavs"] = {"answer": f"wavs/{name}_answer.wav"}
    return row


def run(make_inferencer: Callable[[float], Any], suite: str, examples: Sequence[EvalExample], skips: list[Skip],
        scorers: runner.Scorers, output_dir: epath.Path, config: QAConfig = QAConfig(),
        fingerprint: dict | None = None) -> tuple[list[dict], dict]:
    """Runs a QA suite. `make_inferencer(prompt_seconds)` builds the inferencer for the window chosen.

    `fingerprint` is recorded in each row; a resume into a folder whose rows have another one raises
    `runner.ResumeError`. Returns (rows of every example, facts for the report: the window used and
    how many questions were longer than `config.prompt_seconds`). The facts are over every readable
    question of `examples`, also those whose rows an earlier run wrote, so a resume reports the same.
    """
    spec = features.SPECTRON_FEATURES
    writer = runner.RowWriter(output_dir, suite, fingerprint, overwrite=config.overwrite)
    wanted = {ex.id for ex in examples}
    # Questions are short (LLaMA-Questions: 1.5-5.5 s), so the whole set is held in memory to size the window.
    unreadable: list[Skip] = []
    every = list(runner.load_examples(examples, unreadable))
    skips += [s for s in unreadable if s.id not in writer.done]  # a question with a row keeps it
    loaded = [item for item in every if item.example.id not in writer.done]
    window = prompt_window([item.wave for item in every], config)
    samples = int(round(window * spec.sample_rate))
    longer = sum(item.wave.size > config.prompt_seconds * spec.sample_rate for item in every)
    facts = {"prompt_window_seconds": window, "long_questions": config.long_questions,
             "questions_longer_than_prompt": int(longer), "training_prompt_seconds": config.prompt_seconds}
    wav_dir = output_dir / "wavs"
    if config.write_wavs:
        wav_dir.mkdir(parents=True, exist_ok=True)
    if not loaded:
        return [row for row in writer.rows if row["id"] in wanted], facts
    inferencer = make_inferencer(window)
    for item, result in runner.run_batched(inferencer, loaded, config.batch_size, skips,
                                           lambda it: it.wave[:samples], len(loaded), suite):
        try:
            row = _score(item, result, scorers, config, wav_dir, samples)
            if scorers.floors and scorers.asr is not None:  # the ASR on silence and the question (`floors`)
                row[floors.FLOORS_FIELD] = floors.qa_floors(item.wave, scorers)
        except Exception as e:  # noqa: BLE001 - one example's failure is counted, not fatal
            skips.append(runner.scoring_skip(item.example, e))
            continue
        writer.add(row)
    return [row for row in writer.rows if row["id"] in wanted], facts


def metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Pools QA rows: accuracies in percent (as the paper reports them), question WER, stop reasons."""
    out: dict[str, float] = {"num_examples": len(rows)}
    if not rows:
        return out
    out["text_accuracy"] = 100.0 * float(np.mean([r["text_correct"] for r in rows]))
    with_asr = [r for r in rows if "speech_correct" in r]
    if with_asr:
        out["speech_accuracy"] = 100.0 * float(np.mean([r["speech_correct"] for r in with_asr]))
    kinds = [r.get("text_boundary") for r in rows]
    if any(k != runner.UNMARKED for k in kinds):
        out["separator_fraction"] = float(np.mean([k == runner.SEPARATED for k in kinds]))
    unmarked = all(k == runner.UNMARKED for k in kinds)  # no separator at all: the whole text, as before
    with_question = [r for r in rows if r["question"] and (unmarked or r.get("text_boundary") == runner.SEPARATED)]
    if with_question:
        out["question_wer"] = text_metrics.word_error_rate(
            [r["question"] for r in with_question],
            [(r["model_text"] if unmarked else r["prompt_transcript"]) or "" for r in with_question])
    out["stop_head_fraction"] = float(np.mean([r["stop_reason"] == "stop_head" for r in rows]))
    out["answer_seconds"] = runner.finite_mean([r["answer_seconds"] for r in rows])
    return out
