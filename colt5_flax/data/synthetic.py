"""A synthetic long-input retrieval task whose relevant tokens are known exactly.

Each document is filler text with `num_facts` facts `[KEY:VALUE]` scattered through it and
one question at the end, `\\nQ: KEY?`, asking for the value of one of the keys. The target
is that value. Only the queried fact carries the answer, and it lies in the first half of
the document, at least `MIN_QUESTION_DISTANCE` tokens before the question, so local
attention (CoLT5's light branch: radius 127, CoLT5 §3.3) cannot connect the question to
the answer; the heavy (routed) attention must (CoLT5 §3.3, §5.4's routing analysis).

Everything is ASCII and the task uses `seqio.ByteVocabulary` (one byte = one token), so
`relevant_mask` (the queried fact's tokens, brackets included) and `fact_mask` (every
fact's tokens) are exact, aligned with `inputs` (0 on the EOS). The feature converter
drops them; `relevant_mask_for(tokens)` recomputes the mask from the encoder tokens of a
converted batch, and `tasks.EncDecFeatureConverterWithPassthrough` can carry it.

Examples are a pure function of (seed, split, index): no files, same data on every host.
Difficulty knobs: `input_length` (1k-64k tokens), `num_facts` (distractors =
`num_facts - 1`), `key_length`, `value_length`, `filler` ('words', 'letters', 'repeat').
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string

import numpy as np
import seqio
import tensorflow as tf

from colt5_flax.data import metrics, vocabularies

FILLERS = ("words", "letters", "repeat")
SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}
# Two local windows (2 x 127) and then some: the question never sees the fact locally.
MIN_QUESTION_DISTANCE = 256
DEFAULT_TASK_NAME = "synthetic_kv_retrieval"
DEFAULT_INPUT_LENGTH = 2048
# Registered as f"{DEFAULT_TASK_NAME}_{length}" besides the default name.
REGISTERED_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)

_KEY_ALPHABET = np.array(list(string.ascii_uppercase))
_VALUE_ALPHABET = np.array(list(string.ascii_uppercase + string.digits))
_LETTERS = np.array(list(string.ascii_lowercase + " "))
_WORDS = np.array(
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or had not but have one their all been has more two when there new after who "
    "first into other some time year years than also its only over three city most many "
    "river house during world under where made about such while between state before used "
    "school team later known small same each part name town people these".split()
)
_REPEATED = "the quick brown fox jumps over the lazy dog. "
_BYTE_OFFSET = 3  # ByteVocabulary: id = byte + 3 (0 pad, 1 EOS, 2 UNK)
_FACT = re.compile(rb"\[([A-Z]+):([A-Z0-9]+)\]")
_QUESTION = re.compile(rb"\nQ: ([A-Z]+)\?$")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """The knobs of one synthetic task.

  Attributes:
    input_length: tokens per input including EOS (the document is `input_length - 1`
      bytes).
    num_facts: facts per document; one is queried, the others are distractors.
    key_length: letters per key (A-Z).
    value_length: characters per value (A-Z, 0-9); the target.
    filler: 'words' (random common words), 'letters' (random lowercase letters and
      spaces) or 'repeat' (one sentence repeated: no information at all).
    seed: the seed of the whole task.
    min_question_distance: the least number of tokens between the queried fact and the
      question (at least half the filler lies between them). Keep it above what the
      light branch reaches (layers × local radius).
  """

  input_length: int = DEFAULT_INPUT_LENGTH
  num_facts: int = 8
  key_length: int = 6
  value_length: int = 6
  filler: str = "words"
  seed: int = 0
  min_question_distance: int = MIN_QUESTION_DISTANCE

  def __post_init__(self):
    if self.filler not in FILLERS:
      raise ValueError(f"filler={self.filler!r}; expected one of {FILLERS}")
    if self.num_facts < 1:
      raise ValueError(f"num_facts must be >= 1, got {self.num_facts}")
    if self.key_length < 1 or self.value_length < 1:
      raise ValueError(
          f"key_length and value_length must be >= 1, got {self.key_length}, "
          f"{self.value_length}"
      )
    if 26**self.key_length < self.num_facts:
      raise ValueError(f"key_length={self.key_length} cannot give {self.num_facts} distinct keys")
    # All filler after the queried fact separates it from the question (see `generate`).
    if self.min_question_distance < 1:
      raise ValueError(
          f"min_question_distance must be >= 1, got {self.min_question_distance}"
      )
    if self.filler_length // 2 < self.min_question_distance:
      raise ValueError(
          f"input_length={self.input_length} is too short for {self.num_facts} facts: the "
          f"queried fact must sit >= min_question_distance={self.min_question_distance} "
          "tokens before the question"
      )

  @property
  def fact_length(self) -> int:
    return self.key_length + self.value_length + 3  # "[", ":", "]"

  @property
  def question_length(self) -> int:
    return self.key_length + 5  # "\nQ: " and "?"

  @property
  def filler_length(self) -> int:
    return (
        self.input_length - 1 - self.question_length - self.num_facts * self.fact_length
    )


def _filler(rng: np.random.Generator, length: int, kind: str) -> str:
  if kind == "repeat":
    text = _REPEATED * (length // len(_REPEATED) + 1)
  elif kind == "letters":
    text = "".join(rng.choice(_LETTERS, size=length))
  else:
    # Enough words for `length` characters (words average > 3 characters with a space).
    words = rng.choice(_WORDS, size=length // 3 + 1)
    text = " ".join(words)
  return text[:length]


def generate(config: SyntheticConfig, split: str, index: int) -> dict:
  """Example `index` of `split`, a pure function of (config.seed, split, index).

  Returns:
    {'inputs': str of `input_length - 1` ASCII bytes, 'targets': the value,
     'relevant_mask': int32 [input_length - 1] (1 on the queried fact),
     'fact_mask': int32 [input_length - 1] (1 on every fact),
     'key': the queried key, 'fact_start': the queried fact's byte offset}.
  """
  if split not in SPLIT_INDEX:
    raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLIT_INDEX)}")
  rng = np.random.default_rng([config.seed, SPLIT_INDEX[split], index])
  keys: list[str] = []
  while len(keys) < config.num_facts:
    key = "".join(rng.choice(_KEY_ALPHABET, size=config.key_length))
    if key not in keys:
      keys.append(key)
  values = ["".join(rng.choice(_VALUE_ALPHABET, size=config.value_length)) for _ in keys]
  filler_length = config.filler_length
  # Insertion points in filler coordinates. The queried fact (index 0) goes in the first
  # half of the filler, so at least the second half (>= MIN_QUESTION_DISTANCE) of the
  # filler lies between it and the question.
  points = [int(rng.integers(0, filler_length // 2 + 1))]
  points += [int(p) for p in rng.integers(0, filler_length + 1, size=config.num_facts - 1)]
  filler = _filler(rng, filler_length, config.filler)

  order = sorted(range(config.num_facts), key=lambda i: (points[i], i))
  pieces, relevant_spans, fact_spans = [], [], []
  cursor, offset = 0, 0
  for i in order:
    pieces.append(filler[cursor : points[i]])
    offset += points[i] - cursor
    cursor = points[i]
    fact = f"[{keys[i]}:{values[i]}]"
    fact_spans.append((offset, offset + len(fact)))
    if i == 0:
      relevant_spans.append((offset, offset + len(fact)))
    pieces.append(fact)
    offset += len(fact)
  pieces.append(filler[cursor:])
  pieces.append(f"\nQ: {keys[0]}?")
  text = "".join(pieces)
  if len(text) != config.input_length - 1:
    raise RuntimeError(f"internal: built {len(text)} bytes, wanted {config.input_length - 1}")

  relevant_mask = np.zeros(len(text), np.int32)
  fact_mask = np.zeros(len(text), np.int32)
  for start, end in relevant_spans:
    relevant_mask[start:end] = 1
  for start, end in fact_spans:
    fact_mask[start:end] = 1
  return {
      "inputs": text,
      "targets": values[0],
      "relevant_mask": relevant_mask,
      "fact_mask": fact_mask,
      "key": keys[0],
      "fact_start": relevant_spans[0][0],
  }


def _masks_for_bytes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
  relevant = np.zeros(len(data), np.int32)
  facts = np.zeros(len(data), np.int32)
  question = _QUESTION.search(data)
  for match in _FACT.finditer(data):
    facts[match.start() : match.end()] = 1
    if question is not None and match.group(1) == question.group(1):
      relevant[match.start() : match.end()] = 1
  return relevant, facts


def _masks_for_tokens(tokens) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.asarray(tokens)
  relevant = np.zeros(tokens.shape, np.int32)
  facts = np.zeros(tokens.shape, np.int32)
  for row in np.ndindex(tokens.shape[:-1]):
    ids = tokens[row]
    is_byte = (ids >= _BYTE_OFFSET) & (ids < _BYTE_OFFSET + 256)
    # Only the leading run of bytes is the document (then EOS and padding).
    length = int(np.argmin(is_byte)) if not is_byte.all() else len(ids)
    data = bytes((ids[:length] - _BYTE_OFFSET).astype(np.uint8).tolist())
    relevant[row][:length], facts[row][:length] = _masks_for_bytes(data)
  return relevant, facts


def relevant_mask_for(tokens) -> np.ndarray:
  """The relevant-token mask of synthetic inputs, recomputed from their token ids.

  Args:
    tokens: int `[..., length]` ByteVocabulary ids, e.g. a converted batch's
      `encoder_input_tokens` `[batch, length]` (EOS and padding allowed).

  Returns:
    int32 `[..., length]`: 1 on the tokens of the fact whose key the question asks for.
  """
  return _masks_for_tokens(tokens)[0]


def fact_mask_for(tokens) -> np.ndarray:
  """Like `relevant_mask_for`, but 1 on the tokens of every fact (distractors too)."""
  return _masks_for_tokens(tokens)[1]


# ------------------------------------------------------------------------------- seqio


def _dataset_fn(split, shuffle_files, seed=None, *, config, num_examples):
  del shuffle_files, seed  # examples are fixed by config.seed; seqio shuffles after.

  def examples():
    for index in range(num_examples[split]):
      ex = generate(config, split, index)
      yield {k: ex[k] for k in ("inputs", "targets", "relevant_mask", "fact_mask")}

  signature = {
      "inputs": tf.TensorSpec([], tf.string),
      "targets": tf.TensorSpec([], tf.string),
      "relevant_mask": tf.TensorSpec([None], tf.int32),
      "fact_mask": tf.TensorSpec([None], tf.int32),
  }
  return tf.data.Dataset.from_generator(examples, output_signature=signature)


def align_masks_to_inputs(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Cuts or zero-pads `relevant_mask`/`fact_mask` to the length of `inputs` (after EOS)."""

  def align(example):
    example = dict(example)
    length = tf.size(example["inputs"])
    for name in ("relevant_mask", "fact_mask"):
      mask = example[name][:length]
      example[name] = tf.pad(mask, [[0, length - tf.size(mask)]])
    return example

  return dataset.map(align, num_parallel_calls=tf.data.AUTOTUNE)


def register_synthetic_task(
    name: str = DEFAULT_TASK_NAME,
    input_length: int = DEFAULT_INPUT_LENGTH,
    num_facts: int = 8,
    seed: int = 0,
    *,
    key_length: int = 6,
    value_length: int = 6,
    filler: str = "words",
    min_question_distance: int = MIN_QUESTION_DISTANCE,
    num_train_examples: int = 100_000,
    num_eval_examples: int = 512,
    vocabulary: seqio.ByteVocabulary | None = None,
) -> seqio.Task:
  """Registers (or replaces) the synthetic retrieval task `name`.

  Args:
    name: the seqio task name.
    input_length: tokens per input including EOS (1k-64k; >= about 600 for 8 facts).
    num_facts: facts per document (1 queried + distractors).
    seed: seed of all its examples.
    key_length, value_length, filler, min_question_distance: difficulty knobs (see
      `SyntheticConfig`).
    num_train_examples, num_eval_examples: sizes of train and of validation/test.
    vocabulary: a `seqio.ByteVocabulary` (any extra_ids); default `ByteVocabulary()`.

  Returns:
    the task: features `inputs` [input_length], `targets` [value_length + 1] (EOS
    included), `relevant_mask`/`fact_mask` int32 aligned with `inputs`; metric
    `exact_match` (character-exact).
  """
  vocabulary = vocabulary or vocabularies.byte_vocabulary()
  if not isinstance(vocabulary, seqio.ByteVocabulary):
    raise ValueError(
        f"The synthetic task needs a seqio.ByteVocabulary (one token per byte, so its masks "
        f"are exact); got {type(vocabulary).__name__}"
    )
  config = SyntheticConfig(
      input_length=input_length,
      num_facts=num_facts,
      key_length=key_length,
      value_length=value_length,
      filler=filler,
      seed=seed,
      min_question_distance=min_question_distance,
  )
  return register_generated_task(
      name,
      functools.partial(_dataset_fn, config=config),
      vocabulary,
      num_train_examples=num_train_examples,
      num_eval_examples=num_eval_examples,
      extra_preprocessors=[align_masks_to_inputs],
  )


def register_generated_task(
    name: str,
    dataset_fn,
    vocabulary: seqio.Vocabulary,
    *,
    num_train_examples: int,
    num_eval_examples: int,
    extra_preprocessors=(),
) -> seqio.Task:
  """Registers (or replaces) a task whose examples a function generates (no files).

  `dataset_fn(split, shuffle_files, seed=None, *, num_examples)` returns the split's
  `tf.data.Dataset` of {'inputs', 'targets', ...} strings; both features are tokenized
  with `vocabulary` and end with EOS; metric `exact_match`.
  """
  num_examples = {
      "train": num_train_examples,
      "validation": num_eval_examples,
      "test": num_eval_examples,
  }
  source = seqio.FunctionDataSource(
      functools.partial(dataset_fn, num_examples=num_examples),
      splits=tuple(num_examples),
      num_input_examples=num_examples,
  )
  output_features = {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      output_features=output_features,
      preprocessors=[
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos_after_trim,
          *extra_preprocessors,
      ],
      metric_fns=[metrics.sequence_exact_match],
  )


def feature_lengths(
    input_length: int = DEFAULT_INPUT_LENGTH, value_length: int = 6, *, with_masks: bool = False
) -> dict[str, int]:
  """Token lengths of a synthetic task: `inputs`, `targets` (+ the masks with `with_masks`).

  Pass `with_masks=True` together with a converter that carries the masks
  (`tasks.EncDecFeatureConverterWithPassthrough`); the plain `EncDecFeatureConverter`
  accepts only `inputs` and `targets`.
  """
  lengths = {"inputs": input_length, "targets": value_length + 1}
  if with_masks:
    lengths.update(relevant_mask=input_length, fact_mask=input_length)
  return lengths


def register_default_tasks() -> list[str]:
  """`synthetic_kv_retrieval` (2048 tokens) and `synthetic_kv_retrieval_<length>` (the
  demo's task is `recall.py`'s)."""
  names = [register_synthetic_task().name]
  for length in REGISTERED_LENGTHS:
    names.append(
        register_synthetic_task(f"{DEFAULT_TASK_NAME}_{length}", input_length=length).name
    )
  return names
