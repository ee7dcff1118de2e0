"""`make demo`: a tiny CoLT5 learns associative recall over 2048 tokens on CPU, and its
routers learn to find the facts and the question.

    python -m colt5_flax.demo [--model_dir=runs/demo] [--gin.TRAIN_STEPS=...] [--nobaseline]

1. Trains `configs/models/colt5_tiny.gin` + `configs/runs/demo.gin` through the real
   trainer (`colt5_flax.train.train`), one call per curriculum stage
   (`demo_script.curriculum`) in the same MODEL_DIR, on the associative-recall task
   (`colt5_flax/data/recall.py`): the answer's fact lies beyond the light branch's reach.
2. Scores held-out 2048-token inputs with the routers' real capacity: exact match of
   greedy answers; `router_recall`, the fraction of the fact tokens that the last encoder
   layer's key/value router selects (CoLT5 §5.4's routing analysis), also for the
   answer's fact alone; `question_recall`, how often its query router selects the
   question's key.
3. Trains the same model without its heavy branches (`ablations/no_heavy_branch.gin`)
   with the same curriculum and steps, and scores it alike: what routing buys.
4. Writes `MODEL_DIR/summary.json`, `MODEL_DIR/routing.png` (one input as a strip of
   tokens: the facts, the question and each layer's routed tokens) and
   `MODEL_DIR/learning.png` (loss and exact match against steps, both models); TensorBoard
   logs are in `MODEL_DIR` and `MODEL_DIR/light_only`.

Running it again resumes from the checkpoints in `MODEL_DIR`: a finished run is not
retrained, only re-scored. Delete the directory to start over. SIGTERM saves a checkpoint
and exits (`Stopped`) in the middle of any stage; the same command resumes that stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from colt5_flax import checkpoints, demo_checkpoints, demo_report, gin_utils, inference
from colt5_flax import train as train_lib
from colt5_flax.data import recall

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined when the CLI starts rather than at import: `python -m colt5_flax.demo` runs
  # this file as __main__ and imports it as colt5_flax.demo too (see the end of the file).
  flags.DEFINE_string("model_dir", "runs/demo", "Where the demo writes its runs and results.")
  flags.DEFINE_bool(
      "baseline", True, "Also train the light-only model (no heavy branch) for comparison."
  )
  flags.DEFINE_string(
      "shipped_checkpoints", str(demo_checkpoints.SHIPPED_DIR),
      "Score the checkpoints shipped here (demo_checkpoints/) before training; '' skips.",
  )
  flags.DEFINE_string(
      "export_checkpoints", None,
      "After training, write both models' parameters and metadata here (how the shipped "
      "checkpoints were made: docs/demo.md).",
  )


DEMO_GIN_FILES = ("models/colt5_tiny.gin", "runs/demo.gin")
BASELINE_GIN_FILE = "ablations/no_heavy_branch.gin"


class Stopped(SystemExit):
  """A stage's training returned before its last step: SIGTERM (or a preemption on several
  hosts) made `train` save a checkpoint and return. The process exits there (status 1,
  with this message): the next stage would otherwise start from that checkpoint with its
  own settings. Running the same command again resumes the interrupted stage."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """One curriculum stage: train up to `last_step` on `input_length`-token inputs."""

  last_step: int
  input_length: int
  batch_size: int
  bindings: tuple[str, ...] = ()


def curriculum(
    train_steps: int, stages: Sequence[tuple[float, int, int, Sequence[str]]],
    stage_bindings: bool = True,
) -> list[Stage]:
  """The demo's stages from gin (`demo_script.curriculum`, configs/runs/demo.gin).

  Args:
    train_steps: `TRAIN_STEPS`, the last step of the whole curriculum.
    stages: (last step as a share of train_steps, input length, batch size, gin
      bindings), the shares increasing to 1.0.
    stage_bindings: False drops the stages' bindings (the same lengths and batches for
      a model they do not apply to: LongT5 has no routers).

  Returns:
    The stages with their last steps rounded (each ≥ the previous one + 1).
  """
  if not stages:
    raise ValueError("demo_script.curriculum.stages is empty")
  shares = [float(stage[0]) for stage in stages]
  if shares != sorted(shares) or shares[-1] != 1.0 or shares[0] <= 0.0:
    raise ValueError(
        f"demo_script.curriculum.stages: the shares of TRAIN_STEPS {shares} must increase "
        "from > 0 to exactly 1.0 (the last stage ends at TRAIN_STEPS)"
    )
  if train_steps < len(stages):
    raise ValueError(f"TRAIN_STEPS={train_steps} is fewer than the {len(stages)} stages")
  result, previous = [], 0
  for index, (share, length, batch_size, bindings) in enumerate(stages):
    remaining = len(stages) - index - 1
    last = min(max(round(share * train_steps), previous + 1), train_steps - remaining)
    result.append(Stage(last, int(length), int(batch_size),
                        tuple(bindings) if stage_bindings else ()))
    previous = last
  return result


def stage_bindings(base: Sequence[str], stage: Stage, total_steps: int) -> list[str]:
  """The bindings one stage trains with: `base` (MODEL_DIR and the user's), then the
  stage's own (so they win), then its steps, schedule, input length and batch."""
  return [
      *base, *stage.bindings, f"TRAIN_STEPS = {stage.last_step}",
      f"SCHEDULE_STEPS = {total_steps}", f"DEMO_INPUT_LENGTH = {stage.input_length}",
      f"BATCH_SIZE = {stage.batch_size}",
  ]


def _configure(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  gin.clear_config()
  gin_utils.parse_gin_flags(FLAGS.gin_search_paths, gin_files, bindings, finalize_config=False)
  gin_utils.check_required_macros()


def _configured(function):
  try:
    return gin.get_configurable(function)
  except ValueError:
    return gin.configurable(function)


def routed_indices_by_layer(
    intermediates: Mapping[str, Any], name: str = "kv_routed_indices",
    module: str = "attention",
) -> list[np.ndarray]:
  """Each encoder layer's routed positions, [batch, num_routed] per layer.

  Reads what the conditional layers sow: `ConditionalAttention` (module "attention":
  `kv_routed_indices`, `q_routed_indices`) and `ConditionalFeedForward` ("mlp":
  `mlp_routed_indices`), for stacks with and without `nn.scan` (whose layers are stacked
  along the first axis).
  """
  encoder = intermediates.get("encoder", {})
  if "layers" in encoder:  # Scanned: one entry, [layers, batch, k].
    sown = encoder["layers"]["layer"].get(module, {}).get(name)
    return [] if sown is None else list(np.asarray(sown[0]))
  names = sorted((n for n in encoder if n.startswith("layers_")), key=lambda n: int(n[7:]))
  sown = [encoder[n].get(module, {}).get(name) for n in names]
  return [np.asarray(s[0]) for s in sown if s is not None]


# The routers `score` reads: (sown name, encoder layer module).
ROUTERS = {"q": ("q_routed_indices", "attention"), "kv": ("kv_routed_indices", "attention"),
           "mlp": ("mlp_routed_indices", "mlp")}


def router_recall(routed: np.ndarray, relevant: np.ndarray) -> float:
  """Fraction of relevant tokens that are routed, averaged over examples.

  Args:
    routed: [batch, num_routed] positions.
    relevant: [batch, length] 0/1 mask of the tokens that matter.
  """
  recalls = []
  for positions, mask in zip(routed, relevant, strict=True):
    if mask.sum() == 0:
      continue
    selected = np.zeros_like(mask)
    selected[positions] = 1
    recalls.append(float((selected * mask).sum() / mask.sum()))
  return float(np.mean(recalls)) if recalls else float("nan")


def score(
    *,
    model,
    eval_length: int,
    batch_size: int,
    partitioner,
    checkpoint_path: str,
    num_examples: int = 128,
    num_values: int = 8,
    keep_params: bool = False,
    keep_routing: bool = False,
) -> dict[str, Any]:
  """Held-out exact match and router recalls of the checkpoint in `checkpoint_path`.

  Scores the demo task at `eval_length` tokens (`recall.register_demo_task` with the
  gin-bound knobs). Gin: `demo_script.score.*` (configs/runs/demo.gin). With
  `keep_params`, the restored parameters come back as `_params`; with `keep_routing`,
  every scored input's tokens and each router's positions per layer come back as
  `_routing` (`{"tokens": [n, length], "q"|"kv"|"mlp": [per layer: [n, k]]}`).
  """
  task_name = _configured(recall.register_demo_task)(input_length=eval_length)
  lengths = recall.feature_lengths(eval_length)
  trainer, params, step = inference.restore_for_inference(
      model, partitioner, checkpoint_path, batch_size, lengths
  )
  metrics = inference.evaluate_tasks(
      trainer, params, task_name, lengths, batch_size,
      split="validation", num_examples=num_examples, compute_loss=False,
  )
  accuracy = metrics[f"{task_name}/exact_match"]
  result = {
      "step": step,
      "eval_length": eval_length,
      "accuracy": accuracy / 100.0 if accuracy > 1.0 else accuracy,
      "chance_accuracy": 1.0 / num_values,
  }
  if keep_params:
    result["_params"] = params

  examples = inference.load_examples(
      inference.tasks_with_split(task_name, "validation")[0], "validation", lengths,
      num_examples,
  )
  encode = jax.jit(
      lambda p, tokens: model.module.apply(
          {"params": p}, tokens, enable_dropout=False, method=model.module.encode,
          mutable=["intermediates"],
      )[1].get("intermediates", {})
  )
  routed: dict[str, list] = {router: [] for router in ROUTERS}
  tokens = []
  for num_rows, batch in inference.batches(examples, lengths, batch_size):
    intermediates = jax.device_get(encode(params, batch["encoder_input_tokens"]))
    for router, (name, module) in ROUTERS.items():
      routed[router].append(
          [layer[:num_rows] for layer in routed_indices_by_layer(intermediates, name, module)]
      )
    tokens.append(batch["encoder_input_tokens"][:num_rows])
  # Per router, per layer: [num_examples, k] (no entry for a router the model lacks).
  by_layer = {router: [np.concatenate(parts) for parts in zip(*batches, strict=True)]
              for router, batches in routed.items() if batches and batches[0]}
  tokens = np.concatenate(tokens)
  if keep_routing:
    result["_routing"] = {"tokens": tokens, **by_layer}
  if "kv" in by_layer and "q" in by_layer:
    kv_by_layer, q_by_layer = by_layer["kv"], by_layer["q"]
    facts = recall.fact_mask_for(tokens, num_values)
    answer = recall.relevant_mask_for(tokens, num_values)
    question = recall.question_mask_for(tokens, num_values)
    result.update(
        router_recall=router_recall(kv_by_layer[-1], facts),
        router_recall_answer=router_recall(kv_by_layer[-1], answer),
        question_recall=router_recall(q_by_layer[-1], question),
        router_recall_by_layer=[router_recall(r, facts) for r in kv_by_layer],
        question_recall_by_layer=[router_recall(r, question) for r in q_by_layer],
        chance={"router_recall": kv_by_layer[-1].shape[1] / eval_length,
                "question_recall": q_by_layer[-1].shape[1] / eval_length},
    )
    result["_example"] = {
        "tokens": tokens[0],
        "facts": facts[0],
        "answer": answer[0],
        "question": question[0],
        "kv": [r[0] for r in kv_by_layer],
        "q": [r[0] for r in q_by_layer],
    }
  return result


def _checkpointed_step(model_dir: epath.Path) -> int:
  """The step of the latest checkpoint in `model_dir` (0 when there is none)."""
  try:
    return checkpoints.resolve_checkpoint(str(model_dir))[1] or 0
  except FileNotFoundError:
    return 0


def score_checkpoint(
    gin_files: Sequence[str], checkpoint: epath.Path, user_bindings: Sequence[str],
    **kwargs,
) -> dict[str, Any]:
  """`score` of the model the gin files build, with the parameters in `checkpoint`."""
  _configure(gin_files, [f"MODEL_DIR = '{checkpoint}'", *user_bindings])
  score_fn = _configured(score)
  gin.finalize()
  return score_fn(**kwargs)


def train_curriculum(
    gin_files: Sequence[str], model_dir: epath.Path, user_bindings: Sequence[str],
    *, keep_params: bool = False, keep_routing: bool = False,
) -> tuple[dict[str, Any], float]:
  """Trains every stage in `model_dir`, then scores; returns (score, training seconds)."""
  base = [f"MODEL_DIR = '{model_dir}'", *user_bindings]
  _configure(gin_files, base)
  stages = _configured(curriculum)()
  total_steps = stages[-1].last_step
  seconds = 0.0
  for stage in stages:
    _configure(gin_files, stage_bindings(base, stage, total_steps))
    train_fn = _configured(train_lib.train)
    gin.finalize()
    logging.info("Curriculum stage to step %d: %s", stage.last_step, stage)
    start = time.time()
    state = train_fn()  # The next stage restores the checkpoint it saved.
    seconds += time.time() - start
    if int(state.step) < stage.last_step:
      raise Stopped(
          f"Training stopped at step {int(state.step)}, before the end of the stage that "
          f"ends at step {stage.last_step} (SIGTERM or a preemption); its checkpoint is in "
          f"{model_dir}: run the same command again to resume"
      )
  score_result = score_checkpoint(
      gin_files, model_dir, user_bindings, keep_params=keep_params, keep_routing=keep_routing
  )
  return score_result, seconds


SHIPPED_MODELS = {"colt5_tiny": (), "light_only": (BASELINE_GIN_FILE,)}


def score_shipped(
    root: epath.Path, gin_files: Sequence[str], user_bindings: Sequence[str]
) -> dict[str, Any]:
  """Scores each shipped checkpoint under `root` that exists; {name: scores + metadata}."""
  results = {}
  for name, extra_files in SHIPPED_MODELS.items():
    directory = root / name
    if not directory.exists():
      logging.warning("No shipped checkpoint %s: skipped", directory)
      continue
    metadata = demo_checkpoints.read_metadata(directory)
    result = score_checkpoint(
        [*gin_files, *extra_files], directory / demo_checkpoints.PARAMS_DIR, user_bindings
    )
    result.pop("step")
    keep = ("steps", "train_seconds", "machine", "date", "command", "git_commit")
    results[name] = {**result, "trained": {k: metadata.get(k) for k in keep}}
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  model_dir = epath.Path(os.path.abspath(FLAGS.model_dir))
  user_bindings = list(FLAGS.gin_bindings)
  gin_files = list(FLAGS.gin_file or DEMO_GIN_FILES)
  export_dir = None
  if FLAGS.export_checkpoints:
    export_dir = epath.Path(os.path.abspath(FLAGS.export_checkpoints))

  # 1. The shipped checkpoints (trained longer than a demo's budget allows: docs/demo.md).
  shipped = {}
  if FLAGS.shipped_checkpoints and export_dir is None:
    if list(gin_files) == list(DEMO_GIN_FILES):
      shipped = score_shipped(epath.Path(FLAGS.shipped_checkpoints), gin_files, user_bindings)
    else:
      logging.warning("Other gin files than %s: the shipped checkpoints are not scored",
                      DEMO_GIN_FILES)

  # 2. Live training: the curriculum from scratch (or resumed), both models.
  resumed_from = _checkpointed_step(model_dir)
  colt5, colt5_seconds = train_curriculum(
      gin_files, model_dir, user_bindings, keep_params=export_dir is not None
  )
  colt5_params = colt5.pop("_params", None)
  steps = colt5.pop("step")
  example = colt5.pop("_example", None)
  summary: dict[str, Any] = {
      "steps": steps,
      **colt5,
      "train_seconds": round(colt5_seconds, 1),
      "steps_this_run": steps - resumed_from,
  }
  runs = {"CoLT5-tiny": demo_report.learning_curves(model_dir)}
  light_params = None
  if FLAGS.baseline:
    light_dir = model_dir / "light_only"
    light, light_seconds = train_curriculum(
        [*gin_files, BASELINE_GIN_FILE], light_dir, user_bindings,
        keep_params=export_dir is not None,
    )
    light_params = light.pop("_params", None)
    light.pop("_example", None)
    summary["baseline"] = {
        "name": "light branch only (no heavy attention or feedforward)",
        "accuracy": light["accuracy"],
        "steps": light["step"],
        "train_seconds": round(light_seconds, 1),
    }
    runs["light branch only"] = demo_report.learning_curves(light_dir)
  if shipped:
    shipped_example = shipped.get("colt5_tiny", {}).pop("_example", None)
    example, title = shipped_example or example, "the shipped CoLT5-tiny"
    summary["shipped"] = shipped
  else:
    title = f"CoLT5-tiny after {steps} steps"
  summary["learning_curves"] = runs

  if example is not None:
    scores = summary["shipped"]["colt5_tiny"] if shipped else summary
    demo_report.plot_routing(
        example, model_dir / "routing.png",
        f"{title}, one held-out input: last layer's k/v router recall "
        f"{scores['router_recall']:.2f} (all inputs), question routed "
        f"{scores['question_recall']:.2f}",
    )
  demo_report.plot_learning(
      runs, model_dir / "learning.png", "The demo's curriculum (docs/demo.md)"
  )
  (model_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if export_dir is not None:
    _export(export_dir, model_dir, gin_files, summary, colt5_params, light_params)
  print(demo_report.report(summary, model_dir, resumed_from), flush=True)
  logging.info("Demo summary: %s", {k: v for k, v in summary.items() if k != "learning_curves"})


def _export(export_dir, model_dir, gin_files, summary, colt5_params, light_params) -> None:
  colt5_scores = {k: v for k, v in summary.items()
                  if k not in ("baseline", "learning_curves", "shipped", "steps_this_run",
                               "train_seconds")}
  demo_checkpoints.export(
      export_dir / "colt5_tiny", params=colt5_params, model_dir=model_dir,
      gin_files=gin_files, steps=summary["steps"],
      train_seconds=demo_report.training_seconds(model_dir), scores=colt5_scores,
  )
  if light_params is not None:
    baseline = summary["baseline"]
    demo_checkpoints.export(
        export_dir / "light_only", params=light_params, model_dir=model_dir / "light_only",
        gin_files=[*gin_files, BASELINE_GIN_FILE], steps=baseline["steps"],
        train_seconds=demo_report.training_seconds(model_dir / "light_only"),
        scores={"accuracy": baseline["accuracy"], "eval_length": summary["eval_length"]},
    )
  logging.info("Exported the checkpoints to %s", export_dir)


def console_entry_point() -> None:
  _define_flags()
  gin_utils.run(main)


if __name__ == "__main__":
  # Gin files bind the package module's `score` (`from colt5_flax import demo`).
  from colt5_flax import demo as _package_module

  _package_module.console_entry_point()
