"""The small-scale study (colt5_flax/experiments/small_scale.py): the router analysis
against a count by hand, the verdicts against hand-computed statistics, and the whole
machinery (training, scoring, timing, report, resume) at a few steps on two tiny rows."""

import json
import math
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
from etils import epath

from colt5_flax import demo, gin_utils
from colt5_flax.data import recall
from colt5_flax.experiments import small_scale, small_scale_report

CONFIGS = str(epath.Path(small_scale.__file__).parents[2] / "configs")
CONFIG = recall.RecallConfig(
    input_length=256, num_facts=4, num_keys=16, num_values=8, min_question_distance=40
)


def test_plan_runs_timing_then_training_then_scoring():
  jobs = small_scale.plan(["learned", "static"], ["colt5", "longt5_local"], [0, 1], [512, 1024], 2)
  kinds = [job.kind for job in jobs]
  assert kinds == sorted(kinds, key=["time", "train", "score"].index)
  names = {job.name for job in jobs}
  assert len(names) == len(jobs)
  # CoLT5 of the length study is the learned row: trained once per seed.
  assert {j.name for j in jobs if j.kind == "train"} == {
      f"train-{row}-seed{s}" for row in ("learned", "static", "longt5_local") for s in (0, 1)}
  assert len([j for j in jobs if j.kind == "score"]) == 2 * 2 * 2
  assert len([j for j in jobs if j.kind == "time"]) == 2 * 2
  with pytest.raises(ValueError, match="unknown row 'statik'"):
    small_scale.plan(["statik"], [], [0], [512], 2)
  with pytest.raises(ValueError, match="unknown model 'longt5'"):
    small_scale.plan([], ["longt5"], [0], [512], 2)


def test_every_row_names_gin_files_that_exist():
  configs = epath.Path(small_scale.__file__).parents[2] / "configs"
  for row in (*small_scale.ROUTING_ROWS, *small_scale.LENGTH_ROWS.values()):
    for name in row.gin_files:
      assert (configs / name).exists(), (row.name, name)


@pytest.mark.parametrize("row, factor", [("learned", 16.0), ("learned_at_capacity", 1.0),
                                         ("static", 1.0), ("random", 1.0),
                                         ("static_curriculum", 16.0)])
def test_the_rows_train_their_last_stage_at_the_capacity_they_say(row, factor):
  """Static and random routing have no router scores to learn: they must meet their own
  selection while training, not every token (the curriculum's factor for learned routers)."""
  from colt5_flax.layers import routing

  row = {r.name: r for r in small_scale.ROUTING_ROWS}[row]
  base = ["MODEL_DIR = '/unused'", *small_scale._bindings(row, 0, [])]  # noqa: SLF001
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags([CONFIGS], row.gin_files, base, finalize_config=False)
    last = gin.get_configurable(demo.curriculum)()[-1]
    gin_utils.parse_gin_flags([CONFIGS], row.gin_files,
                              demo.stage_bindings(base, last, last.last_step),
                              finalize_config=False)
    assert gin.get_configurable(routing.RoutingCapacity)().train_capacity_factor == factor
  finally:
    gin.clear_config()


def test_the_default_rows_are_the_papers_directions():
  assert small_scale.DEFAULT_ROWS == ["learned", "static", "random", "no_heavy", "shared_qkv",
                                      "kv_all", "m_half", "m_double"]


