"""Products with gradients that XLA:CPU computes without transposing their producers
(docs/benchmarks.md, "Where the time goes").

`dense(x, kernel, in_axes)` contracts x's last `in_axes` axes with kernel's first ones,
as `jnp.einsum` would, and `einsum(spec, a, b)` is `jnp.einsum` of two operands. Only their
gradients differ from autodiff's: autodiff computes the kernel's gradient as the product
in the other order (g's out axes against x's tokens) and then transposes it, and XLA:CPU
folds that transpose into the operation that makes g, the elementwise fusion of the
activation's (or the softmax's) derivative, which then reads each of its inputs with a
stride of a row. Here each gradient is one product written in its operand's own index
order (the kernel's is xᵀ·g, contracting the tokens as they lie). One B-width layer's
forward+backward at 16k tokens, side by side in one process (2-core AMD EPYC): CoLT5
6.2 s -> 5.2 s, LongT5-TGlobal 12.8 s -> 11.0 s.
"""

import math

import jax
import jax.numpy as jnp


def dense(x: jax.Array, kernel: jax.Array, in_axes: int = 1) -> jax.Array:
  """x [..., *kernel.shape[:in_axes]] · kernel [*in, *out] -> [..., *out], in x's dtype.

  Both operands should already be in the computation's dtype; the kernel's gradient is
  accumulated in float32 and returned in the kernel's dtype.
  """
  if x.shape[x.ndim - in_axes :] != kernel.shape[:in_axes]:
    raise ValueError(
        f"dense: the last {in_axes} axes of x {x.shape} do not match the first of kernel "
        f"{kernel.shape}"
    )
  return _dense(x, kernel, in_axes)


def _contract(x, kernel, in_axes):
  contracting = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes)))
  return jax.lax.dot_general(x, kernel, (contracting, ((), ())))


_dense = jax.custom_vjp(_contract, nondiff_argnums=(2,))


def _dense_forward(x, kernel, in_axes):
  return _contract(x, kernel, in_axes), (x, kernel)


def _dense_backward(in_axes, residuals, grad):
  x, kernel = residuals
  lead = x.ndim - in_axes
  out_axes = kernel.ndim - in_axes
  # dx = g · kernelᵀ over the out axes.
  dx = jax.lax.dot_general(
      grad,
      kernel,
      ((tuple(range(lead, lead + out_axes)), tuple(range(in_axes, kernel.ndim))), ((), ())),
  )
  # dkernel = xᵀ · g over the leading (token) axes, in the kernel's [*in, *out] order.
  dkernel = jax.lax.dot_general(
      x,
      grad,
      ((tuple(range(lead)), tuple(range(lead))), ((), ())),
      preferred_element_type=jnp.float32,
  )
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense.defvjp(_dense_forward, _dense_backward)


def einsum(spec: str, a: jax.Array, b: jax.Array, *, preferred_element_type=None) -> jax.Array:
  """`jnp.einsum(spec, a, b)` of two operands whose gradients are einsums written in the
  operands' own index order (`out,b->a` and `a,out->b`), as `dense` does for a kernel:
  autodiff's gradient is the product in another order and a transpose, which XLA:CPU
  folds into the elementwise fusion that makes the incoming gradient (attention: the
  softmax's derivative). Every index of `spec` must appear in two of its three terms.
  """
  return _einsum(spec, preferred_element_type, a, b)


def _einsum_impl(spec, preferred_element_type, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=preferred_element_type)


_einsum = jax.custom_vjp(_einsum_impl, nondiff_argnums=(0, 1))


def _einsum_forward(spec, preferred_element_type, a, b):
  return _einsum_impl(spec, preferred_element_type, a, b), (a, b)


def _einsum_backward(spec, preferred_element_type, residuals, grad):
  del preferred_element_type
  a, b = residuals
  inputs, out = spec.split("->")
  lhs, rhs = inputs.split(",")
  da = _product(out, rhs, lhs, grad, b)
  db = _product(lhs, out, rhs, a, grad)
  return da.astype(a.dtype), db.astype(b.dtype)


def _indices(term: str) -> list[str]:
  """An einsum term's indices, a leading `...` as one."""
  return (["..."] if term.startswith("...") else []) + list(term.replace("...", ""))


