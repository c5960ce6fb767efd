#!/usr/bin/env bash
# The spectron_jax training job as an XPK workload on a GKE cluster of TPU slices.
#
# XPK (pip install xpk) submits a JobSet: one container per TPU host, on NUM_SLICES slices of
# TPU_TYPE. Every container runs the same command; JAX reads the GKE TPU environment, so the
# training entry point only needs jax.distributed.initialize() without arguments, which the gin
# bindings --gin.TrainConfig.distributed="@DistributedConfig()" --gin.DistributedConfig.auto=True ask for.
#
# Several slices: the mesh gains a leading 'replica' axis over the data-center network
# (MeshConfig.dcn = (replica, data, fsdp, model) sizes across slices; (-1, 1, 1, 1) is pure data
# parallelism over slices, the usual choice), bound with
#   --gin.TrainConfig.mesh="@MeshConfig()" --gin.MeshConfig.dcn="(-1, 1, 1, 1)"
# while MeshConfig.ici keeps describing one slice. Change DCN_MESH to shard differently.
#
#   launch/xpk_example.sh [--dry_run] --cluster=C --tpu_type=v5litepod-256 --num_slices=2 \
#       --bucket=gs://B/spectron --workload=spectron-1b --gin_file=runs/spectron_1b_librilight.gin
#
# The image: by default XPK builds one from BASE_IMAGE plus this checkout (--script-dir), and the
# container installs the package before training (simple, but every start pays the install). For
# long runs, build an image with `pip install -e ".[tpu]"` done and pass --docker_image=IMAGE.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
# shellcheck source=SCRIPTDIR/common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/xpk_example.sh [SETTINGS] [create|delete|list] --gin_file=FILE [--gin.NAME=VALUE ...]

  create (default) submits the workload, delete removes it, list shows the cluster's workloads.

  --cluster=C          CLUSTER       GKE cluster made with `xpk cluster create` (required)
  --project=P          PROJECT       GCP project (default: gcloud's configured project)
  --zone=Z             ZONE          zone of the cluster (default: gcloud's configured zone)
  --tpu_type=T         TPU_TYPE      slice type, e.g. v5litepod-256, v5p-128 (default v5litepod-16)
  --num_slices=N       NUM_SLICES    slices (default 1); > 1 adds the 'replica' mesh axis
  --dcn_mesh=SHAPE     DCN_MESH      MeshConfig.dcn when NUM_SLICES > 1 (default "(-1, 1, 1, 1)")
  --workload=W         WORKLOAD      workload name (default spectron-YYYYmmdd-HHMMSS)
  --bucket=gs://B/P    BUCKET        MODEL_DIR defaults to BUCKET/runs/WORKLOAD
  --model_dir=gs://..  MODEL_DIR     instead of BUCKET/runs/WORKLOAD (or pass --gin.MODEL_DIR)
  --docker_image=I     DOCKER_IMAGE  a prebuilt image with the package installed
  --base_image=I       BASE_IMAGE    base for XPK's image build from this checkout (default python:3.11)
  --max_restarts=K     MAX_RESTARTS  JobSet restarts after a failure or preemption (default 3);
                                     training resumes from the newest checkpoint in MODEL_DIR
  --dry_run            DRY_RUN=1     print the xpk command instead of running it
USAGE
}

CLUSTER=${CLUSTER:-}
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_TYPE=${TPU_TYPE:-v5litepod-16}
NUM_SLICES=${NUM_SLICES:-1}
DCN_MESH=${DCN_MESH:-(-1, 1, 1, 1)}
WORKLOAD=${WORKLOAD:-}
BUCKET=${BUCKET:-}
MODEL_DIR=${MODEL_DIR:-}
DOCKER_IMAGE=${DOCKER_IMAGE:-}
BASE_IMAGE=${BASE_IMAGE:-python:3.11}
MAX_RESTARTS=${MAX_RESTARTS:-3}
DRY_RUN=${DRY_RUN:-0}
ACTION=""
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  arg=$1
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --dry_run=*) DRY_RUN=$(as_bool "$(flag_value "$arg")" --dry_run) ;;
    --cluster=*) CLUSTER=$(flag_value "$arg") ;;
    --project=*) PROJECT=$(flag_value "$arg") ;;
    --zone=*) ZONE=$(flag_value "$arg") ;;
    --tpu_type=*) TPU_TYPE=$(flag_value "$arg") ;;
    --num_slices=*) NUM_SLICES=$(flag_value "$arg") ;;
    --dcn_mesh=*) DCN_MESH=$(flag_value "$arg") ;;
    --workload=*) WORKLOAD=$(flag_value "$arg") ;;
    --bucket=*) BUCKET=$(flag_value "$arg") ;;
    --model_dir=*) MODEL_DIR=$(flag_value "$arg") ;;
    --docker_image=*) DOCKER_IMAGE=$(flag_value "$arg") ;;
    --base_image=*) BASE_IMAGE=$(flag_value "$arg") ;;
    --max_restarts=*) MAX_RESTARTS=$(flag_value "$arg") ;;
    --gin_file|--gin_search_paths)
      [[ $# -ge 2 ]] || die 2 "$arg: missing value"
      TRAIN_ARGS+=("$arg=$2"); shift ;;
    --gin_file=*|--gin_search_paths=*|--gin.*) TRAIN_ARGS+=("$arg") ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    create|delete|list)
      [[ -z $ACTION ]] || die 2 "unexpected argument '$arg' after $ACTION"
      ACTION=$arg ;;
    *) die 2 "unknown argument $arg (see launch/xpk_example.sh --help)" ;;
  esac
  shift
