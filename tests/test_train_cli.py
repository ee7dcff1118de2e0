"""The entry points end to end: gin flags, outputs, evaluation, inference, kill and resume.

In-process tests cover the gin handling and the input checks (each must fail before
anything compiles). Subprocess tests run `python -m colt5_flax.{train,evaluate,infer}` on
configs/runs/test_tiny.gin (2 CPU devices, a shared persistent compilation cache so later
processes reuse the first one's executables).
"""

import json
import os
import signal

import gin
import numpy as np
import orbax.checkpoint as ocp
import pytest

from colt5_flax import checkpoints, gin_utils
from colt5_flax import train as train_lib
from colt5_flax import trainer as trainer_lib
from colt5_flax.data import synthetic
from tests import trainer_fixtures

TASK = "synthetic_kv_retrieval_1024"


# -- Gin handling (in process) -------------------------------------------------------------


def test_rewrite_gin_args():
  assert gin_utils.rewrite_gin_args(
      ["prog", "--gin.MODEL_DIR='/x'", "--gin_file=a.gin", "--gin.a.b.c=[1, 2]"]
  ) == ["prog", "--gin_bindings=MODEL_DIR = '/x'", "--gin_file=a.gin",
        "--gin_bindings=a.b.c = [1, 2]"]
  with pytest.raises(ValueError, match="--gin.NAME=VALUE"):
    gin_utils.rewrite_gin_args(["--gin.TRAIN_STEPS"])


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _parse(*bindings):
  gin_utils.parse_gin_flags(
      gin_utils._DEFAULT_SEARCH_PATHS, ["runs/test_tiny.gin"], list(bindings),
      finalize_config=False,
  )


def _configured_train_must_fail_early(monkeypatch, *bindings):
  """Parses test_tiny.gin + bindings and calls train(); nothing may compile or be written."""

  def reached(*args, **kwargs):
    raise AssertionError("train() got past its input checks")

  monkeypatch.setattr(trainer_lib.Trainer, "create_state", reached)
  monkeypatch.setattr(trainer_lib.Trainer, "compile_train_step", reached)
  monkeypatch.setattr(checkpoints.Checkpointer, "__init__", reached)
  _parse(*bindings)
  gin_utils.check_required_macros()
  gin.get_configurable(train_lib.train)()


def test_unknown_macro_binding_is_named(clean_gin):
  with pytest.raises(ValueError, match=r"TRAIN_STEP = 5.*did you mean TRAIN_STEPS"):
    _parse("MODEL_DIR = '/tmp/x'", "TRAIN_STEP = 5")


def test_unknown_parameter_binding_is_named(clean_gin):
  with pytest.raises(ValueError, match="doesn't have a parameter named 'num_steps'"):
    _parse("MODEL_DIR = '/tmp/x'", "train_script.train.num_steps = 5")
  gin.clear_config()
  with pytest.raises(ValueError, match="No configurable matching 'nomodule.fn'"):
    _parse("nomodule.fn.x = 1")


def test_missing_gin_file_is_named(clean_gin):
  with pytest.raises(FileNotFoundError, match="runs/nope.gin"):
    gin_utils.parse_gin_flags(["."], ["runs/nope.gin"], [])


def test_missing_model_dir_is_named(clean_gin):
  _parse()
  with pytest.raises(ValueError, match=r"Required gin macro\(s\) not set: MODEL_DIR"):
    gin_utils.check_required_macros()
  with pytest.raises(ValueError, match="MODEL_DIR must be a directory path, got None"):
    train_lib.train(model=None, model_dir=None, mixture_or_task_name=TASK,
                    task_feature_lengths={}, train_steps=1, batch_size=8, partitioner=None)


def test_unknown_task_fails_before_compiling(clean_gin, monkeypatch, tmp_path):
  with pytest.raises(ValueError, match=r"Unknown task or mixture .*'no_such_task'"):
    _configured_train_must_fail_early(
        monkeypatch, f"MODEL_DIR = '{tmp_path}/run'", "MIXTURE_OR_TASK_NAME = 'no_such_task'")
  assert not (tmp_path / "run").exists()


