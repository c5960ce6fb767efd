"""Speaks a list of questions with espeak-ng and writes a `web_questions` manifest for `spectron_jax.eval`.

The spoken WebQuestions audio of the paper was never released. Bring the WebQuestions JSON (Berant et
al. 2013; e.g. `webquestions.examples.test.json`: a list of `{"utterance": ..., "targetValue": "(list
(description ...) ...)"}`) or a JSONL / TSV of `question` + `answers`, and run

    python -m spectron_jax.evaluation.synthesize_questions --questions=webquestions.examples.test.json \\
        --output_dir=webq [--voice=en-us+f3] [--limit=N] [--speed=160]
    python -m spectron_jax.eval --suite=web_questions --data_dir=webq/manifest.jsonl ...

It writes OUT/audio/<n>.wav (16 kHz mono 16-bit; espeak-ng speaks at 22.05 kHz, resampled here) and
OUT/manifest.jsonl with `id`, `audio`, `question`, `answers`. Questions already spoken are kept, so a
stopped run resumes. Needs the `espeak-ng` program (`apt-get install espeak-ng`).

`--layout=llama_questions` writes the public LLaMA-Questions layout instead, OUT/<n>.wav next to
OUT/llama_questions_300.tsv (`Questions`, `Answer`, `Wav Filename`, CRLF line endings; the first
answer of each question), for running `--suite=llama_questions` on questions of one's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import soundfile
from tqdm import tqdm

from spectron_jax import cli
from spectron_jax.data import features

_DESCRIPTION = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^()\s]+))\)')


def target_answers(target_value: str) -> list[str]:
    """WebQuestions' `targetValue` "(list (description "Jazmine Sullivan") (description Paris))" -> answers."""
    return [(quoted or bare).replace('\\"', '"') for quoted, bare in _DESCRIPTION.findall(target_value or "")]


def read_questions(path: str) -> list[tuple[str, list[str]]]:
    """(question, answers) pairs from a WebQuestions JSON list, a JSONL file or a `question\\tanswers` TSV."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise cli.InputError(f"--questions={path}: cannot read ({e})") from None
    out = []
    if path.endswith(".tsv"):
        lines = [line for line in text.splitlines() if line.strip()]
        for line in lines[1:]:
            fields = [f.strip() for f in line.split("\t")]
            if len(fields) >= 2:
                out.append((fields[0], [a.strip() for a in fields[1].split("|") if a.strip()]))
        return out
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise cli.InputError(f"--questions={path}: not JSON or JSONL ({e.msg}, line {e.lineno})") from None
    for row in rows:
        if not isinstance(row, dict):
            continue
        question = str(row.get("utterance") or row.get("question") or "").strip()
        answers = row.get("answers")
        if answers is None:
            answers = target_answers(str(row.get("targetValue", "")))
        out.append((question, [str(a) for a in answers]))
    return out


def speak(text: str, path: str, voice: str, speed: int) -> None:
    """espeak-ng `text` -> a 16 kHz 16-bit wav at `path` (written atomically)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", raw, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        data, rate = soundfile.read(raw, dtype="float32", always_2d=True)
        wave = features.prepare_waveform(data, rate)
        partial = path + ".partial"
        soundfile.write(partial, wave, features.SPECTRON_FEATURES.sample_rate, subtype="PCM_16", format="WAV")
        os.replace(partial, path)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="spectron_jax.evaluation.synthesize_questions", description="Speak questions with espeak-ng.")
    parser.add_argument("--questions", required=True, help="WebQuestions JSON, JSONL or TSV")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--voice", default="en-us")
    parser.add_argument("--speed", type=int, default=175, help="words per minute (espeak-ng -s)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--layout", default="manifest", choices=("manifest", "llama_questions"),
                        help="manifest: OUT/manifest.jsonl + OUT/audio/ (web_questions); llama_questions: "
                             "OUT/N.wav + OUT/llama_questions_300.tsv")
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        raise cli.InputError("espeak-ng not found on PATH (apt-get install espeak-ng)")
    pairs = read_questions(args.questions)[: args.limit]
    llama = args.layout == "llama_questions"
    audio_dir = args.output_dir if llama else os.path.join(args.output_dir, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    rows, skipped = [], 0
    for number, (question, answers) in enumerate(tqdm(pairs, desc="speaking", unit="q", leave=False)):
        if not question or not answers:
            skipped += 1
            continue
        name = f"{number}.wav"
        target = os.path.join(audio_dir, name)
        if not os.path.isfile(target):
            try:
                speak(question, target, args.voice, args.speed)
            except subprocess.CalledProcessError as e:
                raise cli.InputError(f"--voice={args.voice}: espeak-ng failed: {e.stderr.decode(errors='replace').strip()}") from None
        rows.append({"id": str(number), "audio": name if llama else f"audio/{name}", "question": question,
                     "answers": answers})
    if llama:
        manifest = os.path.join(args.output_dir, "llama_questions_300.tsv")
        lines = ["Questions\tAnswer\tWav Filename"] + [
            "\t".join(" ".join(str(v).split()) for v in (r["question"], r["answers"][0], r["audio"])) for r in rows]
        text = "".join(line + "\r\n" for line in lines)
    else:
        manifest = os.path.join(args.output_dir, "manifest.jsonl")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(manifest + ".partial", "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(manifest + ".partial", manifest)
    print(f"spoke {len(rows)} questions ({skipped} without question or answers skipped) -> {manifest}")
    return 0


if __name__ == "__main__":
    cli.run(main)
