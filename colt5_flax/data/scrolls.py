"""SCROLLS (Shaham et al., 2022) as seqio tasks: TFDS or the official released files.

The seven tasks (`scrolls_table`: names, lengths, metrics) are released as one row per
(example, reference) (`scrolls_files` reads the files and TFDS); rows that share an `id`
are one example with several references. `input` already holds the question for the QA
tasks, so `inputs = input`.

Two sources, same examples:
- `scrolls_<task>` reads TFDS `scrolls/<config>:1.0.0`. That builder is in the
  tensorflow-datasets catalogue (`tensorflow_datasets/text/scrolls`; it downloads the
  official zips). Machines without internet can build it from the zips with
  `scrolls_files.prepare_tfds_from_local`.
- `scrolls_<task>_local` reads the official files from a directory: the `data_dir`
  argument of `register_scrolls_local_tasks`, else the environment variable
  `SCROLLS_DATA_DIR`, read when the dataset is built (so a cluster sets it per job).

What the tasks do:
- training keeps one example per row (per reference); validation and test group the rows
  of an `id` into one example, `targets` = the first reference and `references` = all of
  them (like the official evaluator's `drop_duplicates_in_input`), in file order for the
  local tasks and in TFDS's (shuffled) write order for the TFDS ones; the metric takes the
  best reference, so the order only decides which one is `targets`;
- `id` survives preprocessing (with `references`, `inputs_pretokenized`, ...); the
  feature converter drops them unless told to carry them
  (`tasks.EncDecFeatureConverterWithPassthrough`, e.g. for `id`);
- a row with an empty `input`, or an empty `output` outside the test split, is skipped
  and logged (`row_counts` counts them in the official files); a malformed line fails
  with file:line, a missing field names the field;
- inputs and targets are cut to the task's lengths (the `sequence_length` the caller
  passes, else the task's lengths in `scrolls_table`); each example says whether it was
  cut (`inputs_truncated`, `targets_truncated`, summed by `truncation_counts`), and the
  cuts are logged.

Checking and writing predictions (the leaderboard CSV) is `scrolls_submission`.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

import seqio
import tensorflow as tf
from absl import logging

from colt5_flax.data import metrics, scrolls_files, scrolls_table, vocabularies

# Rows are grouped by id on these splits (and slices of them, e.g. "validation[:10]").
_GROUPED_SPLITS = ("validation", "test")
_MAX_SKIP_WARNINGS = 5


def feature_lengths(task: str) -> dict[str, int]:
  """The `{'inputs': ..., 'targets': ...}` token lengths of `task` (`scrolls_table`)."""
  return scrolls_table.get(task).feature_lengths


# ------------------------------------------------------------------- rows -> examples


def _skip_reason(row: Mapping, split: str) -> str | None:
  if not row["input"].strip():
    return "empty input"
  if scrolls_files.split_name(split) != "test" and not (row["output"] or "").strip():
    return "empty output"
  return None


def _no_rows_message(task_label: str, split: str, source: str) -> str:
  return (
      f"{task_label}/{split}: {source or 'the data'} has no usable rows (the file is empty, "
      "or every row has an empty input or output; see the warnings above)"
  )


def _kept_rows(
    rows: Iterable[dict], task_label: str, split: str, *, count_only: bool = False
) -> Iterator[dict]:
  """Drops empty rows, counting and logging each (the first few with their location).

  With `count_only`, yields None per kept row but reads (and checks) every row, so the
  caller can count them without holding them.
  """
  skipped_here = collections.Counter()
  for row in rows:
    reason = _skip_reason(row, split)
    if reason is None:
      yield None if count_only else row
      continue
    skipped_here[reason] += 1
    if sum(skipped_here.values()) <= _MAX_SKIP_WARNINGS:
      logging.warning(
          "%s/%s: skipping row with %s at %s", task_label, split, reason, row["_location"]
      )
  for reason, count in skipped_here.items():
    logging.warning("%s/%s: skipped %d rows with %s", task_label, split, count, reason)


def _group_references(rows: Iterable[dict]) -> dict[str, list[str]]:
  """`{id: [non-empty outputs, in order]}`: the rows of an id are one example."""
  grouped: dict[str, list[str]] = {}
  for row in rows:
    references = grouped.setdefault(row["id"], [])
    if row["output"]:
      references.append(row["output"])
  return grouped


def _example(row: Mapping, references: list[str]) -> dict:
  return {
      "id": row["id"],
      "inputs": row["input"],
      "targets": references[0] if references else "",
      "references": references,
  }


def examples_from_rows(
    open_rows: Callable[[], Iterable[dict]], split: str, task_label: str, source: str = ""
) -> Callable[[], Iterator[dict]]:
  """Turns official rows into examples; a generator factory for `from_generator`.

  A first pass over the rows runs now, so that a bad file fails here, once, with a plain
  ValueError naming file:line (inside tf.data the error would be reported at every
  retry), and a file without a usable row fails naming the file. Training splits then
  keep one example per row. Validation/test splits group rows by `id`: the first pass
  collects each id's references in file order; the generator yields each id once, where
  it first appears, with `targets` = its first reference and `references` = all of them.

  Args:
    open_rows: returns a fresh iterator over the rows (called twice).
    split: the split name (slices like 'validation[:10]' allowed).
    task_label: the name used in logs and counters.
    source: the file (or TFDS dataset) read, for the error on an empty one.

  Returns:
    a function returning an iterator of examples
    `{'id', 'inputs', 'targets': str, 'references': list[str]}`.

  Raises:
    ValueError: a malformed row (file:line), or no usable row at all.
  """
  if scrolls_files.split_name(split) not in _GROUPED_SPLITS:
    # The whole file is read (and each line checked), holding no row.
    if not sum(1 for _ in _kept_rows(open_rows(), task_label, split, count_only=True)):
      raise ValueError(_no_rows_message(task_label, split, source))

    def ungrouped():
      for row in open_rows():
        if _skip_reason(row, split) is None:  # skipped rows were logged in the first pass
          yield _example(row, [row["output"]])

    return ungrouped

  references_of = _group_references(_kept_rows(open_rows(), task_label, split))
  if not references_of:
    raise ValueError(_no_rows_message(task_label, split, source))

  def grouped():
    seen = set()
    for row in open_rows():
      if row["id"] in seen or row["id"] not in references_of:
        continue
      if _skip_reason(row, split) is not None:
        continue  # counted in the first pass; a later row of this id carries the example
      seen.add(row["id"])
      yield _example(row, references_of[row["id"]])

  return grouped


_EXAMPLE_SIGNATURE = {
    "id": tf.TensorSpec([], tf.string),
    "inputs": tf.TensorSpec([], tf.string),
    "targets": tf.TensorSpec([], tf.string),
    "references": tf.TensorSpec([None], tf.string),
}


def _dataset_from_examples(make_examples: Callable[[], Iterator[dict]]) -> tf.data.Dataset:
  return tf.data.Dataset.from_generator(make_examples, output_signature=_EXAMPLE_SIGNATURE)


def _tfds_dataset_fn(split, shuffle_files, seed=None, *, config, tfds_data_dir, task_label):
  tfds_name = scrolls_files.tfds_name(config)
  data_dir = tfds_data_dir or seqio.utils._get_data_dir_override(tfds_name)  # pylint: disable=protected-access
  open_rows = functools.partial(
      scrolls_files.tfds_rows, config, split, data_dir, shuffle_files, seed
  )
  return _dataset_from_examples(
      examples_from_rows(open_rows, split, task_label, source=tfds_name)
  )


def _local_dataset_fn(split, shuffle_files, seed=None, *, config, data_dir, task_label):
  del shuffle_files, seed  # one file per split: nothing to shuffle at the file level
  data_dir = data_dir or os.environ.get(scrolls_files.DATA_DIR_ENV)
  if not data_dir:
    raise ValueError(
        f"{task_label}: no SCROLLS data directory; pass data_dir to "
        f"register_scrolls_local_tasks or set {scrolls_files.DATA_DIR_ENV}"
    )
  open_rows = functools.partial(scrolls_files.local_rows, data_dir, config, split)
  _, source = scrolls_files.open_local_split(data_dir, config, split)
  return _dataset_from_examples(examples_from_rows(open_rows, split, task_label, source))


# -------------------------------------------------------------- seqio preprocessing


def _log_truncation(task_label, feature, count, examples, length):
  logging.warning(
      "%s: %d of %d examples so far had %s longer than %d tokens (truncated)",
      task_label.numpy().decode("utf-8"), int(count.numpy()), int(examples.numpy()),
      feature.numpy().decode("utf-8"), int(length.numpy()),
  )
  return True


def truncate(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None = None,
    *,
    task_label: str,
    default_lengths: Mapping[str, int],
) -> tf.data.Dataset:
  """Cuts `inputs`/`targets` token ids to fit their lengths; says which examples were cut.

  A seqio preprocessor for after tokenisation and before `append_eos_after_trim`: a
  feature with `add_eos` keeps room for its EOS. The lengths are `sequence_length` where
  it names the feature, else `default_lengths`. Each example gains `inputs_truncated` and
  `targets_truncated` (bool; `truncation_counts` sums them; the feature converter drops
  them). While the dataset is read, the 1st, 2nd, 4th, 8th... cut of each feature is
  logged with the count so far: visible without flooding the log.

  Args:
    dataset: examples with `inputs` and `targets` int32 `[length]`.
    output_features: the task's features (seqio passes them).
    sequence_length: the caller's lengths (seqio passes them), or None.
    task_label: the task's name in the log.
    default_lengths: lengths used when `sequence_length` does not name a feature.

  Returns:
    the dataset with `inputs`/`targets` cut to `length - add_eos` tokens.
  """
  features = ("inputs", "targets")
  lengths = {}
  for feature in features:
    length = (sequence_length or {}).get(feature) or default_lengths[feature]
    lengths[feature] = length - int(output_features[feature].add_eos)

  def cut(counts, example):
    # counts: int64 [3], examples seen and cuts of each feature, over this pass.
    example = dict(example)
    was_cut = [tf.size(example[f]) > lengths[f] for f in features]
    counts = counts + tf.cast(tf.stack([True, *was_cut]), tf.int64)
    logged = []
    for index, feature in enumerate(features):
      count = counts[index + 1]
      # A power of two: count & (count - 1) == 0.
      logged.append(tf.cond(
          was_cut[index] & (tf.bitwise.bitwise_and(count, count - 1) == 0),
          lambda feature=feature, count=count: tf.py_function(
              _log_truncation,
              [task_label, feature, count, counts[0],
               lengths[feature] + int(output_features[feature].add_eos)],
              Tout=tf.bool,
          ),
          lambda: tf.constant(False),
      ))
    with tf.control_dependencies(logged):
      for index, feature in enumerate(features):
        example[feature] = tf.identity(example[feature][: lengths[feature]])
        example[f"{feature}_truncated"] = was_cut[index]
    return counts, example

  return dataset.scan(tf.zeros([3], tf.int64), cut)


def truncation_counts(examples: Iterable[Mapping]) -> dict[str, int]:
  """`{'examples': seen, 'inputs': cut, 'targets': cut}` of examples from `truncate`."""
  counts = collections.Counter(examples=0, inputs=0, targets=0)
  for example in examples:
    counts["examples"] += 1
    for feature in ("inputs", "targets"):
      counts[feature] += int(bool(example[f"{feature}_truncated"]))
  return dict(counts)


def postprocess(output, example=None, is_target=False):
  """seqio postprocess_fn: targets become the example's list of references."""
  if is_target and example is not None and "references" in example:
    references = [
        r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in example["references"]
    ]
    return references or [output]
  return output


