"""The attention kernel and T5's multi-head (or multi-query) attention.

`dot_product_attention` is the project's one attention kernel: full, local (blocked),
transient-global and CoLT5's routed heavy attention all call it, so masking, float32
softmax and the no-NaN guarantee for rows that may attend to nothing live in one place.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from colt5_flax.layers import dense as dense_lib
from colt5_flax.layers import relative_position
from colt5_flax.layers.dense import dense

Dtype = Any
Initializer = Callable[..., jax.Array]


class EncoderAttention(Protocol):
  """What every encoder self-attention implements, so the encoder swaps them by factory.

  Implemented by `SelfAttention` (T5.1.1), `local_attention.LocalSelfAttention`
  (LongT5-local), `local_attention.TransientGlobalSelfAttention` (LongT5-TGlobal) and
  `conditional.ConditionalAttention` (CoLT5).
  """

  def relative_bias_spec(self) -> Mapping[str, int]:
    """{table name: heads} of the stack-shared relative-position tables the layer reads;
    the stack creates each as a parameter of that name (`RelativePositionTables`)."""
    ...

  def __call__(
      self,
      x: jax.Array,
      *,
      tables: relative_position.RelativePositionTables,
      mask: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      enable_dropout: bool = False,
  ) -> jax.Array:
    """x [batch, length, embed] (layer-normed) -> [batch, length, embed].

    mask [batch, length] bool, True = real token (None: all real); segment_ids
    [batch, length] int keep packed examples apart (None: one example per row);
    enable_dropout applies attention dropout ('dropout' rng) and training-time routing.
    """
    ...


# Large and finite: -inf would turn an all-masked row into NaN.
_MASK_VALUE = -1e10


class AttentionPart(NamedTuple):
  """One part of a softmax whose keys are split in parts (e.g. a local window and global
  tokens), before normalisation; `combine_attention_parts` joins the parts exactly.

  Attributes:
    out: float32 [*batch, q, heads, head_dim], Σ_k exp(logit_k − top) · v_k over the
      part's allowed keys (attention dropout applied).
    top: float32 [*batch, q, heads], the row's largest logit (no gradient flows through
      it: the result does not depend on it).
    total: float32 [*batch, q, heads], Σ_k exp(logit_k − top) over the allowed keys
      (before dropout); 0 for a row with none.
  """

  out: jax.Array
  top: jax.Array
  total: jax.Array


def attention_part(
    query,
    key,
    value,
    *,
    bias=None,
    mask=None,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    dtype: Dtype = jnp.float32,
    heads_major_kv: bool = False,
) -> AttentionPart:
  """Unnormalised attention of `query` to one part of its keys (shapes and
  `heads_major_kv` as `dot_product_attention`); logits, max and sums in float32, the
  weights·values product in `dtype` with float32 accumulation."""
  *batch_dims, q_len, num_heads, head_dim = query.shape
  if not heads_major_kv:
    key, value = jnp.moveaxis(key, -3, -2), jnp.moveaxis(value, -3, -2)
  num_kv_heads, k_len = key.shape[-3], key.shape[-2]
  if key.shape != value.shape:
    raise ValueError(f"key {key.shape} and value {value.shape} shapes differ")
  if key.shape[-1] != head_dim:
    raise ValueError(f"query head_dim {head_dim} != key head_dim {key.shape[-1]}")
  if num_heads % num_kv_heads:
    raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads")
  groups = num_heads // num_kv_heads

  # Heads-major operands ([*batch, kv_heads, groups, q, head_dim]): each head's products
  # then read contiguous rows. In the projections' [.., q, heads, head_dim] order XLA:CPU
  # chose transposed products that ran 2.5x slower (blocked local attention at 16k).
  grouped_query = query.reshape(*batch_dims, q_len, num_kv_heads, groups, head_dim)
  grouped_query = jnp.moveaxis(grouped_query, -4, -2)
  logits = dense_lib.einsum(
      "...hgqd,...hkd->...hgqk",
      grouped_query,
      key,
      preferred_element_type=jnp.float32,
  ).reshape(*batch_dims, num_heads, q_len, k_len)
  logits = jnp.asarray(logits, jnp.float32)
  if bias is not None:
    logits = dense_lib.add_broadcast(logits, jnp.asarray(bias, jnp.float32))
  if mask is not None:
    logits = jnp.where(mask, logits, _MASK_VALUE)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  # A masked key weighs exp(_MASK_VALUE − top) = 0 exactly (float32 underflow) whenever its
  # row allows any key; a row that allows none has top = _MASK_VALUE and weighs nothing:
  # its total and output are set to 0 below, so it is never NaN.
  weights = jnp.exp(logits - top)
  total = jnp.sum(weights, axis=-1)
  if not deterministic and dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("dropout_rate > 0 and deterministic=False need a dropout_rng")
    # t5x's T5.1.1: one mask per (example, head, key), shared by every query.
    keep_shape = (*weights.shape[:-2], 1, weights.shape[-1])
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, keep_shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  weights = jnp.asarray(weights, dtype).reshape(*batch_dims, num_kv_heads, groups, q_len, k_len)
  out = dense_lib.einsum(
      "...hgqk,...hkd->...hgqd",
      weights,
      jnp.asarray(value, dtype),
      preferred_element_type=jnp.float32,
  ).reshape(*batch_dims, num_heads, q_len, head_dim)
  out = jnp.moveaxis(out, -3, -2)
  top, total = jnp.swapaxes(top[..., 0], -1, -2), jnp.swapaxes(total, -1, -2)
  if mask is not None:
    allowed = top > 0.5 * _MASK_VALUE  # [*batch, q, heads]
    total = jnp.where(allowed, total, 0.0)
    out = jnp.where(allowed[..., None], out, 0.0)
  return AttentionPart(out, top, total)


def combine_attention_parts(parts: Sequence[AttentionPart], dtype: Dtype = jnp.float32):
  """softmax over the keys of all `parts` · v: one shared max and one shared sum, so the
  result equals attention over the parts' keys concatenated. [*batch, q, heads, head_dim]
  in `dtype`; exactly 0 for a query with no allowed key in any part."""
  top = parts[0].top
  for part in parts[1:]:
    top = jnp.maximum(top, part.top)
  out, total = 0.0, 0.0
  for part in parts:
    scale = jnp.exp(part.top - top)
    out = out + part.out * scale[..., None]
    total = total + part.total * scale
  out = out / jnp.where(total > 0.0, total, 1.0)[..., None]
  return jnp.asarray(out, dtype)


def dot_product_attention(
    query,
    key,
    value,
    *,
    bias=None,
    mask=None,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    dtype: Dtype = jnp.float32,
    heads_major_kv: bool = False,
):
  """softmax(q·kᵀ + bias) · v, with T5's conventions.

  There is no 1/sqrt(head_dim) factor: T5 folds it into the query initialisation.
  Query heads are split into `kv_heads` groups that share a key/value head, which covers
  multi-head (kv_heads = heads), grouped and multi-query (kv_heads = 1) attention. The
  weights are normalised after the product with the values (one division per output, not
  per weight); `attention_part` and `combine_attention_parts` are the two halves.

  Args:
    query: [*batch, q, heads, head_dim]. `*batch` may be several dims (batch, blocks).
    key: [*batch, k, kv_heads, head_dim].
    value: [*batch, k, kv_heads, head_dim].
    bias: broadcastable to [*batch, heads, q, k]; added to the logits in float32.
    mask: bool, broadcastable to [*batch, heads, q, k]; True where attending is allowed.
      A query whose row is all False gets an output of exactly 0.
    dropout_rng: PRNG key for attention-weight dropout.
    dropout_rate: dropout on the attention weights (T5 applies it there), one mask per
      (batch, head, key) shared by all queries, as t5x's T5.1.1 (blocked local attention:
      per block).
    deterministic: disables dropout.
    dtype: dtype of the returned activations.
    heads_major_kv: key and value are [*batch, kv_heads, k, head_dim], the layout the
      products read. Decoder cross-attention caches them so: from the projections'
      layout XLA copied the whole cache into this one, a second cache
      (`transformer_layers.CrossAttention`).

  Returns:
    [*batch, q, heads, head_dim] in `dtype`.
  """
  part = attention_part(
      query,
      key,
      value,
      bias=bias,
      mask=mask,
      dropout_rng=dropout_rng,
      dropout_rate=dropout_rate,
      deterministic=deterministic,
      dtype=dtype,
      heads_major_kv=heads_major_kv,
  )
  return combine_attention_parts([part], dtype)


def make_attention_mask(query_mask, key_mask):
  """[batch, q] and [batch, k] bool -> [batch, 1, q, k]: both query and key are valid."""
  return jnp.logical_and(query_mask[:, None, :, None], key_mask[:, None, None, :])


def make_segment_mask(query_segment_ids, key_segment_ids):
  """[batch, q] and [batch, k] int -> [batch, 1, q, k]: same packed segment."""
  return jnp.equal(query_segment_ids[:, None, :, None], key_segment_ids[:, None, None, :])


def make_causal_mask(query_positions, key_positions):
  """[batch, q] and [batch, k] positions -> [batch, 1, q, k]: key not after query."""
  return jnp.greater_equal(query_positions[:, None, :, None], key_positions[:, None, None, :])


def default_kernel_init() -> Initializer:
  """t5x's attention initialiser (fan-in, normal)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "normal")


