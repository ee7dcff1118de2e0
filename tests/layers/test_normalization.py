"""RMSNorm against the plain formula of T5's layer norm."""

import jax
import jax.numpy as jnp
import numpy as np

from colt5_flax.layers.normalization import RMSNorm


def test_rms_norm_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32) * 3.0
  scale = rng.normal(size=(8,)).astype(np.float32)
  expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale
  got = RMSNorm().apply({"params": {"scale": scale}}, x)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_bfloat16_output_float32_statistics():
  # Values whose squares overflow bfloat16 sums badly if accumulated in bf16.
  x = jnp.full((1, 4096), 3.0, jnp.bfloat16)
  module = RMSNorm(dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(0), x)
  y = module.apply(params, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), 1.0, rtol=1e-2)


def test_rms_norm_zero_input_is_finite():
  x = jnp.zeros((2, 8))
  module = RMSNorm()
  y = module.apply(module.init(jax.random.PRNGKey(0), x), x)
  assert np.all(np.asarray(y) == 0.0)
