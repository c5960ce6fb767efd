"""Training: the loss falls, exact resume after kill -9, SIGTERM saves and exits 0, two processes on
loopback (also through launch/local.sh, one of them killed with -9), sharding of the state on a (2, 2, 2)
mesh, the NaN stop, schedules, and CLI errors.

The runs are subprocesses of `python -m spectron_jax.train` on a 40-utterance slice of the embedded
corpus with a one-layer model, on one CPU device unless the test is about sharding; they share a
persistent compilation cache so only the first run of a program pays for its compilation.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from spectron_jax import cli, metric_logs, partitioning, train, trainer

MODEL_GIN = """
SpectronConfig.encoder = @ConformerConfig()
SpectronConfig.decoder = @DecoderConfig()
SpectronConfig.acoustic = @AcousticConfig()
ConformerConfig.model_dim = 32
ConformerConfig.num_layers = 1
ConformerConfig.num_heads = 2
ConformerConfig.conv_kernel_size = 5
ConformerConfig.subsampling_channels = 8
DecoderConfig.vocab_size = 512
DecoderConfig.model_dim = 64
DecoderConfig.num_layers = 1
DecoderConfig.num_heads = 4
DecoderConfig.num_kv_heads = 1
DecoderConfig.head_dim = 16
DecoderConfig.mlp_dim = 128
AcousticConfig.prenet_dims = (32,)
AcousticConfig.postnet_hidden = 64
"""

RUN_GIN = MODEL_GIN + """
MODEL_DIR = %gin.REQUIRED
TRAIN_STEPS = 32
TASK = 'spectron_embedded'
TrainConfig.batch_size = 8
TrainConfig.data_dir = '{data_dir}'
TrainConfig.vocab_path = '{vocab}'
TrainConfig.log_every_steps = 4
TrainConfig.eval_every_steps = 32
TrainConfig.eval_batches = 1
TrainConfig.peak_flops_per_device = 1e9   # the reference run measures it instead
TrainConfig.optimizer = @OptimizerConfig()
TrainConfig.checkpoint = @CheckpointConfig()
OptimizerConfig.learning_rate = 3e-3
OptimizerConfig.warmup_steps = 2
OptimizerConfig.decay_steps = 32         # fixed, so runs of any TRAIN_STEPS share one compiled step
CheckpointConfig.save_every_steps = 8
CheckpointConfig.keep_last = 5
TaskConfig.max_continuation_seconds = 2.0
SpectronFeatureConverter.prompt_len = 240
SpectronFeatureConverter.text_len = 48
SpectronFeatureConverter.cont_len = 160
"""

LOSS_TERMS = ("loss", "ce_text", "spec_frames", "spec_freq_delta", "spec_time_delta_1", "spec_time_delta_2",
              "spec_time_delta_3")


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory, repo_root, embedded_dir):
    """Shards of 32 train + 8 validation utterances, the run gin file and a compilation cache."""
    root = tmp_path_factory.mktemp("train")
    with open(embedded_dir / "manifest.tsv", encoding="utf-8") as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    col = {name: i for i, name in enumerate(header)}
    picked = [r for r in rows if r[col["split"]] == "train"][:32] + [r for r in rows if r[col["split"]] == "validation"][:8]
    manifest = root / "manifest.tsv"
    with open(manifest, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for r in picked:
            r = list(r)
            r[col["path"]] = str(embedded_dir / r[col["path"]])
            f.write("\t".join(r) + "\n")
    data_dir = root / "data"
    subprocess.run([sys.executable, "-m", "spectron_jax.data.prepare", "--format=manifest", f"--input={manifest}",
                    f"--output_dir={data_dir}", "--num_shards=1", "--num_workers=1"],
                   check=True, cwd=repo_root, capture_output=True)
    gin_file = root / "run.gin"
    gin_file.write_text(RUN_GIN.format(data_dir=data_dir, vocab=embedded_dir / "spm" / "spectron_tiny.model"))
    return {"root": root, "gin": str(gin_file), "cache": str(root / "jax_cache")}


def _env(workdir, devices=1, **extra):
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
                # Unoptimised CPU code compiles in about half the time; every run here shares the flags.
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true",
                "JAX_COMPILATION_CACHE_DIR": workdir["cache"],
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _command(workdir, model_dir, *bindings):
    return [sys.executable, "-m", "spectron_jax.train", f"--gin_file={workdir['gin']}",
            f"--gin.MODEL_DIR='{model_dir}'", *bindings]


def _run(workdir, model_dir, *bindings, devices=1, timeout=240, **env):
    return subprocess.run(_command(workdir, model_dir, *bindings), env=_env(workdir, devices, **env),
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=timeout)


def _start(workdir, model_dir, *bindings, devices=1, **env):
    return subprocess.Popen(_command(workdir, model_dir, *bindings), env=_env(workdir, devices, **env),
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_losses(model_dir) -> dict[int, dict]:
    """{step: metrics} of the run's train records; a repeated step keeps its last record (a line torn by
    kill -9 is skipped by the reader)."""
    return {record["step"]: record for record in metric_logs.read_records(model_dir, split="train")}


def _checkpoint_steps(model_dir) -> list[int]:
    root = os.path.join(model_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def _wait_for(predicate, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def reference_run(workdir):
    model_dir = workdir["root"] / "reference"
    result = _run(workdir, model_dir, "--gin.TrainConfig.peak_flops_per_device=None",
                  "--gin.TrainConfig.profile_steps=(2, 3)", timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return model_dir, result


def _eval_records(model_dir) -> dict[int, dict]:
    return {record["step"]: record for record in metric_logs.read_records(model_dir, split="validation")}


# ---- runs --------------------------------------------------------------------------------------
def test_tiny_run_lowers_every_loss_term_and_writes_its_outputs(reference_run):
    model_dir, result = reference_run
    losses = _train_losses(model_dir)
    assert sorted(losses) == list(range(1, 33))
    # Every term on the same validation batch (deterministic): before training vs after 32 steps.
    evals = _eval_records(model_dir)
    assert sorted(evals) == [0, 32]
    for term in LOSS_TERMS:
        assert evals[32][term] < evals[0][term], (term, evals[0][term], evals[32][term])
    assert np.mean([losses[s]["loss"] for s in (30, 31, 32)]) < 0.7 * np.mean([losses[s]["loss"] for s in (1, 2, 3)])
    assert all(math.isfinite(r["grad_norm"]) and r["learning_rate"] > 0 for r in losses.values())
    assert _checkpoint_steps(model_dir) == [8, 16, 24, 32]
    for name in ("config.gin", "model_summary.json", "tokenizer.model"):
        assert (model_dir / name).is_file(), name
    summary = json.loads((model_dir / "model_summary.json").read_text())
    assert summary["parameters"]["total"] == sum(v for k, v in summary["parameters"].items() if k != "total")
    assert "DecoderConfig.num_layers = 1" in (model_dir / "config.gin").read_text()
    assert "step 32/32 | loss" in result.stdout  # the progress line
    # TensorBoard: every loss term, grad norm, lr, rates and MFU; eval scalars, image and audio.
    import tensorflow as tf

    tags = set()
    for event_file in model_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags.update(v.tag for v in event.summary.value)
    wanted = {f"train/{t}" for t in LOSS_TERMS} | {"train/grad_norm", "train/learning_rate", "train/steps_per_sec",
                                                  "train/text_tokens_per_sec", "train/frames_per_sec",
                                                  "train/tflops_per_device", "train/mfu", "train/analytic_mfu",
                                                  "train/analytic_tflops_per_device", "eval/loss",
                                                  "eval/spectrogram", "eval/continuation"}
    assert wanted <= tags, wanted - tags
    # profile_steps=(2, 3): one jax.profiler trace where TensorBoard's profile plugin looks for it.
    traces = list(model_dir.glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces


def test_kill9_and_restart_reproduces_the_uninterrupted_losses(workdir, reference_run):
    reference = _train_losses(reference_run[0])
    model_dir = workdir["root"] / "killed"
    proc = _start(workdir, model_dir)
    try:
        reached = _wait_for(lambda: 16 in _checkpoint_steps(model_dir), proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reached and proc.returncode == -signal.SIGKILL, proc.stdout.read()[-3000:]
    killed_at = max(_train_losses(model_dir))
    assert killed_at < 32
    result = _run(workdir, model_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = int(result.stdout.split("resumed from step ")[1].split()[0])
    assert 16 <= resumed <= killed_at
    losses = _train_losses(model_dir)
    assert sorted(losses) == list(range(1, 33))
    for step in range(1, 33):
        for term in LOSS_TERMS:
            assert losses[step][term] == pytest.approx(reference[step][term], rel=1e-6, abs=1e-6), (step, term)


def test_sigterm_saves_the_step_reached_and_exits_zero(workdir):
    model_dir = workdir["root"] / "sigterm"
    proc = _start(workdir, model_dir, "--gin.CheckpointConfig.save_every_steps=1000",
                  "--gin.TrainConfig.eval_every_steps=0")
    try:
        started = _wait_for(lambda: max(_train_losses(model_dir), default=0) >= 2, proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert started and proc.returncode == 0, output[-3000:]
    reached = max(_train_losses(model_dir))
    assert _checkpoint_steps(model_dir) == [reached]
    assert f"saved step {reached}" in output


def test_resume_with_a_changed_data_seed_is_refused(workdir, reference_run):
    model_dir, _ = reference_run
    before = sorted(os.listdir(model_dir))
    result = _run(workdir, model_dir, "--gin.TrainConfig.data_seed=7")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "data_seed 0 -> 7" in lines[0] and "accept_data_change" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(model_dir)) == before


@pytest.mark.slow
def test_resume_with_changed_data_files_or_shuffle_window_is_refused_unless_accepted(workdir, reference_run):
    model_dir = workdir["root"] / "data_changed"
    shutil.copytree(reference_run[0], model_dir)
    data_dir = workdir["root"] / "data_grown"
    shutil.copytree(workdir["root"] / "data", data_dir)
    shutil.copy(data_dir / "train.tfrecord-00000-of-00001", data_dir / "train.tfrecord-00001-of-00001")
    changed = (f"--gin.TrainConfig.data_dir='{data_dir}'", "--gin.TaskConfig.shuffle_buffer_size=500")
    result = _run(workdir, model_dir, *changed)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "data files 1 -> 2, records 32 -> 64, shuffle_buffer_size 1000 -> 500" in lines[0], lines[0]
    assert _checkpoint_steps(model_dir) == [8, 16, 24, 32]
    result = _run(workdir, model_dir, *changed, "--gin.TrainConfig.accept_data_change=True", "--gin.TRAIN_STEPS=33")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from step 32" in result.stdout and 33 in _checkpoint_steps(model_dir)
    assert "the data stream changed (data files 1 -> 2" in result.stderr and "restarts at epoch" in result.stderr


def test_nan_loss_stops_and_keeps_the_last_checkpoint(workdir, reference_run):
    model_dir = workdir["root"] / "nan"
    result = _run(workdir, model_dir, "--gin.TrainConfig.nan_at_step=11", "--gin.TrainConfig.eval_every_steps=0")
    assert result.returncode == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("error:"))  # the tagged line
    assert error.startswith("error: step 11: loss is nan") and "last good checkpoint is step 8" in error
    assert _checkpoint_steps(model_dir) == [8]
    assert max(_train_losses(model_dir)) == 10
    # The checkpoint loads, is finite, and equals the uninterrupted run's step-8 checkpoint.
    import orbax.checkpoint as ocp

    ours = ocp.PyTreeCheckpointer().restore(str(model_dir / "checkpoints" / "8" / "state"))
    theirs = ocp.PyTreeCheckpointer().restore(str(reference_run[0] / "checkpoints" / "8" / "state"))
    leaves = jax.tree.leaves(ours["params"])
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
    for a, b in zip(leaves, jax.tree.leaves(theirs["params"])):
        np.testing.assert_array_equal(a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(workdir, model_dir, *bindings, per_process=((), ())):
    address = f"127.0.0.1:{_free_port()}"
    return [_start(workdir, model_dir, *bindings, *per_process[i], devices=4, SPECTRON_COORDINATOR_ADDRESS=address,
                   SPECTRON_NUM_PROCESSES=2, SPECTRON_PROCESS_ID=i) for i in range(2)]


def _finish(procs, timeout=600) -> list[str]:
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-2000:] for o in outputs)
    return outputs


def _saved_steps(output: str) -> list[int]:
    """Steps of the tagged 'SIGTERM: saved step N' lines of one process's output."""
    return [int(line.split()[3]) for line in output.splitlines() if line.startswith("SIGTERM: saved step")]


