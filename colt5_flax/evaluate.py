"""Evaluation: score a checkpoint on a task's split with the task's seqio metrics.

    python -m colt5_flax.evaluate --gin_file=runs/test_tiny.gin \\
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.EVAL_OUTPUT_DIR="'/tmp/run/eval'"

`CHECKPOINT_PATH` is a `checkpoint_<step>` directory or a `MODEL_DIR` (its latest
checkpoint). Only the parameters are read. For each task of `MIXTURE_OR_TASK_NAME` that has
the split, the loop is what `seqio.Evaluator` does, in the open:
`Task.get_dataset` (no shuffle, one epoch) → batches padded to `BATCH_SIZE` → greedy
decoding (`model.predict_batch`) and teacher-forced loss → `task.postprocess_fn` on
predictions and targets → `task.predict_metric_fns` (and `score_metric_fns` on
`model.score_batch`). Results go to `EVAL_OUTPUT_DIR/eval_metrics.jsonl` (one JSON
object per call: `step`, `split`, `<task>/<metric>` ...) and TensorBoard.

The training loop calls `evaluate_tasks` for its periodic evaluation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
from absl import logging
from etils import epath

from colt5_flax import checkpoints, gin_utils, partitioning
from colt5_flax import trainer as trainer_lib

PyTree = Any


# -- Data ---------------------------------------------------------------------------------


def check_task(mixture_or_task_name: str) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture; ValueError naming the registered ones otherwise."""
  if not isinstance(mixture_or_task_name, str):
    raise ValueError(f"MIXTURE_OR_TASK_NAME must be a string, got {mixture_or_task_name!r}")
  try:
    return seqio.get_mixture_or_task(mixture_or_task_name)
  except ValueError:
    names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise ValueError(
        f"Unknown task or mixture MIXTURE_OR_TASK_NAME={mixture_or_task_name!r}. Registered: "
        f"{', '.join(names) or 'none'}. (Tasks register on import: does your gin file "
        "`import colt5_flax.data.tasks` or the module defining it?)"
    ) from None


def tasks_with_split(mixture_or_task_name: str, split: str) -> list[seqio.Task]:
  """The tasks of a mixture (or the task itself) that have `split`."""
  tasks = seqio.get_subtasks(check_task(mixture_or_task_name))
  kept = [task for task in tasks if split in task.splits]
  for task in tasks:
    if task not in kept:
      logging.warning("Task %s has no split %r; skipped", task.name, split)
  if not kept:
    raise ValueError(f"No task of {mixture_or_task_name!r} has the split {split!r}")
  return kept


def load_examples(
    task: seqio.Task,
    split: str,
    task_feature_lengths: Mapping[str, int],
    num_examples: int | None = None,
) -> list[dict[str, Any]]:
  """The task's preprocessed examples of `split` in order (tokenized, trimmed), as numpy."""
  dataset = task.get_dataset(
      sequence_length=dict(task_feature_lengths),
      split=split,
      shuffle=False,
      num_epochs=1,
      use_cached=False,
  )
  if num_examples is not None:
    dataset = dataset.take(num_examples)
  return list(dataset.as_numpy_iterator())


def encdec_batch(
    examples: Sequence[Mapping[str, Any]],
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
) -> dict[str, np.ndarray]:
  """What `seqio.EncDecFeatureConverter(pack=False)` emits, padded to `batch_size` rows.

  `encoder_input_tokens` [batch, inputs], `decoder_target_tokens` [batch, targets],
  `decoder_input_tokens` (targets shifted right, 0 first), `decoder_loss_weights`
  (targets != 0). Rows past `len(examples)` are all zeros: no tokens, no loss.
  """
  if len(examples) > batch_size:
    raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}")
  input_length = task_feature_lengths["inputs"]
  target_length = task_feature_lengths["targets"]
  inputs = np.zeros((batch_size, input_length), np.int32)
  targets = np.zeros((batch_size, target_length), np.int32)
  for row, example in enumerate(examples):
    encoder_tokens = np.asarray(example["inputs"])[:input_length]
    target_tokens = np.asarray(example.get("targets", []), np.int32)[:target_length]
    inputs[row, : len(encoder_tokens)] = encoder_tokens
    targets[row, : len(target_tokens)] = target_tokens
  decoder_inputs = np.zeros_like(targets)
  decoder_inputs[:, 1:] = targets[:, :-1]
  return {
      "encoder_input_tokens": inputs,
      "decoder_target_tokens": targets,
      "decoder_input_tokens": decoder_inputs,
      "decoder_loss_weights": (targets != 0).astype(np.int32),
  }


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start : start + size]


# -- Model calls --------------------------------------------------------------------------


def predict_examples(
    trainer: trainer_lib.Trainer,
    params: PyTree,
    examples: Sequence[Mapping[str, Any]],
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
) -> list[np.ndarray]:
  """Decoded token ids (up to the target length) of each example, in order."""
  predictions = []
  for chunk in _chunks(examples, batch_size):
    batch = encdec_batch(chunk, task_feature_lengths, batch_size)
    features = {
        "encoder_input_tokens": batch["encoder_input_tokens"],
        # No prompt: decoding starts from the start token (0) at every position.
        "decoder_input_tokens": np.zeros_like(batch["decoder_input_tokens"]),
    }
    decoded = trainer.predict_step(params, trainer.partitioner.shard_global_batch(features))
    predictions.extend(np.asarray(decoded)[: len(chunk)])
  return predictions


