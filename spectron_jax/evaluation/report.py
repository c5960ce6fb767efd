"""Writes a suite's report into its output folder.

    OUT/metrics.json    pooled figures, skipped examples (count, by reason, each with its reason), the
                        scorers used, the run's settings; with `evidence` (`evaluation.evidence`) each
                        figure's 95 % bootstrap interval (`intervals`), its floors and ceilings
                        (`references`), the rows it leaves out and why (`excluded`); `provenance`
                        (`evaluation.provenance`: step, decode, scorer versions, commit, time)
    OUT/report.md       a table of our figures (with intervals; "≤ floor" marks a figure not above its
                        floor) beside the paper's (marked as the paper's), which scorer produced which
                        figure, the floors and ceilings, skips, settings, provenance
    OUT/examples.jsonl  one row per example (written by the suite as it goes)
    OUT/wavs/           the generated audio (written by the suite)
    OUT/plots/*.png     continuation: a prompt | generated | true spectrogram grid (one colour scale), a
                        histogram of speaker similarity, DNSMOS per system; QA: accuracy in text and in speech
    OUT/report.html     the same figures with every example's audio and spectrograms (`report_html`)

Every file goes through `spectron_jax.filesystem`, so OUT may be a `gs://` folder.

The paper's values come from `PAPER` (see the reference notes on where each number was read); they
were measured with other scorers (human N-MOS, an unnamed ASR and speaker encoder, GPT-2 Medium), so
the two columns are comparable in kind, not in value, unless the same scorers are chosen.
"""

from __future__ import annotations

import collections
import io
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from spectron_jax import filesystem
from spectron_jax.evaluation import evidence as evidence_lib
from spectron_jax.evaluation import report_html, spectrograms
from spectron_jax.evaluation.datasets import Skip

# (our metric key, row label, the paper's value for Spectron, the paper's label for it)
PAPER: dict[str, list[tuple[str, str, float | None, str]]] = {
    "continuation": [
        ("asr_log_ppl", "log-PPL of the ASR transcript of the continuation ↓", 126.08, "log-PPL (GPT-2 Medium), 350M"),
        ("speaker_sim_generated", "speaker similarity, prompt vs generated ↑", 0.42, "speaker similarity, 350M"),
        ("dnsmos_generated_p808_mos", "naturalness of the continuation (DNSMOS P.808) ↑", 3.68, "N-MOS (human raters)"),
        ("dnsmos_true_p808_mos", "naturalness of the true continuation (DNSMOS P.808)", 4.23, "N-MOS of ground truth"),
        ("speaker_sim_true", "speaker similarity, prompt vs true continuation (ceiling)", None, ""),
        ("dnsmos_resynthesized_p808_mos", "naturalness of the vocoder-resynthesised truth (DNSMOS P.808)", None, ""),
        ("continuation_text_ppl", "perplexity of the model's text continuation ↓", None, ""),
        ("text_wer", "WER of the model's text vs the reference transcript ↓", None, ""),
        ("text_cer", "CER of the model's text vs the reference transcript ↓", None, ""),
        ("prompt_transcript_wer", "WER of the model's prompt transcript vs the reference words before phi ↓", None, ""),
        ("prompt_transcript_cer", "CER of the model's prompt transcript vs the reference words before phi ↓", None, ""),
        ("continuation_wer", "WER of the model's text continuation vs the reference words after phi", None, ""),
        ("separator_fraction", "share of rows whose text holds the separator", None, ""),
        ("speech_text_wer", "WER of the ASR of the speech vs the model's text continuation ↓", None, ""),
        ("l1_teacher_forced", "log-mel L1 to the true continuation, teacher-forced ↓", None, ""),
        ("l1_free_running", "log-mel L1 to the true continuation, free-running ↓", None, ""),
        ("length_ratio", "generated / true continuation length", None, ""),
        ("stop_head_fraction", "share ended by the stop head (rest: frame budget)", None, ""),
    ],
    "llama_questions": [
        ("text_accuracy", "accuracy %, answer in the model's text ↑", None, ""),
        ("speech_accuracy", "accuracy %, answer in the ASR of the spoken answer ↑", 22.9, "LLaMA-Questions accuracy %, 1B"),
        ("question_wer", "WER of the model's transcript of the question ↓", None, ""),
        ("stop_head_fraction", "share ended by the stop head (rest: frame budget)", None, ""),
    ],
    "web_questions": [
        ("text_accuracy", "accuracy %, answer in the model's text ↑", None, ""),
        ("speech_accuracy", "accuracy %, answer in the ASR of the spoken answer ↑", 6.1, "WebQuestions accuracy %, 1B"),
        ("question_wer", "WER of the model's transcript of the question ↓", None, ""),
        ("stop_head_fraction", "share ended by the stop head (rest: frame budget)", None, ""),
    ],
}
# Which scorer each figure comes from (keys of `runner.Scorers.names()`).
SCORED_BY = {"asr_log_ppl": ("asr", "text_lm"), "continuation_text_ppl": ("text_lm",), "speech_text_wer": ("asr",),
             "speaker_sim_generated": ("speaker",), "speaker_sim_true": ("speaker",), "speech_accuracy": ("asr",)}
