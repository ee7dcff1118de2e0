"""`make demo`'s pipeline end to end, shrunk: a few steps on short inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest
import seqio

from colt5_flax import demo, gin_utils
from colt5_flax import train as train_lib

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


@pytest.mark.parametrize(
    "files, stage, bindings, num_facts, num_values, input_length",
    [
        # demo.gin's task: 32 facts, one per key, each after a marker; 4 in the first
        # stage (64 tokens: the live run's only stage) and in the routers' stages of the
        # whole curriculum (128, then 512 tokens), which demo_checkpoints.gin selects.
        ((), None, [], 32, 4, 2048),
        ((), 0, [], 4, 4, 64),
        (("runs/demo_checkpoints.gin",), 0, [], 4, 4, 64),
        (("runs/demo_checkpoints.gin",), 1, [], 32, 4, 128),
        (("runs/demo_checkpoints.gin",), 2, [], 4, 4, 128),
        (("runs/demo_checkpoints.gin",), 3, [], 4, 4, 512),
        (("runs/demo_checkpoints.gin",), 4, [], 4, 4, 512),
        ((), None, ["DEMO_NUM_FACTS = 3", "DEMO_NUM_VALUES = 3", "DEMO_INPUT_LENGTH = 512"],
         3, 3, 512),
        (("runs/small_scale.gin",), None, [], 4, 8, 2048),  # the study's task, unmarked
    ],
)
def test_demo_task_knobs_reach_the_task_and_the_lengths(
    files, stage, bindings, num_facts, num_values, input_length
):
  gin.clear_config()
  files = ["models/colt5_tiny.gin", "runs/demo.gin", *files]
  bindings = ["MODEL_DIR = '/tmp/unused'", *bindings]
  try:
    if stage is not None:  # The bindings demo.train_curriculum trains that stage with.
      gin_utils.parse_gin_flags([str(REPO / "configs")], files, bindings,
                                finalize_config=False)
      stages = gin.get_configurable(demo.curriculum)()
      bindings = demo.stage_bindings(bindings, stages[stage], stages[-1].last_step)
      gin.clear_config()
    gin_utils.parse_gin_flags([str(REPO / "configs")], files, bindings)
    kwargs = gin.get_bindings(train_lib.train)  # references evaluated: registers the task
    assert kwargs["task_feature_lengths"] == {"inputs": input_length, "targets": 2}
    task = seqio.get_mixture_or_task(kwargs["mixture_or_task_name"])
    dataset = task.get_dataset(None, split="validation", shuffle=False)
    for example in dataset.take(3).as_numpy_iterator():
      document = example["inputs"][:-1] - 3  # ids -> bytes, EOS dropped
      is_fact = document >= 0x80
      facts = document[is_fact] - 0x80
      assert len(document) == input_length - 1 and len(facts) == num_facts
      # A marker `#` right before each fact, and nowhere else, unless the study pins none.
      markers = np.flatnonzero(document == ord("#"))
      marked = "runs/small_scale.gin" not in files
      expected = (np.flatnonzero(is_fact) - 1).tolist() if marked else []
      assert markers.tolist() == expected
      key = document[-1] - ord("A")
      (value,) = facts[facts // num_values == key] % num_values
      assert example["targets"].tolist() == [ord("0") + value + 3, 1]
  finally:
    gin.clear_config()


def test_curriculum_stages_end_at_their_share_of_train_steps():
  stages = demo.curriculum(
      2500, [(0.6, 64, 32, ("ROUTED_FRACTION = 1.0",)), (1.0, 128, 16, ())]
  )
  assert [(s.last_step, s.input_length, s.batch_size) for s in stages] == [
      (1500, 64, 32), (2500, 128, 16)
  ]
  assert stages[0].bindings == ("ROUTED_FRACTION = 1.0",)
  # Few steps: every stage still trains at least one step, the last ends at TRAIN_STEPS.
  assert [s.last_step for s in demo.curriculum(3, [(0.1, 8, 1, ()), (0.2, 8, 1, ()),
                                                   (1.0, 8, 1, ())])] == [1, 2, 3]
  with pytest.raises(ValueError, match="must increase"):
    demo.curriculum(10, [(0.5, 8, 1, ()), (0.9, 8, 1, ())])
  with pytest.raises(ValueError, match="fewer than"):
    demo.curriculum(1, [(0.5, 8, 1, ()), (1.0, 8, 1, ())])


def test_a_stage_stopped_by_sigterm_stops_the_curriculum(monkeypatch, tmp_path):
  # `train` returns early when SIGTERM arrives (after saving a checkpoint); the demo must
  # exit there, not start the next stage (another learning rate, task and length) from
  # that checkpoint, and not score the half-trained model.
  stages = [demo.Stage(4, 64, 2), demo.Stage(8, 128, 2)]
  trained, scored = [], []

  class State:
    step = 3  # stopped one step before the first stage's end

  def configured(function):
    if function is demo.curriculum:
      return lambda: stages
    if function is train_lib.train:
      return lambda: trained.append(len(trained)) or State()
    raise AssertionError(f"unexpected {function}")

  monkeypatch.setattr(demo, "_configure", lambda files, bindings: None)
  monkeypatch.setattr(demo, "_configured", configured)
  monkeypatch.setattr(demo, "score_checkpoint", lambda *args, **kwargs: scored.append(1))
  monkeypatch.setattr(demo.gin, "finalize", lambda: None)
  with pytest.raises(demo.Stopped, match="stopped at step 3, before the end of the stage "
                     "that ends at step 4") as stopped:
    demo.train_curriculum(["runs/demo.gin"], tmp_path, [])
  assert trained == [0] and not scored
  assert isinstance(stopped.value, SystemExit)  # the process exits with the message


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
  model_dir = tmp_path / "demo"
  # One device; XLA's backend unoptimised: this checks the pipeline, and compiling is
  # most of its time.
  # The second run below reads the first one's executables from the suite's persistent
  # compilation cache (conftest.py), which the environment names.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  command = [
      sys.executable, "-m", "colt5_flax.demo",
      f"--model_dir={model_dir}",
      # Two stages (make demo trains the first; test_demo_task_knobs_reach_the_task_and_the_
      # lengths checks every stage of the whole one): the first, then a routers' stage,
      # each compiled for both models, which is most of this test's time.
      "--gin.demo_script.curriculum.stages="
      "[(0.4, 64, 4, %DEMO_STAGE1_BINDINGS), (1.0, 128, 4, %DEMO_ROUTERS_BINDINGS)]",
      "--gin.TRAIN_STEPS=5",
      "--gin.WARMUP_STEPS=1",
      "--gin.EVAL_PERIOD=1",
      "--gin.CHECKPOINT_PERIOD=5",
      "--gin.EVAL_NUM_EXAMPLES=4",
      "--gin.DEMO_EVAL_LENGTH=256",
      "--gin.DEMO_EVAL_BATCH_SIZE=2",
      f"--export_checkpoints={tmp_path / 'export'}",
      "--shipped_checkpoints=",
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  summary = json.loads((model_dir / "summary.json").read_text())
  assert summary["steps"] == 5 and summary["steps_this_run"] == 5
  assert summary["eval_length"] == 256 and summary["chance_accuracy"] == 1 / 4
  # 4 examples: each fraction is a multiple of 1/4.
  assert summary["accuracy"] * 4 == round(summary["accuracy"] * 4)
  assert summary["question_recall"] * 4 == round(summary["question_recall"] * 4)
  assert 0.0 <= summary["router_recall"] <= 1.0
  assert len(summary["router_recall_by_layer"]) == 2
  assert summary["router_recall_by_layer"][-1] == summary["router_recall"]
  # The routers' real capacity at 256 tokens: m = 16 queries, 2m = 32 keys/values.
  assert summary["chance"] == {"router_recall": 32 / 256, "question_recall": 16 / 256}
  assert summary["baseline"]["steps"] == 5 and 0.0 <= summary["baseline"]["accuracy"] <= 1.0
  # A training-loss point at each stage's end (steps 2 and 5: the trainer logs every 10
  # steps and at the end of a run), one evaluation per step, at each stage's length.
  curves = summary["learning_curves"]
  assert [step for step, _ in curves["CoLT5-tiny"]["loss"]] == [2, 5]
  assert [step for step, _ in curves["light branch only"]["exact_match"]] == [1, 2, 3, 4, 5]
  eval_log = (model_dir / "eval_metrics.jsonl").read_text()
  assert "associative_recall_demo_64/" in eval_log and "associative_recall_demo_128/" in eval_log
  for name in ("routing.png", "learning.png"):
    assert (model_dir / name).read_bytes().startswith(b"\x89PNG")
  assert (model_dir / "config.gin").exists() and (model_dir / "train_metrics.jsonl").exists()
  assert "held-out exact match" in result.stdout

  # The run exported its parameters as the shipped checkpoints are (demo_checkpoints.py).
  exported = json.loads((tmp_path / "export" / "colt5_tiny" / "metadata.json").read_text())
  assert exported["steps"] == 5 and exported["scores"]["accuracy"] == summary["accuracy"]
  assert exported["num_params"] > 0 and "--gin.TRAIN_STEPS=5" in exported["command"]

  # A second run resumes: nothing left to train, the results are rewritten; it scores the
  # exported checkpoints as `make demo` scores the shipped ones, with the same results.
  again_command = [arg for arg in command if not arg.startswith("--export_checkpoints")]
  again_command[-1] = f"--shipped_checkpoints={tmp_path / 'export'}"
  again = subprocess.run(again_command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0, again.stderr[-4000:]
  again_summary = json.loads((model_dir / "summary.json").read_text())
  assert again_summary["steps"] == 5 and again_summary["steps_this_run"] == 0
  assert "resumed at step 5; 0 trained in this run" in again.stdout
  shipped = again_summary["shipped"]
  for name in ("accuracy", "router_recall", "question_recall"):
    assert shipped["colt5_tiny"][name] == summary[name]
  assert shipped["light_only"]["accuracy"] == summary["baseline"]["accuracy"]
  assert shipped["colt5_tiny"]["trained"]["steps"] == 5
  assert "Shipped colt5_tiny (5 steps" in again.stdout
