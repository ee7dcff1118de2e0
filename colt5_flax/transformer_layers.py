"""One layer of each stack: `EncoderLayer` (CoLT5's when built with conditional factories)
and the T5.1.1 `DecoderLayer` with its `CrossAttention`; and T5.1.1's dropout rule.

`network.py` stacks them (`layer_stack.run_stack`) into `Encoder` and `Decoder`.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from colt5_flax.layers import attention
from colt5_flax.layers.mlp import GatedMlp
from colt5_flax.layers.normalization import RMSNorm

Dtype = Any
ModuleFactory = Callable[..., nn.Module]


def t5_dropout(rate: float, *, broadcast_length: bool = True) -> nn.Dropout:
  """t5x's T5.1.1 dropout: on embeddings and residual branches one mask per (example,
  feature), shared along the length axis; the encoder's final dropout is elementwise."""
  return nn.Dropout(rate=rate, broadcast_dims=(-2,) if broadcast_length else ())


class EncoderLayer(nn.Module):
  """Pre-norm residual block: x + attention(norm(x)), then x + feedforward(norm(x)).

  With `attention_factory=ConditionalAttention` and
  `feed_forward_factory=ConditionalFeedForward` this is the CoLT5 layer (§3): the layer
  norm's output is what both the light and the heavy branch, and their routers, see.

  Attributes:
    attention_factory: builds an `attention.EncoderAttention`.
    feed_forward_factory: builds a feedforward called as `ff(x, mask=, enable_dropout=)`.
    dropout_rate: residual dropout (0.1 in fine-tuning, 0 in pretraining).
  """

  attention_factory: Callable[..., attention.EncoderAttention]
  feed_forward_factory: ModuleFactory
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, segment_ids, tables, enable_dropout: bool = False):
    """x [batch, length, embed] -> [batch, length, embed]; mask [batch, length] bool;
    tables the stack's `RelativePositionTables`.

    Positional arguments only, so that `nn.scan` and `nn.remat` can wrap the layer.
    """
    deterministic = not enable_dropout
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    h = RMSNorm(dtype=self.dtype, name="pre_attention_layer_norm")(x)
    h = self.attention_factory(name="attention")(
        h,
        tables=tables,
        mask=mask,
        segment_ids=segment_ids,
        enable_dropout=enable_dropout,
    )
    x = x + t5_dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = RMSNorm(dtype=self.dtype, name="pre_mlp_layer_norm")(x)
    h = self.feed_forward_factory(name="mlp")(h, mask=mask, enable_dropout=enable_dropout)
    x = x + t5_dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """T5.1.1 decoder block: causal self-attention, cross-attention, gated MLP (pre-norm).

  Attributes:
    num_heads, head_dim: T5 heads.
    mlp_dim: gated-GELU width.
    num_self_attention_kv_heads: None for multi-head self-attention (T5), 1 for MQA.
    num_cross_attention_kv_heads: 1 for multi-query cross-attention (CoLT5 §3.3, the
      default), None for multi-head (T5/LongT5; the paper's Table 6 ablation).
  """

  num_heads: int
  mlp_dim: int
  head_dim: int = 64
  num_self_attention_kv_heads: int | None = None
  num_cross_attention_kv_heads: int | None = 1
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x,
      encoded,
      self_attention_mask,
      self_attention_bias,
      cross_attention_mask,
      enable_dropout: bool = False,
      decode: bool = False,
  ):
    """x [batch, target_length, embed], encoded [batch, input_length, embed] -> like x."""
    deterministic = not enable_dropout
    dropout = t5_dropout(self.dropout_rate)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    h = RMSNorm(dtype=self.dtype, name="pre_self_attention_layer_norm")(x)
    h = attention.MultiHeadAttention(
        num_heads=self.num_heads,
        head_dim=self.head_dim,
        num_kv_heads=self.num_self_attention_kv_heads,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name="self_attention",
    )(
        h,
        h,
        mask=self_attention_mask,
        bias=self_attention_bias,
        enable_dropout=enable_dropout,
        decode=decode,
    )
    x = x + dropout(h, deterministic=deterministic)
    h = RMSNorm(dtype=self.dtype, name="pre_cross_attention_layer_norm")(x)
    h = CrossAttention(
        num_heads=self.num_heads,
        head_dim=self.head_dim,
        num_kv_heads=self.num_cross_attention_kv_heads,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name="encoder_decoder_attention",
    )(h, encoded, mask=cross_attention_mask, enable_dropout=enable_dropout, decode=decode)
    x = x + dropout(h, deterministic=deterministic)
    h = RMSNorm(dtype=self.dtype, name="pre_mlp_layer_norm")(x)
    h = GatedMlp(
        hidden_dim=self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype, name="mlp"
    )(h, enable_dropout=enable_dropout)
    x = x + dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CrossAttention(attention.MultiHeadAttention):
  """Decoder-to-encoder attention whose keys/values are computed once per decode.

  In decode mode the projected encoder keys and values live in the `cache` collection
  (`cross_key_value/value`): the call that creates the cache computes them from the
  encoded inputs, and every decoding step reads them instead of projecting 16k encoder
  vectors again. They are kept heads-major, [batch, kv_heads, input_length, head_dim],
  the layout the attention products read: in the projections' layout XLA copied them
  into it out of the decoding loop and held a second cache (LongT5-B multi-head at 16k ×
  8: 19.0 GiB of buffers, now 17.1; its decoder at 4k × 8: 51.8 s, now 24.4;
  docs/benchmarks.md).
  """

  def setup(self):
    super().setup()
    self.cross_key_value = _ComputedOnce()

  def heads_major_key_value(self, encoded):
    """[batch, input_length, embed] -> key, value [batch, kv_heads, input_length, head_dim]."""
    key, value = self.project_key_value(encoded)
    return jnp.moveaxis(key, -3, -2), jnp.moveaxis(value, -3, -2)

  def __call__(self, inputs_q, encoded, *, mask=None, enable_dropout=False, decode=False):
    """inputs_q [batch, target_length, embed], encoded [batch, input_length, embed]."""
    query = self.project_query(inputs_q)
    if decode:
      key, value = self.cross_key_value(lambda: self.heads_major_key_value(encoded))
    else:
      key, value = self.heads_major_key_value(encoded)
    attended = self.attend(
        query, key, value, mask=mask, enable_dropout=enable_dropout, heads_major_kv=True
    )
    return self.project_output(attended, inputs_q.shape[-1])


class _ComputedOnce(nn.Module):
  """Caches `compute()` in the `cache` collection when the cache is created; reads it after."""

  @nn.compact
  def __call__(self, compute):
    return self.variable("cache", "value", compute).value
