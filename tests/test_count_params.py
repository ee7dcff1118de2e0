"""count_params: parameter counts of the model files vs. closed-form formulas and Table 7.

The formulas below count, by hand from the sizes, every weight of a T5.1.1-style
encoder-decoder (projections, gated MLPs, RMS norm scales, stack-shared relative-position
tables, routers, untied input and output embeddings); the counts from `jax.eval_shape`
must equal them exactly, and the paper's Table 7 totals within 3%.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gin
import jax
import pytest

from colt5_flax import count_params, gin_utils

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

VOCAB = 32128
HEAD_DIM = 64
BUCKETS = 32
# d_model, layers, T5 heads, T5 d_ff (paper Table 7; T5.1.1 sizes).
T5_SIZES = {
    "base": (768, 12, 12, 2048),
    "large": (1024, 24, 16, 2816),
    "xl": (2048, 24, 32, 5120),
}
# CoLT5 light heads, heavy heads, light MLP, heavy MLP (paper Table 7).
COLT5_SIZES = {
    "base": (4, 8, 1024, 8192),
    "large": (4, 12, 1408, 11264),
    "xl": (8, 24, 2560, 20480),
}
# The paper's Table 7, in millions.
PAPER_MILLIONS = {
    ("colt5", "base"): 433,
    ("longt5_tglobal", "base"): 248,
    ("colt5", "large"): 1462,
    ("longt5_tglobal", "large"): 783,
    ("colt5", "xl"): 5297,
    ("longt5_tglobal", "xl"): 2850,
}


def attention_params(d, heads, kv_heads=None):
  """q, k, v, o projections without biases."""
  kv_heads = heads if kv_heads is None else kv_heads
  return 2 * d * heads * HEAD_DIM + 2 * d * kv_heads * HEAD_DIM


def gated_mlp_params(d, hidden):
  return 3 * d * hidden  # wi_0, wi_1, wo


def expected_count(kind, size, *, cross_kv_heads=None):
  d, layers, heads, mlp = T5_SIZES[size]
  if cross_kv_heads is None:
    cross_kv_heads = 1 if kind == "colt5" else heads
  embeddings = 2 * VOCAB * d  # input embedding + untied output projection
  decoder_layer = (
      attention_params(d, heads)  # causal self-attention
      + attention_params(d, heads, cross_kv_heads)
      + gated_mlp_params(d, mlp)
      + 3 * d  # three pre-norms
  )
  decoder = layers * decoder_layer + heads * BUCKETS + d  # + causal table, final norm
  if kind == "colt5":
    light_heads, heavy_heads, light_mlp, heavy_mlp = COLT5_SIZES[size]
    encoder_layer = (
        attention_params(d, light_heads)
        + attention_params(d, heavy_heads)
        + gated_mlp_params(d, light_mlp)
        + gated_mlp_params(d, heavy_mlp)
        + 3 * d  # query, key/value and feedforward routers (one d-vector each)
        + 2 * d
    )
    tables = (light_heads + heavy_heads) * BUCKETS  # light and heavy position tables
  else:
    encoder_layer = attention_params(d, heads) + gated_mlp_params(d, mlp) + 2 * d
    tables = heads * BUCKETS
    if kind == "longt5_tglobal":
      encoder_layer += d  # the global tokens' layer norm
      tables *= 2  # local and global-side tables
  encoder = layers * encoder_layer + tables + d
  return embeddings + encoder + decoder


def count_of(files, bindings=()):
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags([str(CONFIGS)], list(files), list(bindings))
    params = count_params.abstract_params(count_params.model_from_gin())
  finally:
    gin.clear_config()
  # Shapes only: nothing was allocated.
  leaves = jax.tree_util.tree_leaves(params)
  assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  return count_params.count(params), count_params.count_by_group(params)


@pytest.mark.parametrize("size", sorted(T5_SIZES))
@pytest.mark.parametrize("kind", ["colt5", "longt5_tglobal", "longt5_local", "t5_1_1"])
def test_count_equals_the_closed_form(kind, size):
  total, groups = count_of([f"models/{kind}_{size}.gin"])
  assert total == expected_count(kind, size)
  d = T5_SIZES[size][0]
  assert groups["token_embedder"] == groups["logits_dense"] == VOCAB * d
  assert sum(groups.values()) == total


@pytest.mark.parametrize("kind, size", sorted(PAPER_MILLIONS))
def test_count_matches_the_paper_table_7(kind, size):
  total, _ = count_of([f"models/{kind}_{size}.gin"])
  paper = PAPER_MILLIONS[(kind, size)] * 1e6
  assert abs(total - paper) / paper < 0.03
  # In fact within 0.2% (the paper rounds to millions).
  assert abs(total - paper) / paper < 0.002


def test_ablation_changes_the_count_as_it_should():
  """Multi-head cross-attention adds (heads - 1) K and V heads per decoder layer."""
  total, _ = count_of(
      ["models/colt5_base.gin", "ablations/multi_head_cross_attention.gin"]
  )
  assert total == expected_count("colt5", "base", cross_kv_heads=12)
  d, layers, heads, _ = T5_SIZES["base"]
  assert total - expected_count("colt5", "base") == layers * 2 * d * (heads - 1) * HEAD_DIM


def test_count_is_independent_of_the_traced_length():
  files = ["models/colt5_tiny.gin"]
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags([str(CONFIGS)], files, [])
    model = count_params.model_from_gin()
    counts = {
        length: count_params.count(count_params.abstract_params(model, input_length=length))
        for length in (64, 512, 1000)
    }
  finally:
    gin.clear_config()
  assert len(set(counts.values())) == 1


def test_format_report_ends_with_the_bare_total():
  report = count_params.format_report({"encoder": 1_000, "decoder": 234})
  lines = report.splitlines()
  assert lines[-1] == "1234"
  assert lines[0].split() == ["encoder", "1,000"]
  assert "1,234" in lines[-2]


def test_missing_model_macro_is_named():
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="MODEL"):
      count_params.model_from_gin()
  finally:
    gin.clear_config()


def test_command_line_prints_the_count_last():
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "colt5_flax.count_params",
          "--gin_file=models/colt5_base.gin",
          "--gin.NUM_DECODER_LAYERS=6",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  d, layers, heads, mlp = T5_SIZES["base"]
  six_fewer_layers = 6 * (
      attention_params(d, heads) + attention_params(d, heads, 1) + gated_mlp_params(d, mlp)
      + 3 * d
  )
  assert int(lines[-1]) == expected_count("colt5", "base") - six_fewer_layers
  assert [line.split()[0] for line in lines[:-2]] == [
      "decoder", "encoder", "logits_dense", "token_embedder",
  ]


def test_command_line_rejects_an_unknown_macro():
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "colt5_flax.count_params",
          "--gin_file=models/colt5_base.gin",
          "--gin.EMBED_DIMS=6",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode != 0
  assert "EMBED_DIMS" in result.stderr and "EMBED_DIM" in result.stderr
