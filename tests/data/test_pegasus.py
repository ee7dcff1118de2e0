"""PEGASUS gap sentences, checked against ROUGE-1 scores worked out by hand."""

import seqio
import tensorflow as tf

from colt5_flax.data import pegasus, vocabularies

VOCABULARY = vocabularies.get_vocabulary("byte", extra_ids=100)
FEATURES = {"inputs": seqio.Feature(VOCABULARY), "targets": seqio.Feature(VOCABULARY)}
MASK = 358  # <extra_id_0>, the first sentinel: the top of the byte vocabulary with 100 extras


def test_pegasus_gap_sentences_by_hand():
  text = "red apple. red apple pie. apple pie. blue sky."
  sentences = pegasus.split_sentences(text)
  assert sentences == ["red apple. ", "red apple pie. ", "apple pie. ", "blue sky."]
  # ROUGE-1 F1 of each sentence against the rest (9 words: red 2, apple 3, pie 2, blue, sky):
  # s0 2 of 2 vs 7 -> 4/9; s1 3 of 3 vs 6 -> 2/3; s2 -> 4/9; s3 -> 0.
  assert pegasus.select_gap_sentences(sentences, 0.3) == [False, True, False, False]
  assert pegasus.select_gap_sentences(sentences, 0.5) == [True, True, False, False]  # tie: earlier
  ds = tf.data.Dataset.from_tensor_slices({"text": [text, "One sentence only."]})
  (example,) = list(pegasus.pegasus_gap_sentences(ds, FEATURES).as_numpy_iterator())
  mask = MASK
  expected_inputs = VOCABULARY.encode("red apple. ") + [mask] + VOCABULARY.encode(
      "apple pie. blue sky."
  )
  assert list(example["inputs"]) == expected_inputs
  assert list(example["targets"]) == VOCABULARY.encode("red apple pie. ")
