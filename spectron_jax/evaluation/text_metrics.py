"""Text normalisation, word / character error rates and spoken-QA answer matching.

One normaliser serves every text comparison of the evaluation (WER/CER of transcripts, answer matching
in text and in ASR transcripts), so that the figures are comparable: `normalize`, which is Whisper's
English text normaliser (`whisper_normalizer.english.EnglishTextNormalizer`, the one the public ASR
leaderboards apply to both sides before WER). It lower-cases; removes punctuation, bracketed asides and
filler words ("uh", "hmm"); expands contractions and titles ("don't" -> "do not", "Mr." -> "mister");
strips accents and folds letters like "ß" -> "ss"; maps British to American spellings; and writes
spelled-out numbers as digits ("nineteen sixty nine" -> "1969", "three point one four" -> "3.14",
"four" -> "4"), so a reference that writes digits matches an ASR transcript that spells them out.
Normalise both sides: every function here does.

What it does not do: letters with dots become separate letters ("U.S.A." -> "u s a"), so they do not
match the acronym written without dots ("USA" -> "usa"); that costs WER and an answer match in that
case, and is left as the field's normaliser has it.

Answer matching (`answer_found`) is the Moshi-style protocol the paper's successors use: the normalised
reference answer occurs in the normalised hypothesis as a whole-word span ("paris" is found in "it is
paris france", "par" is not). A leading article of the answer is optional there (as in SQuAD's answer
matching): "the Beatles" is found in "beatles" and in "the beatles".
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

ARTICLES = ("a", "an", "the")


@functools.lru_cache(maxsize=1)
def _whisper_normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    """The evaluation's one text normaliser: Whisper's English normaliser (the module docstring)."""
    return _normalize(text) if text else ""


@functools.lru_cache(maxsize=1 << 16)
def _normalize(text: str) -> str:  # a report normalises each reference and hypothesis several times
    return " ".join(_whisper_normalizer()(text).split())


def _has_word(text: str) -> bool:
    return any(c.isalnum() for c in text)


def answer_found(answer: str, hypothesis: str) -> bool:
    """Whether the normalised `answer` occurs as a whole-word span of the normalised `hypothesis`.

    A leading article of the answer is optional ("the beatles" is found in "beatles"). An answer that
    normalises to no letter or digit (only punctuation) is never found.
    """
    want = normalize(answer)
    if not _has_word(want):
        return False
    words = want.split()
    hypothesis = f" {normalize(hypothesis)} "
    if f" {want} " in hypothesis:
        return True
    return len(words) > 1 and words[0] in ARTICLES and f" {' '.join(words[1:])} " in hypothesis


def any_answer_found(answers: Iterable[str], hypothesis: str) -> bool:
    """`answer_found` for any of several accepted answers (WebQuestions lists more than one)."""
    return any(answer_found(a, hypothesis) for a in answers)


def _pairs(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs, hyps = [], []
    for ref, hyp in zip(references, hypotheses):
        ref = normalize(ref)
        if ref:  # an empty reference has no error rate; jiwer rejects it
            refs.append(ref)
            hyps.append(normalize(hyp))
    return refs, hyps


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (total edits / total reference words) after `normalize`; NaN with no reference words."""
    import jiwer

    refs, hyps = _pairs(references, hypotheses)
    return float(jiwer.wer(refs, hyps)) if refs else float("nan")


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER (spaces count as characters) after `normalize`; NaN with no reference text."""
    import jiwer

    refs, hyps = _pairs(references, hypotheses)
    return float(jiwer.cer(refs, hyps)) if refs else float("nan")


def error_counts(references: Sequence[str], hypotheses: Sequence[str], unit: str = "word"
                 ) -> list[tuple[int, int] | None]:
    """Per pair, after `normalize`: (edits, reference length) in words (`unit="word"`) or characters
    (`"char"`, spaces included); None for a pair whose reference normalises to nothing.

    The corpus rates above are ratios of their sums (Σ edits / Σ length), which is how
    `evaluation.intervals` resamples them.
    """
    import jiwer

    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    process = jiwer.process_words if unit == "word" else jiwer.process_characters
    out: list[tuple[int, int] | None] = []
    for ref, hyp in zip(references, hypotheses):
        ref, hyp = normalize(ref), normalize(hyp)
        if not ref:
            out.append(None)
            continue
        o = process(ref, hyp)
        out.append((int(o.substitutions + o.deletions + o.insertions), int(o.substitutions + o.deletions + o.hits)))
    return out
