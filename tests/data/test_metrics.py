"""SCROLLS metrics against values worked out by hand."""

import math

import pytest

from colt5_flax.data import metrics, scrolls_table


def test_f1_normalises_case_punctuation_articles_and_takes_best_reference():
  predictions = ["The cat sat.", "Hello, World!", ""]
  references = [["dog", "a cat sat on the mat"], ["hello world"], ["cat"]]
  # 1: "cat sat" vs "cat sat on mat": 2 common, P = 2/2, R = 2/4, F1 = 2/3 ("dog": 0).
  # 2: identical after normalisation: 1.  3: empty prediction: 0.
  expected = 100 * (2 / 3 + 1 + 0) / 3
  result = metrics.scrolls_metric("qasper", references, predictions)
  assert result["f1"] == pytest.approx(round(expected, 4), abs=1e-9)
  assert result["scrolls_score"] == result["f1"]
  assert result["num_predicted"] == 3
  assert set(result) == {
      "f1",
      "scrolls_score",
      "num_predicted",
      "mean_prediction_length_characters",
  }


def test_f1_counts_repeated_tokens_as_a_multiset():
  # "the" is an article; "a a b" vs "a b b": 'a' is also an article -> "b" vs "b b":
  # common 1, P = 1, R = 1/2 -> 2/3.
  assert metrics.token_f1("a a b", "a b b") == pytest.approx(2 / 3)
  # "x x y" vs "x y y": common x1 + y1 = 2, P = R = 2/3 -> 2/3.
  assert metrics.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
  # SQuAD v1.1 (the official script): both sides empty still score 0 for F1.
  assert metrics.token_f1("", "") == 0.0


def test_exact_match():
  predictions = ["The Answer.", "an apple", "apples", ""]
  references = [["answer"], ["b", "Apple"], ["apple"], ["x"]]
  result = metrics.scrolls_metric("contract_nli", references, predictions)
  assert result["exact_match"] == 50.0
  assert result["scrolls_score"] == 50.0
  assert metrics.exact_match("", "") == 1.0


def test_rouge_by_hand():
  predictions = ["the cat sat on the mat", "a b c", ""]
  references = [["the cat is on the mat"], ["a b d", "c b a"], ["x y"]]
  # 1: unigrams: the x2, cat, on, mat overlap = 5 of 6 each -> F = 5/6.
  #    bigrams: (the cat), (on the), (the mat) = 3 of 5 each -> 3/5.
  #    LCS "the cat on the mat" = 5 -> 5/6.
  # 2: each component takes its own best reference.
  #    "a b d": R1 2/3, R2 (a b) 1/2, LCS "a b" 2/3;  "c b a": R1 1, R2 0, LCS 1/3.
  #    -> R1 1, R2 1/2, RL 2/3.
  # 3: empty prediction: 0.
  rouge1 = 100 * (5 / 6 + 1 + 0) / 3
  rouge2 = 100 * (3 / 5 + 1 / 2 + 0) / 3
  rouge_l = 100 * (5 / 6 + 2 / 3 + 0) / 3
  result = metrics.scrolls_metric("gov_report", references, predictions)
  assert result["rouge/rouge1"] == pytest.approx(round(rouge1, 4), abs=1e-9)
  assert result["rouge/rouge2"] == pytest.approx(round(rouge2, 4), abs=1e-9)
  assert result["rouge/rougeL"] == pytest.approx(round(rouge_l, 4), abs=1e-9)
  geometric_mean = (rouge1 * rouge2 * rouge_l) ** (1 / 3)
  assert result["rouge/geometric_mean"] == pytest.approx(round(geometric_mean, 4), abs=1e-9)
  assert result["scrolls_score"] == result["rouge/geometric_mean"]


def test_rouge_tokenises_on_non_alphanumerics_and_ignores_case():
  scores = metrics.rouge_fmeasures("The CAT, sat!", "the cat sat")
  assert scores == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
  # No stemming: "cats" and "cat" differ. 1 of 2 tokens -> 1/2.
  assert metrics.rouge_fmeasures("cats sat", "cat sat")["rouge1"] == pytest.approx(0.5)


def test_seqio_metric_fn_accepts_grouped_and_single_targets():
  fn = metrics.scrolls_metric_fn("narrative_qa")
  result = fn(targets=[["dog", "the cat"], "bird"], predictions=["cat", "bird"])
  assert result["f1"] == 100.0
  result = fn(targets=[[b"cat"]], predictions=["dog"])
  assert result["f1"] == 0.0


def test_sequence_exact_match_is_character_exact():
  result = metrics.sequence_exact_match(["AB12", "a"], ["AB12", "A"])
  assert result == {"exact_match": 50.0}


@pytest.mark.parametrize(
    "task, references, predictions, message",
    [
        ("squad", [["a"]], ["a"], "Unknown SCROLLS task 'squad'"),
        ("qasper", [["a"], ["b"]], ["a"], "2 reference lists for 1 predictions"),
        ("qasper", [[]], ["a"], "example 0 needs a non-empty list"),
        ("qasper", [], [], "no predictions"),
    ],
)
def test_bad_metric_input(task, references, predictions, message):
  with pytest.raises(ValueError, match=message):
    metrics.scrolls_metric(task, references, predictions)


def test_every_task_has_a_metric():
  for task in scrolls_table.NAMES:
    assert not math.isnan(metrics.scrolls_metric(task, [["x y"]], ["x y"])["scrolls_score"])