def _restart_from(model_dir, name, step):
    """A copy of `model_dir` whose newest checkpoint is `step` (later ones and the metrics removed)."""
    restart = model_dir.parent / name
    shutil.copytree(model_dir, restart)
    for later in _checkpoint_steps(restart):
        if later > step:
            shutil.rmtree(restart / "checkpoints" / str(later))
    (restart / train.METRICS_JSONL).unlink()
    return restart


@pytest.mark.slow
def test_two_processes_train_resume_exactly_and_one_process_continues(workdir):
    model_dir = workdir["root"] / "multihost"
    # FSDP across the processes, evaluation with media at steps 0 and 6, two microbatches: every
    # jitted computation runs on both processes (a process-0-only forward would hang here). Process 1
    # starts compiling 40 s after process 0: the first cross-process collective (the step-0
    # evaluation) would find process 0's Gloo rendezvous timed out (30 s) unless they meet first.
    pod = ("--gin.MeshConfig.ici=(1,-1,1)", "--gin.TrainConfig.mesh=@MeshConfig()", "--gin.TrainConfig.batch_size=16",
           "--gin.TrainConfig.step=@StepConfig()", "--gin.StepConfig.microbatches=2",
           "--gin.CheckpointConfig.save_every_steps=2")
    _finish(_start_two(workdir, model_dir, "--gin.TRAIN_STEPS=6", "--gin.TrainConfig.eval_every_steps=6", *pod,
                       per_process=((), ("--gin.TrainConfig.delay_before_compile_s=40",))))
    assert _checkpoint_steps(model_dir) == [2, 4, 6]
    meta = json.loads((model_dir / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["process_count"] == 2
    evals = _eval_records(model_dir)
    assert sorted(evals) == [0, 6]
    uninterrupted = _train_losses(model_dir)
    assert sorted(uninterrupted) == list(range(1, 7))

    # The step-0 evaluation of one process with all 8 devices equals the two processes' (a mean over
    # valid tokens and frames, whichever process read them).
    single = workdir["root"] / "multihost_single"
    result = _run(workdir, single, "--gin.TRAIN_STEPS=1", "--gin.TrainConfig.eval_every_steps=1", *pod, devices=8)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for term in LOSS_TERMS + ("num_text_tokens", "num_frames"):
        assert _eval_records(single)[0][term] == pytest.approx(evals[0][term], rel=1e-5, abs=1e-6), term

    # Restarts from step 2 in which one process gets SIGTERM while restoring, right after its first
    # save (step 4) or right after its first evaluation (step 3). The notice is never lost: both
    # processes save the same step, the first sync point after it, and exit 0; the steps they ran
    # equal the uninterrupted run's.
    for name, after, bindings, first_stop in (
            ("restore", ("", "--gin.TrainConfig.sigterm_after='restore'"), (), 3),
            ("save", ("", "--gin.TrainConfig.sigterm_after='save'"), (), 5),
            ("eval", ("--gin.TrainConfig.sigterm_after='eval'", ""), ("--gin.TrainConfig.eval_every_steps=3",), 4)):
        restart = _restart_from(model_dir, f"multihost_restart_{name}", 2)
        per_process = tuple((a,) if a else () for a in after)
        outputs = _finish(_start_two(workdir, restart, "--gin.TRAIN_STEPS=8", "--gin.TrainConfig.eval_every_steps=0",
                                     *pod, *bindings, per_process=per_process))
        saved = [_saved_steps(out) for out in outputs]
        assert saved[0] == saved[1] and len(saved[0]) == 1 and saved[0][0] in (first_stop, first_stop + 1), (name, saved)
        stopped = saved[0][0]
        assert _checkpoint_steps(restart) == sorted({2, 4, stopped} if stopped > 4 else {2, stopped}), name
        resumed = _train_losses(restart)
        assert sorted(resumed) == list(range(3, stopped + 1)), name
        for step in resumed:
            if step in uninterrupted:
                for term in LOSS_TERMS:
                    assert resumed[step][term] == pytest.approx(uninterrupted[step][term], rel=1e-5, abs=1e-6), (
                        name, step, term)

    # One process with all 8 devices continues the 2-process run (data restarts at the epoch's start).
    result = _run(workdir, model_dir, "--gin.TRAIN_STEPS=8", "--gin.TrainConfig.eval_every_steps=0", *pod, devices=8)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from step 6" in result.stdout
    # what the restart costs: the records both processes consumed since the oldest saved epoch began
    # (32 train records; each process kept every other one, so at most 2 * 16 + 16)
    restarted = re.search(r"written by 2 processes, now 1: data restarts at epoch (\d+), position 0 "
                          r"\((\d+) of the 32 records of an epoch are seen again\)", result.stderr)
    assert restarted and 0 < int(restarted.group(2)) <= 48, result.stderr[-3000:]
    assert _checkpoint_steps(model_dir) == [2, 4, 6, 8]
    losses = _train_losses(model_dir)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(losses[s]["loss"]) for s in losses)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(workdir):
    model_dir = workdir["root"] / "multihost_sigterm"
    address = f"127.0.0.1:{_free_port()}"
    procs = [_start(workdir, model_dir, "--gin.TRAIN_STEPS=400", "--gin.CheckpointConfig.save_every_steps=2",
                    "--gin.TrainConfig.eval_every_steps=0", devices=4, SPECTRON_COORDINATOR_ADDRESS=address,
                    SPECTRON_NUM_PROCESSES=2, SPECTRON_PROCESS_ID=i) for i in range(2)]
    outputs = []
    try:
        assert _wait_for(lambda: 2 in _checkpoint_steps(model_dir), procs[0], timeout=400)
        procs[1].send_signal(signal.SIGTERM)
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    saved = [[line.split()[3] for line in out.splitlines() if line.startswith("SIGTERM: saved step")] for out in outputs]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved
    assert int(saved[0][0]) in _checkpoint_steps(model_dir) and int(saved[0][0]) < 400


def _children(pid: int) -> list[int]:
    """Live child processes of `pid`, from the parent field of /proc/*/stat."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] not in "ZX":
            found.append(int(entry))
    return found


def _process_id(pid: int) -> str | None:
    """SPECTRON_PROCESS_ID in the environment of process `pid`."""
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    values = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"SPECTRON_PROCESS_ID=")]
    return values[0] if values else None


@pytest.mark.slow
def test_launcher_ends_the_other_process_within_its_grace_period_after_kill_9(workdir, repo_root):
    """launch/local.sh with two real training processes: process 1 is killed with -9 mid-run; process 0
    (whose SIGTERM JAX catches, and which waits for its peer in a collective) is ended by the launcher."""
    model_dir = workdir["root"] / "launcher_kill_9"
    grace = 20
    launcher = subprocess.Popen(
        ["bash", str(repo_root / "launch" / "local.sh"), "--num_processes=2", "--devices=8", f"--port={_free_port()}",
         f"--python={sys.executable}", f"--grace_seconds={grace}", f"--gin_file={workdir['gin']}",
         f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=400", "--gin.CheckpointConfig.save_every_steps=2",
         "--gin.TrainConfig.eval_every_steps=0"],
        env=_env(workdir, devices=4), cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    logs = model_dir / "local_logs"
    workers = []
    try:
        if not _wait_for(lambda: 2 in _checkpoint_steps(model_dir), launcher, timeout=400):
            pytest.fail("no checkpoint at step 2: " + (logs / "process_0.log").read_text()[-3000:])
        found = {_process_id(pid): pid for pid in _children(launcher.pid)}
        workers = [found["0"], found["1"]]
        os.kill(workers[1], signal.SIGKILL)
        start = time.monotonic()
        _, err = launcher.communicate(timeout=grace + 120)
        seconds = time.monotonic() - start
    finally:
        if launcher.poll() is None:  # the test failed: end the launcher and the groups of its workers
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
            for pid in workers:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert launcher.returncode == 137, err + (logs / "process_0.log").read_text()[-3000:]  # process 1's: the first
    assert seconds <= grace + 30, (seconds, err)  # 30 s: the launcher's polling and exit on a loaded machine
    assert "error: process 1 exited with code 137" in err
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]  # both reaped by the launcher


# ---- in process --------------------------------------------------------------------------------
def _tiny_model_config():
    from spectron_jax.models import conformer, decoder, spectron

    return spectron.SpectronConfig(
        encoder=conformer.ConformerConfig(model_dim=32, num_layers=1, num_heads=2, conv_kernel_size=5,
                                          subsampling_channels=8),
        decoder=decoder.DecoderConfig(vocab_size=512, model_dim=64, num_layers=1, num_heads=4, num_kv_heads=1,
                                      head_dim=16, mlp_dim=128))


def test_state_on_a_data_fsdp_model_mesh_is_sharded_as_the_rules_say():
    mesh = partitioning.make_mesh(partitioning.MeshConfig(ici=(2, 2, 2)))
    config = train.TrainConfig(mesh=partitioning.MeshConfig(ici=(2, 2, 2)))
    model = trainer.FunctionalSpectron(_tiny_model_config())
    layout = trainer.train_state_layout(model, config, 10, mesh)
    state = jax.jit(layout.init_state, out_shardings=layout.shardings)()
    params = state["params"]
    # Embedding [vocab, embed]: vocab -> model, embed -> fsdp (DEFAULT_RULES); every device holds 1/4.
    table = [x for path, x in _flat(params).items() if path.startswith("decoder/embedder")][0]
    assert table.shape == (512, 64)
    assert table.sharding.spec == P("model", "fsdp")
    assert {s.data.shape for s in table.addressable_shards} == {(256, 32)}
    # Every parameter with logical axes: mesh axes as the rules map them (when they divide the size).
    abstract = model.model.abstract_params
    logical = {path: axes for path, axes in _logical_axes(abstract).items()}
    rule = dict(partitioning.DEFAULT_RULES)
    checked = 0
    for path, array in _flat(params).items():
        axes = logical[path]
        for dim, name in enumerate(axes):
            mesh_axis = rule.get(name)
            entry = array.sharding.spec[dim] if dim < len(array.sharding.spec) else None
            if isinstance(mesh_axis, str) and array.shape[dim] % 2 == 0:
                others = [array.sharding.spec[d] for d in range(len(axes)) if d != dim]
                if mesh_axis not in others:
                    assert entry == mesh_axis, (path, axes, array.sharding.spec)
                    checked += 1
            if mesh_axis is None:
                assert entry is None, (path, axes, array.sharding.spec)
    assert checked > 10
    # Large kernels: the gated MLP is (fsdp, model) sharded, and its AdamW moments mirror it.
    mlp = {p: x for p, x in _flat(params).items() if "mlp" in p and x.ndim == 2}
    assert mlp and all(set(x.sharding.spec) >= {"model"} for x in mlp.values())
    opt_leaves = {trainer.path_of(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])}
    for path, x in mlp.items():
        mirrored = [v for k, v in opt_leaves.items() if k.endswith(path) and v.shape == x.shape]
        assert len(mirrored) == 2 and all(v.sharding.spec == x.sharding.spec for v in mirrored), path


def _flat(tree):
    from spectron_jax import checkpoints
    return checkpoints.flatten_paths(tree)


def _logical_axes(abstract_state):
    from flax import nnx

    out = {}
    for kp, var in jax.tree_util.tree_leaves_with_path(abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        path = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)
        out[path] = tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.get_value().shape))
    return out


def test_schedules_and_freezing():
    cosine = trainer.learning_rate_schedule(trainer.OptimizerConfig(learning_rate=1.0, warmup_steps=10,
                                                                    end_lr_fraction=0.1), 110)
    assert float(cosine(0)) == pytest.approx(0.1)
    assert float(cosine(9)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
    assert float(cosine(110)) == pytest.approx(0.1)
    rsqrt = trainer.learning_rate_schedule(trainer.OptimizerConfig(learning_rate=1.0, warmup_steps=100,
                                                                   decay="rsqrt"), 1000)
    assert float(rsqrt(399)) == pytest.approx(math.sqrt(100 / 400))
    params = {"encoder": {"w": np.ones(3, np.float32)}, "decoder": {"w": np.ones(3, np.float32)}}
    for name in ("adamw", "adafactor"):
        config = trainer.OptimizerConfig(name=name, learning_rate=0.1, warmup_steps=0, freeze=("^encoder/",))
        tx, _ = trainer.make_optimizer(config, 10, params)
        grads = jax.tree.map(np.ones_like, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        assert np.all(np.asarray(updates["encoder"]["w"]) == 0)
        assert np.all(np.asarray(updates["decoder"]["w"]) < 0)


def test_gradient_accumulation_matches_the_full_batch():
    def loss_fn(params, batch, rng):
        error = batch["x"] @ params["w"] - batch["y"]
        return np.float32(0.5) * (error ** 2).mean(), {"mse": (error ** 2).mean()}

    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 3)).astype(np.float32), "y": rng.normal(size=(8,)).astype(np.float32)}
    params = {"w": np.zeros(3, np.float32)}
    tx, schedule = trainer.make_optimizer(trainer.OptimizerConfig(name="adamw", warmup_steps=0, learning_rate=0.1,
                                                                  grad_clip_norm=None), 10, params)
    state = {"step": np.int32(0), "rng": jax.random.key_data(jax.random.key(0)), "params": params,
             "opt_state": tx.init(params)}
    outs = []
    for micro in (1, 4):
        step = trainer.make_train_step(loss_fn, tx, schedule, trainer.StepConfig(microbatches=micro), np.float32)
        outs.append(jax.jit(step)(state, batch))
    np.testing.assert_allclose(outs[0][1]["grad_norm"], outs[1][1]["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(outs[0][0]["params"]["w"], outs[1][0]["params"]["w"], rtol=1e-5)
    # Independent reference: the gradient of the mean squared error, by hand.
    grad = batch["x"].T @ (batch["x"] @ params["w"] - batch["y"]) / 8
    np.testing.assert_allclose(outs[0][1]["grad_norm"], np.linalg.norm(grad), rtol=1e-5)


@pytest.mark.parametrize("argv, message", [
    ([], "--gin_file"),
    (["--gin_file=does/not/exist.gin"], "file not found"),
    (["--gin_file=runs/tiny_cpu.gin"], "MODEL_DIR"),
    (["--gin_file=runs/tiny_cpu.gin", "--gin.MODEL_DIR='never/written'", "--gin.TrainConfig.no_such_knob=1"],
     "no_such_knob"),
    (["--gin_file=runs/tiny_cpu.gin", "--gin.MODEL_DIR='never/written'", "--gin.TASK='nope'"], "TASK"),
    (["--gin_file=runs/tiny_cpu.gin", "--gin.MODEL_DIR='never/written'", "--gin.OptimizerConfig.name='sgd'"], "adamw"),
])
def test_bad_command_lines_give_one_line_errors(argv, message):
    with pytest.raises(cli.UsageError, match=message) as info:
        train.main(argv)
    assert "\n" not in str(info.value)


def test_bad_command_line_exits_nonzero_in_a_subprocess(tmp_path, repo_root):
    result = subprocess.run([sys.executable, "-m", "spectron_jax.train", "--gin_file=runs/tiny_cpu.gin"],
                            cwd=repo_root, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "MODEL_DIR" in lines[0] and "Traceback" not in result.stderr


# ---- quiet CPU hosts: no libtpu start-up errors with the `tpu` extra installed ------------------------
# What libtpu 0.0.42 prints when JAX loads it on a host without TPU chips (each pattern one of its lines).
LIBTPU_NOISE = re.compile(r"could not determine TPU|TPU_WORKER_HOSTNAMES|Failed to find host bounds|"
                          r"Logging before InitGoogle|Source Location Trace|libtpu_init_utils|libtpu_lockfile")


def _host_without_tpu_env():
    """The environment of a fresh shell on this host (skips unless libtpu is installed and no TPU attached)."""
    from spectron_jax import quiet_libtpu

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (the `tpu` extra)")
    if quiet_libtpu.tpu_attached():
        pytest.skip("a TPU is attached: libtpu is meant to start here")
    return _without_tpu_settings(os.environ)


def _without_tpu_settings(environ):
    """`environ` without JAX_PLATFORMS (the tests' conftest sets it), TPU variables or a log level, and with
    several libtpu loads allowed: another process holding libtpu's machine-wide lock would otherwise stop
    libtpu before its probe (and its errors) in the child."""
    from spectron_jax import quiet_libtpu

    dropped = {"JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", *quiet_libtpu.TPU_ENV}
    return {**{k: v for k, v in environ.items() if k not in dropped}, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def test_jax_own_platform_search_prints_libtpu_errors_here():
    """The control: asked for JAX's own search (JAX_PLATFORMS=''), libtpu starts and prints its errors, so
    the patterns match what this host prints and the user's setting is respected."""
    env = {**_host_without_tpu_env(), "JAX_PLATFORMS": ""}
    result = subprocess.run([sys.executable, "-c", "import spectron_jax, jax; print(jax.devices()[0].platform)"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "cpu", result.stderr[-2000:]
    assert LIBTPU_NOISE.search(result.stderr), result.stderr[-2000:]


@pytest.mark.slow
def test_train_help_and_one_step_print_no_libtpu_errors_on_a_cpu_host(workdir, repo_root):
    env = _host_without_tpu_env()
    help_run = subprocess.run([sys.executable, "-m", "spectron_jax.train", "--help"], cwd=repo_root, env=env,
                              capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0 and "--gin_file" in help_run.stdout, help_run.stderr[-2000:]
    step_env = _without_tpu_settings(_env(workdir))
    step_run = subprocess.run(_command(workdir, workdir["root"] / "quiet_host", "--gin.TRAIN_STEPS=1"),
                              cwd=repo_root, env=step_env, capture_output=True, text=True, timeout=480)
    assert step_run.returncode == 0, step_run.stdout[-2000:] + step_run.stderr[-2000:]
    assert "step 1/1" in step_run.stdout
    for run in (help_run, step_run):
        noisy = [line for line in run.stderr.splitlines() if LIBTPU_NOISE.search(line)]
        assert not noisy, "\n".join(noisy[:10])


RUN_FILES = sorted(os.path.basename(p) for p in os.listdir(os.path.join(os.path.dirname(__file__), "..", "gin", "runs")))


@pytest.mark.parametrize("name", RUN_FILES)
def test_run_files_parse_and_build(name):
    from spectron_jax import gin_config

    train.register_train_configurables()
    gin_config.parse_gin(gin_files=[f"runs/{name}"],
                         bindings=["MODEL_DIR = 'never/written'", "DATA_DIR = 'd'", "VOCAB_PATH = 'v.model'",
                                   "PRETRAINED_LM = 'lm'", "PRETRAINED_ENCODER = 'encoder'"])
    config = train._build_train_config()
    model = gin_config.build("SpectronConfig")
    assert gin_config.query_macro("TRAIN_STEPS") > 0
    assert gin_config.query_macro("TASK") in ("spectron_embedded", "spectron_librilight")
    weights = model.loss_weights
    if name.endswith("_librilight.gin") or name.startswith("ablation_"):
        # The pod runs: 64 chips, the global batch splits over data x fsdp, bf16 compute, auto init.
        assert np.prod(config.mesh.ici) == 64 and config.batch_size % (config.mesh.ici[0] * config.mesh.ici[1]) == 0
        assert config.distributed.auto and model.decoder.dtype == "bfloat16"
        widths = {"gemma3_270m": 640, "gemma3_1b": 1152}  # the Gemma 3 checkpoints' widths
        width = next((w for key, w in widths.items() if key in name), 2048 if "1b" in name else 1024)
        assert model.decoder.model_dim == width
    else:
        assert config.data_dir == "runs/embedded_tfrecords" and model.decoder.vocab_size == 512
    assert (weights.text == 0.0) == (name == "ablation_no_text_ce.gin")
    assert (weights.time_delta == 0.0) == (name == "ablation_no_delta_losses.gin")
    # every run writes the text separator at phi (beyond the paper): '<sep>' = 4, Gemma 3's '<unused0>' = 6
    assert gin_config.build("TaskConfig").sep_id == model.sep_id == (6 if "gemma3" in name else 4)


def test_a_tokenizer_without_the_separator_is_refused(embedded_dir, throwaway_sp_model):
    """With TaskConfig.sep_id on, training takes only a tokenizer that reserves that id."""
    import dataclasses

    from spectron_jax.data import tasks as tasks_lib
    from spectron_jax.models.spectron import SpectronConfig
    from spectron_jax.models.decoder import DecoderConfig

    embedded = str(embedded_dir / "spm" / "spectron_tiny.model")
    model = SpectronConfig(decoder=DecoderConfig(vocab_size=512), sep_id=4)
    config = train.TrainConfig(vocab_path=embedded)
    assert train._tokenizer_of_run(config, model, tasks_lib.TaskConfig(sep_id=4)).vocab_path == embedded
    for vocab, task, message in [
        (throwaway_sp_model, tasks_lib.TaskConfig(sep_id=4), "lacks the separator sep_id=4"),
        (embedded, tasks_lib.TaskConfig(sep_id=None), "TaskConfig.sep_id=None but SpectronConfig.sep_id=4"),
    ]:
        with pytest.raises(cli.UsageError, match=message) as info:
            train._tokenizer_of_run(dataclasses.replace(config, vocab_path=vocab), model, task)
        assert "\n" not in str(info.value)
    with pytest.raises(cli.UsageError, match="that id is '▁the'"):  # an ordinary piece is no separator
        train._tokenizer_of_run(config, dataclasses.replace(model, sep_id=7), tasks_lib.TaskConfig(sep_id=7))


# ---- a run initialised from a converted Gemma decoder -------------------------------------------------
@pytest.mark.slow  # one training step and an evaluation from a converted checkpoint: about a minute on 2 cores
def test_run_from_converted_gemma_decoder_starts_at_its_text_loss(workdir, embedded_dir, tmp_path):
    """The step-0 validation text CE of a run from a converted tiny Gemma 3 equals that LM's own CE there.

    The LM gets the checkpoint's tokenizer (Gemma ids: pad 0, eos 1, bos 2, unk 3) through PRETRAINED_LM
    alone. Only the random encoder prefix separates the two losses, so they agree to a few per cent,
    while a random LM sits near log(vocab).
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import sentencepiece as spm

    from spectron_jax.convert import decoder as convert
    from spectron_jax.data import pipeline as pipeline_lib
    from spectron_jax.data import tasks as tasks_lib

    source = tmp_path / "gemma"
    source.mkdir()
    with open(embedded_dir / "manifest.tsv", encoding="utf-8") as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    (tmp_path / "text.txt").write_text("\n".join(r[header.index("transcript")] for r in rows))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "text.txt"), model_prefix=str(source / "tokenizer"), vocab_size=120, pad_id=0,
        eos_id=1, bos_id=2, unk_id=3, model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    lm = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for param in lm.parameters():
            param.normal_(0.0, 0.3)
    lm.save_pretrained(str(source))
    converted = tmp_path / "converted"
    assert convert.main(["--format=hf", f"--input={source}", f"--output={converted}", "--no-check"]) == 0

    gin_file = tmp_path / "run.gin"
    gin_file.write_text(open(workdir["gin"], encoding="utf-8").read() + f"\ninclude '{converted / 'decoder.gin'}'\n"
                        "SpectronConfig.pretrained = @PretrainedInit()\n"
                        f"PretrainedInit.lm_checkpoint = '{converted}'\nTrainConfig.vocab_path = None\n")
    model_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "spectron_jax.train", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
         "--gin.TRAIN_STEPS=1", "--gin.TrainConfig.eval_every_steps=1"],
        env=_env(workdir), cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    start = _eval_records(model_dir)[0]["ce_text"]

    # the LM's own loss on the same validation batch (the evaluator reads it unshuffled)
    tasks_lib.register_tasks({"spectron_embedded": str(workdir["root"] / "data")}, str(source / "tokenizer.model"),
                             tasks_lib.TaskConfig(max_continuation_seconds=2.0))
    batch = next(iter(pipeline_lib.make_pipeline("spectron_embedded", "validation", 8, seed=0, shuffle=False,
                                                 repeat=False, prompt_len=240, text_len=48, cont_len=160)))
    assert batch["text_inputs"][0, 0] == 2  # Gemma's bos starts the text
    with torch.no_grad():
        logits = lm(input_ids=torch.as_tensor(np.asarray(batch["text_inputs"], np.int64))).logits.double().numpy()
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, np.asarray(batch["text_targets"], np.int64)[..., None], -1)[..., 0]
    weights = np.asarray(batch["text_weights"], np.float64)
    reference = float(np.sum(nll * weights) / np.sum(weights))
    assert abs(reference - np.log(128)) > 1.0  # the LM is far from a uniform (random-init) model
    assert abs(start - reference) < 0.05 * reference, (start, reference)


_CACHE_PROBE = """
import json, sys
import jax, jax.numpy as jnp
from spectron_jax import train
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
used = train.configure_compilation_cache(sys.argv[1], min_compile_seconds=0)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((32, 32))).block_until_ready()
with open(sys.argv[2], "w") as f:
    json.dump({"used": used, "hits": events.count("/jax/compilation_cache/cache_hits")}, f)
"""


def test_compilation_cache_is_reused_by_a_second_process(tmp_path):
    cache = tmp_path / "cache"
    script = tmp_path / "probe.py"
    script.write_text(_CACHE_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
                "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    results = []
    for run in range(2):
        subprocess.run([sys.executable, str(script), str(cache), str(tmp_path / f"{run}.json")], env=env, check=True,
                       capture_output=True, timeout=300)
        results.append(json.loads((tmp_path / f"{run}.json").read_text()))
        if run == 0:
            entries = os.listdir(cache)
            assert entries, "the first process wrote no cache entry"
    # Every program the first process compiled (the jitted function, and jnp.ones' own) is an entry; the
    # second process loads each of them instead of compiling, and adds nothing.
    assert any(name.startswith("jit__lambda") for name in entries)
    assert results[0] == {"used": str(cache), "hits": 0}
    assert results[1] == {"used": str(cache), "hits": len(entries)}
    assert sorted(os.listdir(cache)) == sorted(entries)


def test_compilation_cache_default_and_off(tmp_path, monkeypatch):
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.values.get("jax_compilation_cache_dir")
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        expected = str(tmp_path / "spectron_jax" / "jax_compilation_cache")
        assert train.configure_compilation_cache(None) == expected and os.path.isdir(expected)
        assert jax.config.values.get("jax_compilation_cache_dir") == expected
        assert train.configure_compilation_cache("") is None
        assert not jax.config.values.get("jax_compilation_cache_dir")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # the environment's setting wins over the default
        assert train.configure_compilation_cache(None) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


@pytest.mark.parametrize("steps", [(0, 2), (3, 2), (1,), (1.5, 2)])
def test_bad_profile_steps_are_rejected(steps):
    with pytest.raises(ValueError, match="profile_steps"):
        train.TrainConfig(profile_steps=steps)
