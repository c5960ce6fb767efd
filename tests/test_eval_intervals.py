"""Bootstrap intervals against NumPy and a known distribution; each pooled figure's parts against the suites'
own pooling; floors, their marks and the rows each figure leaves out."""

import types

import numpy as np
import pytest

from spectron_jax.evaluation import continuation, evidence, floors, intervals, row_parts, spoken_qa, text_lm


def test_percentiles_equal_a_direct_numpy_computation():
    values = np.random.default_rng(1).gamma(2.0, size=37)
    config = intervals.BootstrapConfig(resamples=400, seed=7, level=0.9)
    got = intervals.interval(intervals.mean_parts(list(values)), config)
    draws = np.random.default_rng(7).integers(0, 37, size=(400, 37))
    want = np.percentile(values[draws].mean(axis=1), [5.0, 95.0])
    assert got == pytest.approx(tuple(want), rel=1e-12)
    assert got[0] < values.mean() < got[1]
    # Same seed, same interval; another seed, another one.
    assert intervals.interval(intervals.mean_parts(list(values)), config) == got
    assert intervals.interval(intervals.mean_parts(list(values)), intervals.BootstrapConfig(400, seed=8)) != got


def test_coverage_on_normal_samples_is_near_the_level():
    rng = np.random.default_rng(0)
    config = intervals.BootstrapConfig(resamples=300, seed=0)
    covered = 0
    trials = 200
    for trial in range(trials):
        sample = rng.normal(3.0, 2.0, size=60)
        low, high = intervals.interval(intervals.mean_parts(list(sample)), intervals.BootstrapConfig(300, seed=trial))
        covered += low <= 3.0 <= high
    # The percentile bootstrap of a mean with n = 60 covers about 94 %; 200 trials: sd ~1.7 points.
    assert 0.88 <= covered / trials <= 0.99, covered
    # Its width is close to the normal theory's 2 * 1.96 * sigma / sqrt(n).
    low, high = intervals.interval(intervals.mean_parts(list(rng.normal(0.0, 2.0, size=400))), config)
    assert high - low == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(400), rel=0.2)


def test_a_pooled_ratio_is_resampled_as_a_ratio_of_sums():
    # Three short utterances with every word wrong and one long one nearly right.
    edits = np.array([2.0, 3.0, 1.0, 1.0])
    words = np.array([2.0, 3.0, 1.0, 50.0])
    parts = intervals.Ratio(edits, words)
    assert parts.value == pytest.approx(7 / 56)  # Σ edits / Σ words, not the mean of ratios (0.7525)
    config = intervals.BootstrapConfig(resamples=500, seed=3)
    draws = np.random.default_rng(3).integers(0, 4, size=(500, 4))
    want = np.percentile(edits[draws].sum(1) / words[draws].sum(1), [2.5, 97.5])
    assert intervals.interval(parts, config) == pytest.approx(tuple(want), rel=1e-12)
    # Perplexity: exp(Σ -log p / Σ tokens) on every resample; an empty text (0 tokens) adds nothing.
    nll, tokens = np.array([10.0, 40.0, 0.0, 9.0]), np.array([5.0, 10.0, 0.0, 3.0])
    ppl = intervals.Ratio(nll, tokens, "exp")
    assert ppl.value == pytest.approx(text_lm.perplexity(
        [text_lm.TextScore(-a, int(b)) for a, b in zip(nll, tokens)]))
    sums = tokens[draws].sum(1)
    ratios = nll[draws].sum(1)[sums > 0] / sums[sums > 0]  # a resample of only the empty text has no value
    assert (sums == 0).any()
    assert intervals.interval(ppl, config) == pytest.approx(tuple(np.percentile(np.exp(ratios), [2.5, 97.5])))
    assert ppl.rows_used == 3


