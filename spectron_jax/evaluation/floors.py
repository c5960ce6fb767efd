"""Floors and ceilings: what each scorer gives for audio that is not the model's, on the same utterances.

A figure means something only beside what the same scorer gives for input that cannot be right (its
floor) and for the real thing (its ceiling). resemblyzer embeddings are non-negative, so a prompt
scores 0.5-0.6 against white noise; DNSMOS rates silence above 2; PocketSphinx writes words for
silence. Per utterance (a row's `floors`, computed from its audio and the scorers, no model needed):

  continuation suite
    speaker_sim_noise          prompt vs white noise (the true continuation's length and RMS; seeded
                               by the example id)                                      floor
    speaker_sim_other_speaker  prompt vs another speaker's true continuation from the same eval set
                               (`other_speaker_partners`; its id in `other_speaker_id`)  floor
    dnsmos_silence, _noise     DNSMOS of silence / of the white noise above            floors
    asr_silence                the ASR's transcript of silence of the true continuation's length
    asr_true                   the ASR's transcript of the true continuation; `asr_true_lm` its text-LM
                               score
  spoken-QA suites
    asr_silence                the ASR's transcript of silence of the question's length
    asr_question               the ASR's transcript of the spoken question

Pooled (`metrics`, beside the figures in `REFERENCES`; the ceilings speaker_sim_true and
dnsmos_true / _resynthesized are the suite's own figures):

    speaker_sim_noise_floor, speaker_sim_other_speaker_floor   means
    dnsmos_silence_<key>, dnsmos_noise_<key>                   means (DNSMOS keys)
    asr_true_wer               the ASR's WER on the true continuation vs its reference words (how
                               well this recogniser hears real speech: the reference for ASR figures)
    asr_true_log_ppl           pooled perplexity of `asr_true` under the text LM (the log-PPL of real
                               speech through the same ASR and LM: the reference for asr_log_ppl)
    asr_silence_word_fraction  share of silence clips the ASR wrote a word for
    speech_text_wer_silence_floor   WER of the silence transcript vs the model's text continuation
    speech_accuracy_silence_floor   QA: % of questions whose answer is found in the transcript of silence
    asr_question_wer           QA: the ASR's WER on the spoken questions

A figure that is not better than its best floor is marked in report.md (`evidence.figure_cell`).
"""

from __future__ import annotations

import collections
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from spectron_jax.evaluation import row_parts, text_metrics
from spectron_jax.evaluation.naturalness import KEYS as DNSMOS_KEYS
from spectron_jax.evaluation.speaker import cosine

VERSION = 1  # of the rows' `floors` field (in the rows' fingerprint: a change refuses to resume)
FLOORS_FIELD = "floors"
NOISE_RMS_MIN = 1e-3  # noise for a (near-)silent continuation still has this RMS
FLOOR_FAILED = "a scorer failed on the floor audio"
ERROR_FIELD = "error"  # a row's floors when a scorer raised on them: the message (the floors are left out)
PARTNER_CANDIDATES = 4  # other-speaker utterances tried in turn when one cannot be read


def _seed(example_id: str) -> int:
    return zlib.crc32(f"floor-noise|{example_id}".encode("utf-8")) & 0x7FFFFFFF


def white_noise(like: np.ndarray, example_id: str) -> np.ndarray:
    """Gaussian white noise [samples] float32 with the length and RMS of `like`, seeded by the id."""
    like = np.asarray(like, np.float32)
    rms = max(float(np.sqrt(np.mean(np.square(like, dtype=np.float64)))) if like.size else 0.0, NOISE_RMS_MIN)
    noise = np.random.default_rng(_seed(example_id)).standard_normal(like.size) * rms
    return np.clip(noise, -1.0, 1.0).astype(np.float32)


def other_speaker_partners(examples: Sequence[Any], candidates: int = PARTNER_CANDIDATES) -> dict[str, list[Any]]:
    """{example id: up to `candidates` other examples of the set with a different (known) speaker}, in
    the order to try them (the first whose audio can be read is the partner).

    Deterministic for a given set: examples are ordered by a hash of their id and each takes the next
    ones in that cyclic order whose speaker differs. Examples without a speaker, or in a set of one
    speaker, get no partner.
    """
    known = [ex for ex in examples if getattr(ex, "speaker", None)]
    if len({ex.speaker for ex in known}) < 2:
        return {}
    order = sorted(known, key=lambda ex: (zlib.crc32(ex.id.encode("utf-8")), ex.id))
    partners: dict[str, list[Any]] = {}
    for i, ex in enumerate(order):
        found = partners.setdefault(ex.id, [])
        for step in range(1, len(order)):
            other = order[(i + step) % len(order)]
            if other.speaker != ex.speaker:
                found.append(other)
                if len(found) == candidates:
                    break
    return partners


