"""LongT5's encoder self-attention: blocked sliding-window local, and transient-global.

`LocalSelfAttention`: each token attends to the tokens within `local_radius` of it
(LongT5 §2.1.1), computed in blocks of `local_radius + 1`, so memory grows linearly with
length. `TransientGlobalSelfAttention` (LongT5 §2.1.2) adds, for every token, attention to
global tokens: the layer-normed sums of each block of `global_block_size` input vectors.
Both reproduce transformers' `LongT5LocalAttention` / `LongT5TransientGlobalAttention`
for the same weights: docs/longt5_attention.md records what transformers' code does
(blocks, masks, orphan tokens, the bias tables one per stack) and where ours differs;
tests/convert/test_hf.py checks the logits.

Packed inputs (`segment_ids`, seqio/t5x convention) are ours: transformers has none.
Local attention stays within a segment; transient-global blocks are counted from each
segment's start and a token attends only to its own segment's globals.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from colt5_flax.layers import attention, normalization

Dtype = Any
# Logits per chunk of TGlobal's global side (`_global_part`): 16 MiB of float32.
_GLOBAL_CHUNK_ELEMENTS = 1 << 22


def _pad_to_multiple(x, multiple: int, axis: int, pad_value):
  """Pads `axis` at its end up to a multiple of `multiple` with `pad_value`."""
  pad = -x.shape[axis] % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=pad_value)


def split_into_blocks(x, block_len: int, axis: int, pad_value=0):
  """[..., length, ...] -> [..., ceil(length / block_len), block_len, ...], `axis` padded."""
  axis = axis % x.ndim
  x = _pad_to_multiple(x, block_len, axis, pad_value)
  return x.reshape(x.shape[:axis] + (x.shape[axis] // block_len, block_len) + x.shape[axis + 1 :])


def unblock(x, length: int):
  """[batch, num_blocks, block_len, ...] -> [batch, length, ...]: `split_into_blocks`
  undone, its padding dropped."""
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def concat_3_blocks(blocked, block_axis: int, pad_value=0):
  """[..., num_blocks, block_len, ...] -> [..., num_blocks, 3 * block_len, ...].

  Block b becomes [block b-1 ; block b ; block b+1]; the blocks beyond either end are
  `pad_value`. The within-block axis is the one after `block_axis`.
  """
  block_axis = block_axis % blocked.ndim
  num_blocks = blocked.shape[block_axis]
  widths = [(0, 0)] * blocked.ndim
  widths[block_axis] = (1, 1)
  padded = jnp.pad(blocked, widths, constant_values=pad_value)
  parts = [
      jax.lax.slice_in_dim(padded, offset, offset + num_blocks, axis=block_axis)
      for offset in range(3)
  ]
  return jnp.concatenate(parts, axis=block_axis + 1)


def three_block_relative_positions(block_len: int) -> np.ndarray:
  """int32 [block_len, 3 * block_len]: key − query index inside the 3-block window."""
  window = np.arange(3 * block_len, dtype=np.int32)
  return window[None, :] - window[block_len : 2 * block_len, None]


def local_window_mask(mask, segment_ids, block_len: int):
  """Which window keys each query may attend to.

  Args:
    mask: bool [batch, length], True = real token.
    segment_ids: int [batch, length] packed-example ids, or None.
    block_len: local_radius + 1.

  Returns:
    bool [batch, num_blocks, block_len, 3 * block_len]: query and key are real tokens, at
    most `block_len - 1` apart, and in the same segment.
  """
  query_valid = split_into_blocks(mask, block_len, axis=1, pad_value=False)
  key_valid = concat_3_blocks(query_valid, block_axis=1, pad_value=False)
  allowed = jnp.logical_and(query_valid[..., :, None], key_valid[..., None, :])
  # The 3-block window reaches up to 2 * block_len - 1 away: cut it to the radius.
  within_radius = np.abs(three_block_relative_positions(block_len)) < block_len
  allowed = jnp.logical_and(allowed, within_radius)
  if segment_ids is not None:
    query_segment = split_into_blocks(segment_ids, block_len, axis=1, pad_value=-1)
    key_segment = concat_3_blocks(query_segment, block_axis=1, pad_value=-1)
    allowed = jnp.logical_and(allowed, query_segment[..., :, None] == key_segment[..., None, :])
  return allowed


def global_block_ids(mask, global_block_size: int, segment_ids=None):
  """Assigns tokens to LongT5's transient-global blocks (HF `_make_global_fixed_block_ids`).

  Args:
    mask: bool [batch, length], True = real token.
    global_block_size: tokens per global block (16 in LongT5).
    segment_ids: optional int [batch, length]; blocks are then counted from each
      segment's start and never straddle two segments.

  Returns:
    block_ids: int32 [batch, length], the global token each token is summed into; −1 for
      padding and for tokens of a segment shorter than one block.
    global_segment_ids: int32 [batch, num_globals], segment of each global token (0 when
      `segment_ids` is None).
    global_valid: bool [batch, num_globals], False for global slots no token maps to.
    num_globals = length // global_block_size.
  """
  mask = jnp.asarray(mask, bool)
  batch, length = mask.shape
  index = jnp.arange(length, dtype=jnp.int32)
  segment = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids
  segment = jnp.asarray(segment, jnp.int32)
  changes = segment[:, 1:] != segment[:, :-1]
  edge = jnp.ones((batch, 1), bool)
  is_first = jnp.concatenate([edge, changes], axis=1)
  is_last = jnp.concatenate([changes, edge], axis=1)
  segment_start = jax.lax.cummax(jnp.where(is_first, index, 0), axis=1)
  segment_end = jax.lax.cummin(jnp.where(is_last, index, length - 1), axis=1, reverse=True)
  position = index - segment_start

  # A block is full when its last position holds a real token (HF `handle_orphan_tokens`).
  is_block_end = jnp.logical_and(mask, position % global_block_size == global_block_size - 1)
  ends_through = jnp.cumsum(is_block_end.astype(jnp.int32), axis=1)
  ends_before = ends_through - is_block_end.astype(jnp.int32)
  full_blocks_before_segment = jnp.take_along_axis(ends_before, segment_start, axis=1)
  full_blocks_in_segment = (
      jnp.take_along_axis(ends_through, segment_end, axis=1) - full_blocks_before_segment
  )
  # Orphans (a trailing partial block) join the segment's last full block.
  block_in_segment = jnp.minimum(position // global_block_size, full_blocks_in_segment - 1)
  block_ids = jnp.where(
      jnp.logical_and(mask, block_in_segment >= 0),
      full_blocks_before_segment + block_in_segment,
      -1,
  )

  num_globals = length // global_block_size
  global_valid = jnp.arange(num_globals)[None, :] < ends_through[:, -1:]
  # Each full block has exactly one end token: it carries the block's segment id.
  rows = jnp.arange(batch)[:, None]
  end_target = jnp.where(is_block_end, block_ids, num_globals)
  global_segment_ids = (
      jnp.zeros((batch, num_globals), jnp.int32).at[rows, end_target].set(segment, mode="drop")
  )
  return block_ids.astype(jnp.int32), global_segment_ids, global_valid


def global_aggregates(x, block_ids, num_globals: int):
  """Sums token vectors per global block: [batch, length, embed] -> float32 [batch, G, embed].

  A scatter-add, not HF's one-hot einsum, so memory stays O(length · embed). Tokens with
  block id −1 are left out.
  """
  batch = x.shape[0]
  rows = jnp.arange(batch)[:, None]
  target = jnp.where(block_ids >= 0, block_ids, num_globals)
  sums = jnp.zeros((batch, num_globals, x.shape[-1]), jnp.float32)
  return sums.at[rows, target].add(jnp.asarray(x, jnp.float32), mode="drop")


def _check_inputs(x, mask, segment_ids):
  """Shape checks with the offending values; returns `mask` as bool [batch, length]."""
  if x.ndim != 3:
    raise ValueError(f"x must be [batch, length, embed], got shape {x.shape}")
  batch, length = x.shape[:2]
  if mask is None:
    mask = jnp.ones((batch, length), bool)
  elif mask.shape != (batch, length):
    raise ValueError(f"mask shape {mask.shape} != (batch, length) = {(batch, length)}")
  if segment_ids is not None and segment_ids.shape != (batch, length):
    raise ValueError(f"segment_ids shape {segment_ids.shape} != (batch, length) = "
                     f"{(batch, length)}")
  return jnp.asarray(mask, bool)


class _BlockedLocalAttention(nn.Module):
  """Shared attributes, projections and the blocked window of both LongT5 layers."""

  num_heads: int
  head_dim: int = 64
  local_radius: int = 127
  table_name: str = "relpos_bias"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  block_groups: int = 2  # `_grouped`

  @property
  def block_len(self) -> int:
    return self.local_radius + 1

  def relative_bias_spec(self) -> dict[str, int]:
    """{table name: heads} of the stack-shared relative-position tables read."""
    return {self.table_name: self.num_heads}

  def setup(self):
    if self.local_radius < 0:
      raise ValueError(f"local_radius must be >= 0, got {self.local_radius}")
    # Same submodule and parameter layout as full attention: `attention/{query,key,value,out}`.
    self.attention = attention.MultiHeadAttention(
        num_heads=self.num_heads,
        head_dim=self.head_dim,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        dropout_rate=self.dropout_rate,
    )

  def _window_bias(self, tables):
    """[heads, block_len, 3 * block_len] float32, the same for every block; or None
    without a table."""
    if tables is None:
      return None
    return tables.bias(
        self.table_name, self.num_heads, three_block_relative_positions(self.block_len)
    )

  def _project_blocked(self, x):
    """Projects and blocks x [batch, length, embed].

    Returns:
      query [batch, num_blocks, block_len, heads, head_dim] and the 3-block windows of key
      and value, each [batch, num_blocks, 3 * block_len, heads, head_dim].
    """
    query = self.attention.project_query(x)
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
    key, value = self.attention.project_key_value(x)
    query = split_into_blocks(query, self.block_len, axis=1)
    key = concat_3_blocks(split_into_blocks(key, self.block_len, axis=1), block_axis=1)
    value = concat_3_blocks(split_into_blocks(value, self.block_len, axis=1), block_axis=1)
    return query, key, value

  def _grouped(self, attend, *blocked):
    """`attend(group, *its blocks of each array)` over `block_groups` runs of blocks (axis 1;
    fewer if they do not divide the count), joined: the same result, but XLA:CPU runs each
    batched product of small windows on one thread and independent groups side by side
    (CoLT5's layer, 16k, 2 cores, forward+backward: 4.31 → 4.16 s; docs/benchmarks.md)."""
    if type(self.block_groups) is not int or self.block_groups < 1:
      raise ValueError(f"block_groups must be an int >= 1, got {self.block_groups!r}")
    blocks = blocked[0].shape[1]
    size = blocks // math.gcd(self.block_groups, blocks)
    parts = [
        attend(group, *(a[:, start : start + size] for a in blocked))
        for group, start in enumerate(range(0, blocks, size))
    ]
    return jax.tree.map(lambda *pieces: jnp.concatenate(pieces, axis=1), *parts)

  def _project_output(self, attended, embed: int):
    """[batch, length, heads, head_dim] -> [batch, length, embed]."""
    out = self.attention.project_output(attended, embed)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

  def _unblock_and_project(self, attended, length: int, embed: int):
    """[batch, num_blocks, block_len, heads, head_dim] -> [batch, length, embed]."""
    return self._project_output(unblock(attended, length), embed)


class LocalSelfAttention(_BlockedLocalAttention):
  """LongT5 local attention: each token attends to the tokens within `local_radius`.

  Blocked as in LongT5 (§2.1.1): blocks of `local_radius + 1` tokens, each attending to
  its own and both neighbouring blocks, masked to the radius, so memory is
  O(length · local_radius). Used by the LongT5-local baseline and by CoLT5's light
  attention branch (CoLT5 §3.3: radius 127, a quarter of the heads). Matches
  transformers' `LongT5LocalAttention` for the same weights (see the module docstring).

  Parameters: `attention/{query,key,value,out}/kernel` exactly as `MultiHeadAttention`.
  The relative position table is owned by the stack and passed in.

  Attributes:
    num_heads: attention heads.
    head_dim: per-head width (64 in T5).
    local_radius: keys within this many positions on each side are visible; 127 being
      the LongT5 and CoLT5 default (window 255, blocks of 128).
    table_name: the stack's relative-position table this reads ("relpos_bias"; CoLT5's
      light branch reads "light_relpos_bias").
    dtype: activation dtype; the softmax is float32 whatever it is.
    dropout_rate: dropout on the attention weights.
    block_groups: independent groups the blocks are attended in (`_grouped`; same result).
  """

  def __call__(
      self,
      x,
      *,
      tables=None,
      mask=None,
      segment_ids=None,
      enable_dropout: bool = False,
  ):
    """Local self-attention.

    Args:
      x: [batch, length, embed], any length (padded internally to whole blocks).
      tables: the stack's `RelativePositionTables`; without one (or without this layer's
        table in it) no position bias.
      mask: bool [batch, length], True = real token; None = all real.
      segment_ids: int [batch, length] packed-example ids; tokens attend within their own
        segment only. None = one example per row.
      enable_dropout: attention-weight dropout ('dropout' rng).

    Returns:
      [batch, length, embed] in `dtype`; exactly 0 at padding positions.
    """
    mask = _check_inputs(x, mask, segment_ids)
    batch, length, embed = x.shape
    query, key, value = self._project_blocked(x)
    # [batch, num_blocks, 1, block_len, 3 * block_len], broadcast over heads.
    window_mask = local_window_mask(mask, segment_ids, self.block_len)[:, :, None]
    bias = self._window_bias(tables)

    def attend(group, query, key, value, mask):
      return self.attention.attend(query, key, value, mask=mask, bias=bias,
                                   enable_dropout=enable_dropout)

    attended = self._grouped(attend, query, key, value, window_mask)
    return self._unblock_and_project(attended, length, embed)


class TransientGlobalSelfAttention(_BlockedLocalAttention):
  """LongT5 transient-global (TGlobal) attention (LongT5 §2.1.2; CoLT5 §1.6 baseline).

  Local attention as `LocalSelfAttention`, plus every token attends to all global tokens
  of its row (of its segment, when packed). Global tokens are recomputed in every layer:
  the sum of each block of `global_block_size` input vectors (padding excluded, a trailing
  partial block joining the last full one), RMS-normed by this layer's own
  `global_input_layer_norm`, and projected with this layer's K and V weights. The global
  side has its own relative position bias, from the stack-shared `global_relpos_bias`
  table, over (global index − the query token's block id). Matches transformers'
  `LongT5TransientGlobalAttention` for the same weights (see the module docstring).

  Parameters: `attention/{query,key,value,out}/kernel` (as `MultiHeadAttention`) and
  `global_input_layer_norm/scale` [embed].

  Attributes:
    as `LocalSelfAttention`, plus
    global_block_size: tokens summed into one global token (16 in LongT5).
    global_table_name: the stack's table of the global side ("global_relpos_bias").
  """

  global_block_size: int = 16
  global_table_name: str = "global_relpos_bias"

  def relative_bias_spec(self) -> dict[str, int]:
    """The local window's table and the global side's, both shared by the stack."""
    return {self.table_name: self.num_heads, self.global_table_name: self.num_heads}

  def setup(self):
    super().setup()
    if self.global_block_size < 1:
      raise ValueError(f"global_block_size must be >= 1, got {self.global_block_size}")
    self.global_input_layer_norm = normalization.RMSNorm(
        dtype=self.dtype, param_dtype=self.param_dtype
    )

  def __call__(
      self,
      x,
      *,
      tables=None,
      mask=None,
      segment_ids=None,
      enable_dropout: bool = False,
  ):
    """Local plus transient-global self-attention.

    Args:
      x: [batch, length, embed], any length.
      tables: the stack's `RelativePositionTables`: the local table (HF layer 0
        `relative_attention_bias`) and the global side's (HF layer 0
        `global_relative_attention_bias`); a missing one adds no bias on its side.
      mask: bool [batch, length], True = real token; None = all real.
      segment_ids: int [batch, length] packed-example ids, or None.
      enable_dropout: attention-weight dropout ('dropout' rng).

    Returns:
      [batch, length, embed] in `dtype`; exactly 0 at padding positions.
    """
    mask = _check_inputs(x, mask, segment_ids)
    length, embed = x.shape[1:]
    block_len = self.block_len

    # Global tokens: block sums of this layer's input, normed (LongT5 §2.1.2).
    block_ids, global_segment_ids, global_valid = global_block_ids(
        mask, self.global_block_size, segment_ids
    )
    num_globals = global_valid.shape[1]
    global_inputs = self.global_input_layer_norm(global_aggregates(x, block_ids, num_globals))
    global_key, global_value = self.attention.project_key_value(global_inputs)

    query, key, value = self._project_blocked(x)
    rng = self.attention.dropout_rng(enable_dropout)
    dropout = dict(dropout_rate=self.dropout_rate, deterministic=not enable_dropout,
                   dtype=self.dtype)

    # One softmax over two parts of the keys (`attention.combine_attention_parts`): the
    # blocked window, and the globals read by every query from one [batch, G] copy, so
    # neither the global keys nor their bias are copied into each block.
    bias = self._window_bias(tables)

    def attend(group, query, key, value, mask):  # group 0 keeps rng; the globals fold in 1
      group_rng = None if rng is None else rng if not group else jax.random.fold_in(rng, group + 1)
      return attention.attention_part(query, key, value, mask=mask, bias=bias,
                                      dropout_rng=group_rng, **dropout)

    window = self._grouped(attend, query, key, value,
                           local_window_mask(mask, segment_ids, block_len)[:, :, None])
    window = attention.AttentionPart(*(unblock(part, length) for part in window))
    parts = [window]
    if num_globals:  # inputs shorter than one global block have none
      parts.append(self._global_part(
          tables, unblock(query, length), global_key, global_value, mask, segment_ids, block_ids,
          global_segment_ids, global_valid,
          dropout_rng=None if rng is None else jax.random.fold_in(rng, 1), **dropout,
      ))
    attended = attention.combine_attention_parts(parts, self.dtype)
    return self._project_output(attended, embed)

  def _global_part(
      self, tables, query, global_key, global_value, mask, segment_ids, block_ids,
      global_segment_ids, global_valid, **kernel_args,
  ):
    """Every query against the row's G global tokens, unnormalised (an `AttentionPart`).

    The [length, G] logits are the layer's largest arrays (G = length / 16), so queries
    go through in chunks of about `_GLOBAL_CHUNK_ELEMENTS` logits under `jax.checkpoint`:
    memory O(chunk · G) forward and backward (the backward pass recomputes a chunk's
    logits), and a chunk's logits stay in cache between the kernel's passes over them.

    The bias reads (global index − the query token's block id). Unpacked, a real token's
    block id is min(position // global_block_size, the row's last full block), the same
    for every token of a `global_block_size`-aligned group, so the bias is looked up per
    group and broadcast over its tokens inside the softmax's fused loops; packed inputs
    (blocks counted from each segment's start) look it up per token. Dropout (one mask
    per row, head and global token) is the same in every chunk.
    """
    batch, length = mask.shape
    num_globals = global_valid.shape[1]
    table = None if tables is None else tables.table(self.global_table_name, self.num_heads)
    group = self.global_block_size if segment_ids is None else 1
    chunk = max(1, _GLOBAL_CHUNK_ELEMENTS // (num_globals * self.num_heads * group)) * group
    chunk = min(chunk, -(-length // group) * group)
    num_chunks = -(-length // chunk)

    def chunks(x, pad_value, size=chunk):
      """[batch, n, ...] -> [num_chunks, batch, size, ...] (padded to num_chunks · size)."""
      widths = [(0, 0)] * x.ndim
      widths[1] = (0, num_chunks * size - x.shape[1])
      x = jnp.pad(x, widths, constant_values=pad_value)
      return jnp.moveaxis(x.reshape(batch, num_chunks, size, *x.shape[2:]), 1, 0)

    # The block id of each bias row: of each group of tokens (all real tokens of a group
    # share it; padding has −1), or of each token when packed.
    ids = _pad_to_multiple(block_ids, group, axis=1, pad_value=-1)
    ids = jnp.max(ids.reshape(batch, -1, group), axis=-1)
    inputs = dict(
        query=chunks(query, 0),
        ids=chunks(ids, -1, chunk // group),
        valid=chunks(mask, False),
    )
    if segment_ids is not None:
      inputs["segment"] = chunks(jnp.asarray(segment_ids), -1)
    globals_index = jnp.arange(num_globals, dtype=jnp.int32)

    @jax.checkpoint
    def one_chunk(chunk_inputs):
      side_mask = jnp.logical_and(chunk_inputs["valid"][:, :, None], global_valid[:, None, :])
      if segment_ids is not None:
        side_mask = jnp.logical_and(
            side_mask, chunk_inputs["segment"][:, :, None] == global_segment_ids[:, None, :]
        )
      bias = None
      if table is not None:
        relative = globals_index[None, None, :] - chunk_inputs["ids"][:, :, None]
        bias = tables.bias(self.global_table_name, self.num_heads, relative)
        bias = jnp.broadcast_to(
            bias[:, :, :, None, :],
            (batch, self.num_heads, chunk // group, group, num_globals),
        ).reshape(batch, self.num_heads, chunk, num_globals)
      return attention.attention_part(
          chunk_inputs["query"], global_key, global_value, mask=side_mask[:, None],
          bias=bias, **kernel_args,
      )

    part = jax.lax.map(one_chunk, inputs)
    return attention.AttentionPart(*(
        jnp.moveaxis(x, 0, 1).reshape(batch, num_chunks * chunk, *x.shape[3:])[:, :length]
        for x in part
    ))
