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


def soft_top_k(scores, k, epsilon=1.0, num_iters=50, mask=None):
  """CoLT5 §3.3 / CoDA's iteration for one row, in float64."""
  s = np.asarray(scores, np.float64)
  mask = np.ones(s.shape, bool) if mask is None else np.asarray(mask)
  a = 0.0
  b = np.zeros_like(s)
  for _ in range(num_iters):
    z = (s[mask] + b[mask]) / epsilon
    a = epsilon * math.log(k) - epsilon * (z.max() + math.log(np.exp(z - z.max()).sum()))
    b = np.minimum(-s - a, 0.0)
  return np.where(mask, np.exp((s + b + a) / epsilon), 0.0)
