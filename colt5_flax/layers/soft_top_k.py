"""Soft top-k of ALIGNER / CoDA, which CoLT5 §3.3 uses to normalise router scores.

`soft_top_k(scores, k)` turns router scores [..., n] into weights λ in [0, 1] that sum to
k: the entropy-regularised relaxation of a top-k. The router (`layers/routing.py`) scales
each heavy branch's output by λ so that it learns through λ alone. Two solvers reach the
same fixed point: 'exact' (sort, then a closed form) and 'iterative' (the paper's dual
iteration, with CoDA's optional ε-scaling).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

SOFT_TOP_K_SOLVERS = ("exact", "iterative")


def _epsilon_schedule(
    epsilon: float, num_iters: int, eps_init: float | None, eps_decay: float
) -> np.ndarray:
  """ε of each soft top-k iteration: constant, or CoDA's ε-scaling decaying to `epsilon`."""
  if eps_init is None:
    return np.full((num_iters,), epsilon, np.float32)
  steps = np.arange(num_iters, dtype=np.float64)
  return np.maximum(eps_init * eps_decay**steps, epsilon).astype(np.float32)


def soft_top_k(
    scores: jax.Array,
    k: float,
    *,
    epsilon: float = 1.0,
    num_iters: int = 50,
    mask: jax.Array | None = None,
    solver: str = "exact",
    eps_init: float | None = None,
    eps_decay: float = 0.7,
) -> jax.Array:
  """Soft top-k of ALIGNER / CoDA, as CoLT5 §3.3 normalises router scores.

  Solves `max_λ sᵀλ + ε H(λ)` s.t. `Σ λ = k`, `0 ≤ λ ≤ 1`, `H(λ) = −Σ λ_i ln λ_i`, whose
  solution is `λ_i = min(1, exp((s_i + a) / ε))` for the one `a` that makes `Σ λ = k`.
  The paper reaches it by the dual iteration from `a = 0, b = 0`:

      a   ← ε ln k − ε logsumexp((s + b) / ε)
      b_i ← min(−s_i − a, 0)
      λ_i = exp((s_i + b_i + a) / ε)

  That iteration is a contraction whose rate is the share of saturated tokens (λ = 1) in
  the target, and from `a = 0` each step raises `a` by at most `ε ln(k/j)`: when the
  scores spread (a router vector that grows in training) 50 iterations stop far short,
  e.g. Σλ = 32 instead of 144 at n = 2048 with score std 100, and routed tokens silently
  get λ ≈ 0. So two solvers reach the same fixed point:

  - 'exact' (default): sorts the scores and finds the number J of saturated tokens, the
    first j for which `a_j = ε ln(k − j) − ε logsumexp(s_(j+1..n) / ε)` (the top j
    clipped at 1, the rest exponential) leaves the largest unclipped token at λ ≤ 1.
    Then `a = a_J`, differentiable through the unclipped scores, which gives the exact
    implicit gradient of the fixed point. It is the paper's iteration run to convergence,
    whatever the spread, in O(n log n) and O(n) memory.
  - 'iterative': the paper's iteration, `num_iters` steps (CoLT5: 50 at ε = 1), with
    optional CoDA ε-scaling: iteration t uses `ε_t = max(eps_init · eps_decay^t, ε)` and λ
    the last iteration's ε. Reverse-mode memory is O(num_iters · n) per row.

  Masked positions (padding) behave as score −inf (CoLT5 §3.3: padding is never
  routed) without ever forming −inf arithmetic: their weight is exactly 0, with zero,
  finite gradient. A row with no unmasked position yields all zeros and no NaN, in values
  and gradients. If k is at least the number of unmasked positions, `Σ λ = k` cannot be
  met and every unmasked weight is exactly 1 (zero gradient).

  Computed in float32 whatever the input dtype.

  Args:
    scores: [..., n] router scores, any float dtype.
    k: static target sum (int or float > 0; may be fractional, e.g. 9/8 · k).
    epsilon: entropy weight ε > 0 (CoLT5: 1.0), the floor of the ε-scaling schedule.
    num_iters: iterations of the 'iterative' solver (CoLT5: 50; CoDA with ε-scaling ~20).
    mask: optional [..., n] bool (broadcastable to scores), True = may be routed.
    solver: 'exact' or 'iterative' (see above).
    eps_init: 'iterative' only: initial ε of CoDA's ε-scaling (CoDA: 4.0), ≥ epsilon.
    eps_decay: 'iterative' only: per-iteration decay of ε-scaling, in (0, 1) (CoDA: 0.7).

  Returns:
    [..., n] float32 weights λ in [0, 1], summing to min(k, n_unmasked) per row (the
    'iterative' solver approximately); exactly 0 at masked positions.

  Raises:
    ValueError: naming the bad argument.
  """
  if isinstance(k, bool) or not isinstance(k, int | float | np.integer | np.floating):
    raise ValueError(f"soft_top_k: k={k!r} must be a static Python number")
  if not math.isfinite(k) or k <= 0:
    raise ValueError(f"soft_top_k: k={k!r} must be a finite number > 0")
  if not epsilon > 0:
    raise ValueError(f"soft_top_k: epsilon={epsilon!r} must be > 0")
  if solver not in SOFT_TOP_K_SOLVERS:
    raise ValueError(f"soft_top_k: solver={solver!r}; expected one of {SOFT_TOP_K_SOLVERS}")
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"soft_top_k: num_iters={num_iters!r} must be an int >= 1")
  if eps_init is not None:
    if solver != "iterative":
      raise ValueError(
          f"soft_top_k: eps_init={eps_init!r} (ε-scaling) is a setting of the 'iterative' "
          f"solver; solver={solver!r} reaches the fixed point without it"
      )
    if not eps_init >= epsilon:
      raise ValueError(
          f"soft_top_k: eps_init={eps_init!r} must be >= epsilon={epsilon!r} "
          "(ε-scaling decays from eps_init down to epsilon)"
      )
    if not 0.0 < eps_decay < 1.0:
      raise ValueError(f"soft_top_k: eps_decay={eps_decay!r} must be in (0, 1)")

  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim < 1:
    raise ValueError(f"soft_top_k: scores must have a length axis; got shape {scores.shape}")
  if mask is None:
    mask = jnp.ones(scores.shape, bool)
  else:
    mask = jnp.asarray(mask, bool)
    try:
      mask = jnp.broadcast_to(mask, scores.shape)
    except ValueError as error:
      raise ValueError(
          f"soft_top_k: mask shape {mask.shape} does not broadcast to scores shape "
          f"{scores.shape}"
      ) from error

  # Masked scores are replaced by 0 (not −inf) and excluded by `where`s below, so no
  # −inf − a or inf · 0 ever forms, in the forward pass or in the gradient.
  safe_scores = jnp.where(mask, scores, 0.0)
  if solver == "exact":
    a = _exact_offset(safe_scores, mask, k, float(epsilon))
    final_epsilon = float(epsilon)
  else:
    a, final_epsilon = _iterated_offset(
        safe_scores, mask, k, _epsilon_schedule(float(epsilon), num_iters, eps_init,
                                                float(eps_decay))
    )
  # λ = min(1, exp((s + a)/ε)); the clipped branch is constant in s (zero gradient).
  exponent = jnp.where(mask, jnp.minimum(safe_scores + a, 0.0) / final_epsilon, 0.0)
  weights = jnp.where(mask, jnp.exp(exponent), 0.0)
  # k ≥ the unmasked count: Σλ = k is out of reach and every unmasked token saturates.
  num_unmasked = jnp.sum(mask, axis=-1, keepdims=True)
  return jnp.where(num_unmasked <= k, mask.astype(jnp.float32), weights)


