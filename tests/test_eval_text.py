"""Text normalisation, error rates, answer matching and the evaluation sets' file quirks."""

import json

import pytest

from spectron_jax.evaluation import datasets, text_metrics


@pytest.mark.parametrize("raw, want", [
    ("Don't STOP!", "do not stop"),  # Whisper's normaliser expands contractions
    ("  Café   au-lait ", "cafe au lait"),
    ("10,000 miles in 1969", "10000 miles in 1969"),  # digits stay digits
    ("it is nineteen sixty nine", "it is 1969"),  # spelled-out numbers become digits
    ("three point one four", "3.14"),
    ("Straße", "strasse"),
    ("the 3rd of May", "the 3rd of may"),
    ("hmm, uh, yes", "yes"),  # filler words go
    ("\"quoted\"  & spaced\t", "quoted spaced"),  # symbols go
    ("", ""),
])
def test_normalize_is_whispers_english_normaliser(raw, want):
    assert text_metrics.normalize(raw) == want


def test_one_normaliser_for_every_comparison():
    # The number cases of the hand-written normaliser that it used to miss: both sides normalised.
    assert text_metrics.word_error_rate(["It is 1969"], ["it is nineteen sixty nine"]) == 0.0
    assert text_metrics.word_error_rate(["pi is 3.14"], ["pi is three point one four"]) == 0.0
    assert text_metrics.word_error_rate(["Straße"], ["strasse"]) == 0.0
    assert text_metrics.answer_found("1969", "it was in nineteen sixty nine")
    assert text_metrics.answer_found("Straße", "down the strasse")
    # Whisper's normaliser makes dotted letters separate words ("U.S.A." -> "u s a") and keeps the
    # acronym one word ("USA" -> "usa"): this case cannot hold under the field's normaliser, and the
    # evaluation keeps its behaviour rather than patching it.
    assert text_metrics.normalize("U.S.A.") == "u s a" and text_metrics.normalize("USA") == "usa"
    assert text_metrics.word_error_rate(["U.S.A."], ["USA"]) == 1.0  # 1 substitution + 2 deletions over 3 words
    assert not text_metrics.answer_found("U.S.A.", "the USA")
    assert text_metrics.answer_found("U.S.A.", "the u s a")


def test_error_rates_against_hand_counts():
    # "the cat sat" vs "the bat sat down": 1 substitution + 1 insertion over 3 words; "a b" vs "a b": 0.
    refs, hyps = ["The cat sat.", "A b", ""], ["the bat sat down", "a b", "ignored: empty reference"]
    assert text_metrics.word_error_rate(refs, hyps) == pytest.approx(2 / 5)
    # Characters: "the cat sat" (11) -> "the bat sat down": 1 substitution + 5 insertions; "a b" (3): 0.
    assert text_metrics.char_error_rate(refs, hyps) == pytest.approx(6 / 14)
    assert text_metrics.word_error_rate([""], ["x"]) != text_metrics.word_error_rate([""], ["x"])  # NaN


def test_llama_questions_tsv_quirks(tmp_path):
    # CRLF line endings, an unescaped quote inside a question, trailing spaces, a blank line, a short row.
    body = ("Questions\tAnswer\tWav Filename \r\n"
            "What is the \"Big Apple\"? \tNew York City \t1.wav\r\n"
            "Who wrote \"Hamlet?\tShakespeare\t2.wav   \r\n"
            "\r\n"
            "a broken row\r\n"
            "How many legs does a spider have?\t8\t3.wav\r\n")
    (tmp_path / datasets.LLAMA_QUESTIONS_TSV).write_bytes(body.encode("utf-8"))
    examples, skips = datasets.llama_questions_examples(str(tmp_path))
    assert [(e.id, e.text, e.answers) for e in examples] == [
        ("1", 'What is the "Big Apple"?', ("New York City",)),
        ("2", 'Who wrote "Hamlet?', ("Shakespeare",)),
        ("3", "How many legs does a spider have?", ("8",)),
    ]
    assert examples[1].audio == str(tmp_path / "2.wav")
    assert [s.reason for s in skips] == ["malformed_line"] and skips[0].source.endswith(":5")


