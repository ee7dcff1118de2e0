#!/usr/bin/env bash
# Runs a colt5_flax entry point on every worker of a Cloud TPU VM slice (a pod):
#   1. reuses the TPU VM named --tpu, or creates it (--accelerator_type, --runtime_version);
#   2. copies this repository's committed tree (git archive HEAD) to every worker and
#      installs it there (`pip install -e '.[tpu]'`), unless --no_install;
#   3. starts `python3 -m colt5_flax.<entry> --multiprocess <gin flags>` on all workers at
#      once (jax.distributed finds the slice's workers by itself) and streams their output.
#
#   scripts/launch_tpu_pod.sh --tpu=colt5-v4-128 --zone=us-central2-b \
#     --accelerator_type=v4-128 --model_dir=gs://my-bucket/colt5_base_ul2 \
#     --gin_file=models/colt5_base.gin --gin_file=runs/pretrain_ul2.gin
#
#   scripts/launch_tpu_pod.sh ... --dry_run      # print the commands, run nothing
#
# MODEL_DIR must be on GCS (gs://...): every worker writes to it, and a preempted run
# restarts from its latest checkpoint when launched again with the same flags.
#
# Options:
#   --tpu=NAME                TPU VM name (required)
#   --zone=ZONE               its zone (required)
#   --accelerator_type=TYPE   e.g. v4-128, v5p-256 (required to create it)
#   --runtime_version=V       TPU VM software version (default tpu-ubuntu2204-base)
#   --project=PROJECT         Google Cloud project (default: gcloud's)
#   --spot                    create it as a Spot VM
#   --model_dir=gs://...      shorthand for --gin.MODEL_DIR="'gs://...'"
#   --gin_file=FILE           repeatable; relative paths resolve in the repository's configs/
#   --gin.NAME=VALUE          repeatable gin binding, passed through (VALUE is a gin literal)
#   --entry=train             train | evaluate | infer
#   --workdir=colt5-flax      where the repository goes on the workers (under ~)
#   --no_install              skip step 2 (the workers already have this version)
#   --dry_run                 print what would run
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# `~` stays unquoted: remote paths expand on the workers.
PLAIN_WORD_PATTERN='^[A-Za-z0-9_@%+=:,./~-]+$'

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TPU=""
ZONE=""
ACCELERATOR_TYPE=""
RUNTIME_VERSION="tpu-ubuntu2204-base"
PROJECT=""
SPOT=0
ENTRY="train"
WORKDIR="colt5-flax"
INSTALL=1
DRY_RUN=0
MODEL_DIR=""
PASSTHROUGH=()

for arg in "$@"; do
  case "$arg" in
    --tpu=*) TPU="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --accelerator_type=*) ACCELERATOR_TYPE="${arg#*=}" ;;
    --runtime_version=*) RUNTIME_VERSION="${arg#*=}" ;;
    --project=*) PROJECT="${arg#*=}" ;;
    --spot) SPOT=1 ;;
    --entry=*) ENTRY="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --no_install) INSTALL=0 ;;
    --model_dir=*)
      MODEL_DIR="${arg#*=}"
      PASSTHROUGH+=("--gin.MODEL_DIR='$MODEL_DIR'")
      ;;
    --gin.MODEL_DIR=*)
      MODEL_DIR="${arg#*=}"
      MODEL_DIR="${MODEL_DIR//[\'\"]/}"
      PASSTHROUGH+=("$arg")
      ;;
    --gin_file=* | --gin.* | --gin_bindings=*) PASSTHROUGH+=("$arg") ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done

[[ -n "$TPU" ]] || die "--tpu=NAME is required"
[[ -n "$ZONE" ]] || die "--zone=ZONE is required"
check_entry "$ENTRY"
if [[ "$ENTRY" == train ]]; then
  [[ -n "$MODEL_DIR" ]] || die "--model_dir=gs://... is required for training"
fi
if [[ -n "$MODEL_DIR" && "$MODEL_DIR" != gs://* ]]; then
  die "MODEL_DIR must be on GCS (gs://...) so that every worker sees it, got '$MODEL_DIR'"
fi
require_gin_file "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=("--project=$PROJECT")

# 1. Reuse or create the slice.
if ((DRY_RUN)); then
  echo "# if 'describe' fails (no such TPU VM), create it:"
  run "${GCLOUD[@]}" describe "$TPU" "${WHERE[@]}"
fi
if ((DRY_RUN)) || ! "${GCLOUD[@]}" describe "$TPU" "${WHERE[@]}" >/dev/null 2>&1; then
  [[ -n "$ACCELERATOR_TYPE" ]] || die "TPU VM '$TPU' does not exist: pass --accelerator_type to create it"
  create=("${GCLOUD[@]}" create "$TPU" "${WHERE[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
    "--version=$RUNTIME_VERSION")
  ((SPOT)) && create+=(--spot)
  run "${create[@]}"
fi

# 2. Ship the committed tree and install it on every worker.
if ((INSTALL)); then
  archive="${TMPDIR:-/tmp}/colt5-flax-$$.tar.gz"
  if ((!DRY_RUN)) && [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    echo "launch_tpu_pod.sh: warning: uncommitted changes are not shipped (git archive HEAD)" >&2
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$archive" HEAD
  run "${GCLOUD[@]}" scp "$archive" "$TPU:colt5-flax.tar.gz" "${WHERE[@]}" --worker=all
  install="rm -rf ~/$WORKDIR && mkdir -p ~/$WORKDIR && tar -xzf ~/colt5-flax.tar.gz -C ~/$WORKDIR"
  install+=" && python3 -m pip install --quiet -e ~/$WORKDIR'[tpu]'"
  run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all "--command=$install"
  ((DRY_RUN)) || rm -f "$archive"
fi

# 3. Start the run on all workers at once.
start="cd ~/$WORKDIR && $(quote_words python3 -m "colt5_flax.$ENTRY" --multiprocess \
  "${PASSTHROUGH[@]}")"
run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all "--command=$start"
