"""What the benchmark runs: a `Case` (one model, scope, mode and length) and its FLOPs.

Our encoders are built from the project's gin model files
(`configs/models/<architecture>_<width>.gin`, through `colt5_flax.model_files`), the same
files the trainer reads; their sizes (`flops.EncoderDims`) come from the same files, and so
do the peers' sizes. The whole-model scopes (`train_step`, `inference`) also take kinds
named `<kind>_mqa` and `<kind>_mha`: the model file with multi-query
(`NUM_CROSS_ATTENTION_KV_HEADS = 1`, CoLT5 §3.3) or multi-head (`None`) cross-attention in
its decoder, whatever the file's default (CoLT5: multi-query; LongT5, T5: multi-head).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from benchmarking import peers

KINDS = ("colt5", "longt5_tglobal", "longt5_local", "t5")
PEERS = tuple(peers.MODEL_KIND)
MODES = ("fwd", "fwd_bwd")
ENCODER_SCOPES = ("layer", "encoder")
# Whole encoder-decoder models (benchmarking.whole_model), each in one mode.
WHOLE_MODEL_SCOPES = {"train_step": "fwd_bwd", "inference": "fwd"}
SCOPES = ENCODER_SCOPES + tuple(WHOLE_MODEL_SCOPES)
# Decoder cross-attention variants of a kind: NUM_CROSS_ATTENTION_KV_HEADS.
CROSS_ATTENTION_VARIANTS = {"_mqa": 1, "_mha": None}


def base_kind(kind: str) -> str:
  """The model file's kind of `kind` ('longt5_tglobal_mqa' -> 'longt5_tglobal')."""
  for suffix in CROSS_ATTENTION_VARIANTS:
    if kind.endswith(suffix) and kind[: -len(suffix)] in KINDS:
      return kind[: -len(suffix)]
  return kind


def variant_bindings(kind: str) -> list[str]:
  """The gin bindings of a `_mqa`/`_mha` kind's cross-attention ([] for a plain kind)."""
  for suffix, kv_heads in CROSS_ATTENTION_VARIANTS.items():
    if kind.endswith(suffix) and kind[: -len(suffix)] in KINDS:
      return [f"NUM_CROSS_ATTENTION_KV_HEADS = {kv_heads}"]
  return []


def kinds_of_scope(scope: str) -> tuple[str, ...]:
  """The kinds a scope can run: whole models also their cross-attention variants."""
  if scope in WHOLE_MODEL_SCOPES:
    return KINDS + tuple(k + s for k in KINDS for s in CROSS_ATTENTION_VARIANTS)
  return KINDS


@dataclasses.dataclass(frozen=True)
class Case:
  """One timed program.

  Attributes:
    kind: one of ours (`KINDS`; for whole models also `<kind>_mqa`, `<kind>_mha`) or a
      PyTorch peer (`PEERS`).
    scope: 'layer' (one encoder layer), 'encoder' (a whole encoder), 'peer', or a whole
      encoder-decoder model: 'train_step' or 'inference' (`benchmarking.whole_model`).
    mode: 'fwd' (inference) or 'fwd_bwd' (training: gradients of a fixed cotangent, or
      for 'train_step' the trainer's own step).
    length: input tokens per row.
    width: the model size, as in `configs/models/*_<width>.gin` (tiny, base, large, xl).
    batch, dtype: rows per batch and activation dtype.
    warmup, repeats, max_case_s: untimed runs, timed runs, and a cap on the timed runs.
    num_layers: encoder depth for scope 'encoder' (None: the model file's).
    scan_layers, remat: the encoder's `SCAN_LAYERS` and `REMAT_POLICY` (None: scan and
      remat 'none' for an encoder, the model file's own for a whole model).
    matmul_size: side of the matmul timed just before the case (None: 2048).
    memory_budget_gb: what the case may use (None: 80% of the available memory).
    target_length: target tokens per row of a 'train_step' case.
    decode_length: tokens an 'inference' case decodes greedily (every one of them).
  """

  kind: str
  scope: str
  mode: str
  length: int
  width: str
  batch: int = 1
  dtype: str = "float32"
  warmup: int = 1
  repeats: int = 5
  max_case_s: float = 60.0
  num_layers: int | None = None
  scan_layers: bool | None = None
  remat: str | None = None
  matmul_size: int | None = None
  memory_budget_gb: float | None = None
  target_length: int = 512
  decode_length: int = 128

  @property
  def model_name(self) -> str:
    return f"peer:{self.kind}" if self.scope == "peer" else self.kind

  @property
  def group(self) -> tuple[str, str, int, int]:
    """(scope, mode, length, batch): the cases whose times are compared with each other."""
    return self.scope, self.mode, self.length, self.batch

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> Case:
    return cls(**json.loads(text))


