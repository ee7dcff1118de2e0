r"""Where a benchmark case's time goes: XLA's operations ranked by time (docs/benchmarks.md).

  .venv/bin/python scripts/profile_ops.py --kind=colt5 --mode=fwd_bwd --length=16384 \
    [--width=base] [--scope=layer] [--top=30] [--json=FILE]

Builds and compiles the case exactly as `scripts/benchmark.py` does (`benchmarking.ours`),
runs it twice, then once under `jax.profiler.trace`, and reads the trace's XPlane: the
time of every XLA operation (fusion, custom matmul fusion, copy, sort, ...) on the
runtime's threads, summed by operation and by kind (the name without its number), each
with the shape it writes and the JAX operation it came from (the HLO metadata). Matmuls
that XLA:CPU hands to Eigen run outside the traced operations: they appear as
`(untraced: Eigen matmuls, idle)`: the pool threads' time (wall × threads) that no
operation accounts for, which also holds the time a thread waits for another's result.

A profile times one run on the machine as it is: run it idle, and compare shares, not
times, across machines.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmarking import case_flags  # noqa: E402  (defines --kind, --mode, --length, ...)

_TOP = flags.DEFINE_integer("top", 30, "Operations listed.")
_JSON = flags.DEFINE_string("json", None, "Also write the tables here.")

_RUNTIME_THREAD = re.compile(r"^tf_XLA")  # XLA:CPU's client and intra-op threads
_POOL_THREAD = re.compile(r"^tf_XLAEigen")  # the intra-op pool: one thread per core
_WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool")


def operation_times(trace_dir: str) -> tuple[dict[str, float], float, int]:
  """({operation: ms}, wall ms, threads) of the one run in `trace_dir`'s XPlane."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  times, wall, threads = collections.Counter(), 0.0, set()
  for plane in space.planes:
    names = {key: meta.name for key, meta in plane.event_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        name = names.get(event.metadata_id, "?")
        if name.startswith("ThunkExecutor::Execute (wait"):
          wall = max(wall, event.duration_ps / 1e9)
        elif _RUNTIME_THREAD.match(line.name) and not name.startswith(_WRAPPERS):
          times[name] += event.duration_ps / 1e9
          if _POOL_THREAD.match(line.name):
            threads.add(line.name)
  return dict(times), wall, max(len(threads), 1)


def hlo_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction: (its shape, the JAX operation it came from)} of a compiled module."""
  found = {}
  for match in re.finditer(r"%([\w.\-]+) = (\S+) [^\n]*?op_name=\"([^\"]*)\"", hlo_text):
    found.setdefault(match.group(1), (match.group(2), match.group(3)))
  return found


def profile(case) -> dict:
  """Per-operation and per-kind tables of one run of `case`."""
  import jax
  from benchmarking import ours

  compiled = {}

  def keep(lowered, program):
    compiled["program"] = program

  run = ours.prepare_case_observed(case, jax.stages.Lowered, "compile", keep)
  run(), run()
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      run()
    elapsed = (time.perf_counter() - start) * 1e3
    times, wall, threads = operation_times(trace_dir)
  metadata = hlo_metadata(compiled["program"].as_text())
  busy = wall * threads
  untraced = max(busy - sum(times.values()), 0.0)
  kinds = collections.Counter()
  for name, ms in times.items():
    kinds[re.sub(r"[.\d]+$", "", name)] += ms
  kinds["(untraced: Eigen matmuls, idle)"] = untraced
  operations = [
      {
          "name": name,
          "ms": ms,
          "share": ms / busy,
          "shape": metadata.get(name, ("", ""))[0],
          "op": metadata.get(name, ("", ""))[1],
      }
      for name, ms in sorted(times.items(), key=lambda item: -item[1])
  ]
  return {
      "wall_ms": wall or elapsed,
      "threads": threads,
      "thread_ms": busy,
      "kinds": [{"kind": k, "ms": ms, "share": ms / busy} for k, ms in kinds.most_common()],
      "operations": operations,
  }


def main(argv):
  del argv
  case = case_flags.case()
  result = profile(case)
  print(
      f"{case.kind} {case.scope} {case.mode} {case.length} ({case.width}): one run "
      f"{result['wall_ms']:.0f} ms on {result['threads']} threads"
  )
  print("\n| kind | ms (thread time) | share |\n|---|---|---|")
  for row in result["kinds"][:12]:
    print(f"| {row['kind']} | {row['ms']:.0f} | {row['share']:.1%} |")
  print("\n| operation | ms | share | writes | from |\n|---|---|---|---|---|")
  for row in result["operations"][: _TOP.value]:
    print(
        f"| {row['name']} | {row['ms']:.0f} | {row['share']:.1%} | {row['shape'][:32]} "
        f"| {row['op'][-70:]} |"
    )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(
          {"case": dataclasses.asdict(case)} | result,
          f,
          indent=1,
          default=str,
      )


if __name__ == "__main__":
  app.run(main)
