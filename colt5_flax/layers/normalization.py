"""T5's layer normalisation: RMS scaling, no mean subtraction, no bias."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colt5_flax.layers.dense import sum_leading_axes

Dtype = Any


class RMSNorm(nn.Module):
  """Root-mean-square layer norm, as T5 (`T5LayerNorm`) computes it.

  The statistics are always computed in float32, whatever `dtype` the activations use,
  because bfloat16 sums of squares over a 768..2048 wide embedding lose too many bits.

  Attributes:
    epsilon: added to the mean square; 1e-6 in T5.
    dtype: dtype of the output activations.
    param_dtype: dtype of the `scale` parameter (float32).
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Normalises `x` [..., embed] over its last axis; returns [..., embed] in `dtype`."""
    features = x.shape[-1]
    x32 = jnp.asarray(x, jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jnp.reciprocal(jnp.sqrt(mean_square + self.epsilon))
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        (features,),
        self.param_dtype,
    )
    return jnp.asarray(_scaled(y, jnp.asarray(scale, jnp.float32)), self.dtype)


@jax.custom_vjp
def _scaled(y, scale):
  """y [..., embed] · scale [embed], whose scale gradient sums g·y over the tokens as a
  product with a vector of ones (`dense.sum_leading_axes`): autodiff's sum fused with the
  products that make g and y, and XLA:CPU ran that fusion at a fraction of memory speed
  (docs/benchmarks.md)."""
  return y * scale


def _scaled_forward(y, scale):
  return y * scale, (y, scale)


def _scaled_backward(residuals, grad):
  y, scale = residuals
  return grad * scale, sum_leading_axes(grad * y, y.ndim - 1)


_scaled.defvjp(_scaled_forward, _scaled_backward)
