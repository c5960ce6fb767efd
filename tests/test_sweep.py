"""The launch tools: sweep expansion (spectron_jax.sweep) and the dry runs of the shell launchers.

Every launcher is checked in dry-run mode with a PATH that holds only the basic tools the scripts use
(no gcloud, no xpk), so nothing can reach a cloud; printed commands are parsed back with `shlex` and
compared with the arguments they must carry.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from spectron_jax import sweep

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO_ROOT / "launch"
SAFE = re.compile(r"[A-Za-z0-9._=+-]+")
TOOLS = ("bash", "dirname", "base64", "tr", "sed", "date", "cat", "env", "head", "tail", "grep")


@pytest.fixture()
def gin_file(tmp_path):
    path = tmp_path / "base.gin"
    path.write_text("TRAIN_STEPS = 3\n")
    return path


def _write(tmp_path, text, name="grid.sweep"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _grid_text(gin_file):
    return (f"# a 2 x 2 grid\nbase_gin_files = ['{gin_file}']\nTRAIN_STEPS = 5\n"
            "OptimizerConfig.learning_rate = [1e-4, 3e-4]   # swept\n"
            "LossWeights.spectrogram = [\n    0.5,\n    2.0,\n]\nMeshConfig.ici = (1, -1, 1)\n")


@pytest.fixture()
def bare_path(tmp_path):
    """A PATH with only the basic tools: no gcloud, no xpk, no python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    path = str(bin_dir)
    assert shutil.which("gcloud", path=path) is None and shutil.which("xpk", path=path) is None
    return path


def _run_script(script, args, path, env=None):
    full_env = {"PATH": path, "HOME": os.environ.get("HOME", "/"), **(env or {})}
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO_ROOT, timeout=60)


# ---- spectron_jax.sweep ------------------------------------------------------------------------------------------
def test_grid_expands_to_cartesian_product(tmp_path, gin_file):
    parsed = sweep.parse_sweep(str(_write(tmp_path, _grid_text(gin_file))))
    points = sweep.expand(parsed, str(tmp_path / "runs"))
    expected = list(itertools.product(["1e-4", "3e-4"], ["0.5", "2.0"]))  # last axis fastest
    assert [(p.swept["OptimizerConfig.learning_rate"], p.swept["LossWeights.spectrogram"]) for p in points] == expected
    for point, (lr, w) in zip(points, expected):
        assert point.bindings == (("TRAIN_STEPS", "5"), ("OptimizerConfig.learning_rate", lr),
                                  ("LossWeights.spectrogram", w), ("MeshConfig.ici", "(1, -1, 1)"))
        assert point.gin_files == (str(gin_file),)
        assert point.name == f"learning_rate={lr}_spectrogram={w}"
        assert point.model_dir == f"{tmp_path}/runs/grid/{point.name}"
        args = point.train_args()
        assert args[-1] == f"--gin.MODEL_DIR='{point.model_dir}'"
        assert f"--gin.OptimizerConfig.learning_rate={lr}" in args
    assert len({p.model_dir for p in points}) == 4
    again = sweep.expand(sweep.parse_sweep(str(tmp_path / "grid.sweep")), str(tmp_path / "runs"))
    assert [p.name for p in again] == [p.name for p in points]  # stable


def test_names_are_safe_unique_and_stable_for_awkward_values(tmp_path, gin_file):
    text = (f"base_gin_files = ['{gin_file}']\n"
            "X.path = ['a/b', 'a b', 'a_b', \"it's\"]\nY.ref = [@A(), @B(), %M]\nZ.t = [(1, 2), (1, -2)]\n")
    points = sweep.expand(sweep.parse_sweep(str(_write(tmp_path, text))), "out")
    assert len(points) == 4 * 3 * 2
    names = [p.name for p in points]
    assert len(set(names)) == len(names)
    assert all(SAFE.fullmatch(n) and not n.startswith(("-", ".")) for n in names)
    assert names == [p.name for p in sweep.expand(sweep.parse_sweep(str(tmp_path / "grid.sweep")), "out")]
    # Values are passed exactly as written, whatever their folder name.
    assert points[0].bindings[0] == ("X.path", "'a/b'") and points[0].bindings[1] == ("Y.ref", "@A()")


def test_sweep_name_sets_the_folder(tmp_path, gin_file):
    text = f"sweep_name = 'lr_probe'\nbase_gin_files = '{gin_file}'\nA.b = [1]\n"
    points = sweep.expand(sweep.parse_sweep(str(_write(tmp_path, text))), "runs/")
    assert [p.model_dir for p in points] == ["runs/lr_probe/b=1"]
    with pytest.raises(sweep.SweepError, match=r"grid.sweep:1: sweep_name"):
        sweep.parse_sweep(str(_write(tmp_path, f"sweep_name = 'a/b'\nbase_gin_files = '{gin_file}'\n")))