def continuation_floors(example_id: str, prompt: np.ndarray, true_continuation: np.ndarray,
                        other_continuation: Optional[np.ndarray], other_id: Optional[str], scorers: Any) -> dict:
    """One utterance's `floors` (module docstring) with the scorers that are set.

    Args:
      prompt, true_continuation: [samples] float32 16 kHz, the utterance cut at the prompt window.
      other_continuation: the partner's true continuation (`other_speaker_partners`), or None.
      scorers: `runner.Scorers`.
    """
    noise = white_noise(true_continuation, example_id)
    silence = np.zeros_like(np.asarray(true_continuation, np.float32))
    out: dict[str, Any] = {}
    if scorers.speaker is not None:
        waves = [prompt, noise] + ([other_continuation] if other_continuation is not None else [])
        emb = scorers.speaker.embed(waves)
        out["speaker_sim_noise"] = cosine(emb[0], emb[1])
        if other_continuation is not None:
            out["speaker_sim_other_speaker"] = cosine(emb[0], emb[2])
            out["other_speaker_id"] = other_id
    if scorers.dnsmos is not None:
        out["dnsmos_silence"] = scorers.dnsmos.score(silence)
        out["dnsmos_noise"] = scorers.dnsmos.score(noise)
    if scorers.asr is not None:
        out["asr_silence"], out["asr_true"] = scorers.asr.transcribe([silence, true_continuation])
        if scorers.text_lm is not None:
            score = scorers.text_lm.score([out["asr_true"]])[0]
            out["asr_true_lm"] = {"log_likelihood": float(score.log_likelihood), "num_tokens": int(score.num_tokens)}
    return out


def qa_floors(question: np.ndarray, scorers: Any) -> dict:
    """One spoken question's `floors`: the ASR of silence of its length and of the question itself
    (`{"error": ...}` when the recogniser raised: the row is kept, its floors left out and counted)."""
    if scorers.asr is None:
        return {}
    silence = np.zeros_like(np.asarray(question, np.float32))
    try:
        asr_silence, asr_question = scorers.asr.transcribe([silence, question])
    except Exception as e:  # noqa: BLE001 - a floor is not worth the row
        return {ERROR_FIELD: _one_line(e)}
    return {"asr_silence": asr_silence, "asr_question": asr_question}


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


# ---- Pooling -------------------------------------------------------------------------------------------
def _floors(row: Mapping) -> Mapping:
    return row.get(FLOORS_FIELD) or {}


def _without(key: str) -> Callable[[Mapping], Optional[str]]:
    return lambda row: None if key in _floors(row) else _missing(row)


def _missing(row: Mapping) -> str:
    return FLOOR_FAILED if ERROR_FIELD in _floors(row) else row_parts.NOT_SCORED


def parts(suite: str, rows: Sequence[Mapping]) -> dict[str, tuple[list[row_parts.Part], str]]:
    """{pooled floor figure: (per-row parts, transform)} (module docstring); {} for rows without floors."""
    if not any(FLOORS_FIELD in r for r in rows):
        return {}
    floors = [_floors(r) for r in rows]
    has = lambda key: any(key in f for f in floors)  # noqa: E731
    out: dict[str, tuple[list[row_parts.Part], str]] = {}
    if has("asr_silence"):
        out["asr_silence_word_fraction"] = (
            [(float(bool(text_metrics.normalize(f["asr_silence"] or ""))), 1.0) if "asr_silence" in f
             else _missing(r) for r, f in zip(rows, floors)], "identity")
    if suite == "continuation":
        for key in ("speaker_sim_noise", "speaker_sim_other_speaker"):
            if has(key):
                out[f"{key}_floor"] = ([row_parts.value_part(row_parts.field(f, key), _missing(r) if
                                                             key == "speaker_sim_noise" or ERROR_FIELD in f else
                                                             "no readable other-speaker utterance")
                                        for r, f in zip(rows, floors)], "identity")
        for system in ("silence", "noise"):
            if has(f"dnsmos_{system}"):
                for sub in DNSMOS_KEYS:
                    out[f"dnsmos_{system}_{sub}"] = (
                        [row_parts.value_part(row_parts.field(f, f"dnsmos_{system}", sub), _missing(r))
                         for r, f in zip(rows, floors)], "identity")
        if has("asr_true"):
            out["asr_true_wer"] = (row_parts.error_parts(
                rows, lambda r: r.get("reference_continuation"), lambda r: _floors(r).get("asr_true"),
                "empty reference continuation", skip=_without("asr_true")), "identity")
        if has("asr_true_lm"):
            out["asr_true_log_ppl"] = ([row_parts.lm_part(f.get("asr_true_lm"), "empty ASR transcript (no tokens "
                                                          "scored)") for f in floors], "exp")
        if has("asr_silence") and any("text_continuation" in r for r in rows):
            out["speech_text_wer_silence_floor"] = (row_parts.error_parts(
                rows, lambda r: r.get("text_continuation"), lambda r: _floors(r).get("asr_silence"),
                "empty text continuation", skip=_without("asr_silence")), "identity")
    else:
        if has("asr_silence"):
            out["speech_accuracy_silence_floor"] = (
                [(float(text_metrics.any_answer_found(r.get("answers", ()), f["asr_silence"] or "")), 1.0)
                 if "asr_silence" in f else _missing(r) for r, f in zip(rows, floors)], "percent")
        if has("asr_question"):
            out["asr_question_wer"] = (row_parts.error_parts(
                rows, lambda r: r.get("question"), lambda r: _floors(r).get("asr_question"),
                "empty question text", skip=_without("asr_question")), "identity")
    return out


