# Helpers shared by the launchers (scripts/*.sh): `source "$(dirname "$0")/lib/common.sh"`.
# Each script's help is its header comment, from line 2 to `set -euo pipefail`.

# Words that need no quoting; a script may widen it before use (launch_tpu_pod.sh lets
# `~` through so that remote paths expand on the workers).
PLAIN_WORD_PATTERN='^[A-Za-z0-9_@%+=:,./-]+$'

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Shell words as one line a shell (and a reader) parses back into the same words: plain
# words as they are, others in double quotes (what --dry_run prints, and what runs remotely).
quote_words() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ $PLAIN_WORD_PATTERN ]]; then
      out+="$word "
    else
      word="${word//\\/\\\\}"
      word="${word//\"/\\\"}"
      word="${word//\$/\\\$}"
      word="${word//\`/\\\`}"
      out+="\"$word\" "
    fi
  done
  printf '%s' "${out% }"
}

# Runs a command, or with DRY_RUN=1 prints it (one line, quoted as quote_words does).
# Set ECHO_COMMANDS=1 to also log each command to stderr before it runs.
run() {
  if ((DRY_RUN)); then
    quote_words "$@"
    echo
  else
    if ((${ECHO_COMMANDS:-0})); then
      echo "+ $(quote_words "$@")" >&2
    fi
    "$@"
  fi
}

# The launchers' entry point: one of colt5_flax's three CLIs.
check_entry() {
  case "$1" in
    train | evaluate | infer) ;;
    *) die "--entry must be train, evaluate or infer, got '$1'" ;;
  esac
}

# Dies unless the passed-through arguments include a --gin_file.
require_gin_file() {
  local arg
  for arg in "$@"; do
    [[ "$arg" == --gin_file=* ]] && return 0
  done
  die "at least one --gin_file is required"
}
