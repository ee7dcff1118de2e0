"""The paper's claims at small scale, reproduced by one command (docs/small_scale.md).

    python -m colt5_flax.experiments.small_scale --output_dir=runs/small_scale

Tiny models on the demo's task (associative recall over long inputs,
`colt5_flax/data/recall.py`), every one trained by the demo's curriculum through the real
trainer and the gin files in configs/ (`models/*_tiny.gin`, `runs/demo.gin`,
`runs/small_scale.gin`, `ablations/*.gin`):

1. Routing ablations (the directions of CoLT5 Table 6), the same steps and seeds for
   every row: learned routing, static, random, no heavy branch, a shared q/kv router,
   v = all tokens, routed m halved and doubled. Exact match at 2048 tokens, the final
   training loss and the routers' recall, mean and spread over seeds.
2. Quality and speed against length (the shape of CoLT5 Figure 4): CoLT5 (the learned
   row), LongT5-TGlobal and LongT5-local, trained alike, scored at each of `--lengths`;
   training steps per second at each length, measured one after the other in one pass
   before anything else runs.
3. Router analysis (CoLT5 §4.6): per layer, the share of the query, key/value and
   feedforward routers' selections on fact tokens, the question's key and filler, and the
   overlap between the three routers' selections.

Writes `OUTPUT_DIR/results.json`, `OUTPUT_DIR/results.md` and the figures
(`small_scale_report.py`). Every job (one training run, one scoring, one timing) writes
`OUTPUT_DIR/jobs/<job>.json` when it ends, with its command and wall time; a rerun of the
same command skips finished jobs, and an interrupted training job resumes from its last
checkpoint. `--workers` jobs run at once, each in its own single-threaded process (on a
2-core CPU two tiny runs side by side finish ~1.4x sooner than one after the other with
two threads each); the timing pass always runs alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import gin
import numpy as np
from absl import app, flags, logging
from etils import epath

from colt5_flax import demo, demo_report, gin_utils, jsonl
from colt5_flax import train as train_lib
from colt5_flax.data import recall
from colt5_flax.experiments import small_scale_report

FLAGS = flags.FLAGS

MODEL_FILES = {
    "colt5": "models/colt5_tiny.gin",
    "longt5_tglobal": "models/longt5_tglobal_tiny.gin",
    "longt5_local": "models/longt5_local_tiny.gin",
}
# The demo's model, task and curriculum, then the study's settings (runs/small_scale.gin).
RUN_FILES = ("runs/demo.gin", "runs/small_scale.gin")


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration: a model file, ablation files after the run files, bindings.

  `paper` is the paper's row it stands for (CoLT5 Table 6's name for it) or None.
  """

  name: str
  label: str
  model: str = "colt5"
  ablations: tuple[str, ...] = ()
  bindings: tuple[str, ...] = ()
  paper: str | None = None

  @property
  def gin_files(self) -> tuple[str, ...]:
    return (MODEL_FILES[self.model], *RUN_FILES, *self.ablations)


