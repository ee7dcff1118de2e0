"""LongT5 local and transient-global attention against plain references.

References: masked full attention written with numpy loops (band |i − j| ≤ r, padding,
segments, T5 buckets computed here), a brute-force transient-global layer (band keys +
block-sum global keys), and transformers' PyTorch `LongT5LocalAttention` /
`LongT5TransientGlobalAttention` with the same weights.
"""

import math

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax.layers import local_attention as la
from colt5_flax.layers import relative_position
from tests import tolerances

EMBED, HEADS, HEAD_DIM = 16, 2, 4
NUM_BUCKETS, MAX_DISTANCE = 8, 16  # Small, so that short distances reach the log buckets.
GLOBAL_BLOCK = 4


# ----------------------------------------------------------------------------- references


def _t5_bucket(relative, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE):
  """Bidirectional T5 bucket of key − query, float32 log as T5 computes it."""
  relative = np.asarray(relative)
  half = num_buckets // 2
  offset = np.where(relative > 0, half, 0)
  distance = np.abs(relative)
  max_exact = half // 2
  log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / max_exact) / math.log(
      max_distance / max_exact
  )
  large = np.minimum(max_exact + (log_ratio * (half - max_exact)).astype(np.int64), half - 1)
  return offset + np.where(distance < max_exact, distance, large)


def _numpy_params(variables):
  params = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
  attention = params["attention"]
  return dict(
      query=attention["query"]["kernel"].astype(np.float64),
      key=attention["key"]["kernel"].astype(np.float64),
      value=attention["value"]["kernel"].astype(np.float64),
      out=attention["out"]["kernel"].astype(np.float64),
      scale=params.get("global_input_layer_norm", {}).get("scale"),
  )


def _attend_by_hand(x, keys_in, params, bias, allowed):
  """Full softmax attention, one query at a time.

  x [b, n, e] queries' inputs; keys_in [b, m, e] key/value inputs; bias [b, h, n, m];
  allowed bool [b, n, m]. A query that may attend to nothing outputs 0. In float64.
  """
  x, keys_in = np.asarray(x, np.float64), np.asarray(keys_in, np.float64)
  batch, length, _ = x.shape
  out = np.zeros((batch, length, params["out"].shape[-1]))
  for b in range(batch):
    query = np.einsum("ne,ehd->nhd", x[b], params["query"])
    key = np.einsum("me,ehd->mhd", keys_in[b], params["key"])
    value = np.einsum("me,ehd->mhd", keys_in[b], params["value"])
    for i in range(length):
      if not allowed[b, i].any():
        continue
      heads = []
      for h in range(query.shape[1]):
        logits = key[:, h] @ query[i, h] + bias[b, h, i]
        logits = np.where(allowed[b, i], logits, -np.inf)
        weights = np.exp(logits - logits.max())
        heads.append((weights / weights.sum()) @ value[:, h])
      out[b, i] = np.einsum("hd,hde->e", np.stack(heads), params["out"])
  return out


def _local_reference(x, params, table, mask, segment_ids, radius):
  """Masked full attention: band |i − j| ≤ radius, real tokens, same segment."""
  batch, length, _ = x.shape
  positions = np.arange(length)
  relative = positions[None, :] - positions[:, None]  # key − query
  bias = np.broadcast_to(table[:, _t5_bucket(relative)], (batch, HEADS, length, length))
  allowed = (np.abs(relative) <= radius)[None] & mask[:, :, None] & mask[:, None, :]
  allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return _attend_by_hand(x, x, params, bias, allowed)


def _global_blocks_by_hand(mask_row, segment_row, block_size):
  """Token groups of each global token: each segment's tokens in runs of `block_size`, a
  short last run merged into the run before it, a segment with no full run left out."""
  groups = []
  segments = {}
  for i in np.flatnonzero(mask_row):
    segments.setdefault(segment_row[i], []).append(i)
  for tokens in segments.values():
    runs = [tokens[s : s + block_size] for s in range(0, len(tokens), block_size)]
    if len(runs[-1]) < block_size:
      short = runs.pop()
      if runs:
        runs[-1] = runs[-1] + short
    groups.extend(runs)
  return groups