def test_gin_file_axis_and_extra_bindings(tmp_path, gin_file):
    for stem in ("paper", "no_text_ce"):
        (tmp_path / f"{stem}.gin").write_text("")
    text = (f"base_gin_files = ['{gin_file}']\n"
            f"gin_files = ['{tmp_path}/paper.gin', '{tmp_path}/no_text_ce.gin']\nA.b = [1, 2]\n")
    points = sweep.expand(sweep.parse_sweep(str(_write(tmp_path, text))), "gs://b/x", [("DATA_DIR", "'gs://d'")])
    assert [p.name for p in points] == ["paper_b=1", "paper_b=2", "no_text_ce_b=1", "no_text_ce_b=2"]
    assert points[2].gin_files == (str(gin_file), f"{tmp_path}/no_text_ce.gin")
    assert points[2].bindings == (("A.b", "1"), ("DATA_DIR", "'gs://d'"))


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, gin_file):
    path = _write(tmp_path, _grid_text(gin_file))
    base = tmp_path / "runs"
    out = subprocess.run([sys.executable, "-m", "spectron_jax.sweep", f"--sweep={path}", f"--base_model_dir={base}",
                          "--runner=local", "--dry_run", "--python=python3"],
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 4
    dirs = []
    for argv, (lr, w) in zip(commands, itertools.product(["1e-4", "3e-4"], ["0.5", "2.0"])):
        assert argv[:3] == ["python3", "-m", "spectron_jax.train"]
        assert argv[3] == f"--gin_file={gin_file}"
        assert argv[4:8] == ["--gin.TRAIN_STEPS=5", f"--gin.OptimizerConfig.learning_rate={lr}",
                             f"--gin.LossWeights.spectrogram={w}", "--gin.MeshConfig.ici=(1, -1, 1)"]
        model_dir = argv[8]
        assert model_dir.startswith("--gin.MODEL_DIR='") and model_dir.endswith("'")
        dirs.append(model_dir)
    assert len(set(dirs)) == 4
    assert not base.exists()  # a dry run writes nothing


def test_local_runner_runs_each_point_and_records_it(tmp_path, gin_file):
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    path = _write(tmp_path, _grid_text(gin_file))
    base = tmp_path / "runs"
    out = subprocess.run([sys.executable, "-m", "spectron_jax.sweep", f"--sweep={path}", f"--base_model_dir={base}",
                          "--runner=local", f"--python={fake}", "--only=0", "--only=learning_rate=3e-4_spectrogram=2.0"],
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[-1] for c in calls] == [f"--gin.MODEL_DIR='{base}/grid/learning_rate=1e-4_spectrogram=0.5'",
                                      f"--gin.MODEL_DIR='{base}/grid/learning_rate=3e-4_spectrogram=2.0'"]
    record = json.loads((base / "grid" / "learning_rate=3e-4_spectrogram=2.0" / "sweep_point.json").read_text())
    assert record["swept"] == {"OptimizerConfig.learning_rate": "3e-4", "LossWeights.spectrogram": "2.0"}
    assert record["bindings"]["TRAIN_STEPS"] == "5" and record["index"] == 3
    assert record["command"][1:] == calls[1]


@pytest.mark.parametrize("body, line, fragment", [
    ("A.b = [1, 2\n", 2, "never closed"),
    ("A.b = 1 +\n", 2, "not a gin value"),
    ("this is not a binding\n", 2, "expected NAME = VALUE"),
    ("1abc = 3\n", 2, "not a gin binding name"),
    ("A.b = [1, 1]\n", 2, "twice"),
    ("A.b = []\n", 2, "sweeps over nothing"),
    ("\n\nA.b = 1\nA.b = 2\n", 5, "set twice"),
    ("MODEL_DIR = 'x'\n", 2, "MODEL_DIR"),
    ("gin_files = ['missing.gin']\n", 2, "missing.gin not found"),
])
def test_malformed_sweep_gives_one_line_error_with_file_and_line(tmp_path, gin_file, body, line, fragment):
    path = _write(tmp_path, f"base_gin_files = ['{gin_file}']\n{body}", name="bad.sweep")
    out = subprocess.run([sys.executable, "-m", "spectron_jax.sweep", f"--sweep={path}", "--base_model_dir=x"],
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:{line}:"), out.stderr
    assert fragment in lines[0]


def test_missing_base_files_and_bad_flags(tmp_path):
    path = _write(tmp_path, "A.b = [1, 2]\n")
    with pytest.raises(sweep.SweepError, match="base_gin_files is missing"):
        sweep.parse_sweep(str(path))
    assert sweep.run([f"--sweep={tmp_path}/nope.sweep", "--base_model_dir=x"]) == 2
    assert sweep.run([f"--sweep={path}", "--base_model_dir=x", "--gin.MODEL_DIR='y'"]) == 2
    assert sweep.run([f"--sweep={path}", "--base_model_dir=runs", "--runner=tpu_vm"]) == 2  # not gs://


def test_example_sweeps_expand():
    tiny = sweep.expand(sweep.parse_sweep(str(REPO_ROOT / "gin/sweeps/tiny_lr_x_spec_weight.sweep")), "runs/sweeps")
    assert len(tiny) == 6 and len({p.model_dir for p in tiny}) == 6
    ablations = sweep.expand(sweep.parse_sweep(str(REPO_ROOT / "gin/sweeps/ablations_350m.sweep")), "gs://b/a")
    stems = [p.name for p in ablations]
    assert stems == ["paper", "no_text_ce", "no_delta_losses", "random_init_encoder", "random_init_lm",
                     "random_init_both"]
    assert all(p.gin_files[-1] == f"objectives/{p.name}.gin" for p in ablations)
    tiny_ablations = sweep.expand(sweep.parse_sweep(str(REPO_ROOT / "gin/sweeps/tiny_ablations.sweep")), "runs/s")
    assert [p.name for p in tiny_ablations] == ["paper", "no_text_ce", "no_delta_losses"]
    assert all(p.gin_files == ("runs/tiny_cpu.gin", f"objectives/{p.name}.gin") and not p.bindings
               for p in tiny_ablations)  # same steps, seed and data for every point


def test_example_sweep_bindings_reach_the_training_configs():
    """Every point of the example sweeps parses with the project's gin set-up, and the swept values
    arrive in the configs the training entry point builds (so no binding names a missing parameter)."""
    gin = pytest.importorskip("gin")
    from spectron_jax import gin_config, train

    train.register_train_configurables()
    extra = [("DATA_DIR", "'gs://b/d'"), ("VOCAB_PATH", "'gs://b/v.model'")]
    try:
        for name in ("tiny_lr_x_spec_weight", "ablations_350m", "tiny_ablations"):
            points = sweep.expand(sweep.parse_sweep(str(REPO_ROOT / f"gin/sweeps/{name}.sweep")), "gs://b/x", extra)
            for point in points:
                bindings = [f"{k} = {v}" for k, v in point.bindings] + [f"MODEL_DIR = '{point.model_dir}'"]
                gin_config.parse_gin(gin_files=list(point.gin_files), bindings=bindings)
                train_config = gin.get_configurable("spectron_jax.TrainConfig")()
                weights = gin_config.build("SpectronConfig").loss_weights
                assert gin_config.query_macro("MODEL_DIR") == point.model_dir
                if "OptimizerConfig.learning_rate" in point.swept:
                    assert train_config.optimizer.learning_rate == float(point.swept["OptimizerConfig.learning_rate"])
                    assert weights.spectrogram == float(point.swept["LossWeights.spectrogram"])
                steps = 200 if name == "tiny_ablations" else 50000
                if point.name == "no_text_ce":
                    assert weights.text == 0.0 and weights.freq_delta == 1.0
                elif point.name == "no_delta_losses":
                    assert weights.text == 1.0 and weights.freq_delta == weights.time_delta == 0.0
                elif "gin_files" in point.swept:
                    assert weights.text == 1.0 and weights.freq_delta == 1.0
                if "gin_files" in point.swept:
                    assert gin_config.query_macro("TRAIN_STEPS") == steps
    finally:
        gin.clear_config()


def test_shell_quote_round_trips():
    for arg in ["plain", "--gin.MODEL_DIR='gs://b/r'", "--gin.X=@A()", "it's $HOME", "a b", "", "--x=\"q\"",
                "back\\slash", "--gin.T=(1, -1, 1)"]:
        assert shlex.split(sweep.shell_quote(arg)) == [arg]
    assert sweep.shell_quote("--gin.MODEL_DIR='gs://b/r'") == "--gin.MODEL_DIR=\"'gs://b/r'\""


# ---- spectron_jax.sweep: evaluating the points -----------------------------------------------------------------
# A stand-in interpreter for the three entry points a sweep runs. `train` writes a metrics.jsonl whose last
# validation record is a function of the point's swept values (and fails for one point), `export` writes a
# bundle.json naming its run, `eval` writes a metrics.json computed from that run's validation record, so
# the table can be checked against values derived here independently of the sweep modules.
FAKE_ENTRY_POINTS = r'''
import json, os, pathlib, sys
args = sys.argv[1:]
if any("gs://" in a for a in args):
    os.environ.setdefault("EPATH_USE_TF", "false")
    from etils import epath
else:
    epath = pathlib
with open(LOG, "a") as f:
    f.write(json.dumps(args) + "\n")
flags = dict(a[2:].split("=", 1) for a in args[2:] if "=" in a)
module = args[1]
if module == "spectron_jax.train":
    lr, w = float(flags["gin.OptimizerConfig.learning_rate"]), float(flags["gin.LossWeights.spectrogram"])
    if (lr, w) == (3e-4, 0.5):
        sys.exit(3)
    run = epath.Path(flags["gin.MODEL_DIR"].strip("'"))
    run.mkdir(parents=True, exist_ok=True)
    records = [{"step": 0, "split": "validation", "ce_text": 99.0},
               {"step": 5, "split": "train", "ce_text": 98.0},
               {"step": 5, "split": "validation", "ce_text": lr * 1000, "spec_frames": w, "spec_freq_delta": w / 4,
                "spec_time_delta": w / 8, "loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut')
elif module == "spectron_jax.export":
    out = epath.Path(flags["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "bundle.json").write_text(json.dumps({"run": flags["model_dir"]}))
elif module == "spectron_jax.eval":
    run = json.loads((epath.Path(flags["export_dir"]) / "bundle.json").read_text())["run"]
    lines = (epath.Path(run) / "metrics.jsonl").read_text().splitlines()[:-1]
    last = [json.loads(l) for l in lines if json.loads(l)["split"] == "validation"][-1]
    out = epath.Path(flags["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"num_examples": int(flags.get("limit", 9)), "l1_free_running": 2 * last["spec_frames"],
               "asr_log_ppl": last["ce_text"] + 1}
    (out / "metrics.json").write_text(json.dumps({"suite": flags["suite"], "metrics": metrics,
                                                  "skipped": {"count": 1}, "scorers": {"asr": "stand-in"}}))
'''


def _fake_python(tmp_path):
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nLOG = {str(log)!r}\n{FAKE_ENTRY_POINTS}")
    fake.chmod(0o755)
    return fake, log


def _calls(log):
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return [(c[1].rsplit(".", 1)[-1], c) for c in calls]


def _sweep_run(args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "spectron_jax.sweep", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, env=full_env)


def _table_row(markdown, label):
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in row.strip("|").split("|")][2:]  # after the label and the paper's column


def test_print_runner_shows_export_and_eval_after_each_training(tmp_path, gin_file):
    path = _write(tmp_path, _grid_text(gin_file))
    base = tmp_path / "runs"
    out = _sweep_run([f"--sweep={path}", f"--base_model_dir={base}", "--runner=print", "--python=py",
                      "--evaluate=continuation", "--eval_data_dir=data", "--eval_limit=3", "--eval_arg=--asr=none"])
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines() if line and not line.startswith("#")]
    assert [c[2] for c in commands] == ["spectron_jax.train", "spectron_jax.export", "spectron_jax.eval"] * 4
    for i, name in enumerate(["learning_rate=1e-4_spectrogram=0.5", "learning_rate=1e-4_spectrogram=2.0",
                              "learning_rate=3e-4_spectrogram=0.5", "learning_rate=3e-4_spectrogram=2.0"]):
        run = f"{base}/grid/{name}"
        train, export, evaluate = commands[3 * i: 3 * i + 3]
        assert train[-1] == f"--gin.MODEL_DIR='{run}'"
        assert export[3:] == [f"--model_dir={run}", f"--output_dir={run}/export"]
        assert evaluate[3:] == [f"--export_dir={run}/export", "--suite=continuation", "--data_dir=data",
                                f"--output_dir={run}/eval/continuation", "--limit=3", "--asr=none", "--overwrite"]
    assert f"# table: {base}/grid/eval_continuation.md and {base}/grid/eval_continuation.json" in out.stdout
    assert not base.exists()
    bad = _sweep_run([f"--sweep={path}", "--base_model_dir=x", "--mode=evaluate"])
    assert bad.returncode == 2 and "needs --evaluate" in bad.stderr
    bad = _sweep_run([f"--sweep={path}", "--base_model_dir=x", "--evaluate=continuation"])
    assert bad.returncode == 2 and "needs --eval_data_dir" in bad.stderr


