"""The PyTorch peers, timed on torch's CPU backend at our model's sizes.

- `colt5_attention`: the `colt5-attention` package's `ConditionalRoutedTransformerBlock`,
  sized like our CoLT5 model file (the width's `colt5_<width>.gin`);
- `hf_longt5_tglobal`: transformers' LongT5 transient-global `LongT5Block`, sized like
  `longt5_tglobal_<width>.gin`.

Either is skipped with a note when its package is missing. Nothing here imports torch,
transformers or jax at module level.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarking import measure

# The model file (encoder kind) each peer stands in for.
MODEL_KIND = {"colt5_attention": "colt5", "hf_longt5_tglobal": "longt5_tglobal"}


def layer_flops(kind: str, dims, length: int) -> dict[str, int]:
  """Forward matmul FLOPs of one peer block on one row (`dims`: its model's sizes)."""
  from colt5_flax import flops

  d, head_dim = dims.embed_dim, dims.head_dim
  if kind == "colt5_attention":  # ungated MLPs, and one null key/value in heavy attention
    routed = dims.routed_counts(length)
    light, heavy = dims.num_light_heads * head_dim, dims.num_heavy_heads * head_dim
    queries, key_values = routed["queries"], routed["key_values"]
    return {
        "light_attention": 4 * flops.dense(length, d, light)
        + flops.blocked_window(dims, length, dims.num_light_heads),
        "light_mlp": 2 * flops.dense(length, d, dims.light_mlp_dim),
        "routers": 3 * flops.dense(length, d, 1),
        "heavy_attention": 2 * flops.dense(queries, d, heavy)
        + 2 * flops.dense(key_values, d, heavy)
        + 2 * 2 * queries * (key_values + 1) * heavy,
        "heavy_mlp": 2 * flops.dense(routed["feedforward"], d, dims.heavy_mlp_dim),
    }
  if kind == "hf_longt5_tglobal":  # transformers sums global blocks by a one-hot matmul
    counts = flops.layer_flops(dims, length)
    counts["global_aggregates"] = 2 * length * (length // dims.global_block_size) * d
    return counts
  raise ValueError(f"peer kind={kind!r}; expected one of {list(MODEL_KIND)}")


def _hf_tglobal_bytes(case, dims) -> int:
  """transformers' TGlobal keeps [batch, heads, n, 3 blocks + n/16] float32 arrays (bias,
  scores, weights) and a [batch, n, n/16] one-hot; the backward about doubles them."""
  length = case.length
  width = 3 * (dims.local_radius + 1) + length // dims.global_block_size
  arrays = 5 if case.mode == "fwd" else 9
  return 4 * case.batch * length * (arrays * dims.num_heads * width + width)


def _colt5_attention_block(dims, length: int):
  from colt5_attention import ConditionalRoutedTransformerBlock

  routed = dims.routed_counts(length)
  return ConditionalRoutedTransformerBlock(
      dim=dims.embed_dim,
      num_heavy_attn_tokens_q=routed["queries"],
      num_heavy_attn_tokens_kv=routed["key_values"],
      num_heavy_ff_tokens=routed["feedforward"],
      light_dim_head=dims.head_dim,
      light_heads=dims.num_light_heads,
      # Windows of radius + 1 seeing one window back and one ahead: 3 blocks of keys,
      # as our blocks.
      light_window_size=2 * (dims.local_radius + 1),
      heavy_dim_head=dims.head_dim,
      heavy_heads=dims.num_heavy_heads,
      light_ff_mult=dims.light_mlp_dim / dims.embed_dim,
      heavy_ff_mult=dims.heavy_mlp_dim / dims.embed_dim,
      # The paper's router: ε = 1, 50 iterations, no ε-scaling (docs/paper.md, Model).
      router_kwargs={"n_iters": 50, "eps": 1.0, "eps_init": None},
  )


def _hf_longt5_block(dims):
  from transformers import LongT5Config
  from transformers.models.longt5.modeling_longt5 import LongT5Block

  config = LongT5Config(
      d_model=dims.embed_dim,
      d_kv=dims.head_dim,
      d_ff=dims.mlp_dim,
      num_heads=dims.num_heads,
      encoder_attention_type="transient-global",
      local_radius=dims.local_radius,
      global_block_size=dims.global_block_size,
      feed_forward_proj="gated-gelu",
      dropout_rate=0.0,
      is_decoder=False,
  )
  return LongT5Block(config, has_relative_attention_bias=True)


def run_peer_case(case, dims) -> dict[str, Any]:
  """Times the peer block of `case` (a `cases.Case`) in this process."""
  try:
    import torch
  except ImportError:
    return {"skipped": True, "note": "torch is not installed"}
  row: dict[str, Any] = {"backend": "torch-cpu"}
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  if case.kind == "colt5_attention":
    try:
      block = _colt5_attention_block(dims, case.length)
    except ImportError:
      return row | {
          "skipped": True,
          "note": "colt5-attention is not installed (pip install colt5-attention)",
      }

    def forward(x, mask):
      return block(x, mask=mask)
  else:
    budget = measure.memory_budget_bytes(case.memory_budget_gb)
    if _hf_tglobal_bytes(case, dims) > budget:
      return row | {
          "skipped": True,
          "note": f"its [heads, n, n/16] arrays need ≈{_hf_tglobal_bytes(case, dims) / 2**30:.0f}"
          f" GiB > budget {budget / 2**30:.1f} GiB",
      }
    try:
      block = _hf_longt5_block(dims)
    except ImportError:
      return row | {"skipped": True, "note": "transformers is not installed"}

    def forward(x, mask):
      return block(x, attention_mask=mask)[0]

  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.dtype]
  block = block.to(torch_dtype).eval()
  batch, length, d = case.batch, case.length, dims.embed_dim
  x = torch.randn(batch, length, d, dtype=torch_dtype)
  mask_dtype = torch.bool if case.kind == "colt5_attention" else torch_dtype
  mask = torch.ones(batch, length, dtype=mask_dtype)
  if case.mode == "fwd":

    def run():
      with torch.inference_mode():
        forward(x, mask)
  else:
    x.requires_grad_(True)
    cotangent = torch.randn(batch, length, d, dtype=torch_dtype)

    def run():
      block.zero_grad(set_to_none=True)
      x.grad = None
      (forward(x, mask) * cotangent).sum().backward()

  row["compile_s"] = 0.0  # eager
  memory = measure.PeakMemory()
  memory.start()
  row |= measure.time_runs(
      run, warmup=case.warmup, repeats=case.repeats, max_case_s=case.max_case_s
  )
  return row | memory.stop()
