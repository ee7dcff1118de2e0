"""transformers' PyTorch T5 / LongT5 → our `EncoderDecoder` and its variables.

`from_hf(model)` reads a `T5ForConditionalGeneration` or `LongT5ForConditionalGeneration`
(local or transient-global encoder attention) and returns our network configured to match
and its variables, so that

    network, variables = from_hf(model)
    logits = network.apply(variables, encoder_input_tokens, decoder_input_tokens,
                           decoder_target_tokens, enable_dropout=False)

gives the logits of `model(input_ids, attention_mask=input_ids > 0, decoder_input_ids=...)`
at every non-padding target position (float32: to ~1e-6 relative). Reading the model's
architecture and building the matching network (and its gin file) is
`convert/hf_architecture.py`; this module moves the parameters.

What the mapping rests on (transformers 4.45 … 5.x):
- HF `nn.Linear` weights are [out, in]: `q/k/v.weight` [heads · d_kv, d_model] become our
  `query/key/value` kernels [embed, heads, kv]; `o.weight` [d_model, heads · d_kv] becomes
  `out` [heads, kv, embed]. Neither side scales the logits by 1/√d_kv (T5 folds it into the
  query initialisation), so the weights move unchanged.
- HF keeps the relative-position table only in block 0 (`relative_attention_bias`
  [buckets, heads], and for TGlobal `global_relative_attention_bias`) and every later
  layer reuses block 0's bias; our stacks own the same single tables
  (`relpos_bias_<name>/rel_embedding` [heads, buckets]).
- T5 v1.0 rescales the decoder output by d_model^-0.5 before the tied output layer;
  T5.1.1 and LongT5 checkpoints have no rescale (HF: `scale_decoder_outputs`, before v5
  `tie_word_embeddings`). Tied + rescaled becomes `logits_via_embedding=True`; every other
  combination becomes an untied `logits_dense` (the rescale folded into its kernel). Since
  transformers 5 ties `lm_head` to `shared` in memory whenever the checkpoint has no
  separate `lm_head.weight`, T5.1.1 models usually arrive tied and unscaled. Their logits
  convert exactly, but fine-tuning differs (a warning says so): our untied copy is
  updated apart from the embedding, where transformers updates one shared matrix.
- HF's decoder start token is 0 (the padding id), like ours; `decoder_input_tokens` are
  the targets shifted right with a leading 0.

Limits (ValueError naming the value rather than a silent mismatch): only the gated
feedforward with tanh-GELU (`feed_forward_proj="gated-gelu"`, T5.1.1 / LongT5) converts —
our `GatedMlp` computes `wo(act(wi_0 x) · wi_1 x)` and cannot express T5 v1.0's
non-gated ReLU `wo(relu(wi x))`, and the decoder's MLP activation is fixed; the layer
norms must use T5's epsilon 1e-6; encoder and decoder share one token embedding.
Transient-global block ids: HF computes `i / global_block_size` with a float32 cumulative
sum, exact only for power-of-two block sizes (LongT5's 16); ours is integer division.

Variables: `{"params": tree}` whose leaves are `nn.LogicallyPartitioned` boxes carrying
the same logical axis names as `network.init` creates (so `nn.get_partition_spec` shards
them). `network.apply` accepts them as they are; `nn.unbox(variables)` gives plain arrays
(what `scripts/convert_hf_checkpoint.py` writes), which `apply` accepts too.
"""

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from colt5_flax import network as network_lib
from colt5_flax.convert.hf_architecture import T5Architecture, architecture_from_hf, build_network

Dtype = Any
PyTree = Any
Path = tuple[str, ...]

# HF's encoder self-attention submodule in each encoder block, per encoder kind.
_HF_ENCODER_ATTENTION = {
    "full": "SelfAttention",
    "local": "LocalSelfAttention",
    "transient_global": "TransientGlobalSelfAttention",
}


def abstract_variables(net: network_lib.EncoderDecoder, length: int = 8) -> PyTree:
  """`jax.eval_shape` of `net.init`: boxed `ShapeDtypeStruct`s, no compilation."""
  tokens = jnp.ones((1, length), jnp.int32)
  rng = jax.random.PRNGKey(0)
  rngs = {"params": rng, "dropout": rng, "routing": rng}
  return jax.eval_shape(
      functools.partial(net.init, enable_dropout=False), rngs, tokens, tokens, tokens
  )


