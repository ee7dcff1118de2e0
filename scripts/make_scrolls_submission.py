r"""Builds the SCROLLS leaderboard CSV (`Task,ID,Prediction`) from test predictions.

Each task's predictions are a JSONL file of `{"id": ..., "prediction": ...}` lines (what
`colt5_infer` writes). The ids are checked against the official test files: a duplicate,
missing or unknown id stops the script and is named.

  python scripts/make_scrolls_submission.py \
    --gov_report=preds/gov_report.jsonl --summ_screen_fd=... --qmsum=... --qasper=... \
    --narrative_qa=... --quality=... --contract_nli=... \
    --ids_data_dir=$SCROLLS_DATA_DIR --output_csv=scrolls_predictions.csv

The CSV is written as the official `prepare_submission.py` writes it (pandas' default
CSV: minimal quoting, "\n" line ends), then read back and compared.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping

from absl import app, flags, logging

from colt5_flax.data import scrolls

_PREDICTIONS = {
    task: flags.DEFINE_string(task, None, f"JSONL predictions (id, prediction) for {task}.")
    for task in scrolls.SCROLLS_TASKS
}
_IDS_DATA_DIR = flags.DEFINE_string(
    "ids_data_dir",
    os.environ.get(scrolls.DATA_DIR_ENV),
    "Folder of the official SCROLLS files (<task>.zip or <task>/<split>.jsonl), to check "
    "the ids. Default: $SCROLLS_DATA_DIR.",
)
_IDS_SPLIT = flags.DEFINE_string("ids_split", "test", "Split whose ids must be predicted.")
_OUTPUT_CSV = flags.DEFINE_string("output_csv", "scrolls_predictions.csv", "Where to write.")

COLUMNS = ("Task", "ID", "Prediction")


def make_submission(
    prediction_paths: Mapping[str, str], data_dir: str, output_csv: str, split: str = "test"
) -> list[tuple[str, str, str]]:
  """Checks the predictions of all seven tasks and writes the CSV.

  Args:
    prediction_paths: `{task: JSONL path}` for every task of `scrolls.SCROLLS_TASKS`.
    data_dir: the official files, whose `split` ids the predictions must match.
    output_csv: the CSV to write.
    split: the split ('test' for the leaderboard).

  Returns:
    the rows written, `(task, id, prediction)`, in task order then file order.

  Raises:
    ValueError: a task without predictions, or a duplicate/missing/unknown id (named).
  """
  missing_tasks = [t for t in scrolls.SCROLLS_TASKS if not prediction_paths.get(t)]
  if missing_tasks:
    raise ValueError(f"No predictions given for {missing_tasks} (flags --<task>=path.jsonl)")
  if not data_dir:
    raise ValueError(f"Need --ids_data_dir (or ${scrolls.DATA_DIR_ENV}) to check the ids")
  rows = []
  for task in scrolls.SCROLLS_TASKS:
    predictions = scrolls.read_predictions(prediction_paths[task])
    expected_ids = scrolls.references_by_id(data_dir, task, split)
    scrolls.check_prediction_ids(task, predictions, expected_ids)
    rows += [(task, example_id, predictions[example_id]) for example_id in expected_ids]
    logging.info("%s: %d predictions", task, len(expected_ids))

  with open(output_csv, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
  with open(output_csv, newline="", encoding="utf-8") as f:
    read_back = [tuple(row) for row in csv.reader(f)]
  if read_back != [COLUMNS, *rows]:
    raise RuntimeError(f"{output_csv} does not read back as written")
  return rows


def main(argv):
  del argv
  paths = {task: flag.value for task, flag in _PREDICTIONS.items()}
  rows = make_submission(paths, _IDS_DATA_DIR.value, _OUTPUT_CSV.value, _IDS_SPLIT.value)
  logging.info("Wrote %d rows to %s", len(rows), _OUTPUT_CSV.value)


if __name__ == "__main__":
  app.run(main)