def test_indivisible_batch_fails_before_compiling(clean_gin, monkeypatch, tmp_path):
  # 8 devices, NUM_PARTITIONS=2: data-parallel size 4.
  with pytest.raises(ValueError, match="BATCH_SIZE=6 is not divisible by the data-parallel size 4"):
    _configured_train_must_fail_early(
        monkeypatch, f"MODEL_DIR = '{tmp_path}/run'", "BATCH_SIZE = 6", "NUM_PARTITIONS = 2")
  gin.clear_config()
  with pytest.raises(ValueError, match="NUM_PARTITIONS=3 does not divide the 8 devices"):
    _configured_train_must_fail_early(
        monkeypatch, f"MODEL_DIR = '{tmp_path}/run'", "NUM_PARTITIONS = 3")
  gin.clear_config()
  with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS must map 'inputs' and 'targets'"):
    _configured_train_must_fail_early(
        monkeypatch, f"MODEL_DIR = '{tmp_path}/run'", "TASK_FEATURE_LENGTHS = {'inputs': 64}")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_initial_checkpoint_then_non_finite_loss_stops_the_run(tmp_path):
  """INITIAL_CHECKPOINT_PATH's parameters train; then a non-finite loss stops the run.

  An infinite learning rate sends the parameters to inf in step 1, so step 2's loss is
  NaN. train() is called from Python (no gin), on one device to keep the compile small.
  """
  import jax

  from colt5_flax import optimizers, partitioning

  # Pretrained parameters: the tiny model's initial ones, scaled so they differ from
  # what train() would initialise by itself.
  pretrained = jax.tree.map(lambda x: 1.5 * x, trainer_fixtures.initial_host_state().params)
  ocp.PyTreeCheckpointer().save(tmp_path / "pretrained", {"params": pretrained})
  model = trainer_fixtures.tiny_model()
  lengths = {"inputs": 64, "targets": 8}
  model_dir = tmp_path / "run"
  with pytest.raises(FloatingPointError, match=r"Non-finite loss (nan|inf) at step 2.*\(step 1\)"):
    train_lib.train(
        model=model,
        model_dir=str(model_dir),
        mixture_or_task_name=TASK,
        task_feature_lengths=lengths,
        train_steps=3,
        batch_size=8,
        partitioner=partitioning.Partitioner(devices=[jax.devices()[0]]),
        learning_rate_schedule=optimizers.constant_schedule(float("inf")),
        initial_checkpoint_path=str(tmp_path / "pretrained"),
        checkpoint_period=1,
        eval_period=0,
        log_period=1,
    )
  reader = checkpoints.Checkpointer(str(model_dir))
  assert reader.all_steps() == [1]  # the last finite state; nothing saved after it
  reader.close()
  lines = _jsonl(model_dir / "train_metrics.jsonl")
  assert [line["step"] for line in lines] == [1]

  # Step 1's loss is the pretrained parameters' loss on the first training batch.
  first_batch = next(train_lib.train_batches(
      TASK, lengths, 8, seed=0, shard_info=partitioning.Partitioner().host_shard_info()))
  expected_loss, _ = model.loss_fn(pretrained, first_batch, None)
  trainer_fixtures.assert_same_metric(lines[0]["loss"], expected_loss, "loss")


# -- The command line (subprocesses) --------------------------------------------------------


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  return {"root": root, "env": trainer_fixtures.subprocess_env(str(root / "jax_cache"))}


def _train_args(model_dir, *extra):
  return ["--gin_file=runs/test_tiny.gin", f"--gin.MODEL_DIR='{model_dir}'", *extra]


@pytest.fixture(scope="module")
def uninterrupted_run(cli):
  """4 steps, checkpoints at 2 and 4, evaluation at 4, memory report."""
  model_dir = cli["root"] / "uninterrupted"
  trainer_fixtures.run_cli(
      "colt5_flax.train", _train_args(model_dir, "--gin.REPORT_MEMORY=True"), env=cli["env"]
  )
  return model_dir