def _to_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _metric_value(value) -> float:
  value = getattr(value, "value", value)  # seqio.metrics.Scalar
  return float(np.asarray(value))


def evaluate_tasks(
    trainer: trainer_lib.Trainer,
    params: PyTree,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    split: str = "validation",
    num_examples: int | None = None,
    compute_loss: bool = True,
) -> dict[str, float]:
  """Metrics of every task of `mixture_or_task_name` on `split`.

  Returns:
    `{'<task>/<metric>': value}`: the task's seqio metrics on greedy predictions, plus
    teacher-forced `<task>/loss` and `<task>/accuracy` (per target token) and
    `<task>/num_examples`.
  """
  results: dict[str, float] = {}
  for task in tasks_with_split(mixture_or_task_name, split):
    examples = load_examples(task, split, task_feature_lengths, num_examples)
    if not examples:
      logging.warning("Task %s has no %s examples; skipped", task.name, split)
      continue
    prefix = f"{task.name}/"
    results[prefix + "num_examples"] = float(len(examples))
    vocabulary = task.output_features["targets"].vocabulary

    if compute_loss:
      per_batch = []
      for chunk in _chunks(examples, batch_size):
        batch = encdec_batch(chunk, task_feature_lengths, batch_size)
        metrics = trainer.eval_step(params, trainer.partitioner.shard_global_batch(batch))
        per_batch.append(jax.device_get(metrics))
      stacked = {k: np.stack([m[k] for m in per_batch]) for k in per_batch[0]}
      combined = trainer_lib.combine_metrics(
          stacked,
          loss_normalizing_factor=getattr(trainer.model, "loss_normalizing_factor", None),
          per_token=True,
      )
      for name in ("loss", "accuracy"):
        results[prefix + name] = float(combined[name])

    if task.predict_metric_fns or task.score_metric_fns:
      targets = [
          task.postprocess_fn(
              _to_text(example["targets_pretokenized"])
              if "targets_pretokenized" in example
              else vocabulary.decode(np.asarray(example["targets"]).tolist()),
              example=example,
              is_target=True,
          )
          for example in examples
      ]
    if task.predict_metric_fns:
      token_ids = predict_examples(trainer, params, examples, task_feature_lengths, batch_size)
      predictions = [
          task.postprocess_fn(vocabulary.decode(ids.tolist()), example=example, is_target=False)
          for ids, example in zip(token_ids, examples, strict=True)
      ]
      for metric_fn in task.predict_metric_fns:
        for name, value in metric_fn(targets, predictions).items():
          results[prefix + name] = _metric_value(value)
    if task.score_metric_fns:
      scores = []
      for chunk in _chunks(examples, batch_size):
        batch = encdec_batch(chunk, task_feature_lengths, batch_size)
        batch_scores = trainer.score_step(params, trainer.partitioner.shard_global_batch(batch))
        scores.extend(np.asarray(batch_scores)[: len(chunk)].tolist())
      for metric_fn in task.score_metric_fns:
        for name, value in metric_fn(targets, scores).items():
          results[prefix + name] = _metric_value(value)
  return results


# -- Files --------------------------------------------------------------------------------


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
  """Appends one JSON object as a line (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  line = json.dumps({k: _jsonable(v) for k, v in record.items()}, sort_keys=False)
  with path.open("a") as f:
    f.write(line + "\n")


def drop_jsonl_records_after(path: str | os.PathLike, step: int) -> None:
  """Removes lines whose `step` is beyond `step`: a resumed run writes them again."""
  path = epath.Path(path)
  if jax.process_index() != 0 or not path.exists():
    return
  kept = [
      line
      for line in path.read_text().splitlines()
      if line.strip() and json.loads(line).get("step", -1) <= step
  ]
  path.write_text("".join(line + "\n" for line in kept))


def _jsonable(value):
  if isinstance(value, (np.generic, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


# -- Entry point --------------------------------------------------------------------------


def restore_for_inference(
    model,
    partitioner: partitioning.Partitioner,
    checkpoint_path: str,
    batch_size: int,
    task_feature_lengths: Mapping[str, int],
) -> tuple[trainer_lib.Trainer, PyTree, int | None]:
  """A `Trainer` without optimizer, and the checkpoint's parameters placed on its mesh."""
  batch_shapes = trainer_lib.encdec_batch_shapes(batch_size, task_feature_lengths)
  trainer = trainer_lib.Trainer(model, partitioner, None, None, batch_shapes)
  step_dir, step = checkpoints.resolve_checkpoint(checkpoint_path)
  params = checkpoints.restore_params(str(step_dir), trainer.abstract_params)
  return trainer, params, step


def default_output_dir(checkpoint_path: str, name: str) -> epath.Path:
  """`<MODEL_DIR>/<name>` for a checkpoint of a run, else `<checkpoint_path>/<name>`."""
  step_dir, step = checkpoints.resolve_checkpoint(checkpoint_path)
  return (step_dir.parent if step is not None else step_dir) / name


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
  check_task(mixture_or_task_name)
  partitioner.check_batch_size(batch_size)
  trainer, params, step = restore_for_inference(
      model, partitioner, checkpoint_path, batch_size, task_feature_lengths
  )
  results = evaluate_tasks(
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
    output_dir = str(default_output_dir(checkpoint_path, "eval"))
  append_jsonl(
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
