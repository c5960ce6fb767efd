"""report.html: the figures and whatever metrics.json holds beside them, every row's audio and spectrograms
on one colour scale, escaped text; opened in a real headless Chromium from a real eval run of a tiny export."""

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest

from spectron_jax import eval as eval_cli
from spectron_jax import vocoder
from spectron_jax.evaluation import report, report_html, spectrograms
from tests.test_eval_export import export_dir  # noqa: F401 - the tiny export fixture

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _tone(seconds, amplitude, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 300 * t) * (1 + np.sin(2 * np.pi * 4 * t)) / 2).astype(np.float32)


def _images(page):
    """The decoded data-URI PNGs of a page, in order: [height, width, channels] float arrays."""
    from matplotlib import image

    found = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    return [image.imread(io.BytesIO(base64.b64decode(data)), format="png") for data in found]


def _folder_with_rows(tmp_path, amplitudes):
    """A report folder with one row per amplitude, each naming a prompt and a generated wav."""
    rows = []
    for i, amplitude in enumerate(amplitudes):
        row = {"id": f"u{i}", "wavs": {}}
        for kind in ("prompt", "generated"):
            vocoder.write_wav(tmp_path / "wavs" / f"u{i}_{kind}.wav", _tone(1.0, amplitude), 16000)
            row["wavs"][kind] = f"wavs/u{i}_{kind}.wav"
        rows.append(row)
    return rows


def test_every_spectrogram_shares_one_colour_scale(tmp_path):
    from matplotlib import colormaps

    rows = _folder_with_rows(tmp_path, [0.8, 0.008])  # the same sound, 40 dB apart
    panels = spectrograms.row_panels(tmp_path, rows)
    low, high = spectrograms.shared_scale(panels)
    values = np.concatenate([p[k].ravel() for p in panels for k in ("prompt", "generated")])
    assert (low, high) == (float(values.min()), float(values.max()))
    page = report_html.render(tmp_path, {"suite": "continuation", "metrics": {}}, rows)
    images = _images(page)[1:]  # after the colour bar: u0 prompt, u0 generated, u1 prompt, u1 generated
    assert len(images) == 4
    cmap = colormaps[spectrograms.CMAP]
    for picture, (panel, kind) in zip(images, [(p, k) for p in panels for k in ("prompt", "generated")]):
        # every pixel is the colour map at (value - low) / (high - low) of the shared range, over pairs of mel bins
        pooled = panel[kind].reshape(len(panel[kind]), 64, 2).mean(-1)
        expected = cmap(np.clip((pooled.T - low) / (high - low), 0, 1))[::-1, :, :3]
        assert picture.shape[:2] == expected.shape[:2]
        assert np.max(np.abs(picture[..., :3] - expected)) <= 1.5 / 255
    brightest = [float(picture[..., :3].sum(-1).max()) for picture in images]
    assert brightest[2] < brightest[0] - 0.5, brightest  # the quiet row looks quiet (not stretched to full range)


def test_rows_without_a_readable_wav_get_no_player_and_text_is_escaped(tmp_path):
    rows = _folder_with_rows(tmp_path, [0.5])
    rows[0]["wavs"]["true"] = "wavs/gone.wav"
    rows[0]["model_text"] = "<script>alert('x')</script> & more"
    rows[0]["asr_transcript"] = "a <b>bold</b> claim"
    page = report_html.render(tmp_path, {"suite": "continuation", "metrics": {"num_examples": 1},
                                         "notes": ["a <note>"]}, rows)
    assert page.count("<audio ") == 2 and "wavs/gone.wav: not readable" in page
    assert "<script>" not in page and "<b>bold</b>" not in page and "<note>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "a &lt;b&gt;bold&lt;/b&gt; claim" in page


