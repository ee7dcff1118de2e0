"""Tests of colt5_flax.layers.routing against plain numpy references.

References (tests/reference.py): the soft top-k of CoLT5 §3.3 as a float64 numpy loop
(tests/layers/test_soft_top_k.py checks colt5_flax's solvers against it); numpy
argsort for the hard top-k; numpy loops for gather/scatter and for static routing; and
float64 finite differences for gradients.
"""

import functools

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax.layers.routing import (
    Router,
    RoutingCapacity,
    gather_tokens,
    routing_capacity,
    scatter_add_tokens,
)
from tests import reference
from tests.layers.test_soft_top_k import F32_EPS, lambda_tolerance

# ----------------------------------------------------------------------------------------
# Router

BATCH, LENGTH, EMBED, NUM_SELECTED, TARGET = 4, 16, 8, 4, 4.5


def _router_inputs():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(BATCH, LENGTH, EMBED)).astype(np.float32)
  router_weights = (0.6 * rng.normal(size=(EMBED,))).astype(np.float32)
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1, 10:] = False  # suffix padding
  mask[2, :] = False
  mask[2, [3, 11]] = True  # only 2 real tokens (< NUM_SELECTED), not a prefix
  mask[3, ::3] = False  # holes
  return x, router_weights, mask


def _scores(x, router_weights):
  return np.einsum("ble,e->bl", np.asarray(x, np.float64), np.asarray(router_weights, np.float64))


@pytest.fixture(scope="module")
def learned_router():
  """(module, variables with a known u, jitted apply)."""
  x, router_weights, _ = _router_inputs()
  module = Router(NUM_SELECTED, soft_top_k_target=TARGET)
  variables = {"params": {"router_weights": jnp.asarray(router_weights)}}
  apply = jax.jit(lambda v, x, mask: module.apply(v, x, mask))
  return module, variables, apply


@pytest.mark.parametrize("init_scale", [1.0, 3.0])
def test_router_parameter_has_logical_axes_and_its_initial_scale(init_scale):
  module = Router(NUM_SELECTED, init_scale=init_scale)
  boxed = module.init(jax.random.PRNGKey(0), jnp.zeros((1, LENGTH, 1024)))
  boxed = boxed["params"]["router_weights"]
  assert isinstance(boxed, nn.LogicallyPartitioned)
  assert boxed.names == ("embed",) and boxed.value.shape == (1024,)
  assert boxed.value.dtype == jnp.float32
  # Documented init: normal, std init_scale/sqrt(embed). 1024 draws: the sample std's
  # relative error has std 1/sqrt(2·1024) ≈ 2.2%; 5 of those is the bound.
  values = np.asarray(boxed.value)
  np.testing.assert_allclose(np.std(values), init_scale / 32, rtol=5 / np.sqrt(2048))
  assert abs(np.mean(values)) < 5 * init_scale / 32 / 32  # mean's std: σ/sqrt(1024)


def test_router_selects_top_k_of_reference_soft_top_k(learned_router):
  _, variables, apply = learned_router
  x, router_weights, mask = _router_inputs()
  out = apply(variables, jnp.asarray(x), jnp.asarray(mask))

  scores = _scores(x, router_weights)
  expected_soft = reference.soft_top_k(scores, TARGET, mask=mask)
  expected_indices = reference.hard_top_k(scores, mask, NUM_SELECTED)
  tolerance = lambda_tolerance(scores, 1.0)

  assert out.indices.dtype == jnp.int32 and out.indices.shape == (BATCH, NUM_SELECTED)
  assert out.weights.dtype == jnp.float32 and out.soft_weights.shape == (BATCH, LENGTH)
  np.testing.assert_allclose(out.soft_weights, expected_soft, rtol=0, atol=tolerance)
  np.testing.assert_array_equal(out.indices, expected_indices)
  np.testing.assert_allclose(
      out.weights, np.take_along_axis(expected_soft, expected_indices, axis=-1), rtol=0,
      atol=tolerance,
  )
  # |Σλ − min(k, real tokens)| / that: 0 up to rounding, 0 exactly for no real token.
  assert out.sum_error.shape == (BATCH,)
  np.testing.assert_array_less(np.asarray(out.sum_error), LENGTH * tolerance)
  indices, weights = np.asarray(out.indices), np.asarray(out.weights)
  for row in range(BATCH):
    selected_real = mask[row, indices[row]]
    num_real = mask[row].sum()
    # Padding is selected only once every real token is.
    assert selected_real.sum() == min(NUM_SELECTED, num_real)
    # Selected padding has weight exactly 0 (row 2 has 2 real tokens for 4 selections).
    np.testing.assert_array_equal(weights[row][~selected_real], 0.0)
  assert (~mask[2, indices[2]]).sum() == 2