def test_router_analysis_matches_a_count_by_hand():
  documents = [recall.generate(CONFIG, "validation", i)["inputs"] for i in range(4)]
  tokens = np.array([[byte + 3 for byte in doc] + [1] for doc in documents])  # + EOS
  rng = np.random.default_rng(0)
  length = tokens.shape[1]
  facts = [{p for p, byte in enumerate(doc) if byte >= 0x80} for doc in documents]
  questions = [len(doc) - 1 for doc in documents]
  # q: the question's key and 7 others; kv: every fact and 12 others; mlp: 16 at random.
  def pick(must, count):
    rest = rng.choice([p for p in range(length) if p not in must], count - len(must), False)
    return np.array([*sorted(must), *rest])
  routing = {
      "tokens": tokens,
      "q": [np.stack([pick({q}, 8) for q in questions])],
      "kv": [np.stack([pick(f, 16) for f in facts])],
      "mlp": [np.stack([rng.choice(length, 16, replace=False) for _ in documents])],
  }
  result = small_scale.router_analysis(routing, CONFIG.num_values)
  for router in ("q", "kv", "mlp"):
    expected = {"fact": [], "question": [], "filler": []}
    for row, positions in enumerate(routing[router][0]):
      chosen = set(positions.tolist())
      expected["fact"].append(len(chosen & facts[row]) / len(chosen))
      expected["question"].append(len(chosen & {questions[row]}) / len(chosen))
      expected["filler"].append(len(chosen - facts[row] - {questions[row]}) / len(chosen))
    for kind, values in expected.items():
      assert result["shares"][router][0][kind] == pytest.approx(np.mean(values), abs=1e-12)
  assert result["shares"]["q"][0]["question"] == pytest.approx(1 / 8)
  assert result["shares"]["kv"][0]["fact"] == pytest.approx(4 / 16)
  assert result["chance"]["fact"] == pytest.approx(4 / length)
  for pair in ("q/kv", "q/mlp", "kv/mlp"):
    first, second = pair.split("/")
    overlaps = [len(set(a.tolist()) & set(b.tolist())) / min(len(a), len(b))
                for a, b in zip(routing[first][0], routing[second][0], strict=True)]
    assert result["overlap"][pair][0]["overlap"] == pytest.approx(np.mean(overlaps), abs=1e-12)


def _record(row, seed, accuracy):
  return {"job": {"seed": seed}, "command": f"cmd {row} {seed}", "wall_s": 10.0,
          "result": {"accuracy": accuracy, "step": 100, "final_loss": 1.0}}


def test_verdicts_against_hand_computed_statistics():
  rows = {row.name: row for row in small_scale.ROUTING_ROWS}
  accuracies = {"learned": [0.7, 0.8, 0.9],        # mean 0.8, sd 0.1
                "static": [0.2, 0.3, 0.25],        # far lower: the paper's direction
                "kv_all": [0.8, 0.75, 0.85],       # unchanged, as the paper's v = all
                "shared_qkv": [0.85, 0.95, 1.0],   # higher, the paper says lower
                "m_half": [0.65, 0.75, 0.85],      # 0.05 lower in every seed: only pairing
                                                   # resolves it (unpaired s.e. 0.08)
                "m_double": [0.2, 0.99, 0.6],      # too spread to say
                "learned_at_capacity": [0.1, 0.2, 0.3]}  # not a paper direction
  records = {f"train-{row}-seed{s}": _record(row, s, a)
             for row, values in accuracies.items() for s, a in enumerate(values)}
  out = {e["row"]: e for e in small_scale_report.routing_ablations(
      records, [rows[name] for name in accuracies], [0, 1, 2])}
  assert out["learned"]["accuracy"]["mean"] == pytest.approx(0.8)
  assert out["learned"]["accuracy"]["std"] == pytest.approx(0.1)
  static = out["static"]
  assert static["change_vs_learned"]["exact_match"] == pytest.approx(0.25 - 0.8)
  assert static["change_vs_learned"]["standard_error"] == pytest.approx(
      math.sqrt(0.1**2 / 3 + 0.05**2 / 3))
  assert static["paper"]["change"] == pytest.approx(40.5 - 42.5)
  # Same-seed differences -0.5, -0.5, -0.65: mean -0.55, sd 0.0866, s.e. 0.05; Student's
  # t for 2 degrees of freedom at 97.5% is 4.303 (a t table).
  paired = static["paired_change_vs_learned"]
  assert paired["differences"] == pytest.approx([-0.5, -0.5, -0.65])
  assert paired["mean"] == pytest.approx(-0.55) and paired["lower_in"] == 3
  assert paired["standard_error"] == pytest.approx(0.05)
  assert paired["margin_95"] == pytest.approx(4.303 * 0.05, rel=1e-3)
  assert static["direction"] == "held"
  assert out["m_half"]["direction"] == "held"
  assert out["m_half"]["change_vs_learned"]["standard_error"] == pytest.approx(
      math.sqrt(0.1**2 / 3 + 0.1**2 / 3))
  assert out["kv_all"]["expected"] == "none" and out["kv_all"]["direction"] == "held"
  assert out["shared_qkv"]["direction"] == "did not hold"
  assert out["m_double"]["direction"].startswith("inconclusive")
  assert out["static"]["seeds"][2]["command"] == "cmd static 2"
  control = out["learned_at_capacity"]
  assert control["change_vs_learned"]["exact_match"] == pytest.approx(0.2 - 0.8)
  assert "direction" not in control and "expected" not in control
  one_seed = small_scale_report.routing_ablations(records, [rows["learned"], rows["static"]], [0])
  assert one_seed[1]["direction"].startswith("inconclusive (one seed")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """Two tiny rows (CoLT5 with learned routing, LongT5-local) through the CLI: timing,
  two-step curricula, scoring at 128 tokens, the report."""
  output_dir = tmp_path_factory.mktemp("small_scale")
  root = epath.Path(small_scale.__file__).parents[2]
  command = [sys.executable, "-m", "colt5_flax.experiments.small_scale",
             f"--output_dir={output_dir}", "--rows=learned",
             "--length_models=colt5,longt5_local", "--seeds=0", "--lengths=128",
             "--workers=0", "--timing_steps=4", "--timing_window=2",
             "--gin.TRAIN_STEPS=2", "--gin.WARMUP_STEPS=1", "--gin.EVAL_PERIOD=0",
             "--gin.EVAL_NUM_EXAMPLES=8",
             "--gin.DEMO_EVAL_LENGTH=128", "--gin.DEMO_EVAL_BATCH_SIZE=8"]
  # One device, as a user runs it; XLA's backend unoptimised: this checks the machinery,
  # and compiling is most of its time.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-4000:]
  return output_dir


