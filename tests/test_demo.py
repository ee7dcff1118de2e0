"""`make demo`'s pipeline end to end, shrunk: a few steps on short inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from colt5_flax import demo

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
  model_dir = tmp_path / "demo"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  command = [
      sys.executable, "-m", "colt5_flax.demo",
      f"--model_dir={model_dir}",
      "--time_budget_s=100000",  # Always train the light-only baseline too.
      "--gin.MIXTURE_OR_TASK_NAME='synthetic_kv_retrieval_1024'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 1024, 'targets': 8}",
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
  assert summary["steps"] == 2
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
  assert json.loads((model_dir / "summary.json").read_text())["steps"] == 2
