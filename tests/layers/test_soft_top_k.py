"""Tests of colt5_flax.layers.soft_top_k against plain numpy references.

References (tests/reference.py): the soft top-k iteration of CoLT5 §3.3 written as a
float64 numpy loop that drops masked entries (rather than masking them); the soft
top-k's solution found independently by bisection on its optimality conditions; and
float64 finite differences for gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax.layers.soft_top_k import soft_top_k
from tests import reference

# float32's machine epsilon (2^-23, twice the unit roundoff: a conservative ulp).
F32_EPS = float(np.finfo(np.float32).eps)


def lambda_tolerance(scores, epsilon, num_iters=1):
  """Bound on |λ_float32 − λ_float64| for λ = min(1, exp((s + a)/ε)).

  λ ≤ 1, so |Δλ| ≤ |Δ(s + a)| / ε. The scores are exact float32 inputs to both sides;
  `a` comes from a logsumexp over n terms reduced in a tree of depth ≤ log2(n) (plus a few
  operations around it), each rounding a value of magnitude ≤ max|s| + ε, so
  |Δa| ≤ (log2(n) + 4)·ulp·(max|s| + ε). The paper's iteration repeats that once per
  iteration (a non-expanding map), hence the factor num_iters for the iterative solver.
  """
  scores = np.asarray(scores, np.float64)
  depth = np.log2(scores.shape[-1]) + 4
  return num_iters * depth * F32_EPS * (np.max(np.abs(scores)) + epsilon) / epsilon


@pytest.fixture(scope="module")
def jitted_soft_top_k():
  return jax.jit(
      soft_top_k,
      static_argnames=("k", "epsilon", "num_iters", "solver", "eps_init", "eps_decay"),
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
def test_iterative_solver_matches_the_papers_iteration(
    jitted_soft_top_k, shape, k, epsilon, num_iters, eps_init, masked
):
  rng = np.random.default_rng(len(shape) * 100 + num_iters)
  scores = (2.0 * rng.normal(size=shape)).astype(np.float32)
  mask = rng.random(shape) < 0.7 if masked else None
  if masked:
    mask.reshape(-1, shape[-1])[0] = False  # one all-padding row
  weights = jitted_soft_top_k(
      scores, k, epsilon=epsilon, num_iters=num_iters, mask=mask, solver="iterative",
      eps_init=eps_init,
  )
  expected = reference.soft_top_k_iteration(
      scores, k, epsilon=epsilon, num_iters=num_iters, mask=mask, eps_init=eps_init
  )
  if masked:  # rows with k ≥ their real tokens saturate exactly (the iteration's limit)
    saturated = mask.sum(-1, keepdims=True) <= k
    expected = np.where(saturated, mask.astype(np.float64), expected)
  assert weights.dtype == jnp.float32 and weights.shape == shape
  np.testing.assert_allclose(
      weights, expected, rtol=0, atol=lambda_tolerance(scores, epsilon, num_iters)
  )
  weights = np.asarray(weights)
  assert np.all(weights >= 0.0) and np.all(weights <= 1.0)
  if masked:
    assert np.all(weights[~mask] == 0.0)


@pytest.mark.parametrize("std", [1.0, 10.0, 30.0, 100.0])
def test_exact_solver_reaches_the_fixed_point_whatever_the_spread(jitted_soft_top_k, std):
  # The setting: n = 2048, target 9/8 · 128 = 144. The paper's 50 iterations sum
  # to 134 at std 30 and 32 at std 100; the exact solver must give Σλ = k and the
  # bisection solution at every spread, with padding.
  rng = np.random.default_rng(int(std))
  scores = (std * rng.normal(size=(3, 2048))).astype(np.float32)
  mask = np.ones(scores.shape, bool)
  mask[1, 1500:] = False
  mask[2, ::3] = False
  weights = np.asarray(jitted_soft_top_k(scores, 144.0, mask=mask))
  tolerance = lambda_tolerance(scores, 1.0)
  np.testing.assert_allclose(weights.sum(-1), 144.0, rtol=tolerance)
  np.testing.assert_allclose(
      weights, reference.soft_top_k(scores, 144.0, mask=mask), rtol=0, atol=tolerance
  )
  assert np.all(weights[~mask] == 0.0)
  iterated = np.asarray(jitted_soft_top_k(scores, 144.0, mask=mask, solver="iterative"))
  if std >= 30:  # the case the exact solver exists for: the paper's 50 steps fall short
    assert np.all(iterated.sum(-1) < 140.0)


@pytest.mark.parametrize("k,epsilon", [(3, 1.0), (4.5, 0.5), (20 / 3, 1.0)])
def test_exact_solver_equals_the_converged_iteration(jitted_soft_top_k, k, epsilon):
  rng = np.random.default_rng(7)
  scores = (2.0 * rng.normal(size=(3, 24))).astype(np.float32)
  converged = reference.soft_top_k_iteration(scores, k, epsilon=epsilon, num_iters=5000)
  # The float64 iteration has converged: its sums are k and it agrees with bisection.
  np.testing.assert_allclose(converged.sum(-1), k, rtol=1e-12)
  np.testing.assert_allclose(
      converged, reference.soft_top_k(scores, k, epsilon=epsilon), atol=1e-12
  )
  weights = np.asarray(jitted_soft_top_k(scores, k, epsilon=epsilon))
  np.testing.assert_allclose(weights, converged, rtol=0, atol=lambda_tolerance(scores, epsilon))


def test_soft_top_k_keeps_order(jitted_soft_top_k):
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(2, 256)).astype(np.float32)
  mask = np.ones(scores.shape, bool)
  mask[1, 200:] = False
  for solver in ("exact", "iterative"):
    weights = np.asarray(jitted_soft_top_k(scores, 16, mask=mask, solver=solver))
    for row_scores, row_weights, row_mask in zip(scores, weights, mask, strict=True):
      order = np.argsort(row_scores[row_mask])
      assert np.all(np.diff(row_weights[row_mask][order]) >= 0.0), "higher score, lower λ"


@pytest.mark.parametrize("solver", ["exact", "iterative"])
def test_soft_top_k_saturates_when_k_reaches_the_unmasked_count(jitted_soft_top_k, solver):
  scores = np.array([[3.0, -2.0, 0.5, 10.0, -7.0, 1.0]], np.float32)
  mask = np.array([[True, True, False, True, False, False]])
  for k in (4, 3):  # more than, and exactly as many as, the 3 unmasked positions
    weights = np.asarray(jitted_soft_top_k(scores, k, mask=mask, solver=solver))
    np.testing.assert_array_equal(weights, mask.astype(np.float32))
  # k larger than the whole static length.
  weights = np.asarray(jitted_soft_top_k(scores, 9.5, solver=solver))
  np.testing.assert_array_equal(weights, np.ones_like(scores))


@pytest.mark.parametrize("solver,kwargs", [
    ("exact", {}), ("iterative", {}), ("iterative", dict(num_iters=10, eps_init=4.0)),
])
def test_soft_top_k_all_masked_and_extreme_scores_have_no_nan(solver, kwargs):
  scores = np.array(
      [[1.0, 2.0, 3.0, 4.0], [-1e4, 5.0, 1e4, -3.0], [0.5, -0.5, 2.0, 1.0]], np.float32
  )
  mask = np.array([[False] * 4, [True, True, True, False], [True, False, True, True]])
  cotangent = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.0

  def loss(s):
    return jnp.sum(soft_top_k(s, 1.5, mask=mask, solver=solver, **kwargs) * cotangent)

  weights = soft_top_k(scores, 1.5, mask=mask, solver=solver, **kwargs)
  gradient = jax.grad(loss)(jnp.asarray(scores))
  assert np.all(np.isfinite(weights)) and np.all(np.isfinite(gradient))
  np.testing.assert_array_equal(weights[0], 0.0)
  np.testing.assert_array_equal(np.asarray(weights)[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(gradient)[~mask], 0.0)


@pytest.mark.parametrize("std", [1.0, 10.0])
def test_exact_solver_gradient_matches_finite_differences(std):
  # At a converged point the gradient is the implicit one of the fixed point: compare
  # with central differences of the float64 bisection solution.
  rng = np.random.default_rng(11)
  scores = (std * rng.normal(size=(2, 12))).astype(np.float32)
  mask = np.ones(scores.shape, bool)
  mask[1, [2, 5]] = False
  cotangent = rng.normal(size=scores.shape)
  k, epsilon = 3.5, 0.7

  gradient = jax.grad(
      lambda s: jnp.sum(soft_top_k(s, k, epsilon=epsilon, mask=mask) * cotangent)
  )(jnp.asarray(scores))

  def reference_loss(s):
    return np.sum(reference.soft_top_k(s, k, epsilon=epsilon, mask=mask) * cotangent)

  expected = reference.central_differences(reference_loss, scores, step=1e-6 * std)
  assert np.any(np.abs(expected) > 1e-2)
  # Each ∂λ_i/∂s_j carries λ's error bound times 1/ε; the loss sums them with the
  # cotangent's weights. Finite-difference error (float64, step 1e-6) is far below.
  tolerance = lambda_tolerance(scores, epsilon) * np.abs(cotangent).sum() / epsilon
  np.testing.assert_allclose(gradient, expected, rtol=0, atol=tolerance)
  np.testing.assert_array_equal(np.asarray(gradient)[~mask], 0.0)


def test_iterative_solver_gradient_matches_finite_differences():
  rng = np.random.default_rng(11)
  scores = rng.normal(size=(2, 9)).astype(np.float32)
  mask = np.ones(scores.shape, bool)
  mask[1, [2, 5]] = False
  cotangent = rng.normal(size=scores.shape)
  kwargs = dict(epsilon=0.7, num_iters=30, mask=mask)

  gradient = jax.grad(
      lambda s: jnp.sum(soft_top_k(s, 2.5, solver="iterative", **kwargs) * cotangent)
  )(jnp.asarray(scores))

  def reference_loss(s):
    return np.sum(reference.soft_top_k_iteration(s, 2.5, **kwargs) * cotangent)

  expected = reference.central_differences(reference_loss, scores, step=1e-6)
  assert np.any(np.abs(expected) > 1e-2)
  tolerance = lambda_tolerance(scores, 0.7, 30) * np.abs(cotangent).sum() / 0.7
  np.testing.assert_allclose(gradient, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("solver", ["exact", "iterative"])
def test_soft_top_k_bfloat16_scores_give_float32(solver):
  rng = np.random.default_rng(4)
  scores = jnp.asarray(3.0 * rng.normal(size=(2, 64)), jnp.bfloat16)
  mask = np.ones(scores.shape, bool)
  mask[1, 40:] = False
  weights = soft_top_k(scores, 9.0, mask=mask, solver=solver)
  assert weights.dtype == jnp.float32
  # The reference sees the same bfloat16 values, exactly widened: only float32 rounding
  # inside the solver separates the two.
  widened = np.asarray(scores, np.float32)
  if solver == "exact":
    expected, num_iters = reference.soft_top_k(widened, 9.0, mask=mask), 1
  else:
    expected = reference.soft_top_k_iteration(widened, 9.0, num_iters=50, mask=mask)
    num_iters = 50
  np.testing.assert_allclose(
      weights, expected, rtol=0, atol=lambda_tolerance(widened, 1.0, num_iters)
  )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k=0"),
        (dict(k=-2.0), "k=-2.0"),
        (dict(k=float("nan")), "k=nan"),
        (dict(k=2, epsilon=0.0), "epsilon=0.0"),
        (dict(k=2, num_iters=0), "num_iters=0"),
        (dict(k=2, solver="sinkhorn"), "solver='sinkhorn'"),
        (dict(k=2, eps_init=4.0), "eps_init=4.0.*iterative"),
        (dict(k=2, solver="iterative", eps_init=0.5), "eps_init=0.5"),
        (dict(k=2, solver="iterative", eps_init=4.0, eps_decay=1.0), "eps_decay=1.0"),
        (dict(k=2, mask=np.ones((3,), bool)), "mask shape"),
    ],
)
def test_soft_top_k_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    soft_top_k(np.zeros((2, 4), np.float32), **kwargs)
