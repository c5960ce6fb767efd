"""How launch/local.sh stops its processes: SIGTERM, a grace period, then SIGKILL of each process group.

The launcher is the unit under test. It always starts `PY -m spectron_jax.train ...`, so `--python` points
at a small bash program written here that behaves like one kind of worker (chosen per process id through
the environment, which the launcher passes on):

  save   on SIGTERM: takes SAVE_SECONDS to "save", writes saved_ID and exits 0 (as training does)
  hang   ignores SIGTERM, like a worker stuck in a collective; so does its child process
  plain  the default SIGTERM action (ends with 143); its child process is left behind
  fail   exits 3 once the test creates the file `go`

Every stand-in writes its pid (pid_ID) and its child's pid (child_ID) and then ready_ID, so a test can
check through /proc that no process of the job outlives the launcher.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCAL = REPO_ROOT / "launch" / "local.sh"
MARGIN = 15.0  # seconds beyond the grace period that a loaded 2-core machine may need

STAND_IN = r"""#!/usr/bin/env bash
id=$SPECTRON_PROCESS_ID
mode_var=MODE_$id
mode=${!mode_var}
[[ $1 == -m && $2 == spectron_jax.train ]] || { echo "unexpected arguments: $*" >&2; exit 9; }
echo $$ > "$WORK/pid_$id"
case $mode in
  save)
    sleep 1000 & child=$!
    trap 'kill $child; sleep "$SAVE_SECONDS"; echo saved > "$WORK/saved_$id"; exit 0' TERM ;;
  hang)
    trap '' TERM
    sleep 1000 & child=$! ;;
  plain)
    sleep 1000 & child=$! ;;
  fail)
    sleep 1000 & child=$!
    echo $child > "$WORK/child_$id"; echo ready > "$WORK/ready_$id"
    while [[ ! -e $WORK/go ]]; do sleep 0.05; done
    kill $child; exit 3 ;;
  *) echo "unknown mode '$mode'" >&2; exit 9 ;;
