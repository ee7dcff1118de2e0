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
  and, per run (medians), the process CPU time (ms, all threads: a second view of the
  cost that other programs on a shared machine disturb less than wall time), the part of
  it spent in the kernel and the minor page faults. Buffers the size of a layer's
  activations come from fresh pages in every run when the allocator returns them to the
  system after each (glibc does for blocks over 32 MiB), and each page faults on first
  touch: on the virtual machine of docs/benchmarks.md that was a seventh of CoLT5's
  layer's CPU time, and more of PyTorch's.
  """
  warm = []
  for _ in range(max(warmup, 0)):
    start = time.perf_counter()
    run()
    warm.append(time.perf_counter() - start)
  runs = []
  for i in range(max(repeats, 1)):
    if i and sum(r.wall for r in runs) + runs[-1].wall > max_case_s:
      break
    runs.append(timed_call(run))
  return {
      "ms": 1e3 * statistics.median(r.wall for r in runs),
      "ms_runs": [round(1e3 * r.wall, 3) for r in runs],
      "warmup_ms": [round(1e3 * t, 3) for t in warm],
  } | usage_medians(runs)


@dataclasses.dataclass(frozen=True)
class Usage:
  """One call's wall time and this process's CPU time, kernel time (s) and minor page
  faults over it."""

  wall: float
  cpu: float
  kernel: float
  faults: int


def timed_call(run: Callable[[], Any]) -> Usage:
  """Calls `run()` and measures it (`Usage`)."""
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  run()
  wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  kernel = after.ru_stime - before.ru_stime
  # CPU time from the same two readings as the kernel's part of it (user + kernel).
  cpu = after.ru_utime - before.ru_utime + kernel
  return Usage(wall, cpu, kernel, after.ru_minflt - before.ru_minflt)


def usage_medians(runs: list[Usage]) -> dict[str, float]:
  """Per-run medians of the CPU time and kernel time (ms) and the minor page faults."""
  return {
      "cpu_ms": 1e3 * statistics.median(r.cpu for r in runs),
      "kernel_ms": 1e3 * statistics.median(r.kernel for r in runs),
      "page_faults": statistics.median(r.faults for r in runs),
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
  """Platform, processor model, CPU count, total memory and the allocator's settings
  (`GLIBC_TUNABLES`, docs/benchmarks.md), for the report."""
  return {
      "platform": platform.platform(),
      "processor": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
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
