"""Training: the loop, read top to bottom (flax `examples/lm1b` style), with t5x's CLI.

    python -m colt5_flax.train --gin_file=runs/test_tiny.gin \\
      --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=100

Gin macros (t5x's, plus ours): `MODEL_DIR`, `MIXTURE_OR_TASK_NAME`,
`TASK_FEATURE_LENGTHS`, `TRAIN_STEPS`, `BATCH_SIZE`, `INITIAL_CHECKPOINT_PATH`,
`CHECKPOINT_PERIOD`, `EVAL_PERIOD`, `NUM_PARTITIONS` (model-parallel size; data-parallel
size = devices / NUM_PARTITIONS), `REPORT_MEMORY`.

What a run leaves in `MODEL_DIR`:
- `config.gin`: the operative gin configuration;
- `checkpoint_<step>/`: orbax checkpoints (state + data position), see `checkpoints.py`;
- `train_metrics.jsonl`: one JSON object per logged step: `step`, `loss`, `accuracy`,
  `learning_rate`, `steps_per_sec`, `z_loss`, `cross_ent_loss`, `grad_norm`,
  `num_tokens`, `routing/*` (averages over the steps since the previous line;
  `steps_per_sec` counts training time only, evaluation and saving excluded);
- `eval_metrics.jsonl`: one object per evaluation: `step`, `eval/<task>/<metric>`;
- `train/`, `eval/`: TensorBoard summaries (clu metric writers);
- `memory.json` with `REPORT_MEMORY = True`: the compiled step's memory analysis.

Resuming is automatic: a run finds the latest complete checkpoint in `MODEL_DIR`, restores
it onto the current mesh, and skips the batches already consumed, so the continued run
is bit-identical to an uninterrupted one (an unreadable latest checkpoint is skipped for
the previous one and moved aside, see `checkpoints.py`); a run resumed with another task,
lengths, batch size or seed starts that new stream at its first batch (a curriculum's
next stage: colt5_flax/demo.py). Every host reads the same global
batches, so a run may resume on a different number of hosts (docs/multihost.md). SIGTERM
(preemption) saves a checkpoint and returns cleanly; with several processes they agree
on the step first. A non-finite loss stops the run with FloatingPointError naming the
step; no checkpoint is written after it.

The console gets the mesh, the process count and each host's rows at start, not the
configuration (that is `MODEL_DIR/config.gin`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
import seqio
import tensorflow as tf
from absl import logging
from etils import epath

from colt5_flax import checkpoints, gin_utils, inference, jsonl, optimizers, partitioning
from colt5_flax import trainer as trainer_lib
from colt5_flax.data import tasks as tasks_lib


def train_batches(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    seed: int,
    shard_info: seqio.ShardInfo | None = None,
    pack: bool = False,
    use_cached: bool = False,
    shuffle: bool = True,
    skip_batches: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """The global training batches `[batch_size, length]`, endlessly repeated.

  Every host reads the same global stream and keeps its own rows of each batch (the
  trainer places them with `Partitioner.shard_global_batch`), so a global batch holds the
  same examples whatever the number of hosts: a job checkpointed on N hosts resumes on M
  with the same data order (docs/multihost.md; seqio's per-host `shard_info` would give
  each host count a different stream).

  Deterministic for a given seed (seqio shuffles and seeds its preprocessors from it), so
  `skip_batches` (the `batches_consumed` of a checkpoint, counted in global batches)
  resumes exactly where an interrupted run stopped. Skipping replays the preprocessing of
  the skipped batches; it never reaches the model.

  Args:
    shard_info: None for the global batch; `ShardInfo(index, num_shards)` for the
      contiguous rows `[index * b, (index + 1) * b)`, `b = batch_size / num_shards`, of
      each global batch (a host's rows on a mesh whose hosts hold contiguous rows).
  """
  dataset = seqio.get_dataset(
      mixture_or_task_name,
      task_feature_lengths=dict(task_feature_lengths),
      feature_converter=seqio.EncDecFeatureConverter(pack=pack),
      dataset_split="train",
      use_cached=use_cached,
      shuffle=shuffle,
      num_epochs=None,
      verbose=False,
      seed=seed,
  )
  dataset = dataset.batch(batch_size, drop_remainder=True)
  if skip_batches:
    dataset = dataset.skip(skip_batches)
  if shard_info is not None and shard_info.num_shards > 1:
    rows = batch_size // shard_info.num_shards
    start = shard_info.index * rows
    dataset = dataset.map(lambda batch: {k: v[start : start + rows] for k, v in batch.items()})
  return dataset.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


class _Preemption:
  """Whether to save and stop: SIGTERM on one host, JAX's preemption sync point on many.

  One process: a SIGTERM handler sets a flag the loop checks between steps (the previous
  handler is restored on exit). Several processes must agree on the step at which they
  all stop and save, so they ask JAX's preemption sync manager (started by
  `jax.distributed.initialize`, which also catches SIGTERM) through orbax at every step.
  """

  def __init__(self, checkpointer: checkpoints.Checkpointer):
    self._checkpointer = checkpointer
    self._multi_host = jax.process_count() > 1
    self.received = False
    self._previous = None

  def __enter__(self):
    if self._multi_host:
      return self
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    else:
      logging.warning("Not in the main thread: SIGTERM will not trigger a checkpoint")
    return self

  def check(self, step: int) -> bool:
    if self._multi_host and not self.received:
      self.received = self._checkpointer.manager.reached_preemption(step)
    return self.received

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
    self.received = True

  def __exit__(self, *exc_info):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_positive(name: str, value, *, allow_zero: bool = False) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
    kind = "a non-negative" if allow_zero else "a positive"
    raise ValueError(f"{name} must be {kind} integer, got {value!r}")


def _check_model_dir(model_dir) -> str:
  if not isinstance(model_dir, (str, os.PathLike)) or not str(model_dir):
    raise ValueError(
        f"MODEL_DIR must be a directory path, got {model_dir!r}; pass "
        "--gin.MODEL_DIR=\"'/path/to/run'\""
    )
  return str(model_dir)


def _check_finite(step: int, metrics: Mapping[str, jax.Array], model_dir: str,
                  checkpointer: checkpoints.Checkpointer) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    checkpointer.wait_until_finished()  # earlier saves in flight are of finite states
    raise FloatingPointError(
        f"Non-finite loss {loss} at step {step}; stopping. The latest complete checkpoint "
        f"(step {checkpointer.latest_step()}) in {model_dir} is untouched."
    )


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def train(
    *,
    model,
    model_dir: str,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    train_steps: int,
    batch_size: int,
    partitioner: partitioning.Partitioner,
    optimizer: Callable[..., optax.GradientTransformation] = optimizers.adafactor,
    learning_rate_schedule: Callable[[Any], Any] | None = None,
    num_microbatches: int = 1,
    seed: int = 0,
    pack: bool = False,
    use_cached: bool = False,
    shuffle: bool = True,
    initial_checkpoint_path: str | None = None,
    checkpoint_period: int = 1000,
    keep_checkpoints: int | None = 3,
    keep_best_checkpoints: int = 0,
    best_metric: str | None = None,
    best_metric_mode: str = "max",
    async_checkpointing: bool = True,
    eval_period: int = 1000,
    eval_split: str = "validation",
    eval_batch_size: int | None = None,
    eval_num_examples: int | None = None,
    log_period: int = 100,
    report_memory: bool = False,
) -> trainer_lib.TrainState:
  """Trains `model` to `train_steps` optimizer updates (gin: `train_script.train.*`).

  Args:
    model: `model.EncoderDecoderModel` (`MODEL`).
    model_dir: `MODEL_DIR`.
    mixture_or_task_name: `MIXTURE_OR_TASK_NAME`, a registered seqio task or mixture.
    task_feature_lengths: `TASK_FEATURE_LENGTHS`, `{'inputs': n, 'targets': m}`.
    train_steps: `TRAIN_STEPS`, the total number of optimizer updates (a resumed run
      continues up to it; fine-tuning from `initial_checkpoint_path` counts from 0).
    batch_size: `BATCH_SIZE`, global examples per step; must divide over `data` and hosts.
    partitioner: mesh and logical axis rules (`NUM_PARTITIONS`).
    optimizer: factory called as `optimizer(learning_rate=learning_rate_schedule)`
      (gin: `@optimizers.adafactor`, no parentheses).
    learning_rate_schedule: a schedule of the step (default T5.1.1 rsqrt).
    num_microbatches: gradient accumulation (t5x's name); one step is one update.
    seed: parameter initialisation, dropout and data order.
    pack: pack several examples per row (seqio; segment ids reach the model).
    use_cached: read seqio's offline cache of the task.
    shuffle: shuffle the training data (seqio, seeded).
    initial_checkpoint_path: `INITIAL_CHECKPOINT_PATH`: parameters to start from
      (fine-tuning; fresh optimizer, step 0). Ignored when `model_dir` has a checkpoint.
    checkpoint_period: `CHECKPOINT_PERIOD`, steps between saves (plus the final step).
    keep_checkpoints: the latest N kept (None: all).
    keep_best_checkpoints: also keep the N best by `best_metric` (a key of the eval
      metrics, e.g. 'eval/synthetic_kv_retrieval/exact_match'; CoLT5 §4 picks the best
      dev checkpoint). A checkpoint is saved at every evaluation when this is > 0.
    best_metric_mode: 'max' or 'min'.
    async_checkpointing: write checkpoints in the background.
    eval_period: `EVAL_PERIOD`, steps between evaluations (0: none; also after the last
      step).
    eval_split, eval_batch_size, eval_num_examples: what evaluation reads (batch size
      default `batch_size`; all examples by default).
    log_period: steps between lines of `train_metrics.jsonl` and TensorBoard points.
    report_memory: `REPORT_MEMORY`: log and write the compiled step's memory needs.

  Returns:
    the final (or preempted) `TrainState`.
  """
  # -- Checks that need no compilation --------------------------------------------------
  model_dir = _check_model_dir(model_dir)
  tasks_lib.get_task(mixture_or_task_name)
  batch_shapes = trainer_lib.encdec_batch_shapes(batch_size, task_feature_lengths, pack=pack)
  _check_positive("TRAIN_STEPS", train_steps)
  _check_positive("CHECKPOINT_PERIOD", checkpoint_period)
  _check_positive("EVAL_PERIOD", eval_period, allow_zero=True)
  _check_positive("log_period", log_period)
  partitioner.check_batch_size(batch_size)
  eval_batch_size = eval_batch_size or batch_size
  if eval_period:
    partitioner.check_batch_size(eval_batch_size, name="eval_batch_size")
  if keep_best_checkpoints and not (eval_period and best_metric):
    raise ValueError("keep_best_checkpoints needs eval_period > 0 and a best_metric")
  schedule = learning_rate_schedule or optimizers.rsqrt_schedule()
  trainer = trainer_lib.Trainer(
      model,
      partitioner,
      optimizer(learning_rate=schedule),
      schedule,
      batch_shapes,
      num_microbatches=num_microbatches,
      seed=seed,
  )
  trainer.abstract_state  # noqa: B018 -- parameter shardings checked (shapes only)
  gin_utils.check_ablations_apply()  # the model is built: gin knows what it read
  partitioning.log_topology(partitioner, batch_size)

  is_chief = jax.process_index() == 0
  model_path = epath.Path(model_dir)
  if is_chief:
    model_path.mkdir(parents=True, exist_ok=True)
    config = gin_utils.operative_config()
    if config.strip():
      (model_path / "config.gin").write_text(config)

  checkpointer = checkpoints.Checkpointer(
      model_dir,
      keep=keep_checkpoints,
      keep_best=keep_best_checkpoints,
      best_metric=best_metric,
      best_mode=best_metric_mode,
      async_save=async_checkpointing,
  )
  from clu import metric_writers

  train_writer = metric_writers.create_default_writer(
      os.path.join(model_dir, "train"), just_logging=not is_chief
  )
  eval_writer = metric_writers.create_default_writer(
      os.path.join(model_dir, "eval"), just_logging=not is_chief
  )
  train_log = model_path / "train_metrics.jsonl"
  eval_log = model_path / "eval_metrics.jsonl"

  with _Preemption(checkpointer) as preemption:
    try:
      # -- State: resume, fine-tune, or start fresh -------------------------------------
      # Leftovers of a save cut short would block their step and count as kept.
      checkpointer.remove_incomplete()
      restored = checkpointer.restore_latest(trainer.abstract_state)
      # What identifies the data stream a checkpoint's `batches_consumed` counts in.
      stream = {
          "mixture_or_task_name": mixture_or_task_name,
          "task_feature_lengths": dict(task_feature_lengths),
          "batch_size": batch_size,
          "seed": seed,
      }
      if restored is not None:
        latest_step, state, data_position = restored
        logging.info("Resuming from %s/checkpoint_%d", model_dir, latest_step)
        if _data_changed(data_position, stream):
          data_position = {}  # A different stream starts at its first batch.
      elif initial_checkpoint_path:
        logging.info("Initialising parameters from %s", initial_checkpoint_path)
        params = checkpoints.restore_params(initial_checkpoint_path, trainer.abstract_params)
        state, data_position = trainer.state_from_params(params), {}
      else:
        state, data_position = trainer.create_state(), {}
      start_step = int(jax.device_get(state.step))
      batches_consumed = int(data_position.get("batches_consumed", 0))
      # Lines a killed run wrote after its last checkpoint are written again below.
      jsonl.drop_records_after(train_log, start_step)
      jsonl.drop_records_after(eval_log, start_step)

      def position():
        return {"batches_consumed": batches_consumed, **stream}

      if start_step >= train_steps:
        logging.info("Step %d >= TRAIN_STEPS=%d: nothing to do", start_step, train_steps)
        return state

      batches = train_batches(
          mixture_or_task_name,
          task_feature_lengths,
          batch_size,
          seed=seed,
          pack=pack,
          use_cached=use_cached,
          shuffle=shuffle,
          skip_batches=batches_consumed,
      )

      compile_start = time.time()
      compiled_step = trainer.compile_train_step()
      logging.info("Compiled the train step in %.1fs", time.time() - compile_start)
      memory = trainer_lib.memory_report(compiled_step) if report_memory else None
      # Hosts start the first step together: one that is still compiling or reading its
      # data would otherwise leave the others' first collective to time out.
      partitioning.barrier("train_loop")

      # -- The loop -----------------------------------------------------------------------
      unchecked = None  # (step, metrics) whose loss is not yet checked for finiteness
      window: list[dict[str, jax.Array]] = []
      window_start, window_overhead = time.time(), 0.0  # overhead: evaluation and saving
      for step in range(start_step, train_steps):
        if preemption.check(step):
          break
        global_batch = next(batches)
        model.validate_batch(global_batch)
        state, metrics = trainer.train_step(state, partitioner.shard_global_batch(global_batch))
        batches_consumed += 1
        if unchecked is not None:
          # The previous step's loss: checked while this step runs on the devices.
          _check_finite(*unchecked, model_dir, checkpointer)
        new_step = step + 1
        unchecked = (new_step, metrics)
        window.append(metrics)
        is_last = new_step == train_steps

        if memory is not None:
          memory.update(trainer_lib.device_memory_stats())
          logging.info("Memory of a train step: %s", memory)
          if is_chief:
            (model_path / "memory.json").write_text(json.dumps(memory, indent=2))
          memory = None

        if new_step % log_period == 0 or is_last or preemption.received:
          _check_finite(*unchecked, model_dir, checkpointer)
          elapsed = time.time() - window_start - window_overhead
          summary = _summarize(window)
          summary["steps_per_sec"] = len(window) / max(elapsed, 1e-9)
          eta = (train_steps - new_step) / summary["steps_per_sec"]
          logging.info(
              "step %d/%d (%.1f%%): loss %.4f, accuracy %.4f, lr %.3g, %.2f steps/s, ETA %s",
              new_step, train_steps, 100.0 * new_step / train_steps, summary["loss"],
              summary["accuracy"], summary.get("learning_rate", float("nan")),
              summary["steps_per_sec"], _format_duration(eta),
          )
          train_writer.write_scalars(new_step, summary)
          jsonl.append(train_log, {"step": new_step, **summary})
          window, window_start, window_overhead = [], time.time(), 0.0

        overhead_start = time.time()
        eval_metrics = None
        if eval_period and (new_step % eval_period == 0 or is_last):
          _check_finite(*unchecked, model_dir, checkpointer)
          eval_metrics = {
              f"eval/{name}": value
              for name, value in inference.evaluate_tasks(
                  trainer,
                  state.params,
                  mixture_or_task_name,
                  task_feature_lengths,
                  eval_batch_size,
                  split=eval_split,
                  num_examples=eval_num_examples,
              ).items()
          }
          logging.info("step %d evaluation: %s", new_step, eval_metrics)
          eval_writer.write_scalars(new_step, eval_metrics)
          jsonl.append(eval_log, {"step": new_step, **eval_metrics})

        save_for_best = keep_best_checkpoints and eval_metrics is not None
        if new_step % checkpoint_period == 0 or is_last or preemption.received or save_for_best:
          _check_finite(*unchecked, model_dir, checkpointer)
          checkpointer.save(state, position(), metrics=eval_metrics if save_for_best else None)
        window_overhead += time.time() - overhead_start

      if preemption.received:
        if unchecked is not None:
          _check_finite(*unchecked, model_dir, checkpointer)
        checkpointer.save(state, position())
        checkpointer.wait_until_finished()
        logging.warning(
            "Preempted: saved checkpoint_%d in %s; exiting", int(state.step), model_dir
        )
      return state
    finally:
      # Drop the input pipeline now. An exception's traceback keeps this frame, and with
      # it the tf.data iterator, alive until interpreter shutdown, where destroying it
      # (its generator needs the GIL) hung the exiting process in some runs.
      batches = None  # noqa: F841
      # A failed run (e.g. a non-finite loss) saves nothing here: in-flight saves of
      # earlier, finite states complete, and the latest complete checkpoint stays.
      checkpointer.close()
      train_writer.close()
      eval_writer.close()


def _summarize(window: Sequence[Mapping[str, jax.Array]]) -> dict[str, float]:
  """Means over the logged window of steps (num_tokens: mean per step)."""
  host = jax.device_get(list(window))
  return {name: float(np.mean([m[name] for m in host])) for name in host[0]}


def _data_changed(data_position: Mapping[str, Any], stream: Mapping[str, Any]) -> bool:
  """Whether the checkpoint's data position belongs to another stream (module doc)."""
  changed = {
      k: (data_position[k], v) for k, v in stream.items()
      if k in data_position and data_position[k] != v
  }
  if changed:
    logging.info(
        "The checkpoint's data position was recorded for other data settings "
        "(checkpoint, now): %s; the new data stream starts at its first batch", changed,
    )
  return bool(changed)


def main(argv: Sequence[str]) -> None:
  gin_utils.configure_main(train, argv)()


def console_entry_point() -> None:
  gin_utils.run(main)


if __name__ == "__main__":
  # Under `python -m` this file runs as `__main__`; gin files bind the package module's
  # `train` (`from colt5_flax import train as train_script`), so run that one.
  from colt5_flax import train as _package_module

  _package_module.console_entry_point()
