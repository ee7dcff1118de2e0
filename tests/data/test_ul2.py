"""UL2 objectives: noise statistics, sentinel order, exact reconstruction, proportions."""

import json
import logging
import math

import numpy as np
import pytest
import seqio
import tensorflow as tf

from colt5_flax.data import ul2, vocabularies

VOCABULARY = vocabularies.get_vocabulary("byte", extra_ids=100)
FEATURES = {"inputs": seqio.Feature(VOCABULARY), "targets": seqio.Feature(VOCABULARY)}
SENTINELS = list(range(358, 258, -1))  # <extra_id_0> = 358, <extra_id_1> = 357, ...
# The paper's objectives (docs/paper.md, Pretraining): (noise density, mean span); None =
# prefix-LM.
PAPER = [(0.5, None), (0.15, 3), (0.15, 8), (0.15, 64)]


def documents(count, seed, low=300, high=900):
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghij "))
  return ["".join(rng.choice(letters, size=rng.integers(low, high))) for _ in range(count)]


def run(docs, lengths, seed, **kwargs):
  ds = tf.data.Dataset.from_tensor_slices({"text": docs})
  ds = seqio.preprocessors.rekey(ds, {"targets": "text"})
  ds = seqio.preprocessors.tokenize(ds, FEATURES, copy_pretokenized=False)
  with seqio.utils.map_seed_manager(seed):
    out = ul2.ul2_objectives(ds, FEATURES, lengths, **kwargs)
  return list(out.as_numpy_iterator())


def split_by_sentinels(tokens):
  """(sentinels in order, the segments that follow each one)."""
  sentinels, segments = [], []
  for token in tokens:
    if token in SENTINELS:
      sentinels.append(int(token))
      segments.append([])
    else:
      segments[-1].append(int(token))
  return sentinels, segments


def reconstruct(inputs, targets):
  """The original chunk, and (noise tokens, span lengths), from one example."""
  input_sentinels = [int(t) for t in inputs if t in SENTINELS]
  if not input_sentinels:  # prefix-LM
    return [int(t) for t in inputs] + [int(t) for t in targets], (len(targets), [])
  target_sentinels, spans = split_by_sentinels(targets)
  expected = [SENTINELS[i % 100] for i in range(len(input_sentinels))]
  assert input_sentinels == expected and target_sentinels == expected
  chunk, span = [], iter(spans)
  for token in inputs:
    chunk.extend(next(span) if token in SENTINELS else [int(token)])
  lengths = [len(s) for s in spans]
  assert min(lengths) >= 1
  return chunk, (sum(lengths), lengths)


@pytest.fixture(scope="module")
def paper_run():
  """The paper's lengths (4096 / 910), about a dozen examples per objective, one stream."""
  docs = documents(320, seed=0)
  examples = run(docs, {"inputs": 4096, "targets": 910}, seed=5, docs_per_stream=len(docs))
  return docs, examples


def test_lengths_fit_with_room_for_eos(paper_run):
  _, examples = paper_run
  for ex in examples:
    assert len(ex["inputs"]) <= 4095 and len(ex["targets"]) <= 909
  # The span-3 chunks are the ones that fill 910 targets (T5's random_spans_helper).
  span3 = [ex for ex in examples[:-4] if ex["ul2_objective"] == 1]
  assert max(len(ex["targets"]) for ex in span3) == 909


def test_reconstruction_gives_back_the_documents(paper_run):
  docs, examples = paper_run
  original = [b + 3 for b in "".join(docs).encode()]
  rebuilt = []
  for ex in examples:
    rebuilt.extend(reconstruct(ex["inputs"], ex["targets"])[0])
  # One stream; at most its 1-token tail is dropped.
  assert len(original) - len(rebuilt) in (0, 1)
  assert rebuilt == original[: len(rebuilt)]


def test_noise_density_and_span_length(paper_run):
  _, examples = paper_run
  totals = {i: {"noise": 0, "tokens": 0, "spans": []} for i in range(4)}
  for ex in examples[:-4]:  # full-size chunks (the last cycle may be cut short)
    objective = int(ex["ul2_objective"])
    chunk, (noise, spans) = reconstruct(ex["inputs"], ex["targets"])
    density, mean_span = PAPER[objective]
    # T5's counts: round(length * density) noise tokens in round(noise / mean) spans.
    assert noise == math.floor(len(chunk) * density + 0.5)
    if mean_span is not None:
      assert len(spans) == max(1, math.floor(noise / mean_span + 0.5))
    totals[objective]["noise"] += noise
    totals[objective]["tokens"] += len(chunk)
    totals[objective]["spans"] += spans
  for objective, (density, mean_span) in enumerate(PAPER):
    measured = totals[objective]["noise"] / totals[objective]["tokens"]
    assert measured == pytest.approx(density, abs=0.002)
    if mean_span is not None:
      spans = totals[objective]["spans"]
      assert np.mean(spans) == pytest.approx(mean_span, rel=0.1)
      assert np.std(spans) > 0  # random span lengths, not a fixed pattern


