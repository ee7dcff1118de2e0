"""`make demo`: a tiny CoLT5 learns a long-input task on CPU, and its router finds the facts.

    python -m colt5_flax.demo [--model_dir=runs/demo] [--gin.TRAIN_STEPS=...] [--nobaseline]

1. Trains `configs/models/colt5_tiny.gin` + `configs/runs/demo.gin` through the real
   trainer (`colt5_flax.train.train`) on the synthetic retrieval task: 2048-token
   documents whose answer lies in one fact far outside the light branch's local window.
2. Scores held-out documents: exact-match `accuracy` of greedy answers, and
   `router_recall`, the fraction of the answer's fact tokens that the last encoder
   layer's key/value router sends to heavy attention (CoLT5 §5.4's routing analysis).
3. If the time budget allows, trains the same model without its heavy branches
   (`ablations/no_heavy_branch.gin`) for as many steps, so the reader sees what routing
   buys.
4. Writes `MODEL_DIR/routing.png` (one document as a strip of tokens: the fact tokens and
   each layer's routed tokens) and `MODEL_DIR/summary.json`; TensorBoard logs are in
   `MODEL_DIR` (and `MODEL_DIR/light_only`).

Running it again resumes from the checkpoints in `MODEL_DIR`: a finished run is not
retrained, only re-scored. Delete the directory to start over.
"""

from __future__ import annotations

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

from colt5_flax import checkpoints, gin_utils, inference
from colt5_flax import train as train_lib
from colt5_flax.data import synthetic
from colt5_flax.data import tasks as tasks_lib

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined when the CLI starts rather than at import: `python -m colt5_flax.demo` runs
  # this file as __main__ and imports it as colt5_flax.demo too (see the end of the file).
  flags.DEFINE_string("model_dir", "runs/demo", "Where the demo writes its runs and results.")
  flags.DEFINE_bool(
      "baseline", True, "Also train the light-only model (no heavy branch) for comparison."
  )
  flags.DEFINE_float(
      "time_budget_s", 600.0, "Training budget of the whole demo (both models), in seconds."
  )

DEMO_GIN_FILES = ("models/colt5_tiny.gin", "runs/demo.gin")
BASELINE_GIN_FILE = "ablations/no_heavy_branch.gin"


def _configure(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  gin.clear_config()
  gin_utils.parse_gin_flags(FLAGS.gin_search_paths, gin_files, bindings, finalize_config=False)
  gin_utils.check_required_macros()


def _configured(function):
  try:
    return gin.get_configurable(function)
  except ValueError:
    return gin.configurable(function)


def routed_indices_by_layer(intermediates: Mapping[str, Any]) -> list[np.ndarray]:
  """Each encoder layer's key/value routed positions, [batch, num_routed] per layer.

  Reads what `ConditionalAttention` sows (`kv_routed_indices`), for stacks with and
  without `nn.scan` (whose layers are stacked along the first axis).
  """
  encoder = intermediates.get("encoder", {})
  if "layers" in encoder:  # Scanned: one entry, [layers, batch, k].
    sown = encoder["layers"]["layer"]["attention"].get("kv_routed_indices")
    return [] if sown is None else list(np.asarray(sown[0]))
  names = sorted((n for n in encoder if n.startswith("layers_")), key=lambda n: int(n[7:]))
  sown = [encoder[n].get("attention", {}).get("kv_routed_indices") for n in names]
  return [np.asarray(s[0]) for s in sown if s is not None]


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
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    partitioner,
    checkpoint_path: str,
    num_examples: int = 128,
) -> dict[str, Any]:
  """Held-out accuracy and router recall of the checkpoint in `checkpoint_path`.

  Gin: `demo_script.score.*` (configs/runs/demo.gin).
  """
  trainer, params, step = inference.restore_for_inference(
      model, partitioner, checkpoint_path, batch_size, task_feature_lengths
  )
  metrics = inference.evaluate_tasks(
      trainer, params, mixture_or_task_name, task_feature_lengths, batch_size,
      split="validation", num_examples=num_examples, compute_loss=False,
  )
  accuracy = next(v for k, v in metrics.items() if k.endswith("/exact_match"))
  result = {"step": step, "accuracy": accuracy / 100.0 if accuracy > 1.0 else accuracy}

  task = tasks_lib.get_task(mixture_or_task_name)
  examples = inference.load_examples(task, "validation", task_feature_lengths, num_examples)
  encode = jax.jit(
      lambda p, tokens: model.module.apply(
          {"params": p}, tokens, enable_dropout=False, method=model.module.encode,
          mutable=["intermediates"],
      )[1].get("intermediates", {})
  )
  routed_layers, relevant, tokens = [], [], []
  for num_rows, batch in inference.batches(examples, task_feature_lengths, batch_size):
    layers = routed_indices_by_layer(jax.device_get(encode(params, batch["encoder_input_tokens"])))
    if not layers:
      break  # No heavy branch: nothing is routed.
    routed_layers.append([layer[:num_rows] for layer in layers])
    relevant.append(synthetic.relevant_mask_for(batch["encoder_input_tokens"][:num_rows]))
    tokens.append(batch["encoder_input_tokens"][:num_rows])
  if routed_layers:
    per_layer = [np.concatenate(parts) for parts in zip(*routed_layers, strict=True)]
    relevant_mask = np.concatenate(relevant)
    result["router_recall"] = router_recall(per_layer[-1], relevant_mask)
    result["router_recall_by_layer"] = [router_recall(r, relevant_mask) for r in per_layer]
    result["_example"] = {
        "tokens": np.concatenate(tokens)[0],
        "relevant": relevant_mask[0],
        "routed": [r[0] for r in per_layer],
    }
  return result