def _jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _restore_state(step_dir):
  return ocp.StandardCheckpointer().restore(step_dir / "state")


def _validation_example(index):
  return synthetic.generate(synthetic.SyntheticConfig(input_length=1024), "validation", index)


@pytest.mark.slow
def test_train_writes_config_metrics_checkpoints_and_evaluates(uninterrupted_run):
  model_dir = uninterrupted_run
  config = (model_dir / "config.gin").read_text()
  assert "train_script.train.batch_size = %BATCH_SIZE" in config
  assert f"MODEL_DIR = '{model_dir}'" in config
  assert "optimizers.adafactor.decay_rate = 0.8" in config  # operative: defaults included

  lines = _jsonl(model_dir / "train_metrics.jsonl")
  assert [line["step"] for line in lines] == [1, 2, 3, 4]
  for line in lines:
    for key in ("loss", "accuracy", "learning_rate", "steps_per_sec", "z_loss", "grad_norm"):
      assert np.isfinite(line[key]), (key, line)
    assert line["learning_rate"] == pytest.approx(0.01)
    assert line["num_tokens"] == 8 * 7  # 8 rows of a 6-character value + EOS
  assert os.listdir(model_dir / "train") and os.listdir(model_dir / "eval")  # TensorBoard

  (evaluation,) = _jsonl(model_dir / "eval_metrics.jsonl")
  assert evaluation["step"] == 4
  prefix = f"eval/{TASK}/"
  assert evaluation[prefix + "num_examples"] == 16
  assert 0 <= evaluation[prefix + "exact_match"] <= 100
  assert 0 < evaluation[prefix + "loss"] < 10 and 0 <= evaluation[prefix + "accuracy"] <= 1

  memory = json.loads((model_dir / "memory.json").read_text())
  assert memory["peak_bytes_estimate"] >= memory["temp_size_in_bytes"] > 0
  reader = checkpoints.Checkpointer(str(model_dir))
  assert reader.all_steps() == [2, 4]
  reader.close()


@pytest.mark.slow
def test_evaluate_cli_matches_a_loss_computed_by_hand(cli, uninterrupted_run):
  model_dir = uninterrupted_run
  trainer_fixtures.run_cli(
      "colt5_flax.evaluate", _train_args(model_dir), env=cli["env"]
  )
  (result,) = _jsonl(model_dir / "eval" / "eval_metrics.jsonl")
  assert result["step"] == 4 and result["split"] == "validation"
  training_eval = _jsonl(model_dir / "eval_metrics.jsonl")[0]
  for metric in ("loss", "accuracy", "exact_match"):
    trainer_fixtures.assert_same_metric(
        result[f"{TASK}/{metric}"], training_eval[f"eval/{TASK}/{metric}"], metric
    )

  # By hand: the first 16 validation documents as bytes (+3: ByteVocabulary), cut to 63
  # bytes + EOS; value + EOS as targets; the model's per-token loss with step 4's params.
  inputs = np.zeros((16, 64), np.int32)
  targets = np.zeros((16, 8), np.int32)
  for i in range(16):
    example = _validation_example(i)
    inputs[i, :63] = np.frombuffer(example["inputs"].encode()[:63], np.uint8) + 3
    inputs[i, 63] = 1
    value = np.frombuffer(example["targets"].encode(), np.uint8) + 3
    targets[i, : len(value)] = value
    targets[i, len(value)] = 1
  decoder_inputs = np.concatenate([np.zeros((16, 1), np.int32), targets[:, :-1]], axis=1)
  params = _restore_state(model_dir / "checkpoint_4")["params"]
  model = trainer_fixtures.tiny_model(dropout_rate=0.1)
  loss, metrics = model.loss_fn(params, {
      "encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
      "decoder_target_tokens": targets}, None)
  trainer_fixtures.assert_same_metric(result[f"{TASK}/loss"], loss, "loss")
  trainer_fixtures.assert_same_metric(result[f"{TASK}/accuracy"], metrics["accuracy"], "accuracy")


