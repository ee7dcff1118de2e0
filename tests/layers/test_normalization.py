"""RMSNorm against the plain formula of T5's layer norm."""

import jax
import jax.numpy as jnp
import numpy as np

from colt5_flax.layers.normalization import RMSNorm
from tests import tolerances


def test_rms_norm_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32) * 3.0
  scale = rng.normal(size=(8,)).astype(np.float32)
  x64 = x.astype(np.float64)
  expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6) * scale
  got = RMSNorm().apply({"params": {"scale": scale}}, x)
  # Against float64 (tests/tolerances.py): the mean of 8 squares, its rsqrt, two products.
  tolerances.assert_close(got, expected, num_terms=8, depth=3)


def test_rms_norm_bfloat16_output_float32_statistics():
  # Values whose squares overflow bfloat16 sums badly if accumulated in bf16.
  x = jnp.full((1, 4096), 3.0, jnp.bfloat16)
  module = RMSNorm(dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(0), x)
  y = module.apply(params, x)
  assert y.dtype == jnp.bfloat16
  # Statistics in float32 are exact here (4096 × 9); only the output rounds to bfloat16,
  # by half an ulp: one eps (tests/tolerances.py, slack 1) is the bound. Summed in bfloat16,
  # 9s stall once the sum's spacing passes 18, and the output lands far above 1.
  tolerances.assert_close(
      np.asarray(y, np.float32), np.ones(y.shape), num_terms=1, dtype=jnp.bfloat16, slack=1
  )


def test_rms_norm_zero_input_is_finite():
  x = jnp.zeros((2, 8))
  module = RMSNorm()
  y = module.apply(module.init(jax.random.PRNGKey(0), x), x)
  assert np.all(np.asarray(y) == 0.0)


def test_rms_norm_gradients_match_numpy():
  """The scale's gradient (a sum over every token, taken as a product with ones) and the
  input's, against the float64 derivatives of y = x / rms(x) · scale."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, size=(8,)).astype(np.float32)
  cotangent = rng.normal(size=x.shape).astype(np.float32)
  x64, s64, g64 = (a.astype(np.float64) for a in (x, scale, cotangent))
  rms = np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6)
  normed = x64 / rms
  expected_dscale = np.sum(g64 * normed, axis=(0, 1))
  gs = g64 * s64
  # d/dx of x / rms: (gs − normed · mean(gs · normed)) / rms.
  expected_dx = (gs - normed * np.mean(gs * normed, axis=-1, keepdims=True)) / rms

  def loss(params, x):
    return jnp.sum(RMSNorm().apply(params, x) * cotangent)

  grads, dx = jax.grad(loss, argnums=(0, 1))({"params": {"scale": scale}}, jnp.asarray(x))
  # Sums of 10 tokens (scale) and of 8 features (the input's), after the norm's own sum.
  tolerances.assert_close(grads["params"]["scale"], expected_dscale, num_terms=10, depth=2)
  tolerances.assert_close(dx, expected_dx, num_terms=8, depth=3)