def test_degenerate_inputs_have_no_interval():
    assert intervals.intervals({"x": intervals.mean_parts([None, float("nan")])}) == {"x": None}
    assert intervals.interval(intervals.mean_parts([1.0, 2.0]), intervals.BootstrapConfig(resamples=0)) != (1.0, 2.0)
    assert intervals.overlap([0, 1], [1, 2]) and not intervals.overlap([0, 1], [1.5, 2])
    assert intervals.overlap(None, [0, 1]) is None
    with pytest.raises(ValueError, match="resamples"):
        intervals.BootstrapConfig(resamples=-1)
    with pytest.raises(ValueError, match="numerators"):
        intervals.Ratio(np.zeros(2), np.zeros(3))


def _continuation_row(i, boundary="separator", asr="the keeper walked", with_lm=True):
    row = {"id": f"u{i}", "speaker": f"s{i % 2}", "reference": "old maren had kept the light for forty years",
           "reference_prompt": "old maren had kept", "reference_continuation": "the light for forty years",
           "text_boundary": boundary, "prompt_transcript": "old maren had" if boundary == "separator" else None,
           "text_continuation": ["the light for 40 years", "a light", "", "the lamp"][i % 4],
           "model_text": "old maren had the light", "stop_reason": ["stop_head", "budget"][i % 2],
           "true_frames": 100 + i, "generated_frames": 90 + 3 * i, "true_seconds": 1.0 + i, "generated_seconds": 1.5,
           "l1_teacher_forced": None if i == 3 else 0.5 + i, "l1_free_running": 1.0 + 0.1 * i,
           "speaker_sim_generated": 0.5 + 0.05 * i, "speaker_sim_true": 0.8,
           "dnsmos_generated": {k: 2.0 + 0.1 * i for k in ("p808_mos", "sig_mos", "bak_mos", "ovrl_mos")},
           "asr_transcript": asr}
    if with_lm:
        row["continuation_lm"] = {"log_likelihood": -3.0 * (i + 1), "num_tokens": i + 1}
        row["asr_lm"] = {"log_likelihood": -2.0 * len(asr.split()), "num_tokens": len(asr.split())}
    if i == 3:
        row["teacher_forced_error"] = "RuntimeError: boom"
    row["floors"] = {"speaker_sim_noise": 0.55 + 0.01 * i, "speaker_sim_other_speaker": 0.6,
                     "other_speaker_id": f"u{i + 1}", "asr_silence": "dog" if i % 2 else "",
                     "asr_true": "the light for forty years", "asr_true_lm": {"log_likelihood": -5.0, "num_tokens": 5},
                     "dnsmos_silence": {k: 2.1 for k in ("p808_mos", "sig_mos", "bak_mos", "ovrl_mos")},
                     "dnsmos_noise": {k: None if i == 0 else 2.2
                                      for k in ("p808_mos", "sig_mos", "bak_mos", "ovrl_mos")}}
    return row


def _rows():
    return [_continuation_row(0), _continuation_row(1, asr=""), _continuation_row(2, boundary="missing"),
            _continuation_row(3), _continuation_row(4, with_lm=False)]


def test_every_continuation_figure_pools_as_the_suite_does():
    rows = _rows()
    own = continuation.metrics(rows)
    parts = evidence.parts("continuation", rows)
    for key, value in own.items():
        if key in ("num_examples", "asr_empty_transcripts"):
            continue
        assert key in parts, key
        assert row_parts.ratio(*parts[key]).value == pytest.approx(value, rel=1e-9), key
    assert own["asr_empty_transcripts"] == 1
    found = evidence.collect("continuation", rows, intervals.BootstrapConfig(resamples=200, seed=0))
    # The empty ASR transcript is counted where it is left out, never silently.
    assert found["excluded"]["asr_log_ppl"] == {
        "rows_used": 3, "rows_excluded": {"empty ASR transcript (no tokens scored)": 1, "not scored": 1}}
    assert found["excluded"]["prompt_transcript_wer"]["rows_excluded"] == {"no text separator": 1}
    assert found["excluded"]["l1_teacher_forced"]["rows_excluded"] == {"teacher-forced pass failed": 1}
    assert found["excluded"]["dnsmos_noise_p808_mos"]["rows_excluded"] == {"not finite (null)": 1}
    # Floors: pooled over the rows' floors.
    assert found["figures"]["speaker_sim_noise_floor"] == pytest.approx(np.mean([0.55, 0.56, 0.57, 0.58, 0.59]))
    assert found["figures"]["asr_silence_word_fraction"] == pytest.approx(2 / 5)
    assert found["figures"]["asr_true_wer"] == 0.0 and found["figures"]["asr_true_log_ppl"] == pytest.approx(np.e)
    assert found["silence_transcripts"] == [["dog", 2]]
    for key, span in found["intervals"].items():
        value = {**own, **found["figures"]}[key]
        if span is not None:
            assert span[0] - 1e-9 <= value <= span[1] + 1e-9 or key.endswith("_ppl"), (key, span, value)
    assert found["references"]["speaker_sim_generated"][0]["figure"] == "speaker_sim_noise_floor"