esac
echo $child > "$WORK/child_$id"
echo ready > "$WORK/ready_$id"
while :; do wait; done
"""


def _process_group(pid: int) -> int:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[2])


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (from /proc/PID/stat)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


class Job:
    """One launch/local.sh run of stand-in workers (launcher in a session of its own, like a terminal job)."""

    def __init__(self, tmp_path: pathlib.Path, modes: list[str], grace: int, save_seconds: float = 0.5):
        self.work = tmp_path
        self.n = len(modes)
        stand_in = tmp_path / "stand_in_python"
        stand_in.write_text(STAND_IN)
        stand_in.chmod(0o755)
        env = {**os.environ, "WORK": str(tmp_path), "SAVE_SECONDS": str(save_seconds)}
        env.update({f"MODE_{i}": mode for i, mode in enumerate(modes)})
        self.stdout = open(tmp_path / "launcher.out", "w")
        self.stderr_path = tmp_path / "launcher.err"
        self.stderr = open(self.stderr_path, "w")
        argv = ["bash", str(LOCAL), f"--num_processes={self.n}", f"--devices={self.n}", "--port=1",
                f"--python={stand_in}", f"--grace_seconds={grace}", f"--log_dir={tmp_path / 'logs'}",
                "--gin_file=unused.gin"]
        self.proc = subprocess.Popen(argv, stdout=self.stdout, stderr=self.stderr, env=env, cwd=REPO_ROOT,
                                     start_new_session=True)
        self.pids: list[int] = []

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all((self.work / f"ready_{i}").exists() for i in range(self.n)):
            assert self.proc.poll() is None, f"launcher ended early: {self.stderr_text()}"
            assert time.monotonic() < deadline, "the stand-in workers did not start"
            time.sleep(0.05)
        self.pids = [int((self.work / f"{kind}_{i}").read_text()) for i in range(self.n) for kind in ("pid", "child")]
        assert all(_alive(pid) for pid in self.pids)
        for i in range(self.n):  # each worker leads a process group of its own, which holds its child
            assert _process_group(self.pids[2 * i]) == _process_group(self.pids[2 * i + 1]) == self.pids[2 * i]
        assert _process_group(self.proc.pid) == self.proc.pid  # (the launcher's: start_new_session)

    def pid(self, i: int) -> int:
        return int((self.work / f"pid_{i}").read_text())

    def wait_for_stderr(self, fragment: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while fragment not in self.stderr_text():
            assert time.monotonic() < deadline, f"{fragment!r} not in {self.stderr_text()!r}"
            time.sleep(0.05)

    def wait(self, timeout: float) -> tuple[int, float]:
        """(exit code, seconds it took from now)."""
        start = time.monotonic()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        return rc, time.monotonic() - start

    def stderr_text(self) -> str:
        self.stderr.flush()
        return self.stderr_path.read_text()

    def survivors(self, timeout: float = 5.0) -> list[int]:
        """Processes of the job still alive `timeout` s after the launcher ended (a SIGKILL takes a moment)."""
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in self.pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [pid for pid in self.pids if _alive(pid)]

    def close(self) -> None:
        for pid in self.pids:  # never leave a stray process behind, even when a test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()


@pytest.fixture()
def job(tmp_path):
    jobs = []

    def start(modes, grace, save_seconds=0.5):
        jobs.append(Job(tmp_path, modes, grace, save_seconds))
        return jobs[-1]

    yield start
    for j in jobs:
        j.close()


def test_a_worker_killed_with_sigkill_ends_the_job_within_the_grace_period(job):
    grace = 4
    j = job(["hang", "plain", "save"], grace)
    j.wait_ready()
    os.kill(j.pid(1), signal.SIGKILL)
    rc, seconds = j.wait(timeout=grace + 60)
    assert rc == 137, j.stderr_text()  # the first failure: process 1, ended by signal 9
    assert grace <= seconds <= grace + MARGIN  # process 0 ignores SIGTERM: it is killed at the end of the grace
    assert j.survivors() == []  # process 0 and its child, process 1's orphaned child, process 2's child
    assert (j.work / "saved_2").read_text() == "saved\n"  # the well-behaved process got SIGTERM and saved
    err = j.stderr_text()
    assert "error: process 1 exited with code 137" in err
    assert "process 2 exited with code 0" in err and "process 0 exited with code 137" in err
    shown = (j.work / "launcher.out").read_text()
    assert f"process ids (each also its process group's): {' '.join(str(j.pid(i)) for i in range(3))}" in shown


@pytest.mark.parametrize("how", ["TERM to the launcher", "Ctrl-C to its process group"])
def test_a_stop_is_forwarded_and_the_launcher_waits_for_the_saves(job, how):
    j = job(["save", "save"], grace=60, save_seconds=1.5)
    j.wait_ready()
    if how.startswith("TERM"):
        os.kill(j.proc.pid, signal.SIGTERM)
    else:
        os.killpg(j.proc.pid, signal.SIGINT)  # what a terminal does: the workers' own groups are not hit
    rc, seconds = j.wait(timeout=60 + MARGIN)
    assert rc == 0, j.stderr_text()  # every process saved and exited 0
    assert seconds >= 1.5
    for i in range(2):  # the launcher returned only after both saves were complete
        assert (j.work / f"saved_{i}").read_text() == "saved\n"
    assert j.survivors() == []
    err = j.stderr_text()
    assert ("received SIGTERM" if how.startswith("TERM") else "received SIGINT") in err
    assert "SIGKILL to their process groups" not in err


def test_a_worker_that_ignores_the_stop_is_killed_after_the_grace_period(job):
    grace = 4
    j = job(["save", "hang"], grace)
    j.wait_ready()
    os.kill(j.proc.pid, signal.SIGTERM)
    rc, seconds = j.wait(timeout=grace + 60)
    assert rc == 137, j.stderr_text()  # process 1 ended by SIGKILL
    assert grace <= seconds <= grace + MARGIN
    assert (j.work / "saved_0").exists()
    assert j.survivors() == []
    assert "still running: process(es) 1; sending SIGKILL to their process groups" in j.stderr_text()


def test_a_second_signal_skips_the_rest_of_the_grace_period(job):
    j = job(["hang", "hang"], grace=300)
    j.wait_ready()
    os.kill(j.proc.pid, signal.SIGTERM)
    j.wait_for_stderr("received SIGTERM")
    os.kill(j.proc.pid, signal.SIGTERM)
    rc, seconds = j.wait(timeout=60)
    assert rc == 137, j.stderr_text()
    assert seconds <= MARGIN  # far below the 300 s grace period
    assert j.survivors() == []
    err = j.stderr_text()
    assert "received SIGTERM again" in err and "still running: process(es) 0 1; sending SIGKILL" in err


def test_the_first_failure_is_the_exit_code_and_left_over_children_are_killed(job):
    j = job(["plain", "fail"], grace=60)
    j.wait_ready()
    (j.work / "go").touch()
    rc, _ = j.wait(timeout=60 + MARGIN)
    assert rc == 3, j.stderr_text()  # not process 0's 143 (it died of the SIGTERM that followed)
    assert j.survivors() == []  # process 0's child outlived it: the launcher killed it
    err = j.stderr_text()
    assert "error: process 1 exited with code 3" in err and "process 0 exited with code 143" in err
    assert "killed what process 0 left running" in err


def test_grace_seconds_flag_dry_run_and_help():
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    base = ["bash", str(LOCAL), "--dry_run", "--port=2", "--python=py", "--gin_file=a.gin"]
    bad = subprocess.run([*base, "--grace_seconds=soon"], capture_output=True, text=True, env=env, timeout=30)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: --grace_seconds=soon: expected a whole number of seconds"
    out = subprocess.run(base, capture_output=True, text=True, env={**env, "GRACE_SECONDS": "7"}, timeout=30)
    assert out.returncode == 0 and "grace period 7s" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.startswith("+ ")]) == 2  # nothing ran
    out = subprocess.run([*base, "--grace_seconds=0"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0 and "grace period 0s" in out.stdout
    default = subprocess.run(base, capture_output=True, text=True, env=env, timeout=30)
    assert "grace period 300s" in default.stdout
    usage = subprocess.run(["bash", str(LOCAL), "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert usage.returncode == 0 and "--grace_seconds=S" in usage.stdout
