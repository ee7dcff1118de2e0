"""Shared pieces of the trainer, checkpoint and CLI tests.

- `tiny_model()`: the model of `configs/runs/test_tiny.gin` (T5.1.1-tiny: embed 32, 2
  encoder + 1 decoder layers, byte vocabulary), built from that file for the in-process
  tests, so they and the CLI runs train the same network.
- `random_batch()`: a seqio-shaped encoder-decoder batch of random byte tokens.
- `assert_same_step()`: two float32 runs of one train step agree (tests/tolerances.py).
- `python -m tests.trainer_fixtures ARGS`: runs `colt5_flax.train` and, when
  `COLT5_TEST_SIGKILL_AFTER_STEP=<step>` is set, SIGKILLs itself right after the
  checkpoint of that step is complete; with `COLT5_TEST_SIGTERM_AT_STEP=<step>` it sends
  itself SIGTERM once that step has run. Signals at known points: no timing races.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests import tolerances

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_GIN = REPO_ROOT / "configs" / "runs" / "test_tiny.gin"
SIGKILL_ENV = "COLT5_TEST_SIGKILL_AFTER_STEP"
SIGTERM_ENV = "COLT5_TEST_SIGTERM_AT_STEP"

INPUT_LENGTH = 64
TARGET_LENGTH = 8


def tiny_model(dropout_rate: float = 0.0, loss_normalizing_factor=None):
  """The test_tiny.gin model with `dropout_rate` (the file's is 0.1); gin is cleared after.

  Built by `model_files.frozen`, so it keeps working when later tests clear gin.
  """
  from colt5_flax import model_files

  bindings = [
      f"DROPOUT_RATE = {float(dropout_rate)!r}",
      f"LOSS_NORMALIZING_FACTOR = {loss_normalizing_factor!r}",
  ]
  with model_files.parsed([str(TINY_GIN)], bindings):
    return model_files.frozen("MODEL")


@functools.cache
def tiny_trainer(num_partitions: int | None, *, num_microbatches: int = 1,
                 dropout_rate: float = 0.0, batch_size: int = 8):
  """A Trainer of `tiny_model` (Adafactor, constant 0.01), cached for the whole session.

  `num_partitions=None` puts it on a one-device mesh (the reference); otherwise on all
  eight simulated devices as (8 / num_partitions, num_partitions). The cache shares the
  compiled steps between test modules.
  """
  import jax

  from colt5_flax import optimizers, partitioning
  from colt5_flax import trainer as trainer_lib

  if num_partitions is None:
    partitioner = partitioning.Partitioner(num_partitions=1, devices=[jax.devices()[0]])
  else:
    partitioner = partitioning.Partitioner(num_partitions=num_partitions)
  schedule = optimizers.constant_schedule(0.01)
  return trainer_lib.Trainer(
      tiny_model(dropout_rate),
      partitioner,
      optimizers.adafactor(schedule),
      schedule,
      trainer_lib.encdec_batch_shapes(
          batch_size, {"inputs": INPUT_LENGTH, "targets": TARGET_LENGTH}
      ),
      num_microbatches=num_microbatches,
      seed=0,
  )


# tests/tolerances.py's width and depth of `tiny_model`: the widest sum in the forward pass
# is the MLP's 64; a parameter's gradient sums over a batch's positions (8 × 64 inputs);
# the forward depth is 6 per encoder layer, 10 per decoder layer, 1 for the logits and 3
# for the loss, and the backward pass goes through all of it again.
FORWARD_DEPTH = 6 * 2 + 10 * 1 + 1 + 3
GRADIENT_TERMS = 8 * INPUT_LENGTH


def assert_same_metric(got: float, expected: float, name: str):
  """One metric (loss, z_loss, accuracy, grad_norm ...) of `tiny_model` from two float32
  programs over the same parameters and batch: the forward depth, or twice it for a norm of
  gradients."""
  depth = 2 * FORWARD_DEPTH if "grad" in name else FORWARD_DEPTH
  tolerances.assert_close(
      float(got), float(expected), num_terms=GRADIENT_TERMS, depth=depth, programs=2,
      what=name,
  )


def assert_same_step(metrics, expected_metrics, params, expected_params, *, names=None):
  """Two float32 runs of one train step from the same state summed in other orders.

  metrics: dicts with `loss` and `grad_norm` (and whichever `names` to compare too).
  params: trees of one step's results. At step 1 Adafactor's update is g/sqrt(g² + 1e-30),
  ±1 whatever g's rounding, times 0.01·rms(param): each parameter differs only by its own
  float32 rounding (depth 2: the step and the subtraction), relative to its tensor's size.
  Adafactor's second moments (g² at step 1) carry twice the gradients' relative error.
  """
  for name in names or ("loss", "grad_norm"):
    assert_same_metric(metrics[name], expected_metrics[name], name)
  import jax

  def check(path, got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    keys = jax.tree_util.keystr(path)
    if re.search(r"\.v(_row|_col)?\[", keys):  # optax's FactoredState.v, .v_row, .v_col
      tolerances.assert_close(
          got, expected, num_terms=GRADIENT_TERMS, depth=2 * 2 * FORWARD_DEPTH, programs=2,
          what=keys,
      )
    else:
      tolerances.assert_close(got, expected, num_terms=1, depth=2, programs=2, what=keys)

  jax.tree_util.tree_map_with_path(check, params, expected_params)


@functools.cache
def initial_host_state():
  """The initial TrainState of `tiny_trainer(None)`, as numpy (copy it onto any mesh)."""
  import jax

  return jax.device_get(tiny_trainer(None).create_state())


def random_batch(seed: int, batch_size: int, *, input_length=INPUT_LENGTH,
                 target_length=TARGET_LENGTH, min_target_length=1) -> dict[str, np.ndarray]:
  """Byte tokens with EOS and ragged padding, shaped like seqio's EncDecFeatureConverter."""
  rng = np.random.default_rng(seed)
  inputs = np.zeros((batch_size, input_length), np.int32)
  targets = np.zeros((batch_size, target_length), np.int32)
  for row in range(batch_size):
    n_in = int(rng.integers(input_length // 2, input_length + 1))
    n_out = int(rng.integers(min_target_length, target_length + 1))
    inputs[row, :n_in] = rng.integers(3, 259, n_in)
    inputs[row, n_in - 1] = 1
    targets[row, :n_out] = rng.integers(3, 259, n_out)
    targets[row, n_out - 1] = 1
  decoder_inputs = np.zeros_like(targets)
  decoder_inputs[:, 1:] = targets[:, :-1]
  return {
      "encoder_input_tokens": inputs,
      "decoder_target_tokens": targets,
      "decoder_input_tokens": decoder_inputs,
      "decoder_loss_weights": (targets > 0).astype(np.int32),
  }


def subprocess_env(compilation_cache_dir: str | None = None, num_devices: int = 2
                   ) -> dict[str, str]:
  """Environment of a CLI subprocess: `num_devices` CPU devices, quiet TF, a compile cache.

  The persistent compilation cache lets the second and later processes of a test reuse
  the first one's executables (the same config compiles the same programs).
  """
  env = dict(os.environ)
  # Other XLA flags (e.g. --xla_cpu_max_isa) carry over, so that a run of the suite under
  # them tests the subprocesses' kernels too.
  flags = [
      flag for flag in env.get("XLA_FLAGS", "").split()
      if not flag.startswith("--xla_force_host_platform_device_count")
  ]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
  if compilation_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def run_cli(module: str, args: list[str], *, env: dict[str, str], timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
  """`python -m <module> <args>` from the repository root; raises with its output if it fails."""
  process = subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  if check and process.returncode != 0:
    raise AssertionError(
        f"{module} {' '.join(args)} exited {process.returncode}\n"
        f"--- stdout ---\n{process.stdout[-4000:]}\n--- stderr ---\n{process.stderr[-8000:]}"
    )
  return process


def _install_sigkill_after(step: int) -> None:
  from colt5_flax import checkpoints

  original_save = checkpoints.Checkpointer.save

  def save_then_maybe_die(self, state, *args, **kwargs):
    saved = original_save(self, state, *args, **kwargs)
    if int(state.step) >= step:
      self.wait_until_finished()  # the checkpoint is complete (finalized) ...
      os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies without cleanup.
    return saved

  checkpoints.Checkpointer.save = save_then_maybe_die


def _install_sigterm_at(step: int) -> None:
  from colt5_flax import trainer as trainer_lib

  original_step = trainer_lib.Trainer.train_step

  def step_then_maybe_signal(self, state, batch):
    new_state, metrics = original_step(self, state, batch)
    if int(new_state.step) == step:
      os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would, mid-run
    return new_state, metrics

  trainer_lib.Trainer.train_step = step_then_maybe_signal


if __name__ == "__main__":
  if os.environ.get(SIGKILL_ENV):
    _install_sigkill_after(int(os.environ[SIGKILL_ENV]))
  if os.environ.get(SIGTERM_ENV):
    _install_sigterm_at(int(os.environ[SIGTERM_ENV]))
  from colt5_flax import train

  train.console_entry_point()
