#!/usr/bin/env bash
# Cloud TPU VM launcher for spectron_jax: create a TPU VM (or a queued resource), install the project
# on every worker, start `python -m spectron_jax.train` on all workers at once, watch and stop it.
#
#   launch/tpu_vm.sh [SETTINGS] COMMAND [ARGS]        (run with --help for everything)
#
# A run on a pod is one process per TPU host; each calls jax.distributed.initialize() with no
# arguments (Cloud TPU VMs tell JAX the coordinator, the process count and this host's index), which
# the launcher asks for with the gin bindings
#   --gin.TrainConfig.distributed="@DistributedConfig()" --gin.DistributedConfig.auto=True
# (set --distributed_auto=false to leave them out). Workers share no disk, so MODEL_DIR must be on GCS.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
# shellcheck source=SCRIPTDIR/common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/tpu_vm.sh [SETTINGS] COMMAND [COMMAND ARGS] [-- EXTRA TRAIN ARGS]

Commands:
  create   create the TPU VM (or queued resource) unless it exists; waits until it is ready
  setup    copy the repository (or git-clone REPO_URL) to every worker, create .venv,
           pip install -e ".[tpu]"
  train    start `python -m spectron_jax.train` on every worker (nohup; survives ssh drops).
           Takes --gin_file=..., --gin.NAME=VALUE, --gin_search_paths=... (passed through as given)
           and everything after `--`. Each worker's output goes to a log that is copied to
           LOG_DIR on GCS every UPLOAD_EVERY seconds and when the run ends.
  status   state of the TPU (and queued resource) and of the run on every worker
  logs     last lines of a worker's log (--worker=K, --lines=N, --follow, or --from_gcs)
  stop     send SIGTERM to the run on every worker (it saves a checkpoint and exits 0), wait up to
           GRACE_SECONDS for it to end, then SIGKILL its process group (a worker hung in a
           collective, or one whose peer is gone, never ends on its own)
  delete   delete the TPU VM (or the queued resource and its TPU)

Settings (flag or environment variable; flags win):
  --project=P          PROJECT           GCP project (default: gcloud's configured project)
  --zone=Z             ZONE              zone of the TPU (required)
  --tpu_name=N         TPU_NAME          TPU VM name (required)
  --accelerator_type=T ACCELERATOR_TYPE  e.g. v5litepod-16, v4-64, v5p-128, v6e-16 (default v5litepod-16)
  --runtime_version=V  RUNTIME_VERSION   TPU software version (default: chosen from the accelerator type)
  --queued             QUEUED=1          create through a queued resource (QR_ID, default TPU_NAME-qr)
  --spot | --reserved  CAPACITY          spot | reserved | on-demand (default on-demand)
  --bucket=gs://B/P    BUCKET            GCS prefix: MODEL_DIR defaults to BUCKET/runs/RUN_NAME,
                                         logs to BUCKET/logs/RUN_NAME
  --run_name=R         RUN_NAME          name of the run (default run-YYYYmmdd-HHMMSS, UTC)
  --model_dir=gs://... MODEL_DIR         instead of BUCKET/runs/RUN_NAME (or pass --gin.MODEL_DIR)
  --log_dir=gs://...   LOG_DIR           where worker logs are uploaded
  --repo_url=URL       REPO_URL          setup: git clone this instead of copying the local checkout
  --repo_ref=REF       REPO_REF          setup: branch, tag or commit to check out (default: default branch)
  --extras=E           PIP_EXTRAS        setup: pip extras (default tpu)
  --python=PY          REMOTE_PYTHON     setup: interpreter on the workers (default: first of
                                         python3.12, python3.11, python3 that is >= 3.11; else
                                         python3.11 is installed with apt)
  --remote_dir=D       REMOTE_DIR        checkout folder on the workers, relative to home (default spectron_jax)
  --distributed_auto=B DISTRIBUTED_AUTO  add the jax.distributed auto-initialisation bindings (default true)
  --upload_every=S     UPLOAD_EVERY      seconds between log uploads (default 300)
  --grace_seconds=S    GRACE_SECONDS     stop: seconds between SIGTERM and SIGKILL (default 300)
  --wait               WAIT=1            train: block until the run ends; exit with its exit code
  --worker=K           WORKER            logs: which worker (default 0)
  --ssh_flag=F         SSH_FLAGS         extra flag for every gcloud ssh/scp (repeatable), e.g.
                                         --ssh_flag=--tunnel-through-iap
  --dry_run            DRY_RUN=1         print every gcloud command instead of running it
  -h, --help

Example:
  export PROJECT=my-project ZONE=us-west4-a TPU_NAME=spectron-v5e BUCKET=gs://my-bucket/spectron
  launch/tpu_vm.sh --accelerator_type=v5litepod-16 --queued --spot create
  launch/tpu_vm.sh setup
  launch/tpu_vm.sh train --run_name=350m-paper --gin_file=runs/spectron_350m_librilight.gin \
      --gin.TRAIN_STEPS=100000
  launch/tpu_vm.sh logs --follow; launch/tpu_vm.sh stop; launch/tpu_vm.sh delete
USAGE
}

