"""A non-finite loss ends the training process, every time (issue 15 §6.1).

The hang it fixes: the FloatingPointError's traceback kept train()'s frame, and with it
the tf.data input iterator, alive until interpreter shutdown, where destroying the
iterator (its generator needs the GIL) hung the exiting process in 3 of 5 runs.
"""

import math

import jax
import numpy as np
import pytest
import tensorflow as tf

from colt5_flax import partitioning
from colt5_flax import train as train_lib
from colt5_flax import trainer as trainer_lib
from tests import trainer_fixtures


def _tf_iterators_in(traceback):
  found = []
  while traceback is not None:
    for name, value in traceback.tb_frame.f_locals.items():
      if isinstance(value, (tf.data.Iterator, tf.data.NumpyIterator)) or (
          type(value).__module__.startswith("tensorflow") and "Iterator" in type(value).__name__
      ):
        found.append(f"{traceback.tb_frame.f_code.co_name}: {name}")
    traceback = traceback.tb_next
  return found


def test_a_nan_stop_leaves_no_input_iterator_to_interpreter_shutdown(monkeypatch, tmp_path):
  """Deterministic: the steps are stand-ins returning a NaN loss (nothing compiles)."""
  host_state = trainer_lib.TrainState(
      step=np.int32(0), params={}, opt_state=(), rng=np.zeros(2, np.uint32))
  monkeypatch.setattr(trainer_lib.Trainer, "create_state", lambda self: host_state)
  monkeypatch.setattr(trainer_lib.Trainer, "compile_train_step", lambda self: None)

  def nan_step(self, state, batch):
    assert batch["encoder_input_tokens"].shape == (8, 64)  # the global batch reached it
    return state.replace(step=state.step + 1), {"loss": np.float32(math.nan)}

  monkeypatch.setattr(trainer_lib.Trainer, "train_step", nan_step)
  with pytest.raises(FloatingPointError, match="Non-finite loss nan at step 1") as error:
    train_lib.train(
        model=trainer_fixtures.tiny_model(),
        model_dir=str(tmp_path / "run"),
        mixture_or_task_name="synthetic_kv_retrieval_1024",
        task_feature_lengths={"inputs": 64, "targets": 8},
        train_steps=4,
        batch_size=8,
        partitioner=partitioning.Partitioner(devices=jax.devices()[:1]),
        eval_period=0,
        log_period=1,
    )
  assert _tf_iterators_in(error.value.__traceback__) == []


@pytest.mark.slow
def test_the_cli_exits_non_zero_on_a_nan_loss(tmp_path):
  process = trainer_fixtures.run_cli(
      "colt5_flax.train",
      ["--gin_file=runs/test_tiny.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
       "--gin.optimizers.constant_schedule.learning_rate=1e9", "--gin.EVAL_PERIOD=0"],
      env=trainer_fixtures.subprocess_env(str(tmp_path / "jax_cache")), timeout=300,
      check=False,
  )
  assert process.returncode == 1, process.stderr[-4000:]
  assert "FloatingPointError: Non-finite loss nan at step" in process.stderr
