#!/usr/bin/env bash
# Runs one spectron_jax training job as N processes on this machine: a loopback coordinator and the
# CPU devices split evenly between the processes. It exercises the multi-host code paths
# (jax.distributed.initialize, per-host data shards, global arrays, multi-process checkpoints)
# without a pod.
#
#   launch/local.sh [--num_processes=2] [--devices=8] [--port=PORT] [--dry_run] \
#       --gin_file=runs/tiny_cpu.gin --gin.MODEL_DIR="'/tmp/spectron_2proc'" [--gin.NAME=VALUE ...]
#
# Process i gets the environment
#   JAX_PLATFORMS=cpu  XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES/N
#   SPECTRON_COORDINATOR_ADDRESS=127.0.0.1:PORT  SPECTRON_NUM_PROCESSES=N  SPECTRON_PROCESS_ID=i
# which spectron_jax.train reads (DistributedConfig) to call jax.distributed.initialize.
# Each process writes LOG_DIR/process_i.log; process 0's output is also shown here. When one process
# fails the others are stopped (they would wait forever in a collective); the exit code is the first
# failure's.
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
  --dry_run           DRY_RUN=1      print each process's command and run nothing
  -h, --help
USAGE
}

NUM_PROCESSES=${NUM_PROCESSES:-2}
CPU_DEVICES=${CPU_DEVICES:-8}
PORT=${PORT:-}
PYTHON=${PYTHON:-}
LOG_DIR=${LOG_DIR:-}
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

echo "$NUM_PROCESSES processes x $PER_PROCESS CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR"
if [[ $DRY_RUN == 1 ]]; then
  for (( i = 0; i < NUM_PROCESSES; i++ )); do
    process_command "$i"
    printf '+ %s > %s 2>&1\n' "$(quote_command "${PROCESS_COMMAND[@]}")" "$(shq "$LOG_DIR/process_$i.log")"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
cd "$REPO_ROOT"
PIDS=()
TAIL_PID=""
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap '[[ -n $TAIL_PID ]] && kill "$TAIL_PID" 2>/dev/null; true' EXIT
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for (( i = 0; i < NUM_PROCESSES; i++ )); do
  process_command "$i"
  "${PROCESS_COMMAND[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  PIDS+=($!)
done
tail -n +1 -F "$LOG_DIR/process_0.log" 2>/dev/null &
TAIL_PID=$!

RC=0
RUNNING=("${PIDS[@]}")
while (( ${#RUNNING[@]} > 0 )); do
  sleep 1
  still=()
  for pid in "${RUNNING[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    status=0
    wait "$pid" || status=$?
    if (( status != 0 && RC == 0 )); then
      RC=$status
      echo "error: a process exited with code $status; stopping the others (logs in $LOG_DIR)" >&2
      stop_all
    fi
  done
  RUNNING=("${still[@]}")
done
sleep 0.5  # the EXIT trap stops the tail of process 0's log
exit "$RC"
