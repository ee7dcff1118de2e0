"""The demo's associative-recall task: facts, distances, targets and masks on parsed examples."""

import numpy as np
import pytest
import seqio

from colt5_flax.data import recall

CONFIG = recall.RecallConfig(
    input_length=256, num_facts=4, num_keys=16, num_values=8, min_question_distance=40
)
MARKED = recall.RecallConfig(**{**CONFIG.__dict__, "fact_marker": True})
# Marked facts packed as tight as the region allows: (marker, fact) pairs side by side.
TIGHT = recall.RecallConfig(
    input_length=2 + 40 - 1 + 2 * 16, num_facts=16, num_keys=16, min_question_distance=40,
    fact_marker=True,
)
# Every one of 32 keys (the bytes `A`...`Z[\\]^_``) in each input, values balanced.
ALL_KEYS = recall.RecallConfig(
    input_length=512, num_facts=32, num_keys=32, num_values=4, fact_marker=True,
    balanced_values=True,
)
CONFIGS = [CONFIG, MARKED, TIGHT, ALL_KEYS]
CONFIG_IDS = ["plain", "marked", "tight", "all_keys"]


def _parse(document: bytes, num_values: int):
  """An independent reading of one input: its facts {position: (key, value)} and the key
  the question asks for, straight from the bytes."""
  facts = {
      position: divmod(byte - 0x80, num_values)
      for position, byte in enumerate(document) if byte >= 0x80
  }
  assert document[-2:-1] == b"?" and b"A"[0] <= document[-1] <= b"`"[0]  # up to 32 keys
  return facts, document[-1] - ord("A")


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_examples_hold_their_facts_at_a_distance_and_answer_the_question(split, config):
  for index in range(50):
    example = recall.generate(config, split, index)
    document = example["inputs"]
    assert len(document) == config.input_length - 1
    facts, key = _parse(document, config.num_values)
    assert len(facts) == config.num_facts
    assert sorted(facts) == sorted(example["fact_positions"])
    keys = [k for k, _ in facts.values()]
    assert len(set(keys)) == config.num_facts and key in keys  # distinct keys, one asked
    (value,) = [v for k, v in facts.values() if k == key]
    assert example["targets"] == str(value) and example["value"] == value
    question_position = len(document) - 1
    assert all(question_position - p >= config.min_question_distance for p in facts)
    markers = {p for p, b in enumerate(document) if b == ord("#")}
    # A marker right before every fact and nowhere else.
    assert markers == ({p - 1 for p in facts} if config.fact_marker else set())
    filler = [b for p, b in enumerate(document[:-2]) if p not in facts and p not in markers]
    assert all(ord("a") <= b <= ord("z") for b in filler)


def test_examples_are_a_pure_function_of_seed_split_and_index():
  a = recall.generate(CONFIG, "train", 7)
  assert a["inputs"] == recall.generate(CONFIG, "train", 7)["inputs"]
  assert a["inputs"] != recall.generate(CONFIG, "validation", 7)["inputs"]
  other_seed = recall.RecallConfig(**{**CONFIG.__dict__, "seed": 1})
  assert a["inputs"] != recall.generate(other_seed, "train", 7)["inputs"]


