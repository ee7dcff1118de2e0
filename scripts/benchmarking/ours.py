"""Our models: built from their gin model file, compiled, timed.

A case's encoder is `network.Encoder` as the model file configures it (`cases.gin_bindings`
sets the depth, dtype, scan and remat); a layer case is an encoder of depth 1. Flax calls
the gin-configured factories while tracing, so each case is compiled inside its
`model_files.parsed` block; the compiled program no longer needs gin. The whole-model
scopes (`train_step`, `inference`) are built by `benchmarking.whole_model`, and may time
parts of their program beside the whole (the encoder of an inference case).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarking import cases, measure, whole_model
from benchmarking.cases import Case


def _full_attention_bytes(case: Case, num_heads: int) -> int:
  """Bytes of one float32 [batch, heads, n, n] logits array per layer kept alive."""
  layers = cases.depth(case) if case.scope != "layer" and case.mode == "fwd_bwd" else 1
  return 4 * case.batch * num_heads * case.length**2 * layers


def prepare_case(case: Case) -> tuple[dict[str, Any], Any, dict[str, Any]]:
  """Builds and compiles one case of ours in this process.

  Returns (row, run, parts): the row so far (compile time, XLA's memory and FLOP counts,
  or a skip note), a `run()` that executes the compiled program once and blocks until its
  results are ready (None when the case is skipped), and `{name: run}` of parts of the
  program timed beside it (their times go to `<name>_ms`).
  """
  import jax
  import jax.numpy as jnp

  from colt5_flax import model_files, network

  dims = cases.encoder_dims(case.kind, case.width)
  dtype = jnp.dtype(case.dtype)
  device = jax.devices()[0]
  stats = device.memory_stats()
  budget = measure.memory_budget_bytes(
      case.memory_budget_gb, stats.get("bytes_limit") if stats else None
  )
  row = {"backend": jax.default_backend(), "memory_budget_gb": budget / 2**30}
  if case.kind == "t5" and _full_attention_bytes(case, dims.num_heads) > budget:
    need = _full_attention_bytes(case, dims.num_heads) / 2**30
    return row | {
        "skipped": True,
        "note": f"full attention's float32 logits alone need {need:.1f} GiB "
        f"> budget {budget / 2**30:.1f} GiB",
    }, None, {}
  if case.scope in cases.WHOLE_MODEL_SCOPES:
    return whole_model.prepare_case(case, row, budget)

  batch, length = case.batch, case.length
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  model_file = model_files.model_file(case.kind, case.width)
  with model_files.parsed([model_file], cases.gin_bindings(case)):
    module = model_files.build(network.Encoder)

    def apply(params, x, mask):
      return module.apply(params, x, mask, enable_dropout=False)

    # Parameter shapes do not depend on the length: initialise on a short input.
    init_length = min(length, 256)
    init_x = jnp.zeros((batch, init_length, dims.embed_dim), dtype)
    params = jax.jit(module.init)(keys[0], init_x, jnp.ones((batch, init_length), bool))
    x = jax.random.normal(keys[1], (batch, length, dims.embed_dim), jnp.float32).astype(dtype)
    # The mask is an argument, not a constant, so XLA cannot fold the routing away.
    mask = jnp.ones((batch, length), bool)
    args = [params, x, mask]
    if case.mode == "fwd":
      step = apply
    else:
      # Training: gradients for the parameters and the input (the layer below needs it)
      # of a fixed random cotangent.
      def loss(params, x, mask, cotangent):
        return jnp.sum(jnp.asarray(apply(params, x, mask), jnp.float32) * cotangent)

      step = jax.grad(loss, argnums=(0, 1))
      args.append(jax.random.normal(keys[2], (batch, length, dims.embed_dim), jnp.float32))

    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    row["compile_s"] = time.perf_counter() - start
  row |= whole_model.compiled_analysis(compiled)
  if whole_model.over_budget(row, budget):
    return row | whole_model.over_budget(row, budget), None, {}

  def run():
    jax.block_until_ready(compiled(*args))

  return row, run, {}


def prepare_case_observed(case: Case, owner: type, method: str, observe) -> Any:
  """`prepare_case(case)` with `observe(stage, result)` after each call of `owner.method`
  (`jax.stages.Traced.lower`, `jax.stages.Lowered.compile`) while the case is built: the
  program the benchmark times, not a second trace of it. Returns the case's `run`; exits
  naming the reason when the case is skipped."""
  original = getattr(owner, method)

  def observed(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    observe(self, result)
    return result

  setattr(owner, method, observed)
  try:
    row, run, _ = prepare_case(case)
  finally:
    setattr(owner, method, original)
  if run is None:
    raise SystemExit(f"case skipped: {row.get('note')}")
  return run


def run_case(case: Case) -> dict[str, Any]:
  """Compiles and times one case of ours in this process; returns its result row."""
  import jax

  row, run, parts = prepare_case(case)
  if run is None:
    return row
  row["matmul_gflops_now"] = measure.matmul_gflops_now(case.dtype, case.matmul_size or 2048)
  device = jax.devices()[0]
  memory = measure.PeakMemory(device if device.memory_stats() else None)
  memory.start()
  row |= measure.time_runs(
      run, warmup=case.warmup, repeats=case.repeats, max_case_s=case.max_case_s
  )
  row |= memory.stop()
  for name, run_part in parts.items():
    timing = measure.time_runs(
        run_part, warmup=case.warmup, repeats=case.repeats, max_case_s=case.max_case_s
    )
    row[f"{name}_ms"], row[f"{name}_ms_runs"] = timing["ms"], timing["ms_runs"]
  return whole_model.finish_row(case, row)


def run_interleaved(group: list[Case]) -> list[dict[str, Any]]:
  """Times the cases of one (scope, mode, length, batch) group in turns, in this process.

  All cases are compiled first; then each round runs every case once (and right after
  it, its parts), in the same order, so every kind meets the same machine load, and the
  ratio of two kinds' times is taken round by round (`paired_ratios`: the median over
  rounds of this case's time over the other's). Peak memory is then XLA's buffer
  assignment for the compiled program (arguments + outputs + temporaries), since the
  cases share one process.
  """
  first = group[0]
  prepared = [prepare_case(case) for case in group]
  active = [
      (case, row, run, parts)
      for case, (row, run, parts) in zip(group, prepared, strict=True)
      if run
  ]
  for case, _, run, parts in active:
    for _ in range(max(case.warmup, 0)):
      run()
      for run_part in parts.values():
        run_part()
  matmul_now = [measure.matmul_gflops_now(first.dtype, first.matmul_size or 2048)]
  usages: list[list[measure.Usage]] = [[] for _ in active]
  part_times: list[dict[str, list[float]]] = [{name: [] for name in p} for *_, p in active]
  for round_index in range(max(first.repeats, 1)):
    for (_, _, run, parts), case_usages, case_part_times in zip(
        active, usages, part_times, strict=True
    ):
      case_usages.append(measure.timed_call(run))
      for name, timed in parts.items():
        start = time.perf_counter()
        timed()
        case_part_times[name].append(time.perf_counter() - start)
    spent = sum(usage.wall for case_usages in usages for usage in case_usages)
    if spent / (round_index + 1) * (round_index + 2) > first.max_case_s * len(active):
      break
  matmul_now.append(measure.matmul_gflops_now(first.dtype, first.matmul_size or 2048))
  names = [case.model_name for case, *_ in active]
  times = [[usage.wall for usage in case_usages] for case_usages in usages]
  for (case, row, _, _), case_times, case_usages, case_part_times in zip(
      active, times, usages, part_times, strict=True
  ):
    row["matmul_gflops_now"] = statistics.mean(matmul_now)
    row["ms"] = 1e3 * statistics.median(case_times)
    row |= measure.usage_medians(case_usages)
    row["ms_runs"] = [round(1e3 * t, 3) for t in case_times]
    for name, timed in case_part_times.items():
      row[f"{name}_ms"] = 1e3 * statistics.median(timed)
      row[f"{name}_ms_runs"] = [round(1e3 * t, 3) for t in timed]
    row["interleaved"] = True
    row["paired_ratios"] = {
        name: statistics.median(a / b for a, b in zip(case_times, other, strict=True))
        for name, other in zip(names, times, strict=True)
        if name != case.model_name
    }
    if "compiled_mem_mb" in row:
      row["peak_mem_mb"] = row["compiled_mem_mb"]
      row["mem_source"] = "XLA memory_analysis (interleaved cases share a process)"
    whole_model.finish_row(case, row)
  return [row for row, _, _ in prepared]
