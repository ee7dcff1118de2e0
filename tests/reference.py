"""Plain numpy references the layer tests compare against.

Each is a direct transcription of the formula (T5, LongT5, CoLT5 papers), written with
loops and no JAX, so that a test compares two independent computations.
"""

import math

import numpy as np


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gated_mlp(x, p):
  """T5.1.1 gated-GELU with params {'wi_0', 'wi_1', 'wo'}."""
  return (gelu_tanh(x @ p["wi_0"]) * (x @ p["wi_1"])) @ p["wo"]


def t5_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
  """mesh_tensorflow.transformer's `_relative_position_bucket`, line by line."""
  ret = 0
  n = -np.asarray(relative_position)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      np.log(np.maximum(n, 1).astype(np.float32) / max_exact)
      / np.log(max_distance / max_exact)
      * (num_buckets - max_exact)
  ).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


def attention(query, key, value, *, positions_q, positions_k, table, allowed):
  """Softmax attention for one example, heads looped.

  query [q, heads, d], key/value [k, heads, d]; table [heads, buckets] read at
  bucket(positions_k - positions_q); allowed [q, k] bool. A query with no allowed key
  outputs zeros.
  """
  q_len, heads, _ = query.shape
  out = np.zeros(query.shape, np.float64)
  buckets = t5_bucket(np.asarray(positions_k)[None, :] - np.asarray(positions_q)[:, None])
  for h in range(heads):
    for i in range(q_len):
      if not allowed[i].any():
        continue
      logits = key[:, h] @ query[i, h] + table[h][buckets[i]]
      logits = np.where(allowed[i], logits, -np.inf)
      w = np.exp(logits - logits.max())
      out[i, h] = (w / w.sum()) @ value[:, h]
  return out


def central_differences(loss, x, step):
  """∂loss/∂x by central differences in float64, one coordinate at a time; x any shape."""
  x = np.asarray(x, np.float64)
  gradient = np.zeros(x.shape)
  for index in np.ndindex(x.shape):
    delta = np.zeros(x.shape)
    delta[index] = step
    gradient[index] = (loss(x + delta) - loss(x - delta)) / (2 * step)
  return gradient


def _per_unmasked_row(scores, mask, solve_row):
  """Applies `solve_row(row_scores) -> row_weights` to each row's unmasked scores, in
  float64; masked entries and empty rows get 0. [..., n] -> [..., n]."""
  scores = np.asarray(scores, np.float64)
  mask = np.ones(scores.shape, bool) if mask is None else np.broadcast_to(mask, scores.shape)
  weights = np.zeros_like(scores)
  for row in np.ndindex(scores.shape[:-1]):
    valid = mask[row]
    if valid.any():
      weights[row][valid] = solve_row(scores[row][valid])
  return weights


def soft_top_k_iteration(scores, k, *, epsilon=1.0, num_iters=50, mask=None, eps_init=None,
                         eps_decay=0.7):
  """The ALIGNER / CoDA iteration of CoLT5 §3.3 as written, float64, one row at a time,
  masked entries removed from the row instead of set to −inf; [..., n] -> [..., n]."""

  def iterate(row_scores):
    a, b = 0.0, np.zeros_like(row_scores)
    for t in range(num_iters):
      eps = epsilon if eps_init is None else max(eps_init * eps_decay**t, epsilon)
      logits = (row_scores + b) / eps
      top = logits.max()
      a = eps * np.log(k) - eps * (top + np.log(np.sum(np.exp(logits - top))))
      b = np.minimum(-row_scores - a, 0.0)
    return np.exp((row_scores + b + a) / eps)

  return _per_unmasked_row(scores, mask, iterate)


def soft_top_k(scores, k, *, epsilon=1.0, mask=None):
  """The soft top-k's solution from its optimality conditions, float64: λ_i = min(1,
  exp((s_i + a)/ε)) with `a` found by bisection so that Σλ = k over the unmasked entries
  (all ones when k ≥ their count, zeros for an empty row); [..., n] -> [..., n]."""

  def bisect(row_scores):
    if k >= row_scores.size:
      return np.ones_like(row_scores)

    def total(a):
      return np.minimum(1.0, np.exp((row_scores + a) / epsilon)).sum()

    # Σλ(a) is increasing: below `low` every λ < k/n, above `high` the top one is 1.
    low = -row_scores.max() + epsilon * np.log(k / row_scores.size)
    high = -row_scores.min() + epsilon
    for _ in range(200):
      middle = 0.5 * (low + high)
      low, high = (middle, high) if total(middle) < k else (low, middle)
    return np.minimum(1.0, np.exp((row_scores + 0.5 * (low + high)) / epsilon))

  return _per_unmasked_row(scores, mask, bisect)


def hard_top_k(ranking, mask, num_selected):
  """Positions of the num_selected largest `ranking` keys of each row (padding last,
  ties to the lower position), sorted ascending; [batch, n] -> [batch, num_selected]."""
  indices = []
  for row_keys, row_mask in zip(np.asarray(ranking), np.asarray(mask), strict=True):
    keys = np.where(row_mask, row_keys, -np.inf)
    indices.append(np.sort(np.argsort(-keys, kind="stable")[:num_selected]))
  return np.stack(indices)
