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


def _run(tmp_path, *flags, timeout=240, xla_flags=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
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
    assert 0 <= row["kernel_ms"] <= row["cpu_ms"] and row["page_faults"] >= 0
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


def test_interleaved_rows_from_their_rounds(tmp_path):
  """--interleave times the kinds of a length in turns, in one process: each row's median,
  CPU and kernel times, and its paired ratios (the median of the round-by-round ratios of
  the two kinds' times), recomputed here from the rounds it reports."""
  done = _run(
      tmp_path, "--width=tiny", "--scopes=layer", "--kinds=colt5,longt5_local", "--lengths=256",
      "--mode=fwd", "--repeats=3", "--warmup=0", "--interleave", "--matmul_size=256",
      f"--json={tmp_path / 'report.json'}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / "report.json", encoding="utf-8") as f:
    rows = {row["model"]: row for row in json.load(f)["results"]}
  assert set(rows) == {"colt5", "longt5_local"}
  for name, row in rows.items():
    assert row["interleaved"] and len(row["ms_runs"]) == 3
    assert row["ms"] == pytest.approx(sorted(row["ms_runs"])[1], abs=1e-3)
    assert 0 <= row["kernel_ms"] <= row["cpu_ms"] and row["page_faults"] >= 0
    (other,) = set(rows) - {name}
    ratios = sorted(a / b for a, b in zip(row["ms_runs"], rows[other]["ms_runs"], strict=True))
    assert row["paired_ratios"] == {other: pytest.approx(ratios[1], rel=1e-3)}


def test_timed_call_counts_the_pages_a_run_first_touches():
  """One minor fault per fresh page written: an anonymous mapping of 2048 pages (never
  huge pages: nothing asks for them), one byte written per page."""
  import mmap

  sys.path.insert(0, SCRIPTS)
  try:
    from benchmarking import measure
  finally:
    sys.path.pop(0)
  pages = 2048

  def touch_fresh_pages():
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as memory:
      for page in range(pages):
        memory[page * mmap.PAGESIZE] = 1

  fresh = measure.timed_call(touch_fresh_pages)
  assert pages <= fresh.faults < pages + 200  # + the interpreter's own few
  assert 0 <= fresh.kernel <= fresh.cpu
  # The same writes to pages touched before the timed call (payload made before it too).
  payload = b"\2" * (pages * mmap.PAGESIZE)
  with mmap.mmap(-1, len(payload)) as memory:
    memory.write(payload)
    memory.seek(0)
    again = measure.timed_call(lambda: memory.write(payload))
    assert again.faults < 200
    assert memory[:: mmap.PAGESIZE] == b"\2" * pages


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


# -- Whole models: --scopes=train_step,inference -------------------------------------------

SCRIPTS = os.path.join(ROOT, "scripts")
WHOLE_MODEL_KINDS = ("colt5", "longt5_tglobal_mqa")
WHOLE_MODEL_FLAGS = (
    "--width=tiny", "--scopes=train_step,inference", "--lengths=64", "--target_length=8",
    "--decode_length=4", "--batch=2", "--repeats=1", "--warmup=0", "--isolate=false",
    "--matmul_size=128", f"--kinds={','.join(WHOLE_MODEL_KINDS)}",
)


def _benchmarking():
  if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)
  from benchmarking import cases, whole_model

  return cases, whole_model


def _case(scope, kind):
  """The Case that WHOLE_MODEL_FLAGS plans for `scope` and `kind`."""
  cases, _ = _benchmarking()
  return cases.Case(
      kind=kind, scope=scope, mode=cases.WHOLE_MODEL_SCOPES[scope], length=64, width="tiny",
      batch=2, warmup=0, repeats=1, matmul_size=128, target_length=8, decode_length=4,
  )


@pytest.fixture(scope="module")
def whole_model_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("whole_model")
  # XLA's backend unoptimised: these check the machinery and the values (compiled either
  # way), and compiling four whole models is most of their time.
  done = _run(out, *WHOLE_MODEL_FLAGS, f"--json={out / 'report.json'}", timeout=1800,
              xla_flags="--xla_backend_optimization_level=0")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out / "report.json", encoding="utf-8") as f:
    rows = json.load(f)["results"]
  return {(row["scope"], row["model"]): row for row in rows}, done.stdout


