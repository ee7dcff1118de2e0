"""SCROLLS predictions: reading, id checks, scoring and the leaderboard CSV, on small
official-format fixtures; and the two scripts that wrap them."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from colt5_flax.data import scrolls_submission, scrolls_table
from tests.data.test_scrolls import write_folder, write_zip

REPO = pathlib.Path(__file__).resolve().parents[2]


def official_test_rows(task):
  return [
      {"id": f"{task}-1", "pid": f"{task}-1_0", "input": "doc one", "output": None},
      {"id": f"{task}-2", "pid": f"{task}-2_0", "input": "doc two", "output": None},
  ]


@pytest.fixture()
def data_dir(tmp_path):
  root = tmp_path / "scrolls"
  for i, task in enumerate(scrolls_table.NAMES):
    validation = [
        {"id": "v1", "pid": "v1_0", "input": "q? doc", "output": "the cat sat"},
        {"id": "v1", "pid": "v1_1", "input": "q? doc", "output": "a dog"},
        {"id": "v2", "pid": "v2_0", "input": "q2? doc", "output": "Yes"},
    ]
    splits = {"test": official_test_rows(task), "validation": validation}
    (write_zip if i % 2 else write_folder)(root, task, splits)
  return root


def write_predictions(path, pairs):
  path.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n" for i, p in pairs))
  return str(path)


def test_submission_csv(data_dir, tmp_path):
  paths = {
      task: write_predictions(
          tmp_path / f"{task}.jsonl",
          [(f"{task}-2", f"{task}, second"), (f"{task}-1", 'says "hi"\nover two lines')],
      )
      for task in scrolls_table.NAMES
  }
  output = tmp_path / "scrolls_predictions.csv"
  scrolls_submission.make_submission(paths, str(data_dir), str(output))
  with open(output, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["Task", "ID", "Prediction"]
  expected = []
  for task in scrolls_table.NAMES:
    expected.append([task, f"{task}-1", 'says "hi"\nover two lines'])
    expected.append([task, f"{task}-2", f"{task}, second"])
  assert rows[1:] == expected
  # pandas-style quoting: a field with a comma, quote or newline is quoted, quotes doubled.
  assert '"says ""hi""\nover two lines"' in output.read_text()


def test_submission_refuses_duplicates_missing_and_unknown_ids(data_dir, tmp_path):
  good = {
      task: write_predictions(tmp_path / f"{task}.jsonl", [(f"{task}-1", "a"), (f"{task}-2", "b")])
      for task in scrolls_table.NAMES
  }
  output = str(tmp_path / "out.csv")
  duplicate = dict(good, qmsum=write_predictions(
      tmp_path / "dup.jsonl", [("qmsum-1", "a"), ("qmsum-2", "b"), ("qmsum-1", "c")]
  ))
  with pytest.raises(ValueError, match=r"dup.jsonl:3: duplicate prediction for id 'qmsum-1'"):
    scrolls_submission.make_submission(duplicate, str(data_dir), output)
  missing = dict(good, quality=write_predictions(tmp_path / "miss.jsonl", [("quality-1", "a")]))
  with pytest.raises(ValueError, match=r"quality: .*1 missing ids \(e.g. 'quality-2'\)"):
    scrolls_submission.make_submission(missing, str(data_dir), output)
  unknown = dict(good, qasper=write_predictions(
      tmp_path / "unk.jsonl", [("qasper-1", "a"), ("qasper-2", "b"), ("qasper-9", "c")]
  ))
  with pytest.raises(ValueError, match=r"qasper: .*1 unknown ids \(e.g. 'qasper-9'\)"):
    scrolls_submission.make_submission(unknown, str(data_dir), output)
  without_task = {k: v for k, v in good.items() if k != "gov_report"}
  with pytest.raises(ValueError, match="No predictions given for \\['gov_report'\\]"):
    scrolls_submission.make_submission(without_task, str(data_dir), output)


def test_score_predictions(data_dir, tmp_path):
  path = write_predictions(tmp_path / "p.jsonl", [("v1", "The dog."), ("v2", "no")])
  result = scrolls_submission.score_predictions("narrative_qa", path, str(data_dir), "validation")
  # v1: "dog" vs "cat sat" 0, vs "dog" 1 -> 1; v2: 0. Mean 50.
  assert result["f1"] == 50.0 and result["scrolls_score"] == 50.0
  result = scrolls_submission.score_predictions("quality", path, str(data_dir), "validation")
  assert result["exact_match"] == 50.0
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "v1", "prediction": "x"}\n{"id": "v2"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'prediction'"):
    scrolls_submission.score_predictions("qasper", str(bad), str(data_dir), "validation")
  with pytest.raises(ValueError, match=r"missing ids \(e.g. 'v2'\)"):
    scrolls_submission.score_predictions(
        "qasper", write_predictions(tmp_path / "one.jsonl", [("v1", "x")]), str(data_dir),
        "validation",
    )


def test_scripts_run_from_the_command_line(data_dir, tmp_path):
  paths = {
      task: write_predictions(tmp_path / f"{task}.jsonl", [(f"{task}-1", "a"), (f"{task}-2", "b")])
      for task in scrolls_table.NAMES
  }
  output = tmp_path / "out.csv"
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  subprocess.run(
      [sys.executable, str(REPO / "scripts/make_scrolls_submission.py"),
       *(f"--{task}={path}" for task, path in paths.items()),
       f"--scrolls_data_dir={data_dir}", f"--output_csv={output}"],
      check=True, env=env, capture_output=True, timeout=300,
  )
  assert len(output.read_text().splitlines()) == 1 + 2 * len(scrolls_table.NAMES)
  predictions = write_predictions(tmp_path / "p.jsonl", [("v1", "The dog."), ("v2", "no")])
  scored = subprocess.run(
      [sys.executable, str(REPO / "scripts/score_predictions.py"), "--task=narrative_qa",
       f"--predictions={predictions}", f"--scrolls_data_dir={data_dir}"],
      check=True, env=env, capture_output=True, text=True, timeout=300,
  )
  assert json.loads(scored.stdout)["f1"] == 50.0
