"""The flags that name one benchmark case, for the tools that study a single case
(scripts/profile_ops.py, scripts/matmul_floor.py). Importing this module defines them."""

from __future__ import annotations

from absl import flags

KIND = flags.DEFINE_string("kind", "colt5", "Model kind (scripts/benchmark.py --kinds).")
MODE = flags.DEFINE_enum("mode", "fwd_bwd", ["fwd", "fwd_bwd"], "Forward or training.")
LENGTH = flags.DEFINE_integer("length", 16384, "Input tokens.")
WIDTH = flags.DEFINE_enum("width", "base", ["tiny", "base", "large", "xl"], "Model size.")
SCOPE = flags.DEFINE_enum("scope", "layer", ["layer", "encoder"], "One layer or the encoder.")


def case():
  """The `benchmarking.cases.Case` the flags name."""
  from benchmarking.cases import Case

  return Case(
      kind=KIND.value, scope=SCOPE.value, mode=MODE.value, length=LENGTH.value, width=WIDTH.value
  )