done
export DRY_RUN
ACTION=${ACTION:-create}

[[ -n $CLUSTER ]] || die 2 "cluster not set (--cluster=NAME or CLUSTER=NAME)"
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die 2 "--num_slices=$NUM_SLICES: expected a positive integer"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die 2 "--max_restarts=$MAX_RESTARTS: expected a number"
LOCATION=(--cluster="$CLUSTER")
[[ -n $PROJECT ]] && LOCATION+=(--project="$PROJECT")
[[ -n $ZONE ]] && LOCATION+=(--zone="$ZONE")
need_command xpk "pip install xpk"

if [[ $ACTION == list ]]; then
  run xpk workload list "${LOCATION[@]}"
  exit 0
fi
WORKLOAD=${WORKLOAD:-spectron-$(date -u +%Y%m%d-%H%M%S)}
[[ $WORKLOAD =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die 2 "--workload=$WORKLOAD: use lower-case letters, digits and '-'"
if [[ $ACTION == delete ]]; then
  run xpk workload delete --workload="$WORKLOAD" "${LOCATION[@]}"
  exit 0
fi

[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die 2 "give at least one --gin_file=... (e.g. --gin_file=runs/spectron_1b_librilight.gin)"
gin_model_dir=""
for arg in "${TRAIN_ARGS[@]}"; do
  if [[ $arg == --gin.MODEL_DIR=* ]]; then
    gin_model_dir=${arg#--gin.MODEL_DIR=}
    if [[ ${#gin_model_dir} -ge 2 && ( $gin_model_dir == \'*\' || $gin_model_dir == \"*\" ) ]]; then
      gin_model_dir=${gin_model_dir:1:${#gin_model_dir}-2}
    fi
  fi
done
if [[ -n $gin_model_dir ]]; then
  [[ -z $MODEL_DIR || $MODEL_DIR == "$gin_model_dir" ]] || die 2 "--model_dir and --gin.MODEL_DIR disagree; give one"
  MODEL_DIR=$gin_model_dir
elif [[ -z $MODEL_DIR ]]; then
  [[ -n $BUCKET ]] || die 2 "no MODEL_DIR: set --bucket=gs://BUCKET/PREFIX, --model_dir=gs://... or --gin.MODEL_DIR=\"'gs://...'\""
  BUCKET=${BUCKET%/}
  [[ $BUCKET == gs://* ]] || BUCKET="gs://$BUCKET"
  MODEL_DIR="$BUCKET/runs/$WORKLOAD"
fi
[[ $MODEL_DIR == gs://* ]] || die 2 "MODEL_DIR=$MODEL_DIR: a GKE run needs a gs:// path (containers share no disk)"
[[ $MODEL_DIR != *[\'\"\\]* ]] || die 2 "MODEL_DIR=$MODEL_DIR: quotes and backslashes are not allowed in the path"

ARGS=(--gin.TrainConfig.distributed="@DistributedConfig()" --gin.DistributedConfig.auto=True)
if (( NUM_SLICES > 1 )); then
  ARGS+=(--gin.TrainConfig.mesh="@MeshConfig()" --gin.MeshConfig.dcn="$DCN_MESH")
fi
ARGS+=("${TRAIN_ARGS[@]}")
[[ -n $gin_model_dir ]] || ARGS+=(--gin.MODEL_DIR="'$MODEL_DIR'")

# The command every container runs (a shell line; each argument quoted once).
TRAIN_LINE="python3 -m spectron_jax.train $(quote_command "${ARGS[@]}")"
IMAGE_FLAGS=()
if [[ -n $DOCKER_IMAGE ]]; then
  IMAGE_FLAGS=(--docker-image="$DOCKER_IMAGE")
  CONTAINER_COMMAND=$TRAIN_LINE
else
  IMAGE_FLAGS=(--base-docker-image="$BASE_IMAGE" --script-dir=.)  # this checkout (run from its root)
  CONTAINER_COMMAND="python3 -m pip install --quiet -e '.[tpu]' && $TRAIN_LINE"
fi

cd "$REPO_ROOT"
echo "workload $WORKLOAD: $NUM_SLICES x $TPU_TYPE on cluster $CLUSTER, MODEL_DIR=$MODEL_DIR"
if [[ $DRY_RUN == 1 ]]; then
  echo "# command run in every container:"
  echo "#   $CONTAINER_COMMAND"
fi
run xpk workload create "${LOCATION[@]}" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" \
  --num-slices="$NUM_SLICES" --max-restarts="$MAX_RESTARTS" "${IMAGE_FLAGS[@]}" --command="$CONTAINER_COMMAND"
