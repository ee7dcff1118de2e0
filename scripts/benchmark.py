r"""Speed and memory of the CoLT5, LongT5 and T5 encoders and models, side by side
(docs/benchmarks.md).

  .venv/bin/python scripts/benchmark.py --width=base --lengths=4096,16384 \
    --mode=fwd,fwd_bwd --scopes=layer [--peers] [--json=FILE] [--plot=FILE]
  .venv/bin/python scripts/benchmark.py --width=base --lengths=4096,16384 --batch=1 \
    --scopes=train_step --kinds=colt5,longt5_tglobal --target_length=512
  .venv/bin/python scripts/benchmark.py --width=base --lengths=4096,16384 --batch=1,8 \
    --scopes=inference --kinds=colt5,longt5_tglobal,longt5_tglobal_mqa --decode_length=128

Times one encoder layer and/or a whole encoder (`network.Encoder`) of each kind (`colt5`,
`longt5_tglobal`, `longt5_local`, `t5`) at a width of paper Table 7, built from the gin model
file the trainer reads (`configs/models/<architecture>_<width>.gin`; a layer is an encoder
of depth 1: the layer and a final norm). Two more scopes time the whole encoder-decoder
model as that file builds it, scan and remat included (`benchmarking.whole_model`):

- `train_step`: one step of the project's `trainer.Trainer` (loss, gradients, Adafactor
  update) on `--lengths` input and `--target_length` target tokens (issue 16 §2);
- `inference`: CoLT5 §5.2's end-to-end measure: encode, then greedily decode
  `--decode_length` tokens with the KV cache through `model.predict_batch`, with the EOS
  logit suppressed at every step so that every case decodes all of them. Reported as
  samples/second, with the encoder's and the decoder's shares of the time (the encoder is
  timed alone in the same case).

For these, kinds may also be `<kind>_mqa` or `<kind>_mha`: the model file with multi-query
or multi-head decoder cross-attention (`NUM_CROSS_ATTENTION_KV_HEADS`; CoLT5's default is
multi-query, LongT5's multi-head). `--batch` takes a list. `--plan_only` prints the
planned cases and their FLOPs and runs nothing. Per case (`benchmarking.cases.Case`):

- compile time (lowering + XLA compilation), reported apart and never timed again;
- the median of `--repeats` timed runs after `--warmup` runs, each ending in
  `block_until_ready`; `--max_case_s` caps the timed runs of a slow case (at least one);
- peak memory: the device's `peak_bytes_in_use` where the backend keeps memory stats,
  else the process's resident-set high-water mark (`VmHWM`, reset through
  `/proc/self/clear_refs` just before the first run, so compilation does not count), in
  a fresh subprocess per case (`--isolate`, the default);
- analytic FLOPs (`colt5_flax.flops`): the matmuls of every branch as executed (blocked
  local windows of 3 blocks of keys, CoLT5's routed tokens at their capacities), forward
  only or forward + backward (3×), and the achieved rate against the matmul peak
  measured in the same run (a large float32 matmul, and bfloat16 for `--dtype=bfloat16`),
  and against a short matmul timed in the same process just before the case (`% peak
  now`: the peak under the load the case met). XLA's own count (`cost_analysis`) is kept
  beside it as a check (for `--scopes=encoder` with `--scan_layers` it counts the scanned
  layer once).

Cases that cannot fit are skipped with a note instead of being run: full attention whose
float32 logits alone exceed the memory budget, and any compiled program whose XLA buffer
assignment (`memory_analysis`) exceeds it. `--max_run_s` skips cases whose estimated run
(FLOPs at half the measured matmul peak) would take longer.

On a shared machine, `--interleave` times the kinds of each (scope, mode, length, batch)
in turns in one process and reports round-by-round time ratios (`paired_ratios`); an
inference case's encoder runs right after it in each round.

`--peers` adds, when torch is importable, the PyTorch `colt5-attention` package's
`ConditionalRoutedTransformerBlock` and transformers' LongT5 transient-global block
(`LongT5Block`) at the same width and lengths, on torch's CPU backend, in the same table;
either is skipped with a note when its package is missing.

Output: a Markdown table on stdout; `--json=FILE` writes
`{"backend", "matmul_peak_gflops", "results": [{"model", "length", "width", "mode",
"batch", "dtype", "ms", "compile_s", "peak_mem_mb", "flops", "achieved_gflops", ...}]}`
(whole models add `samples_per_s`; a train step `target_length` and `first_step_loss`;
inference `decode_length`, `encoder_ms`, `decoder_ms`, `encoder_share`, `decoder_share`
and `decoded_first_row`);
`--plot=FILE` draws time and memory against length for each kind (log-log).

The parts live in scripts/benchmarking/: `cases` (what a case is, its FLOPs), `ours` (our
encoders: build, compile, time), `whole_model` (train steps and inference), `peers`
(PyTorch), `measure` (timing, memory, matmul peak) and `report` (table, plot).
"""


