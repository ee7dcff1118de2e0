"""The demo's shipped checkpoints: parameters of a finished demo run, with what made them.

`demo_checkpoints/<name>/` (in the repository) holds, per model (`colt5_tiny`, the
CoLT5-tiny of configs/runs/demo.gin; `light_only`, the same model without heavy branches):

- `params/`: an orbax PyTree checkpoint `{'params': ...}` (float32, no optimizer state),
  read by `checkpoints.restore_params` like any parameter directory;
- `metadata.json`: the command, gin files, steps, training seconds, machine, commit,
  parameter count and the scores measured right after training (`scores`);
- `config.gin`: the run's operative gin config.

`python -m colt5_flax.demo --export_checkpoints=demo_checkpoints ...` writes them at the
end of a run (configs/runs/demo_checkpoints.gin is the run behind the shipped ones;
docs/demo.md).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

SHIPPED_DIR = epath.Path(__file__).resolve().parents[1] / "demo_checkpoints"
PARAMS_DIR = "params"
METADATA_FILE = "metadata.json"


def machine() -> dict[str, Any]:
  """The CPU model, core count and load: a timing means little without them."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {
      "cpu": cpu,
      "cores": os.cpu_count(),
      "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
      "jax": jax.__version__,
      "python": platform.python_version(),
  }


def _git_commit() -> str | None:
  try:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
        cwd=os.path.dirname(__file__),
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def export(
    out_dir: epath.Path,
    *,
    params: Any,
    model_dir: epath.Path,
    gin_files: list[str],
    steps: int,
    train_seconds: float,
    scores: Mapping[str, Any],
) -> epath.Path:
  """Writes `out_dir/{params, metadata.json, config.gin}`; replaces an existing one."""
  if out_dir.exists():
    shutil.rmtree(out_dir)
  out_dir.mkdir(parents=True)
  host_params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
  ocp.PyTreeCheckpointer().save((out_dir / PARAMS_DIR).resolve(), {"params": host_params})
  metadata = {
      "command": " ".join(["python -m colt5_flax.demo", *sys.argv[1:]]),
      "gin_files": gin_files,
      "steps": steps,
      "train_seconds": round(train_seconds, 1),
      "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(host_params))),
      "machine": machine(),
      "git_commit": _git_commit(),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "scores": dict(scores),
  }
  (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
  config = model_dir / "config.gin"
  if config.exists():
    (out_dir / "config.gin").write_text(config.read_text())
  return out_dir


def read_metadata(checkpoint_dir: epath.Path) -> dict[str, Any]:
  """`metadata.json` of a shipped checkpoint; a clear error when it is missing."""
  path = checkpoint_dir / METADATA_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: not a demo checkpoint directory")
  return json.loads(path.read_text())