# The demo's curriculum trains learned routers with every token through the heavy branch
# in its second stage (DEMO_TRAIN_CAPACITY_FACTOR = 16, weighted by λ: configs/runs/demo.gin)
# so that every router score gets a gradient. Static and random routing have no scores to
# learn: they train at their real capacity, seeing their own selection as they will when
# scored, as in the paper's ablations. `learned_at_capacity` shows what the factor does for
# learned routing; the `*_curriculum` rows keep the factor of 16 for static and random
# routing, which then train as full attention. These three controls are not run by default
# (`--rows` names them): the default rows are the paper's directions, in about two hours.
_AT_CAPACITY = ("DEMO_TRAIN_CAPACITY_FACTOR = 1.0",)
_STATIC = ("ablations/static_routing.gin",)
_RANDOM = ("ablations/random_routing.gin",)
ROUTING_ROWS = (
    Row("learned", "learned routing (CoLT5)", paper="Baseline"),
    Row("learned_at_capacity", "learned routing, trained at capacity", bindings=_AT_CAPACITY),
    Row("static", "static routing", ablations=_STATIC, bindings=_AT_CAPACITY, paper="Static"),
    Row("random", "random routing", ablations=_RANDOM, bindings=_AT_CAPACITY),
    Row("no_heavy", "no heavy branch", ablations=("ablations/no_heavy_branch.gin",)),
    Row("shared_qkv", "shared q/kv router", ablations=("ablations/shared_qkv_routing.gin",),
        paper="Share QKV"),
    Row("kv_all", "v = all tokens", ablations=("ablations/kv_all_tokens.gin",), paper="v=all"),
    # m = n/32 and n/8 against the demo's n/16 (the paper: m = 512 and 1536 against 1024).
    Row("m_half", "routed m halved", ablations=("ablations/routed_tokens_512.gin",),
        paper="m=512"),
    Row("m_double", "routed m doubled", bindings=("ROUTED_FRACTION = 0.125",), paper="m=1536"),
    Row("static_curriculum", "static routing, trained as full attention", ablations=_STATIC,
        paper="Static"),
    Row("random_curriculum", "random routing, trained as full attention", ablations=_RANDOM),
)
CONTROL_ROWS = ("learned_at_capacity", "static_curriculum", "random_curriculum")
DEFAULT_ROWS = [row.name for row in ROUTING_ROWS if row.name not in CONTROL_ROWS]
# LongT5 has no routers: the same stages without their routing bindings.
_NO_ROUTERS = ("demo_script.curriculum.stage_bindings = False",)
LENGTH_ROWS = {
    "colt5": ROUTING_ROWS[0],  # The learned row's runs: CoLT5 in both studies.
    "longt5_tglobal": Row("longt5_tglobal", "LongT5-TGlobal", model="longt5_tglobal",
                          bindings=_NO_ROUTERS),
    "longt5_local": Row("longt5_local", "LongT5-local", model="longt5_local",
                        bindings=_NO_ROUTERS),
}


@dataclasses.dataclass(frozen=True)
class Job:
  """One unit of work, run in its own process (or in this one with --workers=0).

  kind: "train" (the demo's curriculum for one row and seed, then scoring at the demo's
  evaluation length), "score" (a trained row at `length` tokens) or "time" (training
  steps per second of a row's model at `length` tokens, batch `batch_size`).
  """

  kind: str
  row: str
  seed: int = 0
  length: int = 0
  batch_size: int = 0

  @property
  def name(self) -> str:
    parts = {"train": (self.row, f"seed{self.seed}"),
             "score": (self.row, f"seed{self.seed}", str(self.length)),
             "time": (self.row, str(self.length))}[self.kind]
    return "-".join((self.kind, *parts))


def _rows() -> dict[str, Row]:
  return {row.name: row for row in (*ROUTING_ROWS, *LENGTH_ROWS.values())}


def plan(
    rows: Sequence[str], length_models: Sequence[str], seeds: Sequence[int],
    lengths: Sequence[int], timing_batch_size: int,
) -> list[Job]:
  """Every job of the study, in the order they run: timing, training, scoring."""
  for name in rows:
    if name not in {r.name for r in ROUTING_ROWS}:
      raise ValueError(f"--rows: unknown row {name!r}; rows: {[r.name for r in ROUTING_ROWS]}")
  for name in length_models:
    if name not in LENGTH_ROWS:
      raise ValueError(f"--length_models: unknown model {name!r}; models: {list(LENGTH_ROWS)}")
  length_rows = [LENGTH_ROWS[name].name for name in length_models]
  trained = list(dict.fromkeys([*rows, *length_rows]))
  timed = [Job("time", row, length=length, batch_size=timing_batch_size)
           for length in lengths for row in length_rows]
  training = [Job("train", row, seed) for seed in seeds for row in trained]
  scoring = [Job("score", row, seed, length)
             for seed in seeds for row in length_rows for length in lengths]
  return [*timed, *training, *scoring]


# --------------------------------------------------------------------------------- jobs


def row_dir(output_dir: epath.Path, row: str, seed: int) -> epath.Path:
  return output_dir / "runs" / row / f"seed{seed}"


def _bindings(row: Row, seed: int, user_bindings: Sequence[str]) -> list[str]:
  return [*row.bindings, f"train_script.train.seed = {seed}", *user_bindings]


