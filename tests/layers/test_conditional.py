"""CoLT5's conditional feedforward and attention against numpy computations by hand."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax.layers import conditional
from colt5_flax.layers.relative_position import RelativePositionTables
from colt5_flax.layers.routing import Router, RoutingCapacity
from tests import reference

EMBED = 8
LENGTH = 16


def _unbox(tree):
  return jax.tree.map(np.asarray, nn.meta.unbox(tree))


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, LENGTH, EMBED)).astype(np.float32)
  mask = np.ones((3, LENGTH), bool)
  mask[1, 11:] = False  # Padded row.
  mask[2, 2:] = False  # Fewer real tokens (2) than any routed count below.
  return x, mask


# -- Conditional feedforward --------------------------------------------------------------


def _ff(fraction=1 / 4, routing="learned", **kwargs):
  return conditional.ConditionalFeedForward(
      light_mlp_dim=6, heavy_mlp_dim=12,
      capacity=kwargs.pop("capacity", RoutingCapacity(fraction=fraction)),
      router_factory=functools.partial(Router, routing=routing),
      **kwargs,
  )


def _routing_choice(scores, mask, num_routed):
  """[length] bool: the num_routed highest-scored real tokens (padding last)."""
  chosen = np.zeros(scores.shape, bool)
  chosen[reference.hard_top_k(scores[None], mask[None], num_routed)[0]] = True
  return chosen


@pytest.fixture(scope="module")
def learned_ff(inputs):
  x, mask = inputs
  module = _ff()
  variables = module.init(jax.random.PRNGKey(1), x, mask=mask)
  apply = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))
  out, state = apply(variables, x, mask=mask)
  return module, _unbox(variables["params"]), np.asarray(out), state["intermediates"]


def test_ff_all_routed_with_unit_weights_is_light_plus_heavy(inputs):
  x, mask = inputs
  # Static routing of every token: k = n and λ = 1 on real tokens.
  module = _ff(fraction=1.0, routing="static")
  variables = module.init(jax.random.PRNGKey(0), x, mask=mask)
  p = _unbox(variables["params"])
  got = np.asarray(module.apply(variables, x, mask=mask))
  light = reference.gated_mlp(x, p["light"])
  heavy = reference.gated_mlp(x, p["heavy"])
  expected = light + heavy * mask[..., None]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_ff_learned_routing_matches_numpy(inputs, learned_ff):
  x, mask = inputs
  _, p, got, _ = learned_ff
  num_routed = LENGTH // 4
  light = reference.gated_mlp(x, p["light"])
  heavy = reference.gated_mlp(x, p["heavy"])
  for b in range(x.shape[0]):
    scores = x[b].astype(np.float64) @ p["router"]["router_weights"]
    lam = reference.soft_top_k(scores, num_routed * 9 / 8, mask=mask[b])
    chosen = _routing_choice(scores, mask[b], num_routed)
    expected = light[b] + np.where(chosen[:, None], lam[:, None] * heavy[b], 0.0)
    np.testing.assert_allclose(got[b], expected, rtol=1e-4, atol=1e-5)
    # Tokens that are not routed get exactly the light output.
    np.testing.assert_array_equal(got[b][~chosen], np.asarray(
        jnp.asarray(got[b][~chosen])))
    np.testing.assert_allclose(got[b][~chosen], light[b][~chosen], rtol=1e-6, atol=1e-6)


def test_ff_padding_never_routed(inputs, learned_ff):
  _, mask = inputs
  _, _, _, intermediates = learned_ff
  (indices,) = intermediates["mlp_routed_indices"]
  indices = np.asarray(indices)
  for b in range(mask.shape[0]):
    num_real = mask[b].sum()
    routed_real = mask[b][indices[b]].sum()
    assert routed_real == min(num_real, indices.shape[1])
  # Row 2 has two real tokens, both routed.
  assert set(np.asarray(indices[2])) >= {0, 1}


def test_ff_all_padding_row_is_finite():
  module = _ff()
  x = np.ones((1, LENGTH, EMBED), np.float32)
  mask = np.zeros((1, LENGTH), bool)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x, mask=mask)

  def loss(params):
    return jnp.sum(module.apply({"params": params}, x, mask=mask) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_ff_train_capacity_factor_routes_more_tokens_in_training(inputs):
  x, mask = inputs
  module = _ff(capacity=RoutingCapacity(fraction=1 / 4, train_capacity_factor=2.0))
  variables = module.init(jax.random.PRNGKey(0), x, mask=mask)
  _, train_state = module.apply(
      variables, x, mask=mask, enable_dropout=True, mutable=["intermediates"],
      rngs={"dropout": jax.random.PRNGKey(0)},
  )
  _, eval_state = module.apply(variables, x, mask=mask, mutable=["intermediates"])
  assert train_state["intermediates"]["mlp_routed_indices"][0].shape == (3, 8)
  assert eval_state["intermediates"]["mlp_routed_indices"][0].shape == (3, 4)


def test_ff_without_heavy_branch_is_the_light_mlp(inputs):
  x, mask = inputs
  module = _ff(use_heavy_branch=False)
  variables = module.init(jax.random.PRNGKey(0), x, mask=mask)
  p = _unbox(variables["params"])
  assert set(p) == {"light"}
  np.testing.assert_allclose(
      np.asarray(module.apply(variables, x, mask=mask)),
      reference.gated_mlp(x, p["light"]), rtol=1e-5, atol=1e-5,
  )


# -- Conditional attention ----------------------------------------------------------------

HEAD_DIM = 4
RADIUS = 3


def _tables(raw):
  """The stack's RelativePositionTables of {name: [heads, 32]} (T5's 32 / 128 buckets)."""
  return RelativePositionTables({name: jnp.asarray(table) for name, table in raw.items()})


def _attention(**kwargs):
  return conditional.ConditionalAttention(
      num_light_heads=1,
      num_heavy_heads=2,
      head_dim=HEAD_DIM,
      local_radius=RADIUS,
      capacity=kwargs.pop("capacity", RoutingCapacity(fraction=1 / 4)),
      router_factory=functools.partial(Router, routing=kwargs.pop("routing", "learned")),
      **kwargs,
  )


@pytest.fixture(scope="module")
def tables():
  rng = np.random.default_rng(5)
  return {
      "light_relpos_bias": rng.normal(size=(1, 32)).astype(np.float32),
      "heavy_relpos_bias": rng.normal(size=(2, 32)).astype(np.float32),
  }


def _expected_attention(x, mask, p, tables, q_idx, q_w, kv_idx, kv_w):
  """Light local attention + λ^q-scaled heavy attention over the routed tokens, in numpy."""
  batch, length, _ = x.shape
  out = np.zeros(x.shape, np.float64)
  positions = np.arange(length)
  for b in range(batch):
    lp = p["light"]["attention"]
    q = np.einsum("le,ehd->lhd", x[b], lp["query"]["kernel"])
    k = np.einsum("le,ehd->lhd", x[b], lp["key"]["kernel"])
    v = np.einsum("le,ehd->lhd", x[b], lp["value"]["kernel"])
    band = np.abs(positions[None, :] - positions[:, None]) <= RADIUS
    allowed = band & mask[b][None, :] & mask[b][:, None]
    light = reference.attention(
        q, k, v, positions_q=positions, positions_k=positions, table=tables["light_relpos_bias"],
        allowed=allowed,
    )
    out[b] = np.einsum("lhd,hde->le", light, lp["out"]["kernel"])

    hp = p["heavy"]
    xq = x[b][q_idx[b]]
    xkv = x[b][kv_idx[b]] * kv_w[b][:, None]  # λ^kv scales the inputs of K and V.
    q = np.einsum("le,ehd->lhd", xq, hp["query"]["kernel"])
    k = np.einsum("le,ehd->lhd", xkv, hp["key"]["kernel"])
    v = np.einsum("le,ehd->lhd", xkv, hp["value"]["kernel"])
    allowed = mask[b][q_idx[b]][:, None] & mask[b][kv_idx[b]][None, :]
    heavy = reference.attention(
        q, k, v, positions_q=q_idx[b], positions_k=kv_idx[b], table=tables["heavy_relpos_bias"],
        allowed=allowed,
    )
    heavy = np.einsum("lhd,hde->le", heavy, hp["out"]["kernel"]) * q_w[b][:, None]
    np.add.at(out[b], q_idx[b], heavy)
  return out


@pytest.fixture(scope="module")
def learned_attention(inputs, tables):
  x, mask = inputs
  module = _attention()
  variables = module.init(jax.random.PRNGKey(2), x, tables=_tables(tables), mask=mask)
  apply = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))
  out, state = apply(variables, x, tables=_tables(tables), mask=mask)
  return _unbox(variables["params"]), np.asarray(out), state["intermediates"]


def test_attention_matches_numpy(inputs, tables, learned_attention):
  x, mask = inputs
  p, got, intermediates = learned_attention
  q_idx = np.asarray(intermediates["q_routed_indices"][0])
  kv_idx = np.asarray(intermediates["kv_routed_indices"][0])
  assert q_idx.shape == (3, LENGTH // 4) and kv_idx.shape == (3, LENGTH // 2)

  def weights(router, indices, k):
    out = []
    for b in range(x.shape[0]):
      scores = x[b].astype(np.float64) @ p[router]["router_weights"]
      lam = reference.soft_top_k(scores, k * 9 / 8, mask=mask[b])
      chosen = _routing_choice(scores, mask[b], k)
      np.testing.assert_array_equal(np.flatnonzero(chosen), indices[b])  # The routers' choice.
      out.append(lam[indices[b]])
    return np.array(out)

  q_w = weights("query_router", q_idx, LENGTH // 4)
  kv_w = weights("kv_router", kv_idx, LENGTH // 2)
  expected = _expected_attention(x, mask, p, tables, q_idx, q_w, kv_idx, kv_w)
  real = mask[..., None]
  np.testing.assert_allclose(got * real, expected * real, rtol=1e-4, atol=1e-5)


def test_attention_all_routed_static_equals_light_plus_full_attention(inputs, tables):
  x, mask = inputs
  module = _attention(routing="static", capacity=RoutingCapacity(fraction=1.0))
  variables = module.init(jax.random.PRNGKey(3), x, tables=_tables(tables), mask=mask)
  p = _unbox(variables["params"])
  got = np.asarray(module.apply(variables, x, tables=_tables(tables), mask=mask))
  everything = np.broadcast_to(np.arange(LENGTH), (3, LENGTH))
  ones = mask.astype(np.float64)
  # With every token routed at weight 1 the heavy branch is plain full attention; the
  # static router lists real tokens first, so compare through the sorted positions.
  order = np.sort(np.argsort(~mask, axis=1, kind="stable"), axis=1)
  expected = _expected_attention(
      x, mask, p, tables, order, np.take_along_axis(ones, order, 1), everything, ones
  )
  real = mask[..., None]
  np.testing.assert_allclose(got * real, expected * real, rtol=1e-4, atol=1e-5)


def test_attention_value_all_tokens_ablation(inputs, tables):
  x, mask = inputs
  module = _attention(route_key_values=False)
  variables = module.init(jax.random.PRNGKey(4), x, tables=_tables(tables), mask=mask)
  p = _unbox(variables["params"])
  assert "kv_router" not in p
  got, state = module.apply(
      variables, x, tables=_tables(tables), mask=mask, mutable=["intermediates"]
  )
  q_idx = np.asarray(state["intermediates"]["q_routed_indices"][0])
  q_w = np.stack([
      reference.soft_top_k(
          x[b].astype(np.float64) @ p["query_router"]["router_weights"], 4 * 9 / 8,
          mask=mask[b],
      )[q_idx[b]]
      for b in range(3)
  ])
  everything = np.broadcast_to(np.arange(LENGTH), (3, LENGTH))
  expected = _expected_attention(
      x, mask, p, tables, q_idx, q_w, everything, np.ones((3, LENGTH))
  )
  real = mask[..., None]
  np.testing.assert_allclose(np.asarray(got) * real, expected * real, rtol=1e-4, atol=1e-5)


def test_attention_shared_router_and_no_heavy_branch(inputs, tables):
  x, mask = inputs
  shared = _attention(share_router=True)
  variables = shared.init(jax.random.PRNGKey(5), x, tables=_tables(tables), mask=mask)
  assert {"router", "light", "heavy"} == set(variables["params"])
  _, state = shared.apply(variables, x, tables=_tables(tables), mask=mask,
                          mutable=["intermediates"])
  q_idx = np.asarray(state["intermediates"]["q_routed_indices"][0])
  kv_idx = np.asarray(state["intermediates"]["kv_routed_indices"][0])
  for b in range(3):
    assert set(q_idx[b]) <= set(kv_idx[b])  # Queries are a subset of the shared choice.

  light_only = _attention(use_heavy_branch=False)
  variables = light_only.init(jax.random.PRNGKey(6), x, tables=_tables(tables), mask=mask)
  assert set(variables["params"]) == {"light"}
  assert light_only.relative_bias_spec() == {"light_relpos_bias": 1}


def test_gradients_reach_every_router(inputs, tables):
  x, mask = inputs
  attn = _attention()
  ff = _ff()
  attn_vars = jax.jit(attn.init)(jax.random.PRNGKey(7), x, tables=_tables(tables), mask=mask)
  ff_vars = jax.jit(ff.init)(jax.random.PRNGKey(8), x, mask=mask)
  target = np.random.default_rng(9).normal(size=x.shape)

  def loss(attn_params, ff_params):
    y = attn.apply({"params": attn_params}, x, tables=_tables(tables), mask=mask)
    y = y + ff.apply({"params": ff_params}, x, mask=mask)
    return jnp.sum((y - target) ** 2)

  # Compiled whole: op by op, the backward pass took most of this file's time.
  grads = _unbox(
      jax.jit(jax.grad(loss, argnums=(0, 1)))(attn_vars["params"], ff_vars["params"])
  )
  for g in (grads[0]["query_router"], grads[0]["kv_router"], grads[1]["router"]):
    norm = np.linalg.norm(g["router_weights"])
    assert np.isfinite(norm) and norm > 1e-6


def test_bfloat16_is_finite_and_routes_in_float32(inputs, tables):
  x, mask = inputs
  attn = _attention(dtype=jnp.bfloat16)
  ff = _ff(dtype=jnp.bfloat16)
  xb = jnp.asarray(x, jnp.bfloat16)
  for module, kwargs in ((attn, {"tables": _tables(tables)}), (ff, {})):
    variables = module.init(jax.random.PRNGKey(0), xb, mask=mask, **kwargs)
    out, state = module.apply(variables, xb, mask=mask, mutable=["intermediates"], **kwargs)
    assert out.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    stats = [v for k, v in state["intermediates"].items() if k.startswith("routing_")]
    assert stats and all(s[0].dtype == jnp.float32 for s in stats)


def test_attention_without_heavy_position_bias(inputs, tables):
  x, mask = inputs
  module = _attention(heavy_position_bias=False)
  assert module.relative_bias_spec() == {"light_relpos_bias": 1}
  light_table = {"light_relpos_bias": tables["light_relpos_bias"]}
  variables = module.init(jax.random.PRNGKey(2), x, tables=_tables(light_table), mask=mask)
  got, state = module.apply(
      variables, x, tables=_tables(light_table), mask=mask, mutable=["intermediates"]
  )
  p = _unbox(variables["params"])
  q_idx = np.asarray(state["intermediates"]["q_routed_indices"][0])
  kv_idx = np.asarray(state["intermediates"]["kv_routed_indices"][0])

  def weights(router, indices, k):
    return np.stack([
        reference.soft_top_k(
            x[b].astype(np.float64) @ p[router]["router_weights"], k * 9 / 8, mask=mask[b]
        )[indices[b]]
        for b in range(x.shape[0])
    ])

  # No position bias in the heavy branch = a heavy table of zeros.
  zero_heavy = dict(tables, heavy_relpos_bias=np.zeros_like(tables["heavy_relpos_bias"]))
  expected = _expected_attention(
      x, mask, p, zero_heavy, q_idx, weights("query_router", q_idx, LENGTH // 4),
      kv_idx, weights("kv_router", kv_idx, LENGTH // 2),
  )
  real = mask[..., None]
  np.testing.assert_allclose(np.asarray(got) * real, expected * real, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="needs the stack's 'heavy_relpos_bias' table"):
    _attention().init(jax.random.PRNGKey(2), x, tables=_tables(light_table), mask=mask)


def test_shared_router_takes_the_highest_scored_queries_despite_saturated_ties():
  # A wide score spread saturates more than the query count at λ = 1: the queries must be
  # the highest-scored of the shared selection, not its lowest positions.
  rng = np.random.default_rng(13)
  length = 64
  x = rng.normal(size=(2, length, EMBED)).astype(np.float32)
  module = _attention(share_router=True, capacity=RoutingCapacity(fraction=1 / 8))
  tables = {
      "light_relpos_bias": np.zeros((1, 32), np.float32),
      "heavy_relpos_bias": np.zeros((2, 32), np.float32),
  }
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x, tables=_tables(tables))
  u = (60.0 * rng.normal(size=(EMBED,))).astype(np.float32)
  params = nn.meta.unbox(variables["params"])
  params["router"]["router_weights"] = jnp.asarray(u)
  _, state = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))(
      {"params": params}, x, tables=_tables(tables)
  )
  q_idx = np.asarray(state["intermediates"]["q_routed_indices"][0])
  kv_idx = np.asarray(state["intermediates"]["kv_routed_indices"][0])
  scores = x.astype(np.float64) @ u
  everything = np.ones(scores.shape, bool)
  lam = reference.soft_top_k(scores, 16 * 9 / 8)
  assert np.all((lam == 1.0).sum(-1) > 8), "the case must saturate more than the 8 queries"
  np.testing.assert_array_equal(kv_idx, reference.hard_top_k(scores, everything, 16))
  np.testing.assert_array_equal(q_idx, reference.hard_top_k(scores, everything, 8))


def test_sum_error_statistic_reports_an_unconverged_soft_top_k(inputs):
  x, mask = inputs
  # The paper's iteration cut to 2 steps on a wide spread misses Σλ = k; the statistic
  # must report |Σλ − k'| / k' (k' = the target capped at the real tokens), averaged.
  module = conditional.ConditionalFeedForward(
      light_mlp_dim=6, heavy_mlp_dim=12, capacity=RoutingCapacity(fraction=1 / 4),
      router_factory=functools.partial(Router, solver="iterative", num_iters=2),
  )
  variables = module.init(jax.random.PRNGKey(1), x, mask=mask)
  params = nn.meta.unbox(variables["params"])
  u = 5.0 * np.ones(EMBED, np.float32)
  params["router"]["router_weights"] = jnp.asarray(u)
  _, state = module.apply({"params": params}, x, mask=mask, mutable=["intermediates"])
  (got,) = state["intermediates"]["routing_mlp_sum_error"]
  target = LENGTH // 4 * 9 / 8
  errors = []
  for b in range(x.shape[0]):
    lam = reference.soft_top_k_iteration(
        x[b].astype(np.float64) @ u, target, num_iters=2, mask=mask[b]
    )
    reachable = min(target, mask[b].sum())
    # Rows whose real tokens number at most k saturate exactly (Σλ = their count).
    total = mask[b].sum() if mask[b].sum() <= target else lam.sum()
    errors.append(abs(total - reachable) / reachable)
  assert np.mean(errors) > 0.05, "the case must be unconverged"
  np.testing.assert_allclose(float(got), np.mean(errors), rtol=1e-4)
  # The default (exact) solver meets the constraint.
  exact = _ff()
  _, state = exact.apply({"params": params}, x, mask=mask, mutable=["intermediates"])
  assert float(state["intermediates"]["routing_mlp_sum_error"][0]) < 1e-5
