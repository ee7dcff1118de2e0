"""T5's bucketed relative position bias.

T5 and LongT5 keep one bias table per stack (encoder or decoder), shared by all layers.
Our encoder owns its tables (`RelativePositionBias` parameters) and hands them down as
one `RelativePositionTables`, which also carries the stack's bucketing (num_buckets,
max_distance); each attention layer turns a table into a bias for whichever positions it
attends over (a local window, routed tokens at their original positions, global blocks),
through `bias_from_embedding`. That one function is the only place the lookup happens.
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Dtype = Any


def relative_position_bucket(
    relative_position,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
):
  """Buckets `relative_position = key_position - query_position`, exactly as T5 does.

  Half of the buckets (of each sign, when bidirectional) hold exact small distances; the
  rest grow logarithmically up to `max_distance`, beyond which everything shares the
  last bucket.

  Args:
    relative_position: integer array of any shape.
    bidirectional: False for causal (decoder self-) attention, where keys are never
      after the query and positive offsets all map to bucket 0.
    num_buckets: 32 in T5.
    max_distance: 128 in T5.

  Returns:
    int32 array of the same shape, values in [0, num_buckets).
  """
  relative_position = jnp.asarray(relative_position, jnp.int32)
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # float32 log as in transformers' T5: bucket edges must match it bit for bit.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
      max_distance / max_exact
  )
  if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  if_large = jnp.minimum(if_large, num_buckets - 1)
  return bucket + jnp.where(is_small, distance, if_large)


def bias_from_embedding(
    rel_embedding,
    relative_position,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
):
  """Looks up the bias of each relative position.

  Args:
    rel_embedding: [heads, num_buckets] table.
    relative_position: int [..., q, k], key position minus query position.

  Returns:
    float32 [..., heads, q, k].
  """
  if rel_embedding.shape[-1] != num_buckets:
    raise ValueError(
        f"rel_embedding has {rel_embedding.shape[-1]} buckets, expected {num_buckets}"
    )
  buckets = relative_position_bucket(
      relative_position,
      bidirectional=bidirectional,
      num_buckets=num_buckets,
      max_distance=max_distance,
  )
  values = jnp.take(jnp.asarray(rel_embedding, jnp.float32).T, buckets, axis=0)  # [..., q, k, h]
  return jnp.moveaxis(values, -1, -3)


@flax.struct.dataclass
class RelativePositionTables:
  """A stack's relative-position tables and their bucketing, shared by all its layers.

  Encoder attentions declare the tables they read (`relative_bias_spec()`: name -> heads;
  T5 and LongT5-local one, `relpos_bias`; LongT5-TGlobal a second for the global side;
  CoLT5 one for the light and one for the heavy heads), the stack creates them as
  parameters named after them and passes this structure to every layer.

  Attributes:
    embeddings: {table name: [heads, num_buckets] float32}.
    num_buckets: buckets per table (T5: 32).
    max_distance: distance where the logarithmic buckets end (T5: 128).
  """

  embeddings: Mapping[str, jax.Array]
  num_buckets: int = flax.struct.field(pytree_node=False, default=32)
  max_distance: int = flax.struct.field(pytree_node=False, default=128)

  def table(self, name: str, num_heads: int) -> jax.Array | None:
    """The [num_heads, num_buckets] table `name`; None if the stack holds none of that
    name (the layer then adds no position bias)."""
    table = self.embeddings.get(name)
    if table is not None and table.shape != (num_heads, self.num_buckets):
      raise ValueError(
          f"relative-position table {name!r} has shape {table.shape}; the layer expects "
          f"(num_heads, num_buckets) = {(num_heads, self.num_buckets)}"
      )
    return table

  def bias(self, name: str, num_heads: int, relative_position, *, bidirectional: bool = True):
    """float32 [..., heads, q, k] of table `name` at int `relative_position` [..., q, k]
    (key minus query position); None when the stack holds no such table."""
    table = self.table(name, num_heads)
    if table is None:
      return None
    return bias_from_embedding(
        table,
        relative_position,
        bidirectional=bidirectional,
        num_buckets=self.num_buckets,
        max_distance=self.max_distance,
    )


class RelativePositionBias(nn.Module):
  """Owns one stack's relative-position table (param `rel_embedding` [heads, buckets]).

  Attributes:
    num_heads: number of attention heads the bias is for.
    num_buckets: 32 in T5.
    max_distance: 128 in T5.
    bidirectional: True in the encoder, False in decoder self-attention.
  """

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # t5x's initialiser for the table: uniform, variance 1 / fan_avg of [heads, buckets].
  embedding_init: Any = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

  def setup(self):
    self.rel_embedding = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(self.embedding_init, ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets),
        self.param_dtype,
    )

  def embedding(self) -> jax.Array:
    """The table, [heads, num_buckets], to hand to the layers of the stack."""
    return self.rel_embedding

  def __call__(self, relative_position):
    """Bias for `relative_position` int [..., q, k]; returns [..., heads, q, k] in `dtype`."""
    bias = bias_from_embedding(
        self.rel_embedding,
        relative_position,
        bidirectional=self.bidirectional,
        num_buckets=self.num_buckets,
        max_distance=self.max_distance,
    )
    return jnp.asarray(bias, self.dtype)


def relative_positions(query_positions, key_positions):
  """key - query positions: [..., q] and [..., k] -> int32 [..., q, k]."""
  query_positions = jnp.asarray(query_positions, jnp.int32)
  key_positions = jnp.asarray(key_positions, jnp.int32)
  return key_positions[..., None, :] - query_positions[..., :, None]