def test_local_runner_evaluates_points_and_writes_one_table(tmp_path, gin_file):
    fake, log = _fake_python(tmp_path)
    path = _write(tmp_path, _grid_text(gin_file))
    base = tmp_path / "runs"
    common = [f"--sweep={path}", f"--base_model_dir={base}", "--runner=local", f"--python={fake}",
              "--evaluate=continuation", "--eval_data_dir=data"]
    out = _sweep_run(common + ["--keep_going", "--eval_limit=4"])
    assert out.returncode == 1 and "1 point(s) failed: learning_rate=3e-4_spectrogram=0.5" in out.stderr
    calls = _calls(log)
    assert [kind for kind, _ in calls] == ["train", "export", "eval"] * 2 + ["train"] + ["train", "export", "eval"]
    swept = list(itertools.product([1e-4, 3e-4], [0.5, 2.0]))
    names = [f"learning_rate={lr}_spectrogram={w}" for lr, w in itertools.product(["1e-4", "3e-4"], ["0.5", "2.0"])]
    payload = json.loads((base / "grid" / "eval_continuation.json").read_text())
    markdown = (base / "grid" / "eval_continuation.md").read_text()
    assert [p["name"] for p in payload["points"]] == names
    for point, (lr, w) in zip(payload["points"], swept):
        if (lr, w) == (3e-4, 0.5):
            assert point["metrics"] is None and point["validation"] == {}
            continue
        assert point["metrics"] == {"num_examples": 4, "l1_free_running": pytest.approx(2 * w),
                                    "asr_log_ppl": pytest.approx(lr * 1000 + 1)}
        assert point["validation_step"] == 5  # the last validation record, past a truncated line
        assert point["validation"] == pytest.approx({"ce_text": lr * 1000, "spec_frames": w,
                                                     "spec_freq_delta": w / 4, "spec_time_delta": w / 8})
        assert point["skipped"] == 1 and point["scorers"] == {"asr": "stand-in"}
    assert _table_row(markdown, "examples scored") == ["4 (1)", "4 (1)", "not evaluated", "4 (1)"]
    assert _table_row(markdown, "log-mel L1 to the true continuation, free-running") == \
        [f"{2 * w:.3f}" if (lr, w) != (3e-4, 0.5) else "n/a" for lr, w in swept]
    assert _table_row(markdown, "validation text CE") == \
        [f"{lr * 1000:.3f}" if (lr, w) != (3e-4, 0.5) else "n/a" for lr, w in swept]

    # Evaluate mode over the trained points: the exports are reused and the evaluations resume ...
    good = ["--only=0", "--only=1", "--only=3"]
    out = _sweep_run(common + ["--mode=evaluate"] + good)
    assert out.returncode == 0, out.stderr
    calls = _calls(log)
    assert [kind for kind, _ in calls] == ["eval"] * 3 and all("--overwrite" not in c for _, c in calls)
    assert all("--limit=4" not in c for _, c in calls)
    again = json.loads((base / "grid" / "eval_continuation.json").read_text())
    assert [p["metrics"]["num_examples"] for p in again["points"]] == [9, 9, 9]
    # ... unless asked to export again, which starts the evaluation over.
    out = _sweep_run(common + ["--mode=evaluate", "--only=3", "--reexport"])
    assert out.returncode == 0, out.stderr
    calls = _calls(log)
    assert [kind for kind, _ in calls] == ["export", "eval"] and calls[1][1][-1] == "--overwrite"

    # spectron_jax.sweeps.eval_table --sweep_dir rebuilds the same table from the folder alone.
    (base / "grid" / "eval_continuation.json").unlink()
    out = subprocess.run([sys.executable, "-m", "spectron_jax.sweeps.eval_table", f"--sweep_dir={base}/grid"],
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    rebuilt = json.loads((base / "grid" / "eval_continuation.json").read_text())
    assert [p["name"] for p in rebuilt["points"]] == [p["name"] for p in payload["points"]]
    assert [p["metrics"] for p in rebuilt["points"]] == [again["points"][0]["metrics"], again["points"][1]["metrics"],
                                                          None, again["points"][2]["metrics"]]


def test_sweep_records_and_table_on_gcs(tmp_path, gin_file, gcs_emulator, monkeypatch):
    """sweep_point.json and the table go through the file-system layer to gs://; the run's files are put
    there beforehand and the entry points only log their calls (each gcsfs start-up costs seconds)."""
    env = {k: v for k, v in gcs_emulator.items() if k != "bucket"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from spectron_jax import filesystem

    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    base = f"gs://{gcs_emulator['bucket']}/sweep-test"
    run = f"{base}/grid/learning_rate=1e-4_spectrogram=2.0"
    filesystem.write_text(f"{run}/metrics.jsonl", json.dumps({"step": 7, "split": "validation", "ce_text": 2.5}) + "\n")
    filesystem.write_text(f"{run}/eval/continuation/metrics.json", json.dumps(
        {"suite": "continuation", "metrics": {"num_examples": 3, "l1_free_running": 4.0}, "skipped": {"count": 0}}))
    path = _write(tmp_path, _grid_text(gin_file))
    out = _sweep_run([f"--sweep={path}", f"--base_model_dir={base}", "--runner=local", f"--python={fake}",
                      "--only=1", "--evaluate=continuation", "--eval_data_dir=data"], env=env)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)[1] for line in log.read_text().splitlines()] == \
        ["spectron_jax.train", "spectron_jax.export", "spectron_jax.eval"]
    record = json.loads(filesystem.read_text(f"{run}/sweep_point.json"))
    assert record["swept"] == {"OptimizerConfig.learning_rate": "1e-4", "LossWeights.spectrogram": "2.0"}
    payload = json.loads(filesystem.read_text(f"{base}/grid/eval_continuation.json"))
    assert [p["name"] for p in payload["points"]] == ["learning_rate=1e-4_spectrogram=2.0"]
    assert payload["points"][0]["metrics"]["l1_free_running"] == 4.0
    assert payload["points"][0]["validation"] == {"ce_text": 2.5}
    markdown = filesystem.read_text(f"{base}/grid/eval_continuation.md")
    assert _table_row(markdown, "log-mel L1 to the true continuation, free-running") == ["4.000"]


