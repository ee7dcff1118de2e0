"""The demo's outputs: learning curves from the run logs, the figures, the printed report.

`colt5_flax/demo.py` trains and scores; this module reads and draws (routing.png,
learning.png) and words the summary a newcomer sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from colt5_flax import jsonl


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return matplotlib, plt


def plot_routing(example: Mapping[str, Any], path: epath.Path, title: str) -> None:
  """One input as strips of tokens: facts, answer, question, each layer's routed tokens."""
  matplotlib, plt = _plt()
  length = int((np.asarray(example["tokens"]) > 0).sum())
  rows = [
      ("facts", example["facts"], "tab:orange"),
      ("answer's fact", example["answer"], "tab:red"),
      ("question's key", example["question"], "tab:green"),
  ]
  for layer, (kv, q) in enumerate(zip(example["kv"], example["q"], strict=True)):
    for label, routed in ((f"layer {layer} routed k/v", kv), (f"layer {layer} routed q", q)):
      selected = np.zeros(length)
      selected[routed[routed < length]] = 1
      rows.append((label, selected, "tab:blue"))
  marked = np.flatnonzero((np.asarray(example["facts"]) | np.asarray(example["question"]))[:length])
  fig, axes = plt.subplots(len(rows), 1, figsize=(14, 0.6 * len(rows) + 1.2), sharex=True)
  for ax, (label, row, color) in zip(axes, rows, strict=True):
    ax.imshow(np.asarray(row)[None, :length], aspect="auto", interpolation="nearest",
              cmap=matplotlib.colors.ListedColormap(["white", color]), vmin=0, vmax=1)
    ax.set_yticks([0], [label])
    for position in marked:  # Single tokens are thinner than a pixel: mark them.
      ax.axvline(position, color="tab:gray", alpha=0.25, linewidth=1)
  axes[-1].set_xlabel("token position")
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def _save(fig, path: epath.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)


def learning_curves(model_dir: epath.Path) -> dict[str, list]:
  """Loss (train log) and exact match at each stage's length (eval log) by step."""
  curves: dict[str, list] = {"loss": [], "exact_match": []}
  train_log, eval_log = model_dir / "train_metrics.jsonl", model_dir / "eval_metrics.jsonl"
  for _, record in jsonl.read(train_log) if train_log.exists() else ():
    curves["loss"].append((record["step"], record["loss"]))
  for _, record in jsonl.read(eval_log) if eval_log.exists() else ():
    for name, value in record.items():
      if name.endswith("/exact_match"):
        curves["exact_match"].append((record["step"], value / 100.0 if value > 1.0 else value))
  return curves


def training_seconds(model_dir: epath.Path) -> float:
  """Seconds spent in training steps over every session of a run (its train log's
  windows: steps / steps_per_sec; compilation, evaluation and saving excluded)."""
  train_log = model_dir / "train_metrics.jsonl"
  total, previous = 0.0, 0
  for _, record in jsonl.read(train_log) if train_log.exists() else ():
    total += (record["step"] - previous) / record["steps_per_sec"]
    previous = record["step"]
  return total


def plot_learning(runs: Mapping[str, Mapping[str, list]], path: epath.Path, title: str) -> None:
  """Loss and exact match (at each stage's training length) against steps, per model."""
  _, plt = _plt()
  fig, (loss_ax, match_ax) = plt.subplots(1, 2, figsize=(12, 4))
  for name, curves in runs.items():
    for ax, key in ((loss_ax, "loss"), (match_ax, "exact_match")):
      if curves[key]:
        steps, values = zip(*curves[key], strict=True)
        ax.plot(steps, values, label=name, marker="o" if key == "exact_match" else None)
  loss_ax.set(xlabel="step", ylabel="training loss", yscale="log")
  match_ax.set(xlabel="step", ylabel="held-out exact match (training length)", ylim=(0, 1))
  for ax in (loss_ax, match_ax):
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def report(summary: Mapping[str, Any], model_dir: epath.Path, resumed_from: int) -> str:
  steps = summary["steps"]
  lines = [""]
  for name, shipped in summary.get("shipped", {}).items():
    trained = shipped["trained"]
    line = (f"Shipped {name} ({trained['steps']} steps, {trained['train_seconds']:.0f}s on "
            f"{trained['machine']['cpu']}): exact match at {shipped['eval_length']} tokens "
            f"{shipped['accuracy']:.3f}")
    if "router_recall" in shipped:
      line += (f", k/v router recall {shipped['router_recall']:.3f} (answer's fact "
               f"{shipped['router_recall_answer']:.3f}), question routed "
               f"{shipped['question_recall']:.3f}")
    lines.append(line)
  lines += [
      f"CoLT5-tiny, {steps} steps in {summary['train_seconds']:.0f}s of training"
      if not resumed_from else
      f"CoLT5-tiny, {steps} steps (resumed at step {resumed_from}; "
      f"{summary['steps_this_run']} trained in this run, {summary['train_seconds']:.0f}s)",
      f"  held-out exact match at {summary['eval_length']} tokens: {summary['accuracy']:.3f} "
      f"(chance {summary['chance_accuracy']:.3f})",
  ]
  if summary.get("router_recall") is not None:
    chance = summary["chance"]
    lines += [
        f"  last layer's k/v router selects {summary['router_recall']:.3f} of the fact tokens "
        f"({summary['router_recall_answer']:.3f} of the answer's; chance "
        f"{chance['router_recall']:.3f})",
        f"  its query router selects the question's key in {summary['question_recall']:.3f} of "
        f"inputs (chance {chance['question_recall']:.3f})",
    ]
  baseline = summary.get("baseline", {})
  if "accuracy" in baseline:
    lines.append(f"Light branch only, {baseline['steps']} steps: exact match "
                 f"{baseline['accuracy']:.3f}")
  lines.append(f"Results: {model_dir / 'summary.json'}, routing.png, learning.png; "
               f"tensorboard --logdir={model_dir}")
  return "\n".join(lines)
