"""`make demo`'s pipeline end to end, shrunk: a few steps on short inputs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest
import seqio

from colt5_flax import demo, gin_utils
from colt5_flax import train as train_lib
from colt5_flax.data import synthetic

REPO = Path(__file__).resolve().parents[1]
FACT = re.compile(r"\[([A-Z]+):([A-Z0-9]+)\]")


def test_router_recall_by_hand():
  routed = np.array([[0, 2, 5], [1, 3, 4]])
  relevant = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]])
  # Row 0: positions 0 and 2 of {0, 1, 2}; row 1: both of {3, 4}.
  assert demo.router_recall(routed, relevant) == pytest.approx((2 / 3 + 1.0) / 2)
  # Rows with nothing relevant do not count; with no row left there is no recall.
  assert demo.router_recall(routed, np.array([[0] * 6, [0, 0, 0, 1, 0, 0]])) == 1.0
  assert np.isnan(demo.router_recall(routed[:1], np.zeros((1, 6), int)))


def test_routed_indices_by_layer_reads_plain_and_scanned_stacks():
  plain = {"encoder": {f"layers_{i}": {"attention": {"kv_routed_indices": (np.full((2, 3), i),)}}
                       for i in (0, 1, 10)}}
  layers = demo.routed_indices_by_layer(plain)
  assert [int(layer[0, 0]) for layer in layers] == [0, 1, 10]
  scanned = {"encoder": {"layers": {"layer": {"attention": {
      "kv_routed_indices": (np.stack([np.full((2, 3), i) for i in range(3)]),)}}}}}
  assert [int(layer[0, 0]) for layer in demo.routed_indices_by_layer(scanned)] == [0, 1, 2]


@pytest.mark.parametrize(
    "bindings, num_facts, key_length, value_length, input_length",
    [
        ([], 4, 3, 3, 2048),  # demo.gin's defaults
        (["DEMO_NUM_FACTS = 2", "DEMO_KEY_LENGTH = 1", "DEMO_VALUE_LENGTH = 1",
          "DEMO_INPUT_LENGTH = 1024"], 2, 1, 1, 1024),
    ],
)
def test_demo_task_knobs_reach_the_task_and_the_lengths(
    bindings, num_facts, key_length, value_length, input_length
):
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(
        [str(REPO / "configs")], ["models/colt5_tiny.gin", "runs/demo.gin"],
        ["MODEL_DIR = '/tmp/unused'", *bindings],
    )
    kwargs = gin.get_bindings(train_lib.train)  # references evaluated: registers the task
    lengths = kwargs["task_feature_lengths"]
    assert lengths == {"inputs": input_length, "targets": value_length + 1}
    task = seqio.get_mixture_or_task(kwargs["mixture_or_task_name"])
    dataset = task.get_dataset(None, split="validation", shuffle=False)
    for example in dataset.take(3).as_numpy_iterator():
      text = bytes((example["inputs"][:-1] - 3).astype(np.uint8)).decode("ascii")  # ids, EOS
      facts = FACT.findall(text)
      assert len(text) == input_length - 1 and len(facts) == num_facts
      assert {len(key) for key, _ in facts} == {key_length}
      assert {len(value) for _, value in facts} == {value_length}
      assert len(example["targets"]) == value_length + 1
  finally:
    gin.clear_config()
    synthetic.register_demo_task()  # Other tests see the default demo task again.


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
  model_dir = tmp_path / "demo"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  command = [
      sys.executable, "-m", "colt5_flax.demo",
      f"--model_dir={model_dir}",
      "--time_budget_s=100000",  # Always train the light-only baseline too.
      "--gin.DEMO_INPUT_LENGTH=1024",
      "--gin.TRAIN_STEPS=2",
      "--gin.WARMUP_STEPS=1",
      "--gin.BATCH_SIZE=2",
      "--gin.EVAL_PERIOD=0",
      "--gin.CHECKPOINT_PERIOD=2",
      "--gin.EVAL_NUM_EXAMPLES=4",
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  summary = json.loads((model_dir / "summary.json").read_text())
  assert summary["steps"] == 2 and summary["steps_this_run"] == 2
  assert 0.0 <= summary["accuracy"] <= 1.0
  assert 0.0 <= summary["router_recall"] <= 1.0
  assert len(summary["router_recall_by_layer"]) == 2
  assert summary["baseline"]["steps"] == 2 and 0.0 <= summary["baseline"]["accuracy"] <= 1.0
  png = (model_dir / "routing.png").read_bytes()
  assert png.startswith(b"\x89PNG")
  assert (model_dir / "config.gin").exists() and (model_dir / "train_metrics.jsonl").exists()
  assert "held-out exact match" in result.stdout

  # A second run resumes: nothing left to train, the results are rewritten.
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0, again.stderr[-4000:]
  again_summary = json.loads((model_dir / "summary.json").read_text())
  assert again_summary["steps"] == 2 and again_summary["steps_this_run"] == 0
  assert "resumed at step 2; 0 trained in this run" in again.stdout