# ---- shell launchers ---------------------------------------------------------------------------------
def test_bash_quoting_round_trips(bare_path):
    args = ["plain", "--gin.MODEL_DIR='gs://b/r x'", "@A()", "it's $HOME `x`", "", "a\\b", "--x=\"q\"", "!bang"]
    script = f"source {shlex.quote(str(LAUNCH / 'common.sh'))}; quote_command \"$@\""
    out = subprocess.run(["bash", "-c", script, "quote", *args], capture_output=True, text=True,
                         env={"PATH": bare_path}, timeout=30)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == args


def _remote_script(ssh_argv):
    """The script that a printed `gcloud ... ssh --command=...` writes on the workers (base64 inside)."""
    command = next(a for a in ssh_argv if a.startswith("--command="))[len("--command="):]
    encoded = re.search(r"echo ([A-Za-z0-9+/=]+) \| base64 -d", command).group(1)
    return command, base64.b64decode(encoded).decode()


def _python_argv(script):
    """argv of the `python -m spectron_jax.train` line of a run script (continuation lines joined)."""
    joined = script.replace("\\\n", " ")
    line = next(l for l in joined.splitlines() if l.startswith("python -m spectron_jax.train"))
    return shlex.split(line.split(" > >(tee")[0])


def test_tpu_vm_dry_run_train(bare_path):
    out = _run_script("tpu_vm.sh", ["--dry_run", "--zone=us-x1-a", "--tpu_name=pod-1", "--bucket=gs://bucket/sp",
                                    "train", "--run_name=r1", "--gin_file=runs/tiny_cpu.gin",
                                    "--gin.TRAIN_STEPS=10", "--gin.LossWeights.text=0.5"], bare_path)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(l[2:]) for l in out.stdout.splitlines() if l.startswith("+ ")]
    assert len(commands) == 1
    ssh = commands[0]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    assert "--worker=all" in ssh and "--zone=us-x1-a" in ssh
    command, script = _remote_script(ssh)
    assert "nohup bash .spectron_runs/r1/run.sh" in command
    expected = ["python", "-m", "spectron_jax.train", "--gin.TrainConfig.distributed=@DistributedConfig()",
                "--gin.DistributedConfig.auto=True", "--gin_file=runs/tiny_cpu.gin", "--gin.TRAIN_STEPS=10",
                "--gin.LossWeights.text=0.5", "--gin.MODEL_DIR='gs://bucket/sp/runs/r1'"]
    assert _python_argv(script) == expected
    assert "--gin.MODEL_DIR=\"'gs://bucket/sp/runs/r1'\"" in script  # as a person would type it
    assert "gs://bucket/sp/logs/r1/worker-$WORKER_ID.log" in script and "tee" in script
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True,
                            env={"PATH": bare_path}, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    # The printed script (for people) is the one sent to the workers.
    printed = "\n".join(l[4:] for l in out.stdout.splitlines() if l.startswith("#   "))
    assert printed == script.rstrip("\n")