def _exact_offset(safe_scores, mask, k: float, epsilon: float) -> jax.Array:
  """The fixed point's `a` [..., 1], so that Σ min(1, exp((s_i + a)/ε)) = k.

  With the unmasked scores sorted in descending order t_0 ≥ t_1 ≥ …, assuming the top j
  saturate gives `a_j = ε ln(k − j) − ε logsumexp(t_j.. / ε)`. Every a_j ≤ a (the
  assumption over-counts), and the first j whose largest unclipped token fits
  (`t_j + a_j ≤ 0`) is the number of saturated tokens, with `a_j = a`. The sort order
  and that j carry no gradient; `a_j` is differentiable in the unclipped scores.
  """
  length = safe_scores.shape[-1]
  num_unmasked = jnp.sum(mask, axis=-1, keepdims=True)
  z = safe_scores / epsilon
  # Descending, padding last (argsort is stable; its order has no gradient).
  order = jnp.argsort(jnp.where(mask, -z, jnp.inf), axis=-1)
  ranks = jnp.arange(length)
  is_real = ranks < num_unmasked
  # Padding becomes a finite value 1e4 below the smallest real score: exp(−1e4) adds
  # exactly nothing in float32, and no ±inf enters the scan or its gradient.
  lowest = jnp.min(jnp.where(mask, z, jnp.inf), axis=-1, keepdims=True)
  lowest = jax.lax.stop_gradient(jnp.where(num_unmasked > 0, lowest, 0.0))
  sorted_z = jnp.where(is_real, jnp.take_along_axis(z, order, axis=-1), lowest - 1e4)
  tail_logsumexp = jax.lax.cumlogsumexp(sorted_z, axis=sorted_z.ndim - 1, reverse=True)
  remaining = k - ranks.astype(jnp.float32)  # k − j for j saturated tokens
  offsets = jnp.log(jnp.maximum(remaining, 1e-30)) - tail_logsumexp  # a_j / ε
  fits = (sorted_z + offsets <= 0.0) & (remaining > 0.0) & is_real
  # The first j that fits; if rounding leaves none, the largest admissible j.
  largest = jnp.clip(
      jnp.minimum(math.ceil(k) - 1, num_unmasked - 1), 0, length - 1
  ).astype(jnp.int32)
  saturated = jnp.where(
      jnp.any(fits, axis=-1, keepdims=True),
      jnp.argmax(fits, axis=-1, keepdims=True).astype(jnp.int32),
      largest,
  )
  return epsilon * jnp.take_along_axis(offsets, saturated, axis=-1)


