"""OUT/report.html: one page to read and hear an evaluation, opened straight from the folder.

    OUT/report.html   the pooled figures of metrics.json (each with whatever metrics.json holds beside it:
                      `<figure>_<ci95|floor...>` keys, a figure's value given as an object, or a top-level
                      section keyed by figure names), the paper's value, the plots, the notes, every other
                      section of metrics.json as a table, and a row per example: an audio player and the
                      spectrogram of each of its wavs (prompt, generated continuation, truth, ...), the
                      model's text, the ASR transcript and the row's other fields

The page needs no server and no network. Images (plots, spectrograms, the colour bar) are inside it as
data URIs; the audio players point at the wavs beside it by relative paths (`wavs/...`), so the page
plays from a `file://` URL and from a copy of the whole folder (the wavs are too large to inline for a
test set of hundreds of utterances). Every spectrogram uses one colour scale (`spectrograms.shared_scale`),
printed with the colour bar; they are 8-bit palette PNGs of 64 mel rows (`spectrograms.MEL_POOL`), drawn
for the prompt, the generated audio and the truth (the vocoder-resynthesised truth is played, not drawn),
about 15 kB each. All text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import math
import re
import urllib.parse
from typing import Any, Mapping, Sequence

from spectron_jax import filesystem
from spectron_jax.evaluation import spectrograms

HTML_FILENAME = "report.html"
# metrics.json sections shown in their own place, not as generic tables.
_PLACED = ("suite", "metrics", "notes", "plots", "paper")
# Top-level sections whose keys are not figure names.
_NOT_ABOUT_FIGURES = ("paper", "settings", "scorers", "skipped")
# `<figure>_<suffix>` keys of `metrics` shown beside their figure rather than as figures of their own.
_COMPANION = re.compile(r"(ci\d*|ci\d*_(low|high|lo|hi|lower|upper)|low|high|lo|hi|lower|upper|se|stderr|std|"
                        r"interval\w*|bootstrap\w*|floor\w*|ceiling\w*|baseline\w*|above\w*|excluded\w*|n)$")
# Row fields shown as the row's texts, in this order, with their labels.
_TEXTS = (("reference", "reference"), ("question", "question"), ("answers", "accepted answers"),
          ("model_text", "model's text"), ("prompt_transcript", "model's prompt transcript"),
          ("text_continuation", "model's text continuation"), ("text_answer", "model's answer"),
          ("asr_transcript", "ASR transcript of the generated speech"),
          ("asr_answer", "ASR transcript of the spoken answer"))
# Plots the page does not repeat: the spectrogram grid is the first rows' spectrograms of the table.
_NOT_INLINED = ("plots/spectrograms.png",)
_NOT_FIGURES = {"id", "suite", "wavs", "fingerprint", "speaker", "reference_prompt", "reference_continuation"}

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { font-family: monospace; white-space: nowrap; }
.example td { font-size: 0.9em; }
.media { display: flex; flex-wrap: wrap; gap: 0.4em 1em; }
.wav img { display: block; height: 80px; max-width: 280px; image-rendering: pixelated; }
.wav audio { display: block; width: 280px; height: 36px; }
.small { color: #666; font-size: 0.85em; }
.plots img { max-width: 100%; margin: 0.5em 0; }
"""


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_value(value: Any) -> str:
    """A JSON value as short plain text (floats to 4 significant digits; lists and objects inline)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    return str(value)


def _table(value: Any) -> str:
    """A JSON value as HTML: an object as a key | value table (nested), a list of objects as a table
    with a column per key, anything else as escaped text."""
    if isinstance(value, dict):
        if not value:
            return "<p class='small'>none</p>"
        cells = "".join(f"<tr><th>{_e(k)}</th><td>{_table(v)}</td></tr>" for k, v in value.items())
        return f"<table>{cells}</table>"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = list(dict.fromkeys(k for v in value for k in v))
        head = "".join(f"<th>{_e(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{_e(format_value(v.get(k)))}</td>" for k in keys) + "</tr>"
                       for v in value)
        return f"<table><tr>{head}</tr>{body}</table>"
    return _e(format_value(value))


def _companions(key: str, metrics: Mapping[str, Any], sections: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """What metrics.json holds about figure `key` beside its value: `<key>_<suffix>` keys of `metrics`,
    the fields of a value given as an object, and `section[key]` of every top-level object section."""
    found = [(name[len(key) + 1:], value) for name, value in metrics.items()
             if name.startswith(key + "_") and _COMPANION.fullmatch(name[len(key) + 1:])]
    if isinstance(metrics.get(key), dict):
        found += [(k, v) for k, v in metrics[key].items() if k != "value"]
    found += [(name, section[key]) for name, section in sections.items()
              if isinstance(section, dict) and key in section and name not in _NOT_ABOUT_FIGURES]
    return found


def _is_companion(key: str, metrics: Mapping[str, Any]) -> bool:
    return any(key.startswith(base + "_") and _COMPANION.fullmatch(key[len(base) + 1:])
               for base in metrics if base != key)


def figures_table(payload: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """The pooled figures: label, key, value, what metrics.json says beside it, the paper's value."""
    metrics = dict(payload.get("metrics") or {})
    paper = dict(payload.get("paper") or {})
    sections = {k: v for k, v in payload.items() if k not in _PLACED}
    rows = []
    for key, value in metrics.items():
        if _is_companion(key, metrics):
            continue
        shown = value.get("value") if isinstance(value, dict) else value
        beside = "; ".join(f"{name}: {format_value(v)}" for name, v in _companions(key, metrics, sections))
        theirs = f"{format_value(paper[key])} (the paper's)" if key in paper else "–"
        rows.append(f"<tr><td>{_e(labels.get(key, key))}</td><td><code>{_e(key)}</code></td>"
                    f"<td class='num'>{_e(format_value(shown))}</td><td>{_e(beside)}</td><td>{_e(theirs)}</td></tr>")
    return ("<table><tr><th>figure</th><th>key</th><th>ours</th><th>beside it in metrics.json</th>"
            "<th>the paper's (Spectron)</th></tr>" + "".join(rows) + "</table>")


