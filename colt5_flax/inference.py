"""Running a model on a task's examples: what evaluation, inference, training and the demo share.

- `restore_for_inference`: a `Trainer` without optimizer and a checkpoint's parameters.
- `tasks_with_split`, `load_examples`: a task's preprocessed examples, in order.
- `encdec_batch`: examples as the batch `seqio.EncDecFeatureConverter(pack=False)` emits.
- `predict_examples`: greedy (or the model's `decode_fn`) token ids of each example.
- `evaluate_tasks`: each task's seqio metrics, teacher-forced loss and accuracy.

The loop of `evaluate_tasks` is what `seqio.Evaluator` does, in the open:
`Task.get_dataset` (no shuffle, one epoch) → batches padded to `batch_size` → decoding
(`model.predict_batch`) and teacher-forced loss → `task.postprocess_fn` on predictions and
targets → `task.predict_metric_fns` (and `score_metric_fns` on `model.score_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
from absl import logging
from etils import epath

from colt5_flax import checkpoints, partitioning
from colt5_flax import trainer as trainer_lib
from colt5_flax.data import tasks as tasks_lib

PyTree = Any


def feature_text(value) -> str:
  """A string feature of a numpy example (bytes or a 0-d array of bytes) as text."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


# -- Checkpoints --------------------------------------------------------------------------


def restore_for_inference(
    model,
    partitioner: partitioning.Partitioner,
    checkpoint_path: str,
    batch_size: int,
    task_feature_lengths: Mapping[str, int],
) -> tuple[trainer_lib.Trainer, PyTree, int | None]:
  """A `Trainer` without optimizer, and the checkpoint's parameters placed on its mesh.

  Returns:
    (trainer, params, the checkpoint's step or None for a bare parameter directory).
  """
  batch_shapes = trainer_lib.encdec_batch_shapes(batch_size, task_feature_lengths)
  trainer = trainer_lib.Trainer(model, partitioner, None, None, batch_shapes)
  step_dir, step = checkpoints.resolve_checkpoint(checkpoint_path)
  params = checkpoints.restore_params(str(step_dir), trainer.abstract_params)
  return trainer, params, step


def default_output_dir(checkpoint_path: str, name: str) -> epath.Path:
  """`<MODEL_DIR>/<name>` for a checkpoint of a run, else `<checkpoint_path>/<name>`."""
  step_dir, step = checkpoints.resolve_checkpoint(checkpoint_path)
  return (step_dir.parent if step is not None else step_dir) / name


# -- Examples and batches -----------------------------------------------------------------


def tasks_with_split(mixture_or_task_name: str, split: str) -> list[seqio.Task]:
  """The tasks of a mixture (or the task itself) that have `split`."""
  tasks = seqio.get_subtasks(tasks_lib.get_task(mixture_or_task_name))
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


def batches(
    examples: Sequence[Mapping[str, Any]],
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """`(number of real rows, encdec_batch)` for consecutive chunks of `examples`."""
  for start in range(0, len(examples), batch_size):
    chunk = examples[start : start + batch_size]
    yield len(chunk), encdec_batch(chunk, task_feature_lengths, batch_size)


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
  for num_rows, batch in batches(examples, task_feature_lengths, batch_size):
    features = {
        "encoder_input_tokens": batch["encoder_input_tokens"],
        # No prompt: decoding starts from the start token (0) at every position.
        "decoder_input_tokens": np.zeros_like(batch["decoder_input_tokens"]),
    }
    decoded = trainer.predict_step(params, trainer.partitioner.shard_global_batch(features))
    predictions.extend(np.asarray(decoded)[:num_rows])
  return predictions


def _metric_value(value) -> float:
  value = getattr(value, "value", value)  # seqio.metrics.Scalar
  return float(np.asarray(value))


def _teacher_forced_metrics(trainer, params, examples, task_feature_lengths, batch_size):
  per_batch = []
  for _, batch in batches(examples, task_feature_lengths, batch_size):
    metrics = trainer.eval_step(params, trainer.partitioner.shard_global_batch(batch))
    per_batch.append(jax.device_get(metrics))
  stacked = {k: np.stack([m[k] for m in per_batch]) for k in per_batch[0]}
  combined = trainer_lib.combine_metrics(
      stacked,
      loss_normalizing_factor=getattr(trainer.model, "loss_normalizing_factor", None),
      per_token=True,
  )
  return {name: float(combined[name]) for name in ("loss", "accuracy")}


def _scores(trainer, params, examples, task_feature_lengths, batch_size) -> list[float]:
  scores = []
  for num_rows, batch in batches(examples, task_feature_lengths, batch_size):
    batch_scores = trainer.score_step(params, trainer.partitioner.shard_global_batch(batch))
    scores.extend(np.asarray(batch_scores)[:num_rows].tolist())
  return scores


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
      for name, value in _teacher_forced_metrics(
          trainer, params, examples, task_feature_lengths, batch_size
      ).items():
        results[prefix + name] = value
    if not (task.predict_metric_fns or task.score_metric_fns):
      continue
    targets = [
        task.postprocess_fn(
            feature_text(example["targets_pretokenized"])
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
      scores = _scores(trainer, params, examples, task_feature_lengths, batch_size)
      for metric_fn in task.score_metric_fns:
        for name, value in metric_fn(targets, scores).items():
          results[prefix + name] = _metric_value(value)
  return results
