"""The T5.1.1 gated-GELU feedforward (no biases)."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colt5_flax.layers.dense import dense

Dtype = Any
Initializer = Callable[..., jax.Array]

_ACTIVATIONS = {
    # T5.1.1 and LongT5 use the tanh approximation (transformers' `gelu_new`).
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def default_kernel_init() -> Initializer:
  """T5's dense initialiser: unit-variance fan-in scaling, truncated normal."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class GatedMlp(nn.Module):
  """`wo(act(wi_0 x) * wi_1 x)`: T5.1.1's gated feedforward.

  CoLT5 (§3.1, Table 7) uses two of these per encoder layer that differ only in width:
  the light branch at half of T5's `d_ff` on every token, the heavy branch at 4x `d_ff`
  on the routed tokens.

  Attributes:
    hidden_dim: width of the hidden layer (T5-B: 2048; CoLT5-B light 1024, heavy 8192).
    dtype: activation dtype.
    dropout_rate: dropout on the hidden activations (T5 applies it there), one mask per
      example and hidden unit shared along the length (t5x's T5.1.1).
    activation: one of "gelu" (tanh approximation, T5.1.1), "gelu_exact", "relu", "silu".
    hidden_axis_name: logical axis of the hidden dimension, for sharding rules.
    chunk_length: the tokens go through in chunks of this many along the length (when it
      divides the length), the same result: each chunk's hidden activations stay in the
      CPU's cache between the products and the activation (the light MLP of CoLT5-B at
      16k, forward+backward: docs/benchmarks.md). None: all at once.
  """

  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  activation: str = "gelu"
  kernel_init: Initializer = default_kernel_init()
  hidden_axis_name: str = "mlp"
  chunk_length: int | None = 2048

  @nn.compact
  def __call__(self, x, *, mask=None, enable_dropout: bool = False):
    """Maps `x` [..., embed] to [..., embed].

    `mask` is accepted and unused (every token gets the dense MLP) so that a dense and a
    conditional feedforward are interchangeable behind one factory.
    """
    del mask
    if self.activation not in _ACTIVATIONS:
      raise ValueError(
          f"GatedMlp.activation={self.activation!r}; expected one of {sorted(_ACTIVATIONS)}"
      )
    features = x.shape[-1]
    x = jnp.asarray(x, self.dtype)

    def kernel(name, shape, axes):
      return jnp.asarray(
          self.param(
              name,
              nn.with_logical_partitioning(self.kernel_init, axes),
              shape,
              self.param_dtype,
          ),
          self.dtype,
      )

    hidden_axes = ("embed", self.hidden_axis_name)
    wi_0 = kernel("wi_0", (features, self.hidden_dim), hidden_axes)
    wi_1 = kernel("wi_1", (features, self.hidden_dim), hidden_axes)
    wo = kernel("wo", (self.hidden_dim, features), (self.hidden_axis_name, "embed"))
    # t5x's T5.1.1 MlpBlock: one dropout mask per (example, hidden unit), shared along the
    # length, so by every chunk: one key for all of them.
    dropout = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))
    rng = self.make_rng("dropout") if enable_dropout and self.dropout_rate > 0.0 else None

    def block(x):
      hidden = _ACTIVATIONS[self.activation](dense(x, wi_0)) * dense(x, wi_1)
      hidden = nn.with_logical_constraint(hidden, ("batch", "length", self.hidden_axis_name))
      return dense(dropout(hidden, deterministic=not enable_dropout, rng=rng), wo)

    length, chunk = x.shape[-2] if x.ndim > 1 else 1, self.chunk_length
    if not chunk or length <= chunk or length % chunk:
      return block(x)
    parts = [block(x[..., start : start + chunk, :]) for start in range(0, length, chunk)]
    return jnp.concatenate(parts, axis=-2)
