"""Dropout follows t5x's T5.1.1 (it matters at fine-tuning dropout 0.1).

t5x (examples/t5/network.py and layers.py) shares one dropout mask along the length axis
for the embeddings, every residual branch, the MLP's hidden activations and the decoder's
final output; attention-weight dropout shares one mask per (example, head, key) over the
queries; only the encoder's final dropout is elementwise. Each test reads the masks off
the activations: with a mask shared along an axis, an entry is dropped at every position
of that axis or at none, and the kept entries are scaled by 1/(1 − rate). The whole
network is T5.1.1's model file (configs/models/t5_1_1_tiny.gin) at smaller sizes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from colt5_flax import model_files
from colt5_flax.layers import attention
from colt5_flax.layers.mlp import GatedMlp
from tests import tolerances

RATE = 0.5
VOCAB = 40


def _dropped_along(dropped, kept, axis):
  """Checks that `dropped` has one mask entry per line along `axis` (and, given the same
  activations before dropout, `kept`, that dropped = kept·mask/(1 − RATE)); returns the
  fraction of entries dropped."""
  zeros = dropped == 0.0
  assert np.all(zeros.all(axis=axis) | (~zeros).all(axis=axis)), "mask not shared on axis"
  if kept is not None:
    # Two compilations (with and without dropout) may fuse the layer before the mask
    # differently: tests/tolerances.py for two float32 programs, a sum of at most 12
    # terms and two steps (projection, then GELU·linear or softmax).
    tolerances.assert_close(
        dropped, np.where(zeros, 0.0, kept / (1.0 - RATE)), num_terms=12, depth=2,
        programs=2,
    )
  return zeros.mean()


def _captured(module, variables, *args, enable_dropout, **kwargs):
  """Outputs of every submodule call, keyed by path and, past a module's first call, by
  `#call` (flax's capture_intermediates)."""
  _, state = module.apply(
      variables, *args, enable_dropout=enable_dropout, capture_intermediates=True,
      mutable=["intermediates"], rngs={"dropout": jax.random.PRNGKey(7)}, **kwargs,
  )
  flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  captured = {}
  for path, value in flat:
    name = "/".join(str(getattr(key, "key", key)) for key in path[:-2])
    call = path[-1].idx
    captured[name if call == 0 else f"{name}#{call}"] = np.asarray(value)
  return captured


def test_mlp_hidden_dropout_is_shared_along_the_length():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
  module = GatedMlp(hidden_dim=32, dropout_rate=RATE)
  variables = module.init(jax.random.PRNGKey(1), x)
  kept = _captured(module, variables, x, enable_dropout=False)["Dropout_0"]
  dropped = _captured(module, variables, x, enable_dropout=True)["Dropout_0"]
  assert dropped.shape == (2, 16, 32)
  assert 0.3 < _dropped_along(dropped, kept, axis=1) < 0.7  # [batch, length, hidden]


def test_attention_weight_dropout_is_shared_over_the_queries():
  # With one-hot values (value j = e_j) the output rows are the attention weights.
  batch, length, heads = 2, 12, 3
  query = jax.random.normal(jax.random.PRNGKey(2), (batch, length, heads, length))
  key = jax.random.normal(jax.random.PRNGKey(3), (batch, length, heads, length))
  value = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (batch, length, heads, length))
  dot = functools.partial(attention.dot_product_attention, query, key, value)
  kept = np.asarray(dot())  # [batch, q, heads, k]
  dropped = np.asarray(
      dot(dropout_rng=jax.random.PRNGKey(4), dropout_rate=RATE, deterministic=False)
  )
  np.testing.assert_allclose(kept.sum(-1), 1.0, rtol=1e-5)  # they are the weights
  assert 0.3 < _dropped_along(dropped, kept, axis=1) < 0.7  # shared over the queries


def _t5_network():
  """The `EncoderDecoder` of configs/models/t5_1_1_tiny.gin at the test's sizes (one layer
  each, 2 heads of 8, MLP 32) with every dropout rate RATE, as `model_files` builds it."""
  bindings = {
      "VOCAB_SIZE": VOCAB, "EMBED_DIM": 16, "NUM_HEADS": 2, "HEAD_DIM": 8, "MLP_DIM": 32,
      "NUM_ENCODER_LAYERS": 1, "NUM_DECODER_LAYERS": 1, "DROPOUT_RATE": RATE,
  }
  model_file = model_files.model_file("t5", "tiny")
  with model_files.parsed([model_file], [f"{k} = {v!r}" for k, v in bindings.items()]):
    return model_files.frozen("ARCHITECTURE")


def test_network_dropout_sites_follow_t5x():
  net = _t5_network()
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, VOCAB, size=(2, 24))
  targets = rng.integers(1, VOCAB, size=(2, 10))
  args = (inputs, targets, targets)
  variables = net.init(jax.random.PRNGKey(0), *args, enable_dropout=False)
  # Past the first site the activations differ from a run without dropout, so only the
  # masks' shapes are read: a zero is a dropped entry (activations are never exactly 0).
  dropped = _captured(net, variables, *args, enable_dropout=True)
  shared_along_length = [
      "encoder/Dropout_0",  # embeddings
      "encoder/layers_0/Dropout_0",  # attention residual branch
      "encoder/layers_0/Dropout_1",  # MLP residual branch
      "encoder/layers_0/mlp/Dropout_0",  # MLP hidden
      "decoder/Dropout_0",
      "decoder/layers_0/Dropout_0",  # self-attention, cross-attention and MLP branches
      "decoder/layers_0/Dropout_0#1",
      "decoder/layers_0/Dropout_0#2",
      "decoder/layers_0/mlp/Dropout_0",
      "decoder/Dropout_1",  # decoder's final output
  ]
  for name in shared_along_length:
    assert 0.2 < _dropped_along(dropped[name], None, axis=1) < 0.8, name
  # The encoder's final dropout is elementwise: some feature is dropped at some positions
  # and kept at others.
  zeros = dropped["encoder/Dropout_1"] == 0.0
  assert 0.2 < zeros.mean() < 0.8
  assert np.any(zeros.any(axis=1) & (~zeros).any(axis=1))
  # Nothing else drops out unannounced: every Dropout module is one of the above.
  every = {name for name in dropped if "/Dropout" in f"/{name}"}
  assert every == set(shared_along_length) | {"encoder/Dropout_1"}
