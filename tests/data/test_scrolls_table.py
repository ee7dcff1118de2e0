"""The SCROLLS task table against the paper's fine-tuning setup, written out by hand here;
and importing the data modules registers no task (only `colt5_flax.data.tasks` does)."""

import os
import pathlib
import subprocess
import sys

import pytest

from colt5_flax.data import scrolls_table

REPO = pathlib.Path(__file__).resolve().parents[2]

# (inputs, targets, metric) per task: docs/paper.md, "SCROLLS".
PAPER = {
    "gov_report": (16384, 1024, "rouge"),
    "summ_screen_fd": (16384, 512, "rouge"),
    "qmsum": (16384, 512, "rouge"),
    "qasper": (16384, 128, "f1"),
    "narrative_qa": (16384, 128, "f1"),
    "quality": (16384, 128, "exact_match"),
    "contract_nli": (8192, 128, "exact_match"),
}


def test_table_matches_the_paper():
  assert scrolls_table.NAMES == tuple(PAPER)
  for name, (inputs, targets, metric) in PAPER.items():
    task = scrolls_table.get(name)
    assert (task.input_length, task.target_length, task.metric) == (inputs, targets, metric)
    assert task.feature_lengths == {"inputs": inputs, "targets": targets}


def test_unknown_task_names_the_seven():
  with pytest.raises(ValueError, match=r"Unknown SCROLLS task 'qasperr'; expected one of .*"
                                       r"'contract_nli'"):
    scrolls_table.get("qasperr")


def test_shell_scripts_can_ask_for_the_names():
  # Standard library only: any python3 prints the list, as the launchers need it.
  result = subprocess.run(
      [sys.executable, "-S", str(REPO / "colt5_flax/data/scrolls_table.py")],
      capture_output=True, text=True, check=True, timeout=60,
  )
  assert result.stdout.split() == list(PAPER)


def test_importing_data_modules_registers_no_task():
  code = (
      "import seqio\n"
      "import colt5_flax.data.metrics, colt5_flax.data.scrolls, colt5_flax.data.ul2\n"
      "print(len(seqio.TaskRegistry.names()))\n"
      "import colt5_flax.data.tasks\n"
      "print(len(seqio.TaskRegistry.names()))\n"
  )
  result = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
  )
  before, after = map(int, result.stdout.split()[-2:])
  assert before == 0 and after > 30
