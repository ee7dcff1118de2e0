"""The small-scale study's outputs: results.json, results.md and the figures.

`small_scale.py` runs the jobs; this module aggregates their records over seeds, sets
each routing ablation beside the paper's (CoLT5 Table 6) and says whether its direction
held, and draws ablations.png, length.png and routers.png.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from colt5_flax import demo_checkpoints, demo_report

# CoLT5 Table 6 (CoLT5-B, fine-tuned at 16k): the average over its ten datasets and
# inference samples per second, for the rows this study has a counterpart of.
PAPER_TABLE6 = {
    "Baseline": {"average": 42.5, "samples_per_sec": 11.2},
    "Static": {"average": 40.5, "samples_per_sec": 11.6},
    "Share QKV": {"average": 42.0, "samples_per_sec": 11.8},
    "v=all": {"average": 42.5, "samples_per_sec": 9.4},
    "m=512": {"average": 41.6, "samples_per_sec": 12.2},
    "m=1536": {"average": 42.9, "samples_per_sec": 10.4},
}
# What the paper's argument predicts for rows it has no number for (§4.5: learned routing
# beats capacity spent on arbitrary tokens; the heavy branch is what routing feeds).
# Rows in neither (learned_at_capacity: how the demo trains routers) get no verdict.
EXPECTED_WITHOUT_PAPER = {"random": "lower", "random_curriculum": "lower", "no_heavy": "lower"}
# |Table 6 change| below this (points of the average) counts as "no change".
PAPER_NO_CHANGE = 0.3
METRICS = ("accuracy", "final_loss", "router_recall", "router_recall_answer", "question_recall",
           "train_seconds")


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
  values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
  if not values:
    return {"mean": None, "std": None, "n": 0, "values": []}
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)), "std": std, "n": len(values), "values": values}


def _direction(change: float, margin: float, expected: str, seeds: int) -> str:
  """'held', 'did not hold' or 'inconclusive', for our change against the expected sign;
  `margin` is the half-width of the change's 95% confidence interval."""
  if seeds < 2:
    return "inconclusive (one seed: no spread to compare with)"
  resolved = abs(change) > margin
  if expected == "none":
    return "held" if not resolved else "did not hold"
  if not resolved:
    return "inconclusive (within the 95% interval over seeds)"
  return "held" if (change < 0) == (expected == "lower") else "did not hold"


