"""Tests of colt5_flax.layers.routing against plain numpy references.

References: the soft top-k iteration written as a float64 numpy loop that drops masked
entries (rather than masking them), the converged soft top-k solved independently by
bisection on its KKT conditions, numpy argsort for the hard top-k, numpy loops for
gather/scatter and for static routing, and float64 finite differences for gradients.
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
    gather_tokens,
    routing_capacity,
    scatter_add_tokens,
    soft_top_k,
)

# ----------------------------------------------------------------------------------------
# References.


def reference_soft_top_k(scores, k, *, epsilon, num_iters, mask=None, eps_init=None,
                         eps_decay=0.7):
  """ALIGNER / CoDA iteration (SPEC §1.1), float64, one row at a time, masked entries
  removed from the row instead of set to −inf."""
  scores = np.asarray(scores, np.float64)
  mask = np.ones(scores.shape, bool) if mask is None else np.broadcast_to(mask, scores.shape)
  weights = np.zeros_like(scores)
  for row in np.ndindex(scores.shape[:-1]):
    valid = mask[row]
    row_scores = scores[row][valid]
    if row_scores.size == 0:
      continue
    a, b = 0.0, np.zeros_like(row_scores)
    for t in range(num_iters):
      eps = epsilon if eps_init is None else max(eps_init * eps_decay**t, epsilon)
      logits = (row_scores + b) / eps
      top = logits.max()
      a = eps * np.log(k) - eps * (top + np.log(np.sum(np.exp(logits - top))))
      b = np.minimum(-row_scores - a, 0.0)
    row_weights = np.zeros(scores.shape[-1])
    row_weights[valid] = np.exp((row_scores + b + a) / eps)
    weights[row] = row_weights
  return weights


def kkt_soft_top_k(row_scores, k, epsilon):
  """Converged solution by its optimality conditions: λ_i = min(1, exp((s_i + a)/ε)) with
  a found by bisection so that Σ λ = k (requires k < len(row_scores))."""
  row_scores = np.asarray(row_scores, np.float64)

  def total(a):
    return np.minimum(1.0, np.exp((row_scores + a) / epsilon)).sum()

  low, high = -row_scores.max() - 50 * epsilon, -row_scores.min() + 50 * epsilon
  for _ in range(200):
    middle = 0.5 * (low + high)
    low, high = (middle, high) if total(middle) < k else (low, middle)
  return np.minimum(1.0, np.exp((row_scores + 0.5 * (low + high)) / epsilon))


def reference_hard_top_k(soft_weights, mask, num_selected):
  """Indices of the num_selected largest λ (padding last, ties to the lower position),
  sorted ascending. λ is rounded to 1e-9 so float64 ulps do not split exact ties."""
  indices = []
  for row_weights, row_mask in zip(soft_weights, mask, strict=True):
    keys = np.where(row_mask, np.round(row_weights, 9), -1.0)
    indices.append(np.sort(np.argsort(-keys, kind="stable")[:num_selected]))
  return np.stack(indices)


# ----------------------------------------------------------------------------------------
# soft_top_k


@pytest.fixture(scope="module")
def jitted_soft_top_k():
  return jax.jit(
      soft_top_k, static_argnames=("k", "epsilon", "num_iters", "eps_init", "eps_decay")
  )


SOFT_TOP_K_CASES = [
    # shape, k, epsilon, num_iters, eps_init, masked
    ((7,), 3, 1.0, 50, None, False),
    ((7,), 4.5, 1.0, 1, None, False),
    ((2, 3, 16), 4.5, 0.3, 50, None, True),
    ((4, 16), 2, 1.0, 5, None, True),
    ((4, 16), 9 / 8 * 3, 1.0, 20, 4.0, True),
    ((4, 16), 3, 0.5, 20, 4.0, False),
    ((3, 8), 2, 1.0, 3, 4.0, True),  # schedule stops above its floor: λ uses ε = 1.96
]


@pytest.mark.parametrize("shape,k,epsilon,num_iters,eps_init,masked", SOFT_TOP_K_CASES)
def test_soft_top_k_matches_numpy_iteration(
    jitted_soft_top_k, shape, k, epsilon, num_iters, eps_init, masked
):
  rng = np.random.default_rng(len(shape) * 100 + num_iters)
  scores = (2.0 * rng.normal(size=shape)).astype(np.float32)
  mask = rng.random(shape) < 0.7 if masked else None
  if masked:
    mask.reshape(-1, shape[-1])[0] = False  # one all-padding row
  weights = jitted_soft_top_k(
      scores, k, epsilon=epsilon, num_iters=num_iters, mask=mask, eps_init=eps_init
  )
  expected = reference_soft_top_k(
      scores, k, epsilon=epsilon, num_iters=num_iters, mask=mask, eps_init=eps_init
  )
  assert weights.dtype == jnp.float32 and weights.shape == shape
  np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=2e-6)
  weights = np.asarray(weights)
  assert np.all(weights >= 0.0) and np.all(weights <= 1.0)
  if masked:
    assert np.all(weights[~mask] == 0.0)


@pytest.mark.parametrize("k,epsilon", [(3, 1.0), (4.5, 0.5), (20 / 3, 1.0)])
def test_soft_top_k_converges_to_kkt_solution(jitted_soft_top_k, k, epsilon):
  rng = np.random.default_rng(7)
  scores = (2.0 * rng.normal(size=(3, 24))).astype(np.float32)
  weights = np.asarray(jitted_soft_top_k(scores, k, epsilon=epsilon, num_iters=200))
  np.testing.assert_allclose(weights.sum(-1), k, rtol=1e-5)
  for row_scores, row_weights in zip(scores, weights, strict=True):
    np.testing.assert_allclose(row_weights, kkt_soft_top_k(row_scores, k, epsilon), atol=1e-5)


def test_soft_top_k_paper_setting_sums_to_k_and_keeps_order(jitted_soft_top_k):
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(2, 256)).astype(np.float32)
  mask = np.ones(scores.shape, bool)
  mask[1, 200:] = False
  weights = np.asarray(jitted_soft_top_k(scores, 16, mask=mask))  # ε = 1, 50 iterations
  np.testing.assert_allclose(weights.sum(-1), 16.0, rtol=1e-4)
  for row_scores, row_weights, row_mask in zip(scores, weights, mask, strict=True):
    order = np.argsort(row_scores[row_mask])
    assert np.all(np.diff(row_weights[row_mask][order]) >= 0.0), "higher score, lower λ"


def test_soft_top_k_saturates_when_k_exceeds_unmasked(jitted_soft_top_k):
  scores = np.array([[3.0, -2.0, 0.5, 10.0, -7.0, 1.0]], np.float32)
  mask = np.array([[True, True, False, True, False, False]])
  weights = np.asarray(jitted_soft_top_k(scores, 4, mask=mask))  # 3 unmasked < k = 4
  np.testing.assert_array_equal(weights, mask.astype(np.float32))
  # Exactly as many unmasked as k: converges to all ones too.
  weights = np.asarray(jitted_soft_top_k(scores, 3, mask=mask, num_iters=200))
  np.testing.assert_allclose(weights, mask.astype(np.float32), atol=1e-4)
  # k larger than the whole static length.
  weights = np.asarray(jitted_soft_top_k(scores, 9.5))
  np.testing.assert_array_equal(weights, np.ones_like(scores))


def test_soft_top_k_all_masked_and_extreme_scores_have_no_nan():
  scores = np.array(
      [[1.0, 2.0, 3.0, 4.0], [-1e4, 5.0, 1e4, -3.0], [0.5, -0.5, 2.0, 1.0]], np.float32
  )
  mask = np.array([[False] * 4, [True, True, True, False], [True, False, True, True]])
  cotangent = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.0

  def loss(s):
    return jnp.sum(soft_top_k(s, 1.5, mask=mask, num_iters=50) * cotangent)

  weights = soft_top_k(scores, 1.5, mask=mask)
  gradient = jax.grad(loss)(jnp.asarray(scores))
  assert np.all(np.isfinite(weights)) and np.all(np.isfinite(gradient))
  np.testing.assert_array_equal(weights[0], 0.0)
  np.testing.assert_array_equal(np.asarray(weights)[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(gradient)[~mask], 0.0)
  # ε-scaling path too.
  gradient = jax.grad(
      lambda s: jnp.sum(soft_top_k(s, 1.5, mask=mask, num_iters=10, eps_init=4.0) * cotangent)
  )(jnp.asarray(scores))
  assert np.all(np.isfinite(gradient))


def test_soft_top_k_gradient_matches_finite_differences():
  rng = np.random.default_rng(11)
  scores = rng.normal(size=(2, 9)).astype(np.float32)
  mask = np.ones(scores.shape, bool)
  mask[1, [2, 5]] = False
  cotangent = rng.normal(size=scores.shape)
  kwargs = dict(epsilon=0.7, num_iters=30, mask=mask)

  gradient = jax.grad(lambda s: jnp.sum(soft_top_k(s, 2.5, **kwargs) * cotangent))(
      jnp.asarray(scores)
  )

  def reference_loss(s):
    return np.sum(reference_soft_top_k(s, 2.5, **kwargs) * cotangent)

  step = 1e-6
  expected = np.zeros(scores.shape)
  for index in np.ndindex(scores.shape):
    delta = np.zeros(scores.shape)
    delta[index] = step
    expected[index] = (reference_loss(scores + delta) - reference_loss(scores - delta)) / (
        2 * step
    )
  np.testing.assert_allclose(gradient, expected, rtol=1e-3, atol=1e-5)
  assert np.any(np.abs(expected) > 1e-2)


def test_soft_top_k_bfloat16_scores_give_float32():
  scores = jnp.asarray([[0.5, 2.0, -1.0, 3.0]], jnp.bfloat16)
  weights = soft_top_k(scores, 2)
  assert weights.dtype == jnp.float32
  expected = reference_soft_top_k(np.asarray(scores, np.float32), 2, epsilon=1.0, num_iters=50)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k=0"),
        (dict(k=-2.0), "k=-2.0"),
        (dict(k=float("nan")), "k=nan"),
        (dict(k=2, epsilon=0.0), "epsilon=0.0"),
        (dict(k=2, num_iters=0), "num_iters=0"),
        (dict(k=2, eps_init=0.5), "eps_init=0.5"),
        (dict(k=2, eps_init=4.0, eps_decay=1.0), "eps_decay=1.0"),
        (dict(k=2, mask=np.ones((3,), bool)), "mask shape"),
    ],
)
def test_soft_top_k_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    soft_top_k(np.zeros((2, 4), np.float32), **kwargs)


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


@pytest.fixture(scope="module")
def learned_router():
  """(module, variables with a known u, jitted apply)."""
  x, router_weights, _ = _router_inputs()
  module = Router(NUM_SELECTED, soft_top_k_target=TARGET)
  variables = {"params": {"router_weights": jnp.asarray(router_weights)}}
  apply = jax.jit(lambda v, x, mask: module.apply(v, x, mask))
  return module, variables, apply


def test_router_parameter_has_logical_axes(learned_router):
  module, _, _ = learned_router
  x, _, _ = _router_inputs()
  boxed = module.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]["router_weights"]
  assert isinstance(boxed, nn.LogicallyPartitioned)
  assert boxed.names == ("embed",) and boxed.value.shape == (EMBED,)
  assert boxed.value.dtype == jnp.float32
  fresh = module.init(jax.random.PRNGKey(1), jnp.zeros((1, LENGTH, 256)))
  # Documented init: std 1/sqrt(embed) (256 draws: the sample std is within ~20%).
  std = float(np.std(np.asarray(fresh["params"]["router_weights"].value)))
  assert 0.8 / 16 < std < 1.2 / 16


def test_router_selects_top_k_of_reference_soft_top_k(learned_router):
  _, variables, apply = learned_router
  x, router_weights, mask = _router_inputs()
  out = apply(variables, jnp.asarray(x), jnp.asarray(mask))

  scores = np.einsum("ble,e->bl", x.astype(np.float64), router_weights.astype(np.float64))
  expected_soft = reference_soft_top_k(scores, TARGET, epsilon=1.0, num_iters=50, mask=mask)
  expected_indices = reference_hard_top_k(expected_soft, mask, NUM_SELECTED)

  assert out.indices.dtype == jnp.int32 and out.indices.shape == (BATCH, NUM_SELECTED)
  assert out.weights.dtype == jnp.float32 and out.soft_weights.shape == (BATCH, LENGTH)
  np.testing.assert_allclose(out.soft_weights, expected_soft, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(out.indices, expected_indices)
  np.testing.assert_allclose(
      out.weights, np.take_along_axis(expected_soft, expected_indices, axis=-1), rtol=1e-4,
      atol=1e-6,
  )
  indices, weights = np.asarray(out.indices), np.asarray(out.weights)
  for row in range(BATCH):
    selected_real = mask[row, indices[row]]
    num_real = mask[row].sum()
    # Padding is selected only once every real token is.
    assert selected_real.sum() == min(NUM_SELECTED, num_real)
    # Selected padding has weight exactly 0 (row 2 has 2 real tokens for 4 selections).
    np.testing.assert_array_equal(weights[row][~selected_real], 0.0)
  assert (~mask[2, indices[2]]).sum() == 2


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
    scores = np.einsum("ble,e->bl", x.astype(np.float64), u)
    soft = reference_soft_top_k(scores, TARGET, epsilon=1.0, num_iters=50, mask=mask)
    return np.sum(np.take_along_axis(soft, indices, axis=-1) * cotangent)

  step = 1e-6
  expected = np.zeros(EMBED)
  for i in range(EMBED):
    delta = np.zeros(EMBED)
    delta[i] = step
    u = router_weights.astype(np.float64)
    expected[i] = (reference_loss(u + delta) - reference_loss(u - delta)) / (2 * step)
  assert np.linalg.norm(expected) > 1e-2
  np.testing.assert_allclose(gradient, expected, rtol=2e-3, atol=1e-5)


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
  scores = np.einsum("ble,e->bl", np.asarray(x_bf16, np.float64), router_weights)
  expected_soft = reference_soft_top_k(scores, TARGET, epsilon=1.0, num_iters=50, mask=mask)
  np.testing.assert_allclose(out.soft_weights, expected_soft, rtol=1e-4, atol=1e-6)


def test_router_without_mask_and_default_target():
  x, router_weights, _ = _router_inputs()
  module = Router(3, epsilon=0.5, num_iters=20, eps_init=4.0)
  variables = {"params": {"router_weights": jnp.asarray(router_weights)}}
  out = module.apply(variables, jnp.asarray(x))
  scores = np.einsum("ble,e->bl", x.astype(np.float64), router_weights.astype(np.float64))
  expected_soft = reference_soft_top_k(scores, 3, epsilon=0.5, num_iters=20, eps_init=4.0)
  np.testing.assert_allclose(out.soft_weights, expected_soft, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(
      out.indices, reference_hard_top_k(expected_soft, np.ones_like(expected_soft, bool), 3)
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
    "router,match",
    [
        (Router(0), "num_selected=0"),
        (Router(LENGTH + 1), f"num_selected={LENGTH + 1}"),
        (Router(2, routing="sinkhorn"), "routing='sinkhorn'"),
    ],
)
def test_router_rejects_bad_configuration(router, match):
  with pytest.raises(ValueError, match=match):
    router.init(jax.random.PRNGKey(0), jnp.zeros((1, LENGTH, EMBED)))


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
