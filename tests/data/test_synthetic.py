"""The synthetic retrieval task: deterministic, answerable, exact masks, far facts."""

import re

import numpy as np
import pytest
import seqio
import tensorflow as tf

from colt5_flax.data import synthetic, tasks, vocabularies

LOCAL_RADIUS = 127  # CoLT5's light attention (docs/paper.md, Model)

# The test's own reading of the format: facts "[KEY:VALUE]", question "\nQ: KEY?" at the end.
FACT = re.compile(r"\[([A-Z]+):([A-Z0-9]+)\]")
QUESTION = re.compile(r"\nQ: ([A-Z]+)\?$")


def parse(text):
  """(answer, [start, end) of the queried fact, [(start, end)] of all facts, question start)."""
  question = QUESTION.search(text)
  facts = [(m.group(1), m.group(2), m.start(), m.end()) for m in FACT.finditer(text)]
  matching = [f for f in facts if f[0] == question.group(1)]
  assert len(matching) == 1, matching
  _, value, start, end = matching[0]
  return value, (start, end), [(s, e) for _, _, s, e in facts], question.start()


def byte_ids_to_text(ids):
  ids = [int(i) for i in ids]
  return bytes(i - 3 for i in ids if 3 <= i < 259).decode("ascii")


@pytest.fixture(scope="module")
def converted_examples():
  synthetic.register_synthetic_task("synthetic_test_2048", input_length=2048, num_train_examples=6)
  spec = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
  converter = tasks.EncDecFeatureConverterWithPassthrough(
      {"relevant_mask": spec, "fact_mask": spec}
  )
  ds = seqio.get_dataset(
      "synthetic_test_2048",
      synthetic.feature_lengths(2048, with_masks=True),
      converter,
      dataset_split="train",
      shuffle=False,
  )
  return list(ds.as_numpy_iterator())


def test_answers_are_recoverable_and_masks_exact(converted_examples):
  assert len(converted_examples) == 6
  for ex in converted_examples:
    tokens = ex["encoder_input_tokens"]
    assert tokens.shape == (2048,)
    assert tokens[2047] == 1  # the document fills the input; EOS last
    text = byte_ids_to_text(tokens)
    value, (start, end), facts, question_start = parse(text)
    assert byte_ids_to_text(ex["decoder_target_tokens"]) == value
    expected_relevant = np.zeros(2048, np.int32)
    expected_relevant[start:end] = 1
    np.testing.assert_array_equal(ex["relevant_mask"], expected_relevant)
    expected_facts = np.zeros(2048, np.int32)
    for s, e in facts:
      expected_facts[s:e] = 1
    np.testing.assert_array_equal(ex["fact_mask"], expected_facts)
    assert len(facts) == 8
    # Beyond two local windows: local attention cannot link question and answer.
    assert question_start - end > 2 * LOCAL_RADIUS


def test_relevant_mask_for_recomputes_the_mask_from_tokens(converted_examples):
  tokens = np.stack([ex["encoder_input_tokens"] for ex in converted_examples])
  masks = np.stack([ex["relevant_mask"] for ex in converted_examples])
  np.testing.assert_array_equal(synthetic.relevant_mask_for(tokens), masks)
  np.testing.assert_array_equal(
      synthetic.fact_mask_for(tokens), np.stack([ex["fact_mask"] for ex in converted_examples])
  )
  # Padding rows and padded tails get zeros.
  padded = np.concatenate([tokens[:1], np.zeros((1, 2048), np.int32)])
  assert synthetic.relevant_mask_for(padded)[1].sum() == 0


def test_deterministic_per_seed():
  config = synthetic.SyntheticConfig(input_length=1024, seed=7)
  a = synthetic.generate(config, "validation", 3)
  b = synthetic.generate(config, "validation", 3)
  assert a["inputs"] == b["inputs"] and a["targets"] == b["targets"]
  np.testing.assert_array_equal(a["relevant_mask"], b["relevant_mask"])
  other_config = synthetic.SyntheticConfig(input_length=1024, seed=8)
  other_seed = synthetic.generate(other_config, "validation", 3)
  other_index = synthetic.generate(config, "validation", 4)
  other_split = synthetic.generate(config, "train", 3)
  assert len({a["inputs"], other_seed["inputs"], other_index["inputs"], other_split["inputs"]}) == 4


@pytest.mark.parametrize("filler", synthetic.FILLERS)
@pytest.mark.parametrize("input_length", [1024, 4096, 65536])
def test_lengths_fillers_and_knobs(filler, input_length):
  config = synthetic.SyntheticConfig(
      input_length=input_length, num_facts=5, key_length=4, value_length=9, filler=filler, seed=1
  )
  for index in range(3):
    ex = synthetic.generate(config, "test", index)
    text = ex["inputs"]
    assert len(text) == input_length - 1 and text.isascii()
    value, (start, end), facts, question_start = parse(text)
    assert value == ex["targets"] and len(value) == 9 and len(facts) == 5
    assert ex["relevant_mask"].sum() == end - start == 4 + 9 + 3
    assert ex["fact_mask"].sum() == 5 * 16
    assert question_start - end >= synthetic.MIN_QUESTION_DISTANCE


def test_min_question_distance_allows_short_documents():
  # 256 tokens cannot keep a fact 256 tokens from the question (the default raises), but
  # can keep it 64 away, enough for a model of local radius 31.
  with pytest.raises(ValueError, match="min_question_distance=256"):
    synthetic.SyntheticConfig(input_length=256, num_facts=2, key_length=1, value_length=1)
  config = synthetic.SyntheticConfig(
      input_length=256, num_facts=2, key_length=1, value_length=1, min_question_distance=64
  )
  for index in range(20):
    ex = synthetic.generate(config, "train", index)
    _, (_, end), _, question_start = parse(ex["inputs"])
    assert len(ex["inputs"]) == 255 and question_start - end >= 64


def test_exact_match_metric():
  task = seqio.get_mixture_or_task(synthetic.DEFAULT_TASK_NAME)
  (metric_fn,) = task.metric_fns
  assert metric_fn(targets=["AB12CD", "XYZ000"], predictions=["AB12CD", "xyz000"]) == {
      "exact_match": 50.0
  }


def test_default_registration():
  task = seqio.get_mixture_or_task(synthetic.DEFAULT_TASK_NAME)
  example = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
  assert example["inputs"].shape == (2048,)
  assert example["relevant_mask"].shape == (2048,)
  for length in synthetic.REGISTERED_LENGTHS:
    assert f"{synthetic.DEFAULT_TASK_NAME}_{length}" in seqio.TaskRegistry.names()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"filler": "lorem"}, "filler='lorem'"),
        ({"input_length": 300}, "input_length=300 is too short"),
        ({"num_facts": 0}, "num_facts must be >= 1"),
        ({"key_length": 1, "num_facts": 30}, "cannot give 30 distinct keys"),
        ({"min_question_distance": 0}, "min_question_distance must be >= 1"),
        ({"input_length": 1024, "min_question_distance": 600}, "min_question_distance=600"),
    ],
)
def test_bad_configuration(kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthetic.register_synthetic_task("synthetic_bad", **kwargs)


def test_needs_a_byte_vocabulary(tmp_path):
  spm_vocabulary = vocabularies.sentencepiece_vocabulary(
      str(tmp_path / "x.model"), check_exists=False
  )
  with pytest.raises(ValueError, match="ByteVocabulary"):
    synthetic.register_synthetic_task("synthetic_bad", vocabulary=spm_vocabulary)