def test_qa_figures_pool_as_the_suite_does():
    rows = [{"id": str(i), "question": q, "answers": ["paris"], "text_boundary": "separator",
             "model_text": "where is it paris", "prompt_transcript": "where is", "text_answer": "paris",
             "text_correct": i % 2 == 0, "stop_reason": "stop_head", "answer_seconds": 1.0 + i,
             **({"speech_correct": i == 0, "asr_answer": "paris"} if i < 3 else {}),
             "floors": {"asr_silence": "paris" if i == 1 else "in", "asr_question": "where is the"}}
            for i, q in enumerate(["where is it", "where is it", "", "what is it"])]
    own = spoken_qa.metrics(rows)
    parts = evidence.parts("llama_questions", rows)
    for key, value in own.items():
        if key != "num_examples":
            assert row_parts.ratio(*parts[key]).value == pytest.approx(value), key
    found = evidence.collect("llama_questions", rows)
    assert found["figures"]["speech_accuracy_silence_floor"] == 25.0
    assert found["excluded"]["speech_accuracy"]["rows_excluded"] == {"not scored": 1}
    assert found["excluded"]["question_wer"]["rows_excluded"] == {"empty question text": 1}


def test_a_figure_not_above_its_floor_is_marked():
    values = {"speaker_sim_generated": 0.52, "speaker_sim_noise_floor": 0.57, "speaker_sim_other_speaker_floor": 0.6,
              "speaker_sim_true": 0.8, "speech_text_wer": 0.9, "speech_text_wer_silence_floor": 1.0,
              "dnsmos_generated_p808_mos": 2.5, "dnsmos_silence_p808_mos": 2.1, "dnsmos_noise_p808_mos": 2.2}
    found = {"intervals": {"speech_text_wer": [0.8, 1.0], "speech_text_wer_silence_floor": [0.95, 1.0],
                           "dnsmos_generated_p808_mos": [2.4, 2.6], "dnsmos_noise_p808_mos": [2.1, 2.3]}}
    assert evidence.floor_mark("speaker_sim_generated", values, found) == "≤ floor"  # below the other-speaker floor
    assert evidence.figure_cell("speaker_sim_generated", values, found) == "0.520 **≤ floor**"
    assert evidence.floor_mark("speech_text_wer", values, found) == "≈ floor (intervals overlap)"
    assert evidence.floor_mark("dnsmos_generated_p808_mos", values, found) == ""
    assert evidence.figure_cell("dnsmos_generated_p808_mos", values, found) == "2.500 [2.400, 2.600]"
    worse = dict(values, speech_text_wer=1.2)
    assert evidence.floor_mark("speech_text_wer", worse, found) == "≥ floor (not better)"
    lines = "\n".join(evidence.markdown_section(values, {**found, "references": evidence.references(values)}))
    assert "## Floors and ceilings" in lines and "prompt vs white noise" in lines and "ceiling" in lines