def demo_command(row: Row, seed: int, model_dir: epath.Path, user_bindings: Sequence[str]) -> str:
  """The standalone command that trains and scores one row: the demo's, with the row's
  gin files and bindings (what a train job runs, in its own process)."""
  args = ["python", "-m", "colt5_flax.demo", f"--model_dir={model_dir}",
          *(f"--gin_file={f}" for f in row.gin_files),
          *(f"--gin_bindings={b}" for b in _bindings(row, seed, user_bindings)),
          "--nobaseline", "--shipped_checkpoints="]
  return shlex.join(args)


def router_analysis(routing: Mapping[str, Any], num_values: int) -> dict[str, Any]:
  """Where each router's selections fall, and how much the routers agree, per layer.

  Args:
    routing: `demo.score(keep_routing=True)["_routing"]`: `tokens` [n, length] and, per
      router ("q", "kv", "mlp") present, a list over layers of [n, k] positions.
    num_values: the task's values per key (decodes the fact tokens).

  Returns:
    `shares[router][layer] = {"fact", "question", "filler"}`: the fraction of the router's
    selected positions on each kind of token (mean over inputs), `chance` the same
    fractions for a uniform pick, and `overlap["q/kv"|"q/mlp"|"kv/mlp"][layer]`: the
    fraction of the smaller of two selections that the other also selects (with its
    chance, the larger selection's share of the input).
  """
  tokens = np.asarray(routing["tokens"])
  real = tokens > 0
  fact = recall.fact_mask_for(tokens, num_values).astype(bool)
  question = recall.question_mask_for(tokens, num_values).astype(bool)
  kinds = {"fact": fact, "question": question, "filler": real & ~fact & ~question}
  routers = [r for r in demo.ROUTERS if r in routing]

  def selected(positions: np.ndarray) -> np.ndarray:
    mask = np.zeros(tokens.shape, bool)
    np.put_along_axis(mask, positions, True, axis=1)
    return mask & real

  masks = {r: [selected(np.asarray(layer)) for layer in routing[r]] for r in routers}
  shares = {
      r: [{kind: float(np.mean((m & where).sum(1) / np.maximum(m.sum(1), 1)))
           for kind, where in kinds.items()} for m in masks[r]]
      for r in routers
  }
  chance = {kind: float(np.mean(where.sum(1) / real.sum(1))) for kind, where in kinds.items()}
  overlap: dict[str, list] = {}
  for i, first in enumerate(routers):
    for second in routers[i + 1:]:
      pairs = zip(masks[first], masks[second], strict=True)
      overlap[f"{first}/{second}"] = [
          {"overlap": float(np.mean((a & b).sum(1) / np.maximum(np.minimum(a.sum(1),
                                                                           b.sum(1)), 1))),
           "chance": float(np.mean(np.maximum(a.sum(1), b.sum(1)) / real.sum(1)))}
          for a, b in pairs
      ]
  return {"shares": shares, "chance": chance, "overlap": overlap}


def _public(score: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in score.items() if not k.startswith("_")}


def run_job(job: Job, output_dir: epath.Path, user_bindings: Sequence[str]) -> dict[str, Any]:
  """Runs one job in this process; returns its result (without command and wall time)."""
  row = _rows()[job.row]
  bindings = _bindings(row, job.seed, user_bindings)
  if job.kind == "train":
    model_dir = row_dir(output_dir, job.row, job.seed)
    score, seconds = demo.train_curriculum(
        list(row.gin_files), model_dir, bindings, keep_routing=True
    )
    curves = demo_report.learning_curves(model_dir)
    losses = [loss for _, loss in curves["loss"]]
    result = {**_public(score), "train_seconds": round(seconds, 1), "learning_curves": curves,
              "final_loss": float(np.mean(losses[-5:])) if losses else None,
              "demo_command": demo_command(row, job.seed, model_dir, user_bindings)}
  elif job.kind == "score":
    model_dir = row_dir(output_dir, job.row, job.seed)
    if not demo._checkpointed_step(model_dir):  # noqa: SLF001 -- the demo's resume rule
      raise FileNotFoundError(f"{job.name}: no trained checkpoint in {model_dir}")
    score = demo.score_checkpoint(
        list(row.gin_files), model_dir, [*bindings, f"DEMO_EVAL_LENGTH = {job.length}"],
        keep_routing=True,
    )
    result = _public(score)
  elif job.kind == "time":
    return time_training(row, job, bindings)
  else:
    raise ValueError(f"unknown job kind {job.kind!r}")
  if "_routing" in score:
    result["router_analysis"] = router_analysis(
        score["_routing"], gin.query_parameter("%DEMO_NUM_VALUES")
    )
  return result