REPORT_FILES = ("metrics.json", "report.md", "examples.jsonl", "report.html")


def _clean(value: Any) -> Any:
    """NaN / inf -> None so that metrics.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def skip_summary(skips: Sequence[Skip]) -> dict:
    return {"count": len(skips), "by_reason": dict(collections.Counter(s.reason for s in skips)),
            "examples": [{"id": s.id, "source": s.source, "reason": s.reason, "detail": s.detail} for s in skips]}


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _scorer_note(key: str, names: Mapping[str, str]) -> str:
    """Which scorer(s) produced the figure `key`; '' for figures computed here."""
    if key.startswith("dnsmos"):
        return names.get("dnsmos", "")
    return " + ".join(names[k] for k in SCORED_BY.get(key, ()) if k in names)


def markdown(suite: str, values: Mapping[str, Any], scorers: Mapping[str, str], skips: dict,
             settings: Mapping[str, Any], notes: Sequence[str] = (), evidence: Mapping | None = None,
             provenance: Mapping | None = None) -> str:
    lines = [f"# Evaluation: {suite}", "", f"{values.get('num_examples', 0)} examples scored, "
             f"{skips['count']} skipped.", "",
             "| figure | ours | the paper's (Spectron) | scored by |", "| --- | --- | --- | --- |"]
    for key, label, paper, paper_label in PAPER[suite]:
        if key not in values:
            continue
        theirs = f"{paper} (the paper's: {paper_label})" if paper is not None else "–"
        ours = evidence_lib.figure_cell(key, values, evidence, _format)
        lines.append(f"| {label} | {ours} | {theirs} | {_scorer_note(key, scorers) or 'this tool'} |")
    shown = {key for key, *_ in PAPER[suite]} | evidence_lib.shown_beside(evidence)
    extra = [(k, v) for k, v in values.items() if k not in shown and k != "num_examples"]
    if extra:
        lines += ["", "Other figures:", ""] + [f"- `{k}`: {evidence_lib.figure_cell(k, values, evidence, _format)}"
                                              for k, v in extra]
    lines += ["", "The paper's values were measured with its own scorers (human N-MOS raters, an unnamed ASR "
              "and speaker encoder, GPT-2 Medium for log-PPL); ours with the scorers below, so compare "
              "systems scored here with each other, and the paper's column in kind only.", "", "## Scorers", ""]
    lines += [f"- {kind}: {name}" for kind, name in scorers.items()] or ["- none"]
    lines += evidence_lib.markdown_section(values, evidence)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Skipped examples", ""]
    lines += [f"- {reason}: {count}" for reason, count in skips["by_reason"].items()] or ["- none"]
    lines += [f"  - `{s['id'] or s['source']}` ({s['reason']}): {s['detail']}" for s in skips["examples"][:50]]
    lines += ["", "## Settings", ""] + [f"- `{k}`: {v}" for k, v in settings.items()]
    if provenance:
        lines += ["", "## Provenance", ""] + [f"- `{k}`: {v}" for k, v in provenance.items() if k != "packages"]
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in (provenance.get("packages") or {}).items()))
    return "\n".join(lines) + "\n"


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: epath.Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    filesystem.write_bytes(path, buffer.getvalue())


def plot_spectrograms(panels: Sequence[Mapping[str, Any]], path: epath.Path) -> None:
    """Rows of prompt | generated | true log-mel spectrograms ([frames, mel] each; a kind a panel lacks
    is left blank), all on one colour scale (`spectrograms.shared_scale`)."""
    plt = _figure()
    vmin, vmax = spectrograms.shared_scale(panels)
    fig, axes = plt.subplots(len(panels), 3, figsize=(12, 2.2 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        for col, kind in enumerate(("prompt", "generated", "true")):
            ax, frames = axes[row][col], np.asarray(panel.get(kind, ()), np.float32)
            if frames.size:
                ax.imshow(frames.T, origin="lower", aspect="auto", cmap=spectrograms.CMAP, vmin=vmin, vmax=vmax)
            ax.set_title(f"{panel['id']}: {kind}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    _save(plt, fig, path)


def plot_histogram(series: Mapping[str, Sequence[float]], path: epath.Path, xlabel: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in series.items():
        values = [v for v in values if v is not None and math.isfinite(v)]
        if values:
            ax.hist(values, bins=20, range=(-1.0, 1.0), alpha=0.6, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)


def plot_bars(groups: Mapping[str, Mapping[str, float]], path: epath.Path, ylabel: str) -> None:
    """Grouped bars: groups (systems) x series (e.g. DNSMOS keys)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(groups)
    series = sorted({k for g in groups.values() for k in g})
    width = 0.8 / max(len(series), 1)
    for i, key in enumerate(series):
        heights = [groups[n].get(key, float("nan")) for n in names]
        ax.bar(np.arange(len(names)) + i * width, [0.0 if not math.isfinite(h) else h for h in heights],
               width, label=key)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)


