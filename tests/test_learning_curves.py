"""Learning curves: the series a run's metric log holds, their moving means, the PNG and the table."""

import json

import numpy as np
import pytest

from spectron_jax import learning_curves


def _write_run(model_dir, records):
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _records():
    rng = np.random.default_rng(0)
    out = [{"split": "train", "step": s, "ce_asr": 5.0 - s / 100 + rng.normal(0, 0.1), "ce_lm": 5.5 - s / 200,
            "spec_frames": 3.0, "spec_total": 9.0} for s in range(1, 61)]
    for step, asr in ((0, 7.0), (30, 4.0), (60, 3.5)):
        out.append({"split": "validation", "step": step, "ce_asr": asr, "ce_lm": 5.0, "spec_frames": 3.1,
                    "spec_total": 9.2, "ce_asr_swapped_prefix": asr + 1.0, "ce_lm_swapped_prefix": 5.1})
    # a resumed run logs step 30 again: the later record wins
    out.append({"split": "validation", "step": 30, "ce_asr": 3.9, "ce_lm": 5.0, "spec_frames": 3.1,
                "spec_total": 9.2, "ce_asr_swapped_prefix": 4.9, "ce_lm_swapped_prefix": 5.1})
    return out


def test_series_keeps_the_last_record_of_a_step_in_step_order():
    records = _records()
    validation = [r for r in records if r["split"] == "validation"]
    steps, values = learning_curves.series(validation[::-1][1:] + validation[-1:], "ce_asr")
    np.testing.assert_array_equal(steps, [0, 30, 60])
    np.testing.assert_allclose(values, [7.0, 3.9, 3.5])
    assert learning_curves.series(validation + [{"step": 90, "ce_asr": float("nan")}], "ce_asr")[0].tolist() == [0, 30, 60]


@pytest.mark.parametrize("window", [1, 4, 100])
def test_moving_mean_matches_a_direct_mean(window):
    values = np.random.default_rng(1).normal(size=23)
    want = [values[max(0, i - window + 1): i + 1].mean() for i in range(23)]
    np.testing.assert_allclose(learning_curves.moving_mean(values, window), want)


def test_cli_writes_a_png_and_prints_the_figures(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, _records())
    evals = {}
    for split, step, cer in (("test", 30, 0.8), ("test", 60, 0.6), ("train", 60, 0.2)):
        folder = tmp_path / f"{split}_{step}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({"suite": "continuation", "metrics": {
            "prompt_transcript_cer": cer, "continuation_cer": 0.9, "stop_head_fraction": 0.5}}))
        evals[(split, step)] = folder
    output = tmp_path / "curves.png"
    argv = ["--model_dir", str(run), "--output", str(output), "--print"]
    for (split, step), folder in evals.items():
        argv += ["--eval", f"{split}:{step}={folder}"]
    assert learning_curves.main(argv) == 0
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    printed = capsys.readouterr().out
    lines = [line.split() for line in printed.splitlines()[1:4]]
    assert [float(cells[0]) for cells in lines] == [0, 30, 60]
    assert [float(cells[1]) for cells in lines] == [7.0, 3.9, 3.5]   # ce_asr, the later step-30 record
    assert "free-running on test: step 30: prompt_transcript_cer=0.8" in printed


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert learning_curves.main(["--model_dir", str(empty), "--output", str(tmp_path / "x.png")]) == 2
    assert "no metric records" in capsys.readouterr().err
    run = tmp_path / "run"
    _write_run(run, _records())
    assert learning_curves.main(["--model_dir", str(run), "--output", str(tmp_path / "x.png"),
                                 "--eval", "test=somewhere"]) == 2
    assert "expected SPLIT:STEP=DIR" in capsys.readouterr().err
    assert learning_curves.main(["--model_dir", str(run), "--output", str(tmp_path / "x.png"),
                                 "--eval", f"test:5={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