# ---- settings -------------------------------------------------------------------------------------
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
QUEUED=${QUEUED:-0}
QR_ID=${QR_ID:-}
CAPACITY=${CAPACITY:-on-demand}
BUCKET=${BUCKET:-}
RUN_NAME=${RUN_NAME:-}
MODEL_DIR=${MODEL_DIR:-}
LOG_DIR=${LOG_DIR:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
PIP_EXTRAS=${PIP_EXTRAS:-tpu}
REMOTE_PYTHON=${REMOTE_PYTHON:-}
REMOTE_DIR=${REMOTE_DIR:-spectron_jax}
DISTRIBUTED_AUTO=${DISTRIBUTED_AUTO:-1}
UPLOAD_EVERY=${UPLOAD_EVERY:-300}
GRACE_SECONDS=${GRACE_SECONDS:-300}
WAIT=${WAIT:-0}
WORKER=${WORKER:-0}
LINES=${LINES_TO_SHOW:-100}
FOLLOW=0
FROM_GCS=0
DRY_RUN=${DRY_RUN:-0}
read -r -a SSH_EXTRA <<<"${SSH_FLAGS:-}"

COMMAND=""
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  arg=$1
  case "$arg" in
    -h|--help|help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --dry_run=*) DRY_RUN=$(as_bool "$(flag_value "$arg")" --dry_run) ;;
    --project=*) PROJECT=$(flag_value "$arg") ;;
    --zone=*) ZONE=$(flag_value "$arg") ;;
    --tpu_name=*) TPU_NAME=$(flag_value "$arg") ;;
    --accelerator_type=*) ACCELERATOR_TYPE=$(flag_value "$arg") ;;
    --runtime_version=*) RUNTIME_VERSION=$(flag_value "$arg") ;;
    --queued) QUEUED=1 ;;
    --queued=*) QUEUED=$(as_bool "$(flag_value "$arg")" --queued) ;;
    --qr_id=*) QR_ID=$(flag_value "$arg") ;;
    --spot) CAPACITY=spot ;;
    --reserved) CAPACITY=reserved ;;
    --capacity=*) CAPACITY=$(flag_value "$arg") ;;
    --bucket=*) BUCKET=$(flag_value "$arg") ;;
    --run_name=*) RUN_NAME=$(flag_value "$arg") ;;
    --model_dir=*) MODEL_DIR=$(flag_value "$arg") ;;
    --log_dir=*) LOG_DIR=$(flag_value "$arg") ;;
    --repo_url=*) REPO_URL=$(flag_value "$arg") ;;
    --repo_ref=*) REPO_REF=$(flag_value "$arg") ;;
    --extras=*) PIP_EXTRAS=$(flag_value "$arg") ;;
    --python=*) REMOTE_PYTHON=$(flag_value "$arg") ;;
    --remote_dir=*) REMOTE_DIR=$(flag_value "$arg") ;;
    --distributed_auto=*) DISTRIBUTED_AUTO=$(as_bool "$(flag_value "$arg")" --distributed_auto) ;;
    --upload_every=*) UPLOAD_EVERY=$(flag_value "$arg") ;;
    --grace_seconds=*) GRACE_SECONDS=$(flag_value "$arg") ;;
    --wait) WAIT=1 ;;
    --worker=*) WORKER=$(flag_value "$arg") ;;
    --lines=*) LINES=$(flag_value "$arg") ;;
    --follow) FOLLOW=1 ;;
    --from_gcs) FROM_GCS=1 ;;
    --ssh_flag=*) SSH_EXTRA+=("$(flag_value "$arg")") ;;
    --gin_file|--gin_search_paths)
      [[ $# -ge 2 ]] || die 2 "$arg: missing value"
      TRAIN_ARGS+=("$arg=$2"); shift ;;
    --gin_file=*|--gin_search_paths=*|--gin.*) TRAIN_ARGS+=("$arg") ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    -*) die 2 "unknown flag $arg (see launch/tpu_vm.sh --help)" ;;
    *)
      [[ -z $COMMAND ]] || die 2 "unexpected argument '$arg' after command $COMMAND"
      COMMAND=$arg ;;
  esac
  shift