def test_whole_model_json_has_every_case_and_field(whole_model_report):
  rows, stdout = whole_model_report
  assert set(rows) == {
      (scope, kind) for scope in ("train_step", "inference") for kind in WHOLE_MODEL_KINDS
  }
  for (scope, _), row in rows.items():
    assert set(REQUIRED) <= set(row) and not row["skipped"], row
    assert (row["length"], row["batch"], row["width"]) == (64, 2, "tiny")
    assert row["mode"] == ("fwd_bwd" if scope == "train_step" else "fwd")
    assert row["ms"] > 0 and row["compile_s"] > 0 and row["peak_mem_mb"] > 0
    assert 0 <= row["kernel_ms"] <= row["cpu_ms"] and row["page_faults"] >= 0
    # samples/s = batch / time.
    assert row["samples_per_s"] == pytest.approx(2 / (row["ms"] / 1e3))
    if scope == "train_step":
      assert row["target_length"] == 8 and row["first_step_loss"] > 0
    else:
      assert row["decode_length"] == 4 and len(row["decoded_first_row"]) == 4
      assert 0 < row["encoder_ms"] and row["decoder_ms"] >= 0
      assert row["encoder_share"] + row["decoder_share"] == pytest.approx(1.0)
      assert row["encoder_share"] == pytest.approx(min(row["encoder_ms"] / row["ms"], 1.0))
  assert sum(line.startswith("| inference |") for line in stdout.splitlines()) >= 2


