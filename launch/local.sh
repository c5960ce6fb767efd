#!/usr/bin/env bash
# Runs one spectron_jax training job as N processes on this machine: a loopback coordinator and the
# CPU devices split evenly between the processes. It exercises the multi-host code paths
# (jax.distributed.initialize, per-host data shards, global arrays, multi-process checkpoints)
# without a pod.
#
#   launch/local.sh [--num_processes=2] [--devices=8] [--port=PORT] [--grace_seconds=300] [--dry_run] \
#       --gin_file=runs/tiny_cpu.gin --gin.MODEL_DIR="'/tmp/spectron_2proc'" [--gin.NAME=VALUE ...]
#
# Process i gets the environment
#   JAX_PLATFORMS=cpu  XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES/N
#   SPECTRON_COORDINATOR_ADDRESS=127.0.0.1:PORT  SPECTRON_NUM_PROCESSES=N  SPECTRON_PROCESS_ID=i
# which spectron_jax.train reads (DistributedConfig) to call jax.distributed.initialize.
# Each process writes LOG_DIR/process_i.log; process 0's output is also shown here.
#
# Stopping. Every process runs in a process group of its own. When a process fails, or when the
# launcher gets SIGTERM, SIGINT (Ctrl-C) or SIGHUP, the launcher sends SIGTERM to every process still
# running (training stops at an agreed step, saves a checkpoint and exits 0), waits up to
# --grace_seconds, then sends SIGKILL to the process groups still alive (a process hung in a
# collective, or one whose peer died, never ends on its own). A second signal to the launcher skips
# the rest of the grace period. The launcher always waits for its processes, and kills whatever a
# process leaves behind in its group once the process has ended. (Nothing stops them if the launcher
# itself is killed with SIGKILL: end them with kill -- -PID, PIDs as printed at the start.)
#
# Exit code: the first failure's (128+N for a process ended by signal N, e.g. 137 after SIGKILL),
# else 0 -- also after a SIGTERM of the launcher that every process answered by saving and exiting 0.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
# shellcheck source=SCRIPTDIR/common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/local.sh [FLAGS] --gin_file=FILE [--gin.NAME=VALUE ...] [-- EXTRA TRAIN ARGS]

  --num_processes=N   NUM_PROCESSES  processes to start (default 2)
  --devices=D         CPU_DEVICES    simulated CPU devices in all, split evenly (default 8)
  --port=P            PORT           coordinator port on 127.0.0.1 (default: a free port)
  --python=PY         PYTHON         interpreter (default: the repository's .venv, else python3)
  --log_dir=DIR       LOG_DIR        per-process logs (default: MODEL_DIR/local_logs, else ./local_logs)
  --grace_seconds=S   GRACE_SECONDS  after SIGTERM to the processes (a process failed, or the launcher
                                     got SIGTERM/SIGINT/SIGHUP), seconds to wait for them to save and
                                     exit before SIGKILL of their process groups (default 300)
  --dry_run           DRY_RUN=1      print each process's command and run nothing
  -h, --help
USAGE
}

NUM_PROCESSES=${NUM_PROCESSES:-2}
CPU_DEVICES=${CPU_DEVICES:-8}
PORT=${PORT:-}
PYTHON=${PYTHON:-}
LOG_DIR=${LOG_DIR:-}
GRACE_SECONDS=${GRACE_SECONDS:-300}
DRY_RUN=${DRY_RUN:-0}
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  arg=$1
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --dry_run=*) DRY_RUN=$(as_bool "$(flag_value "$arg")" --dry_run) ;;
    --num_processes=*) NUM_PROCESSES=$(flag_value "$arg") ;;
    --devices=*) CPU_DEVICES=$(flag_value "$arg") ;;
    --port=*) PORT=$(flag_value "$arg") ;;
    --python=*) PYTHON=$(flag_value "$arg") ;;
    --log_dir=*) LOG_DIR=$(flag_value "$arg") ;;
    --grace_seconds=*) GRACE_SECONDS=$(flag_value "$arg") ;;
    --gin_file|--gin_search_paths)
      [[ $# -ge 2 ]] || die 2 "$arg: missing value"
      TRAIN_ARGS+=("$arg=$2"); shift ;;
    --gin_file=*|--gin_search_paths=*|--gin.*) TRAIN_ARGS+=("$arg") ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) die 2 "unknown argument $arg (see launch/local.sh --help)" ;;
  esac
  shift
