"""`convert.hf.from_hf` and scripts/convert_hf_checkpoint.py against transformers' PyTorch models.

The reference is transformers itself: random small T5 / LongT5 models built here (no
downloads), their logits for a padded batch, and ours from the converted weights. Sizes are
chosen so nothing divides evenly: 19 input tokens in blocks of 3 (local radius 2) and
global blocks of 4, a row shorter than one global block, 3 heads, more decoder than encoder
layers.
"""

import copy
import functools
import pathlib
import types

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from colt5_flax import network  # noqa: E402
from colt5_flax.convert import hf, hf_architecture  # noqa: E402
from tests import hf_fixtures, tolerances  # noqa: E402

VOCAB = 40
# More decoder than encoder layers (tests/hf_fixtures.py has the rest of the sizes).
_COMMON = dict(hf_fixtures.SIZES, vocab_size=VOCAB, num_decoder_layers=3)


def _hf_model(kind: str, *, tied: bool, untie_head: bool = False, seed: int = 0):
  """A random transformers model; layer-norm scales random too (HF initialises them to 1).

  tied: the config's `tie_word_embeddings` (True: T5 v1.0's d_model^-0.5 output rescale).
  untie_head: give `lm_head` its own random weights, as a T5.1.1 checkpoint has.
  """
  torch.manual_seed(seed)
  config = hf_fixtures.config(kind, **_COMMON, tie_word_embeddings=tied)
  if kind == "t5":
    model = transformers.T5ForConditionalGeneration(config)
  else:
    model = transformers.LongT5ForConditionalGeneration(config)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "layer_norm" in name:
        parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
    if untie_head:
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
  return model.float().eval()


def _batch(seed=0):
  """Padded tokens: inputs [3, 19] with 19, 13 and 3 real tokens; targets [3, 7]."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, VOCAB, (3, 19))
  inputs[1, 13:] = 0
  inputs[2, 3:] = 0  # shorter than one global block: no global tokens at all
  targets = rng.integers(1, VOCAB, (3, 7))
  targets[1, 4:] = 0
  targets[2, 6:] = 0
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return inputs, decoder_inputs, targets


def _hf_logits(model, inputs, decoder_inputs, targets):
  """transformers' logits in float64 (a copy of `model` with the same float32 weights)."""
  model = copy.deepcopy(model).double()
  with torch.no_grad():
    return model(
        input_ids=torch.from_numpy(inputs),
        attention_mask=torch.from_numpy((inputs > 0).astype(np.int64)),
        decoder_input_ids=torch.from_numpy(decoder_inputs),
        decoder_attention_mask=torch.from_numpy((targets > 0).astype(np.int64)),
    ).logits.numpy()


def _our_logits(net, variables, inputs, decoder_inputs, targets):
  apply = jax.jit(functools.partial(net.apply, enable_dropout=False))
  logits = apply(variables, jnp.asarray(inputs), jnp.asarray(decoder_inputs), jnp.asarray(targets))
  return np.asarray(logits)


def _assert_logits_match(ours, theirs, targets):
  """Our float32 logits against transformers' float64 ones (tests/tolerances.py).

  Width: d_ff = 24 (the 19 input tokens and 4 global ones are fewer). Depth: contractions in
  sequence, 4 per attention and 2 per MLP; a transient-global encoder layer 2 more for
  its global keys: 8 × 2 encoder layers + 10 × 3 decoder layers + the logits.
  """
  # Only real target positions: padding positions are don't-care on both sides.
  real = targets > 0
  tolerances.assert_close(
      ours[real], theirs[real], num_terms=_COMMON["d_ff"],
      depth=8 * _COMMON["num_layers"] + 10 * _COMMON["num_decoder_layers"] + 1,
  )


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize(
    "kind,tied,untie_head,via_embedding",
    [
        # T5 v1.0-style output (tied, rescaled) on a gated model: logits via the embedding.
        ("t5", True, False, True),
        # Rescaled but with its own head: the rescale is folded into logits_dense.
        ("t5", True, True, False),
        # LongT5 as released: T5.1.1 output (no rescale), head tied in memory by HF.
        ("local", False, False, False),
        # TGlobal with a separate head, as a T5.1.1 checkpoint.
        ("transient-global", False, True, False),
    ],
)
def test_logits_match_transformers(kind, tied, untie_head, via_embedding):
  model = _hf_model(kind, tied=tied, untie_head=untie_head)
  batch = _batch()
  net, variables = hf.from_hf(model)
  assert net.logits_via_embedding == via_embedding
  _assert_logits_match(_our_logits(net, variables, *batch), _hf_logits(model, *batch), batch[2])