def _extents(term: str, shape) -> dict[str, int]:
  """{index: extent} of one einsum operand; `...` is one index, the product of its axes."""
  named = list(term.replace("...", ""))
  extents = dict(zip(named, shape[len(shape) - len(named) :], strict=True))
  if term.startswith("..."):
    extents["..."] = math.prod(shape[: len(shape) - len(named)])
  return extents


def _product(x_term: str, y_term: str, out_term: str, x: jax.Array, y: jax.Array):
  """`einsum(x, y -> out)` in float32, as one product that reads its larger operand in
  that operand's own layout when the result is no larger: the operand goes left when its
  contracted indices follow its free ones, right when they lead them, and the (smaller)
  result is transposed after. Left to XLA:CPU, the heavy branch's key gradient dSᵀ·Q first
  copied the [8, 1024, 2048] logits' gradient into [8, 2048, 1024] order."""
  (big, big_term), (small, small_term) = sorted(
      [(x, x_term), (y, y_term)], key=lambda operand: -operand[0].size
  )
  big_idx, small_idx, out_idx = _indices(big_term), _indices(small_term), _indices(out_term)
  extents = _extents(big_term, big.shape) | _extents(small_term, small.shape)
  batch = [i for i in big_idx if i in out_idx and i in small_idx]
  contracted = [i for i in big_idx if i not in out_idx]
  rest = big_idx[len(batch) :]
  arranged = None
  if (
      contracted
      and big_idx[: len(batch)] == batch
      and math.prod(extents[i] for i in out_idx) <= big.size
  ):
    free = [i for i in rest if i not in contracted]
    small_free = [i for i in small_idx if i in out_idx and i not in batch]
    if rest[-len(contracted) :] == contracted:
      arranged = (f"{big_term},{small_term}", (big, small), batch + free + small_free)
    elif rest[: len(contracted)] == contracted:
      arranged = (f"{small_term},{big_term}", (small, big), batch + small_free + free)
  if arranged is None:
    return jnp.einsum(f"{x_term},{y_term}->{out_term}", x, y, preferred_element_type=jnp.float32)
  inputs, operands, natural = arranged
  natural = "".join(natural)
  result = jnp.einsum(f"{inputs}->{natural}", *operands, preferred_element_type=jnp.float32)
  return result if natural == out_term else jnp.einsum(f"{natural}->{out_term}", result)


_einsum.defvjp(_einsum_forward, _einsum_backward)


def add_broadcast(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x + bias, bias broadcast over x's leading axes (those it lacks or has of size 1, all
  before its other axes). Its gradient sums those axes as a product with a vector of ones:
  autodiff's sum over the major axes fused with the product that makes the incoming
  gradient, and XLA:CPU ran that fusion at a fraction of memory speed (the local windows'
  position bias: ~300 ms for [128 blocks, 4, 128, 384] -> [4, 128, 384] at 16k)."""
  return _add_broadcast(x, bias)


@jax.custom_vjp
def _add_broadcast(x, bias):
  return x + bias


def _add_broadcast_forward(x, bias):
  return x + bias, bias.shape


def _add_broadcast_backward(bias_shape, grad):
  padded = (1,) * (grad.ndim - len(bias_shape)) + tuple(bias_shape)
  summed = [axis for axis, size in enumerate(padded) if size == 1 and grad.shape[axis] != 1]
  lead = next((axis for axis, size in enumerate(padded) if size != 1), grad.ndim)
  if not summed:
    dbias = grad
  elif max(summed) < lead:
    dbias = sum_leading_axes(grad, lead)
  else:
    dbias = jnp.sum(grad, axis=tuple(summed), keepdims=True)
  return grad, dbias.reshape(bias_shape).astype(grad.dtype)


def sum_leading_axes(x: jax.Array, lead: int) -> jax.Array:
  """x summed over its first `lead` axes, as a product with a vector of ones: XLA:CPU ran
  the same sum, fused with the operation that makes x, at a fraction of memory speed."""
  rows = x.reshape(-1, math.prod(x.shape[lead:]))
  total = jnp.dot(jnp.ones((rows.shape[0],), rows.dtype), rows)
  return total.reshape(x.shape[lead:])


_add_broadcast.defvjp(_add_broadcast_forward, _add_broadcast_backward)