def test_whole_model_flops_match_hand_counts(tmp_path):
  """--plan_only (no compilation): the train step's and inference's FLOPs at the tiny
  sizes (embed 32, 4 heads × 8, MLP 64, 2 + 2 layers, 384 vocabulary rows; LongT5 blocks
  of 32 tokens, a global token per 16), written out by hand."""
  done = _run(
      tmp_path, "--width=tiny", "--scopes=train_step,inference", "--lengths=256",
      "--target_length=8", "--decode_length=4", "--batch=1,3",
      "--kinds=longt5_tglobal,longt5_tglobal_mqa", "--plan_only", timeout=120,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  planned = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
  flops = {(r["scope"], r["model"], r["batch"]): r["flops"] for r in planned}
  assert len(flops) == 8
  d, inner, ff, vocab, n, globals_ = 32, 32, 64, 384, 256, 16
  encoder = 2 * (
      4 * 2 * n * d * inner + 2 * 2 * globals_ * d * inner
      + 2 * 2 * n * (96 + globals_) * inner + 3 * 2 * n * d * ff
  )

  def decoder(tokens, keys, kv_inner):  # one pass of `tokens` queries, 2 layers + logits
    layer = (
        4 * 2 * tokens * d * inner + 2 * 2 * tokens * keys * inner  # self-attention
        + 2 * 2 * tokens * d * inner + 2 * 2 * tokens * n * inner  # cross-attention
        + 3 * 2 * tokens * d * ff
    )
    return 2 * layer + 2 * tokens * d * vocab

  for kind, kv_inner in (("longt5_tglobal", inner), ("longt5_tglobal_mqa", 8)):
    cross_kv = 2 * 2 * 2 * n * d * kv_inner  # 2 layers' keys and values, once
    train = 3 * (encoder + decoder(8, 8, kv_inner) + cross_kv)
    infer = encoder + 4 * decoder(1, 4, kv_inner) + cross_kv
    for batch in (1, 3):
      assert flops[("train_step", kind, batch)] == batch * train
      assert flops[("inference", kind, batch)] == batch * infer


def test_inference_decodes_as_predict_batch_and_an_uncached_loop(whole_model_report):
  """The decoded ids equal `model.predict_batch`'s greedy output (up to an EOS, which the
  benchmark suppresses) and a plain greedy loop that reruns the whole decoder over the
  prefix at each step, without the KV cache, with the EOS logit removed."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rows, _ = whole_model_report
  _, whole_model = _benchmarking()
  kind = "longt5_tglobal_mqa"
  params, batch, _, _, model = whole_model.inference_programs(_case("inference", kind))
  got = rows[("inference", kind)]["decoded_first_row"]

  module = model.module
  encoder_tokens = batch["encoder_input_tokens"]
  apply = jax.jit(
      lambda decoder_input: module.apply(
          {"params": params}, encoder_tokens, decoder_input, jnp.ones_like(decoder_input),
          enable_dropout=False,
      )
  )
  decoder_input = np.zeros((2, 4), np.int32)
  expected = []
  for step in range(4):
    logits = np.asarray(apply(decoder_input))[:, step].copy()
    logits[:, whole_model.EOS_ID] = -np.inf
    token = logits.argmax(-1)
    expected.append(int(token[0]))
    if step + 1 < 4:
      decoder_input[:, step + 1] = token
  assert got == expected

  plain = np.asarray(jax.jit(model.predict_batch)(params, batch))[0].tolist()
  ended = plain.index(whole_model.EOS_ID) if whole_model.EOS_ID in plain else 4
  assert got[:ended] == plain[:ended]


def test_train_step_loss_is_the_cross_entropy_of_the_initial_model(whole_model_report):
  """The first step's loss equals T5's loss (cross-entropy + 1e-4 log²Z, mean over the
  target tokens) of the initial parameters on the same batch, computed here in float64
  from the network's logits."""
  import jax
  import numpy as np

  rows, _ = whole_model_report
  _, whole_model = _benchmarking()
  trainer, model = whole_model.build_trainer(_case("train_step", "colt5"))
  params = trainer.create_state().params
  batch = whole_model.train_batch(_case("train_step", "colt5"), model.module.vocab_size)
  # One compiled forward pass (op by op, the network took most of this test's time).
  logits = np.asarray(
      jax.jit(
          lambda params, batch: model.module.apply(
              {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
              batch["decoder_target_tokens"], enable_dropout=False,
          )
      )(params, batch),
      np.float64,
  )
  top = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  targets = batch["decoder_target_tokens"]
  target_logits = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  expected = np.mean(log_z - target_logits + 1e-4 * log_z**2)
  assert rows[("train_step", "colt5")]["first_step_loss"] == pytest.approx(expected, rel=1e-5)


def test_cross_attention_variants_need_a_whole_model():
  done = _run(None, "--kinds=colt5_mha", "--scopes=layer", "--plan_only", timeout=120)
  assert done.returncode != 0
  assert "--kinds=colt5_mha" in done.stderr


def test_whole_model_scan_and_remat_flags_reach_the_model():
  """--scan_layers/--remat override a whole model's file (the base files unroll and keep
  every activation); left unset, the file's own settings stand."""
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  try:
    from benchmarking import cases, whole_model
  finally:
    sys.path.pop(0)

  def stack(**overrides):
    case = cases.Case(kind="colt5", scope="train_step", mode="fwd_bwd", length=64,
                      width="tiny", **overrides)
    network = whole_model.build_model(case).module
    built = {"encoder": network.encoder_factory(), "decoder": network.decoder_factory()}
    return {part: (module.scan_layers, module.remat_policy) for part, module in built.items()}

  # configs/architectures/t5_1_1.gin, which every model file includes.
  file_scan, file_remat = False, "none"
  assert stack() == {part: (file_scan, file_remat) for part in ("encoder", "decoder")}
  assert stack(scan_layers=not file_scan, remat="full") == {
      part: (not file_scan, "full") for part in ("encoder", "decoder")
  }
  # The report records what ran: a whole model's unset settings as None (its file's), an
  # encoder's as the settings it ran with.
  fields = cases.result_fields(cases.Case(kind="colt5", scope="train_step", mode="fwd_bwd",
                                          length=64, width="tiny"))
  assert (fields["scan_layers"], fields["remat"]) == (None, None)
  encoder = cases.Case(kind="colt5", scope="encoder", mode="fwd", length=64, width="tiny")
  fields = cases.result_fields(encoder)
  assert (fields["scan_layers"], fields["remat"]) == (True, "none")
  assert {"SCAN_LAYERS = True", "REMAT_POLICY = 'none'"} <= set(cases.gin_bindings(encoder))