def _unique_prefix(paths, under: Path, suffix: Path) -> Path:
  """The one path p with under + p + suffix among `paths`; ValueError otherwise."""
  found = [
      path[len(under) : len(path) - len(suffix)]
      for path in paths
      if path[: len(under)] == under and path[len(path) - len(suffix) :] == suffix
  ]
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one parameter {'/'.join(under)}/…/{'/'.join(suffix)} in the "
        f"network, found {len(found)}"
    )
  return found[0]


class _HFState:
  """HF tensors by name as float32 numpy arrays, remembering which were read."""

  def __init__(self, model):
    self._tensors = dict(model.state_dict())
    self.read: set[str] = set()

  def __call__(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise ValueError(f"the transformers model has no tensor {name!r}")
    self.read.add(name)
    return self._tensors[name].detach().cpu().float().numpy()

  def unread(self) -> list[str]:
    return sorted(set(self._tensors) - self.read)


def _convert_params(model, arch: T5Architecture, abstract_params) -> dict[Path, np.ndarray]:
  """Our flat param dict {path: array} from the HF model's tensors."""
  hf = _HFState(model)
  paths = list(traverse_util.flatten_dict(abstract_params).keys())
  heads, head_dim, embed = arch.num_heads, arch.head_dim, arch.embed_dim

  def in_projection(name):  # [heads * kv, embed] -> [embed, heads, kv]
    return hf(name).T.reshape(embed, heads, head_dim)

  def out_projection(name):  # [embed, heads * kv] -> [heads, kv, embed]
    return hf(name).T.reshape(heads, head_dim, embed)

  def attention_params(ours: Path, theirs: str):
    return {
        ours + ("query", "kernel"): in_projection(f"{theirs}.q.weight"),
        ours + ("key", "kernel"): in_projection(f"{theirs}.k.weight"),
        ours + ("value", "kernel"): in_projection(f"{theirs}.v.weight"),
        ours + ("out", "kernel"): out_projection(f"{theirs}.o.weight"),
    }

  def mlp_params(ours: Path, theirs: str):
    return {
        ours + ("wi_0",): hf(f"{theirs}.wi_0.weight").T,
        ours + ("wi_1",): hf(f"{theirs}.wi_1.weight").T,
        ours + ("wo",): hf(f"{theirs}.wo.weight").T,
    }

  params: dict[Path, np.ndarray] = {("token_embedder", "embedding"): hf("shared.weight")}
  # Tied aliases of `shared` (checked equal in `architecture_from_hf`).
  hf.read.update({"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"})
  if arch.logits_via_embedding:
    hf.read.add("lm_head.weight")
  else:
    params[("logits_dense", "kernel")] = hf("lm_head.weight").T * np.float32(arch.logits_scale)

  # Encoder. The stack owns the relative-position tables (one per keyword of the attention's
  # `relative_bias_spec`); the TGlobal global-side table is the one named "global".
  tables = sorted(
      name for name, module in abstract_params["encoder"].items() if "rel_embedding" in module
  )
  expected_tables = 2 if arch.encoder_attention == "transient_global" else 1
  if len(tables) != expected_tables:
    raise ValueError(f"expected {expected_tables} encoder relative-position tables, got {tables}")
  hf_attention = _HF_ENCODER_ATTENTION[arch.encoder_attention]
  for name in tables:
    hf_table = "global_relative_attention_bias" if "global" in name else "relative_attention_bias"
    params[("encoder", name, "rel_embedding")] = hf(
        f"encoder.block.0.layer.0.{hf_attention}.{hf_table}.weight"
    ).T
  # The attention module may nest its projections (local attention keeps a
  # `MultiHeadAttention` as `attention`), so find where `query/kernel` lives.
  for i in range(arch.num_encoder_layers):
    layer = ("encoder", f"layers_{i}")
    theirs = f"encoder.block.{i}.layer"
    inner = _unique_prefix(paths, layer + ("attention",), ("query", "kernel"))
    params.update(attention_params(layer + ("attention",) + inner, f"{theirs}.0.{hf_attention}"))
    if arch.encoder_attention == "transient_global":
      norm = _unique_prefix(paths, layer + ("attention",), ("global_input_layer_norm", "scale"))
      params[layer + ("attention",) + norm + ("global_input_layer_norm", "scale")] = hf(
          f"{theirs}.0.{hf_attention}.global_input_layer_norm.weight"
      )
    params[layer + ("pre_attention_layer_norm", "scale")] = hf(f"{theirs}.0.layer_norm.weight")
    params.update(mlp_params(layer + ("mlp",), f"{theirs}.1.DenseReluDense"))
    params[layer + ("pre_mlp_layer_norm", "scale")] = hf(f"{theirs}.1.layer_norm.weight")
  params[("encoder", "encoder_norm", "scale")] = hf("encoder.final_layer_norm.weight")

  # Decoder.
  params[("decoder", "relpos_bias", "rel_embedding")] = hf(
      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  ).T
  for i in range(arch.num_decoder_layers):
    layer = ("decoder", f"layers_{i}")
    theirs = f"decoder.block.{i}.layer"
    params.update(attention_params(layer + ("self_attention",), f"{theirs}.0.SelfAttention"))
    params[layer + ("pre_self_attention_layer_norm", "scale")] = hf(
        f"{theirs}.0.layer_norm.weight"
    )
    params.update(
        attention_params(layer + ("encoder_decoder_attention",), f"{theirs}.1.EncDecAttention")
    )
    params[layer + ("pre_cross_attention_layer_norm", "scale")] = hf(
        f"{theirs}.1.layer_norm.weight"
    )
    params.update(mlp_params(layer + ("mlp",), f"{theirs}.2.DenseReluDense"))
    params[layer + ("pre_mlp_layer_norm", "scale")] = hf(f"{theirs}.2.layer_norm.weight")
  params[("decoder", "decoder_norm", "scale")] = hf("decoder.final_layer_norm.weight")

  if hf.unread():
    raise ValueError(f"transformers tensors with no place in our network: {hf.unread()}")
  return params


def _box_like(abstract_params, converted: Mapping[Path, np.ndarray]) -> PyTree:
  """Puts `converted` arrays into the boxes of `abstract_params`, checking paths and shapes."""
  flat_abstract = traverse_util.flatten_dict(abstract_params)
  missing = sorted("/".join(p) for p in set(flat_abstract) - set(converted))
  extra = sorted("/".join(p) for p in set(converted) - set(flat_abstract))
  if missing or extra:
    raise ValueError(
        f"converted parameters do not match the network: missing {missing}, unexpected {extra}"
    )
  boxed = {}
  for path, leaf in flat_abstract.items():
    value = converted[path]
    target = leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(
          f"parameter {'/'.join(path)}: converted shape {value.shape} != network shape "
          f"{target.shape}"
      )
    array = jnp.asarray(value, target.dtype)
    boxed[path] = leaf.replace_boxed(array) if isinstance(leaf, nn.meta.AxisMetadata) else array
  return traverse_util.unflatten_dict(boxed)


def from_hf(
    model, *, dtype: Dtype = jnp.float32
) -> tuple[network_lib.EncoderDecoder, dict[str, PyTree]]:
  """Converts a transformers T5 / LongT5 model into our network and its variables.

  Args:
    model: `T5ForConditionalGeneration` or `LongT5ForConditionalGeneration` (local or
      transient-global), any parameter dtype (converted to float32).
    dtype: activation dtype of the returned network.

  Returns:
    (network, variables): an `EncoderDecoder` (multi-head cross-attention, gated-GELU
    MLPs, `scan_layers=False`) and `{"params": ...}` with `nn.LogicallyPartitioned`
    leaves (float32). See the module docstring for what matches and what raises. The
    network is built from the project's gin files (`hf_architecture.build_network`),
    which clears gin's configuration.
  """
  arch = architecture_from_hf(model)
  net = build_network(arch, dtype=dtype)
  abstract = abstract_variables(net)
  params = _box_like(abstract["params"], _convert_params(model, arch, abstract["params"]))
  return net, {"params": params}