@pytest.mark.slow
def test_study_writes_every_field_and_every_row(study):
  results = json.loads((study / "results.json").read_text())
  assert set(results) == {"study", "routing_ablations", "length", "router_analysis",
                          "learning_curves", "jobs"}
  assert [step for step, _ in results["learning_curves"]["learned routing (CoLT5)"]] == [1, 2]
  assert set(results["jobs"]) == {
      "time-learned-128", "time-longt5_local-128", "train-learned-seed0",
      "train-longt5_local-seed0", "score-learned-seed0-128", "score-longt5_local-seed0-128"}
  for record in results["jobs"].values():
    assert record["wall_s"] > 0 and "--only=" in record["command"]
  (learned,) = results["routing_ablations"]
  (seed,) = learned["seeds"]
  assert seed["steps"] == 2 and 0.0 <= seed["accuracy"] <= 1.0
  assert math.isfinite(seed["final_loss"]) and 0.0 <= seed["router_recall"] <= 1.0
  assert "colt5_flax.demo" in seed["demo_command"] and "train_script.train.seed = 0" in seed[
      "demo_command"]
  for model in ("colt5", "longt5_local"):
    assert results["length"]["exact_match"][model]["128"]["n"] == 1
    assert results["length"]["training_speed"][model]["128"]["steps_per_sec"] > 0
  shares = results["router_analysis"]["shares"]
  assert set(shares) == {"q", "kv", "mlp"} and len(shares["q"]) == 2  # two encoder layers
  for layers in shares.values():
    for kinds in layers:
      assert sum(kinds[k]["mean"] for k in ("fact", "question", "filler")) == pytest.approx(1)
  for name in ("results.md", "ablations.png", "length.png", "routers.png", "learning.png"):
    assert (study / name).exists(), name
  assert "| learned routing (CoLT5) |" in (study / "results.md").read_text()


@pytest.mark.slow
def test_a_rerun_resumes_without_running_finished_jobs(study):
  jobs = small_scale.plan(["learned"], ["colt5", "longt5_local"], [0], [128], 2)
  before = {p.name: p.stat().st_mtime for p in (study / "jobs").iterdir()}
  records = small_scale.run_study(jobs, study, [], workers=0)  # would train if it had to
  assert set(records) == {job.name for job in jobs}
  assert {p.name: p.stat().st_mtime for p in (study / "jobs").iterdir()} == before