def test_tpu_vm_dry_run_keeps_a_given_model_dir_and_other_commands(bare_path):
    env = {"ZONE": "z", "TPU_NAME": "t", "DRY_RUN": "1"}
    out = _run_script("tpu_vm.sh", ["train", "--gin_file=a.gin", "--gin.MODEL_DIR='gs://q/run'",
                                    "--distributed_auto=false", "--run_name=x"], bare_path, env)
    assert out.returncode == 0, out.stderr
    ssh = shlex.split(next(l for l in out.stdout.splitlines() if l.startswith("+ "))[2:])
    assert _python_argv(_remote_script(ssh)[1]) == ["python", "-m", "spectron_jax.train", "--gin_file=a.gin",
                                                   "--gin.MODEL_DIR='gs://q/run'"]
    out = _run_script("tpu_vm.sh", ["--queued", "--spot", "--accelerator_type=v4-64", "create"], bare_path, env)
    lines = [shlex.split(l[2:]) for l in out.stdout.splitlines() if l.startswith("+ ")]
    create = next(c for c in lines if c[3:5] == ["queued-resources", "create"])
    assert create[5] == "t-qr" and {"--node-id=t", "--accelerator-type=v4-64", "--spot",
                                    "--runtime-version=tpu-ubuntu2204-base"} <= set(create)
    for command, argv in [("stop", ["tpu-vm", "ssh"]), ("delete", ["tpu-vm", "delete"])]:
        out = _run_script("tpu_vm.sh", [command], bare_path, env)
        assert out.returncode == 0 and f"gcloud compute tpus {' '.join(argv)} t" in out.stdout
    assert "kill -TERM" in _run_script("tpu_vm.sh", ["stop"], bare_path, env).stdout


