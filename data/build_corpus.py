"""Builds the embedded speech corpus in `data/embedded/` from the project's own text, offline.

    python data/build_corpus.py            # rebuilds data/embedded/ (needs espeak-ng and sox)
    python data/build_corpus.py --check    # verifies the committed corpus against the manifest
    python data/build_corpus.py --tokenizer_only   # retrains spm/ from the committed manifest (no audio)

Input: `data/passages.json` (original English passages, one list of sentences each, plus extra text for
the tokenizer). Output, all committed so that training never needs espeak:

- `data/embedded/audio/<passage>_u<k>.flac`: 16 kHz mono 16-bit FLAC, one utterance of 1–2 sentences
  lasting 3.5–8 s, spoken by one of ten synthetic speakers (espeak-ng voice variants with distinct pitch
  and rate), leading/trailing silence trimmed, peak-normalised to -1 dBFS, 0.1 s of silence added at each end.
- `data/embedded/manifest.tsv`: `id path transcript speaker passage split duration` (tab-separated,
  `path` relative to `data/embedded/`, duration in seconds as read back from the FLAC file).
- `data/embedded/spm/spectron_tiny.{model,vocab}`: a 512-piece SentencePiece unigram model trained on the
  training passages and the extra text; ids pad=0, eos=1, unk=2, bos(sos)=3, and the reserved
  separator `<sep>`=4 (a user-defined symbol, never produced by segmenting text: the token the Tasks
  write between the prompt's transcript and the continuation's, `TaskConfig.sep_id`).

Splits are by passage (no passage in two splits): every 12th passage goes to test, every 12th (offset 6)
to validation, the rest to train. Utterances are formed greedily within a passage: a sentence that is
too short is joined with the next one; if an utterance still falls outside 3.5–8 s, it is re-spoken with
the speaking rate scaled to fit (at most ±35 %), and dropped with a message if that is not enough.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "embedded"
SAMPLE_RATE = 16000
MIN_SECONDS, MAX_SECONDS = 3.5, 8.0
EDGE_SILENCE_SECONDS = 0.1
VOCAB_SIZE = 512
SEP_PIECE = "<sep>"  # the reserved separator (spectron_jax.data.tasks.SEP_PIECE), id 4


@dataclasses.dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak-ng voice variant with its own pitch (0-99) and rate (words/min)."""

    name: str
    voice: str
    pitch: int
    rate: int


SPEAKERS = (
    Speaker("spk01", "en-us+m3", 40, 150),
    Speaker("spk02", "en-us+f3", 60, 160),
    Speaker("spk03", "en-gb+m1", 30, 145),
    Speaker("spk04", "en-us+f2", 75, 155),
    Speaker("spk05", "en-gb-x-rp+f4", 55, 170),
    Speaker("spk06", "en-us+m7", 25, 165),
    Speaker("spk07", "en-us+Andy", 50, 175),
    Speaker("spk08", "en-gb+f5", 65, 150),
    Speaker("spk09", "en-us+grandpa", 35, 140),
    Speaker("spk10", "en-us+Annie", 70, 160),
)


def split_of(passage_index: int) -> str:
    """The split of the passage at 0-based `passage_index` (by passage, never by utterance)."""
    if passage_index % 12 == 11:
        return "test"
    if passage_index % 12 == 5:
        return "validation"
    return "train"


def speaker_of(passage_index: int, utterance_index: int) -> Speaker:
    """Speakers rotate within and across passages so every split hears every speaker."""
    return SPEAKERS[(3 * passage_index + utterance_index) % len(SPEAKERS)]


def synthesize(text: str, speaker: Speaker, rate: int, path: pathlib.Path, tmp: pathlib.Path) -> float:
    """Speaks `text` into a 16 kHz mono 16-bit FLAC at `path`; returns its duration in seconds."""
    raw = tmp / "raw.wav"
    subprocess.run(
        ["espeak-ng", "-v", speaker.voice, "-p", str(speaker.pitch), "-s", str(rate), "-w", str(raw), text],
        check=True,
    )
    trim = ["silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse"]
    pad = ["pad", str(EDGE_SILENCE_SECONDS), str(EDGE_SILENCE_SECONDS)]
    level = ["gain", "-n", "-1"]  # peak-normalise to -1 dBFS: no clipping after resampling
    subprocess.run(  # -R: repeatable output, -D: no dither, so a rebuild gives the same samples
        ["sox", "-R", "-V1", str(raw), "-D", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(path),
         *trim, *level, *pad],
        check=True,
    )
    import soundfile  # imported here so `--help` works without the package's dependencies

    info = soundfile.info(str(path))
    return info.frames / info.samplerate


def speak_utterance(text, speaker, path, tmp) -> float | None:
    """Speaks `text`, re-speaking at a scaled rate if needed to land in [MIN_SECONDS, MAX_SECONDS]."""
    duration = synthesize(text, speaker, speaker.rate, path, tmp)
    if MIN_SECONDS <= duration <= MAX_SECONDS:
        return duration
    target = MAX_SECONDS - 0.3 if duration > MAX_SECONDS else MIN_SECONDS + 0.3
    rate = round(speaker.rate * duration / target)
    if not 0.65 * speaker.rate <= rate <= 1.35 * speaker.rate:
        return None
    duration = synthesize(text, speaker, rate, path, tmp)
    return duration if MIN_SECONDS <= duration <= MAX_SECONDS else None