from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import subprocess
import sys
from typing import Any

from absl import app, flags
from benchmarking import cases, measure, ours, peers, report
from benchmarking.cases import KINDS, MODES, PEERS, SCOPES, WHOLE_MODEL_SCOPES, Case

_KINDS = flags.DEFINE_list(
    "kinds",
    list(KINDS),
    f"Model kinds, of {KINDS}; for train_step and inference also <kind>_mqa and <kind>_mha "
    "(multi-query or multi-head decoder cross-attention).",
)
_WIDTH = flags.DEFINE_enum(
    "width", "base", ["tiny", "base", "large", "xl"], "Model size (configs/models/*_<width>.gin)."
)
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
_SCOPES = flags.DEFINE_list(
    "scopes",
    ["layer"],
    "layer (one EncoderLayer), encoder, train_step (a whole model's training step) and/or "
    "inference (encode, then greedily decode --decode_length tokens).",
)
_NUM_LAYERS = flags.DEFINE_integer(
    "num_layers", None, "Encoder depth of --scopes=encoder (default: the width's)."
)
_BATCH = flags.DEFINE_list("batch", ["1"], "Batch sizes (each a case).")
_TARGET_LENGTH = flags.DEFINE_integer(
    "target_length", 512, "Target tokens per row of a train_step case."
)
_DECODE_LENGTH = flags.DEFINE_integer(
    "decode_length", 128, "Tokens an inference case decodes (every one; EOS is suppressed)."
)
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
_SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers",
    None,
    "nn.scan over the layers of --scopes=encoder (default: scan) and of whole models "
    "(default: the model file's).",
)
_REMAT = flags.DEFINE_string(
    "remat",
    None,
    "Remat policy (layer_stack.REMAT_POLICIES) of --scopes=encoder (default 'none') and of "
    "whole models (default: the model file's).",
)
_PEERS = flags.DEFINE_bool("peers", False, "Also time the PyTorch peers (see docstring).")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_PLOT = flags.DEFINE_string("plot", None, "Draw time and memory against length here.")
_FROM_JSON = flags.DEFINE_string(
    "from_json", None, "Print the table and draw --plot from a saved --json report; run nothing."
)
_PLAN_ONLY = flags.DEFINE_bool(
    "plan_only", False, "Print the planned cases (one JSON line each, with FLOPs); run nothing."
)
_CASE = flags.DEFINE_string("case", None, "Internal: run one JSON-encoded case, print result.")

RESULT_TAG = "BENCHMARK_CASE_RESULT "
# Fraction of the measured matmul peak assumed when estimating a case's run time.
_ESTIMATE_EFFICIENCY = 0.5


def execute(case: Case | measure.MatmulCase) -> dict[str, Any]:
  """Runs `case` here: one of ours, a peer, or the matmul peak."""
  if isinstance(case, measure.MatmulCase):
    return measure.run_matmul_peak(case)
  if case.scope == "peer":
    return peers.run_peer_case(case, cases.encoder_dims(case.kind, case.width))
  return ours.run_case(case)


def _encode(case: Case | measure.MatmulCase) -> str:
  kind = "matmul" if isinstance(case, measure.MatmulCase) else "case"
  return json.dumps({kind: dataclasses.asdict(case)})


def _decode(text: str) -> Case | measure.MatmulCase:
  (kind, fields), = json.loads(text).items()
  return measure.MatmulCase(**fields) if kind == "matmul" else Case(**fields)