def time_training(row: Row, job: Job, bindings: Sequence[str]) -> dict[str, Any]:
  """Training steps per second of the row's model at `job.length` tokens: the real
  trainer for `--timing_steps` steps, timed over its last `--timing_window` (compilation
  excluded), with the routers' real capacity (no curriculum stage bindings)."""
  steps, window = FLAGS.timing_steps, FLAGS.timing_window
  with tempfile.TemporaryDirectory() as model_dir:
    demo._configure(list(row.gin_files), [  # noqa: SLF001 -- the demo's gin set-up
        *bindings, f"MODEL_DIR = '{model_dir}'", f"DEMO_INPUT_LENGTH = {job.length}",
        f"BATCH_SIZE = {job.batch_size}", f"TRAIN_STEPS = {steps}", "EVAL_PERIOD = 0",
        f"CHECKPOINT_PERIOD = {steps}", f"train_script.train.log_period = {window}",
        "WARMUP_STEPS = 0",  # a schedule over so few steps; the rate does not change speed
    ])
    train = demo._configured(train_lib.train)  # noqa: SLF001
    gin.finalize()
    train()
    records = [record for _, record in jsonl.read(os.path.join(model_dir, "train_metrics.jsonl"))]
  last = records[-1]
  return {"length": job.length, "batch_size": job.batch_size, "steps": steps,
          "timed_steps": last["step"] - (records[-2]["step"] if len(records) > 1 else 0),
          "steps_per_sec": last["steps_per_sec"],
          "tokens_per_sec": last["steps_per_sec"] * job.batch_size * job.length}


# ----------------------------------------------------------------------------- running


def _job_path(output_dir: epath.Path, job: Job) -> epath.Path:
  return output_dir / "jobs" / f"{job.name}.json"


def _study_args() -> list[str]:
  """The flags that define the study, to hand to a worker process."""
  return [f"--output_dir={FLAGS.output_dir}", f"--seeds={','.join(map(str, FLAGS.seeds))}",
          f"--lengths={','.join(map(str, FLAGS.lengths))}", f"--rows={','.join(FLAGS.rows)}",
          f"--length_models={','.join(FLAGS.length_models)}",
          f"--timing_batch_size={FLAGS.timing_batch_size}",
          f"--timing_steps={FLAGS.timing_steps}", f"--timing_window={FLAGS.timing_window}",
          *(f"--gin_bindings={b}" for b in FLAGS.gin_bindings)]


def _job_argv(job: Job, python: str = "python") -> list[str]:
  """The command that runs just `job`, in this process (a worker's command)."""
  return [python, "-m", "colt5_flax.experiments.small_scale", *_study_args(),
          f"--only={job.name}", "--workers=0"]


def job_command(job: Job) -> str:
  return shlex.join(_job_argv(job))


