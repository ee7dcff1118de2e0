"""CoLT5's conditional feedforward and conditional attention (Ainslie et al., 2023, §3).

Every token takes a light branch; a learned router sends a few tokens per layer through
a heavy branch whose output is scaled by the router's soft top-k weight λ:

  feedforward (§3.1):  X_i += FF_light(X_i) + λ_i · FF_heavy(X_i)
  attention   (§3.2):  X_i += A_light(X_i, X) + λ^q_i · A_heavy(X_i, λ^kv ⊙ X)

Routed tokens are gathered into static shapes [batch, num_routed, embed], processed and
scatter-added back, so the heavy branch costs O(num_routed) and everything jits.

Routing capacity (§3.3, SPEC §1.3): queries and the feedforward route `routed_fraction`
of the (static) input length, keys/values twice that, optionally capped by a maximum
count (the paper keeps m fixed beyond 32k tokens).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from colt5_flax.layers import attention, relative_position
from colt5_flax.layers import routing as routing_lib
from colt5_flax.layers.local_attention import LocalSelfAttention
from colt5_flax.layers.mlp import GatedMlp

Dtype = Any

# SPEC §1.1: the soft top-k is normalised to sum to 9/8·k while k tokens are routed.
DEFAULT_SOFT_TOP_K_FACTOR = 9 / 8


class _RoutingOptions(nn.Module):
  """Router settings shared by the conditional layers (a mixin of attributes).

  Attributes:
    routing: 'learned' (the paper), 'static' (evenly spaced positions; Table 6 ablation)
      or 'random' (our ablation).
    soft_top_k_factor: the soft top-k sums to this × the routed count (SPEC §1.1: 9/8).
    train_capacity_factor: while training (`enable_dropout=True`), route this × the
      routed count (the paper's "top 9/8·k tokens keep nonzero weight" option; default
      1.0 routes k tokens in training too) **(ours: switch)**.
    router_epsilon, router_num_iters: soft top-k ε and iterations (paper: 1.0, 50).
    router_eps_init, router_eps_decay: CoDA's ε-scaling (eps_init 4, decay 0.7), off
      when eps_init is None.
  """

  routing: str = "learned"
  soft_top_k_factor: float = DEFAULT_SOFT_TOP_K_FACTOR
  train_capacity_factor: float = 1.0
  router_epsilon: float = 1.0
  router_num_iters: int = 50
  router_eps_init: float | None = None
  router_eps_decay: float = 0.7

  def _capacity(self, length: int, fraction: float, max_tokens: int | None, training: bool):
    """(tokens routed now, tokens the soft top-k is normalised to)."""
    base = routing_lib.routing_capacity(length, fraction, max_tokens)
    routed = base
    if training and self.train_capacity_factor != 1.0:
      routed = min(length, max(1, round(base * self.train_capacity_factor)))
    return routed, min(float(length), base * self.soft_top_k_factor)

  def _router(self, num_selected: int, target: float, name: str) -> routing_lib.Router:
    return routing_lib.Router(
        num_selected=num_selected,
        soft_top_k_target=target,
        epsilon=self.router_epsilon,
        num_iters=self.router_num_iters,
        eps_init=self.router_eps_init,
        eps_decay=self.router_eps_decay,
        routing=self.routing,
        name=name,
    )


def _sow_statistics(module: nn.Module, prefix: str, routed: routing_lib.Routing, mask):
  """Scalars for the training metrics (model.routing_statistics averages them)."""
  real = jnp.asarray(mask, jnp.float32) if mask is not None else 1.0
  soft = routed.soft_weights * real
  selected_mass = jnp.sum(routed.weights, axis=-1)
  total_mass = jnp.maximum(jnp.sum(soft, axis=-1), 1e-9)
  module.sow(
      "intermediates", f"routing_{prefix}_selected_mass", jnp.mean(selected_mass / total_mass)
  )
  module.sow("intermediates", f"routing_{prefix}_mean_weight", jnp.mean(routed.weights))
  # The positions themselves, for routing analyses (router recall in the demo).
  module.sow("intermediates", f"{prefix}_routed_indices", routed.indices)


class ConditionalFeedForward(_RoutingOptions):
  """X_i + FF_light(X_i) + λ_i · FF_heavy(X_i) (CoLT5 §3.1); returns the two branches' sum.

  Both branches are T5.1.1 gated-GELU MLPs that differ only in width (Table 7): light
  = ½ of T5's d_ff on every token, heavy = 4× d_ff on the routed tokens.

  Attributes:
    light_mlp_dim: light width (CoLT5-B 1024).
    heavy_mlp_dim: heavy width (CoLT5-B 8192).
    routed_fraction: fraction of the static length routed (1/16 in fine-tuning, 1/8 in
      pretraining).
    max_routed_tokens: cap on the routed count (None: no cap).
    use_heavy_branch: False leaves the light branch alone (our ablation).
  """

  light_mlp_dim: int = 1024
  heavy_mlp_dim: int = 8192
  routed_fraction: float = 1 / 16
  max_routed_tokens: int | None = None
  use_heavy_branch: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask=None, enable_dropout: bool = False):
    """x [batch, length, embed] (already layer-normed); mask [batch, length] bool.

    Returns [batch, length, embed]: light output everywhere, plus λ-scaled heavy output
    at the routed positions.
    """
    light = GatedMlp(
        hidden_dim=self.light_mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
        name="light",
    )(x, enable_dropout=enable_dropout)
    if not self.use_heavy_branch:
      return light
    length = x.shape[1]
    num_routed, target = self._capacity(
        length, self.routed_fraction, self.max_routed_tokens, enable_dropout
    )
    routed = self._router(num_routed, target, "router")(x, mask, deterministic=not enable_dropout)
    _sow_statistics(self, "mlp", routed, mask)
    heavy = GatedMlp(
        hidden_dim=self.heavy_mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
        hidden_axis_name="mlp", name="heavy",
    )(routing_lib.gather_tokens(x, routed.indices), enable_dropout=enable_dropout)
    heavy = heavy * jnp.asarray(routed.weights[..., None], heavy.dtype)
    return light + routing_lib.scatter_add_tokens(heavy, routed.indices, length)


class ConditionalAttention(_RoutingOptions):
  """A_light(X_i, X) + λ^q_i · A_heavy(X_i, λ^kv ⊙ X) (CoLT5 §3.2).

  Light: LongT5 local attention (radius 127, no global tokens) with a quarter of T5's
  heads, on every token. Heavy: full attention from the routed queries to the routed
  keys/values, with separate routers; the kv weights multiply the routed token vectors
  before the K and V projections, so both keys and values are scaled (§3.2), and the
  routed outputs are scaled by the query weights. Position information in the heavy
  branch **(ours)**: the T5 relative position bias of the tokens' original positions,
  from a second stack-shared table.

  Attributes:
    num_light_heads: light heads (CoLT5-B 4).
    num_heavy_heads: heavy heads (CoLT5-B 8).
    head_dim: 64.
    local_radius: light-branch radius (127).
    routed_query_fraction: queries routed, fraction of the length (1/16 fine-tuning).
    routed_kv_fraction: keys/values routed (2 × the query fraction; "v = q" ablation:
      equal to it).
    max_routed_query_tokens, max_routed_kv_tokens: caps (None: no cap).
    route_key_values: False attends from the routed queries to all tokens ("v = all"
      ablation; no kv router, λ^kv = 1).
    share_router: one router for queries and keys/values (Table 6 "shared QKV routing"):
      it selects the kv tokens, and the queries are the highest-λ `num_routed_queries`
      of them **(ours: how sharing picks the queries)**.
    use_heavy_branch: False leaves only the light branch (our ablation).
  """

  num_light_heads: int = 4
  num_heavy_heads: int = 8
  head_dim: int = 64
  local_radius: int = 127
  num_buckets: int = 32
  max_distance: int = 128
  routed_query_fraction: float = 1 / 16
  routed_kv_fraction: float = 1 / 8
  max_routed_query_tokens: int | None = None
  max_routed_kv_tokens: int | None = None
  route_key_values: bool = True
  share_router: bool = False
  use_heavy_branch: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  def relative_bias_spec(self) -> dict[str, int]:
    """Two stack-shared tables: the light (local) and the heavy (routed) heads'."""
    spec = {"light_rel_embedding": self.num_light_heads}
    if self.use_heavy_branch:
      spec["heavy_rel_embedding"] = self.num_heavy_heads
    return spec

  @nn.compact
  def __call__(
      self,
      x,
      *,
      light_rel_embedding,
      heavy_rel_embedding=None,
      mask=None,
      segment_ids=None,
      enable_dropout=False,
  ):
    """x [batch, length, embed] (layer-normed); mask [batch, length] bool -> like x."""
    light = LocalSelfAttention(
        num_heads=self.num_light_heads,
        head_dim=self.head_dim,
        local_radius=self.local_radius,
        num_buckets=self.num_buckets,
        max_distance=self.max_distance,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name="light",
    )(
        x,
        rel_embedding=light_rel_embedding,
        mask=mask,
        segment_ids=segment_ids,
        enable_dropout=enable_dropout,
    )
    if not self.use_heavy_branch:
      return light
    batch, length, embed = x.shape
    if mask is None:
      mask = jnp.ones((batch, length), bool)
    deterministic = not enable_dropout
    num_queries, query_target = self._capacity(
        length, self.routed_query_fraction, self.max_routed_query_tokens, enable_dropout
    )
    num_kv, kv_target = self._capacity(
        length, self.routed_kv_fraction, self.max_routed_kv_tokens, enable_dropout
    )

    if self.share_router:
      if not self.route_key_values:
        raise ValueError("share_router=True needs route_key_values=True")
      kv_routing = self._router(max(num_kv, num_queries), kv_target, "router")(
          x, mask, deterministic=deterministic
      )
      query_routing = _top_of(kv_routing, num_queries, mask)
    else:
      query_routing = self._router(num_queries, query_target, "query_router")(
          x, mask, deterministic=deterministic
      )
      kv_routing = None
      if self.route_key_values:
        kv_routing = self._router(num_kv, kv_target, "kv_router")(
            x, mask, deterministic=deterministic
        )
    _sow_statistics(self, "q", query_routing, mask)

    if kv_routing is None:
      kv_positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
      kv_inputs, kv_valid = x, mask
    else:
      _sow_statistics(self, "kv", kv_routing, mask)
      kv_positions = kv_routing.indices
      # CoLT5 §3.2: λ^kv scales the routed tokens before the K and V projections.
      kv_inputs = routing_lib.gather_tokens(x, kv_positions) * jnp.asarray(
          kv_routing.weights[..., None], x.dtype
      )
      kv_valid = routing_lib.gather_tokens(mask, kv_positions)

    query_positions = query_routing.indices
    query_inputs = routing_lib.gather_tokens(x, query_positions)
    heavy = attention.MultiHeadAttention(
        num_heads=self.num_heavy_heads,
        head_dim=self.head_dim,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name="heavy",
    )
    query = heavy.project_query(query_inputs)
    key, value = heavy.project_key_value(kv_inputs)
    heavy_mask = attention.make_attention_mask(
        routing_lib.gather_tokens(mask, query_positions), kv_valid
    )
    if segment_ids is not None:
      heavy_mask &= attention.make_segment_mask(
          routing_lib.gather_tokens(segment_ids, query_positions),
          routing_lib.gather_tokens(segment_ids, kv_positions),
      )
    bias = relative_position.bias_from_embedding(
        heavy_rel_embedding,
        relative_position.relative_positions(query_positions, kv_positions),
        bidirectional=True,
        num_buckets=self.num_buckets,
        max_distance=self.max_distance,
    )
    attended = heavy.attend(
        query, key, value, mask=heavy_mask, bias=bias, enable_dropout=enable_dropout
    )
    out = heavy.project_output(attended, embed)
    out = out * jnp.asarray(query_routing.weights[..., None], out.dtype)
    return light + routing_lib.scatter_add_tokens(out, query_positions, length)


def _top_of(routed: routing_lib.Routing, count: int, mask) -> routing_lib.Routing:
  """The `count` highest-weight selections of `routed`, again sorted by position.

  Selected padding ranks below every real token, even one whose λ underflowed to 0.
  """
  real = routing_lib.gather_tokens(mask, routed.indices)
  order = jnp.argsort(-jnp.where(real, routed.weights, -1.0), axis=-1, stable=True)[:, :count]
  order = jnp.sort(order, axis=-1)
  indices = jnp.take_along_axis(routed.indices, order, axis=-1)
  weights = jnp.take_along_axis(routed.weights, order, axis=-1)
  return routing_lib.Routing(indices=indices, weights=weights, soft_weights=routed.soft_weights)
