r"""Scores one SCROLLS task's predictions against the official references.

  python scripts/score_predictions.py --task=qasper --predictions=preds/qasper.jsonl \
    --scrolls_data_dir=$SCROLLS_DATA_DIR --split=validation [--metrics_json=qasper_metrics.json]

Predictions: JSONL `{"id": ..., "prediction": ...}`; references: the official files
(`<task>.zip` or `<task>/<split>.jsonl`), rows grouped by id. The metrics are the official
scorer's (`colt5_flax.data.metrics.scrolls_metric`, through
`colt5_flax.data.scrolls_submission.score_predictions`); every reference id needs exactly
one prediction, as the official evaluator requires.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from colt5_flax.data import scrolls_files, scrolls_submission, scrolls_table

_TASK = flags.DEFINE_enum("task", None, list(scrolls_table.NAMES), "The SCROLLS task.")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "JSONL file of id, prediction.")
_DATA_DIR = flags.DEFINE_string(
    "scrolls_data_dir",
    os.environ.get(scrolls_files.DATA_DIR_ENV),
    "Official SCROLLS files ($SCROLLS_DATA_DIR).",
)
_SPLIT = flags.DEFINE_string("split", "validation", "Split of the references.")
_METRICS_JSON = flags.DEFINE_string("metrics_json", None, "Optional file for the metrics.")


def main(argv):
  del argv
  results = scrolls_submission.score_predictions(
      _TASK.value, _PREDICTIONS.value, _DATA_DIR.value, _SPLIT.value
  )
  text = json.dumps(results, indent=2, sort_keys=True)
  print(text)
  if _METRICS_JSON.value:
    with open(_METRICS_JSON.value, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["task", "predictions"])
  app.run(main)