@pytest.mark.parametrize("args, fragment", [
    (["train", "--gin_file=a.gin"], "MODEL_DIR"),  # no bucket, no model dir
    (["train", "--gin_file=a.gin", "--gin.MODEL_DIR='/local/dir'"], "gs://"),
    (["--bogus", "status"], "--bogus"),
    (["frobnicate"], "frobnicate"),
    (["--grace_seconds=5m", "stop"], "--grace_seconds=5m"),
])
def test_tpu_vm_bad_arguments(bare_path, args, fragment):
    out = _run_script("tpu_vm.sh", args, bare_path, {"ZONE": "z", "TPU_NAME": "t", "DRY_RUN": "1"})
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and fragment in out.stderr


def test_xpk_dry_run_multislice(bare_path):
    out = _run_script("xpk_example.sh", ["--dry_run", "--cluster=c1", "--tpu_type=v5p-128", "--num_slices=2",
                                         "--workload=w1", "--bucket=gs://b/s", "--gin_file=runs/x.gin",
                                         "--gin.TRAIN_STEPS=7"], bare_path)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(next(l for l in out.stdout.splitlines() if l.startswith("+ "))[2:])
    assert argv[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=c1", "--workload=w1", "--tpu-type=v5p-128", "--num-slices=2"} <= set(argv)
    command = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    train = shlex.split(command.split("&&")[-1])
    assert train == ["python3", "-m", "spectron_jax.train", "--gin.TrainConfig.distributed=@DistributedConfig()",
                     "--gin.DistributedConfig.auto=True", "--gin.TrainConfig.mesh=@MeshConfig()",
                     "--gin.MeshConfig.dcn=(-1, 1, 1, 1)", "--gin_file=runs/x.gin", "--gin.TRAIN_STEPS=7",
                     "--gin.MODEL_DIR='gs://b/s/runs/w1'"]
    single = _run_script("xpk_example.sh", ["--dry_run", "--cluster=c1", "--workload=w1", "--gin_file=x.gin",
                                            "--gin.MODEL_DIR='gs://b/m'"], bare_path)
    assert single.returncode == 0 and "MeshConfig.dcn" not in single.stdout and "--num-slices=1" in single.stdout


def test_local_dry_run_two_processes(bare_path):
    out = _run_script("local.sh", ["--dry_run", "--num_processes=2", "--devices=8", "--port=23456",
                                   "--python=py", "--gin_file=runs/tiny_cpu.gin", "--gin.MODEL_DIR='/tmp/run 2'",
                                   "--gin.TRAIN_STEPS=2"], bare_path, {"XLA_FLAGS": "--xla_other=1"})
    assert out.returncode == 0, out.stderr
    lines = [l[2:] for l in out.stdout.splitlines() if l.startswith("+ ")]
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        argv = shlex.split(line)
        env_part = argv[1:argv.index("py")]
        env = dict(item.split("=", 1) for item in env_part)
        assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_other=1 --xla_force_host_platform_device_count=4",
                       "SPECTRON_COORDINATOR_ADDRESS": "127.0.0.1:23456", "SPECTRON_NUM_PROCESSES": "2",
                       "SPECTRON_PROCESS_ID": str(rank)}
        start = argv.index("py")
        assert argv[start:start + 6] == ["py", "-m", "spectron_jax.train", "--gin_file=runs/tiny_cpu.gin",
                                         "--gin.MODEL_DIR='/tmp/run 2'", "--gin.TRAIN_STEPS=2"]
        assert argv[start + 6:] == [">", f"/tmp/run 2/local_logs/process_{rank}.log", "2>&1"]
    bad = _run_script("local.sh", ["--dry_run", "--num_processes=3", "--devices=8", "--port=1", "--python=py",
                                   "--gin_file=a.gin"], bare_path)
    assert bad.returncode == 2 and "split evenly" in bad.stderr