@functools.cache
def encoder_dims(kind: str, width: str):
  """`flops.EncoderDims` of our `kind` (or of the model a peer stands in for) at `width`,
  read from its gin model file."""
  from colt5_flax import flops, model_files

  kind = base_kind(peers.MODEL_KIND.get(kind, kind))
  with model_files.parsed([model_files.model_file(kind, width)]):
    return flops.EncoderDims.from_gin(kind)


def depth(case: Case) -> int:
  """Encoder layers the case runs: 1 for a layer or a peer block, else the encoder's
  (a whole model's always as its model file sets; `num_layers` is for 'encoder')."""
  if case.scope in WHOLE_MODEL_SCOPES:
    return encoder_dims(case.kind, case.width).num_layers
  if case.scope != "encoder":
    return 1
  return case.num_layers or encoder_dims(case.kind, case.width).num_layers


def layer_flops(case: Case) -> dict[str, int]:
  """Forward matmul FLOPs of one layer of the case's model on one row, by branch."""
  from colt5_flax import flops

  dims = encoder_dims(case.kind, case.width)
  if case.scope == "peer":
    return peers.layer_flops(case.kind, dims, case.length)
  return flops.layer_flops(dims, case.length)


def case_flops(case: Case) -> int:
  """Matmul FLOPs of a whole case: layers × batch, and ×3 for forward + backward."""
  if case.scope in WHOLE_MODEL_SCOPES:
    from benchmarking import whole_model

    return whole_model.case_flops(case)
  passes = 3 if case.mode == "fwd_bwd" else 1  # backward: 2 matmuls per forward one
  return sum(layer_flops(case).values()) * depth(case) * case.batch * passes


def routed_tokens(case: Case) -> dict[str, int] | None:
  """CoLT5's routed-token counts at the case's length (None for other kinds)."""
  if base_kind(case.kind) not in ("colt5", "colt5_attention"):
    return None
  return encoder_dims(case.kind, case.width).routed_counts(case.length)


def gin_bindings(case: Case) -> list[str]:
  """The bindings on top of the model file that make the case's encoder."""
  bindings = [f"ACTIVATION_DTYPE = '{case.dtype}'", "DROPOUT_RATE = 0.0"]
  if case.scope in WHOLE_MODEL_SCOPES:
    # The whole model as its file makes it: its own depth, scan and remat, unless given
    # (the base models' files unroll and keep every activation, which at 16k does not fit
    # 24 GiB; remat of unrolled layers does not shrink XLA:CPU's buffers, remat under scan
    # does: docs/benchmarks.md).
    scan, remat = stack_settings(case)
    stack = [f"REMAT_POLICY = '{remat}'"] if remat else []
    if scan is not None:
      stack.append(f"SCAN_LAYERS = {scan}")
    return bindings + variant_bindings(case.kind) + stack
  if case.scope == "layer":
    # One layer is an encoder of depth 1: the layer plus a final norm (no matmul).
    return bindings + ["NUM_ENCODER_LAYERS = 1", "SCAN_LAYERS = False"]
  if case.num_layers:
    bindings.append(f"NUM_ENCODER_LAYERS = {case.num_layers}")
  scan, remat = stack_settings(case)
  return bindings + [f"SCAN_LAYERS = {scan}", f"REMAT_POLICY = '{remat}'"]


def stack_settings(case: Case) -> tuple[bool | None, str | None]:
  """(SCAN_LAYERS, REMAT_POLICY) the case's stack runs with: an encoder's defaults are
  scan and no remat; for a whole model None leaves the model file's own."""
  if case.scope == "encoder":
    return (True if case.scan_layers is None else case.scan_layers), (case.remat or "none")
  return case.scan_layers, case.remat


def result_fields(case: Case) -> dict[str, Any]:
  """The case's identity as report fields."""
  fields = {
      "model": case.model_name,
      "scope": "layer" if case.scope == "peer" else case.scope,
      "length": case.length,
      "width": case.width,
      "mode": case.mode,
      "batch": case.batch,
      "dtype": case.dtype,
  }
  if case.scope == "encoder":
    fields["num_layers"] = depth(case)
  if case.scope == "train_step":
    fields["target_length"] = case.target_length
  if case.scope in WHOLE_MODEL_SCOPES or case.scope == "encoder":
    # What the stack ran as (a whole model's None: the model file's own).
    fields["scan_layers"], fields["remat"] = stack_settings(case)
  if case.scope == "inference":
    fields["decode_length"] = case.decode_length
  routed = routed_tokens(case)
  if routed is not None:
    fields["routed_tokens"] = routed
  return fields