def paired_change(row_runs: Mapping[int, float], learned_runs: Mapping[int, float]) -> dict:
  """The change against the learned row over the seeds both ran, seed by seed.

  A seed fixes the initialisation and the order of the training data for every row, and
  the held-out inputs are the same, so differences of the same seed cancel what the seed
  does to every row alike. The interval is Student's t over the seeds' differences.
  """
  from scipy import stats

  seeds = sorted(set(row_runs) & set(learned_runs))
  differences = [row_runs[s] - learned_runs[s] for s in seeds]
  n = len(differences)
  mean = float(np.mean(differences)) if n else math.nan
  error = float(np.std(differences, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
  margin = float(stats.t.ppf(0.975, n - 1) * error) if n > 1 else math.nan
  return {"mean": mean, "standard_error": error, "margin_95": margin, "seeds": seeds,
          "differences": differences, "lower_in": sum(d < 0 for d in differences)}


def _accuracy_by_seed(entry: Mapping[str, Any]) -> dict[int, float]:
  return {s["seed"]: s["accuracy"] for s in entry["seeds"] if s["accuracy"] is not None}


def routing_ablations(records: Mapping[str, Any], rows, seeds: Sequence[int]) -> list[dict]:
  """Per routing row: metrics over seeds, the paper's number and the direction's verdict."""
  out = []
  for row in rows:
    runs = [records.get(f"train-{row.name}-seed{seed}") for seed in seeds]
    runs = [r for r in runs if r is not None]
    entry = {"row": row.name, "label": row.label, "gin_files": list(row.gin_files),
             "bindings": list(row.bindings), "paper_row": row.paper,
             "seeds": [{"seed": r["job"]["seed"], "command": r["command"],
                        "demo_command": r["result"].get("demo_command"),
                        "steps": r["result"].get("step"), "wall_s": r["wall_s"],
                        **{m: r["result"].get(m) for m in METRICS}} for r in runs]}
    entry.update({m: _stats([s[m] for s in entry["seeds"]]) for m in METRICS})
    entry["wall_s"] = _stats([s["wall_s"] for s in entry["seeds"]])
    out.append(entry)
  learned = next((e for e in out if e["row"] == "learned"), None)
  for entry in out:
    if learned is None or entry is learned or not entry["accuracy"]["n"]:
      continue
    a, b = entry["accuracy"], learned["accuracy"]
    change = a["mean"] - b["mean"]
    error = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    entry["change_vs_learned"] = {"exact_match": change, "standard_error": error}
    paired = paired_change(_accuracy_by_seed(entry), _accuracy_by_seed(learned))
    entry["paired_change_vs_learned"] = paired
    if entry["paper_row"] in PAPER_TABLE6:
      paper = PAPER_TABLE6[entry["paper_row"]]["average"] - PAPER_TABLE6["Baseline"]["average"]
      expected = ("none" if abs(paper) < PAPER_NO_CHANGE else "lower" if paper < 0
                  else "higher")
      entry["paper"] = {**PAPER_TABLE6[entry["paper_row"]], "change": round(paper, 2)}
    elif entry["row"] in EXPECTED_WITHOUT_PAPER:
      expected = EXPECTED_WITHOUT_PAPER[entry["row"]]
    else:
      continue
    entry["expected"] = expected
    entry["direction"] = _direction(paired["mean"], paired["margin_95"], expected,
                                    len(paired["seeds"]))
  return out


def length_study(records: Mapping[str, Any], jobs) -> dict[str, Any]:
  """Exact match per model and length (over seeds) and training steps/s per length."""
  from colt5_flax.experiments import small_scale

  model_of = {row.name: model for model, row in small_scale.LENGTH_ROWS.items()}
  quality: dict[str, dict[int, list]] = {}
  speed: dict[str, dict[int, dict]] = {}
  for job in jobs:
    record = records.get(job.name)
    if record is None:
      continue
    if job.kind == "score":
      quality.setdefault(model_of[job.row], {}).setdefault(job.length, []).append(
          record["result"])
    elif job.kind == "time":
      speed.setdefault(model_of[job.row], {})[job.length] = {**record["result"],
                                                             "command": record["command"]}
  return {
      "exact_match": {row: {str(n): _stats([r["accuracy"] for r in rs]) for n, rs in by.items()}
                      for row, by in quality.items()},
      "router_recall": {row: {str(n): _stats([r.get("router_recall") for r in rs])
                              for n, rs in by.items()} for row, by in quality.items()},
      "training_speed": {row: {str(n): v for n, v in by.items()} for row, by in speed.items()},
  }


def router_study(records: Mapping[str, Any], seeds: Sequence[int], row: str = "learned"):
  """The learned row's router analysis at the evaluation length, averaged over seeds."""
  analyses = [records[f"train-{row}-seed{s}"]["result"].get("router_analysis")
              for s in seeds if f"train-{row}-seed{s}" in records]
  analyses = [a for a in analyses if a]
  if not analyses:
    return None
  first = analyses[0]
  shares = {
      router: [{kind: _stats([a["shares"][router][layer][kind] for a in analyses])
                for kind in first["shares"][router][layer]} for layer in range(len(layers))]
      for router, layers in first["shares"].items()
  }
  overlap = {
      pair: [{"overlap": _stats([a["overlap"][pair][layer]["overlap"] for a in analyses]),
              "chance": float(np.mean([a["overlap"][pair][layer]["chance"] for a in analyses]))}
             for layer in range(len(layers))]
      for pair, layers in first["overlap"].items()
  }
  return {"row": row, "shares": shares, "overlap": overlap, "chance": first["chance"]}


def mean_loss_curves(records: Mapping[str, Any], rows, seeds: Sequence[int]) -> dict:
  """Per routing row, its training loss by step, averaged over the seeds that logged it."""
  curves = {}
  for row in rows:
    by_step: dict[int, list] = {}
    for seed in seeds:
      record = records.get(f"train-{row.name}-seed{seed}")
      for step, loss in record["result"]["learning_curves"]["loss"] if record else ():
        by_step.setdefault(int(step), []).append(loss)
    if by_step:
      curves[row.label] = [(step, float(np.mean(v))) for step, v in sorted(by_step.items())]
  return curves


def write(output_dir: epath.Path, records: Mapping[str, Any], jobs,
          study: Mapping[str, Any]) -> dict[str, Any]:
  """Writes results.json, results.md and the figures; returns the results."""
  from colt5_flax.experiments import small_scale

  seeds = study["seeds"]
  routing_rows = [r for r in small_scale.ROUTING_ROWS if r.name in study["rows"]]
  results = {
      "study": {**study, "machine": demo_checkpoints.machine(),
                "git_commit": demo_checkpoints._git_commit(),  # noqa: SLF001
                "wall_s_all_jobs": round(sum(r["wall_s"] for r in records.values()), 1)},
      "routing_ablations": routing_ablations(records, routing_rows, seeds),
      "length": length_study(records, jobs),
      "router_analysis": router_study(records, seeds),
      "learning_curves": mean_loss_curves(records, routing_rows, seeds),
      "jobs": {name: {k: v for k, v in record.items() if k != "result"}
               for name, record in records.items()},
  }
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
  (output_dir / "results.md").write_text(markdown(results))
  plot(results, output_dir)
  return results


def _pm(stats: Mapping[str, Any], digits: int = 3) -> str:
  if not stats or stats["mean"] is None:
    return "–"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(results: Mapping[str, Any]) -> str:
  """The tables of results.md (docs/small_scale.md quotes them)."""
  study = results["study"]
  lines = [f"Command: `{study['command']}`", "",
           f"Seeds {study['seeds']}; all jobs' wall time {study['wall_s_all_jobs']:.0f} s "
           f"({study['workers']} at once) on {study['machine']['cpu']}, "
           f"{study['machine']['cores']} cores; commit {study['git_commit']}.", "",
           "## Routing ablations (exact match at the demo's evaluation length; mean ± sd over "
           "seeds)", "",
           "| row | exact match | Δ vs learned, same seeds (95% interval) | "
           "final training loss | k/v recall (facts) | question routed | "
           "paper Table 6 avg (Δ) | direction | steps | wall s per seed |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for e in results["routing_ablations"]:
    change = e.get("change_vs_learned")
    paper = e.get("paper")
    steps = sorted({s["steps"] for s in e["seeds"]})
    paired = e.get("paired_change_vs_learned")
    change_text = (f"{paired['mean']:+.3f} ± {paired['margin_95']:.3f} (lower in "
                   f"{paired['lower_in']}/{len(paired['seeds'])})"
                   if change and len(paired["seeds"]) > 1 else "–")
    paper_text = f"{paper['average']} ({paper['change']:+.1f})" if paper else "–"
    lines.append(
        f"| {e['label']} | {_pm(e['accuracy'])} | {change_text} | "
        f"{_pm(e['final_loss'])} | {_pm(e['router_recall'])} | {_pm(e['question_recall'])} | "
        f"{paper_text} | "
        f"{e.get('direction', '–')} (expected: {e.get('expected', '–')}) | "
        f"{','.join(map(str, steps))} | {_pm(e['wall_s'], 0)} |")
  length = results["length"]
  lengths = sorted({int(n) for by in length["exact_match"].values() for n in by} |
                   {int(n) for by in length["training_speed"].values() for n in by})
  header = " | ".join(str(n) for n in lengths)
  lines += ["", "## Quality and speed against input length", "",
            f"| model | {header} |", "|---|" + "---|" * len(lengths)]
  for row, by in length["exact_match"].items():
    lines.append(f"| {row}: exact match | " +
                 " | ".join(_pm(by.get(str(n))) for n in lengths) + " |")
  for row, by in length["training_speed"].items():
    lines.append(f"| {row}: training steps/s (batch "
                 f"{next(iter(by.values()))['batch_size']}) | " +
                 " | ".join(f"{by[str(n)]['steps_per_sec']:.2f}" if str(n) in by else "–"
                            for n in lengths) + " |")
  analysis = results["router_analysis"]
  if analysis:
    chance = analysis["chance"]
    lines += ["", f"## Router analysis ({analysis['row']} row, mean ± sd over seeds)", "",
              "| router | layer | fact tokens | question's key | filler |", "|---|---|---|---|---|"]
    for router, layers in analysis["shares"].items():
      for layer, kinds in enumerate(layers):
        lines.append(f"| {router} | {layer} | " +
                     " | ".join(_pm(kinds[k]) for k in ("fact", "question", "filler")) + " |")
    lines.append("| uniform choice | | " + " | ".join(
        f"{chance[k]:.4f}" for k in ("fact", "question", "filler")) + " |")
    lines += ["", "| routers | layer | overlap (of the smaller selection) | chance |",
              "|---|---|---|---|"]
    for pair, layers in analysis["overlap"].items():
      for layer, o in enumerate(layers):
        lines.append(f"| {pair} | {layer} | {_pm(o['overlap'])} | {o['chance']:.3f} |")
  return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], output_dir: epath.Path) -> None:
  """ablations.png, length.png and routers.png."""
  _, plt = demo_report._plt()  # noqa: SLF001 -- the demo's headless matplotlib
  rows = [e for e in results["routing_ablations"] if e["accuracy"]["n"]]
  if rows:
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, e in enumerate(rows):
      ax.bar(i, e["accuracy"]["mean"], yerr=e["accuracy"]["std"], color="tab:blue", alpha=0.6)
      ax.scatter([i] * e["accuracy"]["n"], e["accuracy"]["values"], color="k", s=10, zorder=3)
    ax.set_xticks(range(len(rows)), [e["label"] for e in rows], rotation=20, ha="right")
    ax.set(ylabel="exact match (seeds as dots)", ylim=(0, 1),
           title="Routing ablations on the demo's task (CoLT5 Table 6's directions)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    demo_report._save(fig, output_dir / "ablations.png")  # noqa: SLF001
    plt.close(fig)
  curves = results.get("learning_curves", {})
  if curves:
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, points in curves.items():
      ax.plot(*zip(*points, strict=True), label=label)
    ax.set(xlabel="step", ylabel="training loss (mean over seeds)", yscale="log",
           title="Training loss of every routing row")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    demo_report._save(fig, output_dir / "learning.png")  # noqa: SLF001
    plt.close(fig)
  length = results["length"]
  if length["exact_match"] or length["training_speed"]:
    fig, (q_ax, s_ax) = plt.subplots(1, 2, figsize=(12, 4))
    for row, by in length["exact_match"].items():
      ns = sorted(by, key=int)
      q_ax.errorbar([int(n) for n in ns], [by[n]["mean"] for n in ns],
                    yerr=[by[n]["std"] for n in ns], marker="o", label=row, capsize=3)
    for row, by in length["training_speed"].items():
      ns = sorted(by, key=int)
      s_ax.plot([int(n) for n in ns], [by[n]["steps_per_sec"] for n in ns], marker="o", label=row)
    q_ax.set(xscale="log", xlabel="input tokens", ylabel="exact match", ylim=(0, 1))
    s_ax.set(xscale="log", yscale="log", xlabel="input tokens", ylabel="training steps/s")
    for ax in (q_ax, s_ax):
      ax.legend()
      ax.grid(alpha=0.3)
    fig.suptitle("Quality and training speed against input length")
    fig.tight_layout()
    demo_report._save(fig, output_dir / "length.png")  # noqa: SLF001
    plt.close(fig)
  analysis = results["router_analysis"]
  if analysis:
    bars = [(f"{router} L{layer}", kinds) for router, layers in analysis["shares"].items()
            for layer, kinds in enumerate(layers)]
    fig, ax = plt.subplots(figsize=(10, 4))
    for kind, color in (("fact", "tab:orange"), ("question", "tab:green")):
      ax.bar([i + (0.2 if kind == "question" else -0.2) for i in range(len(bars))],
             [k[kind]["mean"] for _, k in bars], width=0.4, color=color,
             label=f"{kind} (uniform: {analysis['chance'][kind]:.4f})")
    ax.set_xticks(range(len(bars)), [label for label, _ in bars])
    ax.set(yscale="log", ylabel="share of the router's selections",
           title="Where the learned routers' selections fall (log scale)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    demo_report._save(fig, output_dir / "routers.png")  # noqa: SLF001
    plt.close(fig)


def summary_lines(results: Mapping[str, Any]) -> str:
  lines = ["", "Routing ablations (exact match, mean ± sd over seeds):"]
  for e in results["routing_ablations"]:
    lines.append(f"  {e['label']:28s} {_pm(e['accuracy'])}  {e.get('direction', '')}")
  for row, by in results["length"]["exact_match"].items():
    lines.append(f"  {row} by length: " + ", ".join(f"{n}: {_pm(s)}" for n, s in by.items()))
  lines.append("Results: results.json, results.md, ablations.png, length.png, routers.png")
  return "\n".join(lines)
