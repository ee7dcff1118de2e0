"""The evaluation CLI: score a checkpoint on a task's split with the task's seqio metrics.

    python -m colt5_flax.evaluate --gin_file=runs/test_tiny.gin \\
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.EVAL_OUTPUT_DIR="'/tmp/run/eval'"

`CHECKPOINT_PATH` is a `checkpoint_<step>` directory or a `MODEL_DIR` (its latest
checkpoint). Only the parameters are read. For each task of `MIXTURE_OR_TASK_NAME` that has
the split, `inference.evaluate_tasks` decodes and scores the examples (the loop the
training run also uses for its periodic evaluation). Results go to
`EVAL_OUTPUT_DIR/eval_metrics.jsonl` (one JSON object per call: `step`, `split`,
`<task>/<metric>` ...) and TensorBoard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from absl import logging
from etils import epath

from colt5_flax import checkpoints, gin_utils, inference, jsonl, partitioning
from colt5_flax.data import tasks as tasks_lib


def evaluate(
    *,
    model,
    checkpoint_path: str,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    partitioner: partitioning.Partitioner,
    output_dir: str | None = None,
    split: str = "validation",
    num_examples: int | None = None,
) -> dict[str, float]:
  """Scores a checkpoint (gin: `evaluate_script.evaluate.*`).

  Args:
    model: `model.EncoderDecoderModel` (`MODEL`).
    checkpoint_path: `CHECKPOINT_PATH`: a `checkpoint_<step>` dir or a `MODEL_DIR`.
    mixture_or_task_name, task_feature_lengths, batch_size: the usual macros.
    partitioner: mesh and rules (`NUM_PARTITIONS`).
    output_dir: `EVAL_OUTPUT_DIR` for `eval_metrics.jsonl` and TensorBoard (None: the
      checkpoint's `MODEL_DIR`/eval).
    split: the split to score.
    num_examples: the first N examples of each task (None: all).
  Returns:
    the metrics (`<task>/<metric>`).
  """
  tasks_lib.get_task(mixture_or_task_name)
  partitioner.check_batch_size(batch_size)
  trainer, params, step = inference.restore_for_inference(
      model, partitioner, checkpoint_path, batch_size, task_feature_lengths
  )
  results = inference.evaluate_tasks(
      trainer,
      params,
      mixture_or_task_name,
      task_feature_lengths,
      batch_size,
      split=split,
      num_examples=num_examples,
  )
  step_dir, _ = checkpoints.resolve_checkpoint(checkpoint_path)
  if output_dir is None:
    output_dir = str(inference.default_output_dir(checkpoint_path, "eval"))
  jsonl.append(
      epath.Path(output_dir) / "eval_metrics.jsonl",
      {"step": step, "split": split, "checkpoint": str(step_dir), **results},
  )
  _write_tensorboard(output_dir, step or 0, results)
  for name, value in sorted(results.items()):
    logging.info("%s = %s", name, value)
  return results


def _write_tensorboard(logdir: str, step: int, scalars: Mapping[str, float]) -> None:
  from clu import metric_writers

  writer = metric_writers.create_default_writer(
      logdir, just_logging=jax.process_index() > 0, asynchronous=False
  )
  writer.write_scalars(step, dict(scalars))
  writer.close()


def main(argv: Sequence[str]) -> None:
  gin_utils.configure_main(evaluate, argv)()


def console_entry_point() -> None:
  gin_utils.run(main)


if __name__ == "__main__":
  # Under `python -m` this file runs as `__main__`; gin files bind the package module's
  # `evaluate` (`from colt5_flax import evaluate as evaluate_script`), so run that one.
  from colt5_flax import evaluate as _package_module

  _package_module.console_entry_point()