# ------------------------------------------------------------------------ registration


def _add_task(name: str, **kwargs) -> seqio.Task:
  # Re-registering replaces: importing or registering twice never raises.
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def _add_mixture(name: str, task_names: list[str]) -> None:
  seqio.MixtureRegistry.remove(name)
  # Equal rates (ours): the paper fine-tunes per task; the mixture is for multi-task runs.
  seqio.MixtureRegistry.add(name, task_names, default_rate=1.0)


def _register(task_name: str, source: seqio.DataSource, task: str, vocabulary) -> None:
  _add_task(
      task_name,
      source=source,
      output_features=vocabularies.encdec_output_features(vocabulary),
      preprocessors=[
          seqio.preprocessors.tokenize,
          functools.partial(
              truncate, task_label=task_name,
              default_lengths=scrolls_table.get(task).feature_lengths,
          ),
          seqio.preprocessors.append_eos_after_trim,
      ],
      postprocess_fn=postprocess,
      metric_fns=[metrics.scrolls_metric_fn(task)],
  )


def register_scrolls_tasks(
    vocabulary: seqio.Vocabulary | None = None,
    *,
    tfds_data_dir: str | None = None,
    name_suffix: str = "",
) -> list[str]:
  """Registers `scrolls_<task><name_suffix>` (TFDS) and the mixture `scrolls<name_suffix>`.

  Args:
    vocabulary: the vocabulary of inputs and targets; default T5's SentencePiece model
      (not read until used).
    tfds_data_dir: where the TFDS data lives; default seqio's override, else TFDS's.
    name_suffix: appended to every name (e.g. '_byte').

  Returns:
    the task names, in `scrolls_table.NAMES` order.
  """
  return _register_all(
      "", name_suffix, vocabulary,
      functools.partial(_tfds_dataset_fn, tfds_data_dir=tfds_data_dir),
  )


