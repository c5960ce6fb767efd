"""The `continuation` suite: the paper's speech-continuation evaluation (its §7, Table 1).

Each utterance is cut at `prompt_seconds` (3 s): the model hears the prompt, writes text (the transcript
of the whole utterance as it predicts it: prompt transcript, then continuation) and then speech, which
the vocoder turns into audio. Per example (one row of examples.jsonl) and pooled (metrics.json):

  text_wer / text_cer        the model's text (prompt transcript + text continuation) vs the reference
                             transcript of the whole utterance (the model is trained to write all of it);
  prompt_transcript_wer / _cer   the model's transcript of the prompt (its text before the separator) vs
                             the reference words before phi (`data.phi`: the prompt's share of the
                             letters, snapped to a word start, as the Tasks cut it): the model as a
                             recogniser; over the rows with a separator;
  continuation_wer / _cer    its text after the separator vs the reference words after phi (how close
                             it comes to the true continuation; over the rows with a separator);
  separator_fraction         share of rows whose text holds the separator (a model with `sep_id`);
  continuation_text_ppl      perplexity of the model's text continuation under the scoring text LM (its
                             whole text when it writes no separator: a bundle without `sep_id`, whose
                             report says so, or a row where the model wrote none);
  asr_log_ppl                perplexity, under the same LM, of the ASR transcript of the generated speech
                             (the paper's "log-PPL" column; its scorer was GPT-2 Medium, see `text_lm`);
                             an empty transcript has no token to score: `asr_empty_transcripts` counts
                             the rows it leaves out;
  speech_text_wer            ASR transcript of the generated speech vs the model's text continuation
                             (does the speech say what the model wrote);
  speaker_sim_generated      cosine of speaker embeddings, prompt vs generated continuation;
  speaker_sim_true           prompt vs the true continuation (the ceiling);
  dnsmos_<system>_<key>      DNSMOS of the generated continuation, the true continuation, and the true
                             continuation resynthesised by the vocoder from its log-mel (its ceiling);
  l1_teacher_forced          mean |predicted − true| log-mel of the continuation with the true frames fed
                             (a row whose teacher-forced pass failed has it null and says why in
                             `teacher_forced_error`; the report counts such rows);
  l1_free_running            the same for the generated frames, over the frames both have;
  length_ratio               generated frames / true continuation frames;
  stop_head_fraction         share of continuations ended by the stop head (the rest hit the budget).

Each row also holds its `floors` (`evaluation.floors`: the scorers on white noise, silence, another
speaker's continuation and the true continuation), pooled beside these figures in the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from etils import epath

from spectron_jax import vocoder as vocoder_lib
from spectron_jax.data import features, phi
from spectron_jax.evaluation import floors, runner, text_metrics
from spectron_jax.evaluation.datasets import EvalExample, Skip
from spectron_jax.evaluation.naturalness import KEYS as DNSMOS_KEYS
from spectron_jax.evaluation.speaker import cosine
from spectron_jax.evaluation.text_lm import TextScore, empty_count, perplexity

SUITE = "continuation"
SYSTEMS = ("generated", "true", "resynthesized")
MIN_CONTINUATION_SECONDS = 0.5  # DEFAULT: utterances with less than this after the prompt are skipped
PLOT_EXAMPLES = 4


@dataclasses.dataclass(frozen=True)
class ContinuationConfig:
    """prompt_seconds: the prompt window (the paper's 3 s); batch_size: examples per inference call;
    write_wavs: write prompt / generated / true wavs per example; overwrite: discard the rows of an
    earlier run in the output folder instead of resuming it (`runner.RowWriter`)."""

    prompt_seconds: float = 3.0
    batch_size: int = 4
    write_wavs: bool = True
    overwrite: bool = False


def _l1(pred: np.ndarray | None, true: np.ndarray) -> float:
    """Mean |pred − true| over the frames both have ([frames, mel] each); NaN when none."""
    if pred is None:
        return float("nan")
    n = min(len(pred), len(true))
    if n == 0:
        return float("nan")
    return float(np.mean(np.abs(np.asarray(pred[:n], np.float64) - np.asarray(true[:n], np.float64))))


def _score(inferencer: Any, item: runner.Loaded, result: Any, scorers: runner.Scorers, resynth: Any,
           config: ContinuationConfig, wav_dir: epath.Path, prompt_samples: int, prompt_frames: int) -> dict:
    """One example's row (see the module docstring for its figures); writes its wavs."""
    spec = features.SPECTRON_FEATURES
    ex = item.example
    true_wave = item.wave[prompt_samples:]
    true_frames = features.log_mel(item.wave, spec)[prompt_frames:]
    teacher_error = None
    try:
        teacher = inferencer.teacher_forced_frames([item.wave], [ex.text])[0]
    except Exception as e:  # noqa: BLE001 - the figure is left out for this example (and said why), the rest kept
        teacher, teacher_error = None, runner.scoring_skip(ex, e).detail
    generated = np.asarray(result.waveform, np.float32)
    reference_prompt, reference_continuation = phi.split_transcript(ex.text, prompt_samples / max(item.wave.size, 1))
    row = {
        "id": ex.id, "speaker": ex.speaker, "reference": ex.text,
        "reference_prompt": reference_prompt, "reference_continuation": reference_continuation,
        "text_boundary": result.text_boundary, "prompt_transcript": result.prompt_transcript,
        "text_continuation": runner.continuation_text(result), "model_text": (result.text or "").strip(),
        "stop_reason": result.stop_reason,
        "true_frames": int(len(true_frames)), "generated_frames": int(len(result.frames)),
        "true_seconds": true_wave.size / spec.sample_rate, "generated_seconds": generated.size / spec.sample_rate,
        "l1_teacher_forced": _l1(teacher, true_frames), "l1_free_running": _l1(result.frames, true_frames),
    }
    if teacher_error is not None:
        row["teacher_forced_error"] = teacher_error
    if scorers.asr is not None:
        row["asr_transcript"] = scorers.asr.transcribe([generated])[0]
    if scorers.text_lm is not None:
        texts = [row["text_continuation"]] + ([row["asr_transcript"]] if "asr_transcript" in row else [])
        scores = scorers.text_lm.score(texts)
        row["continuation_lm"] = dataclasses.asdict(scores[0])
        if len(scores) > 1:
            row["asr_lm"] = dataclasses.asdict(scores[1])
    if scorers.speaker is not None:
        emb = scorers.speaker.embed([item.wave[:prompt_samples], generated, true_wave])
        row["speaker_sim_generated"] = cosine(emb[0], emb[1])
        row["speaker_sim_true"] = cosine(emb[0], emb[2])
    resynthesized = resynth(true_frames) if scorers.dnsmos is not None or config.write_wavs else None
    if scorers.dnsmos is not None:
        for system, wave in zip(SYSTEMS, (generated, true_wave, resynthesized)):
            row[f"dnsmos_{system}"] = scorers.dnsmos.score(wave)
    if config.write_wavs:
        name = runner.safe_name(ex.id)
        for kind, wave in (("prompt", item.wave[:prompt_samples]), ("generated", generated),
                           ("true", true_wave), ("resynthesized", resynthesized)):
            vocoder_lib.write_wav(wav_dir / f"{name}_{kind}.wav", wave, spec.sample_rate)
        row["wavs"] = {kind: f"wavs/{name}_{kind}.wav" for kind in ("prompt", "generated", "true", "resynthesized")}
    return row


def run(inferencer: Any, examples: Sequence[EvalExample], skips: list[Skip], scorers: runner.Scorers,
        output_dir: epath.Path, config: ContinuationConfig = ContinuationConfig(),
        fingerprint: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Runs the suite; returns (rows of every example, plot panels of the first few run now).

    `fingerprint` (what makes the rows: export, decode, scorer and suite settings) is recorded in each
    row; a resume into a folder whose rows have another one raises `runner.ResumeError`.

    Plot panels are dicts with `id`, `prompt`, `generated`, `true` log-mel [frames, 128].
    """
    spec = features.SPECTRON_FEATURES
    prompt_samples = int(round(config.prompt_seconds * spec.sample_rate))
    prompt_frames = features.frames_for_seconds(config.prompt_seconds, spec)
    writer = runner.RowWriter(output_dir, SUITE, fingerprint, overwrite=config.overwrite)
    todo = [ex for ex in examples if ex.id not in writer.done]
    wav_dir = output_dir / "wavs"
    if config.write_wavs:
        wav_dir.mkdir(parents=True, exist_ok=True)
    resynth = vocoder_lib.GriffinLimVocoder()
    partners = floors.other_speaker_partners(examples)  # for the other-speaker floor
    panels: list[dict] = []
    loaded = runner.load_examples(todo, skips, min_seconds=config.prompt_seconds + MIN_CONTINUATION_SECONDS)
    for item, result in runner.run_batched(inferencer, loaded, config.batch_size, skips,
                                           lambda it: it.wave[:prompt_samples], len(todo), SUITE):
        ex = item.example
        try:
            row = _score(inferencer, item, result, scorers, resynth, config, wav_dir, prompt_samples, prompt_frames)
            if scorers.floors:
                row[floors.FLOORS_FIELD] = floors.continuation_row_floors(item, partners, scorers, prompt_samples)
        except Exception as e:  # noqa: BLE001 - one example's failure is counted, not fatal
            skips.append(runner.scoring_skip(ex, e))
            continue
        writer.add(row)
        if len(panels) < PLOT_EXAMPLES:
            panels.append({"id": ex.id, "prompt": np.asarray(result.prompt_frames),
                           "generated": np.asarray(result.frames),
                           "true": features.log_mel(item.wave, spec)[prompt_frames:]})
    wanted = {ex.id for ex in examples}
    return [row for row in writer.rows if row["id"] in wanted], panels


def _scores(rows: Sequence[dict], key: str) -> list[TextScore]:
    return [TextScore(**row[key]) for row in rows if key in row]


def teacher_forced_note(rows: Sequence[dict]) -> str | None:
    """A report note on rows whose teacher-forced pass failed (None when it ran on every row)."""
    failed = [r for r in rows if r.get("teacher_forced_error")]
    if not failed:
        return None
    return (f"The teacher-forced pass failed on {len(failed)} of {len(rows)} rows (first: "
            f"{failed[0]['id']}: {failed[0]['teacher_forced_error']}); l1_teacher_forced is over the rest.")


def metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Pools the rows of `run` into the suite's figures (see the module docstring)."""
    out: dict[str, float] = {"num_examples": len(rows)}
    if not rows:
        return out
    out["text_wer"] = text_metrics.word_error_rate([r["reference"] for r in rows], [r["model_text"] for r in rows])
    out["text_cer"] = text_metrics.char_error_rate([r["reference"] for r in rows], [r["model_text"] for r in rows])
    kinds = [r.get("text_boundary") for r in rows]
    if any(k != runner.UNMARKED for k in kinds):  # a model with a separator
        out["separator_fraction"] = float(np.mean([k == runner.SEPARATED for k in kinds]))
    split = [r for r in rows if r.get("text_boundary") == runner.SEPARATED]
    if split:
        for name, ref, hyp in (("prompt_transcript", "reference_prompt", "prompt_transcript"),
                               ("continuation", "reference_continuation", "text_continuation")):
            refs, hyps = [r[ref] for r in split], [r[hyp] or "" for r in split]
            out[f"{name}_wer"] = text_metrics.word_error_rate(refs, hyps)
            out[f"{name}_cer"] = text_metrics.char_error_rate(refs, hyps)
    if any("continuation_lm" in r for r in rows):
        out["continuation_text_ppl"] = perplexity(_scores(rows, "continuation_lm"))
    if any("asr_lm" in r for r in rows):
        out["asr_log_ppl"] = perplexity(_scores(rows, "asr_lm"))
        out["asr_empty_transcripts"] = empty_count(_scores(rows, "asr_lm"))  # left out of asr_log_ppl
    if any("asr_transcript" in r for r in rows):
        with_asr = [r for r in rows if "asr_transcript" in r]
        out["speech_text_wer"] = text_metrics.word_error_rate(
            [r["text_continuation"] for r in with_asr], [r["asr_transcript"] for r in with_asr])
    for key in ("speaker_sim_generated", "speaker_sim_true", "l1_teacher_forced", "l1_free_running"):
        if any(key in r for r in rows):
            out[key] = runner.finite_mean([r.get(key) for r in rows])
    for system in SYSTEMS:
        if any(f"dnsmos_{system}" in r for r in rows):
            for key in DNSMOS_KEYS:
                out[f"dnsmos_{system}_{key}"] = runner.finite_mean(
                    [r[f"dnsmos_{system}"][key] for r in rows if f"dnsmos_{system}" in r])
    out["length_ratio"] = runner.finite_mean([r["generated_frames"] / max(r["true_frames"], 1) for r in rows])
    out["generated_seconds"] = runner.finite_mean([r["generated_seconds"] for r in rows])
    out["true_seconds"] = runner.finite_mean([r["true_seconds"] for r in rows])
    out["stop_head_fraction"] = float(np.mean([r["stop_reason"] == "stop_head" for r in rows]))
    out["budget_fraction"] = float(np.mean([r["stop_reason"] == "budget" for r in rows]))
    return out
