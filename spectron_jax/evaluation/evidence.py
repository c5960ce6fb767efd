"""The evidence beside each pooled figure: its 95 % interval, its floors and ceilings, the rows it leaves out.

    found = collect(suite, rows, BootstrapConfig(resamples=1000, seed=0))
    found["figures"]     # the floor figures (`floors.metrics`), to be added to the suite's metrics
    found["intervals"]   # {figure: [low, high] or None} for every pooled figure (suite and floors)
    found["excluded"]    # {figure: {"rows_used": n, "rows_excluded": {reason: count}}}
    found["references"]  # {figure: [{"figure", "kind" (floor | ceiling | reference), "what"}]} (`floors.REFERENCES`)
    figure_cell(key, values, found)   # "0.432 [0.401, 0.460] ≤ floor" for report.md

`parts` says how every pooled figure of a suite is made from its rows (the same pooling as
`continuation.metrics` / `spoken_qa.metrics`, as ratios of sums: tests check that the two agree), so
that the bootstrap (`intervals`) resamples utterances and recomputes each figure whole.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from spectron_jax.evaluation import floors, intervals, row_parts
from spectron_jax.evaluation.naturalness import KEYS as DNSMOS_KEYS

# `text_boundary` values (`runner.SEPARATED`, `runner.UNMARKED`; repeated so this module needs no runner).
SEPARATED, UNMARKED = "separator", "unmarked"
NO_SEPARATOR = "no text separator"
CONTINUATION_SYSTEMS = ("generated", "true", "resynthesized")


def _continuation_parts(rows: Sequence[Mapping]) -> dict[str, tuple[list, str]]:
    out: dict[str, tuple[list, str]] = {}
    for unit, name in (("word", "text_wer"), ("char", "text_cer")):
        out[name] = (row_parts.error_parts(rows, lambda r: r["reference"], lambda r: r["model_text"],
                                           "empty reference", unit), "identity")
    kinds = [r.get("text_boundary") for r in rows]
    if any(k != UNMARKED for k in kinds):
        out["separator_fraction"] = (row_parts.flag_of(rows, lambda r: r.get("text_boundary") == SEPARATED), "identity")
    if any(k == SEPARATED for k in kinds):
        unsplit = lambda r: None if r.get("text_boundary") == SEPARATED else NO_SEPARATOR  # noqa: E731
        for name, ref, hyp in (("prompt_transcript", "reference_prompt", "prompt_transcript"),
                               ("continuation", "reference_continuation", "text_continuation")):
            for unit, suffix in (("word", "wer"), ("char", "cer")):
                out[f"{name}_{suffix}"] = (row_parts.error_parts(
                    rows, lambda r, ref=ref: r[ref], lambda r, hyp=hyp: r[hyp], f"empty {ref}", unit, unsplit),
                    "identity")
    if any("continuation_lm" in r for r in rows):
        out["continuation_text_ppl"] = ([row_parts.lm_part(r.get("continuation_lm"), "empty text (no tokens scored)")
                                         for r in rows], "exp")
    if any("asr_lm" in r for r in rows):
        out["asr_log_ppl"] = ([row_parts.lm_part(r.get("asr_lm"), "empty ASR transcript (no tokens scored)")
                               for r in rows], "exp")
    if any("asr_transcript" in r for r in rows):
        out["speech_text_wer"] = (row_parts.error_parts(
            rows, lambda r: r["text_continuation"], lambda r: r["asr_transcript"], "empty text continuation",
            skip=lambda r: None if "asr_transcript" in r else row_parts.NOT_SCORED), "identity")
    for key in ("speaker_sim_generated", "speaker_sim_true", "l1_teacher_forced", "l1_free_running"):
        if any(key in r for r in rows):
            per_row = row_parts.mean_of(rows, key)
            if key == "l1_teacher_forced":
                per_row = ["teacher-forced pass failed" if r.get("teacher_forced_error") and isinstance(p, str) else p
                           for r, p in zip(rows, per_row)]
            out[key] = (per_row, "identity")
    for system in CONTINUATION_SYSTEMS:
        if any(f"dnsmos_{system}" in r for r in rows):
            for sub in DNSMOS_KEYS:
                out[f"dnsmos_{system}_{sub}"] = (row_parts.mean_of(rows, f"dnsmos_{system}", sub), "identity")
    out["length_ratio"] = ([row_parts.value_part(r["generated_frames"] / max(r["true_frames"], 1)) for r in rows],
                           "identity")
    for key in ("generated_seconds", "true_seconds"):
        out[key] = (row_parts.mean_of(rows, key), "identity")
    out["stop_head_fraction"] = (row_parts.flag_of(rows, lambda r: r["stop_reason"] == "stop_head"), "identity")
    out["budget_fraction"] = (row_parts.flag_of(rows, lambda r: r["stop_reason"] == "budget"), "identity")
    return out


def _qa_parts(rows: Sequence[Mapping]) -> dict[str, tuple[list, str]]:
    out: dict[str, tuple[list, str]] = {
        "text_accuracy": (row_parts.flag_of(rows, lambda r: r["text_correct"]), "percent")}
    if any("speech_correct" in r for r in rows):
        out["speech_accuracy"] = ([row_parts.value_part(row_parts.field(r, "speech_correct")) for r in rows],
                                  "percent")
    kinds = [r.get("text_boundary") for r in rows]
    if any(k != UNMARKED for k in kinds):
        out["separator_fraction"] = (row_parts.flag_of(rows, lambda r: r.get("text_boundary") == SEPARATED), "identity")
    unmarked = all(k == UNMARKED for k in kinds)

    def skip(r):
        if not r["question"]:
            return "empty question text"
        return None if unmarked or r.get("text_boundary") == SEPARATED else NO_SEPARATOR

    if any(skip(r) is None for r in rows):
        out["question_wer"] = (row_parts.error_parts(
            rows, lambda r: r["question"], lambda r: r["model_text"] if unmarked else r["prompt_transcript"],
            "empty question text", skip=skip), "identity")
    out["stop_head_fraction"] = (row_parts.flag_of(rows, lambda r: r["stop_reason"] == "stop_head"), "identity")
    out["answer_seconds"] = (row_parts.mean_of(rows, "answer_seconds"), "identity")
    return out


def parts(suite: str, rows: Sequence[Mapping]) -> dict[str, tuple[list, str]]:
    """{pooled figure: (per-row parts, transform)} of the suite's figures and its floors (`row_parts`)."""
    if not rows:
        return {}
    own = _continuation_parts(rows) if suite == "continuation" else _qa_parts(rows)
    return {**own, **floors.parts(suite, rows)}


