"""The encoder-decoder network: CoLT5, LongT5 and T5.1.1 under one t5x module contract.

The encoder's attention and feedforward are factories (flaxformer style), so gin picks
the architecture: `attention.SelfAttention` + `mlp.GatedMlp` is T5.1.1,
`local_attention.LocalSelfAttention` LongT5-local, `TransientGlobalSelfAttention`
LongT5-TGlobal, and `conditional.ConditionalAttention` +
`conditional.ConditionalFeedForward` CoLT5 (§3). Conditional computation is in the encoder
only: the decoder is T5.1.1, with multi-query cross-attention by default (CoLT5 §3.3).

`EncoderDecoder` follows t5x's module contract (`__call__`, `encode`, `decode`, a `cache`
collection), so it drops into t5x's `EncoderDecoderModel` unchanged.

One layer of each stack is in `transformer_layers.py`; `layer_stack.run_stack` runs the
stack (remat, scan).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from colt5_flax.layer_stack import run_stack
from colt5_flax.layers import attention, relative_position
from colt5_flax.layers.normalization import RMSNorm
from colt5_flax.transformer_layers import DecoderLayer, EncoderLayer, ModuleFactory, t5_dropout

Dtype = Any


class Encoder(nn.Module):
  """Embedding → layers → final norm → dropout.

  Attributes:
    num_layers: encoder layers (12 for B, 24 for L and XL).
    attention_factory, feed_forward_factory: the encoder kind (see module docstring).
    num_buckets, max_distance: the relative-position bucketing of every table the layers
      read (T5: 32 buckets, logarithmic up to 128).
    scan_layers: `nn.scan` over layers (one compiled layer; faster compiles at depth).
    remat_policy: "none", "full" (recompute everything) or a `jax.checkpoint_policies`
      name; saves activation memory at long input lengths.
  """

  num_layers: int
  attention_factory: Callable[..., attention.EncoderAttention]
  feed_forward_factory: ModuleFactory
  dropout_rate: float = 0.0
  num_buckets: int = 32
  max_distance: int = 128
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, embedded, mask, segment_ids=None, *, enable_dropout: bool = False):
    """embedded [batch, length, embed], mask [batch, length] bool -> [batch, length, embed]."""
    spec = self.attention_factory().relative_bias_spec()
    # T5 and LongT5 share each relative-position table across the layers of a stack.
    tables = relative_position.RelativePositionTables(
        embeddings={
            name: relative_position.RelativePositionBias(
                num_heads=heads,
                num_buckets=self.num_buckets,
                max_distance=self.max_distance,
                bidirectional=True,
                name=name,
            ).embedding()
            for name, heads in sorted(spec.items())
        },
        num_buckets=self.num_buckets,
        max_distance=self.max_distance,
    )
    x = t5_dropout(self.dropout_rate)(embedded, deterministic=not enable_dropout)
    x = jnp.asarray(x, self.dtype)
    layer_kwargs = dict(
        attention_factory=self.attention_factory,
        feed_forward_factory=self.feed_forward_factory,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
    )
    x = run_stack(
        EncoderLayer,
        layer_kwargs,
        x,
        (mask, segment_ids, tables, enable_dropout),
        num_layers=self.num_layers,
        scan_layers=self.scan_layers,
        remat_policy=self.remat_policy,
        static_argnums=(5,),
    )
    x = RMSNorm(dtype=self.dtype, name="encoder_norm")(x)
    return t5_dropout(self.dropout_rate, broadcast_length=False)(
        x, deterministic=not enable_dropout
    )


class Decoder(nn.Module):
  """T5.1.1 decoder stack with its own causal relative-position table.

  Attributes:
    num_layers, num_heads, head_dim, mlp_dim: T5 sizes.
    num_self_attention_kv_heads: None (multi-head, T5) or 1 (multi-query).
    num_cross_attention_kv_heads: 1 (multi-query, CoLT5's default) or None (multi-head).
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  head_dim: int = 64
  num_self_attention_kv_heads: int | None = None
  num_cross_attention_kv_heads: int | None = 1
  dropout_rate: float = 0.0
  num_buckets: int = 32
  max_distance: int = 128
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      embedded,
      encoded,
      self_attention_mask,
      cross_attention_mask,
      *,
      enable_dropout: bool = False,
      decode: bool = False,
  ):
    """embedded [batch, target_length, embed], encoded [batch, input_length, embed].

    Returns the final normalised decoder states [batch, target_length, embed]. In decode
    steps target_length is 1 and the position comes from a counter in the cache.
    """
    relpos = relative_position.RelativePositionBias(
        num_heads=self.num_heads,
        num_buckets=self.num_buckets,
        max_distance=self.max_distance,
        bidirectional=False,
        name="relpos_bias",
    )
    batch, target_length = embedded.shape[:2]
    if decode:
      is_initialized = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      # The cache's slots, one per target position, are the keys of every step. Kept per
      # example ([batch, length]) so decoders can expand the cache along the batch.
      slots = jnp.arange(target_length, dtype=jnp.int32)
      key_positions = self.variable(
          "cache", "key_positions", lambda: jnp.broadcast_to(slots, (batch, target_length))
      ).value
      if is_initialized:
        query_positions = jnp.broadcast_to(position.value, (key_positions.shape[0], 1))
        position.value = position.value + 1
      else:
        query_positions = key_positions
    else:
      query_positions = key_positions = jnp.arange(target_length)[None]
    bias = relpos(relative_position.relative_positions(query_positions, key_positions))

    x = t5_dropout(self.dropout_rate)(embedded, deterministic=not enable_dropout)
    x = jnp.asarray(x, self.dtype)
    layer_kwargs = dict(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        head_dim=self.head_dim,
        num_self_attention_kv_heads=self.num_self_attention_kv_heads,
        num_cross_attention_kv_heads=self.num_cross_attention_kv_heads,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
    )
    x = run_stack(
        DecoderLayer,
        layer_kwargs,
        x,
        (encoded, self_attention_mask, bias, cross_attention_mask, enable_dropout, decode),
        num_layers=self.num_layers,
        scan_layers=self.scan_layers,
        remat_policy=self.remat_policy,
        static_argnums=(6, 7),
    )
    x = RMSNorm(dtype=self.dtype, name="decoder_norm")(x)
    return t5_dropout(self.dropout_rate)(x, deterministic=not enable_dropout)


