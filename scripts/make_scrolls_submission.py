r"""Builds the SCROLLS leaderboard CSV (`Task,ID,Prediction`) from test predictions.

Each task's predictions are a JSONL file of `{"id": ..., "prediction": ...}` lines (what
`colt5_infer` writes). The ids are checked against the official test files: a duplicate,
missing or unknown id stops the script and is named.

  python scripts/make_scrolls_submission.py \
    --gov_report=preds/gov_report.jsonl --summ_screen_fd=... --qmsum=... --qasper=... \
    --narrative_qa=... --quality=... --contract_nli=... \
    --scrolls_data_dir=$SCROLLS_DATA_DIR --output_csv=scrolls_predictions.csv

The work is `colt5_flax.data.scrolls_submission.make_submission`; the CSV is written as
the official `prepare_submission.py` writes it, then read back and compared.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from colt5_flax.data import scrolls_files, scrolls_submission, scrolls_table

_PREDICTIONS = {
    task: flags.DEFINE_string(task, None, f"JSONL predictions (id, prediction) for {task}.")
    for task in scrolls_table.NAMES
}
_DATA_DIR = flags.DEFINE_string(
    "scrolls_data_dir",
    os.environ.get(scrolls_files.DATA_DIR_ENV),
    "Folder of the official SCROLLS files (<task>.zip or <task>/<split>.jsonl), to check "
    "the ids. Default: $SCROLLS_DATA_DIR.",
)
_IDS_SPLIT = flags.DEFINE_string("ids_split", "test", "Split whose ids must be predicted.")
_OUTPUT_CSV = flags.DEFINE_string("output_csv", "scrolls_predictions.csv", "Where to write.")


def main(argv):
  del argv
  paths = {task: flag.value for task, flag in _PREDICTIONS.items()}
  rows = scrolls_submission.make_submission(
      paths, _DATA_DIR.value, _OUTPUT_CSV.value, _IDS_SPLIT.value
  )
  logging.info("Wrote %d rows to %s", len(rows), _OUTPUT_CSV.value)


if __name__ == "__main__":
  app.run(main)
