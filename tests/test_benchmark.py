"""scripts/benchmark.py end to end on the `tiny` width (configs/models/*_tiny.gin): the
JSON's fields and its numbers.

The FLOP counts are checked against sums written out by hand here (the matmuls of each
branch at the tiny sizes), and against XLA's own count of the compiled program.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
REQUIRED = (
    "model", "length", "width", "mode", "batch", "dtype", "ms", "compile_s", "peak_mem_mb",
    "flops", "achieved_gflops",
)
KINDS = {"colt5", "longt5_tglobal", "longt5_local", "t5"}


def _run(tmp_path, *flags, timeout=240):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  done = subprocess.run(
      [sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=timeout,
      cwd=ROOT, env=env, check=False,
  )
  return done


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("benchmark")
  done = _run(
      out,
      "--width=tiny", "--lengths=256,512", "--mode=fwd", "--repeats=1", "--warmup=0",
      "--isolate=false", "--matmul_size=256",
      f"--json={out / 'report.json'}", f"--plot={out / 'report.png'}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out / "report.json", encoding="utf-8") as f:
    return json.load(f), done.stdout, out


def test_json_has_every_case_and_field(tiny_report):
  report, _, _ = tiny_report
  assert report["backend"] == "cpu"
  assert report["matmul_peak_gflops"] > 0
  rows = report["results"]
  assert {(r["model"], r["length"]) for r in rows} == {
      (kind, length) for kind in KINDS for length in (256, 512)
  }
  assert len(rows) == 8
  for row in rows:
    assert set(REQUIRED) <= set(row), row
    assert not row["skipped"], row
    assert (row["width"], row["mode"], row["batch"], row["dtype"]) == (
        "tiny", "fwd", 1, "float32"
    )
    assert row["ms"] > 0 and row["compile_s"] > 0 and row["peak_mem_mb"] > 0
    # achieved = flops / time, in GFLOP/s.
    assert row["achieved_gflops"] == pytest.approx(row["flops"] / (row["ms"] / 1e3) / 1e9)


def test_flops_match_hand_counts(tiny_report):
  report, _, _ = tiny_report
  flops = {(r["model"], r["length"]): r["flops"] for r in report["results"]}
  # tiny: d_model 32, T5 heads 4 × 8, d_ff 64; local radius 31, so blocks of 32 tokens
  # see 3 × 32 = 96 keys.
  d, inner, ff = 32, 32, 64
  n = 256
  projections = 4 * 2 * n * d * inner
  mlp = 3 * 2 * n * d * ff
  window = 2 * 2 * n * 96 * inner
  assert flops[("longt5_local", n)] == projections + window + mlp == 8_388_608
  assert flops[("t5", n)] == projections + 2 * 2 * n * n * inner + mlp
  num_globals = n // 16
  assert flops[("longt5_tglobal", n)] == (
      projections + 2 * 2 * num_globals * d * inner + 2 * 2 * n * (96 + num_globals) * inner
      + mlp
  )
  # CoLT5 at 512 tokens: 1 light head, 3 heavy (of 8); light MLP 32, heavy 256; routes
  # 512/16 = 32 queries and feedforward tokens, 64 keys/values (docs/paper.md, Model).
  n = 512
  light_attention = 4 * 2 * n * d * 8 + 2 * 2 * n * 96 * 8
  light_mlp = 3 * 2 * n * d * 32
  routers = 3 * 2 * n * d
  heavy_attention = 2 * (2 * 32 * d * 24) + 2 * (2 * 64 * d * 24) + 2 * 2 * 32 * 64 * 24
  heavy_mlp = 3 * 2 * 32 * d * 256
  assert flops[("colt5", n)] == (
      light_attention + light_mlp + routers + heavy_attention + heavy_mlp
  ) == 7_929_856


def test_flops_agree_with_xla_cost_analysis(tiny_report):
  report, _, _ = tiny_report
  for row in report["results"]:
    # XLA also counts the elementwise work (softmax, GELU, norms, routing), never less.
    assert 0.6 * row["xla_flops"] <= row["flops"] <= 1.02 * row["xla_flops"], row


def test_table_and_plot(tiny_report):
  _, stdout, out = tiny_report
  table = [line for line in stdout.splitlines() if line.startswith("| layer |")]
  assert len(table) >= 8
  with open(out / "report.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_isolated_case_skips_what_does_not_fit(tmp_path):
  """Fresh subprocess per case; full attention over the memory budget is skipped, with
  a note, and so is a peer whose package is missing."""
  path = tmp_path / "skip.json"
  done = _run(
      tmp_path,
      "--width=tiny", "--lengths=512", "--kinds=t5", "--mode=fwd", "--repeats=1",
      "--matmul_size=256", "--memory_budget_gb=0.0001", f"--json={path}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(path, encoding="utf-8") as f:
    (row,) = json.load(f)["results"]
  assert row["skipped"] and row["ms"] is None and row["achieved_gflops"] is None
  assert "full attention" in row["note"]
  assert row["flops"] > 0


def test_bad_flag_value_is_named():
  done = _run(None, "--mode=train", "--isolate=false", timeout=60)
  assert done.returncode != 0
  assert "--mode=train" in done.stderr


def test_missing_peer_package_is_skipped_with_a_note(tmp_path):
  """A stand-in `colt5_attention` that fails to import, as when it is not installed."""
  (tmp_path / "colt5_attention.py").write_text("raise ImportError('not installed')\n")
  case = {"case": {
      "scope": "peer", "kind": "colt5_attention", "width": "tiny", "length": 256,
      "mode": "fwd", "batch": 1, "dtype": "float32", "warmup": 0, "repeats": 1,
      "max_case_s": 10.0,
  }}
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  done = subprocess.run(
      [sys.executable, SCRIPT, f"--case={json.dumps(case)}"], capture_output=True,
      text=True, timeout=120, cwd=ROOT, env=env, check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  line = next(
      text for text in done.stdout.splitlines() if text.startswith("BENCHMARK_CASE_RESULT ")
  )
  row = json.loads(line.split(" ", 1)[1])
  assert row["skipped"]
  assert "colt5-attention is not installed" in row["note"]
