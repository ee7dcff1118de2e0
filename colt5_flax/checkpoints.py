"""Checkpoints on orbax's `CheckpointManager`: save, resume, keep the best, restore anywhere.

Layout (t5x's): `MODEL_DIR/checkpoint_<step>/` with two items,
- `state`: the `TrainState` (step, params, optimizer state, rng), saved per shard;
- `data`: JSON, the data position (`batches_consumed`: batches the run has drawn, so a
  resumed run skips exactly those) and what it was drawn from.

A save is written to `checkpoint_<step>.orbax-checkpoint-tmp-*` and renamed when complete
(orbax's atomic finalize), so a run killed mid-save leaves the previous checkpoint as
the latest complete one; the half-written directory is ignored, and removed when the
next manager opens the directory. A `checkpoint_<step>` without orbax's completion
markers (a copy cut short, a file system without atomic renames, a save interrupted on
one host of several) is never "the latest": readers skip it, and the trainer removes it
(with a warning) before it saves, so it neither blocks that step nor counts among the
kept checkpoints. A complete checkpoint that cannot be read (a truncated array file) is
skipped by the trainer, which resumes from the previous one and moves the unreadable
folder aside to `checkpoint_<step>.unreadable` (logged; never deleted).

Restoring takes a target tree of `jax.ShapeDtypeStruct`s with shardings
(`Trainer.abstract_state`): each array is read straight into its shards, so a checkpoint
written on one mesh restores onto any other.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from colt5_flax import partitioning

PyTree = Any

STATE_ITEM = "state"
DATA_ITEM = "data"
STEP_PREFIX = "checkpoint"
# Orbax writes one of these when it finalizes a save.
_COMPLETION_MARKERS = ("commit_success.txt", "_CHECKPOINT_METADATA")
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_(\d+)$")
UNREADABLE_SUFFIX = ".unreadable"


def is_complete(step_dir: str | epath.Path) -> bool:
  """Whether a `checkpoint_<step>` folder holds both items and orbax's completion marker.

  Orbax renames a finished save into place on local disks, so there a `checkpoint_<step>`
  name already means complete; on object stores (gs://) orbax writes in place and marks
  the end with `commit_success.txt`, so a folder without a marker may be a save in
  progress, or one cut short.
  """
  path = epath.Path(step_dir)
  has_items = all((path / item).exists() for item in (STATE_ITEM, DATA_ITEM))
  return has_items and any((path / marker).exists() for marker in _COMPLETION_MARKERS)


def _is_chief() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  """All processes wait here (multi-host): the chief's file changes are then visible."""
  partitioning.barrier(name)


def _first_line(error: BaseException, limit: int = 400) -> str:
  """`Type: first line` of an error and of its cause, without orbax's storage dump.

  Orbax wraps a failed read as "Encountered error while reading array index: ... See full
  TensorStore details: <60 lines of spec>"; its cause (tensorstore's) says what is wrong.
  """

  def line(e: BaseException) -> str:
    text = str(e).split(" See full TensorStore details")[0].strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"

  message = line(error)
  if error.__cause__ is not None:
    message += f" (caused by {line(error.__cause__)})"
  return message if len(message) <= limit else message[: limit - 3] + "..."


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

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / f"{STEP_PREFIX}_{step}"

  def is_complete(self, step: int) -> bool:
    """Whether `checkpoint_<step>` is complete (see the module function `is_complete`)."""
    return is_complete(self.step_dir(step))

  def remove_incomplete(self) -> list[int]:
    """Removes every `checkpoint_<step>` without completion markers; returns their steps.

    For the trainer, before it resumes: no save of this run is in flight then, so an
    incomplete folder is a leftover that would otherwise block its step (orbax skips a
    step whose folder exists) and count among the `keep` latest, pushing out a good
    checkpoint. Only the chief deletes; every process returns the same steps.
    """
    steps = [step for step in self.all_steps() if not self.is_complete(step)]
    if _is_chief():
      for step in steps:
        logging.warning(
            "Removing incomplete checkpoint %s (no %s): a save cut short; its step will "
            "be trained and saved again", self.step_dir(step), " or ".join(_COMPLETION_MARKERS)
        )
        self.step_dir(step).rmtree()
    _sync("colt5_remove_incomplete_checkpoints")
    self.manager.reload()
    return steps

  def set_aside(self, step: int, reason: str) -> epath.Path:
    """Renames an unreadable `checkpoint_<step>` to `checkpoint_<step>.unreadable[-N]`.

    Kept, not deleted, for the user to inspect; out of orbax's sight, so the step can be
    saved again and the folder does not count among the kept checkpoints.
    """
    source = self.step_dir(step)
    target = source.parent / (source.name + UNREADABLE_SUFFIX)
    if _is_chief():
      if target.exists():
        target = source.parent / f"{source.name}{UNREADABLE_SUFFIX}-{int(time.time())}"
      source.rename(target)
      logging.warning(
          "Skipped unreadable checkpoint %s (%s); moved it to %s (delete it once "
          "inspected)", source, reason, target
      )
    _sync("colt5_set_aside_checkpoint")
    self.manager.reload()
    return target

  def restore_latest(self, abstract_state) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data_position) of the latest checkpoint that restores, or None.

    A complete checkpoint that fails to restore (a truncated or corrupted array file) is
    read once more (a passing storage error must not cost a checkpoint), then skipped for
    the previous one; once one restores, the skipped ones are moved aside (`set_aside`,
    logged with their error). If none restores, nothing is moved and the error names
    every folder tried. With several processes, a checkpoint counts as restored only if
    it restored on all of them, so they all resume from the same step.

    Raises:
      ValueError: when checkpoints exist but none of them restores.
    """
    failures: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      if not self.is_complete(step):
        logging.warning("Ignoring incomplete checkpoint %s", self.step_dir(step))
        continue
      reason = None
      for _ in range(2):
        try:
          state, data_position = self.restore(step, abstract_state)
          reason = None
          break
        except Exception as error:  # noqa: BLE001 -- orbax/tensorstore raise many types
          reason = _first_line(error)
          logging.warning("Cannot restore %s: %s", self.step_dir(step), reason)
      if not partitioning.all_processes(reason is None):
        failures.append((step, reason or "it failed to restore on another process"))
        continue
      for failed_step, reason in failures:
        self.set_aside(failed_step, reason)
      return step, state, data_position
    if failures:
      tried = "; ".join(f"{self.step_dir(step)}: {reason}" for step, reason in failures)
      raise ValueError(
          f"No checkpoint in {self.directory} restores ({tried}). If the model or its "
          "configuration changed, use the run's config.gin; otherwise move these folders "
          "away to start afresh"
      )
    return None

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
      self.manager.wait_until_finished()  # this step's own save may be in flight
      if self.is_complete(step):
        return False
      # A leftover folder without completion markers (cut short before this run):
      # orbax would skip the step, leaving nothing saved.
      if _is_chief():
        logging.warning(
            "Replacing incomplete checkpoint %s with this run's step %d",
            self.step_dir(step), step,
        )
        self.step_dir(step).rmtree()
      _sync("colt5_replace_incomplete_checkpoint")
      self.manager.reload()
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

  Accepts `MODEL_DIR/checkpoint_<step>`, a `MODEL_DIR` (its latest complete checkpoint;
  incomplete ones are skipped with a warning, as the trainer skips them), or any orbax
  PyTree directory holding the parameters (step None).

  Raises:
    FileNotFoundError: naming `path` when nothing is there, or when it is (or holds only)
      incomplete `checkpoint_<step>` folders.
  """
  directory = epath.Path(path)
  if not directory.exists():
    raise FileNotFoundError(f"Checkpoint path {path!r} does not exist")
  if step_of(directory) is not None:
    if (directory / STATE_ITEM).exists() and not is_complete(directory):
      raise FileNotFoundError(
          f"Checkpoint {path!r} is incomplete (no {' or '.join(_COMPLETION_MARKERS)}): a "
          "save cut short or still in progress"
      )
    return directory, step_of(directory)
  if (directory / STATE_ITEM).exists():
    return directory, None
  steps = sorted(
      int(m.group(1))
      for child in directory.iterdir()
      if (m := _STEP_DIR.match(child.name)) and child.is_dir()
  )
  for step in reversed(steps):
    step_dir = directory / f"{STEP_PREFIX}_{step}"
    if is_complete(step_dir):
      return step_dir, step
    logging.warning("Ignoring incomplete checkpoint %s", step_dir)
  if steps:
    raise FileNotFoundError(
        f"No complete checkpoint in {path!r}: {', '.join(f'{STEP_PREFIX}_{s}' for s in steps)} "
        f"lack {' and '.join(_COMPLETION_MARKERS)} (saves cut short or in progress)"
    )
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
