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
  """

  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  activation: str = "gelu"
  kernel_init: Initializer = default_kernel_init()
  hidden_axis_name: str = "mlp"

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
    gate = dense(x, kernel("wi_0", (features, self.hidden_dim), hidden_axes))
    linear = dense(x, kernel("wi_1", (features, self.hidden_dim), hidden_axes))
    hidden = _ACTIVATIONS[self.activation](gate) * linear
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", self.hidden_axis_name))
    # t5x's T5.1.1 MlpBlock: one mask per (example, hidden unit), shared along the length.
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=not enable_dropout
    )
    out = dense(hidden, kernel("wo", (self.hidden_dim, features), (self.hidden_axis_name, "embed")))
    return out
