"""CoLT5's conditional feedforward and conditional attention (Ainslie et al., 2023, §3).

Every token takes a light branch; a learned router sends a few tokens per layer through
a heavy branch whose output is scaled by the router's soft top-k weight λ:

  feedforward (§3.1):  X_i += FF_light(X_i) + λ_i · FF_heavy(X_i)
  attention   (§3.2):  X_i += A_light(X_i, X) + λ^q_i · A_heavy(X_i, λ^kv ⊙ X)

Routed tokens are gathered into static shapes [batch, num_routed, embed], processed and
scatter-added back, so the heavy branch costs O(num_routed) and everything jits.

How many tokens each router takes is one `routing.RoutingCapacity` (§3.3: m queries and
feedforward tokens, 2m keys/values); how a router scores and selects them is the
`router_factory` (a `routing.Router` that gin configures once for all routers).
"""

from typing import Any, Protocol

import flax.linen as nn
import jax.numpy as jnp

from colt5_flax.layers import attention, relative_position
from colt5_flax.layers import routing as routing_lib
from colt5_flax.layers.local_attention import LocalSelfAttention
from colt5_flax.layers.mlp import GatedMlp

Dtype = Any


class RouterFactory(Protocol):
  """Builds a router for `num_selected` tokens whose soft top-k sums to
  `soft_top_k_target` (`routing.Router`, with gin's bindings for everything else)."""

  def __call__(
      self, *, num_selected: int, soft_top_k_target: float, name: str
  ) -> routing_lib.Router:
    ...


def _sow_statistics(
    module: nn.Module, prefix: str, routed: routing_lib.Routing, mask
) -> None:
  """Scalars for the training metrics (model.routing_statistics averages them over
  layers into `routing/<prefix>_<name>`), and the routed positions for analyses."""
  real = jnp.asarray(mask, jnp.float32) if mask is not None else 1.0
  soft = routed.soft_weights * real
  selected_mass = jnp.sum(routed.weights, axis=-1)
  total_mass = jnp.maximum(jnp.sum(soft, axis=-1), 1e-9)
  module.sow(
      "intermediates", f"routing_{prefix}_selected_mass", jnp.mean(selected_mass / total_mass)
  )
  module.sow("intermediates", f"routing_{prefix}_mean_weight", jnp.mean(routed.weights))
  # |Σλ − k| / k: how far the soft top-k is from its constraint (0 when it converged).
  module.sow("intermediates", f"routing_{prefix}_sum_error", jnp.mean(routed.sum_error))
  # The positions themselves, for routing analyses (router recall in the demo).
  module.sow("intermediates", f"{prefix}_routed_indices", routed.indices)


class ConditionalFeedForward(nn.Module):
  """X_i + FF_light(X_i) + λ_i · FF_heavy(X_i) (CoLT5 §3.1); returns the two branches' sum.

  Both branches are T5.1.1 gated-GELU MLPs that differ only in width (Table 7): light
  = ½ of T5's d_ff on every token, heavy = 4× d_ff on the routed tokens.

  Attributes:
    light_mlp_dim: light width (CoLT5-B 1024).
    heavy_mlp_dim: heavy width (CoLT5-B 8192).
    capacity: how many tokens the router takes (m, the feedforward's count).
    router_factory: builds the router (`routing.Router`; gin binds its settings once).
    use_heavy_branch: False leaves the light branch alone (our ablation).
  """

  light_mlp_dim: int = 1024
  heavy_mlp_dim: int = 8192
  capacity: routing_lib.RoutingCapacity = routing_lib.RoutingCapacity()
  router_factory: RouterFactory = routing_lib.Router
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
    num_routed, target = self.capacity.routed(length, training=enable_dropout)
    router = self.router_factory(num_selected=num_routed, soft_top_k_target=target, name="router")
    routed = router(x, mask, deterministic=not enable_dropout)
    _sow_statistics(self, "mlp", routed, mask)
    heavy = GatedMlp(
        hidden_dim=self.heavy_mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
        hidden_axis_name="mlp", name="heavy",
    )(routing_lib.gather_tokens(x, routed.indices), enable_dropout=enable_dropout)
    heavy = heavy * jnp.asarray(routed.weights[..., None], heavy.dtype)
    return light + routing_lib.scatter_add_tokens(heavy, routed.indices, length)


