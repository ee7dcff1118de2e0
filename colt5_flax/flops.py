"""Analytic matmul FLOPs of one encoder layer of each kind, as our layers execute it.

    python -m colt5_flax.flops --gin_file=models/colt5_base.gin --lengths=4096,16384

The paper compares encoder layers by FLOPs (Table 2: about `12nd² + 2n²d` for T5,
`12nd² + n²d/8` for LongT5, `7¼nd² + n²d/84` for CoLT5; docs/paper.md). This module counts
the matmuls our code runs (2 FLOPs per multiply-add), branch by branch: local attention
as executed in blocks of `local_radius + 1` queries against 3 blocks of keys (masked to
the radius after the matmul), transient-global keys and values for the global tokens,
CoLT5's heavy branches at their routed-token counts (`routing.RoutingCapacity`). The
sizes come from the model's gin file (`EncoderDims.from_gin`), so the count follows the
configuration. Elementwise work (softmax, norms, GELU, routing) is not counted.
scripts/benchmark.py divides these counts by measured times; the README quotes ratios.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from absl import app, flags

from colt5_flax import gin_utils, model_files
from colt5_flax.layers.routing import RoutingCapacity

KINDS = tuple(model_files.ARCHITECTURES)


@dataclasses.dataclass(frozen=True)
class EncoderDims:
  """The sizes of one encoder layer that its FLOPs depend on.

  Attributes:
    kind: 'colt5', 'longt5_tglobal', 'longt5_local' or 't5'.
    embed_dim, head_dim, num_layers: d_model, per-head width, encoder depth.
    num_heads, mlp_dim: T5/LongT5 heads and MLP width (CoLT5: its decoder's).
    local_radius: local attention radius (LongT5, CoLT5's light branch); None for T5.
    global_block_size: TGlobal tokens per global block; None otherwise.
    num_light_heads, num_heavy_heads, light_mlp_dim, heavy_mlp_dim: CoLT5's branches.
    capacity: CoLT5's routed-token counts.
  """

  kind: str
  embed_dim: int
  head_dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  local_radius: int | None = None
  global_block_size: int | None = None
  num_light_heads: int | None = None
  num_heavy_heads: int | None = None
  light_mlp_dim: int | None = None
  heavy_mlp_dim: int | None = None
  capacity: RoutingCapacity | None = None

  @classmethod
  def from_gin(cls, kind: str) -> EncoderDims:
    """The sizes the parsed gin configuration (a model file of `kind`) gives the encoder."""
    if kind not in KINDS:
      raise ValueError(f"Unknown encoder kind {kind!r}; expected one of {list(KINDS)}")
    macro = model_files.macro
    dims = dict(
        kind=kind,
        embed_dim=macro("EMBED_DIM"),
        head_dim=macro("HEAD_DIM"),
        num_layers=macro("NUM_ENCODER_LAYERS"),
        num_heads=macro("NUM_HEADS"),
        mlp_dim=macro("MLP_DIM"),
    )
    if kind != "t5":
      dims["local_radius"] = macro("LOCAL_RADIUS")
    if kind == "longt5_tglobal":
      dims["global_block_size"] = macro("GLOBAL_BLOCK_SIZE")
    if kind == "colt5":
      dims |= dict(
          num_light_heads=macro("NUM_LIGHT_HEADS"),
          num_heavy_heads=macro("NUM_HEAVY_HEADS"),
          light_mlp_dim=macro("LIGHT_MLP_DIM"),
          heavy_mlp_dim=macro("HEAVY_MLP_DIM"),
          capacity=model_files.build(RoutingCapacity),
      )
    return cls(**dims)

  def routed_counts(self, length: int) -> dict[str, int]:
    """CoLT5's routed tokens at `length`: queries, keys/values, feedforward."""
    if self.capacity is None:
      raise ValueError(f"a {self.kind} encoder routes no tokens")
    return {
        "queries": self.capacity.count(length),
        "key_values": self.capacity.count(length, key_values=True),
        "feedforward": self.capacity.count(length),
    }


def dense(tokens: int, d_in: int, d_out: int) -> int:
  """A [tokens, d_in] × [d_in, d_out] matmul."""
  return 2 * tokens * d_in * d_out


def gated_mlp(tokens: int, embed: int, hidden: int) -> int:
  """T5.1.1's gated MLP: wi_0, wi_1 and wo."""
  return 3 * dense(tokens, embed, hidden)


def blocked_window(dims: EncoderDims, length: int, heads: int, extra_keys: int = 0) -> int:
  """q·kᵀ and weights·v of blocked local attention: every query block of
  `local_radius + 1` tokens against 3 blocks of keys, plus `extra_keys` (global tokens)."""
  block_len = dims.local_radius + 1
  padded = -(-length // block_len) * block_len
  return 2 * 2 * padded * (3 * block_len + extra_keys) * heads * dims.head_dim


def layer_flops(dims: EncoderDims, length: int) -> dict[str, int]:
  """Forward matmul FLOPs of one encoder layer on one row of `length` tokens, by branch."""
  d, head_dim = dims.embed_dim, dims.head_dim
  inner = dims.num_heads * head_dim
  if dims.kind == "t5":
    return {
        "attention_projections": 4 * dense(length, d, inner),
        "attention_scores": 2 * 2 * length * length * inner,
        "mlp": gated_mlp(length, d, dims.mlp_dim),
    }
  if dims.kind == "longt5_local":
    return {
        "attention_projections": 4 * dense(length, d, inner),
        "attention_scores": blocked_window(dims, length, dims.num_heads),
        "mlp": gated_mlp(length, d, dims.mlp_dim),
    }
  if dims.kind == "longt5_tglobal":
    num_globals = length // dims.global_block_size
    return {
        # Global tokens get their own K and V projections every layer (LongT5 §2.1.2).
        "attention_projections": 4 * dense(length, d, inner) + 2 * dense(num_globals, d, inner),
        "attention_scores": blocked_window(dims, length, dims.num_heads, num_globals),
        "mlp": gated_mlp(length, d, dims.mlp_dim),
    }
  if dims.kind == "colt5":
    routed = dims.routed_counts(length)
    light, heavy = dims.num_light_heads * head_dim, dims.num_heavy_heads * head_dim
    queries, key_values = routed["queries"], routed["key_values"]
    return {
        "light_attention": 4 * dense(length, d, light)
        + blocked_window(dims, length, dims.num_light_heads),
        "light_mlp": gated_mlp(length, d, dims.light_mlp_dim),
        "routers": 3 * dense(length, d, 1),
        "heavy_attention": 2 * dense(queries, d, heavy)
        + 2 * dense(key_values, d, heavy)
        + 2 * 2 * queries * key_values * heavy,
        "heavy_mlp": gated_mlp(routed["feedforward"], d, dims.heavy_mlp_dim),
    }
  raise ValueError(f"kind={dims.kind!r}; expected one of {list(KINDS)}")


# ----------------------------------------------------------------------------- command line



def _define_flags() -> None:
  # Defined only when this module is the program: importers (the benchmark) have their own.
  flags.DEFINE_list("lengths", ["4096", "16384"], "Input lengths to count.")
  flags.DEFINE_enum(
      "kind", None, list(KINDS), "The model file's encoder kind (default: from its name)."
  )


def _kind_of(gin_files: Sequence[str]) -> str:
  if gin_utils.FLAGS.kind:
    return gin_utils.FLAGS.kind
  for kind, architecture in model_files.ARCHITECTURES.items():
    if any(f"/{architecture}_" in f"/{name}" for name in gin_files):
      return kind
  raise app.UsageError(f"Cannot tell the encoder kind of {list(gin_files)}: pass --kind")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  flags_ = gin_utils.FLAGS
  with model_files.parsed(flags_.gin_file or [], flags_.gin_bindings, flags_.gin_search_paths):
    dims = EncoderDims.from_gin(_kind_of(flags_.gin_file or []))
  for length in (int(value) for value in flags_.lengths):
    branches = layer_flops(dims, length)
    parts = ", ".join(f"{name} {value / 1e9:.2f}" for name, value in branches.items())
    print(f"{dims.kind} n={length}: {sum(branches.values()) / 1e9:.2f} GFLOP per layer ({parts})")


if __name__ == "__main__":
  _define_flags()
  gin_utils.run(main)