def test_router_ranks_saturated_ties_by_score():
  # A target above the routed count (9/8·k) saturates more than k tokens at λ = 1 when
  # the scores spread. Ranking those ties by λ would pick the lowest positions; the
  # router must pick the highest scores.
  rng = np.random.default_rng(12)
  embed, length, num_selected = 4, 128, 16
  x = rng.normal(size=(2, length, embed)).astype(np.float32)
  router_weights = (60.0 * rng.normal(size=(embed,))).astype(np.float32)
  out = Router(num_selected, soft_top_k_target=9 / 8 * num_selected).apply(
      {"params": {"router_weights": jnp.asarray(router_weights)}}, jnp.asarray(x)
  )
  soft = np.asarray(out.soft_weights)
  assert np.all((soft == 1.0).sum(-1) > num_selected), "the case must saturate > k tokens"
  mask = np.ones((2, length), bool)
  scores = _scores(x, router_weights)
  expected = reference.hard_top_k(scores, mask, num_selected)
  assert not np.array_equal(reference.hard_top_k(soft, mask, num_selected), expected), (
      "ranking by λ must differ here, or the case does not test the tie-break"
  )
  np.testing.assert_array_equal(out.indices, expected)


def test_router_gradient_matches_finite_differences(learned_router):
  module, variables, _ = learned_router
  x, router_weights, mask = _router_inputs()
  rng = np.random.default_rng(9)
  cotangent = rng.normal(size=(BATCH, NUM_SELECTED))

  def loss(u):
    params = {"params": {"router_weights": u}}
    out = module.apply(params, jnp.asarray(x), jnp.asarray(mask))
    return jnp.sum(out.weights * cotangent), out.indices

  (_, indices), gradient = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(router_weights))
  indices = np.asarray(indices)

  def reference_loss(u):
    soft = reference.soft_top_k(_scores(x, u), TARGET, mask=mask)
    return np.sum(np.take_along_axis(soft, indices, axis=-1) * cotangent)

  expected = reference.central_differences(reference_loss, router_weights, step=1e-6)
  assert np.linalg.norm(expected) > 1e-2
  # ∂L/∂u = Σ_b,l (∂L/∂s_bl) x_bl: the scores' bound, summed with |x|'s weights.
  scores = _scores(x, router_weights)
  tolerance = lambda_tolerance(scores, 1.0) * np.abs(cotangent).sum() * np.abs(x).max()
  np.testing.assert_allclose(gradient, expected, rtol=0, atol=tolerance)


def test_router_prefers_real_tokens_whose_weight_underflowed_to_zero():
  # Real tokens at positions 5, 6, 7; position 7's λ underflows to exactly 0, and the
  # padding before it must still lose the tie.
  x = np.zeros((1, 8, 1), np.float32)
  x[0, 5:, 0] = [1.0, 2.0, -1e4]
  mask = np.zeros((1, 8), bool)
  mask[0, 5:] = True
  out = Router(3, soft_top_k_target=1.0).apply(
      {"params": {"router_weights": jnp.ones((1,))}}, jnp.asarray(x), jnp.asarray(mask)
  )
  assert float(out.weights[0, 2]) == 0.0
  np.testing.assert_array_equal(out.indices, [[5, 6, 7]])