def test_llama_questions_missing_tsv_is_one_error(tmp_path):
    with pytest.raises(datasets.DatasetError, match="llama_questions_300.tsv"):
        datasets.llama_questions_examples(str(tmp_path))


def test_web_questions_manifests(tmp_path):
    rows = [{"audio": "q/0.wav", "question": "what is the capital of peru?", "answers": ["Lima"]},
            {"audio": "q/1.wav", "question": "who?", "answers": []},
            {"id": "x7", "audio": "q/2.wav", "question": "where?", "answers": ["Here", "There"]}]
    jsonl = tmp_path / "manifest.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    examples, skips = datasets.web_questions_examples(str(tmp_path))
    assert [(e.id, e.answers) for e in examples] == [("0", ("Lima",)), ("x7", ("Here", "There"))]
    assert examples[0].audio == str(tmp_path / "q" / "0.wav")
    assert sorted(s.reason for s in skips) == ["malformed_line", "malformed_line"]
    tsv = tmp_path / "webq.tsv"
    tsv.write_text("audio\tquestion\tanswers\r\nq/0.wav\twhat is \"it\"?\tLima | Lima, Peru \r\n")
    examples, skips = datasets.web_questions_examples(str(tsv))
    assert examples[0].answers == ("Lima", "Lima, Peru") and examples[0].text == 'what is "it"?' and not skips