def test_variables_are_boxed_like_init():
  """Leaves carry the logical axis names `init` gives, so the trainer can shard them."""
  model = _hf_model("transient-global", tied=False)
  net, variables = hf.from_hf(model)
  expected = traverse_util.flatten_dict(hf.abstract_variables(net)["params"])
  got = traverse_util.flatten_dict(variables["params"])
  assert set(got) == set(expected)
  for path, leaf in got.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert leaf.names == expected[path].names, path
    assert leaf.value.dtype == jnp.float32, path
  # Spot values, by hand from HF's layout: [out, in] linears, [buckets, heads] tables.
  params = nn.unbox(variables["params"])
  q = model.encoder.block[1].layer[0].TransientGlobalSelfAttention.q.weight.detach().numpy()
  np.testing.assert_array_equal(
      _find(params["encoder"]["layers_1"]["attention"], "query")["kernel"][:, 2, 1],
      q[2 * 4 + 1],
  )
  o = model.decoder.block[2].layer[1].EncDecAttention.o.weight.detach().numpy()
  np.testing.assert_array_equal(
      params["decoder"]["layers_2"]["encoder_decoder_attention"]["out"]["kernel"][1, 3], o[:, 7]
  )
  table = model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
  np.testing.assert_array_equal(
      params["decoder"]["relpos_bias"]["rel_embedding"], table.detach().numpy().T
  )


def _find(tree, key):
  """The subtree under the first `key` found depth-first."""
  if key in tree:
    return tree[key]
  for value in tree.values():
    if isinstance(value, dict):
      found = _find(value, key)
      if found is not None:
        return found
  return None


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(feed_forward_proj="relu"), "'relu'"),  # T5 v1.0: non-gated ReLU
        (dict(feed_forward_proj="gated-silu"), "'gated-silu'"),
        (dict(layer_norm_epsilon=1e-5), "layer_norm_epsilon=1e-05"),
    ],
)
def test_unconvertible_configs_raise(overrides, message):
  torch.manual_seed(0)
  config = hf_fixtures.config("t5", **{**_COMMON, **overrides})
  with pytest.raises(ValueError, match=message):
    hf.from_hf(transformers.T5ForConditionalGeneration(config))


def test_separate_encoder_embedding_raises():
  model = _hf_model("t5", tied=False)
  model.encoder.embed_tokens = torch.nn.Embedding(VOCAB, _COMMON["d_model"])
  with pytest.raises(ValueError, match="encoder.embed_tokens"):
    hf.from_hf(model)


def test_other_model_types_raise():
  model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="bart"))
  with pytest.raises(ValueError, match="model_type='bart'"):
    hf.from_hf(model)


# ----------------------------------------------------------------------------- script

_CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


def _with_gin_network(gin_text, use):
  """Parses a printed model file (float32 activations) and returns `use(network)`.

  The factories gin binds are read when the network is traced, so `use` runs while the
  config is live; the config is cleared afterwards.
  """
  if not (_CONFIGS / "architectures").is_dir():
    pytest.skip("configs/architectures/ is not in this checkout")
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(_CONFIGS))
    gin.parse_config(gin_text)
    # Architecture files default to bfloat16 activations; compare in float32.
    gin.parse_config("ACTIVATION_DTYPE = 'float32'")
    return use(gin.get_configurable(network.EncoderDecoder)())
  finally:
    gin.clear_config()



@pytest.fixture(scope="module")
def saved_t5(tmp_path_factory):
  """A T5.1.1-configured model saved with save_pretrained (safetensors)."""
  model = _hf_model("t5", tied=False, seed=3)
  hf_dir = tmp_path_factory.mktemp("hf") / "t5"
  model.save_pretrained(hf_dir)
  # Where save_pretrained puts a T5 tokenizer's model; its content is not read here.
  (hf_dir / "spiece.model").write_bytes(b"stands in for a SentencePiece model")
  return model, hf_dir


def _restore(path):
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer().restore(path)


