"""Whole encoder-decoder models: one training step, and end-to-end inference.

Both scopes build the model the trainer builds: the gin model file
(`configs/models/<architecture>_<width>.gin`) evaluated as its `MODEL` macro, with the
scan and remat settings that file sets (`cases.gin_bindings` only fixes the dtype, the
dropout and, for a `_mqa`/`_mha` kind, `NUM_CROSS_ATTENTION_KV_HEADS`).

- `train_step`: `colt5_flax.trainer.Trainer`'s own compiled train step (loss, gradients,
  Adafactor update at the fine-tuning rate, CoLT5 §4: constant 1e-3) on a batch of
  `length` input and `target_length` target tokens. The state is donated, so each timed
  run is the next optimizer step; the first step's loss is kept in the row.
- `inference`: CoLT5 §5.2's end-to-end measure: encode the input, then greedily decode
  `decode_length` tokens with the KV cache, through `model.predict_batch` (the project's
  decoding, `colt5_flax/decoding.py`). So that every case decodes all `decode_length`
  steps whatever the random weights predict, the EOS logit is set to a large negative
  value at every step (`_decode_without_eos`): the loop never sees an EOS and stops only at
  the last position. The encoder alone (`network.EncoderDecoder.encode`) is compiled and
  timed in the same case as a part (`encoder_ms`); the decoder's time is the rest (the
  cross-attention key/value projection, the cache and the decode loop).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import numpy as np

from benchmarking import cases
from benchmarking.cases import Case

# The fine-tuning learning rate (CoLT5 §4; configs/runs/finetune_scrolls.gin).
LEARNING_RATE = 1e-3
# T5's EOS id, in its SentencePiece vocabulary and in bytes alike (seqio). The benchmark
# uses it instead of asking the gin vocabulary, which would read T5's SentencePiece file.
EOS_ID = 1
# Added to the EOS logit at each decode step: far below any logit, yet finite.
_NO_EOS = -1.0e9


@dataclasses.dataclass(frozen=True)
class DecoderDims:
  """The decoder's sizes that its FLOPs depend on (T5.1.1's decoder for every kind)."""

  embed_dim: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  cross_kv_heads: int  # NUM_CROSS_ATTENTION_KV_HEADS, or num_heads where it is None


@functools.cache
def decoder_dims(kind: str, width: str) -> DecoderDims:
  """`DecoderDims` of `kind` (a `_mqa`/`_mha` kind binds its cross-attention) at `width`."""
  from colt5_flax import model_files

  bindings = cases.variant_bindings(kind)
  with model_files.parsed([model_files.model_file(cases.base_kind(kind), width)], bindings):
    macro = model_files.macro
    heads = macro("NUM_HEADS")
    return DecoderDims(
        embed_dim=macro("EMBED_DIM"),
        num_layers=macro("NUM_DECODER_LAYERS"),
        num_heads=heads,
        head_dim=macro("HEAD_DIM"),
        mlp_dim=macro("MLP_DIM"),
        vocab_size=macro("VOCAB_SIZE"),
        cross_kv_heads=macro("NUM_CROSS_ATTENTION_KV_HEADS") or heads,
    )


def decoder_flops(dims: DecoderDims, input_length: int, targets: int, *, cached: bool) -> int:
  """Forward matmul FLOPs of the decoder and its output logits on one row.

  Teacher-forced (`cached=False`): `targets` tokens at once, causal self-attention
  computed in full. Cached decoding (`cached=True`): `targets` steps of one token, each
  attending to the whole self-attention cache of `targets` slots (masked to those
  written) and to the `input_length` encoded tokens; the cross-attention keys and values
  are projected once, when the cache is made.
  """
  from colt5_flax.flops import dense, gated_mlp

  d, inner = dims.embed_dim, dims.num_heads * dims.head_dim
  kv_inner = dims.cross_kv_heads * dims.head_dim
  queries = 1 if cached else targets
  steps = targets if cached else 1
  per_step = (
      4 * dense(queries, d, inner)  # self-attention q, k, v, o
      + 2 * 2 * queries * targets * inner  # self-attention scores and values
      + 2 * dense(queries, d, inner)  # cross-attention q, o
      + 2 * 2 * queries * input_length * inner  # cross-attention scores and values
      + gated_mlp(queries, d, dims.mlp_dim)
  )
  cross_key_values = 2 * dense(input_length, d, kv_inner)
  logits = dense(queries, d, dims.vocab_size)
  return dims.num_layers * (steps * per_step + cross_key_values) + steps * logits


def case_flops(case: Case) -> int:
  """Matmul FLOPs of a whole-model case: encoder + decoder, × batch (× 3 for a train step:
  the backward pass runs 2 matmuls per forward one; the optimizer's work is not counted)."""
  dims = cases.encoder_dims(case.kind, case.width)
  from colt5_flax import flops

  encoder = sum(flops.layer_flops(dims, case.length).values()) * dims.num_layers
  decoder = decoder_dims(case.kind, case.width)
  if case.scope == "train_step":
    total = 3 * (encoder + decoder_flops(decoder, case.length, case.target_length, cached=False))
  else:
    total = encoder + decoder_flops(decoder, case.length, case.decode_length, cached=True)
  return total * case.batch


def _initial_params(model, length: int, targets: int):
  """Float32 parameters initialised as `Trainer.create_state` does (seed 0; the shapes do
  not depend on the lengths, so a short input serves)."""
  import flax.linen as nn
  import jax

  from colt5_flax import trainer as trainer_lib

  init_key, _ = jax.random.split(jax.random.key(0))
  shapes = trainer_lib.encdec_batch_shapes(1, {"inputs": length, "targets": targets})
  shapes = {name: s.shape for name, s in shapes.items()}
  return jax.jit(
      lambda k: nn.meta.unbox(model.get_initial_variables(k, shapes)["params"])
  )(init_key)


def random_tokens(case: Case, vocab_size: int, shape: tuple[int, int], seed: int) -> np.ndarray:
  """Token ids in [2, vocab) (no pad, no EOS), a fixed function of the case and `seed`."""
  rng = np.random.default_rng([seed, case.length, case.batch])
  return rng.integers(2, vocab_size, size=shape, dtype=np.int32)


def train_batch(case: Case, vocab_size: int) -> dict[str, np.ndarray]:
  """A seqio-shaped batch: `length` input and `target_length` target tokens per row."""
  inputs = random_tokens(case, vocab_size, (case.batch, case.length), seed=1)
  targets = random_tokens(case, vocab_size, (case.batch, case.target_length), seed=2)
  return {
      "encoder_input_tokens": inputs,
      "decoder_target_tokens": targets,
      "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
      "decoder_loss_weights": np.ones_like(targets),
  }


def build_model(case: Case):
  """The gin model file's `MODEL` (`model.EncoderDecoderModel`), frozen so it outlives
  the gin block (`model_files.frozen`)."""
  from colt5_flax import model_files

  model_file = model_files.model_file(cases.base_kind(case.kind), case.width)
  with model_files.parsed([model_file], cases.gin_bindings(case)):
    return model_files.frozen("MODEL")


def build_trainer(case: Case):
  """(trainer, model): the project's `Trainer` for the case, on a one-device mesh."""
  import jax

  from colt5_flax import optimizers, partitioning
  from colt5_flax import trainer as trainer_lib

  model = build_model(case)
  partitioner = partitioning.Partitioner(num_partitions=1, devices=[jax.devices()[0]])
  schedule = optimizers.constant_schedule(LEARNING_RATE)
  trainer = trainer_lib.Trainer(
      model,
      partitioner,
      optimizers.adafactor(schedule),
      schedule,
      trainer_lib.encdec_batch_shapes(
          case.batch, {"inputs": case.length, "targets": case.target_length}
      ),
      seed=0,
  )
  return trainer, model


def _decode_without_eos(decode_fn):
  """`decode_fn` (the model's: greedy `temperature_sample`) with the EOS logit pushed far
  below every other one at each step, so that no sequence ends before the last position."""

  def decode(*, tokens_to_logits, eos_id, **kwargs):
    def without_eos(state):
      logits, cache = tokens_to_logits(state)
      return logits.at[:, eos_id].add(_NO_EOS), cache

    return decode_fn(tokens_to_logits=without_eos, eos_id=eos_id, **kwargs)

  return decode


def inference_model(model):
  """A copy of `model` that always decodes every step (see `_decode_without_eos`) and
  takes EOS as `EOS_ID`."""
  import seqio

  fixed = copy.copy(model)
  fixed.decode_fn = _decode_without_eos(model.decode_fn)
  fixed.output_vocabulary = seqio.PassThroughVocabulary(model.module.vocab_size, eos_id=EOS_ID)
  return fixed


def inference_programs(case: Case):
  """(params, batch, predict, encode, model): the case's parameters and input, and the
  jitted end-to-end `predict(params, batch)` -> [batch, decode_length] ids and
  `encode(params, tokens)` -> [batch, length, embed]."""
  import jax
  import jax.numpy as jnp

  model = build_model(case)
  module = model.module
  params = _initial_params(model, min(case.length, 256), case.decode_length)
  inputs = random_tokens(case, module.vocab_size, (case.batch, case.length), seed=1)
  batch = {
      "encoder_input_tokens": jnp.asarray(inputs),
      "decoder_input_tokens": jnp.zeros((case.batch, case.decode_length), jnp.int32),
  }
  fixed = inference_model(model)
  predict = jax.jit(fixed.predict_batch)
  encode = jax.jit(
      lambda params, tokens: module.apply(
          {"params": params}, tokens, enable_dropout=False, method=module.encode
      )
  )
  return params, batch, predict, encode, model


def compiled_analysis(compiled) -> dict[str, float]:
  """XLA's buffer assignment (`compiled_mem_mb`) and FLOP count (`xla_flops`), where the
  backend reports them."""
  row: dict[str, float] = {}
  try:
    analysis = compiled.memory_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    row["compiled_mem_mb"] = (
        analysis.temp_size_in_bytes
        + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    ) / 2**20
  except Exception:  # noqa: BLE001 - backends without buffer analysis
    pass
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    row["xla_flops"] = float(cost.get("flops", float("nan")))
  except Exception:  # noqa: BLE001 - backends without cost analysis
    pass
  return row


def over_budget(row: dict[str, Any], budget: int) -> dict[str, Any]:
  """A skip note when XLA's buffer assignment (`compiled_mem_mb`) exceeds `budget`
  bytes, else {}."""
  needed = row.get("compiled_mem_mb")
  if needed is None or needed * 2**20 <= budget:
    return {}
  return {
      "skipped": True,
      "note": f"compiled program needs {needed / 2**10:.1f} GiB > budget {budget / 2**30:.1f} GiB",
  }


def prepare_case(
    case: Case, row: dict[str, Any], budget: int
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
  """Builds and compiles a `train_step` or `inference` case in this process.

  Returns (row, run, parts): `row` with what is known so far (compile time, XLA's memory
  and FLOP counts; the first step's loss or the first row's decoded ids once `run` has
  run, so keep this very dict; or a skip note
  when the compiled program needs more than `budget` bytes), a `run()` that executes the
  whole program once and blocks until it is done (None when skipped), and `{name: run}`
  of the parts timed in the same case (`encoder` for inference).
  """
  import time

  import jax

  start = time.perf_counter()
  if case.scope == "train_step":
    trainer, _ = build_trainer(case)
    compiled = trainer.compile_train_step()
    row["compile_s"] = time.perf_counter() - start
    row |= compiled_analysis(compiled)
    if over_budget(row, budget):
      return row | over_budget(row, budget), None, {}
    vocab_size = trainer.model.module.vocab_size
    batch = trainer.partitioner.shard_global_batch(train_batch(case, vocab_size))
    state = [trainer.create_state()]

    def run():
      state[0], metrics = compiled(state[0], batch)
      jax.block_until_ready((state[0], metrics))
      if "first_step_loss" not in row:
        row["first_step_loss"] = float(metrics["loss"])

    return row, run, {}

  params, batch, predict, encode, _ = inference_programs(case)
  compiled = predict.lower(params, batch).compile()
  row["compile_s"] = time.perf_counter() - start
  row |= compiled_analysis(compiled)
  if over_budget(row, budget):
    return row | over_budget(row, budget), None, {}
  start = time.perf_counter()
  compiled_encode = encode.lower(params, batch["encoder_input_tokens"]).compile()
  row["encoder_compile_s"] = time.perf_counter() - start

  def run():
    decoded = jax.block_until_ready(compiled(params, batch))
    if "decoded_first_row" not in row:
      row["decoded_first_row"] = [int(t) for t in np.asarray(decoded)[0]]

  def run_encoder():
    jax.block_until_ready(compiled_encode(params, batch["encoder_input_tokens"]))

  return row, run, {"encoder": run_encoder}


def finish_row(case: Case, row: dict[str, Any]) -> dict[str, Any]:
  """Adds what follows from the times: samples per second, and for inference the
  encoder's and the decoder's shares of the end-to-end time."""
  if row.get("ms") is None:
    return row
  row["samples_per_s"] = case.batch / (row["ms"] / 1e3)
  if case.scope == "inference" and row.get("encoder_ms") is not None:
    encoder_share = min(row["encoder_ms"] / row["ms"], 1.0)
    row["encoder_share"] = encoder_share
    row["decoder_share"] = 1.0 - encoder_share
    row["decoder_ms"] = row["ms"] - min(row["encoder_ms"], row["ms"])
  return row
