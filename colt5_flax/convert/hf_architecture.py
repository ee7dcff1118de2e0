"""A transformers T5 / LongT5 model's architecture in our terms, and the network it makes.

`architecture_from_hf(model)` reads the sizes and switches of a `T5ForConditionalGeneration`
or `LongT5ForConditionalGeneration` into a `T5Architecture` (ValueError for what our network
cannot express: see `convert/hf.py`'s docstring); `build_network(arch)` builds our
`EncoderDecoder` with them from the project's configs, through the model gin file that
`gin_bindings(arch)` writes (and the conversion script prints). `convert/hf.py` moves the
parameters.
"""

import dataclasses
import math
import warnings
from typing import Any

import jax.numpy as jnp

from colt5_flax import model_files
from colt5_flax import network as network_lib

Dtype = Any

ENCODER_ATTENTION_KINDS = ("full", "local", "transient_global")
# HF activations that are the tanh approximation of GELU, which our GatedMlp's "gelu" is.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Our RMSNorm's epsilon; the network does not expose it (T5's value).
_LAYER_NORM_EPSILON = 1e-6


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
  """Our `EncoderDecoder` with `arch`'s sizes, built from the project's gin files.

  The network is the one `gin_bindings(arch)` describes (the encoder kind's architecture
  file with arch's sizes: multi-head decoder self- and cross-attention), with the run-level
  settings bound on top: the checkpoint's dropout rate, `dtype`, `scan_layers`,
  `remat_policy`. So a converted checkpoint and the gin file printed for it make the same
  network. Built with `model_files.frozen`, it needs no live gin configuration; gin's
  configuration is cleared before and after (`model_files.parsed`).

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
  bindings = [
      gin_bindings(arch),
      f"DROPOUT_RATE = {float(arch.dropout_rate)!r}",
      f"ACTIVATION_DTYPE = {jnp.dtype(dtype).name!r}",
      f"SCAN_LAYERS = {bool(scan_layers)!r}",
      f"REMAT_POLICY = {remat_policy!r}",
  ]
  with model_files.parsed([], bindings):
    return model_files.frozen("ARCHITECTURE")


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
  """A model gin file (as configs/models/*.gin) for `arch`: what `build_network` builds.

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