_WORKER_PYTHON = r"""#!/usr/bin/env bash
# Stand-in for a worker's .venv python: MODE=save exits 0 a moment after SIGTERM (training saves);
# MODE=hang ignores SIGTERM, like a worker stuck in a collective, and so does its child.
echo $$ > "$HOME/python.pid"
[[ $MODE == hang ]] && trap '' TERM
sleep 1000 & child=$!
[[ $MODE == save ]] && trap 'kill $child; sleep 0.5; echo saved; exit 0' TERM
echo $child > "$HOME/child.pid"
echo "training $*"
while :; do wait; done
"""


def _process_group(pid):
    """The process group id of `pid` (from /proc), or None once the process has ended."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in "ZX" else int(fields[2])


@pytest.mark.parametrize("mode", ["save", "hang"])
def test_tpu_vm_stop_on_a_worker_terms_waits_and_kills_the_process_group(bare_path, tmp_path, mode):
    """The commands that `train` and `stop` send to every worker, run here in a stand-in worker's home."""
    settings = ["--dry_run", "--zone=z", "--tpu_name=t", "--run_name=r1"]
    train = _run_script("tpu_vm.sh", [*settings, "--upload_every=1", "train", "--gin_file=a.gin",
                                      "--gin.MODEL_DIR='gs://b/run'"], bare_path)
    stop = _run_script("tpu_vm.sh", [*settings, "--grace_seconds=3", "stop"], bare_path)
    assert train.returncode == 0 and stop.returncode == 0, train.stderr + stop.stderr
    start_command = _remote_script(shlex.split(next(l for l in train.stdout.splitlines() if l.startswith("+ "))[2:]))[0]
    stop_command, stop_script = _remote_script(shlex.split(next(l for l in stop.stdout.splitlines()
                                                                if l.startswith("+ "))[2:]))
    assert "GRACE=3" in stop_script and "kill -KILL -- \"-$PID\"" in stop_script

    home = tmp_path / "home"
    python = home / "spectron_jax" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(_WORKER_PYTHON)
    python.chmod(0o755)
    bin_dir = pathlib.Path(bare_path)
    for tool in ("sleep", "tee", "mkdir", "rm", "hostname", "nohup"):  # no gcloud, no curl: uploads fail
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": bare_path, "HOME": str(home), "MODE": mode}
    pids = []
    try:
        started = subprocess.run(["bash", "-c", start_command], cwd=home, env=env, capture_output=True,
                                 text=True, timeout=60)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 60
        while not (home / "child.pid").exists():
            assert time.monotonic() < deadline, (home / ".spectron_runs" / "r1" / "nohup.out").read_text()
            time.sleep(0.05)
        pids = [int((home / name).read_text()) for name in ("python.pid", "child.pid")]
        assert int((home / ".spectron_runs" / "r1" / "train.pid").read_text()) == pids[0]
        assert _process_group(pids[0]) == _process_group(pids[1]) == pids[0]  # a group of its own

        out = subprocess.run(["bash", "-c", stop_command], cwd=home, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
        assert f"{host}: SIGTERM sent to r1; waiting up to 3s" in out.stdout
        killed = f"{host}: r1 still running after 3s: SIGKILL sent to its process group"
        code = {"save": 0, "hang": 137}[mode]
        assert (killed in out.stdout) == (mode == "hang"), out.stdout
        assert f"{host}: r1 exited with code {code}" in out.stdout
        assert (home / ".spectron_runs" / "r1" / "exit_code").read_text().strip() == str(code)
        deadline = time.monotonic() + 10
        while any(_process_group(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_process_group(pid) for pid in pids)
        again = subprocess.run(["bash", "-c", stop_command], cwd=home, env=env, capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 0 and f"{host}: no running run r1" in again.stdout
    finally:
        for pid in pids:
            if _process_group(pid):
                os.kill(pid, signal.SIGKILL)
