"""How far a computed tensor may sit from its reference: one formula for every test.

XLA's CPU kernels depend on the instruction set (SSE4.2, AVX2, AVX-512, AMX): they sum in
other orders and fuse other operations, so a tolerance read off one machine's errors is
not a tolerance. Every numerical comparison in tests/ derives its bound here instead.

The formula. Rounding to nearest makes each operation exact up to half an ulp, u = eps/2
(eps = 2^-23 for float32, 2^-7 for bfloat16: the spacing of numbers just above 1). A sum or
dot product of n terms, added in any order, then differs from the exact one by about
u·sqrt(n) of its size when the rounding errors have random signs (Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., §2.8 and §3.1; n·u is the worst case, which
random data never approaches). A network is `depth` such steps in a row, each followed by
a normalisation or a residual add, so that an error passes on at about its own size, and
the steps' independent errors add up the same random way. Hence

    max |got − expected|  ≤  slack · programs · eps · sqrt(num_terms · depth) · max |expected|

- num_terms: the widest contraction on the way (embedding, MLP hidden, keys attended).
- depth: contractions in sequence (attention counts 4: projection in, q·k, weights·v,
  projection out; an MLP 2; a backward pass doubles the forward depth).
- programs: 1 against a float64 reference (numpy, torch `.double()`): only ours rounds;
  2 when both sides run in float32 in different orders (scan vs loop, cache vs teacher
  forcing, one device vs eight), and each carries its own error.
- slack = 4: eps is already 2·u, and the 4 covers what the random-walk estimate leaves
  out: softmax, RMSNorm and GELU pass their inputs' relative error on multiplied by the
  size of their arguments (attention logits of a few units with these random weights),
  and the 3–4σ tail of the worst of a few thousand entries.

The bound is measured against the tensor's largest entry, not each entry (no elementwise
rtol): an entry that is a small difference of large terms keeps only absolute precision.
Where the terms are larger than the result (a sum that cancels, a loss that moves with its
logits), `scale=` names the size the error is relative to.
It is far below what a real bug moves (a missing mask, a wrong attention scale or a
perturbed bias changes outputs by 1e-2 to 1 of their scale): for float32 and the tiny test
models it stays under 5e-5 of the scale for a forward pass (n ≤ 96, depth ≤ 47) and 2.2e-4
for gradients (n = 512, depth ≤ 104). Measured on AMD EPYC under SSE4.2, AVX2 and the
default, the largest error was 0.19 of its bound (scan vs loop gradients); the logit that
failed rtol 1e-5 on an AVX-512 Xeon (off by 2.25e-5, max|logit| 5.2) is 0.16 of its bound.

Set COLT5_TOLERANCE_LOG=<file> to append each comparison's error/bound ratio to <file>
(one JSON line each): how close a machine comes to the bounds.
"""

import json
import math
import os

import ml_dtypes
import numpy as np

SLACK = 4.0


def eps(dtype=np.float32) -> float:
  """The spacing of `dtype` numbers just above 1 (2^-23 for float32, 2^-7 for bfloat16)."""
  return float(ml_dtypes.finfo(dtype).eps)


def relative_bound(
    *, num_terms: int, depth: int = 1, programs: int = 1, dtype=np.float32, slack=SLACK
) -> float:
  """The bound on max|got − expected| / max|expected| derived in the module docstring."""
  if num_terms < 1 or depth < 1 or programs not in (1, 2):
    raise ValueError(f"num_terms={num_terms}, depth={depth}, programs={programs}")
  return slack * programs * eps(dtype) * math.sqrt(num_terms * depth)


def assert_close(
    got,
    expected,
    *,
    num_terms: int,
    depth: int = 1,
    programs: int = 1,
    dtype=np.float32,
    slack=SLACK,
    scale=None,
    what: str = "",
):
  """Asserts max|got − expected| ≤ relative_bound(...) · scale (shapes equal).

  got, expected: arrays of any one shape. NaN or inf in either fails.
  scale: the size errors are relative to; max|expected| unless given (a sum's error is
    relative to the size of its terms, Σ|term|, when they cancel).
  """
  got = np.asarray(got, np.float64)
  expected = np.asarray(expected, np.float64)
  if got.shape != expected.shape:
    raise AssertionError(f"{what}: shape {got.shape} != expected {expected.shape}")
  bound = relative_bound(
      num_terms=num_terms, depth=depth, programs=programs, dtype=dtype, slack=slack
  )
  if got.size == 0:
    return
  scale = float(np.abs(expected).max() if scale is None else scale)
  error = np.abs(got - expected)
  worst = float(error.max())
  log = os.environ.get("COLT5_TOLERANCE_LOG")
  if log:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    ratio = worst / (bound * scale) if scale > 0 else float(worst > 0)
    with open(log, "a") as f:
      f.write(json.dumps(dict(test=test, what=what, ratio=ratio, bound=bound)) + "\n")
  if not (np.all(np.isfinite(got)) and np.isfinite(scale) and worst <= bound * scale):
    index = np.unravel_index(np.nanargmax(np.where(np.isnan(error), np.inf, error)), error.shape)
    raise AssertionError(
        f"{what}: max |got − expected| = {worst:.3g} = {worst / max(scale, 1e-300):.3g} of "
        f"the scale {scale:.3g}, above the bound {bound:.3g} (num_terms={num_terms}, "
        f"depth={depth}, programs={programs}, dtype={np.dtype(dtype).name}); worst at "
        f"{tuple(int(i) for i in index)}: got {got[index]!r}, expected {expected[index]!r}"
    )