class EncoderDecoder(nn.Module):
  """CoLT5 / LongT5 / T5.1.1 encoder-decoder with t5x's module contract.

  Inputs are what `seqio.EncDecFeatureConverter` emits: token ids with 0 as padding,
  and for packed batches `*_segment_ids` (0 = padding) and `*_positions`.

  Attributes:
    vocab_size: output vocabulary (32128 for T5's SentencePiece with extra ids).
    embed_dim: d_model.
    encoder_factory: builds the `Encoder` (gin binds its layers and kind).
    decoder_factory: builds the `Decoder`.
    logits_via_embedding: tie the output layer to the token embedding (T5 v1.0);
      T5.1.1 and CoLT5 use a separate `logits_dense` (False).
  """

  vocab_size: int
  embed_dim: int
  encoder_factory: ModuleFactory
  decoder_factory: ModuleFactory
  logits_via_embedding: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.token_embedder = nn.Embed(
        num_embeddings=self.vocab_size,
        features=self.embed_dim,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        # t5x: unit-variance embeddings; the logits layer is fan-in scaled.
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")
        ),
        name="token_embedder",
    )
    self.encoder = self.encoder_factory(name="encoder")
    self.decoder = self.decoder_factory(name="decoder")
    if not self.logits_via_embedding:
      # float32 whatever the activation dtype (t5x's `logits_dense`): in bfloat16 a
      # logit near 20 would round in steps of 0.125.
      self.logits_dense = nn.DenseGeneral(
          features=self.vocab_size,
          use_bias=False,
          dtype=jnp.float32,
          param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
              ("embed", "vocab"),
          ),
          name="logits_dense",
      )

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=True):
    """encoder_input_tokens [batch, input_length] -> encoded [batch, input_length, embed]."""
    mask = encoder_input_tokens > 0
    if encoder_segment_ids is not None:
      mask = jnp.logical_and(mask, encoder_segment_ids > 0)
    embedded = self.token_embedder(encoder_input_tokens)
    embedded = nn.with_logical_constraint(embedded, ("batch", "length", "embed"))
    return self.encoder(
        embedded, mask, encoder_segment_ids, enable_dropout=enable_dropout
    )

  def decode(
      self,
      encoded,
      encoder_input_tokens,
      decoder_input_tokens,
      decoder_target_tokens,
      encoder_segment_ids=None,
      decoder_segment_ids=None,
      decoder_positions=None,
      enable_dropout=True,
      decode=False,
      max_decode_length=None,
  ):
    """Decoder logits [batch, target_length, vocab] (float32).

    Args:
      encoded: [batch, input_length, embed] from `encode`.
      encoder_input_tokens: [batch, input_length], for the cross-attention mask.
      decoder_input_tokens: [batch, target_length], the targets shifted right
        (or one token per step when `decode`).
      decoder_target_tokens: [batch, target_length]; 0 marks padding.
      decode: one autoregressive step over the `cache` collection.
      max_decode_length: accepted for t5x compatibility; the cache length fixes it.
    """
    del decoder_positions, max_decode_length  # Relative positions need no absolute ones.
    if decoder_target_tokens.shape != decoder_input_tokens.shape:
      raise ValueError(
          f"decoder_target_tokens shape {decoder_target_tokens.shape} != "
          f"decoder_input_tokens shape {decoder_input_tokens.shape}"
      )
    if encoded.shape[:2] != encoder_input_tokens.shape:
      raise ValueError(
          f"encoded [batch, length] {encoded.shape[:2]} != encoder_input_tokens shape "
          f"{encoder_input_tokens.shape}"
      )
    if encoded.shape[0] != decoder_input_tokens.shape[0]:
      raise ValueError(
          f"encoder batch {encoded.shape[0]} != decoder batch {decoder_input_tokens.shape[0]}"
      )
    if (decoder_segment_ids is None) != (encoder_segment_ids is None):
      raise ValueError(
          "packed batches need both encoder_segment_ids and decoder_segment_ids; got only "
          + ("decoder_segment_ids" if encoder_segment_ids is None else "encoder_segment_ids")
      )
    encoder_mask = encoder_input_tokens > 0
    if decode:
      self_attention_mask = None  # The cache masks what is not yet written.
      cross_attention_mask = encoder_mask[:, None, None, :]
    else:
      target_mask = decoder_target_tokens > 0
      length = decoder_input_tokens.shape[1]
      causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
      self_attention_mask = attention.make_attention_mask(target_mask, target_mask) & causal
      cross_attention_mask = attention.make_attention_mask(target_mask, encoder_mask)
      if decoder_segment_ids is not None:
        self_attention_mask &= attention.make_segment_mask(
            decoder_segment_ids, decoder_segment_ids
        )
        cross_attention_mask &= attention.make_segment_mask(
            decoder_segment_ids, encoder_segment_ids
        )
    embedded = self.token_embedder(decoder_input_tokens)
    states = self.decoder(
        embedded,
        encoded,
        self_attention_mask,
        cross_attention_mask,
        enable_dropout=enable_dropout,
        decode=decode,
    )
    # The output projection runs in float32 whatever the activation dtype (t5x).
    states = jnp.asarray(states, jnp.float32)
    if self.logits_via_embedding:
      # T5 v1.0 rescales before the tied projection.
      embedding = jnp.asarray(self.token_embedder.embedding, jnp.float32)
      logits = (states * self.embed_dim**-0.5) @ embedding.T
    else:
      logits = self.logits_dense(states)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def __call__(
      self,
      encoder_input_tokens,
      decoder_input_tokens,
      decoder_target_tokens,
      encoder_segment_ids=None,
      decoder_segment_ids=None,
      encoder_positions=None,
      decoder_positions=None,
      *,
      enable_dropout: bool = True,
      decode: bool = False,
      max_decode_length: int | None = None,
  ):
    """Teacher-forced logits [batch, target_length, vocab]; t5x's signature."""
    del encoder_positions  # Relative attention only needs token order.
    encoded = self.encode(
        encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
        enable_dropout=enable_dropout,
    )
    return self.decode(
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        decoder_target_tokens,
        encoder_segment_ids=encoder_segment_ids,
        decoder_segment_ids=decoder_segment_ids,
        decoder_positions=decoder_positions,
        enable_dropout=enable_dropout,
        decode=decode,
        max_decode_length=max_decode_length,
    )
