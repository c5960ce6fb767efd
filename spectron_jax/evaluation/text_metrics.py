"""Text normalisation, word / character error rates and spoken-QA answer matching.

One normaliser serves every text comparison of the evaluation (WER/CER of the prompt transcript, answer
matching in text and in ASR transcripts), so that the figures are comparable:

  1. Unicode NFKD, combining marks dropped ("Café" -> "cafe"), lower case;
  2. apostrophes removed inside words ("don't" -> "dont", "Nobel's" -> "nobels");
  3. every other character that is not a letter or a digit becomes a space (punctuation, hyphens, "&");
  4. numbers written with digits become words ("1969" -> "one thousand nine hundred sixty nine",
     "3rd" stays "3rd"), so that an ASR transcript that spells a number out matches a reference that
     writes digits, and the other way round (integers below one billion; commas inside digits, as in
     "10,000", are joined first);
  5. runs of whitespace collapse to one space; leading and trailing space is dropped.

Articles are kept (they count as words for WER). Answer matching (`answer_found`) is the Moshi-style
protocol the paper's successors use: the normalised reference answer occurs in the normalised
hypothesis as a whole-word span ("paris" is found in "it is paris france", "par" is not).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((1_000_000, "million"), (1_000, "thousand"), (100, "hundred"))
_DIGIT_COMMAS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_APOSTROPHES = re.compile(r"(?<=\w)['’`](?=\w)")
_NON_WORD = re.compile(r"[^a-z0-9]+")
_NUMBER = re.compile(r"\b\d+\b")
MAX_SPELLED_NUMBER = 999_999_999


def number_to_words(n: int) -> str:
    """0 <= n <= 999,999,999 -> English words without "and" or hyphens (42 -> "forty two")."""
    if not 0 <= n <= MAX_SPELLED_NUMBER:
        raise ValueError(f"number_to_words: {n} out of range [0, {MAX_SPELLED_NUMBER}]")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for size, name in _SCALES:
        if n >= size:
            head, rest = divmod(n, size)
            return f"{number_to_words(head)} {name}" + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError(n)  # unreachable: n >= 100 matches the hundred scale


def _spell(match: re.Match) -> str:
    digits = match.group(0)
    value = int(digits)
    return number_to_words(value) if value <= MAX_SPELLED_NUMBER else digits


def normalize(text: str) -> str:
    """The evaluation's text normaliser (the module docstring lists its steps)."""
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _DIGIT_COMMAS.sub("", _APOSTROPHES.sub("", text))
    text = _NON_WORD.sub(" ", text)
    text = _NUMBER.sub(_spell, text)
    return " ".join(text.split())


def answer_found(answer: str, hypothesis: str) -> bool:
    """Whether the normalised `answer` occurs as a whole-word span of the normalised `hypothesis`.

    An answer that normalises to nothing (only punctuation) is never found.
    """
    want = normalize(answer)
    if not want:
        return False
    return f" {want} " in f" {normalize(hypothesis)} "


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
