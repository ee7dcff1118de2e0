"""scripts/matmul_floor.py: the products it collects from a benchmark case, and their FLOPs.

The forward's products must add up to the benchmark's analytic FLOP count of the same case
(`benchmarking.cases.case_flops`, itself checked against sums written out by hand in
tests/test_benchmark.py); the FLOPs of one product are checked on hand-computed cases.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import matmul_floor  # noqa: E402
from benchmarking import cases  # noqa: E402
from benchmarking.cases import Case  # noqa: E402


def test_product_flops_by_hand():
  # [3, 4] · [4, 5]: 3·5 outputs, 4 terms each.
  assert matmul_floor.product_flops((3, 4), (4, 5), (((1,), (0,)), ((), ()))) == 2 * 3 * 5 * 4
  # Batched over 2 heads, right operand transposed: [2, 6, 8] · [2, 7, 8] -> [2, 6, 7].
  numbers = (((2,), (2,)), ((0,), (0,)))
  assert matmul_floor.product_flops((2, 6, 8), (2, 7, 8), numbers) == 2 * 2 * 6 * 7 * 8
  # A weight gradient: xᵀ·g contracting batch and length, [1, 9, 3] · [1, 9, 5] -> [3, 5].
  numbers = (((0, 1), (0, 1)), ((), ()))
  assert matmul_floor.product_flops((1, 9, 3), (1, 9, 5), numbers) == 2 * 3 * 5 * 9


@pytest.mark.parametrize("kind", ["colt5", "longt5_tglobal"])
def test_forward_products_add_up_to_the_analytic_count(kind):
  case = Case(kind=kind, scope="layer", mode="fwd", length=256, width="tiny")
  products = matmul_floor.case_products(case)
  flops = sum(
      count * matmul_floor.product_flops(lhs.shape, rhs.shape, numbers)
      for (lhs, rhs, numbers), count in products.items()
  )
  assert flops == cases.case_flops(case)


def test_time_product_reports_the_product_it_ran():
  import jax.numpy as jnp
  from jax import core

  lhs = core.ShapedArray((16, 32), jnp.float32)
  rhs = core.ShapedArray((32, 8), jnp.float32)
  seconds, flops = matmul_floor.time_product(lhs, rhs, (((1,), (0,)), ((), ())), repeats=2)
  assert seconds > 0
  assert flops == 2 * 16 * 8 * 32