class ConditionalAttention(nn.Module):
  """A_light(X_i, X) + λ^q_i · A_heavy(X_i, λ^kv ⊙ X) (CoLT5 §3.2).

  Light: LongT5 local attention (radius 127, no global tokens) with a quarter of T5's
  heads, on every token. Heavy: full attention from the routed queries to the routed
  keys/values, with separate routers; the kv weights multiply the routed token vectors
  before the K and V projections, so both keys and values are scaled (§3.2), and the
  routed outputs are scaled by the query weights. Position information in the heavy
  branch **(ours)**: the T5 relative position bias of the tokens' original positions,
  from a second stack-shared table (`heavy_position_bias=False`: none).

  Attributes:
    num_light_heads: light heads (CoLT5-B 4).
    num_heavy_heads: heavy heads (CoLT5-B 8).
    head_dim: 64.
    local_radius: light-branch radius (127).
    capacity: how many queries (m) and keys/values (kv_ratio × m) are routed.
    router_factory: builds the routers (`routing.Router`; gin binds its settings once).
    heavy_position_bias: the heavy branch adds a relative position bias from its own
      stack-shared table **(ours: True)**.
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
  capacity: routing_lib.RoutingCapacity = routing_lib.RoutingCapacity()
  router_factory: RouterFactory = routing_lib.Router
  heavy_position_bias: bool = True
  route_key_values: bool = True
  share_router: bool = False
  use_heavy_branch: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  def relative_bias_spec(self) -> dict[str, int]:
    """Two stack-shared tables: the light (local) and the heavy (routed) heads'."""
    spec = {"light_relpos_bias": self.num_light_heads}
    if self.use_heavy_branch and self.heavy_position_bias:
      spec["heavy_relpos_bias"] = self.num_heavy_heads
    return spec

  @nn.compact
  def __call__(
      self,
      x,
      *,
      tables,
      mask=None,
      segment_ids=None,
      enable_dropout=False,
  ):
    """x [batch, length, embed] (layer-normed); mask [batch, length] bool -> like x.

    `tables`: the stack's `RelativePositionTables` (`relative_bias_spec()`'s tables).
    """
    light = LocalSelfAttention(
        num_heads=self.num_light_heads,
        head_dim=self.head_dim,
        local_radius=self.local_radius,
        table_name="light_relpos_bias",
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name="light",
    )(
        x,
        tables=tables,
        mask=mask,
        segment_ids=segment_ids,
        enable_dropout=enable_dropout,
    )
    if not self.use_heavy_branch:
      return light
    batch, length, embed = x.shape
    if mask is None:
      mask = jnp.ones((batch, length), bool)
    query_routing, kv_routing = self._route(x, mask, training=enable_dropout)
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
    bias = None
    if self.heavy_position_bias:
      bias = tables.bias(
          "heavy_relpos_bias",
          self.num_heavy_heads,
          relative_position.relative_positions(query_positions, kv_positions),
      )
      if bias is None:
        raise ValueError(
            "ConditionalAttention.heavy_position_bias=True needs the stack's "
            "'heavy_relpos_bias' table (the stack builds it from relative_bias_spec())"
        )
    attended = heavy.attend(
        query, key, value, mask=heavy_mask, bias=bias, enable_dropout=enable_dropout
    )
    out = heavy.project_output(attended, embed)
    out = out * jnp.asarray(query_routing.weights[..., None], out.dtype)
    return light + routing_lib.scatter_add_tokens(out, query_positions, length)

  def _route(self, x, mask, *, training: bool):
    """(query routing, key/value routing or None for "v = all") of x [batch, length, embed].

    Separate query and key/value routers (§3.3), or one shared router (Table 6) whose
    key/value selection also supplies the queries: its `count` highest-scored tokens.
    """
    length = x.shape[1]
    num_queries, query_target = self.capacity.routed(length, training=training)
    num_kv, kv_target = self.capacity.routed(length, key_values=True, training=training)

    def route(num_selected, target, name):
      router = self.router_factory(num_selected=num_selected, soft_top_k_target=target, name=name)
      return router(x, mask, deterministic=not training)

    if self.share_router:
      if not self.route_key_values:
        raise ValueError(
            "ConditionalAttention.share_router=True needs route_key_values=True (a shared "
            "router selects the keys/values)"
        )
      kv_routing = route(max(num_kv, num_queries), kv_target, "router")
      return _top_of(kv_routing, num_queries), kv_routing
    query_routing = route(num_queries, query_target, "query_router")
    if not self.route_key_values:
      return query_routing, None
    return query_routing, route(num_kv, kv_target, "kv_router")


def _top_of(routed: routing_lib.Routing, count: int) -> routing_lib.Routing:
  """The `count` highest-ranked selections of `routed`, again sorted by position.

  Ranked by the router's ranking keys (scores; padding is −inf, below every real token),
  not by λ, which ties at 1 when saturated.
  """
  keys = jnp.take_along_axis(routed.ranking, routed.indices, axis=-1)
  order = jnp.argsort(-keys, axis=-1, stable=True)[:, :count]
  order = jnp.sort(order, axis=-1)
  return routed.replace(
      indices=jnp.take_along_axis(routed.indices, order, axis=-1),
      weights=jnp.take_along_axis(routed.weights, order, axis=-1),
  )