def _tglobal_reference(x, params, table, global_table, mask, segment_ids, radius):
  """Brute force: band keys as `_local_reference`, plus one key per global block (the
  RMS-normed sum of its tokens) with the side bias of (global index − own block)."""
  x = np.asarray(x, np.float64)
  batch, length, _ = x.shape
  num_globals = length // GLOBAL_BLOCK
  positions = np.arange(length)
  relative = positions[None, :] - positions[:, None]
  keys_in = np.zeros((batch, length + num_globals, x.shape[-1]))
  bias = np.zeros((batch, HEADS, length, length + num_globals))
  allowed = np.zeros((batch, length, length + num_globals), bool)
  for b in range(batch):
    keys_in[b, :length] = x[b]
    bias[b, :, :, :length] = table[:, _t5_bucket(relative)]
    allowed[b, :, :length] = (
        (np.abs(relative) <= radius)
        & mask[b][:, None]
        & mask[b][None, :]
        & (segment_ids[b][:, None] == segment_ids[b][None, :])
    )
    groups = _global_blocks_by_hand(mask[b], segment_ids[b], GLOBAL_BLOCK)
    assert len(groups) <= num_globals
    block_of = {i: g for g, tokens in enumerate(groups) for i in tokens}
    for g, tokens in enumerate(groups):
      total = x[b, tokens].sum(0)
      keys_in[b, length + g] = total / np.sqrt(np.mean(total**2) + 1e-6) * params["scale"]
      for i in np.flatnonzero(mask[b]):
        if segment_ids[b, i] != segment_ids[b, tokens[0]]:
          continue
        allowed[b, i, length + g] = True
        bias[b, :, i, length + g] = global_table[:, _t5_bucket(g - block_of.get(i, -1))]
  return _attend_by_hand(x, keys_in, params, bias, allowed)


# ----------------------------------------------------------------------------- fixtures

# Eager jnp runs op by op; one compiled call is much cheaper on a small CPU.
_global_block_ids = jax.jit(la.global_block_ids, static_argnums=1)


