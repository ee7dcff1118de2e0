"""CoLT5's router: score tokens, soft top-k them, pick the hard top-k, gather and scatter.

CoLT5 (Ainslie et al. 2023, §3.3) routes a fixed number of tokens per sequence to each
heavy branch. A learned vector `u` scores every token, `s_i = x_i · u`; the scores are
normalised by the soft top-k of ALIGNER (Qian et al. 2022) / CoDA (Lei et al. 2023) into
weights `λ ∈ [0, 1]` that sum to k; the k tokens with the largest λ are routed, and the
heavy branch's output is scaled by λ so the router learns through λ alone (no
straight-through estimator).

Everything here keeps shapes static under jit: the number of routed tokens is a Python
integer computed at trace time from the static length (`routing_capacity`), and padding
is handled by masking, never by dynamic shapes.

The soft top-k itself lives in `layers/soft_top_k.py`; it is imported here, so
`routing.soft_top_k` remains the name the design docs give it.
"""

import dataclasses
import math
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from colt5_flax.layers.soft_top_k import SOFT_TOP_K_SOLVERS, soft_top_k

Initializer = Callable[..., jax.Array]

ROUTING_KINDS = ("learned", "static", "random")

# Largest count for which `j * n_real` (j < count, n_real's remainder < count) fits int32
# in static routing's integer arithmetic; far above any routed count CoLT5 uses (≤ 2048).
_MAX_STATIC_ROUTED_TOKENS = 46340


