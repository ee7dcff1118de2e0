r"""Speed and memory of the CoLT5, LongT5 and T5 encoders, side by side (CoLT5 §4, SPEC §4).

  .venv/bin/python scripts/benchmark.py --width=base --lengths=4096,16384 \
    --mode=fwd,fwd_bwd --scopes=layer [--peers] [--json=FILE] [--plot=FILE]

Times one encoder layer (`network.EncoderLayer`) and/or a whole encoder
(`network.Encoder`) of each kind (`colt5`, `longt5_tglobal`, `longt5_local`, `t5`) at a
SPEC §1.5 width, built from the same attention/feedforward factories gin binds. Per case:

- compile time (lowering + XLA compilation), reported apart and never timed again;
- the median of `--repeats` timed runs after `--warmup` runs, each ending in
  `block_until_ready`; `--max_case_s` caps the timed runs of a slow case (at least one);
- peak memory: the device's `peak_bytes_in_use` where the backend keeps memory stats,
  else the process's resident-set high-water mark (`VmHWM`, reset through
  `/proc/self/clear_refs` just before the first run, so compilation does not count), in
  a fresh subprocess per case (`--isolate`, the default);
- analytic FLOPs: the matmuls of every branch as executed (blocked local windows of
  3 × 128 keys, CoLT5's routed tokens at their capacities), forward only or forward +
  backward (3×), and the achieved rate against the matmul peak measured in the same run
  (a large float32 matmul, and bfloat16 for `--dtype=bfloat16`), and against a short
  matmul timed in the same process just before the case (`% peak now`: the peak under
  the load the case met). XLA's own count (`cost_analysis`) is kept beside it as a check
  (for `--scopes=encoder` with `--scan_layers` it counts the scanned layer once).

Cases that cannot fit are skipped with a note instead of being run: full attention whose
float32 logits alone exceed the memory budget, and any compiled program whose XLA buffer
assignment (`memory_analysis`) exceeds it. `--max_run_s` skips cases whose estimated run
(FLOPs at half the measured matmul peak) would take longer.

On a shared machine, `--interleave` times the kinds of each (scope, mode, length) in
turns in one process and reports round-by-round time ratios (`paired_ratios`).

`--peers` adds, when torch is importable, the PyTorch `colt5-attention` package's
`ConditionalRoutedTransformerBlock` and transformers' LongT5 transient-global block
(`LongT5Block`) at the same width and lengths, on torch's CPU backend, in the same table;
either is skipped with a note when its package is missing.

Output: a Markdown table on stdout; `--json=FILE` writes
`{"backend", "matmul_peak_gflops", "results": [{"model", "length", "width", "mode",
"batch", "dtype", "ms", "compile_s", "peak_mem_mb", "flops", "achieved_gflops", ...}]}`;
`--plot=FILE` draws time and memory against length for each kind (log-log).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

KINDS = ("colt5", "longt5_tglobal", "longt5_local", "t5")
PEERS = ("colt5_attention", "hf_longt5_tglobal")
MODES = ("fwd", "fwd_bwd")
SCOPES = ("layer", "encoder")

_KINDS = flags.DEFINE_list("kinds", list(KINDS), f"Encoder kinds, of {KINDS}.")
_WIDTH = flags.DEFINE_enum("width", "base", ["tiny", "base", "large", "xl"], "SPEC §1.5 size.")
_LENGTHS = flags.DEFINE_list("lengths", ["2048", "4096", "8192", "16384"], "Input lengths.")
_FWD_BWD_LENGTHS = flags.DEFINE_list(
    "fwd_bwd_lengths", None, "Lengths for --mode=fwd_bwd (default: --lengths)."
)
_ENCODER_LENGTHS = flags.DEFINE_list(
    "encoder_lengths", None, "Lengths for --scopes=encoder (default: those of the mode)."
)
_PEER_LENGTHS = flags.DEFINE_list(
    "peer_lengths", None, "Lengths for --peers (default: those of the mode)."
)
_MODE = flags.DEFINE_list("mode", ["fwd"], "fwd (inference) and/or fwd_bwd (training).")
_SCOPES = flags.DEFINE_list("scopes", ["layer"], "layer (one EncoderLayer) and/or encoder.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", None, "Encoder depth (default: the width's).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs (the median is reported).")
_MAX_CASE_S = flags.DEFINE_float(
    "max_case_s", 60.0, "Cap on a case's timed runs: fewer repeats (never < 1) past it."
)
_MAX_RUN_S = flags.DEFINE_float(
    "max_run_s", 120.0, "Skip a case whose estimated single run is longer than this."
)
_MEMORY_BUDGET_GB = flags.DEFINE_float(
    "memory_budget_gb", None, "Memory a case may use (default: 80% of what is available)."
)
_ISOLATE = flags.DEFINE_bool(
    "isolate", True, "Run each case in a fresh subprocess (clean peak-memory numbers)."
)
_INTERLEAVE = flags.DEFINE_bool(
    "interleave",
    False,
    "Time the kinds of each (scope, mode, length) in turns, in this process, and report "
    "round-by-round ratios (for a machine whose load changes); memory is then XLA's "
    "buffer assignment. Peers still run per --isolate.",
)
_CASE_TIMEOUT_S = flags.DEFINE_float("case_timeout_s", 1800.0, "Kill a case after this.")
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size", None, "Side of the square peak matmul (default 2048 on CPU, 8192 else)."
)
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", True, "nn.scan over encoder layers.")
_REMAT = flags.DEFINE_string("remat", "none", "Encoder remat policy (network.REMAT_POLICIES).")
_PEERS = flags.DEFINE_bool("peers", False, "Also time the PyTorch peers (see docstring).")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_PLOT = flags.DEFINE_string("plot", None, "Draw time and memory against length here.")
_FROM_JSON = flags.DEFINE_string(
    "from_json", None, "Print the table and draw --plot from a saved --json report; run nothing."
)
_CASE = flags.DEFINE_string("case", None, "Internal: run one JSON-encoded case, print result.")

RESULT_TAG = "BENCHMARK_CASE_RESULT "
HEAD_DIM = 64
LOCAL_RADIUS = 127  # LongT5 and CoLT5's light branch: window 255, blocks of 128.
GLOBAL_BLOCK_SIZE = 16  # LongT5 TGlobal.
# Fraction of the measured matmul peak assumed when estimating a case's run time.
_ESTIMATE_EFFICIENCY = 0.5


@dataclasses.dataclass(frozen=True)
class Size:
  """One SPEC §1.5 width (head_dim 64). T5/LongT5 use num_heads and mlp_dim."""

  embed_dim: int
  num_heads: int
  mlp_dim: int
  light_mlp_dim: int
  heavy_mlp_dim: int
  num_light_heads: int
  num_heavy_heads: int
  num_layers: int


SIZES = {
    # `tiny` is ours, for tests: a quarter of the heads light, the rest heavy.
    "tiny": Size(256, 4, 512, 256, 2048, 1, 3, 2),
    "base": Size(768, 12, 2048, 1024, 8192, 4, 8, 12),
    "large": Size(1024, 16, 2816, 1408, 11264, 4, 12, 24),
    "xl": Size(2048, 32, 5120, 2560, 20480, 8, 24, 24),
}


def _capacity():
  """CoLT5 §3.3 (fine-tuning): m = n/16 queries and feedforward tokens, 2m keys/values,
  and m stays at its 32k value (2048) for longer inputs: the layers' default capacity.
  (Imported late: jax must not start before the case's XLA flags are set.)"""
  from colt5_flax.layers.routing import RoutingCapacity

  return RoutingCapacity()


def routed_counts(length: int) -> dict[str, int]:
  """CoLT5 §3.3 routed-token counts at `length`: queries, keys/values, feedforward."""
  capacity = _capacity()
  return {
      "queries": capacity.count(length),
      "key_values": capacity.count(length, key_values=True),
      "feedforward": capacity.count(length),
  }


# ----------------------------------------------------------------------------------------
# Analytic FLOPs: the matmuls of each branch as executed (2 FLOPs per multiply-add).


def _dense(tokens: int, d_in: int, d_out: int) -> int:
  return 2 * tokens * d_in * d_out


def _gated_mlp(tokens: int, embed: int, hidden: int) -> int:
  return 3 * _dense(tokens, embed, hidden)  # wi_0, wi_1, wo


def _blocked_window(length: int, heads: int, extra_keys: int = 0) -> int:
  """q·kᵀ and weights·v of blocked local attention: every query block of 128 tokens
  against 3 blocks (384 keys, masked to the radius after the matmul) + `extra_keys`."""
  block_len = LOCAL_RADIUS + 1
  padded = -(-length // block_len) * block_len
  return 2 * 2 * padded * (3 * block_len + extra_keys) * heads * HEAD_DIM


def layer_flops(kind: str, size: Size, length: int) -> dict[str, int]:
  """Forward matmul FLOPs of one encoder layer of `kind`, batch 1, by branch."""
  d = size.embed_dim
  inner = size.num_heads * HEAD_DIM
  if kind == "t5":
    return {
        "attention_projections": 4 * _dense(length, d, inner),
        "attention_scores": 2 * 2 * length * length * inner,
        "mlp": _gated_mlp(length, d, size.mlp_dim),
    }
  if kind == "longt5_local":
    return {
        "attention_projections": 4 * _dense(length, d, inner),
        "attention_scores": _blocked_window(length, size.num_heads),
        "mlp": _gated_mlp(length, d, size.mlp_dim),
    }
  if kind == "longt5_tglobal":
    num_globals = length // GLOBAL_BLOCK_SIZE
    return {
        # Global tokens get their own K and V projections every layer (LongT5 §2.1.2).
        "attention_projections": 4 * _dense(length, d, inner) + 2 * _dense(num_globals, d, inner),
        "attention_scores": _blocked_window(length, size.num_heads, num_globals),
        "mlp": _gated_mlp(length, d, size.mlp_dim),
    }
  if kind == "colt5":
    routed = routed_counts(length)
    light, heavy = size.num_light_heads * HEAD_DIM, size.num_heavy_heads * HEAD_DIM
    queries, key_values = routed["queries"], routed["key_values"]
    return {
        "light_attention": 4 * _dense(length, d, light)
        + _blocked_window(length, size.num_light_heads),
        "light_mlp": _gated_mlp(length, d, size.light_mlp_dim),
        "routers": 3 * _dense(length, d, 1),
        "heavy_attention": 2 * _dense(queries, d, heavy)
        + 2 * _dense(key_values, d, heavy)
        + 2 * 2 * queries * key_values * heavy,
        "heavy_mlp": _gated_mlp(routed["feedforward"], d, size.heavy_mlp_dim),
    }
  if kind == "colt5_attention":  # the PyTorch peer: ungated MLPs, one null key/value.
    routed = routed_counts(length)
    light, heavy = size.num_light_heads * HEAD_DIM, size.num_heavy_heads * HEAD_DIM
    queries, key_values = routed["queries"], routed["key_values"]
    return {
        "light_attention": 4 * _dense(length, d, light)
        + _blocked_window(length, size.num_light_heads),
        "light_mlp": 2 * _dense(length, d, size.light_mlp_dim),
        "routers": 3 * _dense(length, d, 1),
        "heavy_attention": 2 * _dense(queries, d, heavy)
        + 2 * _dense(key_values, d, heavy)
        + 2 * 2 * queries * (key_values + 1) * heavy,
        "heavy_mlp": 2 * _dense(routed["feedforward"], d, size.heavy_mlp_dim),
    }
  if kind == "hf_longt5_tglobal":  # transformers sums global blocks by a one-hot matmul.
    flops = layer_flops("longt5_tglobal", size, length)
    flops["global_aggregates"] = 2 * length * (length // GLOBAL_BLOCK_SIZE) * d
    return flops
  raise ValueError(f"kind={kind!r}; expected one of {KINDS + PEERS}")


def case_flops(case: dict) -> int:
  """Matmul FLOPs of a whole case: layers × batch, and ×3 for forward + backward."""
  size = SIZES[case["width"]]
  per_layer = sum(layer_flops(case["kind"], size, case["length"]).values())
  layers = case["num_layers"] if case["scope"] == "encoder" else 1
  passes = 3 if case["mode"] == "fwd_bwd" else 1  # backward: 2 matmuls per forward one
  return per_layer * layers * case["batch"] * passes


def _model_name(case: dict) -> str:
  return f"peer:{case['kind']}" if case["scope"] == "peer" else case["kind"]


# ----------------------------------------------------------------------------------------
# Memory measurement.


def _proc_status_mb(field: str) -> float | None:
  """`VmRSS`/`VmHWM` of this process in MiB, from /proc (Linux), else None."""
  try:
    with open("/proc/self/status", encoding="ascii") as status:
      for line in status:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets the kernel's resident-set high-water mark (Linux ≥ 4.0); False if it can't."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
      clear_refs.write("5")
    return True
  except OSError:
    return False


def _max_rss_mb() -> float:
  scale = 1.0 / 1024.0 if sys.platform != "darwin" else 1.0 / 2**20  # KiB vs bytes
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _available_memory_bytes() -> int:
  """Host memory available now (/proc/meminfo MemAvailable, else total physical)."""
  try:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
      for line in meminfo:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_budget_bytes(device_limit: int | None = None) -> int:
  if _MEMORY_BUDGET_GB.value is not None:
    return int(_MEMORY_BUDGET_GB.value * 2**30)
  return int(0.8 * (device_limit if device_limit else _available_memory_bytes()))


class _PeakMemory:
  """Peak memory of the code run between `start()` and `stop()`, in MiB."""

  def __init__(self, device=None):
    self.stats = device.memory_stats() if device is not None else None
    self.device = device

  def start(self):
    self.base_mb = _proc_status_mb("VmRSS")
    self.reset = _reset_peak_rss()

  def stop(self) -> dict[str, Any]:
    if self.stats and "peak_bytes_in_use" in self.stats:
      peak = self.device.memory_stats()["peak_bytes_in_use"] / 2**20
      return {"peak_mem_mb": peak, "mem_source": "device peak_bytes_in_use"}
    hwm = _proc_status_mb("VmHWM")
    if self.reset and hwm is not None:
      return {"peak_mem_mb": hwm, "base_mem_mb": self.base_mb, "mem_source": "process VmHWM"}
    return {"peak_mem_mb": _max_rss_mb(), "mem_source": "process ru_maxrss (with compile)"}


# ----------------------------------------------------------------------------------------
# Timing.


def _time_runs(run, *, warmup: int, repeats: int, max_case_s: float) -> dict[str, Any]:
  """Warm-up runs, then up to `repeats` timed runs within `max_case_s` (at least one).

  `run()` must block until its results are ready. Returns the median and all times (ms)
  and the process CPU time per run (ms, all threads): a second view of the cost that
  other programs on a shared machine disturb less than wall time.
  """
  warm = []
  for _ in range(max(warmup, 0)):
    start = time.perf_counter()
    run()
    warm.append(time.perf_counter() - start)
  times, cpu = [], []
  for i in range(max(repeats, 1)):
    if i and sum(times) + times[-1] > max_case_s:
      break
    cpu_start, start = time.process_time(), time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  return {
      "ms": 1e3 * statistics.median(times),
      "ms_runs": [round(1e3 * t, 3) for t in times],
      "warmup_ms": [round(1e3 * t, 3) for t in warm],
      "cpu_ms": 1e3 * statistics.median(cpu),
  }


# ----------------------------------------------------------------------------------------
# Our layers and encoders.


def encoder_factories(kind: str, size: Size, dtype) -> tuple[Any, Any]:
  """(attention_factory, feed_forward_factory) of `kind`, as `network.Encoder` takes them."""
  from colt5_flax.layers import attention, conditional, local_attention
  from colt5_flax.layers.mlp import GatedMlp

  dense_mlp = functools.partial(GatedMlp, hidden_dim=size.mlp_dim, dtype=dtype)
  if kind == "t5":
    return functools.partial(attention.SelfAttention, num_heads=size.num_heads, dtype=dtype), (
        dense_mlp
    )
  local = {"num_heads": size.num_heads, "local_radius": LOCAL_RADIUS, "dtype": dtype}
  if kind == "longt5_local":
    return functools.partial(local_attention.LocalSelfAttention, **local), dense_mlp
  if kind == "longt5_tglobal":
    return (
        functools.partial(
            local_attention.TransientGlobalSelfAttention,
            global_block_size=GLOBAL_BLOCK_SIZE,
            **local,
        ),
        dense_mlp,
    )
  if kind == "colt5":
    return (
        functools.partial(
            conditional.ConditionalAttention,
            num_light_heads=size.num_light_heads,
            num_heavy_heads=size.num_heavy_heads,
            local_radius=LOCAL_RADIUS,
            capacity=_capacity(),
            dtype=dtype,
        ),
        functools.partial(
            conditional.ConditionalFeedForward,
            light_mlp_dim=size.light_mlp_dim,
            heavy_mlp_dim=size.heavy_mlp_dim,
            capacity=_capacity(),
            dtype=dtype,
        ),
    )
  raise ValueError(f"kind={kind!r}; expected one of {KINDS}")


def _full_attention_bytes(case: dict, size: Size) -> int:
  """Bytes of one float32 [batch, heads, n, n] logits array per layer kept alive."""
  layers = case["num_layers"] if case["scope"] == "encoder" and case["mode"] == "fwd_bwd" else 1
  return 4 * case["batch"] * size.num_heads * case["length"] ** 2 * layers


def prepare_case(case: dict) -> tuple[dict[str, Any], Any]:
  """Builds and compiles one case of ours in this process.

  Returns (row, run): the row so far (compile time, XLA's memory and FLOP counts, or a
  skip note) and a `run()` that executes the compiled program once and blocks until its
  results are ready, or None when the case is skipped.
  """
  import jax
  import jax.numpy as jnp

  from colt5_flax import network

  size = SIZES[case["width"]]
  dtype = jnp.dtype(case["dtype"])
  device = jax.devices()[0]
  stats = device.memory_stats()
  budget = _memory_budget_bytes(stats.get("bytes_limit") if stats else None)
  row = {"backend": jax.default_backend(), "memory_budget_gb": budget / 2**30}
  if case["kind"] == "t5" and _full_attention_bytes(case, size) > budget:
    need = _full_attention_bytes(case, size) / 2**30
    return row | {
        "skipped": True,
        "note": f"full attention's float32 logits alone need {need:.1f} GiB "
        f"> budget {budget / 2**30:.1f} GiB",
    }, None

  batch, length = case["batch"], case["length"]
  attention_factory, feed_forward_factory = encoder_factories(case["kind"], size, dtype)
  if case["scope"] == "layer":
    module = network.EncoderLayer(
        attention_factory=attention_factory,
        feed_forward_factory=feed_forward_factory,
        dtype=dtype,
    )

    def apply(params, x, mask, tables):
      return module.apply(params, x, mask, None, tables, False)
  else:
    module = network.Encoder(
        num_layers=case["num_layers"],
        attention_factory=attention_factory,
        feed_forward_factory=feed_forward_factory,
        scan_layers=case["scan_layers"],
        remat_policy=case["remat"],
        dtype=dtype,
    )

    def apply(params, x, mask, tables):
      del tables  # The encoder owns its relative-position tables.
      return module.apply(params, x, mask, enable_dropout=False)

  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  # Stack-shared relative-position tables, passed to a lone layer as arrays.
  tables = {
      name: jax.random.normal(keys[0], (heads, 32), jnp.float32)
      for name, heads in attention_factory().relative_bias_spec().items()
  }
  # Parameter shapes do not depend on the length: initialise on a short input.
  init_length = min(length, 256)
  init_x = jnp.zeros((batch, init_length, size.embed_dim), dtype)
  init_mask = jnp.ones((batch, init_length), bool)
  if case["scope"] == "layer":
    init = functools.partial(module.init, keys[1], init_x, init_mask, None, tables, False)
  else:
    init = functools.partial(module.init, keys[1], init_x, init_mask)
  params = jax.jit(init)()
  x = jax.random.normal(keys[2], (batch, length, size.embed_dim), jnp.float32).astype(dtype)
  # The mask is an argument, not a constant, so XLA cannot fold the routing away.
  mask = jnp.ones((batch, length), bool)
  args = [params, x, mask, tables]
  if case["mode"] == "fwd":
    step = apply
  else:
    # Training: gradients for the parameters, the input (the layer below needs it) and
    # the shared tables, of a fixed random cotangent.
    def loss(params, x, mask, tables, cotangent):
      return jnp.sum(jnp.asarray(apply(params, x, mask, tables), jnp.float32) * cotangent)

    step = jax.grad(loss, argnums=(0, 1, 3))
    args.append(jax.random.normal(keys[3], (batch, length, size.embed_dim), jnp.float32))

  start = time.perf_counter()
  compiled = jax.jit(step).lower(*args).compile()
  row["compile_s"] = time.perf_counter() - start
  try:
    analysis = compiled.memory_analysis()
    needed = (
        analysis.temp_size_in_bytes
        + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    row["compiled_mem_mb"] = needed / 2**20
  except Exception:  # noqa: BLE001 - backends without buffer analysis
    needed = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    row["xla_flops"] = float(cost.get("flops", float("nan")))
  except Exception:  # noqa: BLE001 - backends without cost analysis
    pass
  if needed is not None and needed > budget:
    return row | {
        "skipped": True,
        "note": f"compiled program needs {needed / 2**30:.1f} GiB "
        f"> budget {budget / 2**30:.1f} GiB",
    }, None

  def run():
    jax.block_until_ready(compiled(*args))

  return row, run


def run_case(case: dict) -> dict[str, Any]:
  """Compiles and times one case of ours in this process; returns its result row."""
  import jax

  row, run = prepare_case(case)
  if run is None:
    return row
  row["matmul_gflops_now"] = _matmul_gflops_now(case["dtype"], case.get("matmul_size") or 2048)
  device = jax.devices()[0]
  stats = device.memory_stats()
  memory = _PeakMemory(device if stats else None)
  memory.start()
  row |= _time_runs(
      run, warmup=case["warmup"], repeats=case["repeats"], max_case_s=case["max_case_s"]
  )
  row |= memory.stop()
  return row


def run_interleaved(cases: list[dict]) -> list[dict[str, Any]]:
  """Times the cases of one (scope, mode, length) group in turns, in this process.

  All cases are compiled first; then each round runs every case once, in the same
  order, so every kind meets the same machine load, and the ratio of two kinds' times
  is taken round by round (`paired_ratios`: the median over rounds of this case's time
  over the other's). Peak memory is then XLA's buffer assignment for the compiled
  program (arguments + outputs + temporaries), since the cases share one process.
  """
  prepared = [prepare_case(case) for case in cases]
  active = [(case, row, run) for case, (row, run) in zip(cases, prepared, strict=True) if run]
  for case, _, run in active:
    for _ in range(max(case["warmup"], 0)):
      run()
  matmul_now = [_matmul_gflops_now(cases[0]["dtype"], cases[0].get("matmul_size") or 2048)]
  times: list[list[float]] = [[] for _ in active]
  repeats = max(cases[0]["repeats"], 1)
  for round_index in range(repeats):
    for (_, _, run), case_times in zip(active, times, strict=True):
      start = time.perf_counter()
      run()
      case_times.append(time.perf_counter() - start)
    spent = sum(sum(t) for t in times)
    if spent / (round_index + 1) * (round_index + 2) > cases[0]["max_case_s"] * len(active):
      break
  matmul_now.append(_matmul_gflops_now(cases[0]["dtype"], cases[0].get("matmul_size") or 2048))
  names = [_model_name(case) for case, _, _ in active]
  for (case, row, _), case_times in zip(active, times, strict=True):
    row["matmul_gflops_now"] = statistics.mean(matmul_now)
    row["ms"] = 1e3 * statistics.median(case_times)
    row["ms_runs"] = [round(1e3 * t, 3) for t in case_times]
    row["interleaved"] = True
    row["paired_ratios"] = {
        name: statistics.median(a / b for a, b in zip(case_times, other, strict=True))
        for name, other in zip(names, times, strict=True)
        if name != _model_name(case)
    }
    if "compiled_mem_mb" in row:
      row["peak_mem_mb"] = row["compiled_mem_mb"]
      row["mem_source"] = "XLA memory_analysis (interleaved cases share a process)"
  return [row for row, _ in prepared]


# ----------------------------------------------------------------------------------------
# Peers (PyTorch, CPU).


def _hf_tglobal_bytes(case: dict, size: Size) -> int:
  """transformers' TGlobal keeps [batch, heads, n, 384 + n/16] float32 arrays (bias,
  scores, weights) and a [batch, n, n/16] one-hot; the backward about doubles them."""
  length = case["length"]
  width = 3 * (LOCAL_RADIUS + 1) + length // GLOBAL_BLOCK_SIZE
  arrays = 5 if case["mode"] == "fwd" else 9
  return 4 * case["batch"] * length * (arrays * size.num_heads * width + width)


def run_peer_case(case: dict) -> dict[str, Any]:
  """Times a PyTorch peer block in this process (torch's CPU backend)."""
  try:
    import torch
  except ImportError:
    return {"skipped": True, "note": "torch is not installed"}
  size = SIZES[case["width"]]
  batch, length, d = case["batch"], case["length"], size.embed_dim
  row: dict[str, Any] = {"backend": "torch-cpu"}
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  if case["kind"] == "colt5_attention":
    try:
      from colt5_attention import ConditionalRoutedTransformerBlock
    except ImportError:
      return row | {
          "skipped": True,
          "note": "colt5-attention is not installed (pip install colt5-attention)",
      }
    routed = routed_counts(length)
    block = ConditionalRoutedTransformerBlock(
        dim=d,
        num_heavy_attn_tokens_q=routed["queries"],
        num_heavy_attn_tokens_kv=routed["key_values"],
        num_heavy_ff_tokens=routed["feedforward"],
        light_dim_head=HEAD_DIM,
        light_heads=size.num_light_heads,
        # Windows of 128 seeing one window back and one ahead: 384 keys, as our blocks.
        light_window_size=2 * (LOCAL_RADIUS + 1),
        heavy_dim_head=HEAD_DIM,
        heavy_heads=size.num_heavy_heads,
        light_ff_mult=size.light_mlp_dim / d,
        heavy_ff_mult=size.heavy_mlp_dim / d,
        # The paper's router: ε = 1, 50 iterations, no ε-scaling (SPEC §1.1).
        router_kwargs={"n_iters": 50, "eps": 1.0, "eps_init": None},
    )

    def forward(x, mask):
      return block(x, mask=mask)
  else:
    try:
      from transformers import LongT5Config
      from transformers.models.longt5.modeling_longt5 import LongT5Block
    except ImportError:
      return row | {"skipped": True, "note": "transformers is not installed"}
    budget = _memory_budget_bytes()
    if _hf_tglobal_bytes(case, size) > budget:
      return row | {
          "skipped": True,
          "note": f"its [heads, n, n/16] arrays need ≈{_hf_tglobal_bytes(case, size) / 2**30:.0f}"
          f" GiB > budget {budget / 2**30:.1f} GiB",
      }
    config = LongT5Config(
        d_model=d,
        d_kv=HEAD_DIM,
        d_ff=size.mlp_dim,
        num_heads=size.num_heads,
        encoder_attention_type="transient-global",
        local_radius=LOCAL_RADIUS,
        global_block_size=GLOBAL_BLOCK_SIZE,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_decoder=False,
    )
    block = LongT5Block(config, has_relative_attention_bias=True)

    def forward(x, mask):
      return block(x, attention_mask=mask)[0]

  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case["dtype"]]
  block = block.to(torch_dtype).eval()
  x = torch.randn(batch, length, d, dtype=torch_dtype)
  if case["kind"] == "colt5_attention":
    mask = torch.ones(batch, length, dtype=torch.bool)
  else:
    mask = torch.ones(batch, length, dtype=torch_dtype)
  if case["mode"] == "fwd":

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
  memory = _PeakMemory()
  memory.start()
  row |= _time_runs(
      run, warmup=case["warmup"], repeats=case["repeats"], max_case_s=case["max_case_s"]
  )
  return row | memory.stop()


# ----------------------------------------------------------------------------------------
# Matmul peak.


def run_matmul_peak(case: dict) -> dict[str, Any]:
  """GFLOP/s of a square matmul per dtype: median of the timed runs after a warm-up."""
  import jax
  import jax.numpy as jnp

  side = case["matmul_size"] or (2048 if jax.default_backend() == "cpu" else 8192)
  row: dict[str, Any] = {
      "backend": jax.default_backend(), "matmul_size": side, "peak": {}, "best": {}
  }
  matmul = jax.jit(jnp.matmul)
  for dtype in ("float32", "bfloat16"):
    a = jax.random.normal(jax.random.PRNGKey(0), (side, side), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (side, side), jnp.float32).astype(dtype)
    timing = _time_runs(
        lambda a=a, b=b: matmul(a, b).block_until_ready(),
        warmup=2,
        repeats=case["repeats"],
        max_case_s=case["max_case_s"],
    )
    row["peak"][dtype] = 2 * side**3 / (timing["ms"] / 1e3) / 1e9
    # The fastest run: what the machine gives when other programs leave it alone.
    row["best"][dtype] = 2 * side**3 / (min(timing["ms_runs"]) / 1e3) / 1e9
  return row


def _matmul_gflops_now(dtype: str, side: int = 2048, repeats: int = 3) -> float:
  """A quick square-matmul rate in this process, right before a case is timed: the peak
  under the machine load the case itself meets (other programs share this CPU)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((side, side), dtype)
  matmul = jax.jit(jnp.matmul)
  timing = _time_runs(
      lambda: matmul(a, a).block_until_ready(), warmup=1, repeats=repeats, max_case_s=10.0
  )
  return 2 * side**3 / (timing["ms"] / 1e3) / 1e9


# ----------------------------------------------------------------------------------------
# Orchestration.


def execute(case: dict) -> dict[str, Any]:
  """Runs `case` here: one of ours, a peer, or the matmul peak."""
  if case["scope"] == "matmul":
    return run_matmul_peak(case)
  if case["scope"] == "peer":
    return run_peer_case(case)
  return run_case(case)


def execute_isolated(case: dict, timeout_s: float) -> dict[str, Any]:
  """Runs `case` in a fresh Python process (this script with --case) and parses its row."""
  command = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
  if _MEMORY_BUDGET_GB.value is not None:
    command.append(f"--memory_budget_gb={_MEMORY_BUDGET_GB.value}")
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"skipped": True, "note": f"timed out after {timeout_s:.0f} s"}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG) :])
  reason = "killed (out of memory?)" if done.returncode in (-9, 137) else "failed"
  tail = " | ".join(done.stderr.strip().splitlines()[-3:])
  return {"skipped": True, "note": f"{reason}, exit {done.returncode}: {tail[-400:]}"}


def plan_cases() -> list[dict]:
  """Every case of the flags, ordered so the kinds of one (scope, mode, length) run back
  to back: their ratios then compare runs made under the same machine load."""
  for name, values, allowed in (
      ("kinds", _KINDS.value, KINDS),
      ("mode", _MODE.value, MODES),
      ("scopes", _SCOPES.value, SCOPES),
  ):
    bad = [v for v in values if v not in allowed]
    if bad or not values:
      raise ValueError(f"--{name}={','.join(values)}: expected values among {allowed}")

  def lengths(values, name):
    try:
      parsed = [int(v) for v in values]
    except ValueError as error:
      raise ValueError(f"--{name}={','.join(values)}: expected integers") from error
    if not parsed or min(parsed) < 1:
      raise ValueError(f"--{name}={','.join(values)}: expected positive lengths")
    return parsed

  if _BATCH.value < 1:
    raise ValueError(f"--batch={_BATCH.value}: expected >= 1")
  size = SIZES[_WIDTH.value]
  common = {
      "width": _WIDTH.value,
      "batch": _BATCH.value,
      "dtype": _DTYPE.value,
      "warmup": _WARMUP.value,
      "repeats": _REPEATS.value,
      "max_case_s": _MAX_CASE_S.value,
      "num_layers": _NUM_LAYERS.value or size.num_layers,
      "scan_layers": _SCAN_LAYERS.value,
      "remat": _REMAT.value,
      "matmul_size": _MATMUL_SIZE.value,
  }
  mode_lengths = {
      "fwd": lengths(_LENGTHS.value, "lengths"),
      "fwd_bwd": lengths(_FWD_BWD_LENGTHS.value or _LENGTHS.value, "fwd_bwd_lengths"),
  }
  encoder_lengths = _ENCODER_LENGTHS.value and lengths(_ENCODER_LENGTHS.value, "encoder_lengths")
  peer_lengths = _PEER_LENGTHS.value and lengths(_PEER_LENGTHS.value, "peer_lengths")
  cases = []
  for scope in _SCOPES.value:
    for mode in _MODE.value:
      ours = encoder_lengths if scope == "encoder" and encoder_lengths else mode_lengths[mode]
      peers = (peer_lengths or mode_lengths[mode]) if scope == "layer" and _PEERS.value else []
      for length in sorted(set(ours) | set(peers)):
        kinds = list(_KINDS.value) if length in ours else []
        kinds += list(PEERS) if length in peers else []
        for kind in kinds:
          peer = kind in PEERS
          cases.append(
              common
              | {"kind": kind, "scope": "peer" if peer else scope, "mode": mode, "length": length}
          )
  return cases


def _result_row(case: dict, outcome: dict, peak_gflops: float | None) -> dict[str, Any]:
  flops = case_flops(case)
  row = {
      "model": _model_name(case),
      "scope": "layer" if case["scope"] == "peer" else case["scope"],
      "length": case["length"],
      "width": case["width"],
      "mode": case["mode"],
      "batch": case["batch"],
      "dtype": case["dtype"],
      "ms": None,
      "compile_s": None,
      "peak_mem_mb": None,
      "flops": flops,
      "achieved_gflops": None,
      "skipped": False,
      "note": "",
  }
  if case["scope"] == "encoder":
    row["num_layers"] = case["num_layers"]
  if case["kind"] in ("colt5", "colt5_attention"):
    row["routed_tokens"] = routed_counts(case["length"])
  row |= outcome
  if row["ms"] is not None and not row["skipped"]:
    row["achieved_gflops"] = flops / (row["ms"] / 1e3) / 1e9
    row["us_per_token"] = 1e3 * row["ms"] / (case["length"] * case["batch"])
    if peak_gflops:
      row["fraction_of_peak"] = row["achieved_gflops"] / peak_gflops
    if row.get("matmul_gflops_now"):
      row["fraction_of_peak_now"] = row["achieved_gflops"] / row["matmul_gflops_now"]
  return row


def _format_table(rows: list[dict]) -> str:
  header = (
      "| scope | model | mode | length | ms | µs/token | compile s | peak MiB | GFLOP "
      "| GFLOP/s | % peak | % peak now | note |"
  )
  lines = [header, "|" + "|".join("---" for _ in range(13)) + "|"]
  lines += [_format_row(row) for row in rows]
  return "\n".join(lines)


def _format_row(row: dict) -> str:
  def number(value, spec):
    return "–" if value is None else format(value, spec)

  def percent(key):
    value = row.get(key)
    return number(None if value is None else 100 * value, ".0f")

  return (
      f"| {row['scope']} | {row['model']} | {row['mode']} | {row['length']} "
      f"| {number(row['ms'], '.1f')} | {number(row.get('us_per_token'), '.1f')} "
      f"| {number(row['compile_s'], '.1f')} | {number(row['peak_mem_mb'], '.0f')} "
      f"| {row['flops'] / 1e9:.1f} | {number(row['achieved_gflops'], '.1f')} "
      f"| {percent('fraction_of_peak')} | {percent('fraction_of_peak_now')} | {row['note']} |"
  )


def plot(rows: list[dict], path: str) -> None:
  """Time and peak memory against length, log-log: a colour per model, solid circles for
  a layer, dashed squares for a whole encoder, dotted for peers; a column per mode."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
  figure, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9), squeeze=False)
  styles = {"layer": "-", "encoder": "--"}
  models = [*KINDS, *(f"peer:{peer}" for peer in PEERS)]
  colors = {model: f"C{i}" for i, model in enumerate(models)}
  for column, mode in enumerate(modes):
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
      if row["mode"] == mode and not row["skipped"] and row["ms"] is not None:
        series.setdefault((row["model"], row["scope"]), []).append(row)
    for (model, scope), points in sorted(series.items()):
      points.sort(key=lambda r: r["length"])
      lengths = [r["length"] for r in points]
      style = ":" if model.startswith("peer:") else styles[scope]
      label = f"{model} ({scope})"
      color, marker = colors.get(model), "s" if scope == "encoder" else "o"
      axes[0][column].plot(
          lengths, [r["ms"] for r in points], style, color=color, marker=marker, label=label
      )
      memory = [(r["length"], r["peak_mem_mb"]) for r in points if r["peak_mem_mb"]]
      if memory:
        axes[1][column].plot(
            *zip(*memory, strict=True), style, color=color, marker=marker, label=label
        )
    for row_index, ylabel in enumerate(("time per run (ms)", "peak memory (MiB)")):
      axis = axes[row_index][column]
      axis.set_xscale("log", base=2)
      axis.set_yscale("log")
      axis.set_xlabel("input length (tokens)")
      axis.set_ylabel(ylabel)
      axis.set_title(f"{mode}: {ylabel.split(' (')[0]}")
      axis.grid(True, which="both", alpha=0.3)
      axis.legend(fontsize=7)
  first = rows[0]
  figure.suptitle(f"width {first['width']}, batch {first['batch']}, {first['dtype']}")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def benchmark() -> dict[str, Any]:
  """Runs every planned case (plus the matmul peak before and after); returns the report."""
  cases = plan_cases()
  run = (
      functools.partial(execute_isolated, timeout_s=_CASE_TIMEOUT_S.value)
      if _ISOLATE.value
      else execute
  )
  matmul_case = {
      "scope": "matmul",
      "matmul_size": _MATMUL_SIZE.value,
      "repeats": max(_REPEATS.value, 3),
      "max_case_s": 30.0,
  }
  peaks = [run(matmul_case)]
  if peaks[0].get("skipped"):
    raise RuntimeError(f"matmul peak failed: {peaks[0]['note']}")
  peak_key = _DTYPE.value

  def peak():
    return max(p["peak"][peak_key] for p in peaks if "peak" in p)

  print(f"matmul peak ({_DTYPE.value}, {peaks[0]['matmul_size']}²): {peak():.1f} GFLOP/s")
  print(_format_table([]))
  rows = []
  groups: list[list[dict]] = []
  for case in cases:  # consecutive cases of ours with one (scope, mode, length)
    key = (case["scope"], case["mode"], case["length"])
    if (
        _INTERLEAVE.value
        and case["scope"] != "peer"
        and groups
        and (groups[-1][0]["scope"], groups[-1][0]["mode"], groups[-1][0]["length"]) == key
    ):
      groups[-1].append(case)
    else:
      groups.append([case])
  for group in groups:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    outcomes: dict[int, dict] = {}
    for index, case in enumerate(group):
      estimate_s = case_flops(case) / (_ESTIMATE_EFFICIENCY * peak() * 1e9)
      if estimate_s > _MAX_RUN_S.value:
        outcomes[index] = {
            "skipped": True,
            "note": f"estimated {estimate_s:.0f} s per run > --max_run_s={_MAX_RUN_S.value:.0f}",
        }
    pending = [i for i in range(len(group)) if i not in outcomes]
    if _INTERLEAVE.value and group[0]["scope"] != "peer":
      measured = run_interleaved([group[i] for i in pending]) if pending else []
      outcomes.update(zip(pending, measured, strict=True))
    else:
      outcomes.update({i: run(group[i]) for i in pending})
    for index, case in enumerate(group):
      outcomes[index]["load_avg"] = load
      row = _result_row(case, outcomes[index], peak())
      rows.append(row)
      print(_format_row(row), flush=True)
  peaks.append(run(matmul_case))
  for row in rows:  # the rate against the best peak seen in the run
    if row["achieved_gflops"] is not None:
      row["fraction_of_peak"] = row["achieved_gflops"] / peak()
  return {
      "backend": peaks[0]["backend"],
      "matmul_peak_gflops": peak(),
      "matmul_peak_gflops_runs": [p.get("peak") for p in peaks],
      "matmul_best_gflops_runs": [p.get("best") for p in peaks],
      "matmul_size": peaks[0]["matmul_size"],
      "command": " ".join(shlex.quote(a) for a in sys.argv),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "machine": {
          "platform": platform.platform(),
          "processor": _cpu_model(),
          "cpu_count": os.cpu_count(),
          "memory_gib": _total_memory_gib(),
      },
      "results": rows,
  }


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _total_memory_gib() -> float:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CASE.value:
    print(RESULT_TAG + json.dumps(execute(json.loads(_CASE.value))), flush=True)
    return
  if _FROM_JSON.value:
    with open(_FROM_JSON.value, encoding="utf-8") as f:
      report = json.load(f)
    print(_format_table(report["results"]))
    if _PLOT.value:
      plot(report["results"], _PLOT.value)
    return
  report = benchmark()
  print(f"\nmatmul peak: {report['matmul_peak_gflops']:.1f} GFLOP/s; final table:\n")
  print(_format_table(report["results"]))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
  if _PLOT.value:
    plot(report["results"], _PLOT.value)


if __name__ == "__main__":
  app.run(main)
