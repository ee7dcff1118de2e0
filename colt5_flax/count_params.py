"""Parameter count of a gin-configured model, with nothing allocated.

    python -m colt5_flax.count_params --gin_file=models/colt5_base.gin
    python -m colt5_flax.count_params --gin_file=models/colt5_base.gin \\
      --gin_file=ablations/multi_head_cross_attention.gin

The gin files are parsed as the training entry point parses them (`--gin_file`,
`--gin.NAME=VALUE`, `--gin_search_paths`; see `gin_utils`); the configuration's `MODEL`
macro is built and its parameters initialised under `jax.eval_shape`, which traces the
initialisation and returns shapes only: an XL model is counted on a laptop in seconds.

Output: one line per top-level parameter group (token embedding, encoder, decoder,
output projection) and, on the last line, the total as a bare integer, so scripts can
read it with `tail -1`.

The paper's Table 7 counts (docs/paper.md, Sizes) are met to within 0.2% by the model files in
`configs/models/` (untied input and output embeddings of 32128 rows, multi-head
cross-attention for LongT5, multi-query for CoLT5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags

from colt5_flax import gin_utils, model_files

PyTree = Any
FLAGS = flags.FLAGS

# Shapes used to trace the initialisation. Parameters do not depend on them; the input
# spans several local-attention blocks so every encoder kind traces its usual path.
_INIT_INPUT_LENGTH = 512
_INIT_TARGET_LENGTH = 8


# The configuration's MODEL: built as every caller builds a model from its gin files.
model_from_gin = model_files.model_from_gin


def abstract_params(
    model,
    input_length: int = _INIT_INPUT_LENGTH,
    target_length: int = _INIT_TARGET_LENGTH,
) -> PyTree:
  """The model's parameters as `jax.ShapeDtypeStruct`s (`jax.eval_shape`: no allocation).

  Args:
    model: a `model.EncoderDecoderModel` (anything with t5x's `get_initial_variables`).
    input_length, target_length: token lengths of the traced batch of one row.
  Returns:
    the (boxed, logically partitioned) `params` collection.
  """
  shapes = {
      "encoder_input_tokens": (1, input_length),
      "decoder_input_tokens": (1, target_length),
      "decoder_target_tokens": (1, target_length),
  }
  variables = jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)
  )
  return variables["params"]


def count(tree: PyTree) -> int:
  """Total number of scalars in the leaves of `tree` (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def count_by_group(params: Mapping[str, PyTree]) -> dict[str, int]:
  """`{top-level parameter group: count}`, e.g. token_embedder, encoder, decoder."""
  return {name: count(subtree) for name, subtree in params.items()}


def format_report(groups: Mapping[str, int]) -> str:
  """The printed table; its last line is the total as a bare integer."""
  total = sum(groups.values())
  width = max(len(name) for name in [*groups, "total"])
  lines = [f"{name:<{width}}  {value:>15,}" for name, value in groups.items()]
  lines.append(f"{'total':<{width}}  {total:>15,}  ({total / 1e6:,.1f}M)")
  lines.append(str(total))
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  gin_utils.parse_gin_flags(FLAGS.gin_search_paths, FLAGS.gin_file, FLAGS.gin_bindings)
  gin_utils.check_required_macros()
  params = abstract_params(model_from_gin())
  print(format_report(count_by_group(params)))


if __name__ == "__main__":
  gin_utils.run(main)