def test_four_objectives_in_equal_proportion(paper_run):
  _, examples = paper_run
  claimed = [int(ex["ul2_objective"]) for ex in examples]
  # Independently of the label: no sentinels = prefix-LM, else the nearest mean span.
  inferred = []
  for ex in examples:
    _, (noise, spans) = reconstruct(ex["inputs"], ex["targets"])
    if not spans:
      inferred.append(0)
    else:
      mean = noise / len(spans)
      inferred.append(1 + int(np.argmin([abs(math.log(mean / m)) for m in (3, 8, 64)])))
  assert inferred[:-4] == claimed[:-4]
  counts = np.bincount(claimed, minlength=4)
  assert counts.max() - counts.min() <= 1
  assert counts.sum() >= 40


def test_deterministic_under_seed():
  docs = documents(30, seed=1)
  lengths = {"inputs": 512, "targets": 128}
  first = run(docs, lengths, seed=3, docs_per_stream=8)
  again = run(docs, lengths, seed=3, docs_per_stream=8)
  other = run(docs, lengths, seed=4, docs_per_stream=8)
  assert len(first) == len(again) == len(other)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
  assert any(
      not np.array_equal(a["inputs"], c["inputs"]) for a, c in zip(first, other, strict=True)
  )
  # The objective cycle carries over from stream to stream.
  counts = np.bincount([int(ex["ul2_objective"]) for ex in first], minlength=4)
  assert counts.max() - counts.min() <= 1 + len(docs) // 8


def test_mode_tokens():
  docs = documents(8, seed=2)
  examples = run(docs, {"inputs": 512, "targets": 128}, seed=1, use_mode_tokens=True)
  tokens = {0: "[S2S]", 1: "[NLU]", 2: "[NLU]", 3: "[NLG]"}
  for ex in examples:
    mode = VOCABULARY.encode(tokens[int(ex["ul2_objective"])])
    assert list(ex["inputs"][: len(mode)]) == mode
    assert len(ex["inputs"]) <= 511


def test_byte_vocabulary_without_extra_ids_uses_byt5_sentinels():
  plain = vocabularies.get_vocabulary("byte")
  features = {"inputs": seqio.Feature(plain), "targets": seqio.Feature(plain)}
  ds = tf.data.Dataset.from_tensors({"targets": tf.constant(np.arange(3, 203), tf.int32)})
  with seqio.utils.map_seed_manager(0):
    objectives = [ul2.Objective("s3", 0.15, 3.0)]
    out = ul2.ul2_objectives(ds, features, {"inputs": 512, "targets": 128}, objectives=objectives)
    examples = list(out.as_numpy_iterator())
  (ex,) = examples
  sentinels = [t for t in ex["inputs"] if t > 202]
  # 30 noise tokens in 10 spans; sentinels 258, 257, ... (bytes 0xFF, 0xFE, ...).
  assert sentinels == [258 - i for i in range(10)]


def test_text_file_task_through_seqio(tmp_path):
  (tmp_path / "a.jsonl").write_text(
      "".join(json.dumps({"text": d}) + "\n" for d in documents(12, seed=3))
  )
  (tmp_path / "b.txt").write_text("\n".join(documents(6, seed=4)) + "\n\n")
  ul2.register_ul2_text_task("ul2_text_fixture", str(tmp_path / "*"), VOCABULARY)
  lengths = {"inputs": 512, "targets": 128}
  ds = seqio.get_dataset(
      "ul2_text_fixture",
      lengths,
      seqio.EncDecFeatureConverter(pack=False),
      dataset_split="train",
      shuffle=False,
      seed=0,
  )
  batch = list(ds.as_numpy_iterator())
  assert len(batch) >= 8
  for ex in batch:
    assert ex["encoder_input_tokens"].shape == (512,)
    length = int((ex["decoder_target_tokens"] > 0).sum())
    assert ex["decoder_target_tokens"][length - 1] == VOCABULARY.eos_id


def test_bad_text_files(tmp_path, caplog):
  good = json.dumps({"text": "hello"})
  (tmp_path / "bad.jsonl").write_text(good + "\n" + good + "\n{oops\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
    list(ul2.text_documents(str(tmp_path / "bad.jsonl")))
  (tmp_path / "field.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"field.jsonl:1: missing field 'text'"):
    list(ul2.text_documents(str(tmp_path / "field.jsonl")))
  (tmp_path / "empty.jsonl").write_text(good + "\n" + json.dumps({"text": " "}) + "\n")
  with caplog.at_level(logging.WARNING):
    assert list(ul2.text_documents(str(tmp_path / "empty.jsonl"))) == ["hello"]
  assert ul2.document_counts(str(tmp_path / "empty.jsonl")) == {"documents": 1, "empty": 1}
  assert "empty.jsonl:2: skipping empty document" in caplog.text
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    list(ul2.text_documents(str(tmp_path / "nothing-here*")))
  # Through seqio the malformed line fails inside tf.data, with its file:line.
  ul2.register_ul2_text_task("ul2_bad_fixture", str(tmp_path / "bad.jsonl"), VOCABULARY)
  ds = seqio.get_mixture_or_task("ul2_bad_fixture").get_dataset(
      {"inputs": 64, "targets": 32}, split="train", shuffle=False, seed=0
  )
  with pytest.raises(tf.errors.OpError, match=r"bad.jsonl:3: malformed JSON"):
    list(ds.as_numpy_iterator())


def test_lengths_too_small():
  with pytest.raises(ValueError, match="no room"):
    ul2.chunk_length(ul2.COLT5_OBJECTIVES[1], max_inputs=1, max_targets=1)