def plot_routing(example: Mapping[str, Any], path: epath.Path, title: str) -> None:
  """One document as a strip of tokens: its facts, the answer, each layer's routed tokens."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tokens = np.asarray(example["tokens"])
  length = int((tokens > 0).sum())
  facts = synthetic.fact_mask_for(tokens)[:length]
  relevant = np.asarray(example["relevant"])[:length]
  rows = [("all facts", facts), ("answer's fact", relevant)]
  for layer, routed in enumerate(example["routed"]):
    selected = np.zeros(length)
    selected[routed[routed < length]] = 1
    rows.append((f"layer {layer} routed k/v", selected))
  fig, axes = plt.subplots(len(rows), 1, figsize=(14, 0.6 * len(rows) + 1.2), sharex=True)
  colors = ["tab:orange", "tab:red"] + ["tab:blue"] * (len(rows) - 2)
  for ax, (label, row), color in zip(axes, rows, colors, strict=True):
    ax.imshow(row[None, :], aspect="auto", cmap=matplotlib.colors.ListedColormap(["white", color]),
              interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks([0], [label])
    for position in np.flatnonzero(relevant):
      ax.axvline(position, color="tab:red", alpha=0.08, linewidth=1)
  axes[-1].set_xlabel("token position")
  fig.suptitle(title)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def _checkpointed_step(model_dir: epath.Path) -> int:
  """The step of the latest checkpoint in `model_dir` (0 when there is none)."""
  try:
    return checkpoints.resolve_checkpoint(str(model_dir))[1] or 0
  except FileNotFoundError:
    return 0


def _train_and_score(gin_files, bindings) -> tuple[dict[str, Any], float]:
  _configure(gin_files, bindings)
  train_fn = _configured(train_lib.train)
  score_fn = _configured(score)
  gin.finalize()
  start = time.time()
  state = train_fn()
  seconds = time.time() - start
  del state
  return score_fn(), seconds


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  model_dir = epath.Path(os.path.abspath(FLAGS.model_dir))
  user_bindings = list(FLAGS.gin_bindings)
  gin_files = list(FLAGS.gin_file or DEMO_GIN_FILES)

  resumed_from = _checkpointed_step(model_dir)
  colt5, colt5_seconds = _train_and_score(
      gin_files, [f"MODEL_DIR = '{model_dir}'", *user_bindings]
  )
  steps = colt5["step"]
  summary: dict[str, Any] = {
      "accuracy": colt5["accuracy"],
      "router_recall": colt5.get("router_recall"),
      "router_recall_by_layer": colt5.get("router_recall_by_layer"),
      "steps": steps,
      "train_seconds": round(colt5_seconds, 1),
      "steps_this_run": steps - resumed_from,
  }
  example = colt5.pop("_example", None)
  if example is not None:
    plot_routing(
        example,
        model_dir / "routing.png",
        f"CoLT5-tiny after {steps} steps: router recall {summary['router_recall']:.2f}",
    )

  remaining = FLAGS.time_budget_s - colt5_seconds
  # The light-only model is cheaper per step; train it when about as much time is left.
  if FLAGS.baseline and remaining > 0.5 * colt5_seconds:
    light, light_seconds = _train_and_score(
        [*gin_files, BASELINE_GIN_FILE],
        [f"MODEL_DIR = '{model_dir / 'light_only'}'", *user_bindings],
    )
    summary["baseline"] = {
        "name": "light branch only (no heavy attention or feedforward)",
        "accuracy": light["accuracy"],
        "steps": light["step"],
        "train_seconds": round(light_seconds, 1),
    }
  elif FLAGS.baseline:
    summary["baseline"] = {"skipped": f"{remaining:.0f}s of the time budget left"}

  (model_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  lines = [
      "",
      f"CoLT5-tiny, {steps} steps in {summary['train_seconds']:.0f}s of training"
      if not resumed_from else
      f"CoLT5-tiny, {steps} steps (resumed at step {resumed_from}; "
      f"{summary['steps_this_run']} trained in this run, {summary['train_seconds']:.0f}s)",
      f"  held-out exact match: {summary['accuracy']:.3f}",
  ]
  if summary["router_recall"] is not None:
    lines.append(f"  router recall (last layer's k/v router): {summary['router_recall']:.3f}")
  baseline = summary.get("baseline", {})
  if "accuracy" in baseline:
    lines.append(f"Light branch only, {baseline['steps']} steps: "
                 f"exact match {baseline['accuracy']:.3f}")
  lines.append(f"Results: {model_dir / 'summary.json'}, {model_dir / 'routing.png'}; "
               f"tensorboard --logdir={model_dir}")
  print("\n".join(lines), flush=True)
  logging.info("Demo summary: %s", summary)


def console_entry_point() -> None:
  _define_flags()
  gin_utils.run(main)


if __name__ == "__main__":
  # Gin files bind the package module's `score` (`from colt5_flax import demo`).
  from colt5_flax import demo as _package_module

  _package_module.console_entry_point()