def _wav_cell(row: Mapping, kind: str, panel: Mapping, scale: tuple[float, float]) -> str:
    relative = str(row["wavs"][kind])
    if kind not in panel:  # missing or unreadable: no player that cannot play
        return f"<div class='wav'><b>{_e(kind)}</b><br><span class='small'>{_e(relative)}: not readable</span></div>"
    src = urllib.parse.quote(relative.replace("\\", "/"))
    image = ""
    if kind in spectrograms.DRAWN:
        uri = data_uri(spectrograms.png(panel[kind], scale, spectrograms.MEL_POOL), "image/png")
        image = f"<img alt='{_e(kind)} log-mel spectrogram' src='{uri}'>"
    return (f"<div class='wav'><b>{_e(kind)}</b><br><audio controls preload='metadata' src='{_e(src)}'></audio>"
            f"{image}</div>")


def _text(value: Any) -> str:
    """A row's text field as shown: '(empty)' for an empty string (the model or the ASR wrote nothing)."""
    return "(empty)" if value == "" else format_value(value)


def _row_html(number: int, row: Mapping, panel: Mapping, scale: tuple[float, float]) -> str:
    wavs = "".join(_wav_cell(row, kind, panel, scale) for kind in spectrograms.wav_kinds(row))
    texts = "".join(f"<p><b>{_e(label)}:</b> {_e(_text(row[key]))}</p>" for key, label in _TEXTS if key in row)
    text_keys = {key for key, _ in _TEXTS}
    figures = {k: v for k, v in row.items() if k not in _NOT_FIGURES and k not in text_keys}
    details = "".join(f"<tr><th>{_e(k)}</th><td class='num'>{_e(format_value(v))}</td></tr>" for k, v in figures.items())
    return (f"<tr class='example' id='row-{number}'><td>{number}<br><code>{_e(row.get('id', ''))}</code>"
            f"{'<br>' + _e(row['speaker']) if row.get('speaker') else ''}</td>"
            f"<td><div class='media'>{wavs or '<span class=small>no audio written</span>'}</div></td><td>{texts}</td>"
            f"<td><details><summary>{len(figures)} fields</summary><table>{details}</table></details></td></tr>")


def render(output_dir: filesystem.PathLike, payload: Mapping[str, Any], rows: Sequence[Mapping],
           labels: Mapping[str, str] | None = None) -> str:
    """The page for a report folder.

    Args:
      output_dir: the folder holding the rows' wavs and the plots metrics.json lists.
      payload: the metrics.json object (`report.write` writes it).
      rows: the examples.jsonl rows.
      labels: figure key -> a readable label (default: the key).
    """
    suite = payload.get("suite", "")
    metrics = payload.get("metrics") or {}
    panels = {p["id"]: p for p in spectrograms.row_panels(output_dir, rows)}
    scale = spectrograms.shared_scale(list(panels.values()))
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>", "<link rel='icon' href='data:,'>",
             f"<title>Evaluation: {_e(suite)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Evaluation: {_e(suite)}</h1>",
             f"<p>{_e(format_value(metrics.get('num_examples', len(rows))))} examples scored, "
             f"{_e(format_value((payload.get('skipped') or {}).get('count', 0)))} skipped.</p>",
             "<h2>Figures</h2>", figures_table(payload, labels or {})]
    if payload.get("notes"):
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{_e(n)}</li>" for n in payload["notes"]] + ["</ul>"]
    plots = [p for p in payload.get("plots") or () if p not in _NOT_INLINED
             and filesystem.is_file(filesystem.join(output_dir, p))]
    if plots:
        parts.append("<h2>Plots</h2><div class='plots'>")
        parts += [f"<figure><img alt='{_e(p)}' src='{data_uri(filesystem.read_bytes(filesystem.join(output_dir, p)), 'image/png')}'>"
                  f"<figcaption class='small'>{_e(p)}</figcaption></figure>" for p in plots]
        parts.append("</div>")
    for name, section in payload.items():
        if name not in _PLACED:
            parts += [f"<h2>{_e(name)}</h2>", _table(section)]
    parts += [f"<h2>Examples ({len(rows)})</h2>",
              "<p class='small'>Spectrograms: the log-mel of each wav (natural log of mel magnitude), all on one "
              f"colour scale (every example's, the same) from {scale[0]:.2f} <img alt='colour scale' style='vertical-align: middle' "
              f"src='{data_uri(spectrograms.colour_bar_png(), 'image/png')}'> {scale[1]:.2f}.</p>",
              f"<table data-scale-min='{scale[0]:.6g}' data-scale-max='{scale[1]:.6g}'>"
              "<tr><th>#</th><th>audio</th><th>text</th><th>row</th></tr>"]
    parts += [_row_html(i, row, panels.get(row.get("id"), {}), scale) for i, row in enumerate(rows, 1)]
    parts += ["</table></body></html>"]
    return "\n".join(parts) + "\n"


def write(output_dir: filesystem.PathLike, payload: Mapping[str, Any], rows: Sequence[Mapping],
          labels: Mapping[str, str] | None = None) -> str:
    """Writes OUT/report.html (local or gs://); returns its relative name."""
    filesystem.write_text(filesystem.join(output_dir, HTML_FILENAME), render(output_dir, payload, rows, labels))
    return HTML_FILENAME