def test_continuation_sources(tmp_path, repo_root):
    examples, skips = datasets.continuation_examples(str(repo_root / "data"))
    manifest = (repo_root / "data" / "embedded" / "manifest.tsv").read_text().splitlines()
    test_ids = [line.split("\t")[0] for line in manifest[1:] if line.split("\t")[5] == "test"]
    assert [e.id for e in examples] == test_ids and not skips
    tree = tmp_path / "test-clean" / "19" / "198"
    tree.mkdir(parents=True)
    (tree / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n19-198-0001 THIS LITTLE WORK\n")
    examples, _ = datasets.continuation_examples(str(tmp_path / "test-clean"))
    assert [(e.id, e.speaker, e.text) for e in examples] == [("19-198-0000", "19", "NORTHANGER ABBEY"),
                                                             ("19-198-0001", "19", "THIS LITTLE WORK")]
    shards = tmp_path / "prepared"
    shards.mkdir()
    (shards / "test.tfrecord-00000-of-00001").write_bytes(b"")
    with pytest.raises(datasets.DatasetError, match="log-mel features, not audio"):
        datasets.continuation_examples(str(shards))


def test_comparison_table_of_several_reports(tmp_path):
    import subprocess
    import sys

    from spectron_jax.evaluation import report

    # asr_log_ppl (lower is better): "paper" is best; "no_text_ce"'s interval overlaps it, "other"'s does not.
    for name, ppl, span in (("paper", 300.5, [250.0, 350.0]), ("no_text_ce", 900.25, [320.0, 1500.0]),
                            ("other", 1200.0, [1000.0, 1400.0])):
        folder = tmp_path / name
        folder.mkdir()
        payload = {"suite": "continuation", "metrics": {"num_examples": 4, "asr_log_ppl": ppl, "text_wer": None},
                   "intervals": {"asr_log_ppl": span, "text_wer": None}}
        (folder / "metrics.json").write_text(json.dumps(payload))
    proc = subprocess.run([sys.executable, "-m", "spectron_jax.sweeps.eval_table",
                           f"--eval=paper={tmp_path / 'paper'}", f"--eval=no_text_ce={tmp_path / 'no_text_ce'}",
                           f"--eval=other={tmp_path / 'other'}", f"--output={tmp_path / 'table.md'}"],
                          capture_output=True, text=True, cwd=__import__("pathlib").Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2].startswith("| the paper's Spectron | – | 126.08 (the paper's)")
    assert lines[3] == "| paper | 4 | 300.500 [250.000, 350.000] (best) | n/a |"
    assert lines[4] == "| no_text_ce | 4 | 900.250 [320.000, 1500.000] ≈ | n/a |"
    assert lines[5] == "| other | 4 | 1200.000 [1000.000, 1400.000] | n/a |"
    assert "overlaps the best one's" in lines[-1]
    with pytest.raises(ValueError, match="different suites"):
        report.comparison_markdown({"a": {"suite": "continuation", "metrics": {}},
                                    "b": {"suite": "llama_questions", "metrics": {}}})


def test_web_questions_null_answers_json_arrays_and_tsv_header(tmp_path):
    rows = [{"audio": "q/0.wav", "question": "capital of peru?", "answers": [None, "Lima"]},
            {"audio": "q/1.wav", "question": "who?", "answers": [None]},
            {"audio": "q/2.wav", "question": "what?", "answers": [{"name": "x"}]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples, skips = datasets.web_questions_examples(str(tmp_path / "m.jsonl"))
    assert [(e.id, e.answers) for e in examples] == [("0", ("Lima",))]  # the null is not the answer "None"
    assert [s.source for s in skips] == ["m.jsonl:2", "m.jsonl:3"]
    # A .json manifest is one array: read whole, not line by line; anything else is one error naming it.
    (tmp_path / "m.json").write_text(json.dumps(rows[:1] + [rows[0] | {"audio": "q/9.wav"}, "junk"], indent=2))
    examples, skips = datasets.web_questions_examples(str(tmp_path / "m.json"))
    assert [e.id for e in examples] == ["0", "9"] and [s.source for s in skips] == ["m.json[2]"]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(datasets.DatasetError, match=r"lines\.json: not JSON .*\.jsonl"):
        datasets.web_questions_examples(str(tmp_path / "lines.json"))
    (tmp_path / "obj.json").write_text(json.dumps(rows[0]))
    with pytest.raises(datasets.DatasetError, match="an array of objects, got a dict"):
        datasets.web_questions_examples(str(tmp_path / "obj.json"))
    # A .tsv without the columns it needs is refused (before: every row was skipped as malformed).
    (tmp_path / "bad.tsv").write_text("wav\tquestion\tanswers\nq/0.wav\tcapital of peru?\tLima\n")
    with pytest.raises(datasets.DatasetError, match=r"bad\.tsv: header lacks the column\(s\) audio \(or path\)"):
        datasets.web_questions_examples(str(tmp_path / "bad.tsv"))
    (tmp_path / "other.tsv").write_text("path\tquestion\tanswer\nq/0.wav\tcapital of peru?\tLima\n")
    examples, _ = datasets.web_questions_examples(str(tmp_path / "other.tsv"))
    assert [(e.id, e.answers) for e in examples] == [("0", ("Lima",))]


def test_llama_questions_ids_keep_folders_apart(tmp_path):
    (tmp_path / datasets.LLAMA_QUESTIONS_TSV).write_text(
        "Questions\tAnswer\tWav Filename\nfirst?\tone\t6.wav\nsecond?\ttwo\tsub/6.wav\nthird?\tthree\t./6.wav\n")
    examples, skips = datasets.llama_questions_examples(str(tmp_path))
    assert [(e.id, e.audio) for e in examples] == [("6", str(tmp_path / "6.wav")),
                                                   ("sub/6", str(tmp_path / "sub/6.wav"))]
    assert [(s.id, s.reason) for s in skips] == [("6", "duplicate_id")]  # ./6.wav is 6.wav again


def test_error_counts_sum_to_the_corpus_rates():
    refs = ["The cat sat.", "A b", "", "It is 1969", "some other words here"]
    hyps = ["the bat sat down", "a b", "ignored", "it is nineteen sixty nine", ""]
    for unit, rate in (("word", text_metrics.word_error_rate), ("char", text_metrics.char_error_rate)):
        counts = text_metrics.error_counts(refs, hyps, unit)
        assert counts[2] is None  # an empty reference has no error rate
        edits = sum(c[0] for c in counts if c) / sum(c[1] for c in counts if c)
        assert edits == pytest.approx(rate(refs, hyps))
    assert text_metrics.error_counts(refs, hyps)[0] == (2, 3) and text_metrics.error_counts(refs, hyps)[4] == (4, 4)
    with pytest.raises(ValueError, match="unit"):
        text_metrics.error_counts(refs, hyps, "phone")