@pytest.mark.parametrize("fact_marker", [False, True])
def test_answers_are_spread_over_the_values_and_positions(fact_marker):
  # 400 examples: every value is an answer, and answers' facts lie all over the region
  # (the router cannot learn a position instead of the content).
  values, positions = [], []
  config = recall.RecallConfig(input_length=2048, fact_marker=fact_marker)
  for index in range(400):
    example = recall.generate(config, "train", index)
    values.append(example["value"])
    positions.append(example["fact_positions"][0])
  assert set(values) == set(range(8))
  assert min(positions) < 300 and max(positions) > 1700


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_masks_recomputed_from_token_ids_match_the_parsed_facts(config):
  rows = []
  expected = {"fact": [], "relevant": [], "question": []}
  length = config.input_length + 6  # EOS and padding after the document
  for index in range(8):
    document = recall.generate(config, "validation", index)["inputs"]
    ids = np.zeros(length, np.int32)
    ids[: len(document)] = [b + 3 for b in document]  # ByteVocabulary: id = byte + 3
    ids[len(document)] = 1  # EOS
    rows.append(ids)
    facts, key = _parse(document, config.num_values)
    for name in expected:
      expected[name].append(np.zeros(length, np.int32))
    for position, (fact_key, _) in facts.items():
      # A marked fact is its marker and itself.
      span = [position - 1, position] if config.fact_marker else [position]
      expected["fact"][-1][span] = 1
      expected["relevant"][-1][span] = fact_key == key
    expected["question"][-1][len(document) - 1] = 1
  tokens = np.stack(rows)
  np.testing.assert_array_equal(
      recall.fact_mask_for(tokens, config.num_values), np.stack(expected["fact"])
  )
  np.testing.assert_array_equal(
      recall.relevant_mask_for(tokens, config.num_values), np.stack(expected["relevant"])
  )
  np.testing.assert_array_equal(
      recall.question_mask_for(tokens, config.num_values), np.stack(expected["question"])
  )
  relevant_tokens = recall.relevant_mask_for(tokens, config.num_values).sum(axis=1)
  assert relevant_tokens.tolist() == [config.fact_tokens] * 8


def test_registered_task_tokenizes_bytes_and_scores_exact_match():
  name = recall.register_demo_task(input_length=128, min_question_distance=20)
  assert name == "associative_recall_demo_128"
  task = seqio.get_mixture_or_task(name)
  dataset = task.get_dataset(recall.feature_lengths(128), split="validation", shuffle=False)
  config = recall.RecallConfig(input_length=128, min_question_distance=20)
  for index, example in enumerate(dataset.take(3).as_numpy_iterator()):
    raw = recall.generate(config, "validation", index)
    np.testing.assert_array_equal(example["inputs"], [b + 3 for b in raw["inputs"]] + [1])
    np.testing.assert_array_equal(example["targets"], [ord(raw["targets"]) + 3, 1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_values": 11}, "num_values"),
        ({"num_facts": 5, "num_keys": 4}, "num_facts"),
        ({"num_keys": 26, "num_values": 8}, "do not fit"),
        ({"num_keys": 33, "num_values": 2}, "<= 32"),
        ({"input_length": 40, "min_question_distance": 38, "num_facts": 4}, "leaves"),
        # 9 positions hold 9 plain facts but not 5 marked ones (10 tokens).
        ({"input_length": 40, "min_question_distance": 30, "num_facts": 5,
          "fact_marker": True}, "5 facts of 2 token"),
    ],
)
def test_bad_configs_name_the_problem(kwargs, message):
  with pytest.raises(ValueError, match=message):
    recall.RecallConfig(**kwargs)


@pytest.mark.parametrize("num_facts, num_values", [(16, 8), (32, 4), (10, 4), (3, 8)], ids=str)
def test_balanced_values_leave_the_value_counts_uninformative(num_facts, num_values):
  config = recall.RecallConfig(
      input_length=512, num_facts=num_facts, num_keys=32 if num_facts > 16 else 16,
      num_values=num_values, fact_marker=True, balanced_values=True,
  )
  answers = []
  for index in range(200):
    example = recall.generate(config, "train", index)
    values = [v for _, v in _parse(example["inputs"], num_values)[0].values()]
    counts = np.bincount(values, minlength=num_values)
    # Every value as often as any other, within one (distinct values when there are
    # fewer facts than values)...
    assert counts.max() - counts.min() <= 1 and counts.max() == -(-num_facts // num_values)
    answers.append(example["value"])
  # ...and the asked value is still spread over all of them.
  assert set(answers) == set(range(num_values))