def execute_isolated(case: Case | measure.MatmulCase, timeout_s: float) -> dict[str, Any]:
  """Runs `case` in a fresh Python process (this script with --case) and parses its row."""
  command = [sys.executable, os.path.abspath(__file__), "--case", _encode(case)]
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


def _lengths(values: list[str], name: str) -> list[int]:
  try:
    parsed = [int(v) for v in values]
  except ValueError as error:
    raise ValueError(f"--{name}={','.join(values)}: expected integers") from error
  if not parsed or min(parsed) < 1:
    raise ValueError(f"--{name}={','.join(values)}: expected positive integers")
  return parsed


def plan_cases() -> list[Case]:
  """Every case of the flags, ordered so the kinds of one (scope, mode, length) run back
  to back: their ratios then compare runs made under the same machine load."""
  for name, values, allowed in (
      ("mode", _MODE.value, MODES),
      ("scopes", _SCOPES.value, SCOPES),
  ):
    bad = [v for v in values if v not in allowed]
    if bad or not values:
      raise ValueError(f"--{name}={','.join(values)}: expected values among {allowed}")
  allowed_kinds = sorted({k for scope in _SCOPES.value for k in cases.kinds_of_scope(scope)})
  bad = [k for k in _KINDS.value if k not in allowed_kinds]
  if bad or not _KINDS.value:
    raise ValueError(
        f"--kinds={','.join(_KINDS.value)}: expected values among {allowed_kinds} "
        "(<kind>_mqa and <kind>_mha only with --scopes=train_step or inference)"
    )
  batches = _lengths(_BATCH.value, "batch")
  for name, value in (("target_length", _TARGET_LENGTH), ("decode_length", _DECODE_LENGTH)):
    if value.value < 1:
      raise ValueError(f"--{name}={value.value}: expected >= 1")
  common = dict(
      width=_WIDTH.value,
      dtype=_DTYPE.value,
      warmup=_WARMUP.value,
      repeats=_REPEATS.value,
      max_case_s=_MAX_CASE_S.value,
      num_layers=_NUM_LAYERS.value,
      scan_layers=_SCAN_LAYERS.value,
      remat=_REMAT.value,
      matmul_size=_MATMUL_SIZE.value,
      memory_budget_gb=_MEMORY_BUDGET_GB.value,
      target_length=_TARGET_LENGTH.value,
      decode_length=_DECODE_LENGTH.value,
  )
  mode_lengths = {
      "fwd": _lengths(_LENGTHS.value, "lengths"),
      "fwd_bwd": _lengths(_FWD_BWD_LENGTHS.value or _LENGTHS.value, "fwd_bwd_lengths"),
  }
  encoder_lengths = _ENCODER_LENGTHS.value and _lengths(_ENCODER_LENGTHS.value, "encoder_lengths")
  peer_lengths = _PEER_LENGTHS.value and _lengths(_PEER_LENGTHS.value, "peer_lengths")
  planned = []
  for scope in _SCOPES.value:
    # A whole model's scope has one mode: a training step, or inference.
    modes = [WHOLE_MODEL_SCOPES[scope]] if scope in WHOLE_MODEL_SCOPES else _MODE.value
    for mode in modes:
      ours_lengths = (
          encoder_lengths if scope == "encoder" and encoder_lengths else mode_lengths[mode]
      )
      peers_lengths = (
          (peer_lengths or mode_lengths[mode]) if scope == "layer" and _PEERS.value else []
      )
      kinds_here = [k for k in _KINDS.value if k in cases.kinds_of_scope(scope)]
      for batch in batches:
        for length in sorted(set(ours_lengths) | set(peers_lengths)):
          kinds = list(kinds_here) if length in ours_lengths else []
          kinds += list(PEERS) if length in peers_lengths else []
          for kind in kinds:
            scope_of_kind = "peer" if kind in PEERS else scope
            planned.append(
                Case(
                    kind=kind, scope=scope_of_kind, mode=mode, length=length, batch=batch,
                    **common,
                )
            )
  return planned


