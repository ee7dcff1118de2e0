#!/usr/bin/env bash
# Fine-tunes one pretrained checkpoint on the seven SCROLLS tasks, evaluates each task's
# best dev checkpoint, decodes the test sets and builds the leaderboard CSV (docs/paper.md):
# for each task T,
#   1. python -m colt5_flax.train    MODEL runs/finetune_scrolls.gin tasks/scrolls_T.gin
#        MODEL_DIR=OUTPUT_DIR/T, INITIAL_CHECKPOINT_PATH=PRETRAINED
#   2. the best step: the maximum of eval/<task>/scrolls_score in OUTPUT_DIR/T/eval_metrics.jsonl
#   3. python -m colt5_flax.evaluate MODEL runs/eval.gin  tasks/scrolls_T.gin   (validation)
#   4. python -m colt5_flax.infer    MODEL runs/infer.gin tasks/scrolls_T.gin   (test)
#        predictions in OUTPUT_DIR/predictions/<task>-test-<best step>.jsonl
# then scripts/make_scrolls_submission.py writes OUTPUT_DIR/scrolls_submission.csv.
#
#   scripts/finetune_all_scrolls.sh --model=models/colt5_base.gin \
#     --pretrained=gs://my-bucket/colt5_base_ul2/checkpoint_1000000 \
#     --output_dir=gs://my-bucket/colt5_base_scrolls --scrolls_data_dir=/data/scrolls
#
#   scripts/finetune_all_scrolls.sh ... --dry_run      # print the commands, run nothing
#
# An ablation: add its file (--gin_file=ablations/static_routing.gin). On a TPU pod or a
# GPU cluster, run every step through a launcher, e.g.
#   --launcher="scripts/launch_tpu_pod.sh --tpu=colt5-v4-64 --zone=us-central2-b --no_install"
# (each step is then `<launcher> --entry=<train|evaluate|infer> <gin flags>`).
#
# Options:
#   --model=FILE            model gin file (required)
#   --pretrained=PATH       pretrained checkpoint or MODEL_DIR (required; 'none' = scratch)
#   --output_dir=DIR        one MODEL_DIR per task below it (required)
#   --gin_file=FILE         repeatable; added after the task file (ablations)
#   --gin.NAME=VALUE        repeatable gin binding for every step (VALUE is a gin literal)
#   --tasks=T1,T2,...       a subset of the seven (no CSV then)
#   --local                 read the official SCROLLS files in $SCROLLS_DATA_DIR
#                           (tasks scrolls_<task>_local) instead of TFDS
#   --scrolls_data_dir=DIR  the official files, for the CSV's id check (default
#                           $SCROLLS_DATA_DIR)
#   --launcher=COMMAND      run steps through a launcher (see above)
#   --python=python3        the Python that runs the steps and the CSV script
#   --no_submission         skip the CSV
#   --dry_run               print what would run
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ECHO_COMMANDS=1

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# The seven task names, from the one SCROLLS table (standard library only: any python3).
TASK_NAMES="$(python3 "$REPO_ROOT/colt5_flax/data/scrolls_table.py")" ||
  die "could not read the SCROLLS task names from colt5_flax/data/scrolls_table.py"
read -r -a ALL_TASKS <<< "$TASK_NAMES"
MODEL=""
PRETRAINED=""
OUTPUT_DIR=""
TASKS=""
LOCAL=0
DATA_DIR="${SCROLLS_DATA_DIR:-}"
LAUNCHER=""
PYTHON="python3"
SUBMISSION=1
DRY_RUN=0
EXTRA=()

for arg in "$@"; do
  case "$arg" in
    --model=*) MODEL="${arg#*=}" ;;
    --pretrained=*) PRETRAINED="${arg#*=}" ;;
    --output_dir=*) OUTPUT_DIR="${arg#*=}" ;;
    --tasks=*) TASKS="${arg#*=}" ;;
    --local) LOCAL=1 ;;
    --scrolls_data_dir=*) DATA_DIR="${arg#*=}" ;;
    --launcher=*) LAUNCHER="${arg#*=}" ;;
    --python=*) PYTHON="${arg#*=}" ;;
    --no_submission) SUBMISSION=0 ;;
    --gin_file=* | --gin.*) EXTRA+=("$arg") ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done

[[ -n "$MODEL" ]] || die "--model=models/<model>.gin is required"
[[ -n "$PRETRAINED" ]] || die "--pretrained=<checkpoint> is required ('none' to start from scratch)"
[[ -n "$OUTPUT_DIR" ]] || die "--output_dir is required"
OUTPUT_DIR="${OUTPUT_DIR%/}"
if [[ ! -f "$MODEL" && ! -f "$REPO_ROOT/configs/$MODEL" ]]; then
  die "--model=$MODEL is neither a file nor in $REPO_ROOT/configs"
