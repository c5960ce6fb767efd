"""Word timings by forced alignment (PocketSphinx, offline), and how far the letter rule for phi lands.

phi, the prompt's end in the text, falls at a word boundary: from word timings when the data has them,
else at the word start nearest the prompt's share of the utterance's letters (`phi.prompt_word_count`).
This module aligns a transcript to its audio with PocketSphinx's English acoustic model and dictionary
(shipped in the `pocketsphinx` wheel; nothing is downloaded) and measures the letter rule against it:

    python -m spectron_jax.data.alignment --manifest=data/embedded/manifest.tsv [--limit=N] [--json]

prints, over the utterances the aligner covers (every word in its dictionary), how many words the
letter rule's boundary lies from the aligned one: the mean, the 95th percentile and the share that
agree exactly. Utterances with a word outside the dictionary are counted and left out (the aligner has
no letter-to-sound rules).

Shapes: audio int16 or float [samples] at 16 kHz mono; word starts float seconds [words].
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from typing import Sequence

import numpy as np

from spectron_jax.data import phi

SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 100  # PocketSphinx's frame rate
_SPOKEN = re.compile(r"[^a-z0-9' ]")
_ALTERNATE = re.compile(r"\(\d+\)$")  # "the(2)": the dictionary's second pronunciation
_NOT_WORDS = ("<s>", "</s>", "<sil>", "[NOISE]", "(NULL)")


def dictionary_words(transcript: str) -> list[str]:
    """The transcript as the aligner's dictionary spells words: lower case, letters, digits and
    apostrophes; one entry per whitespace-separated transcript word (a word of only punctuation
    becomes '')."""
    return [_SPOKEN.sub("", word.lower()) for word in transcript.split()]


class Aligner:
    """Forced alignment of one utterance at a time; a fresh search per utterance (no state carries)."""

    def __init__(self):
        from pocketsphinx import Decoder

        # Wide beams and no flat pass: the default beams lose the path through synthetic speech (most
        # embedded utterances then give no alignment); with the text fixed the search is small anyway.
        self._decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", topn=8, beam=1e-200, pbeam=1e-200,
                                wbeam=1e-200, fwdflat=False, bestpath=False)

    def covers(self, transcript: str) -> bool:
        """Whether every word of `transcript` is in the dictionary."""
        words = dictionary_words(transcript)
        return all(w and self._decoder.lookup_word(w) is not None for w in words)

    def word_starts(self, audio: np.ndarray, transcript: str) -> list[float] | None:
        """The start of each transcript word in seconds ([words]), or None when the aligner cannot place
        them (a word outside the dictionary, or an alignment that does not end in the final state).

        Args:
          audio: [samples] mono 16 kHz, int16 or float in [-1, 1].
          transcript: the utterance's words.
        """
        if not self.covers(transcript):
            return None
        words = dictionary_words(transcript)
        if audio.dtype != np.int16:
            audio = (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
        decoder = self._decoder
        try:
            decoder.set_align_text(" ".join(words))
            decoder.start_utt()
            decoder.process_raw(np.ascontiguousarray(audio).tobytes(), full_utt=True)
            decoder.end_utt()
            found = decoder.seg()  # None when the search found no path through the text
            segments = [(_ALTERNATE.sub("", s.word), s.start_frame) for s in (found or ())
                        if s.word not in _NOT_WORDS]
        except RuntimeError:
            return None
        finally:
            decoder.reinit_feat()
        if [w for w, _ in segments] != words:
            return None
        return [start / FRAMES_PER_SECOND for _, start in segments]


def letter_rule_error(transcript: str, word_starts: Sequence[float], duration: float,
                      prompt_seconds: float = 3.0) -> int:
    """Words between phi by the letter rule and phi by the aligned timings (0 = the same boundary)."""
    words = transcript.split()
    by_letters = phi.prompt_word_count(words, min(prompt_seconds / duration, 1.0))
    return abs(by_letters - phi.word_index_by_time(word_starts, prompt_seconds, duration))


def measure(manifest: str, limit: int | None = None, prompt_seconds: float = 3.0) -> dict:
    """The letter rule against the aligner over a manifest (`id path transcript ... duration`, paths
    relative to the manifest's folder): counts and the words-off distribution."""
    import soundfile

    root = os.path.dirname(manifest)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if limit is not None:
        rows = rows[:limit]
    aligner = Aligner()
    errors, uncovered, failed = [], 0, 0
    from tqdm import tqdm

    for row in tqdm(rows, desc="aligning", unit="utt", disable=not sys.stderr.isatty()):
        if not aligner.covers(row["transcript"]):
            uncovered += 1
            continue
        audio, rate = soundfile.read(os.path.join(root, row["path"]), dtype="int16")
        if rate != SAMPLE_RATE:
            raise ValueError(f"{row['path']}: sample rate {rate}, the aligner needs {SAMPLE_RATE}")
        starts = aligner.word_starts(audio, row["transcript"])
        if starts is None:
            failed += 1
            continue
        duration = len(audio) / SAMPLE_RATE
        errors.append(letter_rule_error(row["transcript"], starts, duration, prompt_seconds))
    values = np.array(errors, np.float64)
    return {
        "utterances": len(rows), "aligned": len(errors), "outside_dictionary": uncovered, "alignment_failed": failed,
        "words_off_mean": float(values.mean()) if values.size else None,
        "words_off_p95": float(np.percentile(values, 95)) if values.size else None,
        "words_off_max": int(values.max()) if values.size else None,
        "exact_share": float(np.mean(values == 0)) if values.size else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="phi by the letter rule against forced-aligned word timings")
    parser.add_argument("--manifest", required=True, help="a manifest.tsv (id path transcript ... duration)")
    parser.add_argument("--limit", type=int, default=None, help="the first N utterances only")
    parser.add_argument("--prompt_seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.manifest):
        print(f"error: --manifest {args.manifest}: no such file", file=sys.stderr)
        return 2
    result = measure(args.manifest, args.limit, args.prompt_seconds)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"aligned {result['aligned']} of {result['utterances']} utterances "
              f"({result['outside_dictionary']} with a word outside the dictionary, "
              f"{result['alignment_failed']} failed)")
        if result["aligned"]:
            print(f"letter rule vs aligned phi: {result['words_off_mean']:.2f} words off on average, "
                  f"95th percentile {result['words_off_p95']:.1f}, max {result['words_off_max']}, "
                  f"exact in {100 * result['exact_share']:.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