def test_router_bfloat16_input_gives_float32_weights(learned_router):
  _, variables, apply = learned_router
  x, router_weights, mask = _router_inputs()
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  out = apply(variables, x_bf16, jnp.asarray(mask))
  assert out.weights.dtype == jnp.float32 and out.soft_weights.dtype == jnp.float32
  scores = _scores(x_bf16, router_weights)
  expected_soft = reference.soft_top_k(scores, TARGET, mask=mask)
  # Scores are float32 dot products of EMBED terms (≤ EMBED ulps of Σ|x·u|) before the
  # solver's own bound.
  score_error = EMBED * F32_EPS * np.abs(np.asarray(x_bf16, np.float64)).max() * np.abs(
      router_weights
  ).sum()
  np.testing.assert_allclose(
      out.soft_weights, expected_soft, rtol=0,
      atol=lambda_tolerance(scores, 1.0) + 2 * score_error,
  )


def test_router_iterative_solver_with_eps_scaling_and_no_mask():
  x, router_weights, _ = _router_inputs()
  module = Router(3, epsilon=0.5, solver="iterative", num_iters=20, eps_init=4.0)
  variables = {"params": {"router_weights": jnp.asarray(router_weights)}}
  out = module.apply(variables, jnp.asarray(x))
  scores = _scores(x, router_weights)
  expected_soft = reference.soft_top_k_iteration(
      scores, 3, epsilon=0.5, num_iters=20, eps_init=4.0
  )
  np.testing.assert_allclose(
      out.soft_weights, expected_soft, rtol=0, atol=lambda_tolerance(scores, 0.5, 20)
  )
  np.testing.assert_array_equal(
      out.indices, reference.hard_top_k(scores, np.ones(scores.shape, bool), 3)
  )