@pytest.mark.slow
def test_infer_cli_writes_predictions(cli, uninterrupted_run):
  model_dir = uninterrupted_run
  output_dir = cli["root"] / "predictions"
  trainer_fixtures.run_cli(
      "colt5_flax.infer",
      _train_args(model_dir, f"--gin.INFER_OUTPUT_DIR='{output_dir}'",
                  "--gin.infer_script.infer.split='validation'"),
      env=cli["env"],
  )
  rows = _jsonl(output_dir / f"{TASK}-validation-4.jsonl")
  assert [row["id"] for row in rows] == list(range(16))
  for index, row in enumerate(rows):
    # What the model read: the document cut to 63 bytes (+ EOS, not shown).
    assert row["inputs"] == _validation_example(index)["inputs"][:63]
    assert isinstance(row["prediction"], str) and len(row["prediction"]) <= 7
  # The evaluation's exact match, recomputed from these predictions.
  hits = [row["prediction"] == _validation_example(i)["targets"] for i, row in enumerate(rows)]
  evaluation = _jsonl(model_dir / "eval_metrics.jsonl")[0]
  assert evaluation[f"eval/{TASK}/exact_match"] == pytest.approx(100.0 * np.mean(hits))


@pytest.mark.slow
def test_killed_and_preempted_run_resumes_bit_identically(cli, uninterrupted_run):
  model_dir = cli["root"] / "interrupted"
  args = _train_args(model_dir, "--gin.EVAL_PERIOD=0")

  # 1. SIGKILL right after checkpoint_2 is complete: no chance to clean up.
  killed = trainer_fixtures.run_cli(
      "tests.trainer_fixtures", args,
      env={**cli["env"], trainer_fixtures.SIGKILL_ENV: "2"}, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  # 2. Restart; SIGTERM after step 3: it saves checkpoint_3 and exits cleanly.
  preempted = trainer_fixtures.run_cli(
      "tests.trainer_fixtures", args, env={**cli["env"], trainer_fixtures.SIGTERM_ENV: "3"})
  assert "Resuming from" in preempted.stderr and "Preempted: saved checkpoint_3" in preempted.stderr
  reader = checkpoints.Checkpointer(str(model_dir))
  assert reader.latest_step() == 3
  reader.close()
  # 3. Restart again: runs step 4.
  trainer_fixtures.run_cli("tests.trainer_fixtures", args, env=cli["env"])

  expected = _restore_state(uninterrupted_run / "checkpoint_4")
  resumed = _restore_state(model_dir / "checkpoint_4")
  flat_expected = ocp.tree.to_flat_dict(expected)
  flat_resumed = ocp.tree.to_flat_dict(resumed)
  assert flat_expected.keys() == flat_resumed.keys()
  for key, value in flat_expected.items():
    np.testing.assert_array_equal(
        np.asarray(flat_resumed[key]), np.asarray(value), err_msg=str(key))
  uninterrupted_lines = _jsonl(uninterrupted_run / "train_metrics.jsonl")
  resumed_lines = _jsonl(model_dir / "train_metrics.jsonl")
  assert [line["step"] for line in resumed_lines] == [1, 2, 3, 4]  # each step logged once
  for a, b in zip(uninterrupted_lines, resumed_lines, strict=True):
    assert (a["loss"], a["accuracy"], a["grad_norm"]) == (b["loss"], b["accuracy"], b["grad_norm"])


@pytest.mark.slow
def test_cli_rejects_an_unknown_binding(cli, tmp_path):
  process = trainer_fixtures.run_cli(
      "colt5_flax.train", _train_args(tmp_path / "run", "--gin.TRAIN_STEP=5"),
      env=cli["env"], check=False)
  assert process.returncode != 0
  assert "did you mean TRAIN_STEPS" in process.stderr
  assert not (tmp_path / "run").exists()
