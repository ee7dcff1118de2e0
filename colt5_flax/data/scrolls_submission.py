"""SCROLLS predictions: read, check against the official ids, score, write the leaderboard CSV.

Predictions are JSONL files of `{"id": ..., "prediction": ...}` lines, one per example
(what `colt5_flax.infer` writes). The references and ids come from the official files
(`scrolls.references_by_id`). The leaderboard takes one CSV with columns
`Task,ID,Prediction` for the seven tasks, written as the official `prepare_submission.py`
writes it (pandas' default CSV: minimal quoting, "\\n" line ends).

The command-line wrappers are scripts/make_scrolls_submission.py and
scripts/score_predictions.py.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping

from colt5_flax import jsonl
from colt5_flax.data import metrics, scrolls, scrolls_files, scrolls_table

CSV_COLUMNS = ("Task", "ID", "Prediction")


def read_predictions(path: str) -> dict[str, str]:
  """`{id: prediction}` from a JSONL file of `{"id": ..., "prediction": ...}` lines.

  Raises:
    ValueError: a malformed line (file:line), a missing field (named), a prediction that
      is not a string, or an id seen twice (named, with both lines).
  """
  predictions: dict[str, str] = {}
  first_location: dict[str, str] = {}
  for location, record in jsonl.read(path):
    for field in ("id", "prediction"):
      if field not in record:
        raise ValueError(f"{location}: missing field {field!r}")
    example_id, prediction = str(record["id"]), record["prediction"]
    if not isinstance(prediction, str):
      raise ValueError(f"{location}: prediction of id {example_id!r} is not a string")
    if example_id in predictions:
      raise ValueError(
          f"{location}: duplicate prediction for id {example_id!r} "
          f"(first at {first_location[example_id]})"
      )
    predictions[example_id] = prediction
    first_location[example_id] = location
  return predictions


def check_prediction_ids(task: str, predicted_ids: Iterable[str], expected_ids: Iterable[str]):
  """Raises ValueError naming the ids missing from, or unknown to, `task`'s predictions."""
  predicted, expected = set(predicted_ids), set(expected_ids)
  missing = sorted(expected - predicted)
  unknown = sorted(predicted - expected)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing ids (e.g. {', '.join(map(repr, missing[:5]))})")
  if unknown:
    problems.append(f"{len(unknown)} unknown ids (e.g. {', '.join(map(repr, unknown[:5]))})")
  if problems:
    raise ValueError(f"{task}: predictions do not match the references: {'; '.join(problems)}")


def score_predictions(task: str, predictions_path: str, data_dir: str, split: str) -> dict:
  """The official metrics of `task` for the predictions in `predictions_path`.

  Raises:
    ValueError: missing or unknown ids (named), or a split without references (test).
  """
  if not data_dir:
    raise ValueError(
        f"Need the official files' folder (or ${scrolls_files.DATA_DIR_ENV}) to score"
    )
  predictions = read_predictions(predictions_path)
  references = scrolls.references_by_id(data_dir, task, split)
  check_prediction_ids(task, predictions, references)
  without = [i for i, refs in references.items() if not refs]
  if without:
    raise ValueError(f"{task}/{split}: ids without references (e.g. {without[0]!r}); test?")
  ids = list(references)
  return metrics.scrolls_metric(task, [references[i] for i in ids], [predictions[i] for i in ids])


def make_submission(
    prediction_paths: Mapping[str, str], data_dir: str, output_csv: str, split: str = "test"
) -> list[tuple[str, str, str]]:
  """Checks the predictions of all seven tasks and writes the leaderboard CSV.

  Args:
    prediction_paths: `{task: JSONL path}` for every task of `scrolls_table.NAMES`.
    data_dir: the official files, whose `split` ids the predictions must match.
    output_csv: the CSV to write (then read back and compared).
    split: the split ('test' for the leaderboard).

  Returns:
    the rows written, `(task, id, prediction)`, in task order then file order.

  Raises:
    ValueError: a task without predictions, or a duplicate/missing/unknown id (named).
  """
  missing_tasks = [t for t in scrolls_table.NAMES if not prediction_paths.get(t)]
  if missing_tasks:
    raise ValueError(f"No predictions given for {missing_tasks} (flags --<task>=path.jsonl)")
  if not data_dir:
    raise ValueError(
        f"Need the official files' folder (or ${scrolls_files.DATA_DIR_ENV}) to check ids"
    )
  rows = []
  for task in scrolls_table.NAMES:
    predictions = read_predictions(prediction_paths[task])
    expected_ids = scrolls.references_by_id(data_dir, task, split)
    check_prediction_ids(task, predictions, expected_ids)
    rows += [(task, example_id, predictions[example_id]) for example_id in expected_ids]

  with open(output_csv, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
  with open(output_csv, newline="", encoding="utf-8") as f:
    read_back = [tuple(row) for row in csv.reader(f)]
  if read_back != [CSV_COLUMNS, *rows]:
    raise RuntimeError(f"{output_csv} does not read back as written")
  return rows