def group_sentences(sentences: list[str], speak) -> list[tuple[str, float]]:
    """Greedy 1–2 sentence utterances: joins a sentence with the next one when it alone is too short.

    `speak(text, k)` speaks utterance number k and returns its duration (or None if it cannot fit).
    """
    utterances: list[tuple[str, float]] = []
    i = 0
    while i < len(sentences):
        k = len(utterances)
        alone = speak(sentences[i], k, trial=True)
        if alone is not None and alone >= MIN_SECONDS or i + 1 == len(sentences):
            duration = speak(sentences[i], k, trial=False)
            if duration is not None:
                utterances.append((sentences[i], duration))
            else:
                print(f"dropped (does not fit {MIN_SECONDS}-{MAX_SECONDS} s): {sentences[i]!r}", file=sys.stderr)
            i += 1
            continue
        pair = f"{sentences[i]} {sentences[i + 1]}"
        duration = speak(pair, k, trial=False)
        if duration is None:  # the pair is too long even sped up: keep the short sentence alone, slowed
            duration = speak(sentences[i], k, trial=False)
            if duration is not None:
                utterances.append((sentences[i], duration))
            i += 1
        else:
            utterances.append((pair, duration))
            i += 2
    return utterances


def build(passages_path: pathlib.Path, out: pathlib.Path) -> None:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            sys.exit(f"error: {tool} is not installed (apt-get install espeak-ng sox libsox-fmt-all)")
    spec = json.loads(passages_path.read_text())
    passages = spec["passages"]
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "audio").mkdir(parents=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        for p_index, passage in enumerate(passages):
            pid = passage["id"]

            def speak(text, k, trial, p_index=p_index, pid=pid):
                speaker = speaker_of(p_index, k)
                if trial:
                    return synthesize(text, speaker, speaker.rate, tmp / "trial.flac", tmp)
                return speak_utterance(text, speaker, staging / "audio" / f"{pid}_u{k:02d}.flac", tmp)

            for k, (text, duration) in enumerate(group_sentences(passage["sentences"], speak)):
                uid = f"{pid}_u{k:02d}"
                rows.append((uid, f"audio/{uid}.flac", text, speaker_of(p_index, k).name, pid,
                             split_of(p_index), f"{duration:.4f}"))
            print(f"{pid}: {sum(r[4] == pid for r in rows)} utterances", flush=True)
    header = ("id", "path", "transcript", "speaker", "passage", "split", "duration")
    (staging / "manifest.tsv").write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    train_tokenizer(spec, {r[4] for r in rows if r[5] == "train"}, staging / "spm")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"wrote {len(rows)} utterances to {out}")


def train_tokenizer(spec: dict, train_passages: set[str], out_dir: pathlib.Path) -> None:
    """Trains the tiny SentencePiece model on the training passages plus the extra text."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [s for p in spec["passages"] if p["id"] in train_passages for s in p["sentences"]]
    lines += spec.get("extra_text", [])
    text_file = out_dir / "text.txt"
    text_file.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(out_dir / "spectron_tiny"), vocab_size=VOCAB_SIZE,
        model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=3,
        user_defined_symbols=[SEP_PIECE], num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    text_file.unlink()


def rebuild_tokenizer(passages_path: pathlib.Path, out: pathlib.Path) -> None:
    """Retrains `out/spm/` on the training passages of the committed manifest; the audio is not touched."""
    rows = [line.split("\t") for line in (out / "manifest.tsv").read_text().splitlines()[1:] if line.strip()]
    staging = out / "spm.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    train_tokenizer(json.loads(passages_path.read_text()), {r[4] for r in rows if r[5] == "train"}, staging)
    shutil.rmtree(out / "spm", ignore_errors=True)
    staging.rename(out / "spm")
    print(f"wrote the tokenizer to {out / 'spm'}")


def check(out: pathlib.Path) -> int:
    """Verifies every manifest row against its audio file; prints problems; returns their count."""
    import soundfile

    lines = (out / "manifest.tsv").read_text().splitlines()
    problems = 0
    for line in lines[1:]:
        uid, path, text, _, _, _, duration = line.split("\t")
        info = soundfile.info(str(out / path))
        actual = info.frames / info.samplerate
        if info.samplerate != SAMPLE_RATE or info.channels != 1 or abs(actual - float(duration)) > 1e-3:
            print(f"{uid}: {info.samplerate} Hz, {info.channels} ch, {actual:.4f} s vs {duration}")
            problems += 1
    print(f"checked {len(lines) - 1} utterances: {problems} problems")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=pathlib.Path, default=HERE / "passages.json")
    parser.add_argument("--output_dir", type=pathlib.Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="verify the corpus instead of building it")
    parser.add_argument("--tokenizer_only", action="store_true",
                        help="retrain only spm/ from the manifest in --output_dir (no espeak-ng / sox needed)")
    args = parser.parse_args()
    if args.check:
        sys.exit(1 if check(args.output_dir) else 0)
    if not args.passages.is_file():
        sys.exit(f"error: --passages {args.passages} does not exist")
    if args.tokenizer_only:
        if not (args.output_dir / "manifest.tsv").is_file():
            sys.exit(f"error: --output_dir {args.output_dir} has no manifest.tsv (build the corpus first)")
        rebuild_tokenizer(args.passages, args.output_dir)
        return
    build(args.passages, args.output_dir)


if __name__ == "__main__":
    main()