done
export DRY_RUN

[[ -n $COMMAND ]] || { usage >&2; die 2 "no command given (create, setup, train, status, logs, stop, delete)"; }
case "$COMMAND" in
  create|setup|train|status|logs|stop|delete) ;;
  *) die 2 "unknown command '$COMMAND' (create, setup, train, status, logs, stop, delete)" ;;
esac
if [[ ${#TRAIN_ARGS[@]} -gt 0 && $COMMAND != train ]]; then
  die 2 "${TRAIN_ARGS[0]}: training arguments are only accepted by the train command"
fi
[[ -n $TPU_NAME ]] || die 2 "TPU name not set (--tpu_name=NAME or TPU_NAME=NAME)"
[[ -n $ZONE ]] || die 2 "zone not set (--zone=ZONE or ZONE=ZONE)"
[[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die 2 "--tpu_name=$TPU_NAME: use lower-case letters, digits and '-'"
[[ $WORKER =~ ^[0-9]+$ ]] || die 2 "--worker=$WORKER: expected a worker index"
[[ $LINES =~ ^[0-9]+$ ]] || die 2 "--lines=$LINES: expected a number"
[[ $UPLOAD_EVERY =~ ^[1-9][0-9]*$ ]] || die 2 "--upload_every=$UPLOAD_EVERY: expected a positive number of seconds"
[[ $GRACE_SECONDS =~ ^[0-9]+$ ]] || die 2 "--grace_seconds=$GRACE_SECONDS: expected a whole number of seconds"
[[ $REMOTE_DIR =~ ^[A-Za-z0-9._/-]+$ && $REMOTE_DIR != /* ]] || die 2 "--remote_dir=$REMOTE_DIR: expected a folder relative to the workers' home"
case "$CAPACITY" in on-demand|spot|reserved) ;; *) die 2 "--capacity=$CAPACITY: expected on-demand, spot or reserved" ;; esac
QR_ID=${QR_ID:-$TPU_NAME-qr}
if [[ -n $BUCKET ]]; then
  BUCKET=${BUCKET%/}
  [[ $BUCKET == gs://* ]] || BUCKET="gs://$BUCKET"
fi

LOCATION=(--zone="$ZONE")
[[ -n $PROJECT ]] && LOCATION+=(--project="$PROJECT")

default_runtime_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die 2 "no default runtime version for --accelerator_type=$1; set --runtime_version" ;;
  esac
}

tpu_ssh() {  # tpu_ssh WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" "${SSH_EXTRA[@]}" --command="$2"
}

# A command line that writes SCRIPT (base64, so no quoting survives two shells) to PATH on a worker.
remote_script_command() {  # remote_script_command PATH SCRIPT
  local encoded
  encoded=$(printf '%s' "$2" | base64 | tr -d '\n')
  printf 'mkdir -p %s && echo %s | base64 -d > %s' "$(dirname "$1")" "$encoded" "$1"
}

# ---- create ---------------------------------------------------------------------------------------
tpu_exists() {
  [[ $DRY_RUN == 1 ]] && { run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" --format="value(state)"; return 1; }
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" --format="value(state)" >/dev/null 2>&1
}

queued_state() {
  gcloud compute tpus queued-resources describe "$QR_ID" "${LOCATION[@]}" --format="value(state.state)" 2>/dev/null || true
}

cmd_create() {
  need_command gcloud "install the Google Cloud CLI"
  local version=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
  if tpu_exists; then
    echo "TPU $TPU_NAME exists in $ZONE: reusing it"
    return 0
  fi
  local capacity=()
  [[ $CAPACITY == spot ]] && capacity=(--spot)
  [[ $CAPACITY == reserved ]] && capacity=(--reserved)
  if [[ $QUEUED == 1 ]]; then
    local state=""
    [[ $DRY_RUN == 1 ]] || state=$(queued_state)
    if [[ -n $state ]]; then
      echo "queued resource $QR_ID exists (state $state): waiting for it"
    else
      run gcloud compute tpus queued-resources create "$QR_ID" --node-id="$TPU_NAME" "${LOCATION[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" "${capacity[@]}"
    fi
    if [[ $DRY_RUN == 1 ]]; then
      run gcloud compute tpus queued-resources describe "$QR_ID" "${LOCATION[@]}" --format="value(state.state)"
      echo "# (repeated every 30 s until the state is ACTIVE)"
      return 0
    fi
    while true; do
      state=$(queued_state)
      case "$state" in
        ACTIVE) echo "queued resource $QR_ID is ACTIVE"; break ;;
        FAILED|SUSPENDED) die 1 "queued resource $QR_ID is $state (gcloud compute tpus queued-resources describe $QR_ID --zone=$ZONE)" ;;
        *) echo "queued resource $QR_ID: ${state:-not visible yet}; waiting"; sleep 30 ;;
      esac
    done
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$version" "${capacity[@]}"
  fi
}

# ---- setup ----------------------------------------------------------------------------------------
setup_script() {
  cat <<EOF
#!/usr/bin/env bash
# Installs spectron_jax on this TPU worker (written by launch/tpu_vm.sh setup).
set -euo pipefail
cd "\$HOME"
REMOTE_DIR=$(shq "$REMOTE_DIR")
REPO_URL=$(shq "$REPO_URL")
REPO_REF=$(shq "$REPO_REF")
PY=$(shq "$REMOTE_PYTHON")
if [[ -z \$PY ]]; then
  for candidate in python3.12 python3.11 python3; do
    if command -v "\$candidate" >/dev/null && "\$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=\$candidate; break
    fi
  done
fi
if [[ -z \$PY ]]; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
  PY=python3.11
fi
if [[ -n \$REPO_URL ]]; then
  if [[ -d \$REMOTE_DIR/.git ]]; then
    git -C "\$REMOTE_DIR" fetch --quiet --all --tags
  else
    git clone --quiet "\$REPO_URL" "\$REMOTE_DIR"
  fi
  if [[ -n \$REPO_REF ]]; then
    git -C "\$REMOTE_DIR" checkout --quiet "\$REPO_REF"
    git -C "\$REMOTE_DIR" pull --quiet --ff-only 2>/dev/null || true  # a branch: bring it up to date
  fi
else
  mkdir -p "\$REMOTE_DIR"
  tar -xzf spectron_jax_checkout.tar.gz -C "\$REMOTE_DIR"
fi
cd "\$REMOTE_DIR"
[[ -x .venv/bin/python ]] || "\$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$PIP_EXTRAS]"
.venv/bin/python -c 'import jax, spectron_jax; print("worker", "\$(hostname)", "ready: jax", jax.__version__)'
EOF
}

cmd_setup() {
  need_command gcloud "install the Google Cloud CLI"
  [[ $PIP_EXTRAS =~ ^[A-Za-z0-9_,-]*$ ]] || die 2 "--extras=$PIP_EXTRAS: expected comma-separated extra names"
  if [[ -z $REPO_URL ]]; then
    local archive
    archive="${TMPDIR:-/tmp}/spectron_jax_checkout.$$.tar.gz"
    if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      # Tracked and untracked-but-not-ignored files: no .venv, no build outputs, no .git.
      if [[ $DRY_RUN == 1 ]]; then
        echo "# archive the checkout: git ls-files -co --exclude-standard | tar -czf $archive -T -"
      else
        (cd "$REPO_ROOT" && git ls-files -co --exclude-standard -z | tar --null -czf "$archive" -T -)
      fi
    else
      if [[ $DRY_RUN == 1 ]]; then
        echo "# archive the checkout: tar -czf $archive --exclude=.venv --exclude=.git ."
      else
        tar -czf "$archive" -C "$REPO_ROOT" --exclude=.venv --exclude=.git --exclude=__pycache__ .
      fi
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:spectron_jax_checkout.tar.gz" "${LOCATION[@]}" \
      --worker=all "${SSH_EXTRA[@]}"
    [[ $DRY_RUN == 1 ]] || rm -f "$archive"
  fi
  local script
  script=$(setup_script)
  if [[ $DRY_RUN == 1 ]]; then
    echo "# setup script run on every worker:"
    printf '%s\n' "$script" | sed 's/^/#   /'
  fi
  tpu_ssh all "$(remote_script_command .spectron_runs/setup.sh "$script") && bash .spectron_runs/setup.sh"
}

# ---- train ----------------------------------------------------------------------------------------
# Strips one pair of matching quotes (gin string syntax) from a --gin.MODEL_DIR value.
unquote() {
  local v=$1
  if [[ ${#v} -ge 2 && ( ( $v == \'*\' ) || ( $v == \"*\" ) ) ]]; then v=${v:1:${#v}-2}; fi
  printf '%s' "$v"
}

run_script() {  # run_script MODEL_DIR LOG_DIR ARGS...
  local model_dir=$1 log_dir=$2
  shift 2
  local line="python -m spectron_jax.train" arg
  for arg in "$@"; do
    line+=" \\"$'\n'"    $(shq "$arg")"
  done
  cat <<EOF
#!/usr/bin/env bash
# spectron_jax run $RUN_NAME on TPU $TPU_NAME (written by launch/tpu_vm.sh train; runs on every worker).
# MODEL_DIR: $model_dir
set -uo pipefail
RUN_DIR="\$HOME/.spectron_runs/$RUN_NAME"
mkdir -p "\$RUN_DIR"
echo $(shq "$RUN_NAME") > "\$HOME/.spectron_runs/latest"
WORKER_ID=\$(curl -sf -H 'Metadata-Flavor: Google' \\
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)
LOG="\$RUN_DIR/worker-\$WORKER_ID.log"
LOG_URL=$(shq "$log_dir")/worker-\$WORKER_ID.log
upload() { gcloud storage cp --quiet "\$LOG" "\$LOG_URL" >/dev/null 2>&1 || echo "log upload to \$LOG_URL failed" >&2; }
cd "\$HOME"/$(shq "$REMOTE_DIR")
export PATH="\$PWD/.venv/bin:\$PATH"
export PYTHONUNBUFFERED=1
rm -f "\$RUN_DIR/exit_code"
set -m  # job control: training runs in a process group of its own (its id is PID), which stop can kill
$line \\
    > >(tee "\$LOG") 2>&1 &
PID=\$!
set +m
echo "\$PID" > "\$RUN_DIR/train.pid"
( while kill -0 "\$PID" 2>/dev/null; do sleep $UPLOAD_EVERY; upload; done ) &
UPLOADER=\$!
wait "\$PID"
RC=\$?
kill "\$UPLOADER" 2>/dev/null
sleep 1  # let tee flush
echo "spectron_jax.train exited with code \$RC" >> "\$LOG"
upload
echo "\$RC" > "\$RUN_DIR/exit_code"
exit "\$RC"
EOF
}

cmd_train() {
  need_command gcloud "install the Google Cloud CLI"
  [[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die 2 "train: give at least one --gin_file=... (e.g. --gin_file=runs/spectron_350m_librilight.gin)"
  RUN_NAME=${RUN_NAME:-run-$(date -u +%Y%m%d-%H%M%S)}
  [[ $RUN_NAME =~ ^[A-Za-z0-9._=+-]+$ ]] || die 2 "--run_name=$RUN_NAME: use letters, digits and . _ = + -"

  local gin_model_dir="" arg args=()
  for arg in "${TRAIN_ARGS[@]}"; do
    if [[ $arg == --gin.MODEL_DIR=* ]]; then
      gin_model_dir=$(unquote "${arg#--gin.MODEL_DIR=}")
    fi
  done
  if [[ -n $gin_model_dir ]]; then
    [[ -z $MODEL_DIR || $MODEL_DIR == "$gin_model_dir" ]] || die 2 "--model_dir=$MODEL_DIR and --gin.MODEL_DIR=$gin_model_dir disagree; give one"
    MODEL_DIR=$gin_model_dir
  elif [[ -z $MODEL_DIR ]]; then
    [[ -n $BUCKET ]] || die 2 "no MODEL_DIR: set --bucket=gs://BUCKET/PREFIX, --model_dir=gs://... or --gin.MODEL_DIR=\"'gs://...'\""
    MODEL_DIR="$BUCKET/runs/$RUN_NAME"
  fi
  [[ $MODEL_DIR == gs://* ]] || die 2 "MODEL_DIR=$MODEL_DIR: a pod run needs a gs:// path (the workers share no disk)"
  [[ $MODEL_DIR != *[\'\"\\]* ]] || die 2 "MODEL_DIR=$MODEL_DIR: quotes and backslashes are not allowed in the path"
  if [[ -z $LOG_DIR ]]; then
    if [[ -n $BUCKET ]]; then LOG_DIR="$BUCKET/logs/$RUN_NAME"; else LOG_DIR="${MODEL_DIR%/}/logs"; fi
  fi
  [[ $LOG_DIR == gs://* ]] || die 2 "--log_dir=$LOG_DIR: expected a gs:// path"

  if [[ $DISTRIBUTED_AUTO == 1 ]]; then
    args+=(--gin.TrainConfig.distributed="@DistributedConfig()" --gin.DistributedConfig.auto=True)
  fi
  args+=("${TRAIN_ARGS[@]}")
  [[ -n $gin_model_dir ]] || args+=(--gin.MODEL_DIR="'$MODEL_DIR'")

  local script path=".spectron_runs/$RUN_NAME/run.sh"
  script=$(run_script "$MODEL_DIR" "$LOG_DIR" "${args[@]}")
  echo "run $RUN_NAME on $TPU_NAME ($ZONE): MODEL_DIR=$MODEL_DIR, logs in $LOG_DIR"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# run script started on every worker:"
    printf '%s\n' "$script" | sed 's/^/#   /'
  fi
  # Only the nohup is backgrounded (in braces): a backgrounded `a && b &` list would hold the ssh
  # session's output open, and ssh would wait for the whole run.
  tpu_ssh all "$(remote_script_command "$path" "$script") && { nohup bash $path > .spectron_runs/$RUN_NAME/nohup.out 2>&1 < /dev/null & }"

  if [[ $WAIT == 1 ]]; then
    local probe="cat .spectron_runs/$RUN_NAME/exit_code 2>/dev/null || echo running"
    if [[ $DRY_RUN == 1 ]]; then
      tpu_ssh 0 "$probe"
      echo "# (repeated every 60 s until worker 0 reports an exit code)"
      return 0
    fi
    local status misses=0
    while true; do
      sleep 60
      status=$(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=0 "${SSH_EXTRA[@]}" \
        --command="$probe" 2>/dev/null | tail -n 1 || echo unreachable)
      if [[ $status =~ ^[0-9]+$ ]]; then
        echo "run $RUN_NAME finished with exit code $status"
        return "$status"
      elif [[ $status == running ]]; then
        misses=0
      elif (( ++misses >= 15 )); then
        die 1 "worker 0 of $TPU_NAME unreachable for 15 minutes (preempted?); the run's checkpoints are in $MODEL_DIR"
      fi
    done
  fi
}

# ---- status, logs, stop, delete -------------------------------------------------------------------
remote_run_name() {  # the run named by --run_name, else the worker's latest run
  # shellcheck disable=SC2016  # expanded on the worker, not here
  if [[ -n $RUN_NAME ]]; then printf '%s' "$(shq "$RUN_NAME")"; else printf '%s' '"$(cat .spectron_runs/latest 2>/dev/null)"'; fi
}

cmd_status() {
  need_command gcloud "install the Google Cloud CLI"
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$QR_ID" "${LOCATION[@]}" --format="value(state.state)"
  fi
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" --format="table(name.basename(),state,acceleratorType,health)"
  tpu_ssh all "R=$(remote_run_name); P=.spectron_runs/\$R/train.pid; if [ -z \"\$R\" ]; then echo \"\$(hostname): no run\"; elif [ -f .spectron_runs/\$R/exit_code ]; then echo \"\$(hostname): \$R exited with \$(cat .spectron_runs/\$R/exit_code)\"; elif [ -f \$P ] && kill -0 \$(cat \$P) 2>/dev/null; then echo \"\$(hostname): \$R running\"; else echo \"\$(hostname): \$R not running\"; fi"
}

cmd_logs() {
  need_command gcloud "install the Google Cloud CLI"
  if [[ $FROM_GCS == 1 ]]; then
    [[ -n $RUN_NAME ]] || die 2 "logs --from_gcs needs --run_name"
    local log_dir=${LOG_DIR:-}
    if [[ -z $log_dir ]]; then
      [[ -n $BUCKET ]] || die 2 "logs --from_gcs needs --bucket or --log_dir"
      log_dir="$BUCKET/logs/$RUN_NAME"
    fi
    run gcloud storage cat "$log_dir/worker-$WORKER.log"
    return
  fi
  local tail_flags="-n $LINES"
  [[ $FOLLOW == 1 ]] && tail_flags+=" -F"
  tpu_ssh "$WORKER" "tail $tail_flags .spectron_runs/$(remote_run_name)/worker-*.log"
}

stop_script() {
  cat <<EOF
#!/usr/bin/env bash
# Stops the spectron_jax run on this TPU worker (written by launch/tpu_vm.sh stop): SIGTERM (training
# stops at a step agreed by all workers, saves a checkpoint and exits 0), up to GRACE seconds for it
# to end, then SIGKILL of its process group.
set -uo pipefail
cd "\$HOME"
RUN=$(shq "$RUN_NAME")
GRACE=$GRACE_SECONDS
[[ -n \$RUN ]] || RUN=\$(cat .spectron_runs/latest 2>/dev/null)
PID=\$(cat ".spectron_runs/\$RUN/train.pid" 2>/dev/null)
if [[ -z \$RUN || -z \$PID ]] || ! kill -0 "\$PID" 2>/dev/null; then
  echo "\$(hostname): no running run \$RUN"
  exit 0
fi
kill -TERM "\$PID"
echo "\$(hostname): SIGTERM sent to \$RUN; waiting up to \${GRACE}s"
waited=0
while kill -0 "\$PID" 2>/dev/null && (( waited < GRACE )); do sleep 1; waited=\$((waited + 1)); done
if kill -0 "\$PID" 2>/dev/null; then
  # (a run started by an older launcher has no process group of its own: then the process alone)
  kill -KILL -- "-\$PID" 2>/dev/null || kill -KILL "\$PID"
  echo "\$(hostname): \$RUN still running after \${GRACE}s: SIGKILL sent to its process group"
fi
for (( i = 0; i < 30; i++ )); do  # the run script writes the exit code after its last log upload
  [[ -f .spectron_runs/\$RUN/exit_code ]] && break
  sleep 1
done
echo "\$(hostname): \$RUN exited with code \$(cat ".spectron_runs/\$RUN/exit_code" 2>/dev/null || echo "unknown")"
EOF
}

cmd_stop() {
  need_command gcloud "install the Google Cloud CLI"
  local script
  script=$(stop_script)
  if [[ $DRY_RUN == 1 ]]; then
    echo "# stop script run on every worker:"
    printf '%s\n' "$script" | sed 's/^/#   /'
  fi
  tpu_ssh all "$(remote_script_command .spectron_runs/stop.sh "$script") && bash .spectron_runs/stop.sh"
}

cmd_delete() {
  need_command gcloud "install the Google Cloud CLI"
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$QR_ID" "${LOCATION[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
  fi
}

"cmd_$COMMAND"