def register_scrolls_local_tasks(
    data_dir: str | None = None,
    vocabulary: seqio.Vocabulary | None = None,
    *,
    name_suffix: str = "",
) -> list[str]:
  """Registers `scrolls_<task>_local<name_suffix>` and the mixture `scrolls_local<suffix>`.

  Args:
    data_dir: the folder holding `<config>.zip` or `<config>/<split>.jsonl`; None reads
      the environment variable SCROLLS_DATA_DIR each time a dataset is built.
    vocabulary: as in `register_scrolls_tasks`.
    name_suffix: appended to every name.

  Returns:
    the task names, in `scrolls_table.NAMES` order.
  """
  return _register_all(
      "_local", name_suffix, vocabulary,
      functools.partial(_local_dataset_fn, data_dir=data_dir),
  )


def _register_all(source, name_suffix, vocabulary, dataset_fn) -> list[str]:
  """Registers `scrolls_<task><source><name_suffix>` for the seven tasks and the mixture
  `scrolls<source><name_suffix>`; source is '' (TFDS) or '_local' (official files), and
  `dataset_fn(split, shuffle_files, seed, *, config, task_label)` reads one task."""
  # One T5 SentencePiece vocabulary for all tasks, read at first use (not at registration).
  vocabulary = vocabulary or vocabularies.sentencepiece_vocabulary(check_exists=False)
  names = []
  for task in scrolls_table.NAMES:
    name = f"scrolls_{task}{source}{name_suffix}"
    task_fn = functools.partial(dataset_fn, config=task, task_label=name)
    data_source = seqio.FunctionDataSource(task_fn, splits=scrolls_files.SPLITS)
    _register(name, data_source, task, vocabulary)
    names.append(name)
  _add_mixture(f"scrolls{source}{name_suffix}", names)
  return names



def references_by_id(data_dir: str, task: str, split: str = "validation") -> dict[str, list[str]]:
  """`{id: [references...]}` of one split of the official files under `data_dir`.

  For scoring and submission (`scrolls_submission`). Rows are read, checked and skipped
  exactly as the tasks do; on the test split the lists are empty (outputs are null).
  """
  label = f"scrolls_{scrolls_table.get(task).name}_local"
  rows = scrolls_files.local_rows(data_dir, task, split)
  return _group_references(_kept_rows(rows, label, split))


def row_counts(data_dir: str, task: str, split: str) -> dict[str, int]:
  """How the tasks read one split of the official files under `data_dir`.

  Returns:
    `{'rows': rows read, 'kept': rows kept, 'empty input': rows skipped, 'empty output':
    rows skipped, 'examples': distinct ids kept}`.
  """
  scrolls_table.get(task)
  counts = collections.Counter({"rows": 0, "kept": 0, "empty input": 0, "empty output": 0})
  ids = set()
  for row in scrolls_files.local_rows(data_dir, task, split):
    counts["rows"] += 1
    reason = _skip_reason(row, split)
    counts[reason or "kept"] += 1
    if reason is None:
      ids.add(row["id"])
  return {**counts, "examples": len(ids)}