def reference_static_routing(mask, num_selected):
  indices, weights = [], []
  for row_mask in mask:
    real = [i for i in range(len(row_mask)) if row_mask[i]]
    padding = [i for i in range(len(row_mask)) if not row_mask[i]]
    if len(real) >= num_selected:
      chosen = [real[(j * len(real)) // num_selected] for j in range(num_selected)]
    else:
      chosen = real + padding[: num_selected - len(real)]
    chosen = sorted(chosen)
    indices.append(chosen)
    weights.append([1.0 if row_mask[i] else 0.0 for i in chosen])
  return np.array(indices), np.array(weights)


def test_static_routing_is_evenly_spaced_over_real_tokens():
  x, _, mask = _router_inputs()
  module = Router(NUM_SELECTED, routing="static")
  variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(mask))
  assert not jax.tree_util.tree_leaves(variables), "static routing has no parameter"
  out = module.apply(variables, jnp.asarray(x), jnp.asarray(mask))
  expected_indices, expected_weights = reference_static_routing(mask, NUM_SELECTED)
  np.testing.assert_array_equal(out.indices, expected_indices)
  np.testing.assert_array_equal(out.weights, expected_weights)
  expected_soft = np.zeros((BATCH, LENGTH), np.float32)
  np.put_along_axis(expected_soft, expected_indices, expected_weights, axis=-1)
  np.testing.assert_array_equal(out.soft_weights, expected_soft)
  # Row 0 (16 real tokens, 4 selected): positions 0, 4, 8, 12 by hand.
  np.testing.assert_array_equal(out.indices[0], [0, 4, 8, 12])
  # Uneven: 10 real tokens, 7 selected -> ranks floor(j·10/7) = 0, 1, 2, 4, 5, 7, 8.
  out = Router(7, routing="static").apply({}, jnp.asarray(x[1:2]), jnp.asarray(mask[1:2]))
  np.testing.assert_array_equal(out.indices[0], [0, 1, 2, 4, 5, 7, 8])


@pytest.fixture(scope="module")
def random_router_apply():
  module = Router(NUM_SELECTED, routing="random")

  @functools.partial(jax.jit, static_argnames="deterministic")
  def apply(x, mask, key, deterministic):
    rngs = None if deterministic else {"routing": key}
    return module.apply({}, x, mask, deterministic=deterministic, rngs=rngs)

  return module, apply


def test_random_routing_draws_distinct_real_positions(random_router_apply):
  module, apply = random_router_apply
  x, _, mask = _router_inputs()
  x, mask_j = jnp.asarray(x), jnp.asarray(mask)
  first = apply(x, mask_j, jax.random.PRNGKey(1), False)
  second = apply(x, mask_j, jax.random.PRNGKey(2), False)
  assert not np.array_equal(first.indices, second.indices)
  for out in (first, second):
    indices, weights = np.asarray(out.indices), np.asarray(out.weights)
    for row in range(BATCH):
      assert np.all(np.diff(indices[row]) > 0), "sorted and distinct"
      selected_real = mask[row, indices[row]]
      assert selected_real.sum() == min(NUM_SELECTED, mask[row].sum())
      np.testing.assert_array_equal(weights[row], selected_real.astype(np.float32))
  # Deterministic: a fixed key, no rng needed, same answer every call.
  fixed = apply(x, mask_j, None, True)
  again = module.apply({}, x, mask_j, deterministic=True)
  np.testing.assert_array_equal(fixed.indices, again.indices)
  with pytest.raises(flax.errors.InvalidRngError):
    module.apply({}, x, mask_j, deterministic=False)


def test_random_routing_is_uniform_over_real_tokens(random_router_apply):
  _, apply = random_router_apply
  x, _, mask = _router_inputs()
  num_draws = 2000
  keys = jax.random.split(jax.random.PRNGKey(3), num_draws)
  out = jax.vmap(lambda key: apply(jnp.asarray(x[:2]), jnp.asarray(mask[:2]), key, False))(
      keys
  )
  counts = np.zeros((2, LENGTH))
  for row in range(2):
    np.add.at(counts[row], np.asarray(out.indices[:, row]).ravel(), 1)
    num_real = mask[row].sum()
    expected = num_draws * NUM_SELECTED / num_real
    # Binomial std ≈ sqrt(expected) ≤ 23; 6 std of slack.
    np.testing.assert_allclose(counts[row][mask[row]], expected, atol=6 * np.sqrt(expected))
    np.testing.assert_array_equal(counts[row][~mask[row]], 0)


@pytest.mark.parametrize(
    "kwargs,attribute",
    [
        (dict(num_selected=0), "num_selected=0"),
        (dict(num_selected=2.0), "num_selected=2.0"),
        (dict(routing="sinkhorn"), "routing='sinkhorn'"),
        (dict(soft_top_k_target=0.0), "soft_top_k_target=0.0"),
        (dict(epsilon=0.0), "epsilon=0.0"),
        (dict(epsilon=float("nan")), "epsilon=nan"),
        (dict(solver="sinkhorn"), "solver='sinkhorn'"),
        (dict(num_iters=0), "num_iters=0"),
        (dict(eps_init=4.0), "eps_init=4.0"),  # ε-scaling without the iterative solver
        (dict(solver="iterative", eps_init=0.5), "eps_init=0.5"),  # below epsilon = 1
        (dict(solver="iterative", eps_init=4.0, eps_decay=1.0), "eps_decay=1.0"),
        (dict(init_scale=-1.0), "init_scale=-1.0"),
    ],
)
def test_router_rejects_bad_settings_when_built(kwargs, attribute):
  # At construction, before any input: a bad gin binding fails where the router is made,
  # and the message names the binding to fix.
  kwargs = {"num_selected": 2, **kwargs}
  name = attribute.split("=")[0]
  with pytest.raises(ValueError, match=rf"Router\.{attribute}.*routing\.Router\.{name}\)"):
    Router(**kwargs)


def test_router_settings_the_architecture_file_binds_are_accepted():
  # configs/architectures/colt5.gin's values, and the iterative solver with ε-scaling.
  Router(2, routing="learned", epsilon=1.0, solver="exact", num_iters=50, init_scale=1.0)
  Router(2, epsilon=0.5, solver="iterative", num_iters=20, eps_init=4.0, eps_decay=0.7)
  Router(np.int64(3), soft_top_k_target=3.375, routing="static")


def test_router_rejects_more_tokens_than_the_input_has():
  with pytest.raises(ValueError, match=f"num_selected={LENGTH + 1}"):
    Router(LENGTH + 1).init(jax.random.PRNGKey(0), jnp.zeros((1, LENGTH, EMBED)))


def test_router_rejects_mismatched_mask():
  with pytest.raises(ValueError, match="mask shape"):
    Router(2).init(jax.random.PRNGKey(0), jnp.zeros((1, LENGTH, EMBED)), jnp.ones((1, 3), bool))


# ----------------------------------------------------------------------------------------
# gather / scatter


def test_gather_tokens_matches_numpy_loop():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 7, 3, 2)).astype(np.float32)
  indices = np.array([[6, 0, 3, 3], [1, 2, 5, 4]], np.int32)
  expected = np.zeros((2, 4, 3, 2), np.float32)
  for b in range(2):
    for j in range(4):
      expected[b, j] = x[b, indices[b, j]]
  np.testing.assert_array_equal(gather_tokens(jnp.asarray(x), jnp.asarray(indices)), expected)
  out = gather_tokens(jnp.asarray(x, jnp.bfloat16), jnp.asarray(indices))
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 3, 2)