def test_script_end_to_end(script, saved_t5, tmp_path):
  model, hf_dir = saved_t5
  gin_text = script.convert_checkpoint(str(hf_dir), str(tmp_path / "ckpt"))
  restored = _restore(tmp_path / "ckpt")
  # The printed gin names the tokenizer's vocabulary saved beside the weights.
  assert f"vocabularies.sentencepiece_vocabulary.path = '{hf_dir / 'spiece.model'}'" in gin_text

  # The checkpoint holds exactly the converted params, unboxed.
  _, variables = hf.from_hf(model)
  expected = traverse_util.flatten_dict(nn.unbox(variables["params"]))
  got = traverse_util.flatten_dict(restored)
  assert set(got) == set(expected)
  for path, value in expected.items():
    assert got[path].dtype == np.float32, path
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=str(path))

  # The trainer's INITIAL_CHECKPOINT_PATH reader takes the directory as it is.
  checkpoints = pytest.importorskip("colt5_flax.checkpoints")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      nn.unbox(hf.abstract_variables(hf.from_hf(model)[0])["params"]),
  )
  for path, value in traverse_util.flatten_dict(
      checkpoints.restore_params(str(tmp_path / "ckpt"), abstract)
  ).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]))

  # The printed gin builds the network that, with the restored plain arrays, gives
  # transformers' logits.
  batch = _batch(seed=1)
  ours = _with_gin_network(gin_text, lambda net: _our_logits(net, {"params": restored}, *batch))
  _assert_logits_match(ours, _hf_logits(model, *batch), batch[2])


def test_script_bfloat16_and_pickle_free_bin(script, saved_t5, tmp_path):
  """--dtype=bfloat16 stores bfloat16; a pytorch_model.bin directory loads with weights_only."""
  model, _ = saved_t5
  bin_dir = tmp_path / "bin"
  # transformers 5 only writes safetensors: write the legacy pickle format by hand.
  model.config.save_pretrained(bin_dir)
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  # No spiece.model and not T5's 32128 rows: the vocabulary must be named.
  with pytest.raises(ValueError, match=r"40 rows, not T5's 32128: .*--vocabulary="):
    script.convert_checkpoint(str(bin_dir), str(tmp_path / "ckpt"), dtype="bfloat16")
  gin_text = script.convert_checkpoint(
      str(bin_dir), str(tmp_path / "ckpt"), dtype="bfloat16", vocabulary="byte"
  )
  assert "VOCABULARY = @seqio.ByteVocabulary()" in gin_text
  restored = traverse_util.flatten_dict(_restore(tmp_path / "ckpt"))
  _, variables = hf.from_hf(model)
  for path, value in traverse_util.flatten_dict(nn.unbox(variables["params"])).items():
    assert restored[path].dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(
        np.asarray(restored[path], np.float32),
        np.asarray(jnp.asarray(value, jnp.bfloat16), np.float32),
        err_msg=str(path),
    )


def test_script_refuses_bad_directories(script, saved_t5, tmp_path):
  _, hf_dir = saved_t5
  existing = tmp_path / "exists"
  existing.mkdir()
  with pytest.raises(ValueError, match="exists"):
    script.convert_checkpoint(str(hf_dir), str(existing))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    script.convert_checkpoint(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  empty = tmp_path / "no_weights"
  empty.mkdir()
  (empty / "config.json").write_text((hf_dir / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    script.convert_checkpoint(str(empty), str(tmp_path / "out"))


@pytest.mark.parametrize("kind", ["t5", "local", "transient-global"])
def test_gin_bindings_build_the_converted_network(kind):
  """Parameter tree (paths, shapes, axis names) of the gin-built network == the converted one."""
  model = _hf_model(kind, tied=False)
  net, variables = hf.from_hf(model)
  gin_params = _with_gin_network(
      hf_architecture.gin_bindings(hf_architecture.architecture_from_hf(model)),
      lambda net: hf.abstract_variables(net)["params"],
  )
  got = traverse_util.flatten_dict(gin_params)
  expected = traverse_util.flatten_dict(variables["params"])
  assert set(got) == set(expected)
  for path, leaf in expected.items():
    assert got[path].value.shape == leaf.value.shape, path
    assert got[path].names == leaf.names, path


def test_checkpoint_vocabulary_defaults(script, tmp_path):
  # Without spiece.model: T5's public model for T5's 32128 rows, else the caller must say.
  t5_model = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
  assert script.checkpoint_vocabulary(str(tmp_path), 32128) == t5_model
  assert script.checkpoint_vocabulary(str(tmp_path), 384, "byte") == "byte"
  with pytest.raises(ValueError, match="--vocabulary"):
    script.checkpoint_vocabulary(str(tmp_path), 384)


@pytest.mark.parametrize(
    "vocabulary, expected",
    [("byte", "ByteVocabulary"), ("/data/spm.model", "sentencepiece_vocabulary")],
)
def test_gin_bindings_bind_the_vocabulary(vocabulary, expected):
  arch = hf_architecture.architecture_from_hf(_hf_model("t5", tied=False))
  text = hf_architecture.gin_bindings(arch, vocabulary)
  bound = _with_gin_network(text, lambda net: str(gin.query_parameter("%VOCABULARY")))
  assert expected in bound
  if vocabulary != "byte":
    assert f"vocabularies.sentencepiece_vocabulary.path = '{vocabulary}'" in text
