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
                             continuation resynthesised from its log-mel by the vocoder that made the
                             generated speech (its ceiling);
  l1_teacher_forced          mean |predicted − true| log-mel of the continuation with the true frames fed
                             (with the pre-net's dropout on at inference, its masks keyed by the
                             example's id: the same in any batch)
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
RESYNTHESIS_FRAME_BUCKET = 160  # DEFAULT: the true continuations' frames pad to a multiple of this (2 s)


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


@dataclasses.dataclass
class _Device:
    """What the device computes for a chunk of examples: per example its true continuation wave
    [samples] and log-mel [frames, mel], the teacher-forced frames (None where that pass failed, the
    reason in `teacher_errors`) and the vocoder's resynthesis of the true frames (None when not needed)."""

    true_waves: list
    true_frames: list
    teacher: list
    teacher_errors: list
    resynthesized: list


def _device_part(inferencer: Any, items: Sequence[runner.Loaded], scorers: runner.Scorers,
                 config: ContinuationConfig, resynth: Any, prompt_samples: int, prompt_frames: int) -> _Device:
    """The teacher-forced pass and the vocoder resynthesis of a chunk, each one batched call."""
    spec = features.SPECTRON_FEATURES
    full = [features.log_mel(item.wave, spec) for item in items]
    true_frames = [f[prompt_frames:] for f in full]
    waves, texts = [item.wave for item in items], [item.example.text for item in items]
    ids = [runner.example_row_id(item.example) for item in items]
    teacher, errors = [None] * len(items), [None] * len(items)
    try:
        teacher = list(inferencer.teacher_forced_frames(waves, texts, row_ids=ids, log_mels=full))
    except Exception:  # noqa: BLE001 - retried row by row: a row that fails again has its figure left out
        for i, item in enumerate(items):
            try:
                teacher[i] = inferencer.teacher_forced_frames([waves[i]], [texts[i]], row_ids=[ids[i]],
                                                              log_mels=[full[i]])[0]
            except Exception as e:  # noqa: BLE001 - the figure is left out for this example (and said why)
                errors[i] = runner.scoring_skip(item.example, e).detail
    resynthesized = [None] * len(items)
    if scorers.dnsmos is not None or config.write_wavs:
        resynthesized = _vocode(resynth, true_frames, getattr(inferencer, "batch_size", len(items)))
    return _Device([item.wave[prompt_samples:] for item in items], true_frames, teacher, errors, resynthesized)


def _vocode(vocoder: Any, frames: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Waves of log-mel rows [frames_i, mel] through `vocoder`, `batch_size` rows per padded call whose
    frame axis is a multiple of `RESYNTHESIS_FRAME_BUCKET` (so a batched device vocoder compiles once)."""
    waves: list[np.ndarray] = []
    for start in range(0, len(frames), batch_size):
        rows = frames[start:start + batch_size]
        length = -(-max([len(r) for r in rows] + [2]) // RESYNTHESIS_FRAME_BUCKET) * RESYNTHESIS_FRAME_BUCKET
        padded = np.zeros((max(batch_size, len(rows)), length, rows[0].shape[-1]), np.float32)
        lengths = np.zeros((padded.shape[0],), np.int64)
        for i, r in enumerate(rows):
            padded[i, :len(r)], lengths[i] = r, len(r)
        waves += vocoder_lib.synthesize_batch(vocoder, padded, lengths)[:len(rows)]
    return waves


class _Done:
    """A finished result with a future's `result()`."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _host_rows(items: Sequence[runner.Loaded], results: Sequence[Any], device: _Device, scorers: runner.Scorers,
               config: ContinuationConfig, wav_dir: epath.Path, prompt_samples: int, side: Any = None) -> list[dict]:
    """The rows of a chunk (see the module docstring for their figures), each scorer called once on the
    whole chunk (the ASR on the executor `side` when given, beside the others); writes their wavs."""
    spec = features.SPECTRON_FEATURES
    rows, generated = [], [np.asarray(r.waveform, np.float32) for r in results]
    for i, (item, result) in enumerate(zip(items, results)):
        ex = item.example
        reference_prompt, reference_continuation = phi.split_transcript(ex.text,
                                                                        prompt_samples / max(item.wave.size, 1))
        row = {
            "id": ex.id, "speaker": ex.speaker, "reference": ex.text,
            "reference_prompt": reference_prompt, "reference_continuation": reference_continuation,
            "text_boundary": result.text_boundary, "prompt_transcript": result.prompt_transcript,
            "text_continuation": runner.continuation_text(result), "model_text": (result.text or "").strip(),
            "stop_reason": result.stop_reason,
            "true_frames": int(len(device.true_frames[i])), "generated_frames": int(len(result.frames)),
            "true_seconds": device.true_waves[i].size / spec.sample_rate,
            "generated_seconds": generated[i].size / spec.sample_rate,
            "l1_teacher_forced": _l1(device.teacher[i], device.true_frames[i]),
            "l1_free_running": _l1(result.frames, device.true_frames[i]),
        }
        if device.teacher_errors[i] is not None:
            row["teacher_forced_error"] = device.teacher_errors[i]
        rows.append(row)
    if scorers.asr is not None:  # on `side` when given, beside the speaker encoder and DNSMOS below
        transcripts = (side.submit(scorers.asr.transcribe, generated) if side is not None
                       else _Done(scorers.asr.transcribe(generated)))
    if scorers.speaker is not None:
        waves = [w for item, g, t in zip(items, generated, device.true_waves)
                 for w in (item.wave[:prompt_samples], g, t)]
        emb = scorers.speaker.embed(waves)  # [3 * rows, dim]: prompt, generated, true per row
        for i, row in enumerate(rows):
            row["speaker_sim_generated"] = cosine(emb[3 * i], emb[3 * i + 1])
            row["speaker_sim_true"] = cosine(emb[3 * i], emb[3 * i + 2])
    if scorers.dnsmos is not None:
        waves = [w for g, t, r in zip(generated, device.true_waves, device.resynthesized) for w in (g, t, r)]
        mos = _dnsmos_batch(scorers.dnsmos, waves)
        for i, row in enumerate(rows):
            for j, system in enumerate(SYSTEMS):
                row[f"dnsmos_{system}"] = mos[3 * i + j]
    if scorers.asr is not None:
        for row, text in zip(rows, transcripts.result()):
            row["asr_transcript"] = text
    if scorers.text_lm is not None:
        texts = [row["text_continuation"] for row in rows] + [row["asr_transcript"] for row in rows
                                                              if "asr_transcript" in row]
        scores = scorers.text_lm.score(texts)
        asr_scores = iter(scores[len(rows):])
        for row, score in zip(rows, scores):
            row["continuation_lm"] = dataclasses.asdict(score)
            if "asr_transcript" in row:
                row["asr_lm"] = dataclasses.asdict(next(asr_scores))
    if config.write_wavs:
        for i, (item, row) in enumerate(zip(items, rows)):
            name = runner.safe_name(item.example.id)
            for kind, wave in (("prompt", item.wave[:prompt_samples]), ("generated", generated[i]),
                               ("true", device.true_waves[i]), ("resynthesized", device.resynthesized[i])):
                vocoder_lib.write_wav(wav_dir / f"{name}_{kind}.wav", wave, spec.sample_rate)
            row["wavs"] = {kind: f"wavs/{name}_{kind}.wav" for kind in ("prompt", "generated", "true", "resynthesized")}
    return rows


def _dnsmos_batch(dnsmos: Any, waves: Sequence[np.ndarray]) -> list[dict]:
    batch = getattr(dnsmos, "score_batch", None)
    return list(batch(waves)) if callable(batch) else [dnsmos.score(w) for w in waves]


def _host_part(items, results, device, scorers, config, wav_dir, prompt_samples, skips, side=None) -> list[dict]:
    """`_host_rows` of a chunk; when it raises, row by row, so that one example's failure is a skip."""
    try:
        return _host_rows(items, results, device, scorers, config, wav_dir, prompt_samples, side)
    except Exception:  # noqa: BLE001 - isolate the failing example below
        rows = []
        for i, item in enumerate(items):
            one = _Device(*([getattr(device, f.name)[i]] for f in dataclasses.fields(_Device)))
            try:
                rows += _host_rows([item], [results[i]], one, scorers, config, wav_dir, prompt_samples)
            except Exception as e:  # noqa: BLE001 - one example's failure is counted, not fatal
                skips.append(runner.scoring_skip(item.example, e))
        return rows


def run(inferencer: Any, examples: Sequence[EvalExample], skips: list[Skip], scorers: runner.Scorers,
        output_dir: epath.Path, config: ContinuationConfig = ContinuationConfig(),
        fingerprint: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Runs the suite; returns (rows of every example, plot panels of the first few run now).

    `fingerprint` (what makes the rows: export, decode, scorer and suite settings) is recorded in each
    row; a resume into a folder whose rows have another one raises `runner.ResumeError`.

    Work per chunk of `batch_size` examples: generation + vocoder (`inferencer.run`), the teacher-forced
    pass and the resynthesis of the true continuations (each one batched device call) on this thread;
    the host scorers (ASR, text LM, speaker encoder, DNSMOS, each called once per chunk) and the wav
    writes on a worker thread, the ASR on a second one beside the others (PocketSphinx and ONNX run
    without Python's lock), so that they overlap each other and the device work of the next chunk. Rows are written
    in example order. The resynthesis uses the inferencer's vocoder (the one that made the generated
    speech; the host Griffin-Lim when it has none).

    Plot panels are dicts with `id`, `prompt`, `generated`, `true` log-mel [frames, 128].
    """
    from concurrent import futures

    prompt_samples = int(round(config.prompt_seconds * features.SPECTRON_FEATURES.sample_rate))
    prompt_frames = features.frames_for_seconds(config.prompt_seconds, features.SPECTRON_FEATURES)
    writer = runner.RowWriter(output_dir, SUITE, fingerprint, overwrite=config.overwrite)
    todo = [ex for ex in examples if ex.id not in writer.done]
    wav_dir = output_dir / "wavs"
    if config.write_wavs:
        wav_dir.mkdir(parents=True, exist_ok=True)
    resynth = getattr(inferencer, "vocoder", None) or vocoder_lib.GriffinLimVocoder()
    partners = floors.other_speaker_partners(examples)  # for the other-speaker floor
    panels: list[dict] = []
    loaded = runner.load_examples(todo, skips, min_seconds=config.prompt_seconds + MIN_CONTINUATION_SECONDS)
    pairs = runner.run_batched(inferencer, loaded, config.batch_size, skips, lambda it: it.wave[:prompt_samples],
                               len(todo), SUITE)

    def commit(job) -> None:
        chunk, device, future = job
        items = {item.example.id: item for item, _ in chunk}
        written = set()
        for row in future.result():
            if scorers.floors:
                try:
                    row[floors.FLOORS_FIELD] = floors.continuation_row_floors(items[row["id"]], partners, scorers,
                                                                              prompt_samples)
                except Exception as e:  # noqa: BLE001 - one example's failure is counted, not fatal
                    skips.append(runner.scoring_skip(items[row["id"]].example, e))
                    continue
            writer.add(row)
            written.add(row["id"])
        for (item, result), true_frames in zip(chunk, device.true_frames):
            if len(panels) < PLOT_EXAMPLES and item.example.id in written:
                panels.append({"id": item.example.id, "prompt": np.asarray(result.prompt_frames),
                               "generated": np.asarray(result.frames), "true": true_frames})

    pending = None
    with futures.ThreadPoolExecutor(max_workers=1) as pool, futures.ThreadPoolExecutor(max_workers=1) as side:
        for chunk in runner.batches(pairs, config.batch_size):
            items, results = [item for item, _ in chunk], [result for _, result in chunk]
            device = _device_part(inferencer, items, scorers, config, resynth, prompt_samples, prompt_frames)
            if pending is not None:
                commit(pending)
            pending = (chunk, device, pool.submit(_host_part, items, results, device, scorers, config, wav_dir,
                                                  prompt_samples, skips, side))
        if pending is not None:
            commit(pending)
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