def silence_transcripts(rows: Sequence[Mapping], top: int = 5) -> list[tuple[str, int]]:
    """The most common non-empty ASR transcripts of silence, with their counts."""
    texts = [(_floors(r).get("asr_silence") or "").strip() for r in rows]
    return collections.Counter(t for t in texts if t).most_common(top)


# figure -> (whether higher is better, [(reference figure, "floor" | "ceiling" | "reference", what it is)]);
# only floors mark a figure (`evidence.floor_mark`); a "reference" is another system on the same input.
REFERENCES: dict[str, tuple[bool, list[tuple[str, str, str]]]] = {
    "speaker_sim_generated": (True, [
        ("speaker_sim_noise_floor", "floor", "prompt vs white noise"),
        ("speaker_sim_other_speaker_floor", "floor", "prompt vs another speaker's true continuation"),
        ("speaker_sim_true", "ceiling", "prompt vs the true continuation")]),
    "asr_log_ppl": (False, [
        ("asr_true_log_ppl", "reference", "the ASR transcript of the true continuation")]),
    "speech_text_wer": (False, [
        ("speech_text_wer_silence_floor", "floor", "the ASR transcript of silence vs the model's text"),
        ("asr_true_wer", "reference", "the ASR on the true continuation vs its reference words")]),
    "speech_accuracy": (True, [
        ("speech_accuracy_silence_floor", "floor", "answer found in the ASR transcript of silence"),
    ]),
    "question_wer": (False, [
        ("asr_question_wer", "reference", "the ASR on the same spoken questions"),
    ]),
}
for _key in DNSMOS_KEYS:
    REFERENCES[f"dnsmos_generated_{_key}"] = (True, [
        (f"dnsmos_silence_{_key}", "floor", "silence"),
        (f"dnsmos_noise_{_key}", "floor", "white noise"),
        (f"dnsmos_true_{_key}", "ceiling", "the true continuation"),
        (f"dnsmos_resynthesized_{_key}", "ceiling", "the true continuation resynthesised by the vocoder")])


def metrics(suite: str, rows: Sequence[Mapping]) -> dict[str, float]:
    """The pooled floor figures of `rows` (module docstring)."""
    return {key: row_parts.ratio(per_row, transform).value for key, (per_row, transform) in parts(suite, rows).items()}


def continuation_row_floors(item: Any, partners: Mapping[str, Sequence[Any]], scorers: Any,
                            prompt_samples: int) -> dict:
    """`continuation_floors` of a loaded example (`runner.Loaded`), reading its partner's audio: the
    first of its `other_speaker_partners` that can be read and is longer than the prompt (none: that
    floor is left out of the row). A scorer that raises leaves `{"error": message}` instead."""
    from spectron_jax.data import features

    other, other_id = None, None
    for partner in partners.get(item.example.id, ()) if scorers.speaker is not None else ():
        try:
            wave = features.load_audio(partner.audio)[prompt_samples:]
        except features.AudioError:
            continue
        if wave.size:
            other, other_id = wave, partner.id
            break
    try:
        return continuation_floors(item.example.id, item.wave[:prompt_samples], item.wave[prompt_samples:], other,
                                   other_id, scorers)
    except Exception as e:  # noqa: BLE001 - a floor is not worth the row: left out, counted, said why
        return {ERROR_FIELD: _one_line(e)}