class KeyValueCache(nn.Module):
  """Autoregressive key/value cache in the `cache` collection (t5x layout).

  The first call (from `init` with full-length inputs) creates `cached_key` and
  `cached_value` [batch, length, kv_heads, head_dim] and `cache_index`; each later call
  writes one step's key and value at `cache_index` and advances it.
  """

  @nn.compact
  def __call__(self, key, value):
    """key, value [batch, 1, kv_heads, head_dim] -> the whole cache and its valid-key mask.

    Returns:
      (key, value, mask): during the initialising call the inputs and None; then the
      cache [batch, length, kv_heads, head_dim] twice and a bool mask [1, 1, 1, length]
      of the slots written so far (this step included).
    """
    is_initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      return key, value, None
    if key.shape[1] != 1:
      raise ValueError(f"decode=True steps take one token at a time, got {key.shape[1]} tokens")
    max_length = cached_key.value.shape[1]
    index = cache_index.value
    key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
    value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
    cached_key.value, cached_value.value = key, value
    cache_index.value = index + 1
    # Later cache slots are still zeros: they are not keys yet.
    written = (jnp.arange(max_length) <= index)[None, None, None, :]
    return key, value, written


class _EmbedToHeads(nn.Module):
  """Projection [..., embed] -> [..., heads, head_dim] (param `kernel` [embed, heads, kv]).

  The kernel is created at its full 3-D shape so its logical axis names apply as written
  (flax's DenseGeneral constrains a flattened kernel, which three names do not fit).
  """

  num_heads: int
  head_dim: int
  axes: tuple[str, str, str]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    def flat_init(key, shape, dtype):
      # Initialised as the [embed, heads * kv] matrix it is, so fan-in is embed.
      return self.kernel_init(key, (shape[0], shape[1] * shape[2]), dtype).reshape(shape)

    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(flat_init, self.axes),
        (x.shape[-1], self.num_heads, self.head_dim),
        self.param_dtype,
    )
    kernel = jnp.asarray(kernel, self.dtype)
    return dense(jnp.asarray(x, self.dtype), kernel)


