"""Forced alignment and the letter rule for phi: hand-made boundaries, and real corpus speech."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile

from spectron_jax.data import alignment, phi

CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "embedded")


def _utterance(uid):
    with open(os.path.join(CORPUS, "manifest.tsv"), newline="") as f:
        row = next(r for r in csv.DictReader(f, delimiter="\t") if r["id"] == uid)
    audio, rate = soundfile.read(os.path.join(CORPUS, row["path"]), dtype="int16")
    assert rate == alignment.SAMPLE_RATE
    return audio, row["transcript"]


def test_dictionary_words_and_the_boundary_by_time():
    assert alignment.dictionary_words("Old Maren's boat, 3 nets -- gone.") == ["old", "maren's", "boat", "3", "nets", "", "gone"]
    starts = [0.1, 0.6, 1.4, 2.7, 3.2, 4.0]
    assert phi.word_index_by_time(starts, 3.0, 4.5) == 4      # 3.2 is nearer than 2.7
    assert phi.word_index_by_time(starts, 2.9, 4.5) == 3      # 2.7 is nearer than 3.2
    assert phi.word_index_by_time([1.0, 2.0], 1.5, 3.0) == 0  # a tie goes to the earlier start
    assert phi.word_index_by_time(starts, 4.4, 4.5) == 6      # the end counts as the start past the last
    # letters: "aa bb cc dd" with a prompt of half the duration -> 2 words by letters; timings say 1
    assert alignment.letter_rule_error("aa bb cc dd", [0.0, 1.8, 3.0, 3.5], duration=4.0, prompt_seconds=2.0) == 1
    assert alignment.letter_rule_error("aa bb cc dd", [0.0, 1.0, 2.1, 3.0], duration=4.0, prompt_seconds=2.0) == 0


@pytest.fixture(scope="module")
def aligner():
    return alignment.Aligner()


def test_aligned_starts_are_ordered_inside_the_audio_and_repeatable(aligner):
    audio, transcript = _utterance("p001_u05")
    starts = aligner.word_starts(audio, transcript)
    assert starts is not None and len(starts) == len(transcript.split())
    duration = len(audio) / alignment.SAMPLE_RATE
    assert all(b > a for a, b in zip(starts, starts[1:]))
    assert 0.0 <= starts[0] < 0.4 and starts[-1] < duration
    # another utterance in between changes nothing: no state carries from one to the next
    other, other_text = _utterance("p002_u02")
    assert aligner.word_starts(other, other_text) is not None
    assert aligner.word_starts(audio, transcript) == starts


def test_aligning_two_utterances_joined_shifts_the_second_by_the_first(aligner):
    """An independent check of the timings: B's words after A's audio start A's duration later."""
    a, text_a = _utterance("p001_u05")
    b, text_b = _utterance("p002_u02")
    starts_b = aligner.word_starts(b, text_b)
    joined = aligner.word_starts(np.concatenate([a, b]), f"{text_a} {text_b}")
    assert joined is not None
    shift = len(a) / alignment.SAMPLE_RATE
    got = np.array(joined[len(text_a.split()):]) - shift
    np.testing.assert_allclose(got, starts_b, atol=0.06)


def test_a_word_outside_the_dictionary_gives_no_timings(aligner):
    audio, _ = _utterance("p001_u05")
    assert not aligner.covers("zqxjv blorft")
    assert aligner.word_starts(audio, "zqxjv blorft") is None


def test_cli_measures_the_letter_rule_on_the_corpus(capsys):
    manifest = os.path.join(CORPUS, "manifest.tsv")
    assert alignment.main(["--manifest", manifest, "--limit", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["utterances"] == 6
    assert result["aligned"] + result["outside_dictionary"] + result["alignment_failed"] == 6
    assert result["aligned"] >= 3 and 0.0 <= result["words_off_mean"] <= 2.0
    assert alignment.main(["--manifest", "no/such/manifest.tsv"]) == 2
    assert "--manifest no/such/manifest.tsv: no such file" in capsys.readouterr().err