def test_whatever_metrics_json_holds_beside_a_figure_is_shown_with_it():
    payload = {
        "suite": "continuation",
        "metrics": {"num_examples": 3, "text_wer": 0.5, "text_wer_ci95": [0.25, 0.75],
                    "speaker_sim_generated": {"value": 0.41, "floor": 0.56}, "text_cer": 0.2},
        "floors": {"text_cer": 0.9},
        "provenance": {"step": 1200, "commit": "abc<1>"},
        "paper": {"speaker_sim_generated": 0.42},
    }
    page = report_html.render(".", payload, [], {"text_wer": "WER of the text"})
    table = page[page.index("<h2>Figures</h2>"):page.index("<h2>floors</h2>")]
    cells = {m[1]: m for m in re.findall(r"<tr><td>(.*?)</td><td><code>(.*?)</code></td><td class='num'>(.*?)</td>"
                                         r"<td>(.*?)</td><td>(.*?)</td></tr>", table)}
    assert set(cells) == {"num_examples", "text_wer", "speaker_sim_generated", "text_cer"}  # no ci95 row
    assert cells["text_wer"][0] == "WER of the text" and cells["text_wer"][3] == "ci95: [0.25, 0.75]"
    assert cells["speaker_sim_generated"][2] == "0.41" and cells["speaker_sim_generated"][3] == "floor: 0.56"
    assert cells["speaker_sim_generated"][4] == "0.42 (the paper&#x27;s)"
    assert cells["text_cer"][3] == "floors: 0.9"
    assert "<th>commit</th><td>abc&lt;1&gt;</td>" in page  # every other section as a table


@pytest.fixture(scope="module")
def report_dir(export_dir, tmp_path_factory, repo_root):  # noqa: F811
    """A real continuation eval of the tiny export: 2 rows, then a resume to 3 (2 rows reused)."""
    out = tmp_path_factory.mktemp("html") / "report"
    flags = [f"--export_dir={export_dir}", "--suite=continuation", f"--data_dir={repo_root / 'data'}",
             f"--output_dir={out}", "--batch_size=2", "--max_frames=24", "--asr=pocketsphinx", "--text_lm=none",
             "--speaker=none", "--naturalness=none"]
    assert eval_cli.main(flags + ["--limit=2"]) == 0
    first = (out / "examples.jsonl").read_text().splitlines()
    assert eval_cli.main(flags + ["--limit=3"]) == 0
    assert (out / "examples.jsonl").read_text().splitlines()[:2] == first  # reused, not run again
    return out


@pytest.mark.slow  # export + two eval runs of a tiny model: ~1-2 min on 2 loaded cores
def test_report_html_of_a_resumed_eval_has_every_row_with_audio_and_spectrograms(report_dir):
    rows = [json.loads(line) for line in (report_dir / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    page = (report_dir / "report.html").read_text()
    assert "report.html" in report.REPORT_FILES
    for row in rows:  # the two resumed rows as well as the new one
        assert f"<code>{row['id']}</code>" in page
        for kind in ("prompt", "generated", "true", "resynthesized"):
            assert f"src='{row['wavs'][kind]}'" in page, (row["id"], kind)
        assert isinstance(row["asr_transcript"], str)
    # the model's text and the ASR transcript of every row, shown even when empty
    assert page.count("<b>model&#x27;s text:</b>") == 3
    assert page.count("<b>ASR transcript of the generated speech:</b>") == 3
    # every wav played; the prompt, generated and true ones drawn
    assert page.count("<audio ") == 12 and page.count("log-mel spectrogram' src='data:image/png") == 9
    assert len(page) < 3 * 4 * 60_000  # the wavs are referenced, not inlined
    assert "http://" not in page and "https://" not in page
    # the grid of plots/spectrograms.png is drawn from the folder: the resumed rows too
    payload = json.loads((report_dir / "metrics.json").read_text())
    assert "plots/spectrograms.png" in payload["plots"]
    from matplotlib import image

    grid = image.imread(report_dir / "plots/spectrograms.png")
    assert grid.shape[0] == round(3 * 2.2 * 80)  # 3 panel rows of 2.2 in at 80 dpi: not only the row run last


@pytest.mark.slow  # a headless Chromium over the report above
def test_report_html_opens_in_headless_chromium_and_every_audio_decodes(report_dir, tmp_path):
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    copy = tmp_path / "copied"  # a copy of the folder plays as well: the page refers to its wavs relatively
    shutil.copytree(report_dir, copy)
    errors, outside = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto((copy / "report.html").as_uri(), wait_until="load", timeout=120_000)
            durations = page.evaluate("""() => Promise.all([...document.querySelectorAll('audio')].map(a =>
                new Promise(resolve => {
                  if (a.readyState >= 1) { resolve(a.duration); return; }
                  a.addEventListener('loadedmetadata', () => resolve(a.duration));
                  a.addEventListener('error', () => resolve('error: ' + (a.error && a.error.code)));
                  if (a.networkState === 0 || a.networkState === 3) a.load();
                })))""")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == [] and outside == []
    assert len(durations) == 12
    assert all(isinstance(d, (int, float)) and np.isfinite(d) and d > 0 for d in durations), durations
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
