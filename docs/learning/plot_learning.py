"""Plots the runs of docs/learning.md: exact match and loss against steps."""
import json, re, sys, glob
import matplotlib; matplotlib.use("Agg")
import matplotlib.pyplot as plt

runs = []  # (label, steps, em, loss)
for path, label in [a.split("=", 1)[::-1] for a in sys.argv[2:]]:
  if path.startswith("point:"):  # point:STEP:EXACT (a figure quoted from elsewhere)
    _, step, em = path.split(":")
    runs.append((label, [int(step)], [float(em)], None))
  elif path.endswith(".json"):
    h = json.load(open(path))["history"]
    runs.append((label, [r["step"] for r in h], [r["exact_match"] for r in h], [r["loss"] for r in h]))
  else:  # hf_t5_mqar.py log
    rows = [re.match(r"step (\d+) loss ([\d.]+) exact ([\d.]+)", l) for l in open(path)]
    rows = [m for m in rows if m]
    runs.append((label, [int(m[1]) for m in rows], [float(m[3]) for m in rows], [float(m[2]) for m in rows]))
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5.6))
for label, s, em, loss in runs:
  if loss is None:
    a.plot(s, em, marker="x", ms=9, mew=2, ls="", label=label)
    continue
  line, = a.plot(s, em, marker="o", ms=3, label=label, ls="--" if "4 facts" in label else "-")
  b.plot(s, loss, marker="o", ms=3, color=line.get_color(), label=label,
         ls="--" if "4 facts" in label else "-")
a.set_xlabel("step"); a.set_ylabel("exact match (128 held-out)"); a.axhline(1/32, ls=":", c="gray"); a.set_ylim(-0.02, 1.02)
b.set_xlabel("step"); b.set_ylabel("train cross-entropy (ours: mean of last 25 steps)"); b.axhline(0.5 * 3.4657, ls=":", c="gray")
for ax in (a, b):
  ax.axvspan(0, 200, color="gold", alpha=0.12, lw=0)
  ax.text(5, ax.get_ylim()[1] * 0.97, "curricula: shorter inputs", fontsize=7, va="top")
a.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.15), ncol=2); a.grid(alpha=.3); b.grid(alpha=.3)
a.set_title("exact match at 512 tokens (chance 1/32)", fontsize=9)
b.set_title("loss (dotted: value prior ln32/2)", fontsize=9)
fig.tight_layout(); fig.savefig(sys.argv[1], dpi=110)