def _random_variables(module, length, seed):
  """Module parameters with every value random (norm scale included)."""
  x = jnp.zeros((1, length, EMBED))
  shapes = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(seed), x)))
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [
      jax.random.normal(k, leaf.shape, leaf.dtype) * 0.5
      for k, leaf in zip(keys, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, leaves)


class _Jitted:
  """One module, its random weights, and one jitted apply (compiled once per shape)."""

  def __init__(self, module, length, seed=0):
    self.module = module
    self.variables = _random_variables(module, length, seed)
    self.params = _numpy_params(self.variables)

    def apply(variables, x, kwargs):
      return module.apply(variables, x, **kwargs)

    self._apply = jax.jit(apply)

  def __call__(self, x, **kwargs):
    return np.asarray(self._apply(self.variables, jnp.asarray(x), kwargs), np.float64)


def _tables(local=None, side=None, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE):
  """The stack's RelativePositionTables with the window's and the global side's tables."""
  embeddings = {}
  if local is not None:
    embeddings["relpos_bias"] = jnp.asarray(local)
  if side is not None:
    embeddings["global_relpos_bias"] = jnp.asarray(side)
  return relative_position.RelativePositionTables(
      embeddings=embeddings, num_buckets=num_buckets, max_distance=max_distance
  )


@pytest.fixture(scope="module")
def layers():
  """Cache of `_Jitted` layers by (kind, radius, dtype), shared by all tests here."""
  cache = {}

  def get(kind, radius, dtype=jnp.float32):
    if (kind, radius, dtype) not in cache:
      common = dict(
          num_heads=HEADS,
          head_dim=HEAD_DIM,
          local_radius=radius,
          dtype=dtype,
      )
      if kind == "local":
        module = la.LocalSelfAttention(**common)
      else:
        module = la.TransientGlobalSelfAttention(global_block_size=GLOBAL_BLOCK, **common)
      cache[kind, radius, dtype] = _Jitted(module, 8)
    return cache[kind, radius, dtype]

  return get


@pytest.fixture(scope="module")
def tables():
  rng = np.random.default_rng(7)
  return (
      rng.normal(size=(HEADS, NUM_BUCKETS)).astype(np.float32),
      rng.normal(size=(HEADS, NUM_BUCKETS)).astype(np.float32),
  )


def _inputs(length, *, padded, packed, seed=0):
  """x [2, length, EMBED]; row 1 padded after 7 tokens; packed rows hold 2-3 segments."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, length, EMBED)).astype(np.float32)
  mask = np.ones((2, length), bool)
  if padded:
    mask[1, 7:] = False
  segment_ids = np.ones((2, length), np.int32)
  if packed:
    segment_ids[0, 5:] = 2
    segment_ids[0, 11:] = 3
    segment_ids[1, 2:] = 2
  segment_ids = np.where(mask, segment_ids, 0)
  return x, mask, segment_ids


def _assert_close(got, expected, *, kind, length):
  """One float32 layer against a float64 reference (tests/tolerances.py).

  Width: the widest contraction, the embedding or the keys a query sees (at most the
  length, plus the global tokens). Depth: project in, q·k, weights·v, project out; the
  transient-global keys add their block sum and its RMS norm.
  """
  tolerances.assert_close(
      got, expected, num_terms=max(EMBED, length + length // GLOBAL_BLOCK),
      depth=6 if kind == "tglobal" else 4,
  )


# ----------------------------------------------------------------------------- local


@pytest.mark.parametrize(
    "radius,length",
    # block 4 divides 12; block 5 does not; r > n; self only; 4 blocks in 2 groups
    [(3, 12), (4, 12), (20, 12), (0, 5), (3, 16)],
)
# Padding without packing is also what the transformers comparisons below check.
@pytest.mark.parametrize("padded,packed", [(False, False), (True, True)])
def test_local_matches_masked_full_attention(layers, tables, radius, length, padded, packed):
  layer = layers("local", radius)
  x, mask, segment_ids = _inputs(length, padded=padded, packed=packed)
  got = layer(
      x,
      tables=_tables(tables[0]),
      mask=mask if padded else None,
      segment_ids=segment_ids if packed else None,
  )
  expected = _local_reference(x, layer.params, tables[0], mask, segment_ids, radius)
  _assert_close(got, expected, kind="local", length=length)
  assert np.all(got[~mask] == 0.0)


def test_local_without_bias_table(layers):
  layer = layers("local", 3)
  x, mask, segment_ids = _inputs(12, padded=True, packed=False)
  got = layer(x, tables=_tables(), mask=mask)
  zero_table = np.zeros((HEADS, NUM_BUCKETS), np.float32)
  expected = _local_reference(x, layer.params, zero_table, mask, segment_ids, 3)
  _assert_close(got, expected, kind="local", length=12)


# ----------------------------------------------------------------------------- transient-global


@pytest.mark.parametrize(
    "radius,length",
    [(3, 16), (3, 14), (4, 14), (20, 14), (3, 3)],  # n % 4 == 0, != 0, r > n, n < one block
)
@pytest.mark.parametrize("padded,packed", [(False, False), (True, True)])
def test_tglobal_matches_brute_force(layers, tables, radius, length, padded, packed):
  layer = layers("tglobal", radius)
  x, mask, segment_ids = _inputs(length, padded=padded, packed=packed, seed=length)
  got = layer(
      x,
      tables=_tables(tables[0], tables[1]),
      mask=mask if padded else None,
      segment_ids=segment_ids if packed else None,
  )
  expected = _tglobal_reference(
      x, layer.params, tables[0], tables[1], mask, segment_ids, radius
  )
  _assert_close(got, expected, kind="tglobal", length=length)
  assert np.all(got[~mask] == 0.0)


@pytest.mark.parametrize("padded,packed", [(False, False), (True, False), (True, True)])
def test_tglobal_global_side_in_chunks(tables, monkeypatch, padded, packed):
  # One global block of queries per chunk (one token when packed), a partial last chunk:
  # the chunked global side against the brute force, and its gradients against the
  # one-chunk layer's (which the transformers training-parity test checks).
  length, radius = 14, 3
  x, mask, segment_ids = _inputs(length, padded=padded, packed=packed, seed=3)
  module = la.TransientGlobalSelfAttention(
      num_heads=HEADS, head_dim=HEAD_DIM, local_radius=radius, global_block_size=GLOBAL_BLOCK
  )
  kwargs = dict(
      tables=_tables(tables[0], tables[1]),
      mask=mask if padded else None,
      segment_ids=segment_ids if packed else None,
  )

  def apply_and_grad(variables, x):
    def loss(variables, x):
      return jnp.sum(module.apply(variables, x, **kwargs) ** 2)

    return module.apply(variables, x, **kwargs), jax.grad(loss, argnums=(0, 1))(variables, x)

  layer = _Jitted(module, 8)
  whole = jax.jit(apply_and_grad)(layer.variables, jnp.asarray(x))
  monkeypatch.setattr(la, "_GLOBAL_CHUNK_ELEMENTS", 1)
  chunked = jax.jit(apply_and_grad)(layer.variables, jnp.asarray(x))

  expected = _tglobal_reference(x, layer.params, tables[0], tables[1], mask, segment_ids, radius)
  _assert_close(np.asarray(chunked[0], np.float64), expected, kind="tglobal", length=length)
  # Gradients: both float32, the global side's sums in other orders (chunks, not one block);
  # a backward pass doubles the forward depth (tests/tolerances.py).
  for got, want in zip(jax.tree.leaves(chunked[1]), jax.tree.leaves(whole[1]), strict=True):
    tolerances.assert_close(
        np.asarray(got), np.asarray(want), num_terms=max(EMBED, length + length // GLOBAL_BLOCK),
        depth=12, programs=2,
    )


@pytest.mark.parametrize("missing", ["relpos_bias", "global_relpos_bias"])
def test_tglobal_without_one_bias_table(layers, tables, missing):
  layer = layers("tglobal", 3)
  x, mask, segment_ids = _inputs(14, padded=True, packed=False, seed=6)
  present = _tables(None, tables[1]) if missing == "relpos_bias" else _tables(tables[0])
  got = layer(x, tables=present, mask=mask)
  zero = np.zeros((HEADS, NUM_BUCKETS), np.float32)
  table, global_table = (zero, tables[1]) if missing == "relpos_bias" else (tables[0], zero)
  expected = _tglobal_reference(x, layer.params, table, global_table, mask, segment_ids, 3)
  _assert_close(got, expected, kind="tglobal", length=14)


def test_global_block_ids_by_hand():
  mask = np.ones((1, 14), bool)
  mask[0, 10:] = False
  segment_ids = np.array([[1] * 9 + [2] * 5])
  block_ids, global_segments, global_valid = _global_block_ids(mask, 4, segment_ids)
  # Segment 1: two full blocks, token 8 an orphan of block 1; segment 2 (one real token)
  # has no full block; padding belongs nowhere.
  np.testing.assert_array_equal(block_ids[0], [0, 0, 0, 0, 1, 1, 1, 1, 1, -1] + [-1] * 4)
  np.testing.assert_array_equal(global_valid[0], [True, True, False])
  np.testing.assert_array_equal(global_segments[0, :2], [1, 1])


# ----------------------------------------------------------------------------- transformers


def _hf_config(radius, **overrides):
  from transformers import LongT5Config

  return LongT5Config(
      d_model=EMBED,
      d_kv=HEAD_DIM,
      num_heads=HEADS,
      local_radius=radius,
      global_block_size=GLOBAL_BLOCK,
      relative_attention_num_buckets=NUM_BUCKETS,
      relative_attention_max_distance=MAX_DISTANCE,
      dropout_rate=0.0,
      layer_norm_epsilon=1e-6,
      is_decoder=False,
      **overrides,
  )


def _copy_weights_to_hf(hf_layer, params, table, global_table=None):
  import torch

  def linear(kernel):  # ours [embed, heads, kv] -> torch [heads * kv, embed]
    return torch.from_numpy(np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T))

  with torch.no_grad():
    hf_layer.q.weight.copy_(linear(params["query"]))
    hf_layer.k.weight.copy_(linear(params["key"]))
    hf_layer.v.weight.copy_(linear(params["value"]))
    out = params["out"]  # [heads, kv, embed] -> [embed, heads * kv]
    out = np.ascontiguousarray(out.reshape(-1, out.shape[-1]).T)
    hf_layer.o.weight.copy_(torch.from_numpy(out))
    hf_layer.relative_attention_bias.weight.copy_(torch.from_numpy(table.T.copy()))
    if global_table is not None:
      hf_layer.global_relative_attention_bias.weight.copy_(torch.from_numpy(global_table.T.copy()))
      hf_layer.global_input_layer_norm.weight.copy_(torch.from_numpy(params["scale"].copy()))


@pytest.mark.parametrize("radius,length", [(3, 14), (9, 40)])
def test_local_matches_transformers(layers, tables, radius, length):
  torch = pytest.importorskip("torch")
  hf = pytest.importorskip("transformers.models.longt5.modeling_longt5")
  layer = layers("local", radius)
  hf_layer = hf.LongT5LocalAttention(_hf_config(radius), has_relative_attention_bias=True)
  # In float64, with our float32 weights: the reference carries no rounding of its own.
  hf_layer.double().eval()
  _copy_weights_to_hf(hf_layer, jax.tree.map(np.float32, layer.params), tables[0])

  x, mask, _ = _inputs(length, padded=True, packed=False, seed=3)
  # LongT5Stack hands local layers the blocked mask it builds from attention_mask.
  hf_mask = hf._get_local_attention_mask(torch.from_numpy(mask), radius + 1, "cpu")
  with torch.no_grad():
    expected = hf_layer(torch.from_numpy(x).double(), mask=hf_mask)[0].numpy()
  got = layer(x, tables=_tables(tables[0]), mask=mask)
  # Padding queries are don't-care (HF averages over masked keys, we output 0).
  _assert_close(got[mask], expected[mask], kind="local", length=length)


@pytest.mark.parametrize("radius,length", [(3, 14), (3, 16), (9, 40)])
def test_tglobal_matches_transformers(layers, tables, radius, length):
  torch = pytest.importorskip("torch")
  hf = pytest.importorskip("transformers.models.longt5.modeling_longt5")
  layer = layers("tglobal", radius)
  config = _hf_config(radius, encoder_attention_type="transient-global")
  hf_layer = hf.LongT5TransientGlobalAttention(config, has_relative_attention_bias=True)
  hf_layer.double().eval()
  _copy_weights_to_hf(hf_layer, jax.tree.map(np.float32, layer.params), *tables)

  x, mask, _ = _inputs(length, padded=True, packed=False, seed=4)
  with torch.no_grad():
    # The stack passes transient-global layers the raw [batch, length] attention mask.
    expected = hf_layer(
        torch.from_numpy(x).double(), mask=torch.from_numpy(mask.astype(np.float64))
    )
    expected = expected[0].numpy()
  got = layer(x, tables=_tables(tables[0], tables[1]), mask=mask)
  _assert_close(got[mask], expected[mask], kind="tglobal", length=length)


@pytest.mark.parametrize("length", [3, 14, 16, 37])
def test_global_block_ids_match_transformers(length):
  torch = pytest.importorskip("torch")
  hf = pytest.importorskip("transformers.models.longt5.modeling_longt5")
  rng = np.random.default_rng(length)
  mask = np.ones((4, length), bool)
  mask[1, length // 2 :] = False  # right padding
  mask[2] = rng.random(length) > 0.3  # holes anywhere
  mask[3, :2] = False  # left padding
  expected_ids, expected_segments = hf._make_global_fixed_block_ids(
      torch.from_numpy(mask.astype(np.float32)), GLOBAL_BLOCK
  )
  block_ids, _, global_valid = _global_block_ids(mask, GLOBAL_BLOCK)
  np.testing.assert_array_equal(np.asarray(block_ids), expected_ids.numpy())
  np.testing.assert_array_equal(np.asarray(global_valid), expected_segments.numpy() == 1)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("kind", ["local", "tglobal"])
def test_bfloat16_finite_and_all_padding_row(layers, tables, kind):
  layer32 = layers(kind, 3)
  layer16 = layers(kind, 3, jnp.bfloat16)
  x, mask, _ = _inputs(14, padded=True, packed=False, seed=5)
  mask[0] = False  # A row that is all padding.
  kwargs = dict(tables=_tables(tables[0]), mask=mask)
  if kind == "tglobal":
    kwargs["tables"] = _tables(tables[0], tables[1])
  got = layer16._apply(layer32.variables, jnp.asarray(x, jnp.bfloat16), kwargs)
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got, np.float32)
  assert np.all(np.isfinite(got))
  assert np.all(got[0] == 0.0)
  expected = layer32(x, **kwargs)
  # bfloat16 activations, float32 sums (tests/tolerances.py with n = 1): six roundings to
  # bfloat16 in sequence (input, q, k, v, weights, output; the global keys' norm besides).
  tolerances.assert_close(
      got[mask], expected[mask], num_terms=1, depth=7 if kind == "tglobal" else 6,
      dtype=jnp.bfloat16,
  )


def test_dropout_uses_rng_and_is_off_by_default():
  module = la.LocalSelfAttention(
      num_heads=HEADS, head_dim=HEAD_DIM, local_radius=3, dropout_rate=0.5
  )
  x = jnp.asarray(_inputs(8, padded=False, packed=False)[0])
  variables = jax.jit(module.init)(jax.random.key(0, impl="rbg"), x)

  @jax.jit
  def run(variables, x, rng):
    plain = module.apply(variables, x)
    dropped = module.apply(variables, x, enable_dropout=True, rngs={"dropout": rng})
    return plain, dropped

  plain, dropped = run(variables, x, jax.random.key(1, impl="rbg"))  # rbg: fast to compile
  assert np.all(np.isfinite(np.asarray(dropped)))
  assert not np.allclose(np.asarray(plain), np.asarray(dropped))


def test_bad_inputs_raise():
  module = la.LocalSelfAttention(num_heads=HEADS, head_dim=HEAD_DIM, local_radius=3)
  x = jnp.zeros((2, 8, EMBED))
  # Shape errors are raised while tracing: abstract evaluation is enough (and fast).
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="mask shape"):
    jax.eval_shape(lambda v: module.apply(v, x, mask=jnp.ones((2, 7), bool)), variables)
  with pytest.raises(ValueError, match="'relpos_bias' has shape"):
    jax.eval_shape(
        lambda v: module.apply(v, x, tables=_tables(jnp.zeros((HEADS, 5)))), variables
    )
  bad_radius = la.LocalSelfAttention(num_heads=HEADS, local_radius=-1)
  with pytest.raises(ValueError, match="local_radius"):
    jax.eval_shape(bad_radius.init, jax.random.key(0), x)
  no_groups = la.LocalSelfAttention(num_heads=HEADS, local_radius=3, block_groups=0)
  with pytest.raises(ValueError, match="block_groups"):
    jax.eval_shape(no_groups.init, jax.random.key(0), x)


# ----------------------------------------------------------------------------- memory


def _largest_intermediate(closed_jaxpr):
  """Element count of the largest value any equation (at any nesting level) produces."""
  largest = 0

  def visit(jaxpr):
    nonlocal largest
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(closed_jaxpr.jaxpr)
  return largest


@pytest.mark.parametrize("kind", ["local", "tglobal"])
def test_memory_linear_in_length(kind):
  length, radius, block = 4096, 127, 128
  common = dict(num_heads=1, head_dim=4, local_radius=radius)
  if kind == "local":
    module = la.LocalSelfAttention(**common)
    keys_per_query = 3 * block
  else:
    module = la.TransientGlobalSelfAttention(global_block_size=16, **common)
    keys_per_query = 3 * block + length // 16
  x = jax.ShapeDtypeStruct((1, length, 4), jnp.float32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 4))))
  table = jnp.zeros((1, 32))
  kwargs = dict(tables=_tables(table, num_buckets=32, max_distance=128),
                mask=jnp.ones((1, length), bool))
  if kind == "tglobal":
    kwargs["tables"] = _tables(table, table, num_buckets=32, max_distance=128)
  jaxpr = jax.make_jaxpr(lambda v, x: module.apply(v, x, **kwargs))(variables, x)
  largest = _largest_intermediate(jaxpr)
  # The largest array is the blocked logits [1, blocks, 1, block, keys_per_query]:
  # O(length · radius) (+ the global keys), never [length, length].
  assert largest <= length * keys_per_query
  assert largest < length * length // 4