done

[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die 2 "--num_processes=$NUM_PROCESSES: expected a positive integer"
[[ $CPU_DEVICES =~ ^[1-9][0-9]*$ ]] || die 2 "--devices=$CPU_DEVICES: expected a positive integer"
(( CPU_DEVICES % NUM_PROCESSES == 0 )) || die 2 "--devices=$CPU_DEVICES does not split evenly over --num_processes=$NUM_PROCESSES"
[[ $GRACE_SECONDS =~ ^[0-9]+$ ]] || die 2 "--grace_seconds=$GRACE_SECONDS: expected a whole number of seconds"
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die 2 "give at least one --gin_file=... (e.g. --gin_file=runs/tiny_cpu.gin)"
if [[ -z $PYTHON ]]; then
  if [[ -x $REPO_ROOT/.venv/bin/python ]]; then PYTHON=$REPO_ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z $PORT ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
    || die 1 "cannot pick a free port with $PYTHON; pass --port=PORT"
fi
if ! [[ $PORT =~ ^[0-9]+$ ]] || (( PORT < 1 || PORT > 65535 )); then
  die 2 "--port=$PORT: expected a TCP port number"
fi

if [[ -z $LOG_DIR ]]; then
  LOG_DIR=./local_logs
  for arg in "${TRAIN_ARGS[@]}"; do
    if [[ $arg == --gin.MODEL_DIR=* ]]; then
      dir=${arg#--gin.MODEL_DIR=}
      if [[ ${#dir} -ge 2 && ( $dir == \'*\' || $dir == \"*\" ) ]]; then dir=${dir:1:${#dir}-2}; fi
      [[ $dir == *://* ]] || LOG_DIR="$dir/local_logs"
    fi
  done
fi

# XLA_FLAGS of the caller, minus any device count, plus this process's share of the devices.
PER_PROCESS=$(( CPU_DEVICES / NUM_PROCESSES ))
BASE_XLA_FLAGS=""
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || BASE_XLA_FLAGS+="${BASE_XLA_FLAGS:+ }$flag"
done
PROCESS_XLA_FLAGS="${BASE_XLA_FLAGS:+$BASE_XLA_FLAGS }--xla_force_host_platform_device_count=$PER_PROCESS"

process_command() {  # the argv of process $1
  PROCESS_COMMAND=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$PROCESS_XLA_FLAGS"
    "SPECTRON_COORDINATOR_ADDRESS=127.0.0.1:$PORT" "SPECTRON_NUM_PROCESSES=$NUM_PROCESSES"
    "SPECTRON_PROCESS_ID=$1" "$PYTHON" -m spectron_jax.train "${TRAIN_ARGS[@]}")
}

echo "$NUM_PROCESSES processes x $PER_PROCESS CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR, grace period ${GRACE_SECONDS}s"
if [[ $DRY_RUN == 1 ]]; then
  for (( i = 0; i < NUM_PROCESSES; i++ )); do
    process_command "$i"
    printf '+ %s > %s 2>&1\n' "$(quote_command "${PROCESS_COMMAND[@]}")" "$(shq "$LOG_DIR/process_$i.log")"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
cd "$REPO_ROOT"
exec 3>&2  # the launcher's own messages (bash's own reports of jobs ended by a signal are silenced)
note() { printf '%s\n' "$*" >&3; }

PIDS=()         # process i's pid, which is also its process group id
RUNNING=()      # indices of the processes not yet ended
TAIL_PID=""
SIGNALS=0       # SIGTERM/SIGINT/SIGHUP received so far, the last one's name
SIGNAL_NAME=""
STOPPING=0
DEADLINE=0      # in $SECONDS: when the process groups still alive get SIGKILL
KILLED=0
KILLED_GROUPS=()  # KILLED_GROUPS[i]=1: process i's group got SIGKILL at the end of the grace period
RC=0
trap '[[ -n $TAIL_PID ]] && kill "$TAIL_PID" 2>/dev/null; true' EXIT
trap 'SIGNALS=$((SIGNALS + 1)); SIGNAL_NAME=INT' INT
trap 'SIGNALS=$((SIGNALS + 1)); SIGNAL_NAME=TERM' TERM
trap 'SIGNALS=$((SIGNALS + 1)); SIGNAL_NAME=HUP' HUP

# With job control on, each background job starts in a process group of its own: a terminal's
# Ctrl-C reaches only the launcher (which forwards it), and SIGKILL of a group reaches every
# process a worker started.
set -m
for (( i = 0; i < NUM_PROCESSES; i++ )); do
  process_command "$i"
  "${PROCESS_COMMAND[@]}" > "$LOG_DIR/process_$i.log" 2>&1 < /dev/null &
  PIDS+=($!)
  RUNNING+=("$i")
done
tail -n +1 -F "$LOG_DIR/process_0.log" 2>/dev/null < /dev/null &
TAIL_PID=$!
set +m
echo "process ids (each also its process group's): ${PIDS[*]}"

begin_stop() {  # begin_stop WHY: SIGTERM to every process still running, SIGKILL at DEADLINE
  local i
  (( STOPPING == 0 )) || return 0
  STOPPING=1
  DEADLINE=$(( SECONDS + GRACE_SECONDS + 1 ))  # $SECONDS counts whole seconds: at least the grace period
  note "$1: sending SIGTERM to the processes still running (SIGKILL after ${GRACE_SECONDS}s; logs in $LOG_DIR)"
  for i in "${RUNNING[@]}"; do kill -TERM "${PIDS[i]}" 2>/dev/null || true; done
}

supervise() {  # waits until every process has ended; sets RC
  local i status still failed handled=0
  while (( ${#RUNNING[@]} > 0 )); do
    still=()
    failed=""
    for i in "${RUNNING[@]}"; do
      if kill -0 "${PIDS[i]}" 2>/dev/null; then still+=("$i"); continue; fi
      status=0
      wait "${PIDS[i]}" || status=$?
      if (( STOPPING )); then
        note "process $i exited with code $status"
      elif (( status != 0 )); then
        note "error: process $i exited with code $status"
      fi
      if (( status != 0 )); then
        (( RC != 0 )) || RC=$status
        failed=${failed:-$i}
      fi
    done
    RUNNING=("${still[@]}")
    (( ${#RUNNING[@]} > 0 )) || break
    [[ -z $failed ]] || begin_stop "process $failed failed"
    if (( SIGNALS > handled )); then
      handled=$SIGNALS
      if (( STOPPING == 0 )); then
        begin_stop "received SIG$SIGNAL_NAME"
      elif (( KILLED == 0 )); then
        note "received SIG$SIGNAL_NAME again: not waiting for the rest of the grace period"
        DEADLINE=$SECONDS
      fi
    fi
    if (( STOPPING && !KILLED && SECONDS >= DEADLINE )); then
      KILLED=1
      note "still running: process(es) ${RUNNING[*]}; sending SIGKILL to their process groups"
      for i in "${RUNNING[@]}"; do kill -KILL -- "-${PIDS[i]}" 2>/dev/null || true; KILLED_GROUPS[i]=1; done
    fi
    sleep 0.5 || true  # a signal to the launcher's process group (Ctrl-C) also ends this sleep
  done
  # Whatever a process left behind in its group has outlived it.
  for i in "${!PIDS[@]}"; do
    if kill -KILL -- "-${PIDS[i]}" 2>/dev/null && [[ -z ${KILLED_GROUPS[i]:-} ]]; then
      note "killed what process $i left running"
    fi
  done
}

supervise 2>/dev/null
sleep 0.5 || true  # then the EXIT trap stops the tail of process 0's log
exit "$RC"