def routing_capacity(
    length: int,
    fraction: float,
    max_tokens: int | None = None,
    multiple_of: int = 1,
) -> int:
  """Number of tokens a routed branch processes, computed at trace time.

  CoLT5 §3.3 / §5: queries and the feedforward route `m = n/16` tokens in fine-tuning
  (`n/8` in pre-training), keys/values `2m`, and beyond 32k inputs m stays at its 32k
  value (`max_tokens=2048` for fraction 1/16). The count is a Python int so every routed
  shape is static under jit.

  The rule, in order:
    1. `floor(fraction * length)` (a 1e-9 relative tolerance absorbs float error, so
       `0.1 * 30` gives 3, not 2);
    2. capped at `max_tokens` when given;
    3. rounded DOWN to a multiple of `multiple_of` (hardware-friendly shapes, e.g. 8 or
       128), but never below one multiple;
    4. clamped to `[1, length]` (so `length < multiple_of` gives `length`).

  To route the paper's 9/8·k tokens during training (CoLT5 §3.3), pass
  `fraction * 9 / 8` here for the training configuration.

  Args:
    length: static sequence length n (≥ 1).
    fraction: routed fraction in (0, 1], e.g. 1/16.
    max_tokens: optional cap on the count (≥ multiple_of).
    multiple_of: round the count down to a multiple of this (≥ 1).

  Returns:
    The routed-token count, an int in [1, length].

  Raises:
    ValueError: naming the bad argument.
  """
  if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
    raise ValueError(f"routing_capacity: length={length!r} must be a positive int")
  if not isinstance(fraction, int | float | np.floating) or not 0.0 < fraction <= 1.0:
    raise ValueError(f"routing_capacity: fraction={fraction!r} must be in (0, 1]")
  if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
    raise ValueError(f"routing_capacity: multiple_of={multiple_of!r} must be an int >= 1")
  if max_tokens is not None and (
      isinstance(max_tokens, bool)
      or not isinstance(max_tokens, int | np.integer)
      or max_tokens < multiple_of
  ):
    raise ValueError(
        f"routing_capacity: max_tokens={max_tokens!r} must be an int >= "
        f"multiple_of={multiple_of}"
    )
  exact = float(fraction) * int(length)
  count = math.floor(exact * (1.0 + 1e-9))
  if max_tokens is not None:
    count = min(count, int(max_tokens))
  count = max(multiple_of, (count // multiple_of) * multiple_of)
  return int(max(1, min(count, int(length))))


@dataclasses.dataclass(frozen=True)
class RoutingCapacity:
  """How many tokens each router of a CoLT5 layer takes: one fact for the whole encoder.

  CoLT5 §3.3: the feedforward and the attention's queries route m = `fraction` × n
  tokens, the keys/values `kv_ratio` × m (the paper: 2m), and beyond `max_length` input
  tokens (the paper: 32k) the counts stay at their `max_length` values. m = n/16 in
  fine-tuning, n/8 in pretraining. The counts are Python ints computed from the static
  length (`routing_capacity`), so shapes stay static under jit.

  Attributes:
    fraction: m / n for the queries and the feedforward (1/16 fine-tuning, 1/8
      pretraining).
    kv_ratio: keys/values route this × m (2; 1 is Table 6's "v = q"); the key/value
      fraction is capped at 1.
    max_length: input length beyond which the counts stop growing (32768); None: no cap.
    soft_top_k_factor: the soft top-k sums to this × the routed count (CoLT5 §3.3: the
      top 9/8·k tokens keep nonzero weight).
    train_capacity_factor: while training, route this × the count **(ours: 1.0, i.e. k
      tokens in training too)**.
  """

  fraction: float = 1 / 16
  kv_ratio: float = 2.0
  max_length: int | None = 32768
  soft_top_k_factor: float = 9 / 8
  train_capacity_factor: float = 1.0

  def __post_init__(self):
    if not 0.0 < self.fraction <= 1.0:
      raise ValueError(f"RoutingCapacity.fraction={self.fraction!r} must be in (0, 1]")
    if not self.kv_ratio > 0.0:
      raise ValueError(f"RoutingCapacity.kv_ratio={self.kv_ratio!r} must be > 0")
    if self.max_length is not None and self.max_length < 1:
      raise ValueError(f"RoutingCapacity.max_length={self.max_length!r} must be >= 1 or None")
    if not self.soft_top_k_factor > 0.0 or not self.train_capacity_factor > 0.0:
      raise ValueError(
          f"RoutingCapacity: soft_top_k_factor={self.soft_top_k_factor!r} and "
          f"train_capacity_factor={self.train_capacity_factor!r} must be > 0"
      )

  def count(self, length: int, *, key_values: bool = False) -> int:
    """Routed tokens at this static length: m, or the keys/values' kv_ratio × m."""
    fraction = min(1.0, self.fraction * (self.kv_ratio if key_values else 1.0))
    max_tokens = None
    if self.max_length is not None and length > self.max_length:
      max_tokens = routing_capacity(self.max_length, fraction)
    return routing_capacity(length, fraction, max_tokens)

  def routed(self, length: int, *, key_values: bool = False, training: bool = False):
    """(tokens routed now, the sum the soft top-k is normalised to)."""
    base = self.count(length, key_values=key_values)
    routed = base
    if training and self.train_capacity_factor != 1.0:
      routed = min(length, max(1, round(base * self.train_capacity_factor)))
    return routed, min(float(length), base * self.soft_top_k_factor)


def gather_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Gathers the routed tokens: `out[b, j] = x[b, indices[b, j]]`.

  Lowers to one XLA gather with `[1, 1, ...]` slices (O(k · d) work); a one-hot matmul
  would be O(n · k · d), ~500x slower at n = 16k on CPU.

  Args:
    x: [batch, length, ...] token features.
    indices: [batch, num_selected] int positions in [0, length) (out-of-range indices
      are clamped, as jnp indexing does).

  Returns:
    [batch, num_selected, ...] with x's dtype.
  """
  _check_indices("gather_tokens", x, indices)
  batch_index = jnp.arange(x.shape[0])[:, None]
  return jnp.asarray(x)[batch_index, indices]  # numpy x cannot be indexed by tracers


def scatter_add_tokens(updates: jax.Array, indices: jax.Array, length: int) -> jax.Array:
  """Scatters routed outputs back: zeros of [batch, length, ...] plus each update added
  at its position; duplicate indices add up (CoLT5 §3.3: routed outputs are added back).

  Lowers to one XLA scatter-add, the transpose of `gather_tokens`.

  Args:
    updates: [batch, num_selected, ...] per-routed-token values.
    indices: [batch, num_selected] int positions in [0, length) (out-of-range updates
      are dropped, as `.at[].add` does).
    length: static output length.

  Returns:
    [batch, length, ...] with updates' dtype.
  """
  _check_indices("scatter_add_tokens", updates, indices)
  if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
    raise ValueError(f"scatter_add_tokens: length={length!r} must be a positive int")
  batch_size = updates.shape[0]
  output = jnp.zeros((batch_size, int(length)) + updates.shape[2:], updates.dtype)
  batch_index = jnp.arange(batch_size)[:, None]
  return output.at[batch_index, indices].add(updates)


def _check_indices(name: str, array: jax.Array, indices: jax.Array) -> None:
  if indices.ndim != 2 or array.ndim < 2 or indices.shape[0] != array.shape[0]:
    raise ValueError(
        f"{name}: expected array [batch, length, ...] and indices [batch, k]; got "
        f"shapes {array.shape} and {indices.shape}"
    )
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"{name}: indices must be integers; got dtype {indices.dtype}")


@flax.struct.dataclass
class Routing:
  """Which tokens a router picked, and their weights (a pytree; fine to return from jit).

  Attributes:
    indices: [batch, num_selected] int32 positions, sorted ascending (locality for the
      gather/scatter, and the heavy attention's relative position bias reads them).
    weights: [batch, num_selected] float32 scale of each routed token's output; exactly
      0 where the selected position is padding (a row with fewer real tokens than
      num_selected).
    soft_weights: [batch, length] float32 weights of every position (the soft top-k λ
      for learned routing; the hard 0/1 selection for static/random), for statistics.
    ranking: [batch, length] float32 keys the selection ranked by, highest first: the
      router scores (learned) or the 0/1 selection (static/random); −inf at padding.
    sum_error: [batch] float32 `|Σλ − k| / k` with k the target capped at the row's real
      tokens (0 for a row without any): how far the soft top-k is from its constraint.
  """

  indices: jax.Array
  weights: jax.Array
  soft_weights: jax.Array
  ranking: jax.Array
  sum_error: jax.Array


def _sum_error(soft_weights: jax.Array, mask: jax.Array, target: float) -> jax.Array:
  """[batch] |Σλ − k'| / k' with k' = min(target, real tokens); 0 for empty rows."""
  reachable = jnp.minimum(jnp.sum(mask, axis=-1, dtype=jnp.float32), float(target))
  total = jnp.sum(jnp.where(mask, soft_weights, 0.0), axis=-1)
  return jnp.where(reachable > 0, jnp.abs(total - reachable) / jnp.maximum(reachable, 1.0), 0.0)


def router_init(scale: float = 1.0) -> Initializer:
  """Normal with std `scale / sqrt(embed)`: scores of std `scale` for unit-RMS x.

  The paper does not give the router's initialisation **(ours)**. Unit-variance scores
  (scale 1) at ε = 1 make the initial λ neither uniform (u = 0 would tie every token)
  nor hard.
  """

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.normal(key, shape, dtype) * jnp.asarray(scale * shape[-1] ** -0.5, dtype)

  return init


class Router(nn.Module):
  """Picks `num_selected` tokens per sequence for a heavy branch (CoLT5 §3.3).

  'learned' (the paper): scores `s_i = x_i · u` in float32 with a learned vector u (param
  `router_weights` [embed], no bias), soft top-k over the length axis with padding
  masked, then the hard top-k. The hard top-k ranks by the scores, not by λ: λ is
  monotone in them but saturates at exactly 1 for several tokens when the soft top-k's
  target exceeds the routed count (9/8·k), and ranking those ties by position would drop
  higher-scored tokens. The routed weights are λ at the chosen positions, so the gradient
  reaches u only through λ (no straight-through).

  Training with 9/8·k routed tokens (CoLT5 §3.3): the caller picks `num_selected` (e.g.
  `routing_capacity(n, fraction * 9 / 8)` while training, `routing_capacity(n, fraction)`
  at inference); `soft_top_k_target` is the independent knob for the λ normalisation
  (the conditional layers pass 9/8·k by default).

  'static' (paper Table 6 ablation): evenly spaced positions over each row's REAL
  (unpadded) tokens, the j-th selection being the real token of rank
  `floor(j · n_real / num_selected)`, weight 1. Spacing over the real length, not the
  static length, means short padded inputs still route num_selected real tokens. When a
  row has fewer real tokens than num_selected, all of them are taken and the rest of the
  selections are padding positions with weight 0.

  'random' (our ablation): num_selected distinct real positions drawn uniformly, weight
  1 (padding only when real tokens run out, weight 0). With `deterministic=False` the
  draw uses the 'routing' rng stream (`rngs={'routing': key}`; missing -> flax error);
  with `deterministic=True` it uses a fixed key, `PRNGKey(0)` folded with a CRC32 of the
  module path, so evaluation is reproducible and different routers differ.

  Static and random routing create no parameter.

  Attributes:
    num_selected: routed tokens per row (static int ≥ 1, ≤ length); see
      `routing_capacity`.
    soft_top_k_target: the sum k of the soft top-k; None = num_selected.
    routing: 'learned' | 'static' | 'random'.
    epsilon: soft top-k entropy weight (paper: 1.0).
    solver: 'exact' (the soft top-k's fixed point, whatever the score spread) or
      'iterative' (the paper's iteration, `num_iters` steps); see `soft_top_k`.
    num_iters: 'iterative' soft top-k iterations (paper: 50).
    eps_init: 'iterative' only: CoDA ε-scaling start (CoDA: 4.0, with ~20 iterations).
    eps_decay: CoDA ε-scaling decay per iteration (0.7).
    init_scale: `router_weights` start with std `init_scale / sqrt(embed)`, so initial
      scores have std ≈ init_scale **(ours: 1.0)**.
    param_dtype: dtype of `router_weights` (float32).

  Every setting is checked when the router is built: a bad one raises a ValueError that
  names the attribute and its gin binding (`routing.Router.epsilon`, ...).
  """

  num_selected: int
  soft_top_k_target: float | None = None
  routing: str = "learned"
  epsilon: float = 1.0
  solver: str = "exact"
  num_iters: int = 50
  eps_init: float | None = None
  eps_decay: float = 0.7
  init_scale: float = 1.0
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    # A bad setting fails when the router is built, naming its gin binding (one binding,
    # `routing.Router.<attribute>`, configures every router: configs/architectures/colt5.gin).
    # num_selected ≤ length needs the input, so `__call__` checks that bound.
    def bad(attribute, requirement):
      value = getattr(self, attribute)
      return ValueError(
          f"Router.{attribute}={value!r} {requirement} (gin binding: "
          f"routing.Router.{attribute})"
      )

    if self.routing not in ROUTING_KINDS:
      raise bad("routing", f"is not one of {ROUTING_KINDS}")
    if not _is_int(self.num_selected) or self.num_selected < 1:
      raise bad("num_selected", "must be an int >= 1")
    if self.soft_top_k_target is not None and not _is_positive(self.soft_top_k_target):
      raise bad("soft_top_k_target", "must be None or a finite number > 0")
    if not _is_positive(self.epsilon):
      raise bad("epsilon", "must be a finite number > 0")
    if self.solver not in SOFT_TOP_K_SOLVERS:
      raise bad("solver", f"is not one of {SOFT_TOP_K_SOLVERS}")
    if not _is_int(self.num_iters) or self.num_iters < 1:
      raise bad("num_iters", "must be an int >= 1")
    if self.eps_init is not None:
      if self.solver != "iterative":
        raise bad("eps_init", f"(ε-scaling) needs solver='iterative', not {self.solver!r}")
      if not _is_positive(self.eps_init) or self.eps_init < self.epsilon:
        raise bad("eps_init", f"must be >= epsilon={self.epsilon!r} (ε decays down to it)")
      if not _is_number(self.eps_decay) or not 0.0 < self.eps_decay < 1.0:
        raise bad("eps_decay", "must be in (0, 1)")
    if not _is_positive(self.init_scale):
      raise bad("init_scale", "must be a finite number > 0")
    super().__post_init__()

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array | None = None,
      *,
      deterministic: bool = True,
  ) -> Routing:
    """Routes x [batch, length, embed] (any dtype) with mask [batch, length] bool
    (True = real token; None = all real). Returns a `Routing` (indices and weights
    [batch, num_selected], soft_weights [batch, length]). `deterministic` only matters
    for 'random' routing."""
    if x.ndim != 3:
      raise ValueError(f"Router: x must be [batch, length, embed]; got shape {x.shape}")
    batch_size, length, embed = x.shape
    num_selected = self.num_selected
    if num_selected > length:
      raise ValueError(
          f"Router.num_selected={num_selected!r} must be an int in [1, length={length}]"
      )
    if mask is None:
      mask = jnp.ones((batch_size, length), bool)
    elif mask.shape != (batch_size, length):
      raise ValueError(
          f"Router: mask shape {mask.shape} does not match x's [batch, length] = "
          f"{(batch_size, length)}"
      )
    mask = jnp.asarray(mask, bool)

    if self.routing == "learned":
      return self._learned(x, mask, embed)
    if self.routing == "static":
      if num_selected > _MAX_STATIC_ROUTED_TOKENS:
        raise ValueError(
            f"Router.num_selected={num_selected} exceeds {_MAX_STATIC_ROUTED_TOKENS}, "
            "the largest static routing computes exactly in int32"
        )
      return _hard_routing(_static_indices(mask, num_selected), mask)
    # 'random': distinct real positions first (uniforms in [0, 1) vs −1 for padding).
    if deterministic:
      key = jax.random.fold_in(
          jax.random.PRNGKey(0), zlib.crc32("/".join(self.path).encode()) & 0x7FFFFFFF
      )
    else:
      key = self.make_rng("routing")
    uniforms = jax.random.uniform(key, (batch_size, length), jnp.float32)
    _, indices = jax.lax.top_k(jnp.where(mask, uniforms, -1.0), num_selected)
    return _hard_routing(indices, mask)

  def _learned(self, x, mask, embed) -> Routing:
    router_weights = self.param(
        "router_weights",
        nn.with_logical_partitioning(router_init(self.init_scale), ("embed",)),
        (embed,),
        self.param_dtype,
    )
    # CoLT5 §3.3: routing in float32 whatever the activation dtype; HIGHEST precision
    # because TPUs would otherwise multiply float32 in bfloat16 passes.
    scores = jnp.einsum(
        "ble,e->bl",
        jnp.asarray(x, jnp.float32),
        jnp.asarray(router_weights, jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    target = self.num_selected if self.soft_top_k_target is None else self.soft_top_k_target
    soft_weights = soft_top_k(
        scores,
        target,
        epsilon=self.epsilon,
        num_iters=self.num_iters,
        mask=mask,
        solver=self.solver,
        eps_init=self.eps_init,
        eps_decay=self.eps_decay,
    )
    soft_weights = nn.with_logical_constraint(soft_weights, ("batch", "length"))
    # Rank by score (λ is monotone in it, but ties at λ = 1); padding ranks below every
    # real token, even one whose λ underflowed to 0. Indices carry no gradient: u learns
    # only through the λ gathered below.
    ranking = jax.lax.stop_gradient(jnp.where(mask, scores, -jnp.inf))
    _, indices = jax.lax.top_k(ranking, self.num_selected)
    indices = jnp.sort(indices, axis=-1).astype(jnp.int32)
    weights = jnp.take_along_axis(soft_weights, indices, axis=-1)
    return Routing(
        indices=indices,
        weights=weights,
        soft_weights=soft_weights,
        ranking=ranking,
        sum_error=_sum_error(soft_weights, mask, target),
    )


def _is_int(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, int | np.integer)


def _is_number(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def _is_positive(value) -> bool:
  return _is_number(value) and math.isfinite(value) and value > 0


def _static_indices(mask: jax.Array, num_selected: int) -> jax.Array:
  """[batch, num_selected] evenly spaced real positions (ranks floor(j·n_real/k))."""
  num_real = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.int32)  # [batch, 1]
  # Positions ordered real-first, each group ascending (stable sort on "is padding").
  real_first = jnp.argsort(jnp.logical_not(mask).astype(jnp.int32), axis=-1, stable=True)
  j = jnp.arange(num_selected, dtype=jnp.int32)[None, :]
  # floor(j · n_real / k) split so the products stay below 2^31 for k ≤ 46340.
  spaced = j * (num_real // num_selected) + (j * (num_real % num_selected)) // num_selected
  # Too few real tokens: take them all, then padding (weight 0 in _hard_routing).
  ranks = jnp.where(num_real >= num_selected, spaced, j)
  return jnp.take_along_axis(real_first, ranks, axis=-1)


def _hard_routing(indices: jax.Array, mask: jax.Array) -> Routing:
  """Routing with weight 1 on real selected tokens, 0 on selected padding."""
  indices = jnp.sort(indices, axis=-1).astype(jnp.int32)
  weights = jnp.take_along_axis(mask, indices, axis=-1).astype(jnp.float32)
  soft_weights = scatter_add_tokens(weights, indices, mask.shape[-1])
  return Routing(
      indices=indices,
      weights=weights,
      soft_weights=soft_weights,
      ranking=jnp.where(mask, soft_weights, -jnp.inf),
      sum_error=_sum_error(soft_weights, mask, indices.shape[-1]),
  )
