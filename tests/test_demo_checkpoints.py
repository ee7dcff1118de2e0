"""The demo's shipped checkpoints load, match their metadata, and CoLT5's meets the targets.

The answers are checked against the task's own targets (`recall.generate`), decoded
greedily with `EncoderDecoderModel.predict_batch`, not through the demo's scoring code.
"""

from pathlib import Path

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from colt5_flax import checkpoints, count_params, demo_checkpoints, gin_utils, model_files
from colt5_flax.data import recall

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "demo_checkpoints"
NUM_EXAMPLES = 128  # the demo scores the first 128 validation inputs
BATCH = 64
EVAL_LENGTH = 2048


def _model_and_task(gin_files):
  """The model the gin files build, and the task's `RecallConfig` at EVAL_LENGTH from their
  DEMO_* macros (configs/runs/demo.gin)."""
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(
        [str(REPO / "configs")], gin_files, ["MODEL_DIR = '/tmp/unused'"],
        finalize_config=False,
    )
    task = recall.RecallConfig(
        input_length=EVAL_LENGTH,
        num_facts=gin.query_parameter("%DEMO_NUM_FACTS"),
        num_keys=gin.query_parameter("%DEMO_NUM_KEYS"),
        num_values=gin.query_parameter("%DEMO_NUM_VALUES"),
        min_question_distance=gin.query_parameter("%DEMO_MIN_QUESTION_DISTANCE"),
        fact_marker=gin.query_parameter("%DEMO_FACT_MARKER"),
    )
    return model_files.frozen(), task
  finally:
    gin.clear_config()


def _answers(model, params, config):
  """Greedy answers to the first NUM_EXAMPLES validation inputs, and the true ones."""
  examples = [recall.generate(config, "validation", i) for i in range(NUM_EXAMPLES)]
  tokens = np.zeros((NUM_EXAMPLES, EVAL_LENGTH), np.int32)
  for row, example in enumerate(examples):
    tokens[row, :-1] = np.frombuffer(example["inputs"], np.uint8).astype(np.int32) + 3
    tokens[row, -1] = 1  # EOS
  batch = {
      "encoder_input_tokens": tokens,
      "decoder_input_tokens": np.zeros((NUM_EXAMPLES, 2), np.int32),
      "decoder_target_tokens": np.zeros((NUM_EXAMPLES, 2), np.int32),
  }
  predict = jax.jit(model.predict_batch)
  predicted = np.concatenate([
      np.asarray(predict(params, {k: v[i : i + BATCH] for k, v in batch.items()}))
      for i in range(0, NUM_EXAMPLES, BATCH)
  ])
  answers = [chr(ids[0] - 3) if ids[0] >= 3 else "" for ids in predicted]
  return answers, [example["targets"] for example in examples]


@pytest.fixture(scope="module", params=["colt5_tiny", "light_only"])
def shipped(request):
  directory = SHIPPED / request.param
  metadata = demo_checkpoints.read_metadata(directory)
  model, task = _model_and_task(metadata["gin_files"])
  abstract = nn.unbox(count_params.abstract_params(model))
  params = checkpoints.restore_params(str(directory / demo_checkpoints.PARAMS_DIR), abstract)
  return request.param, metadata, model, params, task


def test_metadata_records_how_the_checkpoint_was_made(shipped):
  name, metadata, _, params, _ = shipped
  for field in ("command", "gin_files", "steps", "train_seconds", "machine", "git_commit",
                "date", "scores"):
    assert metadata[field] not in (None, "", {}), field
  assert "colt5_flax.demo" in metadata["command"]
  assert metadata["num_params"] == count_params.count(params)
  assert metadata["steps"] >= 1000 and metadata["train_seconds"] > 0
  assert (SHIPPED / name / "config.gin").exists()
  assert metadata["scores"]["eval_length"] == EVAL_LENGTH


def test_shipped_checkpoints_answer_as_their_metadata_says(shipped):
  name, metadata, model, params, task = shipped
  answers, truth = _answers(model, params, task)
  correct = sum(a == t for a, t in zip(answers, truth, strict=True))
  recorded = metadata["scores"]["accuracy"] * NUM_EXAMPLES
  # The same 128 inputs as recorded; one answer may flip on another CPU's float rounding.
  assert abs(correct - recorded) <= 1, (correct, recorded, answers, truth)
  if name == "colt5_tiny":  # The demo's targets.
    assert correct / NUM_EXAMPLES >= 0.9 and metadata["scores"]["router_recall"] >= 0.8
