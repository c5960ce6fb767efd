"""phi, the prompt's end in the text, at a word boundary: the rule of the Tasks in plain Python.

The Tasks (`preprocessors.phi_word_index`, in TensorFlow) put the separator between the prompt's
transcript and the continuation's at the word start nearest the prompt's share of the utterance's
letters (letters and digits: what is spoken; no spaces or punctuation), or at the word start nearest
the prompt's end when word timings are known. The evaluation suites use this module to cut a reference
transcript the same way (the reference words before phi are what the model's prompt transcript is
scored against).
"""

from __future__ import annotations

import re
from typing import Sequence

_NOT_SPOKEN = re.compile(r"[\W_]", re.UNICODE)


def letters(word: str) -> int:
    """Spoken characters of `word`: its letters and digits."""
    return len(_NOT_SPOKEN.sub("", word))


def prompt_word_count(words: Sequence[str], prompt_share: float) -> int:
    """How many of `words` the prompt's transcript holds (0..len(words)): the word start nearest
    `prompt_share` (prompt duration / utterance duration) of the letters; ties go to the earlier."""
    starts, total = [0], 0
    for word in words:
        total += letters(word)
        starts.append(total)
    target = prompt_share * total
    return min(range(len(starts)), key=lambda k: (abs(starts[k] - target), k))


def word_index_by_time(word_starts: Sequence[float], prompt_seconds: float, duration: float) -> int:
    """phi from word timings: the word start nearest `prompt_seconds` (the end of the utterance,
    `duration`, counts as the start past the last word; ties go to the earlier), the rule
    `preprocessors.phi_word_index` applies when the shards carry `word_starts`."""
    starts = list(word_starts) + [duration]
    return min(range(len(starts)), key=lambda k: (abs(starts[k] - prompt_seconds), k))


def split_transcript(transcript: str, prompt_share: float) -> tuple[str, str]:
    """(the words before phi, the words after) of `transcript` for a prompt of `prompt_share` of it."""
    words = transcript.split()
    k = prompt_word_count(words, prompt_share)
    return " ".join(words[:k]), " ".join(words[k:])
