"""UL2-variant pretraining objectives (CoLT5 pretraining; docs/paper.md) as seqio preprocessors.

CoLT5 pretrains on "a UL2 variant": four objectives in equal proportion,
- prefix-LM with noise density 0.5 (UL2's S-denoiser),
- span corruption with noise density 0.15 and mean span length 3, 8 and 64 (3 and 8 are
  UL2's R-denoisers, 64 an X-denoiser),
with inputs of 4096 tokens and targets of 910.

How examples are made (`ul2_objectives`):
1. Documents (token ids, no EOS) are concatenated into streams of `docs_per_stream`
   documents, as T5's `reduce_concat_tokens` does, so that examples fill 4096 tokens.
2. Each stream is cut into consecutive chunks whose objectives cycle prefix-LM, span-3,
   span-8, span-64, prefix-LM, ..., the cycle carrying over from one stream to the next:
   the four objectives get the same number of examples (±1, plus the rare 1-token tail
   that is dropped). No token is thrown away. Each objective's chunk is the longest one
   whose inputs and targets (with sentinels, mode token and EOS) fit the lengths, so
   with 4096/910 the span-3 chunks are 4545 tokens and the targets 910: the paper's 910
   is T5's `random_spans_helper` length for span 3 at 4096.
3. Span corruption follows T5 (Raffel et al. 2020, §3.1.4): exactly
   `round(length * noise_density)` noise tokens in `round(noise / mean_span)` spans;
   the span lengths are a uniformly random composition (ours: written with TF stateless
   ops, deterministic under seqio's seeds); each noise span becomes one sentinel in the
   inputs, and the targets are `sentinel_0 span_0 sentinel_1 span_1 ...`.
4. Prefix-LM cuts each chunk at `1 - noise_density` of its length: the first half is the
   input, the second half the target. (Ours: a fixed fraction rather than a uniformly
   random point, so that the 910-token target budget is used fully; a uniform point with
   mean 0.5 would need chunks of at most 910 tokens.)

Sentinels (`vocabularies.sentinel_ids`): T5's `<extra_id_i>` = `vocab_size - 1 - i`.
Long inputs need more spans than there are sentinels (span 3 on 4545 tokens makes 227
spans, T5's vocabulary has 100 sentinels), so span i uses sentinel `i mod
num_sentinels` (ours; T5 would walk down into ordinary word pieces). Order still tells
the spans apart. `seqio.ByteVocabulary` without extra ids uses ByT5's 11 sentinels (the
bytes 0xF5..0xFF, never valid UTF-8); `ByteVocabulary(extra_ids=100)` gives 100.

Mode tokens: UL2 (Tay et al. 2022, §3.1.4) prepends a paradigm token to the inputs —
`[NLU]` for R-denoisers, `[NLG]` for X-denoisers, `[S2S]` for the S-denoiser, as text
that the vocabulary tokenises. The CoLT5 paper does not say whether it used them, so they
are off by default (`use_mode_tokens=False`); with them on, span-3/span-8 get `[NLU]`,
span-64 `[NLG]` and prefix-LM `[S2S]`.

Each example also carries `ul2_objective` (int32: index into the objectives), which the
feature converter drops.

The PEGASUS gap-sentence objective, CoLT5's Table 6 ablation, is `pegasus.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from colt5_flax import jsonl
from colt5_flax.data import vocabularies


@dataclasses.dataclass(frozen=True)
class Objective:
  """One UL2 denoiser.

  Attributes:
    name: a label for logs and tests.
    noise_density: the fraction of the chunk that becomes target.
    mean_noise_span_length: mean span length of span corruption; None for prefix-LM.
    mode_token: UL2's paradigm token, prepended to the inputs with `use_mode_tokens`.
  """

  name: str
  noise_density: float
  mean_noise_span_length: float | None = None
  mode_token: str = "[NLU]"

  @property
  def is_prefix_lm(self) -> bool:
    return self.mean_noise_span_length is None


COLT5_OBJECTIVES = (
    Objective("prefix_lm", 0.5, None, "[S2S]"),
    Objective("span_corruption_3", 0.15, 3.0, "[NLU]"),
    Objective("span_corruption_8", 0.15, 8.0, "[NLU]"),
    Objective("span_corruption_64", 0.15, 64.0, "[NLG]"),
)
# The paper's pretraining input and target lengths (docs/paper.md, Training).
FEATURE_LENGTHS = {"inputs": 4096, "targets": 910}
C4_TFDS_NAME = "c4/en:3.0.1"


# ------------------------------------------------------------------ lengths (python)


def num_noise_tokens(length: int, noise_density: float) -> int:
  """`round(length * noise_density)` clipped to [1, length - 1] (same as the TF code)."""
  return min(max(math.floor(length * noise_density + 0.5), 1), length - 1)


def num_noise_spans(length: int, noise_density: float, mean_noise_span_length: float) -> int:
  """`round(noise / mean_span)`, at least 1 and at most the non-noise tokens."""
  noise = num_noise_tokens(length, noise_density)
  spans = math.floor(noise / mean_noise_span_length + 0.5)
  return min(max(spans, 1), length - noise)


def example_lengths(objective: Objective, chunk_length: int) -> tuple[int, int]:
  """(input tokens, target tokens) made from a chunk, before mode tokens and EOS."""
  noise = num_noise_tokens(chunk_length, objective.noise_density)
  if objective.is_prefix_lm:
    return chunk_length - noise, noise
  spans = num_noise_spans(chunk_length, objective.noise_density, objective.mean_noise_span_length)
  return chunk_length - noise + spans, noise + spans


def chunk_length(objective: Objective, max_inputs: int, max_targets: int) -> int:
  """The longest chunk such that it, and every shorter one, fits the budgets.

  Args:
    objective: the denoiser.
    max_inputs: input tokens available (the feature length minus EOS and mode tokens).
    max_targets: target tokens available (minus EOS).
  """
  length = 2
  inputs, targets = example_lengths(objective, length)
  if inputs > max_inputs or targets > max_targets:
    raise ValueError(
        f"{objective.name}: lengths inputs={max_inputs}, targets={max_targets} (after EOS "
        "and mode tokens) leave no room for even a 2-token chunk"
    )
  while True:
    inputs, targets = example_lengths(objective, length + 1)
    if inputs > max_inputs or targets > max_targets:
      return length
    length += 1


# ------------------------------------------------------------------------- TF noising


def _tf_num_noise_tokens(length: tf.Tensor, noise_density: float) -> tf.Tensor:
  noise = tf.cast(tf.floor(tf.cast(length, tf.float64) * noise_density + 0.5), tf.int32)
  return tf.clip_by_value(noise, 1, length - 1)


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed) -> tf.Tensor:
  """Splits `num_items` into `num_segments` positive parts, uniformly over compositions.

  The first item of each segment is marked by choosing `num_segments - 1` of the
  `num_items - 1` gaps at random (a stateless shuffle of an indicator).

  Returns:
    int32 `[num_segments]` segment lengths summing to `num_items`.
  """
  gap_is_cut = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  gap_is_cut = tf.random.experimental.stateless_shuffle(gap_is_cut, seed=seed)
  segment_id = tf.cumsum(tf.pad(gap_is_cut, [[1, 0]]))
  return tf.math.unsorted_segment_sum(tf.ones_like(segment_id), segment_id, num_segments)


def random_spans_noise_mask(
    length: tf.Tensor, noise_density: float, mean_noise_span_length: float, seeds
) -> tf.Tensor:
  """T5's span-corruption mask: alternating non-noise / noise spans, non-noise first.

  Args:
    length: int32 scalar, the chunk length (>= 2).
    noise_density: fraction of noise tokens (exactly `num_noise_tokens`).
    mean_noise_span_length: mean span length (exactly `num_noise_spans` spans).
    seeds: int `[2, 2]` stateless seeds.

  Returns:
    bool `[length]`, True on noise tokens.
  """
  length = tf.convert_to_tensor(length, tf.int32)
  num_noise = _tf_num_noise_tokens(length, noise_density)
  num_spans = tf.cast(
      tf.floor(tf.cast(num_noise, tf.float64) / mean_noise_span_length + 0.5), tf.int32
  )
  num_spans = tf.clip_by_value(num_spans, 1, length - num_noise)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
  interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
  span_starts = tf.cumsum(interleaved)[:-1]
  span_start_indicator = tf.math.unsorted_segment_sum(
      tf.ones_like(span_starts), span_starts, length
  )
  return tf.equal(tf.cumsum(span_start_indicator) % 2, 1)


def replace_spans_with_sentinels(
    tokens: tf.Tensor, span_mask: tf.Tensor, sentinels: tf.Tensor
) -> tf.Tensor:
  """Replaces each run of True in `span_mask` by one sentinel, the i-th run by sentinel i.

  Args:
    tokens: int32 `[length]`.
    span_mask: bool `[length]`.
    sentinels: int32 `[num_sentinels]`; run i gets `sentinels[i % num_sentinels]`.

  Returns:
    int32 `[length - masked + runs]`.
  """
  previous = tf.pad(span_mask[:-1], [[1, 0]])
  first = span_mask & ~previous
  run_index = tf.cumsum(tf.cast(first, tf.int32)) - 1
  sentinel = tf.gather(sentinels, tf.math.floormod(tf.maximum(run_index, 0), tf.size(sentinels)))
  tokens = tf.where(first, sentinel, tokens)
  return tf.boolean_mask(tokens, ~(span_mask & previous))


def _apply_objective(objective: Objective, tokens, seeds, sentinels, mode_ids):
  length = tf.size(tokens)
  if objective.is_prefix_lm:
    split = length - _tf_num_noise_tokens(length, objective.noise_density)
    inputs, targets = tokens[:split], tokens[split:]
  else:
    mask = random_spans_noise_mask(
        length, objective.noise_density, objective.mean_noise_span_length, seeds
    )
    inputs = replace_spans_with_sentinels(tokens, mask, sentinels)
    targets = replace_spans_with_sentinels(tokens, ~mask, sentinels)
  if mode_ids:
    inputs = tf.concat([tf.constant(mode_ids, tf.int32), inputs], axis=0)
  return inputs, targets


# ------------------------------------------------------------------ seqio preprocessor


def _concatenate(documents):
  # ragged_batch gives a dense tensor when all documents of a batch have the same length.
  if isinstance(documents, tf.RaggedTensor):
    return documents.flat_values
  return tf.reshape(documents, [-1])


def ul2_objectives(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None = None,
    *,
    objectives: Sequence[Objective] = COLT5_OBJECTIVES,
    use_mode_tokens: bool = False,
    docs_per_stream: int = 128,
) -> tf.data.Dataset:
  """Turns tokenised documents into UL2 examples (see the module docstring).

  Args:
    dataset: examples whose `targets` are a document's token ids, int32 `[doc_length]`,
      without EOS (tokenize with `copy_pretokenized=False`).
    output_features: the task's features (seqio passes them): the vocabulary gives the
      sentinels and mode tokens, `add_eos` reserves room for EOS.
    sequence_length: `{'inputs', 'targets'}` lengths (seqio passes them); default 4096/910.
    objectives: the denoisers, used in turn.
    use_mode_tokens: prepend each objective's UL2 paradigm token to its inputs.
    docs_per_stream: documents concatenated per stream.

  Returns:
    examples `{'inputs' [<= inputs_length - eos], 'targets' [<= targets_length - eos],
    'ul2_objective' int32}`; add EOS with `append_eos_after_trim`.
  """
  if not objectives:
    raise ValueError("objectives must not be empty")
  lengths = {**FEATURE_LENGTHS, **(sequence_length or {})}
  vocabulary = output_features["inputs"].vocabulary
  sentinels = tf.constant(vocabularies.sentinel_ids(vocabulary), tf.int32)
  mode_ids = [list(vocabulary.encode(o.mode_token)) if use_mode_tokens else [] for o in objectives]
  chunk_lengths = [
      chunk_length(
          objective,
          lengths["inputs"] - int(output_features["inputs"].add_eos) - len(mode),
          lengths["targets"] - int(output_features["targets"].add_eos),
      )
      for objective, mode in zip(objectives, mode_ids, strict=True)
  ]
  num_objectives = len(objectives)
  piece_lengths_table = tf.constant(chunk_lengths, tf.int32)
  shortest = min(chunk_lengths)

  streams = (
      dataset.map(lambda ex: ex["targets"], num_parallel_calls=tf.data.AUTOTUNE)
      .ragged_batch(docs_per_stream)
      .map(_concatenate, num_parallel_calls=tf.data.AUTOTUNE)
      .filter(lambda stream: tf.size(stream) > 0)
  )

  def cut_stream(first_objective, stream):
    size = tf.size(stream)
    max_pieces = size // shortest + 2
    order = (first_objective + tf.range(max_pieces)) % num_objectives
    piece_lengths = tf.gather(piece_lengths_table, order)
    starts = tf.cumsum(piece_lengths, exclusive=True)
    num_pieces = tf.reduce_sum(tf.cast(starts < size, tf.int32))
    pieces = tf.RaggedTensor.from_row_starts(stream, starts[:num_pieces])
    next_objective = (first_objective + num_pieces) % num_objectives
    return next_objective, {"tokens": pieces, "ul2_objective": order[:num_pieces]}

  chunks = (
      streams.scan(tf.constant(0, tf.int32), cut_stream)
      .flat_map(tf.data.Dataset.from_tensor_slices)
      .filter(lambda ex: tf.size(ex["tokens"]) >= 2)
  )

  @seqio.map_over_dataset(num_seeds=2)
  def corrupt(ex, seeds):
    branches = [
        functools.partial(_apply_objective, o, ex["tokens"], seeds, sentinels, mode)
        for o, mode in zip(objectives, mode_ids, strict=True)
    ]
    inputs, targets = tf.switch_case(ex["ul2_objective"], branches)
    return {"inputs": inputs, "targets": targets, "ul2_objective": ex["ul2_objective"]}

  return corrupt(chunks)


# ------------------------------------------------------------------------- text files

_MAX_SKIP_WARNINGS = 5


def _matching_files(file_pattern: str, shuffle_files: bool = False, seed=None) -> list[str]:
  paths = sorted(tf.io.gfile.glob(file_pattern))
  if not paths:
    raise FileNotFoundError(f"No files match {file_pattern!r}")
  if shuffle_files:
    np.random.default_rng(seed).shuffle(paths)
  return paths


def _file_documents(path: str, text_field: str) -> Iterator[tuple[str, str]]:
  """`(location, text)` of every document in one file, empty ones included."""
  with tf.io.gfile.GFile(path, "r") as f:
    if not path.endswith((".jsonl", ".json")):
      for line_number, line in enumerate(f, start=1):
        if line.strip():
          yield f"{path}:{line_number}", line.rstrip("\n")
      return
    for location, record in jsonl.read_lines(f, path):
      if text_field not in record:
        raise ValueError(f"{location}: missing field {text_field!r}")
      text = record[text_field]
      if not isinstance(text, str):
        raise ValueError(f"{location}: field {text_field!r} is not a string")
      yield location, text


def text_documents(
    file_pattern: str, *, text_field: str = "text", shuffle_files: bool = False, seed=None
) -> Iterator[str]:
  """Documents from the files matching `file_pattern` (local or gs:// glob).

  `.jsonl`/`.json` files hold one JSON object per line with the text in `text_field`;
  any other file holds one document per non-blank line. Empty documents are skipped and
  logged (`document_counts` counts them).

  Raises:
    FileNotFoundError: nothing matches the pattern.
    ValueError: a malformed JSON line (file:line) or a missing `text_field` (named).
  """
  skipped = 0
  for path in _matching_files(file_pattern, shuffle_files, seed):
    for location, text in _file_documents(path, text_field):
      if text.strip():
        yield text
        continue
      skipped += 1
      if skipped <= _MAX_SKIP_WARNINGS:
        logging.warning("%s: skipping empty document", location)
  if skipped:
    logging.warning("%s: skipped %d empty documents", file_pattern, skipped)


def document_counts(file_pattern: str, *, text_field: str = "text") -> dict[str, int]:
  """`{'documents': kept, 'empty': skipped}` of the files `text_documents` reads."""
  counts = collections.Counter(documents=0, empty=0)
  for path in _matching_files(file_pattern):
    for _, text in _file_documents(path, text_field):
      counts["documents" if text.strip() else "empty"] += 1
  return dict(counts)


def _text_dataset_fn(split, shuffle_files, seed=None, *, file_patterns, text_field):
  pattern = file_patterns[split]
  # Glob now, so a pattern matching nothing fails when the dataset is built.
  if not tf.io.gfile.glob(pattern):
    raise FileNotFoundError(f"No files match {pattern!r} (split {split!r})")
  make = functools.partial(
      text_documents, pattern, text_field=text_field, shuffle_files=shuffle_files, seed=seed
  )
  return tf.data.Dataset.from_generator(
      lambda: ({"text": t} for t in make()),
      output_signature={"text": tf.TensorSpec([], tf.string)},
  )


# ------------------------------------------------------------------------ registration


def _preprocessors(objectives, use_mode_tokens):
  return [
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      functools.partial(ul2_objectives, objectives=objectives, use_mode_tokens=use_mode_tokens),
      seqio.preprocessors.append_eos_after_trim,
  ]


def register_ul2_c4_task(
    name: str = "ul2_c4",
    vocabulary: seqio.Vocabulary | None = None,
    *,
    tfds_name: str = C4_TFDS_NAME,
    tfds_data_dir: str | None = None,
    objectives: Sequence[Objective] = COLT5_OBJECTIVES,
    use_mode_tokens: bool = False,
) -> seqio.Task:
  """Registers (or replaces) UL2 pretraining on TFDS C4 (`c4/en:3.0.1`, field `text`).

  Args:
    name: the task name.
    vocabulary: default T5's SentencePiece model (read at first use).
    tfds_name, tfds_data_dir: the TFDS dataset and its directory.
    objectives, use_mode_tokens: see `ul2_objectives`.
  """
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir),
      output_features=vocabularies.encdec_output_features(vocabulary),
      preprocessors=_preprocessors(objectives, use_mode_tokens),
      metric_fns=[],
  )


def register_ul2_text_task(
    name: str,
    file_pattern: str | Mapping[str, str],
    vocabulary: seqio.Vocabulary | None = None,
    *,
    text_field: str = "text",
    objectives: Sequence[Objective] = COLT5_OBJECTIVES,
    use_mode_tokens: bool = False,
) -> seqio.Task:
  """Registers (or replaces) UL2 pretraining on local text files (see `text_documents`).

  Args:
    name: the task name.
    file_pattern: a glob for the 'train' split, or `{split: glob}`.
    vocabulary: default T5's SentencePiece model (read at first use).
    text_field: the JSONL field holding the text.
    objectives, use_mode_tokens: see `ul2_objectives`.
  """
  patterns = {"train": file_pattern} if isinstance(file_pattern, str) else dict(file_pattern)
  source = seqio.FunctionDataSource(
      functools.partial(_text_dataset_fn, file_patterns=patterns, text_field=text_field),
      splits=tuple(patterns),
  )
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      output_features=vocabularies.encdec_output_features(vocabulary),
      preprocessors=_preprocessors(objectives, use_mode_tokens),
      metric_fns=[],
  )
