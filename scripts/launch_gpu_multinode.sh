#!/usr/bin/env bash
# Runs a colt5_flax entry point on several GPU hosts: one process per host, all GPUs of
# the host in it, joined by jax.distributed (host 0 coordinates). Each process is started
# over ssh and its output goes to LOG_DIR/<index>-<host>.log; the script waits for all of
# them and fails if any fails.
#
#   scripts/launch_gpu_multinode.sh --hosts=localhost,localhost --ssh=local ...
#
# runs every process on this machine, without ssh (a rehearsal of a multi-host job; the
# test suite trains this way on CPU with XLA_FLAGS=--xla_force_host_platform_device_count).
#
#   scripts/launch_gpu_multinode.sh --hosts=gpu-0,gpu-1,gpu-2,gpu-3 \
#     --gin_file=models/colt5_base.gin --gin_file=runs/pretrain_ul2.gin \
#     --model_dir=gs://my-bucket/colt5_base_ul2 --gin.NUM_PARTITIONS=2
#
#   scripts/launch_gpu_multinode.sh ... --dry_run     # print the commands, run nothing
#
# Every host needs the repository at --workdir with the package installed
# (`pip install -e '.[gpu]'`), passwordless ssh from here, and MODEL_DIR on storage all
# hosts share (GCS, NFS). The coordinator is host 0 at --port; process i runs on host i:
#   python -m colt5_flax.<entry> --multiprocess --coordinator_address=<host 0>:<port>
#     --process_count=<number of hosts> --process_index=<i> --gin_file=... --gin.X=...
#
# Options:
#   --hosts=H0,H1,...     hosts, in process order (required)
#   --gin_file=FILE       repeatable; relative paths resolve in the repository's configs/
#   --gin.NAME=VALUE      repeatable gin binding, passed through (VALUE is a gin literal)
#   --model_dir=DIR       shorthand for --gin.MODEL_DIR="'DIR'"
#   --entry=train         train | evaluate | infer
#   --port=8476           coordinator port on host 0
#   --workdir=DIR         the repository on the hosts (default: this repository's path)
#   --python=python3      the hosts' Python
#   --ssh=ssh             the ssh command (e.g. "ssh -i key -p 2222"); `local`: run each
#                         process here with bash, keeping this shell's environment
#   --heartbeat_timeout_seconds=N  passed through: how soon the others stop when a
#                         process dies (JAX's coordination service; default 100)
#   --log_dir=DIR         local directory of the per-host logs (default ./logs)
#   --dry_run             print what would run
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HOSTS=""
ENTRY="train"
PORT="8476"
WORKDIR="$REPO_ROOT"
PYTHON="python3"
SSH="ssh"
LOG_DIR="logs"
DRY_RUN=0
PASSTHROUGH=()

for arg in "$@"; do
  case "$arg" in
    --hosts=*) HOSTS="${arg#*=}" ;;
    --entry=*) ENTRY="${arg#*=}" ;;
    --port=*) PORT="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --python=*) PYTHON="${arg#*=}" ;;
    --ssh=*) SSH="${arg#*=}" ;;
    --log_dir=*) LOG_DIR="${arg#*=}" ;;
    --model_dir=*) PASSTHROUGH+=("--gin.MODEL_DIR='${arg#*=}'") ;;
    --gin_file=* | --gin.* | --gin_bindings=* | --gin_search_paths=*) PASSTHROUGH+=("$arg") ;;
    --heartbeat_timeout_seconds=* | --initialization_timeout=*) PASSTHROUGH+=("$arg") ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done

[[ -n "$HOSTS" ]] || die "--hosts=H0,H1,... is required"
check_entry "$ENTRY"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
require_gin_file "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}"

IFS=',' read -r -a HOST_LIST <<<"$HOSTS"
NUM_HOSTS=${#HOST_LIST[@]}
COORDINATOR="${HOST_LIST[0]}:${PORT}"
read -r -a SSH_WORDS <<<"$SSH"

PIDS=()
LOGS=()
for index in "${!HOST_LIST[@]}"; do
  host="${HOST_LIST[$index]}"
  [[ -n "$host" ]] || die "empty host name in --hosts='$HOSTS'"
  remote="cd $(quote_words "$WORKDIR") && $(quote_words "$PYTHON" -m "colt5_flax.$ENTRY" \
    --multiprocess "--coordinator_address=$COORDINATOR" "--process_count=$NUM_HOSTS" \
    "--process_index=$index" "${PASSTHROUGH[@]}")"
  if [[ "$SSH" == local ]]; then
    command=(bash -c "$remote")
  else
    command=("${SSH_WORDS[@]}" "$host" "$remote")
  fi
  if ((DRY_RUN)); then
    quote_words "${command[@]}"
    echo
    continue
  fi
  mkdir -p "$LOG_DIR"
  LOGS+=("$LOG_DIR/$index-$host.log")
  echo "process $index on $host: log ${LOGS[$index]}"
  "${command[@]}" >"${LOGS[$index]}" 2>&1 &
  PIDS+=("$!")
done

((DRY_RUN)) && exit 0
# Ctrl-C or a kill of this script stops every process it started.
trap 'kill "${PIDS[@]}" 2>/dev/null; exit 130' INT TERM
status=0
for index in "${!PIDS[@]}"; do
  if ! wait "${PIDS[$index]}"; then
    echo "process $index on ${HOST_LIST[$index]} failed: see ${LOGS[$index]}" >&2
    status=1
  fi
done
exit "$status"
