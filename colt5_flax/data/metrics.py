"""SCROLLS metrics, computed the way the official scorer computes them.

The official scorer is the `tau/scrolls` metric script (`metrics/scrolls.py` with its
`rouge.py`, `f1.py`, `exact_match.py`, used by tau-nlp/scrolls' `evaluator/`):
- every example is scored against each of its references and keeps the best score per
  component (ROUGE-1, -2 and -L each take their own max), the corpus score is the mean
  over examples, ×100, and every reported value is rounded to 4 decimals;
- ROUGE: `rouge_score.rouge_scorer.RougeScorer` without stemmer, F-measure, called as
  `score(target=reference, prediction=prediction)`; `rouge/geometric_mean` is
  `(R1·R2·RL)^(1/3)` of the (unrounded) corpus means. The SCROLLS score of the
  summarisation tasks is that geometric mean;
- F1 and exact match: SQuAD v1.1 (lowercase, drop punctuation, drop the articles
  a/an/the, collapse whitespace; F1 by multiset token overlap, 0 when nothing overlaps,
  even when both sides are empty).

One difference, documented: the official script also reports `rouge/rougeLsum`, for which
it splits text into sentences with NLTK's punkt model (`split_summaries`). That data is not
installed here, so we do not report rougeLsum. Nothing else changes: the sentence split
only inserts newlines, which `rouge_score`'s tokenizer treats as any other whitespace, so
rouge1/rouge2/rougeL, the geometric mean and the SCROLLS score are the official values.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from rouge_score import rouge_scorer

from colt5_flax.data import scrolls_table

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_SCORE_KEY = {
    "rouge": "rouge/geometric_mean",
    "f1": "f1",
    "exact_match": "exact_match",
}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_ROUGE_SCORER = None


def normalize_answer(text: str) -> str:
  """SQuAD v1.1 normalisation: lowercase, no punctuation, no articles, single spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD token F1 in [0, 1] between two strings (multiset overlap)."""
  prediction_tokens = normalize_answer(prediction).split()
  reference_tokens = normalize_answer(reference).split()
  num_same = sum(
      (collections.Counter(prediction_tokens) & collections.Counter(reference_tokens)).values()
  )
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(reference_tokens)
  return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
  """1.0 when the SQuAD-normalised strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_fmeasures(prediction: str, reference: str) -> dict[str, float]:
  """ROUGE-1/2/L F-measures in [0, 1] (rouge_score, no stemmer)."""
  global _ROUGE_SCORER
  if _ROUGE_SCORER is None:
    _ROUGE_SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
  scores = _ROUGE_SCORER.score(reference, prediction)
  return {key: scores[key].fmeasure for key in ROUGE_TYPES}


def scrolls_metric(
    task: str, references: Sequence[Sequence[str]], predictions: Sequence[str]
) -> dict[str, float]:
  """The official SCROLLS metric of `task`.

  Args:
    task: a SCROLLS task name (`scrolls_table.NAMES`).
    references: `[num_examples][num_references]` strings; each example needs >= 1.
    predictions: `[num_examples]` strings.

  Returns:
    for summarisation tasks `rouge/rouge1`, `rouge/rouge2`, `rouge/rougeL`,
    `rouge/geometric_mean`; for Qasper and NarrativeQA `f1`; for QuALITY and ContractNLI
    `exact_match`; always `scrolls_score` (the task's SCROLLS score), `num_predicted` and
    `mean_prediction_length_characters`. Scores are in [0, 100], rounded to 4 decimals.
  """
  metric = scrolls_table.get(task).metric
  if isinstance(predictions, str) or len(references) != len(predictions):
    raise ValueError(
        f"{task}: got {len(references)} reference lists for {len(predictions)} predictions"
    )
  if not predictions:
    raise ValueError(f"{task}: no predictions to score")
  for index, (refs, prediction) in enumerate(zip(references, predictions, strict=True)):
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(
          f"{task}: example {index} needs a non-empty list of reference strings, got {refs!r}"
      )
    if not isinstance(prediction, str):
      raise ValueError(f"{task}: prediction {index} is not a string: {prediction!r}")

  if metric == "rouge":
    per_example = collections.defaultdict(list)
    for refs, prediction in zip(references, predictions, strict=True):
      scores = [rouge_fmeasures(prediction, ref) for ref in refs]
      for key in ROUGE_TYPES:
        per_example[key].append(max(s[key] for s in scores) * 100)
    results = {f"rouge/{key}": float(np.mean(per_example[key])) for key in ROUGE_TYPES}
    results["rouge/geometric_mean"] = math.prod(results.values()) ** (1.0 / 3.0)
  else:
    score_fn = token_f1 if metric == "f1" else exact_match
    best = [
        max(score_fn(prediction, ref) for ref in refs)
        for refs, prediction in zip(references, predictions, strict=True)
    ]
    results = {metric: 100.0 * sum(best) / len(best)}
  results["num_predicted"] = len(predictions)
  results["mean_prediction_length_characters"] = sum(len(p) for p in predictions) / len(
      predictions
  )
  results = {key: round(value, 4) for key, value in results.items()}
  results["scrolls_score"] = results[_SCORE_KEY[metric]]
  return results


def _as_reference_list(target: Any) -> list[str]:
  """A seqio target (a string, or a list/array of strings for grouped references)."""
  if isinstance(target, bytes):
    return [target.decode("utf-8")]
  if isinstance(target, str):
    return [target]
  return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in list(target)]


def scrolls_metric_fn(task: str) -> Callable[[Sequence[Any], Sequence[str]], dict[str, float]]:
  """A seqio metric function `fn(targets, predictions) -> dict` for `task`.

  `targets[i]` is one reference string or a list of them (what
  `scrolls.postprocess` returns for grouped validation examples).
  """
  scrolls_table.get(task)

  def metric_fn(targets, predictions):
    references = [_as_reference_list(t) for t in targets]
    return scrolls_metric(task, references, list(predictions))

  metric_fn.__name__ = f"scrolls_{task}_metric"
  return metric_fn


def sequence_exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """seqio metric: percentage of predictions equal to their target, character for character.

  The synthetic retrieval task scores with this (no normalisation: its answers are exact
  codes, and SQuAD normalisation would drop e.g. a value "a").
  """
  if len(targets) != len(predictions):
    raise ValueError(f"got {len(targets)} targets for {len(predictions)} predictions")
  if not targets:
    raise ValueError("no predictions to score")
  hits = sum(
      _as_reference_list(t)[0] == p for t, p in zip(targets, predictions, strict=True)
  )
  return {"exact_match": 100.0 * hits / len(targets)}