def test_scatter_add_tokens_matches_numpy_loop_with_duplicates():
  rng = np.random.default_rng(4)
  updates = rng.normal(size=(2, 4, 3)).astype(np.float32)
  indices = np.array([[6, 0, 6, 6], [1, 2, 5, 4]], np.int32)
  expected = np.zeros((2, 7, 3), np.float32)
  for b in range(2):
    for j in range(4):
      expected[b, indices[b, j]] += updates[b, j]
  out = scatter_add_tokens(jnp.asarray(updates), jnp.asarray(indices), 7)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert out.dtype == jnp.float32 and out.shape == (2, 7, 3)


def test_gather_transpose_is_scatter_add():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 5, 3)).astype(np.float32)
  indices = jnp.asarray([[4, 4, 1], [0, 2, 3]], jnp.int32)
  cotangent = rng.normal(size=(2, 3, 3)).astype(np.float32)
  _, vjp = jax.vjp(lambda x: gather_tokens(x, indices), jnp.asarray(x))
  expected = np.zeros_like(x)
  for b in range(2):
    for j in range(3):
      expected[b, int(indices[b, j])] += cotangent[b, j]
  np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], expected, rtol=1e-6)


def test_gather_scatter_reject_bad_shapes():
  with pytest.raises(ValueError, match="indices"):
    gather_tokens(jnp.zeros((2, 5, 3)), jnp.zeros((3, 2), jnp.int32))
  with pytest.raises(ValueError, match="integers"):
    gather_tokens(jnp.zeros((2, 5, 3)), jnp.zeros((2, 2), jnp.float32))
  with pytest.raises(ValueError, match="length=0"):
    scatter_add_tokens(jnp.zeros((2, 2, 3)), jnp.zeros((2, 2), jnp.int32), 0)


# ----------------------------------------------------------------------------------------
# routing_capacity


