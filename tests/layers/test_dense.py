"""layers.dense: values and both gradients against numpy's float64 products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax.layers import dense as dense_lib
from colt5_flax.layers.dense import dense
from tests import tolerances


@pytest.mark.parametrize(
    "x_shape, kernel_shape, in_axes",
    [
        ((2, 5, 6), (6, 7), 1),  # a feedforward's matrix
        ((2, 5, 6), (6, 3, 4), 1),  # embed -> heads, head_dim
        ((2, 5, 3, 4), (3, 4, 6), 2),  # heads, head_dim -> embed
        ((3, 2, 5, 6), (6, 7), 1),  # two leading axes (batch, blocks)
    ],
)
def test_dense_values_and_gradients_match_numpy(x_shape, kernel_shape, in_axes):
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape).astype(np.float32)
  kernel = rng.normal(size=kernel_shape).astype(np.float32)
  out_shape = x_shape[: len(x_shape) - in_axes] + kernel_shape[in_axes:]
  cotangent = rng.normal(size=out_shape).astype(np.float32)

  # float64 references on the flattened [tokens, in] · [in, out] product.
  num_in = int(np.prod(kernel_shape[:in_axes]))
  x2 = x.reshape(-1, num_in).astype(np.float64)
  k2 = kernel.reshape(num_in, -1).astype(np.float64)
  g2 = cotangent.reshape(x2.shape[0], -1).astype(np.float64)
  expected = (x2 @ k2).reshape(out_shape)
  expected_dx = (g2 @ k2.T).reshape(x_shape)
  expected_dkernel = (x2.T @ g2).reshape(kernel_shape)

  got, pullback = jax.vjp(lambda a, b: dense(a, b, in_axes), x, kernel)
  dx, dkernel = pullback(jnp.asarray(cotangent))
  # One product each (tests/tolerances.py): in, out and token terms.
  tolerances.assert_close(got, expected, num_terms=num_in, what="dense")
  tolerances.assert_close(dx, expected_dx, num_terms=g2.shape[1], what="dx")
  tolerances.assert_close(dkernel, expected_dkernel, num_terms=x2.shape[0], what="dkernel")


def test_dense_gradient_dtypes_follow_their_primals():
  x = jnp.ones((2, 4, 3), jnp.bfloat16)
  kernel = jnp.ones((3, 5), jnp.bfloat16)
  out, pullback = jax.vjp(dense, x, kernel)
  dx, dkernel = pullback(jnp.ones_like(out))
  assert (out.dtype, dx.dtype, dkernel.dtype) == (jnp.bfloat16,) * 3
  # 8 tokens of 1·1, summed in float32: exactly 8 (a bfloat16 sum would also be, but the
  # value checks the contraction runs over both leading axes).
  np.testing.assert_array_equal(np.asarray(dkernel, np.float32), np.full((3, 5), 8.0))
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.full((2, 4, 3), 5.0))


def test_dense_names_mismatched_axes():
  with pytest.raises(ValueError, match=r"last 2 axes of x \(2, 5, 6\).*kernel \(3, 4, 6\)"):
    dense(jnp.ones((2, 5, 6)), jnp.ones((3, 4, 6)), in_axes=2)


@pytest.mark.parametrize(
    "spec, a_shape, b_shape",
    [
        # attention logits with 2 key/value heads shared by 2 query heads each
        ("...qhgd,...khd->...hgqk", (2, 3, 5, 2, 2, 4), (2, 3, 6, 2, 4)),
        # weights · values
        ("...hgqk,...khd->...qhgd", (2, 2, 2, 5, 6), (2, 6, 2, 4)),
        # attention_part's heads-major products: the gradients of the logits' key and the
        # values read the [.., q, k] gradient or weights as the right operand and transpose
        # their small results (dense._product)
        ("...hgqd,...hkd->...hgqk", (2, 3, 2, 2, 5, 4), (2, 3, 2, 6, 4)),
        ("...hgqk,...hkd->...hgqd", (3, 2, 2, 5, 6), (3, 2, 6, 4)),
    ],
)
def test_einsum_values_and_gradients_match_numpy(spec, a_shape, b_shape):
  rng = np.random.default_rng(1)
  a = rng.normal(size=a_shape).astype(np.float32)
  b = rng.normal(size=b_shape).astype(np.float32)
  expected = np.einsum(spec, a.astype(np.float64), b.astype(np.float64))
  cotangent = rng.normal(size=expected.shape)
  # The gradients of a bilinear map, by the definition: ⟨g, f(a, b)⟩ is linear in each.
  expected_da = np.einsum(
      f"{spec.split('->')[1]},{spec.split(',')[1].split('->')[0]}->{spec.split(',')[0]}",
      cotangent,
      b.astype(np.float64),
  )
  expected_db = np.einsum(
      f"{spec.split(',')[0]},{spec.split('->')[1]}->{spec.split(',')[1].split('->')[0]}",
      a.astype(np.float64),
      cotangent,
  )
  got, pullback = jax.vjp(
      lambda x, y: dense_lib.einsum(spec, x, y, preferred_element_type=jnp.float32), a, b
  )
  da, db = pullback(jnp.asarray(cotangent, jnp.float32))
  # The widest contraction of either spec: 6 keys forward, 6 (or 4) for da, 10 (queries ×
  # grouped heads) for db.
  tolerances.assert_close(got, expected, num_terms=6, what="einsum")
  tolerances.assert_close(da, expected_da, num_terms=6, what="da")
  tolerances.assert_close(db, expected_db, num_terms=10, what="db")
  # And against autodiff of jnp.einsum, a second derivation of the same gradients.
  _, reference_pullback = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a, b)
  references = reference_pullback(jnp.asarray(cotangent, jnp.float32))
  for got_grad, reference in zip((da, db), references, strict=True):
    tolerances.assert_close(got_grad, reference, num_terms=10, programs=2, what="autodiff")


@pytest.mark.parametrize(
    "bias_shape",
    [(4, 5), (1, 1, 4, 5), (2, 1, 4, 5), (2, 3, 4, 5), (1, 4, 1)],
)
def test_add_broadcast_gradient_sums_the_broadcast_axes(bias_shape):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  bias = rng.normal(size=bias_shape).astype(np.float32)
  cotangent = rng.normal(size=x.shape)
  got, pullback = jax.vjp(dense_lib.add_broadcast, x, bias)
  dx, dbias = pullback(jnp.asarray(cotangent, jnp.float32))
  # float64: the cotangent summed over the axes the bias was broadcast along.
  padded = (1,) * (4 - len(bias_shape)) + bias_shape
  axes = tuple(a for a, size in enumerate(padded) if size == 1)
  expected_dbias = np.sum(cotangent, axis=axes, keepdims=True).reshape(bias_shape)
  tolerances.assert_close(got, x.astype(np.float64) + bias, num_terms=1, what="x + bias")
  np.testing.assert_array_equal(np.asarray(dx), cotangent.astype(np.float32))
  tolerances.assert_close(dbias, expected_dbias, num_terms=6, what="dbias")