def write(output_dir: epath.Path, suite: str, values: Mapping[str, Any], rows: Sequence[dict],
          skips: Sequence[Skip], scorers: Mapping[str, str], settings: Mapping[str, Any],
          panels: Sequence[Mapping[str, Any]] = (), notes: Sequence[str] = (), evidence: Mapping | None = None,
          provenance: Mapping | None = None) -> list[str]:
    """Writes metrics.json, report.md, report.html and the plots; returns the plot files written (relative names).

    `evidence`: `evidence.collect` of the rows (intervals, floors, exclusions); `provenance`:
    `provenance.provenance` (step, decode, scorer versions, commit, time). Both are optional.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    plots_dir = output_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    if suite == "continuation" and rows:
        if panels:
            plot_spectrograms(panels, plots_dir / "spectrograms.png")
            plots.append("plots/spectrograms.png")
        if any("speaker_sim_generated" in r for r in rows):
            plot_histogram({"prompt vs generated": [r.get("speaker_sim_generated") for r in rows],
                            "prompt vs true": [r.get("speaker_sim_true") for r in rows]},
                           plots_dir / "speaker_similarity.png", "cosine similarity")
            plots.append("plots/speaker_similarity.png")
        systems = {s: {k: values[f"dnsmos_{s}_{k}"] for k in ("p808_mos", "sig_mos", "bak_mos", "ovrl_mos")}
                   for s in ("generated", "true", "resynthesized") if f"dnsmos_{s}_p808_mos" in values}
        if systems:
            plot_bars(systems, plots_dir / "dnsmos.png", "DNSMOS")
            plots.append("plots/dnsmos.png")
    elif rows:
        plot_bars({"text": {"accuracy %": values.get("text_accuracy", float("nan"))},
                   "speech (ASR)": {"accuracy %": values.get("speech_accuracy", float("nan"))}},
                  plots_dir / "accuracy.png", "accuracy %")
        plots.append("plots/accuracy.png")
    skipped = skip_summary(skips)
    payload = {"suite": suite, "metrics": dict(values), "skipped": skipped, "scorers": dict(scorers),
               "settings": dict(settings), "notes": list(notes), "plots": plots,
               "paper": {key: paper for key, _, paper, _ in PAPER[suite] if paper is not None}}
    if evidence:
        payload.update({k: evidence[k] for k in ("intervals", "bootstrap", "references", "excluded",
                                                 "silence_transcripts") if k in evidence})
    if provenance:
        payload["provenance"] = dict(provenance)
    filesystem.write_text(output_dir / "metrics.json", json.dumps(_clean(payload), indent=2, ensure_ascii=False) + "\n")
    text = markdown(suite, values, scorers, skipped, settings, notes, evidence, provenance)
    if plots:
        text += "\n## Plots\n\n" + "".join(f"![{p}]({p})\n" for p in plots)
    filesystem.write_text(output_dir / "report.md", text)
    report_html.write(output_dir, _clean(payload), rows, {key: label for key, label, *_ in PAPER[suite]})
    return plots


def comparison_markdown(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """One table over several evaluations of one suite (e.g. the points of a sweep).

    Args:
      entries: name -> a metrics.json payload (`write` writes them); all of the same suite.

    Returns:
      Markdown: a row per entry, a column per figure of `PAPER[suite]` that any entry has (with its
      interval; the best entry and those whose interval overlaps it marked: `evidence.comparison_cells`),
      plus the paper's Spectron value as the first row (marked as the paper's) where it reports one.
    """
    suites = {payload["suite"] for payload in entries.values()}
    if len(suites) != 1:
        raise ValueError(f"cannot compare evaluations of different suites: {sorted(suites)}")
    suite = suites.pop()
    columns = [(key, label, paper) for key, label, paper, _ in PAPER[suite]
               if any(key in payload["metrics"] for payload in entries.values())]
    lines = [f"| {suite} | examples | " + " | ".join(label for _, label, _ in columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    if any(paper is not None for _, _, paper in columns):
        lines.append("| the paper's Spectron | – | " + " | ".join(
            "–" if paper is None else f"{paper} (the paper's)" for _, _, paper in columns) + " |")
    names = list(entries)
    cells = [evidence_lib.comparison_cells([entries[n]["metrics"] for n in names],
                                           [entries[n].get("intervals") or {} for n in names], key,
                                           evidence_lib.direction(label), _format) for key, label, _ in columns]
    for i, name in enumerate(names):
        lines.append(f"| {name} | {entries[name]['metrics'].get('num_examples', 0)} | "
                     + " | ".join(column[i] for column in cells) + " |")
    return "\n".join(lines) + "\n\n" + evidence_lib.COMPARISON_NOTE + "\n"