fi
if [[ -n "$TASKS" ]]; then
  IFS=',' read -r -a TASK_LIST <<<"$TASKS"
  for task in "${TASK_LIST[@]}"; do
    [[ " ${ALL_TASKS[*]} " == *" $task "* ]] || die "unknown task '$task'; expected some of ${ALL_TASKS[*]}"
  done
else
  TASK_LIST=("${ALL_TASKS[@]}")
fi
if ((SUBMISSION)) && [[ ${#TASK_LIST[@]} -ne ${#ALL_TASKS[@]} ]]; then
  echo "finetune_all_scrolls.sh: --tasks is a subset: no submission CSV" >&2
  SUBMISSION=0
fi
if ((SUBMISSION)) && [[ -z "$DATA_DIR" ]]; then
  die "the CSV checks ids against the official files: pass --scrolls_data_dir (or set \$SCROLLS_DATA_DIR), or --no_submission"
fi
if ((LOCAL)) && [[ -z "${SCROLLS_DATA_DIR:-}" ]]; then
  die "--local reads \$SCROLLS_DATA_DIR: set it to the official files' directory"
fi
if [[ "${PRETRAINED,,}" == none ]]; then
  INITIAL="None"
else
  INITIAL="'$PRETRAINED'"
fi
read -r -a LAUNCHER_WORDS <<<"$LAUNCHER"

# One step of a task: `step <entry> <flags...>`, locally or through the launcher.
step() {
  local entry="$1"
  shift
  if [[ -n "$LAUNCHER" ]]; then
    run "${LAUNCHER_WORDS[@]}" "--entry=$entry" "$@"
  else
    run "$PYTHON" -m "colt5_flax.$entry" "$@"
  fi
}

best_step() {
  # The step of the best evaluation: highest metric, earliest step on ties.
  "$PYTHON" -c '
import json, sys
from etils import epath
path, metric = sys.argv[1:]
records = [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]
scored = [r for r in records if metric in r]
if not scored:
  sys.exit(f"no {metric} in {path}")
print(max(scored, key=lambda r: (r[metric], -r["step"]))["step"])
' "$1" "$2"
}

cd "$REPO_ROOT"
declare -A PREDICTIONS
for task in "${TASK_LIST[@]}"; do
  name="scrolls_$task"
  ((LOCAL)) && name+="_local"
  metric="eval/$name/scrolls_score"
  task_dir="$OUTPUT_DIR/$task"
  common=("${EXTRA[@]+"${EXTRA[@]}"}")
  ((LOCAL)) && common+=("--gin.MIXTURE_OR_TASK_NAME='$name'" "--gin.BEST_METRIC='$metric'")
  files=(--gin_file="$MODEL" "" --gin_file="tasks/scrolls_$task.gin")

  ((DRY_RUN)) && echo "# $task"
  files[1]="--gin_file=runs/finetune_scrolls.gin"
  step train "${files[@]}" "${common[@]+"${common[@]}"}" \
    "--gin.MODEL_DIR='$task_dir'" "--gin.INITIAL_CHECKPOINT_PATH=$INITIAL"

  if ((DRY_RUN)); then
    echo "# <BEST_STEP> = the step with the highest $metric in $task_dir/eval_metrics.jsonl"
    best='<BEST_STEP>'
  else
    best="$(best_step "$task_dir/eval_metrics.jsonl" "$metric")"
    echo "$task: best step $best" >&2
  fi
  checkpoint="$task_dir/checkpoint_$best"

  files[1]="--gin_file=runs/eval.gin"
  step evaluate "${files[@]}" "${common[@]+"${common[@]}"}" \
    "--gin.CHECKPOINT_PATH='$checkpoint'" "--gin.EVAL_OUTPUT_DIR='$task_dir/eval_best'"

  files[1]="--gin_file=runs/infer.gin"
  step infer "${files[@]}" "${common[@]+"${common[@]}"}" \
    "--gin.CHECKPOINT_PATH='$checkpoint'" "--gin.INFER_OUTPUT_DIR='$OUTPUT_DIR/predictions'"
  PREDICTIONS[$task]="$OUTPUT_DIR/predictions/$name-test-$best.jsonl"
done

if ((SUBMISSION)); then
  ((DRY_RUN)) && echo "# submission"
  csv_args=()
  for task in "${ALL_TASKS[@]}"; do
    csv_args+=("--$task=${PREDICTIONS[$task]}")
  done
  run "$PYTHON" scripts/make_scrolls_submission.py "${csv_args[@]}" \
    "--scrolls_data_dir=$DATA_DIR" "--output_csv=$OUTPUT_DIR/scrolls_submission.csv"
fi
