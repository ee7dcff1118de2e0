"""Token-level associative recall over long inputs: the demo's task.

Each input is `input_length - 1` filler tokens with `num_facts` facts at random positions
and a two-token question at the end; the target is the queried fact's value. Keys, values
and filler use disjoint token ranges, as in the multi-query associative-recall tasks of
efficient-attention research (Zoology, Arora et al. 2023):

- filler: the bytes `a`-`z` (26 tokens);
- a fact: ONE token, the byte `0x80 + key * num_values + value` (key < num_keys,
  value < num_values; num_keys × num_values ≤ 128), so it carries its key and its value;
- with `fact_marker`, the byte `#` right before each fact: a token every fact shares, so
  the light branch can tag each fact's token with it and a router can learn one feature
  for all facts instead of a score per fact token;
- the question: `?` and the key's byte (`A` + key: the letters, then `[\\]^_`` for keys
  26-31) at the very end;
- the target: the value's digit (`0` + value), then EOS.

So one attention hop from the question's key to the matching fact answers it; the
distractor facts (`num_facts - 1`) make the hop depend on the key. Every fact lies in the
first `input_length - 1 - min_question_distance` tokens, so the question's key is at least
`min_question_distance` tokens after it: keep that above what the light branch reaches
(encoder layers × local radius) and only CoLT5's routed heavy attention (or global tokens,
or full attention) can connect them (CoLT5 §3.3; docs/learning.md says why facts are one
token: with `MARK key value` facts the key-matching circuit did not form within the
demo's budget).

Bytes map to `seqio.ByteVocabulary` ids (`id = byte + 3`), so the masks the routers are
scored against are exact: `fact_mask_for`, `relevant_mask_for` (the queried fact) and
`question_mask_for` (the question's key) recompute them from token ids. Examples are a
pure function of (seed, split, index): no files, the same data on every host.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import seqio
import tensorflow as tf

from colt5_flax.data import synthetic, vocabularies

SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}
DEMO_TASK_NAME = "associative_recall_demo"
_BYTE_OFFSET = 3  # ByteVocabulary: id = byte + 3 (0 pad, 1 EOS, 2 UNK)
_FILLER = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
_FACT_BYTE0 = 0x80
_QUESTION_BYTE = ord("?")
_MARKER_BYTE = ord("#")
_KEY_BYTE0 = ord("A")
_MAX_KEYS = 32  # `A`...`Z`, then `[\\]^_``: below the filler's `a`.
_VALUE_BYTE0 = ord("0")


@dataclasses.dataclass(frozen=True)
class RecallConfig:
  """The knobs of one associative-recall task.

  Attributes:
    input_length: tokens per input including EOS.
    num_facts: facts per input; one is queried, the others are distractors.
    num_keys: distinct keys (the bytes `A` + key, up to 32), ≥ num_facts.
    num_values: distinct values (digits `0`...; ≤ 10); chance is 1 / num_values.
    min_question_distance: the least number of tokens between any fact and the
      question's key.
    seed: the seed of the whole task.
    fact_marker: put the marker `#` right before each fact (a fact is then two tokens,
      both in the fact masks).
    balanced_values: every value is held by as many facts as any other, ±1 (all
      distinct when num_facts <= num_values), so which values an input holds, and how
      often, says nothing of the one asked: a decoder that pools all the facts cannot
      guess the most frequent one. It also takes away the partial answer "one of the
      values present" that the lookup's learning starts from, and slows or stops it
      (docs/learning.md §6). Otherwise each fact's value is drawn independently.
  """

  input_length: int = 2048
  num_facts: int = 4
  num_keys: int = 16
  num_values: int = 8
  min_question_distance: int = 32
  seed: int = 0
  fact_marker: bool = False
  balanced_values: bool = False

  def __post_init__(self):
    if not 1 <= self.num_values <= 10:
      raise ValueError(f"RecallConfig.num_values={self.num_values} must be in [1, 10] (digits)")
    if not 1 <= self.num_facts <= self.num_keys <= _MAX_KEYS:
      raise ValueError(
          f"RecallConfig: need 1 <= num_facts={self.num_facts} <= num_keys={self.num_keys} "
          f"<= {_MAX_KEYS} (one byte per key from `A`, distinct keys per input)"
      )
    if self.num_keys * self.num_values > 128:
      raise ValueError(
          f"RecallConfig: num_keys * num_values = {self.num_keys * self.num_values} facts "
          "do not fit the 128 byte values 0x80-0xff"
      )
    if self.min_question_distance < 2:
      raise ValueError(
          f"RecallConfig.min_question_distance={self.min_question_distance} must be >= 2"
      )
    if self.fact_region < self.num_facts * self.fact_tokens:
      raise ValueError(
          f"RecallConfig: input_length={self.input_length} leaves {self.fact_region} "
          f"positions for {self.num_facts} facts of {self.fact_tokens} token(s) at least "
          f"min_question_distance={self.min_question_distance} tokens before the question"
      )

  @property
  def fact_tokens(self) -> int:
    """Tokens per fact: the fact, and the marker before it with `fact_marker`."""
    return 2 if self.fact_marker else 1

  @property
  def fact_region(self) -> int:
    """Facts lie in positions [0, fact_region): the question's key sits at
    `input_length - 2`, at least `min_question_distance` after the last of them."""
    return self.input_length - 2 - self.min_question_distance + 1


def generate(config: RecallConfig, split: str, index: int) -> dict:
  """Example `index` of `split`, a pure function of (config.seed, split, index).

  Returns:
    {'inputs': bytes of length `input_length - 1`, 'targets': the value's digit (str),
     'key', 'value': ints, 'fact_positions': int array [num_facts] (the queried fact
     first; with `fact_marker`, the marker is the byte before each)}.
  """
  if split not in SPLIT_INDEX:
    raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLIT_INDEX)}")
  rng = np.random.default_rng([config.seed, SPLIT_INDEX[split], index])
  document = _FILLER[rng.integers(0, len(_FILLER), config.input_length - 1)]
  keys = rng.choice(config.num_keys, config.num_facts, replace=False)
  if config.balanced_values:
    # A cycle over a shuffled order of the values, cut to num_facts and shuffled.
    values = rng.permutation(np.resize(rng.permutation(config.num_values), config.num_facts))
  else:
    values = rng.integers(0, config.num_values, config.num_facts)
  if config.fact_marker:
    # Non-overlapping (marker, fact) pairs, uniform over the region: n sorted draws from
    # region - n slots, the i-th shifted by i, in a random order.
    starts = np.sort(
        rng.choice(config.fact_region - config.num_facts, config.num_facts, replace=False)
    )
    positions = rng.permutation(starts + np.arange(config.num_facts)) + 1
    document[positions - 1] = _MARKER_BYTE
  else:
    positions = rng.choice(config.fact_region, config.num_facts, replace=False)
  document[positions] = _FACT_BYTE0 + keys * config.num_values + values
  document[-2:] = (_QUESTION_BYTE, _KEY_BYTE0 + keys[0])
  return {
      "inputs": document.tobytes(),
      "targets": chr(_VALUE_BYTE0 + int(values[0])),
      "key": int(keys[0]),
      "value": int(values[0]),
      "fact_positions": positions,
  }


def _document_bytes(ids: np.ndarray) -> np.ndarray:
  """The leading run of byte ids (the document, before EOS and padding), as bytes."""
  is_byte = (ids >= _BYTE_OFFSET) & (ids < _BYTE_OFFSET + 256)
  length = len(ids) if is_byte.all() else int(np.argmin(is_byte))
  return (ids[:length] - _BYTE_OFFSET).astype(np.int64)


def _masks(tokens, num_values: int) -> dict[str, np.ndarray]:
  tokens = np.asarray(tokens)
  masks = {name: np.zeros(tokens.shape, np.int32) for name in ("fact", "relevant", "question")}
  for row in np.ndindex(tokens.shape[:-1]):
    data = _document_bytes(tokens[row])
    facts = data >= _FACT_BYTE0
    # A marker belongs to the fact right after it.
    markers = np.zeros_like(facts)
    markers[:-1] = (data[:-1] == _MARKER_BYTE) & facts[1:]
    masks["fact"][row][: len(data)] = facts | markers
    if len(data) >= 2 and data[-2] == _QUESTION_BYTE:
      key = data[-1] - _KEY_BYTE0
      masks["question"][row][len(data) - 1] = 1
      relevant = facts & ((data - _FACT_BYTE0) // num_values == key)
      relevant[:-1] |= markers[:-1] & relevant[1:]
      masks["relevant"][row][: len(data)] = relevant
  return masks


def fact_mask_for(tokens, num_values: int = 8) -> np.ndarray:
  """1 on every fact token (and fact marker) of ByteVocabulary ids `[..., length]` (EOS,
  padding allowed)."""
  return _masks(tokens, num_values)["fact"]


def relevant_mask_for(tokens, num_values: int = 8) -> np.ndarray:
  """1 on the fact the question asks about (`num_values` as the task was built with)."""
  return _masks(tokens, num_values)["relevant"]


def question_mask_for(tokens, num_values: int = 8) -> np.ndarray:
  """1 on the question's key token (the last token before EOS)."""
  return _masks(tokens, num_values)["question"]


