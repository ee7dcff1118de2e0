"""The attention kernel and MultiHeadAttention against a numpy softmax-attention loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax import transformer_layers
from colt5_flax.layers import attention
from tests import tolerances


def _numpy_attention(query, key, value, bias=None, mask=None):
  """Per-(batch, head, query) loop in float64; `kv_heads` groups of consecutive heads."""
  query, key, value = (np.asarray(a, np.float64) for a in (query, key, value))
  batch, q_len, heads, _ = query.shape
  kv_heads = key.shape[2]
  out = np.zeros(query.shape, np.float64)
  for b in range(batch):
    for h in range(heads):
      kv = h // (heads // kv_heads)
      for i in range(q_len):
        logits = key[b, :, kv] @ query[b, i, h]
        if bias is not None:
          logits = logits + np.broadcast_to(bias, (batch, heads, q_len, key.shape[1]))[b, h, i]
        allowed = (
            np.ones(key.shape[1], bool)
            if mask is None
            else np.broadcast_to(mask, (batch, heads, q_len, key.shape[1]))[b, h, i]
        )
        if not allowed.any():
          continue  # A query with nothing to attend to outputs zeros.
        logits = np.where(allowed, logits, -np.inf)
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        out[b, i, h] = weights @ value[b, :, kv]
  return out


@pytest.mark.parametrize("heads_major_kv", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kernel_matches_numpy(kv_heads, heads_major_kv):
  rng = np.random.default_rng(0)
  query = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  key = rng.normal(size=(2, 7, kv_heads, 3)).astype(np.float32)
  value = rng.normal(size=(2, 7, kv_heads, 3)).astype(np.float32)
  bias = rng.normal(size=(1, 4, 5, 7)).astype(np.float32)
  mask = rng.random(size=(2, 1, 5, 7)) > 0.3
  mask[1, 0, 2, :] = False  # One query row that may attend to nothing.
  # Heads-major: the same keys and values given as [batch, kv_heads, keys, head_dim].
  given = [np.swapaxes(a, 1, 2) if heads_major_kv else a for a in (key, value)]
  got = attention.dot_product_attention(
      query, *given, bias=bias, mask=mask, heads_major_kv=heads_major_kv
  )
  expected = _numpy_attention(query, key, value, bias, mask)
  # Against float64 (tests/tolerances.py): 7 keys; q·k, then weights·v.
  tolerances.assert_close(got, expected, num_terms=7, depth=2)
  assert np.all(np.asarray(got)[1, 2] == 0.0)


def test_kernel_extra_leading_dims_and_no_nan_gradient():
  rng = np.random.default_rng(1)
  query = rng.normal(size=(2, 3, 4, 2, 5)).astype(np.float32)  # [batch, blocks, q, h, d]
  key = rng.normal(size=(2, 3, 6, 2, 5)).astype(np.float32)
  mask = np.zeros((2, 3, 1, 4, 6), bool)  # Nothing may be attended anywhere.
  mask[0, 1] = True

  def loss(q):
    return jnp.sum(attention.dot_product_attention(q, key, key, mask=mask) ** 2)

  value, grad = jax.value_and_grad(loss)(query)
  assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad)))
  expected = _numpy_attention(query[0, 1:2], key[0, 1:2], key[0, 1:2])[0]
  got = attention.dot_product_attention(query, key, key, mask=mask)
  tolerances.assert_close(np.asarray(got)[0, 1], expected, num_terms=6, depth=2)
  np.testing.assert_array_equal(np.asarray(got)[1], 0.0)


def test_kernel_bfloat16_softmax_in_float32():
  # Logits near 256 (a per-query offset, which softmax ignores) that differ by O(1) from key
  # to key: rounded to bfloat16 they would move by up to 1 and the weights by up to e-fold;
  # in float32 they carry ~1e-4 of error.
  rng = np.random.default_rng(2)
  query = (1 + 0.5 * rng.normal(size=(1, 4, 2, 8))).astype(np.float32)
  key = (32 + 0.5 * rng.normal(size=(1, 64, 2, 8))).astype(np.float32)
  value = rng.normal(size=(1, 64, 2, 8)).astype(np.float32)
  got = attention.dot_product_attention(
      jnp.asarray(query, jnp.bfloat16),
      jnp.asarray(key, jnp.bfloat16),
      jnp.asarray(value, jnp.bfloat16),
      dtype=jnp.bfloat16,
  )
  assert got.dtype == jnp.bfloat16
  expected = _numpy_attention(
      *(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (query, key, value))
  )
  # Then two roundings to bfloat16, half an ulp each, of quantities bounded by max|value|:
  # the weights (summing to 1) and the output. tests/tolerances.py with n = 1, depth 2 and
  # slack 1 (one eps for the two half-ulps), relative to max|value|.
  tolerances.assert_close(
      np.asarray(got, np.float32), expected, num_terms=1, depth=2, dtype=jnp.bfloat16,
      slack=1, scale=np.abs(value).max(),
  )


def test_kernel_rejects_bad_head_grouping():
  with pytest.raises(ValueError, match="3 query heads cannot share 2"):
    attention.dot_product_attention(
        np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4))
    )


def _plain(variables):
  return jax.tree.map(
      lambda p: np.asarray(p.value if hasattr(p, "value") else p),
      variables["params"],
      is_leaf=lambda p: hasattr(p, "names"),
  )


def _mask_with_padded_keys(q_len):
  """[2, 1, q_len, 7]: every query of both rows may attend to the 7 keys, except the
  second row's last 3 (padding)."""
  return attention.make_attention_mask(
      np.ones((2, q_len), bool), np.array([[True] * 7, [True] * 4 + [False] * 3])
  )


