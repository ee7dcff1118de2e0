"""Timing, peak memory and the matmul peak: how the benchmark measures a case.

Nothing here imports jax at module level: a case's process must be able to set up XLA
before jax starts.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def time_runs(
    run: Callable[[], Any], *, warmup: int, repeats: int, max_case_s: float
) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- memory


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


def available_memory_bytes() -> int:
  """Host memory available now (/proc/meminfo MemAvailable, else total physical)."""
  try:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
      for line in meminfo:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget_bytes(budget_gb: float | None, device_limit: int | None = None) -> int:
  """`budget_gb` (--memory_budget_gb), else 80% of the device's or the host's memory."""
  if budget_gb is not None:
    return int(budget_gb * 2**30)
  return int(0.8 * (device_limit if device_limit else available_memory_bytes()))


class PeakMemory:
  """Peak memory of the code run between `start()` and `stop()`, in MiB: the device's
  `peak_bytes_in_use` where the backend keeps memory stats, else the process's
  resident-set high-water mark (`VmHWM`, reset at `start()`)."""

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


# ----------------------------------------------------------------------------- matmul peak


@dataclasses.dataclass(frozen=True)
class MatmulCase:
  """The matmul peak: a square matmul of side `matmul_size` (None: 2048 on CPU, else 8192)."""

  matmul_size: int | None
  repeats: int
  max_case_s: float


def run_matmul_peak(case: MatmulCase) -> dict[str, Any]:
  """GFLOP/s of a square matmul per dtype: median of the timed runs after a warm-up."""
  import jax
  import jax.numpy as jnp

  side = case.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
  row: dict[str, Any] = {
      "backend": jax.default_backend(), "matmul_size": side, "peak": {}, "best": {}
  }
  matmul = jax.jit(jnp.matmul)
  for dtype in ("float32", "bfloat16"):
    a = jax.random.normal(jax.random.PRNGKey(0), (side, side), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (side, side), jnp.float32).astype(dtype)
    timing = time_runs(
        lambda a=a, b=b: matmul(a, b).block_until_ready(),
        warmup=2,
        repeats=case.repeats,
        max_case_s=case.max_case_s,
    )
    row["peak"][dtype] = 2 * side**3 / (timing["ms"] / 1e3) / 1e9
    # The fastest run: what the machine gives when other programs leave it alone.
    row["best"][dtype] = 2 * side**3 / (min(timing["ms_runs"]) / 1e3) / 1e9
  return row


def matmul_gflops_now(dtype: str, side: int = 2048, repeats: int = 3) -> float:
  """A quick square-matmul rate in this process, right before a case is timed: the peak
  under the machine load the case itself meets (other programs share this CPU)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((side, side), dtype)
  matmul = jax.jit(jnp.matmul)
  timing = time_runs(
      lambda: matmul(a, a).block_until_ready(), warmup=1, repeats=repeats, max_case_s=10.0
  )
  return 2 * side**3 / (timing["ms"] / 1e3) / 1e9


# ----------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
  """Platform, processor model, CPU count and total memory, for the report."""
  return {
      "platform": platform.platform(),
      "processor": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
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
