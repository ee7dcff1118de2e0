"""transformers' PyTorch T5 / LongT5 → our `EncoderDecoder` and its variables.

`from_hf(model)` reads a `T5ForConditionalGeneration` or `LongT5ForConditionalGeneration`
(local or transient-global encoder attention) and returns our network configured to match
and its variables, so that

    network, variables = from_hf(model)
    logits = network.apply(variables, encoder_input_tokens, decoder_input_tokens,
                           decoder_target_tokens, enable_dropout=False)

gives the logits of `model(input_ids, attention_mask=input_ids > 0, decoder_input_ids=...)`
at every non-padding target position (float32: to ~1e-6 relative).

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

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from colt5_flax import network as network_lib
from colt5_flax.layers import attention, local_attention
from colt5_flax.layers.mlp import GatedMlp

Dtype = Any
PyTree = Any
Path = tuple[str, ...]

ENCODER_ATTENTION_KINDS = ("full", "local", "transient_global")
# HF activations that are the tanh approximation of GELU, which our GatedMlp's "gelu" is.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Our RMSNorm's epsilon; the network does not expose it (T5's value).
_LAYER_NORM_EPSILON = 1e-6
# HF's encoder self-attention submodule in each encoder block, per encoder kind.
_HF_ENCODER_ATTENTION = {
    "full": "SelfAttention",
    "local": "LocalSelfAttention",
    "transient_global": "TransientGlobalSelfAttention",
}


@dataclasses.dataclass(frozen=True)
class T5Architecture:
  """The sizes and switches of a transformers T5 / LongT5 model, in our vocabulary.

  Attributes:
    vocab_size: rows of the token embedding (32128 for T5's SentencePiece).
    embed_dim: d_model.
    num_encoder_layers, num_decoder_layers: HF `num_layers`, `num_decoder_layers`.
    num_heads, head_dim, mlp_dim: HF `num_heads`, `d_kv`, `d_ff`.
    num_buckets, max_distance: relative-position buckets (32, 128).
    dropout_rate: HF `dropout_rate`, used wherever T5 applies dropout.
    encoder_attention: "full" (T5), "local" or "transient_global" (LongT5).
    local_radius: LongT5 local radius (127), None for T5.
    global_block_size: LongT5 TGlobal block size (16), None otherwise.
    logits_via_embedding: tied output layer with T5 v1.0's d_model^-0.5 rescale.
    logits_scale: factor folded into the untied `logits_dense` kernel (1.0, or
      d_model^-0.5 for a rescaled model whose output layer is not the embedding).
  """

  vocab_size: int
  embed_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_buckets: int
  max_distance: int
  dropout_rate: float
  encoder_attention: str
  local_radius: int | None
  global_block_size: int | None
  logits_via_embedding: bool
  logits_scale: float


def encoder_attention_class(kind: str) -> type[nn.Module]:
  """The encoder self-attention module for `kind` ("full", "local", "transient_global")."""
  classes = {
      "full": attention.SelfAttention,
      "local": local_attention.LocalSelfAttention,
      "transient_global": local_attention.TransientGlobalSelfAttention,
  }
  if kind not in classes:
    raise ValueError(f"encoder attention kind {kind!r}; expected one of {ENCODER_ATTENTION_KINDS}")
  return classes[kind]


# ----------------------------------------------------------------------------- architecture


def architecture_from_hf(model) -> T5Architecture:
  """Reads sizes and switches from a transformers model; ValueError if we cannot match it.

  Args:
    model: `T5ForConditionalGeneration` or `LongT5ForConditionalGeneration`.
  """
  config = model.config
  model_type = getattr(config, "model_type", None)
  if model_type not in ("t5", "longt5") or not hasattr(model, "lm_head"):
    raise ValueError(
        f"expected a T5ForConditionalGeneration or LongT5ForConditionalGeneration, got "
        f"{type(model).__name__} (config.model_type={model_type!r})"
    )
  if not getattr(config, "is_gated_act", False) or config.dense_act_fn not in _TANH_GELU:
    raise ValueError(
        f"config.feed_forward_proj={config.feed_forward_proj!r} cannot be converted: our "
        "GatedMlp computes wo(gelu_tanh(wi_0 x) * wi_1 x) (T5.1.1/LongT5 'gated-gelu') and "
        "cannot express T5 v1.0's non-gated 'relu' or another decoder activation"
    )
  if not math.isclose(config.layer_norm_epsilon, _LAYER_NORM_EPSILON, rel_tol=1e-9):
    raise ValueError(
        f"config.layer_norm_epsilon={config.layer_norm_epsilon} but the network's RMSNorm "
        f"uses {_LAYER_NORM_EPSILON}"
    )
  if model_type == "t5":
    kind, local_radius, global_block_size = "full", None, None
  else:
    attention_type = config.encoder_attention_type
    kinds = {"local": "local", "transient-global": "transient_global"}
    if attention_type not in kinds:
      raise ValueError(
          f"config.encoder_attention_type={attention_type!r}; expected 'local' or "
          "'transient-global'"
      )
    kind, local_radius = kinds[attention_type], int(config.local_radius)
    global_block_size = int(config.global_block_size) if kind == "transient_global" else None
    if global_block_size is not None and global_block_size & (global_block_size - 1):
      warnings.warn(
          f"global_block_size={global_block_size} is not a power of two: transformers "
          "assigns tokens to global blocks with a float32 cumulative sum that can be off by "
          "one block at block edges; the converted model uses exact integer division",
          stacklevel=2,
      )

  shared = model.shared.weight
  for name, embedder in (("encoder", model.encoder), ("decoder", model.decoder)):
    weight = embedder.embed_tokens.weight
    if weight is not shared and not _same_values(weight, shared):
      raise ValueError(
          f"{name}.embed_tokens differs from shared: our network has one token embedding"
      )
  tied = model.lm_head.weight is shared or _same_values(model.lm_head.weight, shared)
  # transformers >= 5 names the T5 v1.0 rescale `scale_decoder_outputs`; before, it was
  # implied by `tie_word_embeddings`.
  rescale = bool(getattr(config, "scale_decoder_outputs", config.tie_word_embeddings))
  if model.lm_head.weight is shared and not rescale:
    # Our network ties the output layer only together with the rescale (T5 v1.0), so the
    # tied-unscaled head becomes a separate copy: same logits, but training updates the two
    # copies apart (tests/test_training_parity.py measured 0.4-5% loss drift in 20 steps).
    warnings.warn(
        "lm_head is tied to shared without the d_model^-0.5 rescale: the converted network "
        "gets an untied logits_dense copy, which gives the same logits but fine-tunes "
        "differently from transformers (which updates one shared matrix)",
        stacklevel=2,
    )
  vocab_size, embed_dim = shared.shape
  if tuple(model.lm_head.weight.shape) != (vocab_size, embed_dim):
    raise ValueError(
        f"lm_head.weight shape {tuple(model.lm_head.weight.shape)} != shared.weight shape "
        f"{(vocab_size, embed_dim)}"
    )
  return T5Architecture(
      vocab_size=int(vocab_size),
      embed_dim=int(embed_dim),
      num_encoder_layers=int(config.num_layers),
      num_decoder_layers=int(config.num_decoder_layers),
      num_heads=int(config.num_heads),
      head_dim=int(config.d_kv),
      mlp_dim=int(config.d_ff),
      num_buckets=int(config.relative_attention_num_buckets),
      max_distance=int(config.relative_attention_max_distance),
      dropout_rate=float(config.dropout_rate),
      encoder_attention=kind,
      local_radius=local_radius,
      global_block_size=global_block_size,
      logits_via_embedding=tied and rescale,
      logits_scale=float(embed_dim) ** -0.5 if rescale else 1.0,
  )


def _same_values(a, b) -> bool:
  return tuple(a.shape) == tuple(b.shape) and bool((a == b).all())


def build_network(
    arch: T5Architecture,
    *,
    dtype: Dtype = jnp.float32,
    scan_layers: bool = False,
    remat_policy: str = "none",
) -> network_lib.EncoderDecoder:
  """Our `EncoderDecoder` with `arch`'s sizes: multi-head decoder self- and cross-attention.

  Args:
    arch: from `architecture_from_hf`.
    dtype: activation dtype (parameters stay float32).
    scan_layers, remat_policy: as `network.Encoder` (the converted variables are for
      `scan_layers=False`).
  """
  if arch.encoder_attention not in ENCODER_ATTENTION_KINDS:
    raise ValueError(
        f"encoder_attention={arch.encoder_attention!r}; expected one of "
        f"{ENCODER_ATTENTION_KINDS}"
    )
  attention_kwargs = dict(
      num_heads=arch.num_heads,
      head_dim=arch.head_dim,
      dropout_rate=arch.dropout_rate,
      dtype=dtype,
  )
  if arch.encoder_attention != "full":
    attention_kwargs["local_radius"] = arch.local_radius
  if arch.encoder_attention == "transient_global":
    attention_kwargs["global_block_size"] = arch.global_block_size
  stack_kwargs = dict(
      dropout_rate=arch.dropout_rate,
      num_buckets=arch.num_buckets,
      max_distance=arch.max_distance,
      scan_layers=scan_layers,
      remat_policy=remat_policy,
      dtype=dtype,
  )
  encoder_factory = functools.partial(
      network_lib.Encoder,
      num_layers=arch.num_encoder_layers,
      attention_factory=functools.partial(
          encoder_attention_class(arch.encoder_attention), **attention_kwargs
      ),
      feed_forward_factory=functools.partial(
          GatedMlp, hidden_dim=arch.mlp_dim, dropout_rate=arch.dropout_rate, dtype=dtype
      ),
      **stack_kwargs,
  )
  decoder_factory = functools.partial(
      network_lib.Decoder,
      num_layers=arch.num_decoder_layers,
      num_heads=arch.num_heads,
      mlp_dim=arch.mlp_dim,
      head_dim=arch.head_dim,
      num_self_attention_kv_heads=None,
      # T5 and LongT5 use multi-head cross-attention (CoLT5 uses multi-query).
      num_cross_attention_kv_heads=None,
      **stack_kwargs,
  )
  return network_lib.EncoderDecoder(
      vocab_size=arch.vocab_size,
      embed_dim=arch.embed_dim,
      encoder_factory=encoder_factory,
      decoder_factory=decoder_factory,
      logits_via_embedding=arch.logits_via_embedding,
      dtype=dtype,
  )


# The project's architecture file for each encoder kind (configs/architectures/).
_ARCHITECTURE_FILES = {
    "full": "architectures/t5_1_1.gin",
    "local": "architectures/longt5_local.gin",
    "transient_global": "architectures/longt5_tglobal.gin",
}
_ATTENTION_CONFIGURABLES = {
    "full": "attention.SelfAttention",
    "local": "local_attention.LocalSelfAttention",
    "transient_global": "local_attention.TransientGlobalSelfAttention",
}


def gin_bindings(arch: T5Architecture, vocabulary: str | None = None) -> str:
  """A model gin file (as configs/models/*.gin) for the network `build_network(arch)` builds.

  It includes the project's architecture file for the encoder kind (found through the
  `configs/` search path) and sets its size macros; what those files leave at a default
  the converted model does not share (relative buckets, the tied output layer) is bound
  directly. Dropout and the activation dtype stay the run's choice (`DROPOUT_RATE`,
  `ACTIVATION_DTYPE`); `SCAN_LAYERS = False` because the converted parameters are stored
  per layer (`layers_<i>`).

  Args:
    arch: from `architecture_from_hf`.
    vocabulary: the vocabulary the checkpoint was trained with, bound to `VOCABULARY`: a
      SentencePiece model file (local or gs://), or 'byte' for `seqio.ByteVocabulary`.
      None leaves the architecture file's (T5's public SentencePiece model).
  """
  kind = arch.encoder_attention
  attention_ref = _ATTENTION_CONFIGURABLES[kind]
  lines = [
      "from __gin__ import dynamic_registration",
      "",
      "from colt5_flax import network",
      f"from colt5_flax.layers import {attention_ref.split('.')[0]}",
      "",
      f"include '{_ARCHITECTURE_FILES[kind]}'",
      "",
      f"VOCAB_SIZE = {arch.vocab_size}",
      f"EMBED_DIM = {arch.embed_dim}",
      f"NUM_HEADS = {arch.num_heads}",
      f"HEAD_DIM = {arch.head_dim}",
      f"MLP_DIM = {arch.mlp_dim}",
      f"NUM_ENCODER_LAYERS = {arch.num_encoder_layers}",
      f"NUM_DECODER_LAYERS = {arch.num_decoder_layers}",
  ]
  if kind != "full":
    lines.append(f"LOCAL_RADIUS = {arch.local_radius}")
  if kind == "transient_global":
    lines.append(f"GLOBAL_BLOCK_SIZE = {arch.global_block_size}")
  lines += [
      "# T5 and LongT5 use multi-head cross-attention (CoLT5: 1, multi-query).",
      "NUM_CROSS_ATTENTION_KV_HEADS = None",
      "# The converted parameters are per layer (layers_<i>), not stacked for nn.scan.",
      "SCAN_LAYERS = False",
      f"# transformers' config had dropout_rate={arch.dropout_rate}; runs set DROPOUT_RATE.",
  ]
  vocabulary_import, vocabulary_lines = _vocabulary_lines(vocabulary)
  if vocabulary_import:
    lines.insert(lines.index("from colt5_flax import network"), vocabulary_import)
  lines += vocabulary_lines
  if arch.logits_via_embedding:
    lines += [
        "# T5 v1.0 output: tied to the embedding, rescaled by d_model^-0.5.",
        "network.EncoderDecoder.logits_via_embedding = True",
    ]
  elif arch.logits_scale != 1.0:
    lines.append("# logits_dense holds T5 v1.0's d_model^-0.5 rescale (untied output layer).")
  if (arch.num_buckets, arch.max_distance) != (32, 128):
    lines.append("# Relative position buckets other than T5's 32 / 128.")
    # The encoder's bucketing is its tables' (RelativePositionTables); the decoder has its own.
    for configurable in ("network.Encoder", "network.Decoder"):
      lines.append(f"{configurable}.num_buckets = {arch.num_buckets}")
      lines.append(f"{configurable}.max_distance = {arch.max_distance}")
  return "\n".join(lines) + "\n"


def _vocabulary_lines(vocabulary: str | None) -> tuple[str | None, list[str]]:
  """(the import the binding needs, the lines binding `VOCABULARY`)."""
  if vocabulary is None:
    return None, []
  if vocabulary == "byte":
    return "import seqio", [
        "# The checkpoint's vocabulary: bytes (ByT5's).",
        "VOCABULARY = @seqio.ByteVocabulary()",
    ]
  if "'" in vocabulary or "\n" in vocabulary:
    raise ValueError(f"vocabulary path {vocabulary!r} cannot be written into a gin string")
  return "from colt5_flax.data import vocabularies", [
      "# The checkpoint's vocabulary: the SentencePiece model its tokenizer used.",
      "VOCABULARY = @vocabularies.sentencepiece_vocabulary()",
      f"vocabularies.sentencepiece_vocabulary.path = '{vocabulary}'",
  ]


# ----------------------------------------------------------------------------- parameters


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
    leaves (float32). See the module docstring for what matches and what raises.
  """
  arch = architecture_from_hf(model)
  net = build_network(arch, dtype=dtype)
  abstract = abstract_variables(net)
  params = _box_like(abstract["params"], _convert_params(model, arch, abstract["params"]))
  return net, {"params": params}