def _numpy_projected_attention(p, inputs_q, inputs_kv, mask):
  """MultiHeadAttention with parameters `p` in float64: (key, value [batch, k, kv_heads,
  head_dim], output [batch, q, embed]), the projections around `_numpy_attention`."""
  inputs_q, inputs_kv = (np.asarray(a, np.float64) for a in (inputs_q, inputs_kv))
  query = np.einsum("bqe,ehd->bqhd", inputs_q, p["query"]["kernel"])
  key = np.einsum("bke,ehd->bkhd", inputs_kv, p["key"]["kernel"])
  value = np.einsum("bke,ehd->bkhd", inputs_kv, p["value"]["kernel"])
  attended = _numpy_attention(query, key, value, mask=np.asarray(mask))
  return key, value, np.einsum("bqhd,hde->bqe", attended, p["out"]["kernel"].astype(np.float64))


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_multi_head_attention_matches_numpy(num_kv_heads):
  module = attention.MultiHeadAttention(num_heads=4, head_dim=3, num_kv_heads=num_kv_heads)
  rng = np.random.default_rng(3)
  inputs_q = rng.normal(size=(2, 5, 6)).astype(np.float32)
  inputs_kv = rng.normal(size=(2, 7, 6)).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(0), inputs_q, inputs_kv)
  p = _plain(variables)
  mask = _mask_with_padded_keys(5)
  got = module.apply(variables, inputs_q, inputs_kv, mask=mask)
  _, _, expected = _numpy_projected_attention(p, inputs_q, inputs_kv, mask)
  # Projections in and out around the kernel: depth 4; the widest sum is heads × head_dim.
  tolerances.assert_close(got, expected, num_terms=12, depth=4)
  kv_shape = (6, 4 if num_kv_heads is None else 1, 3)
  assert p["key"]["kernel"].shape == kv_shape


def test_query_initialisation_is_scaled_by_head_dim():
  module = attention.MultiHeadAttention(num_heads=8, head_dim=64)
  x = jnp.ones((1, 1, 256))
  p = _plain(module.init(jax.random.PRNGKey(0), x, x))
  # fan-in normal: std 1/sqrt(256) for keys; queries further divided by sqrt(64).
  np.testing.assert_allclose(p["key"]["kernel"].std(), 1 / 16, rtol=0.05)
  np.testing.assert_allclose(p["query"]["kernel"].std(), 1 / 16 / 8, rtol=0.05)
  # The output projection's fan-in is heads * head_dim = 512.
  np.testing.assert_allclose(p["out"]["kernel"].std(), 512**-0.5, rtol=0.05)


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_decode_cache_matches_causal_attention(num_kv_heads):
  module = attention.MultiHeadAttention(num_heads=2, head_dim=4, num_kv_heads=num_kv_heads)
  rng = np.random.default_rng(4)
  length = 6
  x = rng.normal(size=(2, length, 8)).astype(np.float32)
  bias = rng.normal(size=(1, 2, length, length)).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(0), x, x)
  causal = np.tril(np.ones((length, length), bool))[None, None]
  full = module.apply(variables, x, x, mask=causal, bias=bias)

  cache = module.init(jax.random.PRNGKey(0), x, x, decode=True)["cache"]
  step = jax.jit(
      functools.partial(module.apply, decode=True, mutable=["cache"]),
  )
  outputs = []
  for i in range(length):
    out, mutated = step(
        {"params": variables["params"], "cache": cache},
        x[:, i : i + 1],
        x[:, i : i + 1],
        bias=bias[:, :, i : i + 1],
    )
    cache = mutated["cache"]
    outputs.append(out)
  # Two float32 programs (one key at a time vs all at once): programs=2, depth 4.
  tolerances.assert_close(
      np.concatenate(outputs, axis=1), full, num_terms=8, depth=4, programs=2
  )
  assert int(cache["kv_cache"]["cache_index"]) == length


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_cross_attention_caches_heads_major_keys_values_and_matches_numpy(num_kv_heads):
  # The decoder's cross-attention: the cache holds the encoder's keys and values once,
  # [batch, kv_heads, input length, head_dim] (the layout the products read), and a
  # decoding step reading it equals the numpy attention over the encoded inputs.
  module = transformer_layers.CrossAttention(num_heads=4, head_dim=3, num_kv_heads=num_kv_heads)
  rng = np.random.default_rng(5)
  inputs_q = rng.normal(size=(2, 1, 6)).astype(np.float32)
  encoded = rng.normal(size=(2, 7, 6)).astype(np.float32)
  mask = _mask_with_padded_keys(1)
  variables = module.init(jax.random.PRNGKey(0), inputs_q, encoded, decode=True)
  p = _plain({"params": variables["params"]})
  key, value, expected = _numpy_projected_attention(p, inputs_q, encoded, mask)
  cached_key, cached_value = variables["cache"]["cross_key_value"]["value"]
  tolerances.assert_close(cached_key, key.transpose(0, 2, 1, 3), num_terms=6, depth=1)
  tolerances.assert_close(cached_value, value.transpose(0, 2, 1, 3), num_terms=6, depth=1)
  # A step from the cache; the encoded inputs it is given must not be read again.
  got, _ = module.apply(
      variables, inputs_q, np.zeros_like(encoded), mask=mask, decode=True, mutable=["cache"]
  )
  tolerances.assert_close(got, expected, num_terms=12, depth=4)