class _HeadsToEmbed(nn.Module):
  """Output projection [..., heads, head_dim] -> [..., features] (param `kernel`)."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, features: int):
    def flat_init(key, shape, dtype):
      # Initialised as the [heads * kv, embed] matrix it is, so fan-in is heads * kv.
      return self.kernel_init(key, (shape[0] * shape[1], shape[2]), dtype).reshape(shape)

    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(flat_init, ("heads", "kv", "embed")),
        (*x.shape[-2:], features),
        self.param_dtype,
    )
    kernel = jnp.asarray(kernel, self.dtype)
    return dense(jnp.asarray(x, self.dtype), kernel, in_axes=2)


class MultiHeadAttention(nn.Module):
  """T5 attention with separate query and key/value head counts.

  `num_kv_heads=None` is multi-head attention; `num_kv_heads=1` is multi-query attention
  (one shared key/value head), which CoLT5 uses for decoder cross-attention (§3.3) to cut
  the memory traffic of decoding over 16k-token inputs.

  Other attention variants (local, transient-global, CoLT5's routed heavy branch) reuse
  this module's projections through `project_query`, `project_key_value` and
  `project_output`, so every variant has the same parameter layout:
  `query/kernel` [embed, heads, kv], `key/kernel` and `value/kernel`
  [embed, kv_heads, kv], `out/kernel` [heads, kv, embed].

  Attributes:
    num_heads: query heads.
    head_dim: per-head width (64 in every T5 size).
    num_kv_heads: key/value heads; None means `num_heads`.
    dtype: activation dtype.
    dropout_rate: dropout on the attention weights.
    kernel_init: initialiser of the projections. The query projection is further scaled
      by 1/sqrt(head_dim), T5's replacement for scaling the logits.
  """

  num_heads: int
  head_dim: int = 64
  num_kv_heads: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  kernel_init: Initializer = default_kernel_init()

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def setup(self):
    if self.num_heads % self.kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}"
      )
    depth_scaling = self.head_dim**0.5

    def query_init(*args):
      return self.kernel_init(*args) / depth_scaling

    def projection(num_heads, axes, init):
      return _EmbedToHeads(
          num_heads, self.head_dim, axes, self.dtype, self.param_dtype, kernel_init=init
      )

    self.query = projection(self.num_heads, ("embed", "heads", "kv"), query_init)
    # A single key/value head cannot be split over the model axis: name it apart so the
    # sharding rules replicate it.
    head_axis = "heads" if self.kv_heads == self.num_heads else "kv_heads"
    kv_axes = ("embed", head_axis, "kv")
    self.key = projection(self.kv_heads, kv_axes, self.kernel_init)
    self.value = projection(self.kv_heads, kv_axes, self.kernel_init)
    self.out = _HeadsToEmbed(self.dtype, self.param_dtype, self.kernel_init)
    self.kv_cache = KeyValueCache()

  def project_query(self, x):
    """[batch, q, embed] -> [batch, q, heads, head_dim]."""
    return self.query(x)

  def project_key_value(self, x):
    """[batch, k, embed] -> key, value, each [batch, k, kv_heads, head_dim]."""
    return self.key(x), self.value(x)

  def project_output(self, attended, embed_dim: int):
    """[batch, q, heads, head_dim] -> [batch, q, embed_dim]."""
    return self.out(attended, embed_dim)

  def dropout_rng(self, enable_dropout: bool):
    """The attention-dropout key, or None when dropout is off."""
    if enable_dropout and self.dropout_rate > 0.0:
      return self.make_rng("dropout")
    return None

  def attend(
      self,
      query,
      key,
      value,
      *,
      mask=None,
      bias=None,
      enable_dropout=False,
      heads_major_kv=False,
  ):
    """The kernel with this module's dtype and dropout; arguments as
    `dot_product_attention`."""
    return dot_product_attention(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        dropout_rng=self.dropout_rng(enable_dropout),
        dropout_rate=self.dropout_rate,
        deterministic=not enable_dropout,
        dtype=self.dtype,
        heads_major_kv=heads_major_kv,
    )

  def __call__(
      self,
      inputs_q,
      inputs_kv,
      *,
      mask=None,
      bias=None,
      enable_dropout: bool = False,
      decode: bool = False,
  ):
    """Attends from `inputs_q` [batch, q, embed] to `inputs_kv` [batch, k, embed].

    Args:
      mask: bool [batch|1, 1|heads, q, k], True = may attend.
      bias: [batch|1, heads, q, k] added to the logits (relative position bias).
      enable_dropout: apply attention-weight dropout ('dropout' rng).
      decode: autoregressive self-attention with a cache. The first call (made by
        `init` with a full-length input) only creates the cache `[batch, length,
        kv_heads, head_dim]`; each later call takes one token (q = 1), writes its key and
        value at `cache_index`, and attends to the cache up to it. `mask` and `bias`
        then have k = the cache length.

    Returns:
      [batch, q, embed].
    """
    query = self.project_query(inputs_q)
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
    key, value = self.project_key_value(inputs_kv)

    if decode:
      key, value, written = self.kv_cache(key, value)
      if written is not None:
        mask = written if mask is None else jnp.logical_and(mask, written)

    attended = self.attend(query, key, value, mask=mask, bias=bias, enable_dropout=enable_dropout)
    return self.project_output(attended, inputs_q.shape[-1])


class SelfAttention(MultiHeadAttention):
  """T5.1.1's full bidirectional self-attention, an `EncoderAttention`.

  Reads the stack's `relpos_bias` table (T5's relative position bias).
  """

  def relative_bias_spec(self) -> dict[str, int]:
    """{table name: heads} of the stack-shared relative-position tables this reads."""
    return {"relpos_bias": self.num_heads}

  def __call__(self, x, *, tables, mask=None, segment_ids=None, enable_dropout=False):
    """x [batch, length, embed]; mask [batch, length] bool; returns [batch, length, embed].

    `tables` the stack's `RelativePositionTables`; `segment_ids` [batch, length] keeps
    packed examples apart.
    """
    positions = jnp.arange(x.shape[1])
    bias = tables.bias(
        "relpos_bias", self.num_heads, relative_position.relative_positions(positions, positions)
    )
    bias = None if bias is None else bias[None]
    attention_mask = None
    if mask is not None:
      attention_mask = make_attention_mask(mask, mask)
    if segment_ids is not None:
      segments = make_segment_mask(segment_ids, segment_ids)
      attention_mask = segments if attention_mask is None else attention_mask & segments
    return super().__call__(x, x, mask=attention_mask, bias=bias, enable_dropout=enable_dropout)