def references(values: Mapping[str, Any]) -> dict[str, list[dict]]:
    """{figure: its floors / ceilings that `values` holds} (`floors.REFERENCES`)."""
    out = {}
    for key, (_, refs) in floors.REFERENCES.items():
        found = [{"figure": ref, "kind": kind, "what": what} for ref, kind, what in refs if ref in values]
        if key in values and found:
            out[key] = found
    return out


def collect(suite: str, rows: Sequence[Mapping], config: intervals.BootstrapConfig = intervals.BootstrapConfig()
            ) -> dict:
    """The evidence of a report (module docstring); floor figures' values are in `figures`."""
    every = parts(suite, rows)
    ratios = {key: row_parts.ratio(per_row, transform) for key, (per_row, transform) in every.items()}
    floor_figures = {key: ratios[key].value for key in floors.parts(suite, rows)}
    values = {key: r.value for key, r in ratios.items()}
    return {"figures": floor_figures, "intervals": intervals.intervals(ratios, config),
            "bootstrap": config.describe(),
            "excluded": {key: row_parts.exclusions(per_row) for key, (per_row, _) in every.items()},
            "references": references(values),
            "silence_transcripts": [[text, n] for text, n in floors.silence_transcripts(rows)]}


def shown_beside(found: Optional[Mapping]) -> set[str]:
    """The figures `markdown_section` prints (floors and ceilings, the silence sentence)."""
    refs = (found or {}).get("references") or {}
    return {ref["figure"] for listed in refs.values() for ref in listed} | {"asr_silence_word_fraction"}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def floor_mark(key: str, values: Mapping[str, Any], found: Optional[Mapping]) -> str:
    """'≤ floor' when the figure is not better than its best floor; '≈ floor' when better but its interval
    overlaps that floor's; '' otherwise (or without floors)."""
    if key not in floors.REFERENCES or not _finite(values.get(key)):
        return ""
    higher, refs = floors.REFERENCES[key]
    floor_keys = [ref for ref, kind, _ in refs if kind == "floor" and _finite(values.get(ref))]
    if not floor_keys:
        return ""
    best = (max if higher else min)(floor_keys, key=lambda k: values[k])
    value, floor = values[key], values[best]
    if (value <= floor) if higher else (value >= floor):
        return "≤ floor" if higher else "≥ floor (not better)"
    spans = (found or {}).get("intervals", {})
    if intervals.overlap(spans.get(key), spans.get(best)):
        return "≈ floor (intervals overlap)"
    return ""


def format_interval(span: Optional[Sequence[float]]) -> str:
    return "" if not span else f"[{span[0]:.3f}, {span[1]:.3f}]"


