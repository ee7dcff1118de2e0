r"""A benchmark case's matmul floor: every product of its program, each timed alone.

  .venv/bin/python scripts/matmul_floor.py --kind=colt5 --mode=fwd_bwd --length=16384 \
    [--width=base] [--scope=layer] [--repeats=5]

Traces the case exactly as `scripts/benchmark.py` builds it (`benchmarking.ours`), collects
every `dot_general` of its jaxpr (forward and, for `fwd_bwd`, the backward's products),
and times each distinct one alone: a jitted `lax.dot_general` with the same shapes,
dimension numbers and dtype on random operands (median of `--repeats` runs). The sum,
weighted by how often each product occurs, is the time the case's matmuls take one after
the other at the rate the library reaches on their shapes: when the whole case runs near
it, what is left to gain is in the products themselves, not in the operations around them
(docs/benchmarks.md, "Where the time goes"). Run it on an idle machine.
"""

from __future__ import annotations

import collections
import math
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmarking import case_flags  # noqa: E402  (defines --kind, --mode, --length, ...)

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of each product (median).")


def case_products(case) -> collections.Counter:
  """{(lhs aval, rhs aval, dimension_numbers): count} of the case's program."""
  import jax
  from benchmarking import ours

  products = collections.Counter()

  def collect(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        lhs, rhs = (var.aval for var in eqn.invars)
        products[(lhs, rhs, eqn.params["dimension_numbers"])] += 1
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr or Jaxpr
          if hasattr(inner, "eqns"):
            collect(inner)

  # `prepare_case` traces and lowers the step inside its gin scope: read the jaxpr of that
  # trace as it is lowered (as scripts/profile_ops.py keeps the compiled program).
  ours.prepare_case_observed(
      case, jax.stages.Traced, "lower", lambda traced, _: collect(traced.jaxpr.jaxpr)
  )
  return products


def product_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
  """2 × (output elements) × (contracted size) of one `dot_general`."""
  (_, rhs_contract), (_, rhs_batch) = dimension_numbers
  size = 1
  for extent in lhs_shape:
    size *= extent  # the left operand's batch, free and contracted axes
  for axis, extent in enumerate(rhs_shape):
    if axis not in rhs_contract and axis not in rhs_batch:
      size *= extent  # the right operand's free axes
  return 2 * size


def time_product(lhs, rhs, dimension_numbers, repeats: int) -> tuple[float, float]:
  """(seconds, FLOPs) of one product alone: the median of `repeats` runs after a warm-up."""
  import jax
  from benchmarking import measure

  keys = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(keys[0], lhs.shape).astype(lhs.dtype)
  b = jax.random.normal(keys[1], rhs.shape).astype(rhs.dtype)
  product = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dimension_numbers))
  timing = measure.time_runs(
      lambda: product(a, b).block_until_ready(),
      warmup=1,
      repeats=repeats,
      max_case_s=math.inf,
  )
  return timing["ms"] / 1e3, float(product_flops(lhs.shape, rhs.shape, dimension_numbers))


def main(argv):
  del argv
  case = case_flags.case()
  products = case_products(case)
  rows, total_s, total_flops = [], 0.0, 0.0
  for (lhs, rhs, numbers), count in products.items():
    seconds, flops = time_product(lhs, rhs, numbers, _REPEATS.value)
    rows.append((count * seconds, count, lhs, rhs, numbers, seconds, flops))
    total_s += count * seconds
    total_flops += count * flops
  print(
      f"{case.kind} {case.scope} {case.mode} {case.length} ({case.width}): "
      f"{sum(products.values())} products, {total_flops / 1e9:.1f} GFLOP; timed alone "
      f"they take {total_s * 1e3:.0f} ms ({total_flops / total_s / 1e9:.1f} GFLOP/s)"
  )
  print("\n| product | dimension numbers | calls | ms each | GFLOP/s |\n|---|---|---|---|---|")
  for _, count, lhs, rhs, numbers, seconds, flops in sorted(rows, key=lambda r: -r[0]):
    print(
        f"| {lhs.str_short()} · {rhs.str_short()} | {numbers} | {count} "
        f"| {seconds * 1e3:.1f} | {flops / seconds / 1e9:.1f} |"
    )


if __name__ == "__main__":
  app.run(main)