def _result_row(case: Case, outcome: dict, peak_gflops: float | None) -> dict[str, Any]:
  flops = cases.case_flops(case)
  row = cases.result_fields(case) | {
      "ms": None,
      "compile_s": None,
      "peak_mem_mb": None,
      "flops": flops,
      "achieved_gflops": None,
      "skipped": False,
      "note": "",
  }
  row |= outcome
  if row["ms"] is not None and not row["skipped"]:
    row["achieved_gflops"] = flops / (row["ms"] / 1e3) / 1e9
    row["us_per_token"] = 1e3 * row["ms"] / (case.length * case.batch)
    if peak_gflops:
      row["fraction_of_peak"] = row["achieved_gflops"] / peak_gflops
    if row.get("matmul_gflops_now"):
      row["fraction_of_peak_now"] = row["achieved_gflops"] / row["matmul_gflops_now"]
  return row


def _groups(planned: list[Case]) -> list[list[Case]]:
  """With --interleave, consecutive cases of ours with one (scope, mode, length, batch)
  form a group timed in turns; otherwise every case is its own group."""
  groups: list[list[Case]] = []
  for case in planned:
    if (
        _INTERLEAVE.value
        and case.scope != "peer"
        and groups
        and groups[-1][0].group == case.group
    ):
      groups[-1].append(case)
    else:
      groups.append([case])
  return groups


def benchmark() -> dict[str, Any]:
  """Runs every planned case (plus the matmul peak before and after); returns the report."""
  planned = plan_cases()
  run = (
      functools.partial(execute_isolated, timeout_s=_CASE_TIMEOUT_S.value)
      if _ISOLATE.value
      else execute
  )
  matmul_case = measure.MatmulCase(
      matmul_size=_MATMUL_SIZE.value, repeats=max(_REPEATS.value, 3), max_case_s=30.0
  )
  peaks = [run(matmul_case)]
  if peaks[0].get("skipped"):
    raise RuntimeError(f"matmul peak failed: {peaks[0]['note']}")

  def peak():
    return max(p["peak"][_DTYPE.value] for p in peaks if "peak" in p)

  print(f"matmul peak ({_DTYPE.value}, {peaks[0]['matmul_size']}²): {peak():.1f} GFLOP/s")
  print(report.format_table([]))
  rows = []
  for group in _groups(planned):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    outcomes: dict[int, dict] = {}
    for index, case in enumerate(group):
      estimate_s = cases.case_flops(case) / (_ESTIMATE_EFFICIENCY * peak() * 1e9)
      if estimate_s > _MAX_RUN_S.value:
        outcomes[index] = {
            "skipped": True,
            "note": f"estimated {estimate_s:.0f} s per run > --max_run_s={_MAX_RUN_S.value:.0f}",
        }
    pending = [i for i in range(len(group)) if i not in outcomes]
    if _INTERLEAVE.value and group[0].scope != "peer":
      measured = ours.run_interleaved([group[i] for i in pending]) if pending else []
      outcomes.update(zip(pending, measured, strict=True))
    else:
      outcomes.update({i: run(group[i]) for i in pending})
    for index, case in enumerate(group):
      outcomes[index]["load_avg"] = load
      row = _result_row(case, outcomes[index], peak())
      rows.append(row)
      print(report.format_row(row), flush=True)
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
      "machine": measure.machine(),
      "results": rows,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CASE.value:
    print(RESULT_TAG + json.dumps(execute(_decode(_CASE.value))), flush=True)
    return
  if _FROM_JSON.value:
    with open(_FROM_JSON.value, encoding="utf-8") as f:
      saved = json.load(f)
    print(report.format_table(saved["results"]))
    if _PLOT.value:
      report.plot(saved["results"], _PLOT.value)
    return
  if _PLAN_ONLY.value:
    for case in plan_cases():
      print(json.dumps(cases.result_fields(case) | {"flops": cases.case_flops(case)}))
    return
  result = benchmark()
  print(f"\nmatmul peak: {result['matmul_peak_gflops']:.1f} GFLOP/s; final table:\n")
  print(report.format_table(result["results"]))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
      f.write("\n")
  if _PLOT.value:
    report.plot(result["results"], _PLOT.value)


if __name__ == "__main__":
  app.run(main)
