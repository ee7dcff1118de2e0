"""Checkpoints on orbax's `CheckpointManager`: save, resume, keep the best, restore anywhere.

Layout (t5x's): `MODEL_DIR/checkpoint_<step>/` with two items,
- `state`: the `TrainState` (step, params, optimizer state, rng), saved per shard;
- `data`: JSON, the data position (`batches_consumed`: batches the run has drawn, so a
  resumed run skips exactly those) and what it was drawn from.

A save is written to `checkpoint_<step>.orbax-checkpoint-tmp-*` and renamed when complete
(orbax's atomic finalize), so a run killed mid-save leaves the previous checkpoint as
the latest complete one; the half-written directory is ignored, and removed when the
next manager opens the directory.

Restoring takes a target tree of `jax.ShapeDtypeStruct`s with shardings
(`Trainer.abstract_state`): each array is read straight into its shards, so a checkpoint
written on one mesh restores onto any other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PyTree = Any

STATE_ITEM = "state"
DATA_ITEM = "data"
STEP_PREFIX = "checkpoint"
# Orbax writes one of these when it finalizes a save.
_COMPLETION_MARKERS = ("commit_success.txt", "_CHECKPOINT_METADATA")
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_(\d+)$")


class Checkpointer:
  """Periodic, final, best-N and preemption saves of one run's `MODEL_DIR`.

  Args:
    directory: `MODEL_DIR` (local or gs://).
    keep: the latest `keep` checkpoints are kept (None: all).
    keep_best: also keep the `keep_best` checkpoints with the best `best_metric`
      (0: none). Only saves given `metrics` compete.
    best_metric: a key of the metrics passed to `save` (e.g. 'eval/loss').
    best_mode: 'max' or 'min'.
    async_save: write in a background thread; `save` returns once the arrays are
      copied off the devices.
  """

  def __init__(
      self,
      directory: str,
      *,
      keep: int | None = 3,
      keep_best: int = 0,
      best_metric: str | None = None,
      best_mode: str = "max",
      async_save: bool = True,
  ):
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 (or None for all), got {keep}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if keep_best and not best_metric:
      raise ValueError(f"keep_best={keep_best} needs a best_metric to rank checkpoints by")
    self.directory = epath.Path(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(
          ocp.checkpoint_managers.BestN(
              get_metric_fn=lambda metrics: metrics[best_metric],
              # BestN keeps the last n after sorting; descending order keeps the smallest.
              reverse=best_mode == "min",
              n=keep_best,
              keep_checkpoints_without_metrics=False,
          )
      )
    options = ocp.CheckpointManagerOptions(
        # With best_fn set, orbax also writes each save's metrics into the checkpoint, so
        # the ranking survives a restart (BestN alone ranks only this process's saves).
        best_fn=(lambda metrics: metrics[best_metric]) if keep_best else None,
        best_mode=best_mode,
        step_prefix=STEP_PREFIX,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
    )
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE_ITEM, DATA_ITEM), options=options
    )

  def is_complete(self, step: int) -> bool:
    """Whether `checkpoint_<step>` holds both items and orbax's commit marker/metadata.

    Orbax renames a finished save into place, so on local disks a `checkpoint_<step>`
    name already means complete; this also rejects directories left half-copied by hand
    or by a file system without atomic renames.
    """
    path = self.directory / f"{STEP_PREFIX}_{step}"
    has_items = all((path / item).exists() for item in (STATE_ITEM, DATA_ITEM))
    return has_items and any((path / marker).exists() for marker in _COMPLETION_MARKERS)

  def latest_step(self) -> int | None:
    """The latest complete checkpoint's step, or None; incomplete ones are skipped."""
    for step in reversed(self.all_steps()):
      if self.is_complete(step):
        return step
      logging.warning("Ignoring incomplete checkpoint %s/%s_%d", self.directory, STEP_PREFIX, step)
    return None

  def all_steps(self) -> list[int]:
    """Steps of every `checkpoint_<step>` directory (complete or not)."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(
      self,
      state,
      data_position: Mapping[str, Any],
      *,
      metrics: Mapping[str, float] | None = None,
  ) -> bool:
    """Saves `state` under its step; returns False when that step is already saved.

    Args:
      state: a `TrainState` (sharded arrays).
      data_position: JSON-able, at least `{'batches_consumed': int}`.
      metrics: scalars for best-N ranking (must hold `best_metric` to compete).
    """
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
      if self.best_metric is not None and self.best_metric not in metrics:
        raise ValueError(
            f"best_metric={self.best_metric!r} is not among the metrics: {sorted(metrics)}"
        )
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                DATA_ITEM: ocp.args.JsonSave(dict(data_position)),
            }
        ),
        metrics=metrics,
        force=True,
    )

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """(state, data_position) of `step`, each array placed by its target's sharding."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                DATA_ITEM: ocp.args.JsonRestore(),
            }
        ),
    )
    return restored[STATE_ITEM], dict(restored[DATA_ITEM] or {})

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None without metrics)."""
    scored = []
    for step in self.all_steps():
      metrics = self.manager.metrics(step) or {}
      if self.best_metric in metrics:
        scored.append((float(metrics[self.best_metric]), step))
    if not scored:
      return None
    pick = min if self.best_mode == "min" else max
    return pick(scored)[1]

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def step_of(path: str | epath.Path) -> int | None:
  """The step of a `.../checkpoint_<step>` directory, or None for other names."""
  match = _STEP_DIR.match(epath.Path(path).name)
  return int(match.group(1)) if match else None


def resolve_checkpoint(path: str) -> tuple[epath.Path, int | None]:
  """A step directory for `path`: itself if it is one, else its latest checkpoint.

  Accepts `MODEL_DIR/checkpoint_<step>`, a `MODEL_DIR` (its latest complete checkpoint),
  or any orbax PyTree directory holding the parameters (step None).

  Raises:
    FileNotFoundError: naming `path` when nothing is there.
  """
  directory = epath.Path(path)
  if not directory.exists():
    raise FileNotFoundError(f"Checkpoint path {path!r} does not exist")
  if step_of(directory) is not None or (directory / STATE_ITEM).exists():
    return directory, step_of(directory)
  steps = sorted(
      int(m.group(1))
      for child in directory.iterdir()
      if (m := _STEP_DIR.match(child.name)) and child.is_dir()
  )
  if steps:
    return directory / f"{STEP_PREFIX}_{steps[-1]}", steps[-1]
  if (directory / "_METADATA").exists() or (directory / "_CHECKPOINT_METADATA").exists():
    return directory, None
  raise FileNotFoundError(
      f"No checkpoint in {path!r}: expected checkpoint_<step>/ directories or an orbax "
      "checkpoint"
  )


def restore_params(path: str, abstract_params: PyTree) -> PyTree:
  """Only the parameters of a checkpoint, placed by `abstract_params`' shardings.

  For `INITIAL_CHECKPOINT_PATH` (fine-tuning starts from pretrained parameters with a
  fresh optimizer and step 0) and for evaluation and inference (no optimizer state is
  read). `path` is resolved by `resolve_checkpoint`; the parameters are either the
  `params` of a saved `TrainState` or a PyTree checkpoint whose root is `{'params': ...}`
  or the parameter tree itself.
  """
  step_dir, _ = resolve_checkpoint(path)
  item_dir = step_dir / STATE_ITEM if (step_dir / STATE_ITEM).exists() else step_dir
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(item_dir).item_metadata
  saved_tree = getattr(saved, "tree", saved)
  wrapped = isinstance(saved_tree, Mapping) and "params" in saved_tree
  target = {"params": abstract_params} if wrapped else abstract_params
  try:
    restored = checkpointer.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=wrapped,
        ),
    )
  except (ValueError, KeyError) as error:
    raise ValueError(
        f"Cannot restore the model's parameters from {str(item_dir)!r}: {error}"
    ) from error
  return restored["params"] if wrapped else restored