def test_other_speaker_partners_and_noise():
    ex = lambda i, s: types.SimpleNamespace(id=f"u{i}", speaker=s, audio="")  # noqa: E731
    examples = [ex(0, "a"), ex(1, "a"), ex(2, "b"), ex(3, "c"), ex(4, None)]
    partners = floors.other_speaker_partners(examples)
    assert set(partners) == {"u0", "u1", "u2", "u3"}
    assert all(p.speaker not in (None, e.speaker) for e in examples for p in partners.get(e.id, ()))
    assert len(partners["u0"]) == 2 and len(partners["u2"]) == 3  # u0: b, c; u2: a, a, c
    assert len(floors.other_speaker_partners(examples, candidates=1)["u2"]) == 1
    assert floors.other_speaker_partners(list(reversed(examples))) == partners  # the order does not matter
    assert floors.other_speaker_partners([ex(0, "a"), ex(1, "a")]) == {}
    like = np.sin(np.linspace(0, 300, 16000)).astype(np.float32) * 0.2
    noise = floors.white_noise(like, "u0")
    assert noise.shape == like.shape and noise.dtype == np.float32
    assert np.sqrt(np.mean(noise ** 2)) == pytest.approx(np.sqrt(np.mean(like ** 2)), rel=0.05)
    assert np.array_equal(noise, floors.white_noise(like, "u0"))
    assert not np.array_equal(noise, floors.white_noise(like, "u1"))


def test_the_sweep_table_prints_intervals_and_marks_overlapping_differences():
    from spectron_jax.sweeps import eval_table

    def entry(name, sim, span):
        return {"name": name, "eval_dir": f"runs/{name}", "evaluation": {
            "suite": "continuation", "metrics": {"num_examples": 16, "speaker_sim_generated": sim},
            "intervals": {"speaker_sim_generated": span}, "skipped": {"count": 0}}}

    payload = eval_table.sweep_payload("s", "continuation", [
        entry("a", 0.45, [0.42, 0.48]), entry("b", 0.47, [0.44, 0.50]), entry("c", 0.60, [0.55, 0.65])])
    assert payload["points"][0]["intervals"] == {"speaker_sim_generated": [0.42, 0.48]}
    row = next(line for line in eval_table.sweep_markdown(payload).splitlines()
               if line.startswith("| speaker similarity, prompt vs generated"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    # c is best; neither a nor b overlaps it. Then b best, a overlapping it.
    assert cells == ["0.450 [0.420, 0.480]", "0.470 [0.440, 0.500]", "0.600 [0.550, 0.650] (best)"]
    cells = evidence.comparison_cells([{"x": 0.45}, {"x": 0.47}], [{"x": [0.42, 0.48]}, {"x": [0.44, 0.5]}], "x",
                                      True, lambda v: f"{v:.2f}")
    assert cells == ["0.45 [0.420, 0.480] ≈", "0.47 [0.440, 0.500] (best)"]
    # Reports without intervals: values only, nothing marked.
    assert evidence.comparison_cells([{"x": 1.0}, {"x": 2.0}], [{}, {}], "x", False, str) == ["1.0", "2.0"]


def test_provenance_names_versions_and_commit_and_never_fails_without_git(tmp_path, repo_root):
    import datetime
    import importlib.metadata
    import subprocess

    from spectron_jax.evaluation import provenance

    made = provenance.provenance({"step": 1200, "sep_id": 3, "num_params_per_component": {"decoder": 1}},
                                 {"temperature": 0.7, "top_k": 5}, {"asr": "pocketsphinx"}, "runs/export")
    assert made["checkpoint_step"] == 1200 and made["bundle"] == {"step": 1200, "sep_id": 3}
    assert made["decode"] == {"temperature": 0.7, "top_k": 5} and made["scorers"] == {"asr": "pocketsphinx"}
    assert made["packages"]["jiwer"] == importlib.metadata.version("jiwer")
    assert datetime.datetime.fromisoformat(made["created_utc"]).utcoffset() == datetime.timedelta(0)
    assert "not-a-package-anywhere" not in provenance.package_versions(("jiwer", "not-a-package-anywhere"))
    head = subprocess.run(["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: its commit (a clean or "+dirty" tree)
        assert made["git_commit"].split("+")[0] == head.stdout.strip()
    assert provenance.git_commit(str(tmp_path)) is None  # not a checkout: None, no error