# ------------------------------------------------------------------------------- seqio


def _dataset_fn(split, shuffle_files, seed=None, *, config, num_examples):
  del shuffle_files, seed  # examples are fixed by config.seed; seqio shuffles after.

  def examples():
    for index in range(num_examples[split]):
      example = generate(config, split, index)
      yield {"inputs": example["inputs"], "targets": example["targets"]}

  signature = {"inputs": tf.TensorSpec([], tf.string), "targets": tf.TensorSpec([], tf.string)}
  return tf.data.Dataset.from_generator(examples, output_signature=signature)


def register_recall_task(
    name: str,
    config: RecallConfig,
    *,
    num_train_examples: int = 1_000_000,
    num_eval_examples: int = 512,
) -> seqio.Task:
  """Registers (or replaces) the associative-recall task `name` built from `config`.

  Features `inputs` [config.input_length] and `targets` [2] (digit, EOS), ByteVocabulary;
  metric `exact_match`.
  """
  return synthetic.register_generated_task(
      name,
      functools.partial(_dataset_fn, config=config),
      vocabularies.byte_vocabulary(),
      num_train_examples=num_train_examples,
      num_eval_examples=num_eval_examples,
  )


def register_demo_task(
    *,
    input_length: int = 2048,
    num_facts: int = 4,
    num_keys: int = 16,
    num_values: int = 8,
    min_question_distance: int = 32,
    seed: int = 0,
    fact_marker: bool = False,
    balanced_values: bool = False,
) -> str:
  """Registers `associative_recall_demo_<input_length>`; returns its name.

  Gin: `@recall.register_demo_task()` (configs/runs/demo.gin), one task per length so that
  the demo's curriculum stages (64, 128, ... tokens) and its 2048-token evaluation are
  separate data streams.
  """
  config = RecallConfig(
      input_length=input_length,
      num_facts=num_facts,
      num_keys=num_keys,
      num_values=num_values,
      min_question_distance=min_question_distance,
      seed=seed,
      fact_marker=fact_marker,
      balanced_values=balanced_values,
  )
  return register_recall_task(f"{DEMO_TASK_NAME}_{input_length}", config).name


def feature_lengths(input_length: int = 2048) -> dict[str, int]:
  """`{'inputs': input_length, 'targets': 2}` (the value's digit and EOS)."""
  return {"inputs": input_length, "targets": 2}