def _execute(job: Job, output_dir: epath.Path, user_bindings: Sequence[str],
             in_process: bool, single_threaded: bool = True) -> dict[str, Any]:
  """Runs `job` (here or in a worker process, single-threaded unless told otherwise:
  two side by side) and saves its record."""
  start = time.time()
  if in_process:
    result = run_job(job, output_dir, user_bindings)
    record = {"job": dataclasses.asdict(job), "command": job_command(job),
              "wall_s": round(time.time() - start, 1), "result": result}
    path = _job_path(output_dir, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    return record
  env = dict(os.environ)
  if single_threaded:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  log = output_dir / "logs" / f"{job.name}.log"
  log.parent.mkdir(parents=True, exist_ok=True)
  with log.open("w") as out:
    code = subprocess.run(_job_argv(job, sys.executable), stdout=out,
                          stderr=subprocess.STDOUT, env=env).returncode
  if code:
    raise RuntimeError(f"{job.name} failed (exit {code}); its log: {log}")
  record = json.loads(_job_path(output_dir, job).read_text())
  record["wall_s"] = round(time.time() - start, 1)  # The worker's start-up included.
  _job_path(output_dir, job).write_text(json.dumps(record, indent=1) + "\n")
  return record


def _jsonable(value):
  if isinstance(value, np.generic | np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON: {type(value)}")


def run_study(jobs: Sequence[Job], output_dir: epath.Path, user_bindings: Sequence[str],
              workers: int) -> dict[str, dict[str, Any]]:
  """Runs the jobs not yet finished (timing first and alone), returns every record."""
  records = {}
  pending = []
  for job in jobs:
    path = _job_path(output_dir, job)
    if path.exists():
      records[job.name] = json.loads(path.read_text())
    else:
      pending.append(job)
  logging.info("%d jobs finished earlier, %d to run", len(records), len(pending))
  in_process = workers == 0
  for job in [j for j in pending if j.kind == "time"]:  # Side by side, nothing else running.
    logging.info("Running %s", job.name)
    records[job.name] = _execute(job, output_dir, user_bindings, in_process,
                                 single_threaded=False)
  for kind in ("train", "score"):
    todo = [j for j in pending if j.kind == kind]
    if in_process:
      for job in todo:
        logging.info("Running %s", job.name)
        records[job.name] = _execute(job, output_dir, user_bindings, True)
      continue
    with futures.ThreadPoolExecutor(workers) as pool:
      running = {pool.submit(_execute, j, output_dir, user_bindings, False): j for j in todo}
      for done in futures.as_completed(running):
        job = running[done]
        records[job.name] = done.result()
        logging.info("Finished %s in %.0fs", job.name, records[job.name]["wall_s"])
  return records


def _define_flags() -> None:
  flags.DEFINE_string("output_dir", "runs/small_scale", "Where results, runs and logs go.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of every row.")
  flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"],
                    "Input lengths of the length study (scoring and timing).")
  flags.DEFINE_list("rows", DEFAULT_ROWS, "Routing-ablation rows to run (all: "
                    f"{[r.name for r in ROUTING_ROWS]}).")
  flags.DEFINE_list("length_models", list(LENGTH_ROWS), "Models of the length study.")
  flags.DEFINE_integer("timing_batch_size", 2, "Batch size of the timed training steps.")
  flags.DEFINE_integer("timing_steps", 20, "Training steps of each timing run.")
  flags.DEFINE_integer("timing_window", 10, "Its last steps, the timed ones.")
  flags.DEFINE_integer("workers", 2, "Jobs at once, each its own process; 0: all in this one.")
  flags.DEFINE_string("only", None, "Run just this job (by name) and exit; a worker's command.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  if FLAGS.gin_file:
    raise app.UsageError("--gin_file: every row names its own gin files (see ROUTING_ROWS); "
                         "change the study's settings with --gin.NAME=VALUE bindings")
  output_dir = epath.Path(os.path.abspath(FLAGS.output_dir))
  FLAGS.output_dir = str(output_dir)
  seeds = [int(s) for s in FLAGS.seeds]
  lengths = [int(n) for n in FLAGS.lengths]
  jobs = plan(FLAGS.rows, FLAGS.length_models, seeds, lengths, FLAGS.timing_batch_size)
  user_bindings = list(FLAGS.gin_bindings)
  if FLAGS.only:
    by_name = {job.name: job for job in jobs}
    if FLAGS.only not in by_name:
      raise app.UsageError(f"--only={FLAGS.only}: not a job of this study: {sorted(by_name)}")
    _execute(by_name[FLAGS.only], output_dir, user_bindings, in_process=True)
    return
  start = time.time()
  records = run_study(jobs, output_dir, user_bindings, FLAGS.workers)
  results = small_scale_report.write(
      output_dir, records, jobs, study={
          "command": shlex.join(["python", "-m", "colt5_flax.experiments.small_scale",
                                 *sys.argv[1:]]),
          "seeds": seeds, "lengths": lengths, "rows": list(FLAGS.rows),
          "length_models": list(FLAGS.length_models), "workers": FLAGS.workers,
          "gin_bindings": user_bindings, "wall_s_this_run": round(time.time() - start, 1),
      },
  )
  print(small_scale_report.summary_lines(results), flush=True)


def console_entry_point() -> None:
  _define_flags()
  gin_utils.run(main)


if __name__ == "__main__":
  from colt5_flax.experiments import small_scale as _package_module

  _package_module.console_entry_point()