def figure_cell(key: str, values: Mapping[str, Any], found: Optional[Mapping], fmt=None) -> str:
    """A figure as report.md prints it: value, [95 % interval], and its floor mark (`floor_mark`)."""
    value = values.get(key)
    text = fmt(value) if fmt is not None else ("n/a" if not _finite(value) else
                                               f"{value:.3f}" if isinstance(value, float) else str(value))
    span = format_interval(((found or {}).get("intervals") or {}).get(key))
    mark = floor_mark(key, values, found)
    return " ".join(p for p in (text, span, f"**{mark}**" if mark else "") if p)


def markdown_section(values: Mapping[str, Any], found: Optional[Mapping]) -> list[str]:
    """report.md lines: the floors and ceilings table, the rows each figure leaves out, the bootstrap."""
    if not found:
        return []
    lines: list[str] = []
    refs = found.get("references") or {}
    if refs:
        lines += ["", "## Floors and ceilings", "",
                  "The same scorers on the same utterances: a floor is what input that cannot be right scores "
                  "(noise, silence, another speaker), a ceiling what the real thing scores, a reference the real "
                  "thing through the same ASR / LM. A figure that is not better than its best floor is marked "
                  "≤ floor; ≈ floor when its interval overlaps that floor's.",
                  "", "| figure | ours | floor / ceiling | value |", "| --- | --- | --- | --- |"]
        for key, listed in refs.items():
            for i, ref in enumerate(listed):
                ours = figure_cell(key, values, found) if i == 0 else ""
                lines.append(f"| {'`' + key + '`' if i == 0 else ''} | {ours} | {ref['kind']}: {ref['what']} "
                             f"(`{ref['figure']}`) | {figure_cell(ref['figure'], values, found)} |")
    if "asr_silence_word_fraction" in values:
        said = ", ".join(f"\"{text}\" ({n})" for text, n in found.get("silence_transcripts") or ()) or "nothing"
        lines += ["", f"The ASR wrote words for {100 * values['asr_silence_word_fraction']:.0f} % of the silence "
                  f"clips; most often: {said}."]
    excluded = {k: v for k, v in (found.get("excluded") or {}).items() if v["rows_excluded"]}
    if excluded:
        lines += ["", "## Rows left out of a figure", ""]
        lines += [f"- `{key}`: {v['rows_used']} rows used; left out: "
                  + ", ".join(f"{reason} ({n})" for reason, n in v["rows_excluded"].items())
                  for key, v in excluded.items()]
    boot = found.get("bootstrap") or {}
    if boot:
        lines += ["", f"Intervals: {100 * boot['level']:g} % {boot['method']}; {boot['resamples']} resamples, "
                  f"seed {boot['seed']}. Pooled WER / CER / perplexity are ratios of sums, resampled as such."]
    return lines


OVERLAP_MARK = "≈"
BEST_MARK = "(best)"
COMPARISON_NOTE = ("Cells: figure [95 % bootstrap interval over utterances]. Per figure with a direction (↑ / ↓), "
                   f"{BEST_MARK} marks the best point, and {OVERLAP_MARK} a point whose interval overlaps the "
                   "best one's: that difference is not supported by these utterances.")


def direction(label: str) -> Optional[bool]:
    """True when higher is better (the label ends with ↑), False for ↓, None without an arrow."""
    label = label.strip()
    return True if label.endswith("↑") else False if label.endswith("↓") else None


def comparison_cells(values: Sequence[Optional[Mapping[str, Any]]], spans: Sequence[Optional[Mapping[str, Any]]],
                     key: str, higher: Optional[bool], fmt) -> list[str]:
    """One table row's cells over several evaluations: value [interval], the best marked, and those
    whose interval overlaps the best's marked `OVERLAP_MARK` (`COMPARISON_NOTE`); no marks when the
    best or all the others have no interval (reports written before intervals existed).

    Args:
      values: per evaluation its metrics (None: not evaluated); spans: per evaluation its `intervals`.
      higher: the figure's direction (`direction`); None leaves the cells unmarked.
    """
    got = [None if v is None else v.get(key) for v in values]
    box = [None if s is None else s.get(key) for s in spans]
    cells = [" ".join(p for p in (fmt(v), format_interval(b)) if p) for v, b in zip(got, box)]
    finite = [i for i, v in enumerate(got) if _finite(v)]
    if higher is None or len(finite) < 2:
        return cells
    best = (max if higher else min)(finite, key=lambda i: got[i])
    if not box[best] or not any(box[i] for i in finite if i != best):
        return cells  # without intervals there is nothing to say about the differences
    cells[best] += f" {BEST_MARK}"
    for i in finite:
        if i != best and intervals.overlap(box[i], box[best]):
            cells[i] += f" {OVERLAP_MARK}"
    return cells
