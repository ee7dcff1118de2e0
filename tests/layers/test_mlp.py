"""GatedMlp against numpy's gated-GELU."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax.layers.mlp import GatedMlp
from tests import tolerances


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# None: all tokens at once; 2, 3: the 6 tokens in chunks; 4 does not divide 6: at once.
@pytest.mark.parametrize("chunk_length", [None, 2, 3, 4])
def test_gated_mlp_matches_numpy(chunk_length):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 6)).astype(np.float32)
  wi_0 = rng.normal(size=(6, 10)).astype(np.float32) * 0.3
  wi_1 = rng.normal(size=(6, 10)).astype(np.float32) * 0.3
  wo = rng.normal(size=(10, 6)).astype(np.float32) * 0.3
  x64, wi_0_64, wi_1_64, wo_64 = (a.astype(np.float64) for a in (x, wi_0, wi_1, wo))
  expected = (_gelu_tanh(x64 @ wi_0_64) * (x64 @ wi_1_64)) @ wo_64
  got = GatedMlp(hidden_dim=10, chunk_length=chunk_length).apply(
      {"params": {"wi_0": wi_0, "wi_1": wi_1, "wo": wo}}, x
  )
  # Against float64 (tests/tolerances.py): wi, the GELU and the product, then wo (10 terms).
  tolerances.assert_close(got, expected, num_terms=10, depth=3)


def test_gated_mlp_matches_transformers_gelu_new():
  torch = pytest.importorskip("torch")
  from transformers.activations import NewGELUActivation

  x = np.linspace(-5, 5, 101).astype(np.float32)
  reference = NewGELUActivation()(torch.from_numpy(x).double()).numpy()  # float64
  # Elementwise, about five float32 operations in sequence (cube, multiply-add, tanh, 1 +,
  # product): tests/tolerances.py with n = 1.
  tolerances.assert_close(jax.nn.gelu(x, approximate=True), reference, num_terms=1, depth=5)


def test_gated_mlp_parameter_axes_and_dropout():
  module = GatedMlp(hidden_dim=12, dropout_rate=0.5)
  x = jnp.ones((1, 3, 4))
  variables = module.init(jax.random.PRNGKey(0), x)
  names = jax.tree.map(
      lambda p: p.names, variables["params"], is_leaf=lambda p: hasattr(p, "names")
  )
  assert names == {"wi_0": ("embed", "mlp"), "wi_1": ("embed", "mlp"), "wo": ("mlp", "embed")}
  deterministic = module.apply(variables, x)
  dropped = module.apply(
      variables, x, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(1)}
  )
  assert not np.allclose(np.asarray(deterministic), np.asarray(dropped))


def test_chunks_share_the_dropout_mask():
  # The mask is one per (example, hidden unit) along the whole length (tests/test_dropout.py
  # checks that for one chunk): in chunks of 2 tokens the output equals the unchunked one.
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 4))
  variables = GatedMlp(hidden_dim=64).init(jax.random.PRNGKey(0), x)
  rngs = {"dropout": jax.random.PRNGKey(1)}
  whole, chunked = (
      GatedMlp(hidden_dim=64, dropout_rate=0.5, chunk_length=chunk).apply(
          variables, x, enable_dropout=True, rngs=rngs
      )
      for chunk in (None, 2)
  )
  plain = GatedMlp(hidden_dim=64).apply(variables, x)
  assert not np.allclose(np.asarray(whole), np.asarray(plain))  # dropout did act
  # Same products on the same numbers, the tokens grouped differently: float32 rounding.
  tolerances.assert_close(chunked, whole, num_terms=64, depth=3, programs=2)


def test_gated_mlp_rejects_unknown_activation():
  with pytest.raises(ValueError, match="swish2"):
    GatedMlp(hidden_dim=4, activation="swish2").init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
