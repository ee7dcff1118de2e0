"""PEGASUS gap-sentence generation (Zhang et al., 2020): the pretraining ablation of CoLT5
Table 6, in place of the UL2 objectives of `ul2`.

Each document's principal sentences are chosen by ROUGE-1 against the rest of the
document (`select_gap_sentences`), replaced in the inputs by one mask token each and
concatenated as the target (`pegasus_gap_sentences`). Task: `pegasus_c4`
(`register_pegasus_c4_task`, configs/ablations/pegasus_objective.gin).
"""

from __future__ import annotations

import collections
import functools
import math
import re
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from colt5_flax.data import ul2, vocabularies

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+")


def split_sentences(text: str) -> list[str]:
  """Sentences of `text`: cut after '.', '!' or '?' followed by whitespace (ours: a regex,
  no NLTK model here). Each sentence keeps its trailing whitespace, so they concatenate
  back to `text`."""
  sentences, start = [], 0
  for match in _SENTENCE_END.finditer(text):
    sentences.append(text[start : match.end()])
    start = match.end()
  if start < len(text):
    sentences.append(text[start:])
  return [s for s in sentences if s.strip()]


def _rouge1_f(candidate: collections.Counter, reference: collections.Counter) -> float:
  overlap = sum((candidate & reference).values())
  if overlap == 0:
    return 0.0
  precision = overlap / sum(candidate.values())
  recall = overlap / sum(reference.values())
  return 2 * precision * recall / (precision + recall)


def select_gap_sentences(sentences: Sequence[str], gap_sentence_ratio: float) -> list[bool]:
  """PEGASUS' "Ind-Orig" principal sentences (Zhang et al. 2020, §3.1).

  Each sentence is scored on its own by ROUGE-1 F1 (lowercase alphanumeric words, counts
  kept: "Orig") against the rest of the document; the `round(ratio * n)` best (at least
  1, at most n - 1; ties to the earlier sentence) are the gap sentences.

  Returns:
    `[num_sentences]` booleans, True for a gap sentence.
  """
  num = len(sentences)
  if num < 2:
    return [False] * num
  words = [collections.Counter(_WORD.findall(s.lower())) for s in sentences]
  total = sum(words, collections.Counter())
  scores = [_rouge1_f(w, total - w) for w in words]
  num_gaps = min(max(math.floor(num * gap_sentence_ratio + 0.5), 1), num - 1)
  chosen = sorted(range(num), key=lambda i: (-scores[i], i))[:num_gaps]
  return [i in chosen for i in range(num)]


def pegasus_gap_sentences(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    *,
    gap_sentence_ratio: float = 0.3,
) -> tf.data.Dataset:
  """PEGASUS gap-sentence generation, the pretraining ablation of CoLT5 Table 6.

  Each document's principal sentences (`select_gap_sentences`) are replaced in the inputs
  by one mask token each (`<extra_id_0>`, the first sentinel: ours, PEGASUS' [MASK1]) and
  concatenated, in document order, as the target. No MLM on the remaining tokens (the
  final PEGASUS models dropped it). Documents with fewer than 2 sentences are skipped.

  Args:
    dataset: examples with a string feature `text`.
    output_features: the task's features (seqio passes them).
    gap_sentence_ratio: fraction of sentences to mask (PEGASUS: 30%).

  Returns:
    examples `{'inputs', 'targets'}` of token ids without EOS (trim and add EOS with
    `append_eos_after_trim`).
  """
  vocabulary = output_features["inputs"].vocabulary
  mask_id = vocabularies.sentinel_ids(vocabulary)[0]

  def select(text):
    sentences = split_sentences(text.numpy().decode("utf-8"))
    gaps = select_gap_sentences(sentences, gap_sentence_ratio)
    return tf.constant(sentences, tf.string, shape=[len(sentences)]), tf.constant(
        gaps, tf.bool, shape=[len(gaps)]
    )

  def make_example(ex):
    sentences, gaps = tf.py_function(select, [ex["text"]], Tout=(tf.string, tf.bool))
    sentences.set_shape([None])
    gaps.set_shape([None])
    tokens = tf.map_fn(  # ragged [num_sentences, None]
        lambda sentence: tf.cast(vocabulary.encode_tf(sentence), tf.int32),
        sentences,
        fn_output_signature=tf.RaggedTensorSpec([None], tf.int32),
    )
    in_gap = tf.repeat(gaps, tokens.row_lengths())
    first_of_sentence = tf.scatter_nd(
        tokens.row_starts()[:, None], tf.ones_like(tokens.row_starts(), tf.bool),
        tf.shape(tokens.flat_values, out_type=tf.int64),
    )
    values = tokens.flat_values
    inputs = tf.boolean_mask(
        tf.where(in_gap, tf.constant(mask_id, tf.int32), values), ~in_gap | first_of_sentence
    )
    targets = tf.boolean_mask(values, in_gap)
    return {"inputs": inputs, "targets": targets, "num_sentences": tf.size(gaps)}

  dataset = dataset.map(make_example, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.filter(lambda ex: ex["num_sentences"] >= 2)
  return dataset.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})


def register_pegasus_c4_task(
    name: str = "pegasus_c4",
    vocabulary: seqio.Vocabulary | None = None,
    *,
    tfds_name: str = ul2.C4_TFDS_NAME,
    tfds_data_dir: str | None = None,
    gap_sentence_ratio: float = 0.3,
) -> seqio.Task:
  """Registers (or replaces) PEGASUS gap-sentence pretraining on TFDS C4 (the ablation)."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir),
      output_features=vocabularies.encdec_output_features(vocabulary),
      preprocessors=[
          functools.partial(pegasus_gap_sentences, gap_sentence_ratio=gap_sentence_ratio),
          seqio.preprocessors.append_eos_after_trim,
      ],
      metric_fns=[],
  )