@pytest.mark.parametrize(
    "args,kwargs,expected",
    [
        ((4096, 1 / 16), {}, 256),  # fine-tuning m (CoLT5 §3.3)
        ((4096, 1 / 8), {}, 512),  # pre-training: 512 of 4096
        ((4096, 1 / 16 * 9 / 8), {}, 288),  # the paper's 9/8·k training option
        ((30, 0.1), {}, 3),  # 0.1·30 = 3.0000000000000004 in floats: not 2, not 4
        ((100, 1 / 16), {}, 6),  # floor(6.25)
        ((10, 0.01), {}, 1),  # at least 1
        ((65536, 1 / 16), dict(max_tokens=2048), 2048),  # beyond 32k, m stays at 2048
        ((16384, 1 / 16), dict(max_tokens=2048), 1024),
        ((100, 1 / 16), dict(multiple_of=4), 4),  # 6 rounded down to a multiple of 4
        ((100, 1 / 64), dict(multiple_of=4), 4),  # never below one multiple
        ((3, 1.0, None, 8), {}, 3),  # never above length
        ((7, 1.0), {}, 7),
    ],
)
def test_routing_capacity_by_hand(args, kwargs, expected):
  assert routing_capacity(*args, **kwargs) == expected


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 0.5), "length=0"),
        ((16, 0.0), "fraction=0.0"),
        ((16, 1.5), "fraction=1.5"),
        ((16, float("nan")), "fraction=nan"),
        ((16, 0.5, 0), "max_tokens=0"),
        ((16, 0.5, 4, 8), "max_tokens=4"),
        ((16, 0.5, None, 0), "multiple_of=0"),
    ],
)
def test_routing_capacity_rejects_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    routing_capacity(*args)


@pytest.mark.parametrize(
    "capacity,length,expected",
    [
        # CoLT5 §3.3 by hand: fine-tuning m = n/16 and 2m; pretraining m = n/8 (512 of 4096).
        (RoutingCapacity(), 16384, (1024, 2048)),
        (RoutingCapacity(), 8192, (512, 1024)),
        (RoutingCapacity(fraction=1 / 8), 4096, (512, 1024)),
        # Beyond 32k the counts stay at their 32k values: 2048 and 4096.
        (RoutingCapacity(), 32768, (2048, 4096)),
        (RoutingCapacity(), 65536, (2048, 4096)),
        (RoutingCapacity(max_length=None), 65536, (4096, 8192)),
        # Table 6: m = 512 and 1536 at 16k; "v = q".
        (RoutingCapacity(fraction=1 / 32), 16384, (512, 1024)),
        (RoutingCapacity(fraction=3 / 32), 16384, (1536, 3072)),
        (RoutingCapacity(kv_ratio=1.0), 16384, (1024, 1024)),
        # Everything routed: the key/value fraction caps at 1.
        (RoutingCapacity(fraction=1.0), 512, (512, 512)),
        (RoutingCapacity(fraction=0.75), 16, (12, 16)),
    ],
)
def test_routing_capacity_counts_by_hand(capacity, length, expected):
  assert (capacity.count(length), capacity.count(length, key_values=True)) == expected


def test_routing_capacity_training_factor_and_soft_target():
  capacity = RoutingCapacity(fraction=1 / 4, train_capacity_factor=1.5)
  # 16 tokens: m = 4, kv 8; the soft top-k targets 9/8 of the base count (4.5, 9).
  assert capacity.routed(16) == (4, 4.5)
  assert capacity.routed(16, key_values=True) == (8, 9.0)
  assert capacity.routed(16, training=True) == (6, 4.5)
  assert capacity.routed(16, key_values=True, training=True) == (12, 9.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fraction=0.0), "fraction=0.0"),
        (dict(fraction=1.5), "fraction=1.5"),
        (dict(kv_ratio=0.0), "kv_ratio=0.0"),
        (dict(max_length=0), "max_length=0"),
        (dict(soft_top_k_factor=0.0), "soft_top_k_factor=0.0"),
    ],
)
def test_routing_capacity_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    RoutingCapacity(**kwargs)