def _iterated_offset(safe_scores, mask, k: float, schedule: np.ndarray):
  """The paper's iteration: (`a` [..., 1] after len(schedule) steps, the last ε)."""
  any_unmasked = jnp.any(mask, axis=-1, keepdims=True)
  log_k = math.log(k)

  def masked_logsumexp(logits):
    """logsumexp over unmasked entries of [..., n] -> [..., 1]; 0 for all-masked rows."""
    # The shift only stabilises; logsumexp's gradient (softmax) does not depend on it.
    shift = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    shift = jax.lax.stop_gradient(jnp.where(any_unmasked, shift, 0.0))
    # exp(−inf) = 0 and its derivative is 0, so masked entries contribute nothing.
    exponentials = jnp.exp(jnp.where(mask, logits - shift, -jnp.inf))
    total = jnp.sum(exponentials, axis=-1, keepdims=True)
    return jnp.log(jnp.where(any_unmasked, total, 1.0)) + shift

  def iteration(carry, eps):
    _, b = carry
    a = eps * log_k - eps * masked_logsumexp((safe_scores + b) / eps)
    b = jnp.where(mask, jnp.minimum(-safe_scores - a, 0.0), 0.0)
    return (a, b), None

  initial = (jnp.zeros(safe_scores.shape[:-1] + (1,), jnp.float32), jnp.zeros_like(safe_scores))
  (a, _), _ = jax.lax.scan(iteration, initial, jnp.asarray(schedule))
  # s + b + a = min(s + a, 0) once b is computed from the final a.
  return a, float(schedule[-1])
