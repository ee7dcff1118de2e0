"""Inference: decode a task's split with a checkpoint and write the predictions as JSONL.

    python -m colt5_flax.infer --gin_file=runs/test_tiny.gin \\
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.INFER_OUTPUT_DIR="'/tmp/run/infer'"

One file per task, `INFER_OUTPUT_DIR/<task>-<split>-<step>.jsonl`, one line per example
in the split's order: `{"id": ..., "prediction": ...}` (the example's `id` feature, e.g.
SCROLLS', else its index), plus `"inputs"` when `include_inputs`: the input text as the
model read it (decoded after truncation to the input length).
`prediction` is the decoded text after the task's `postprocess_fn`. Greedy decoding
unless the model's `decode_fn` says otherwise (CoLT5 §4 decodes greedily).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath

from colt5_flax import gin_utils, inference, jsonl, partitioning
from colt5_flax.data import tasks as tasks_lib


def infer(
    *,
    model,
    checkpoint_path: str,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    partitioner: partitioning.Partitioner,
    output_dir: str | None = None,
    split: str = "test",
    num_examples: int | None = None,
    include_inputs: bool = False,
) -> list[str]:
  """Writes predictions (gin: `infer_script.infer.*`); returns the files written.

  Args:
    model: `MODEL`.
    checkpoint_path: `CHECKPOINT_PATH`: a `checkpoint_<step>` dir or a `MODEL_DIR`.
    mixture_or_task_name, task_feature_lengths, batch_size: the usual macros.
    partitioner: mesh and rules.
    output_dir: `INFER_OUTPUT_DIR` (None: `<MODEL_DIR>/infer` of the checkpoint).
    split: the split to decode.
    num_examples: the first N examples of each task (None: all).
    include_inputs: also write each example's input text.
  """
  tasks_lib.get_task(mixture_or_task_name)
  partitioner.check_batch_size(batch_size)
  trainer, params, step = inference.restore_for_inference(
      model, partitioner, checkpoint_path, batch_size, task_feature_lengths
  )
  if output_dir is None:
    output_dir = str(inference.default_output_dir(checkpoint_path, "infer"))
  written = []
  for task in inference.tasks_with_split(mixture_or_task_name, split):
    examples = inference.load_examples(task, split, task_feature_lengths, num_examples)
    token_ids = inference.predict_examples(
        trainer, params, examples, task_feature_lengths, batch_size
    )
    vocabulary = task.output_features["targets"].vocabulary
    input_vocabulary = task.output_features["inputs"].vocabulary
    suffix = step if step is not None else "final"
    path = epath.Path(output_dir) / f"{task.name}-{split}-{suffix}.jsonl"
    records = []
    for index, (ids, example) in enumerate(zip(token_ids, examples, strict=True)):
      text = vocabulary.decode(ids.tolist())
      record = {
          "id": inference.feature_text(example["id"]) if "id" in example else index,
          "prediction": task.postprocess_fn(text, example=example, is_target=False),
      }
      if include_inputs:
        # What the model read: the tokens after truncation to the input length.
        record["inputs"] = input_vocabulary.decode(np.asarray(example["inputs"]).tolist())
      records.append(record)
    if jax.process_index() == 0:  # every process decoded every example; one writes
      jsonl.write(path, records)
      logging.info("Wrote %d predictions of %s to %s", len(examples), task.name, path)
    written.append(str(path))
  return written


def main(argv: Sequence[str]) -> None:
  gin_utils.configure_main(infer, argv)()


def console_entry_point() -> None:
  gin_utils.run(main)


if __name__ == "__main__":
  # Gin binds the package module's `infer` (`from colt5_flax import infer as infer_script`).
  from colt5_flax import infer as _package_module

  _package_module.console_entry_point()
