"""colt5_flax.model_files: an encoder built from a model file has that file's sizes."""

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax import count_params, model_files, network


def test_encoder_from_the_tiny_colt5_file_has_its_sizes():
  # configs/models/colt5_tiny.gin: embed 32, 2 layers, 1 light + 3 heavy heads of 8,
  # light MLP 32, heavy 256 (written out here by hand).
  with model_files.parsed(["models/colt5_tiny.gin"], ["NUM_ENCODER_LAYERS = 1"]):
    assert model_files.macro("EMBED_DIM") == 32
    encoder = model_files.build(network.Encoder)
    x = jnp.zeros((1, 64, 32))
    params = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), x, jnp.ones((1, 64), bool))
  shapes = {
      "/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
      for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  assert encoder.num_layers == 1
  assert len([p for p in shapes if p.startswith("params/layers_")]) > 0
  assert not any(p.startswith("params/layers_1") for p in shapes)
  widths = sorted({s[-1] for p, s in shapes.items() if "wi" in p})
  assert widths == [32, 256]  # light and heavy MLP hidden widths
  # The configuration is cleared when the block ends.
  with pytest.raises(ValueError, match="no macro EMBED_DIM"):
    model_files.macro("EMBED_DIM")


def test_missing_model_macro_is_named():
  with model_files.parsed([], ["import colt5_flax.network"]):
    with pytest.raises(ValueError, match="defines no MODEL macro"):
      count_params.model_from_gin()
  assert not gin.config_str()


@pytest.mark.parametrize(
    "kind, size, message",
    [("longt5", "base", "Unknown encoder kind 'longt5'"), ("t5", "small", "Unknown model size")],
)
def test_bad_kind_or_size_is_named(kind, size, message):
  with pytest.raises(ValueError, match=message):
    model_files.model_file(kind, size)



@pytest.mark.parametrize(
    "model_file, bindings",
    [
        # A scoped binding: the encoder's GatedMlp only (the decoder's MLP stays 64).
        ("models/t5_1_1_tiny.gin", ["encoder/mlp.GatedMlp.hidden_dim = 48"]),
        # Routers and a capacity two references deep; 0.5 changes which tokens route.
        ("models/colt5_tiny.gin", ["ROUTED_FRACTION = 0.5"]),
    ],
)
def test_frozen_network_outlives_the_configuration(model_file, bindings):
  # A live gin network reads its factories' bindings when traced; the frozen one carries
  # them. Same parameters, same program: the logits must be identical, the frozen ones
  # computed after gin is cleared.
  tokens = jnp.asarray([[5, 9, 3, 7, 2, 8, 1, 0], [7, 4, 1, 0, 0, 0, 0, 0]], jnp.int32)
  targets = tokens[:, :4]

  def logits(net, variables):
    return np.asarray(net.apply(variables, tokens, targets, targets, enable_dropout=False))

  with model_files.parsed(
      [model_file], ["NUM_ENCODER_LAYERS = 1", "NUM_DECODER_LAYERS = 1", *bindings]
  ):
    live = model_files.model_from_gin().module
    variables = live.init(jax.random.PRNGKey(0), tokens, targets, targets, enable_dropout=False)
    expected = logits(live, variables)
    frozen = model_files.frozen("MODEL").module
  assert not gin.config_str()
  np.testing.assert_array_equal(logits(frozen, variables), expected)
  if "t5_1_1" in model_file:
    kernels = nn.unbox(variables["params"])
    assert kernels["encoder"]["layers_0"]["mlp"]["wi_0"].shape[-1] == 48
    assert kernels["decoder"]["layers_0"]["mlp"]["wi_0"].shape[-1] == 64

def test_frozen_names_a_missing_macro_and_an_unset_required_one():
  with model_files.parsed([], ["import colt5_flax.network"]):
    with pytest.raises(ValueError, match="defines no MODEL macro"):
      model_files.frozen("MODEL")
  with model_files.parsed(["architectures/t5_1_1.gin"], []):
    with pytest.raises(ValueError, match="%EMBED_DIM is gin.REQUIRED"):
      model_files.frozen("ARCHITECTURE")
