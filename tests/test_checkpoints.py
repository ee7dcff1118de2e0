"""Checkpoints: restore onto another mesh, keep-N and best-N, half-written saves, params only."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from colt5_flax import checkpoints
from colt5_flax import trainer as trainer_lib
from tests import trainer_fixtures


def _small_state(step: int) -> trainer_lib.TrainState:
  return trainer_lib.TrainState(
      step=jnp.int32(step),
      params={"w": jnp.full((4,), float(step))},
      opt_state=(),
      rng=jnp.zeros((2,), jnp.uint32),
  )


def _small_target():
  return jax.eval_shape(lambda: _small_state(0))


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_checkpoint_saved_on_one_mesh_restores_onto_others(tmp_path):
  source = trainer_fixtures.tiny_trainer(2)  # (4, 2): data x model
  host_state = trainer_fixtures.initial_host_state()
  state = jax.device_put(host_state, source.state_sharding)
  position = {"batches_consumed": 7, "mixture_or_task_name": "t", "batch_size": 8, "seed": 0}
  checkpointer = checkpoints.Checkpointer(str(tmp_path), async_save=True)
  assert checkpointer.save(state, position)
  checkpointer.close()

  for target in (trainer_fixtures.tiny_trainer(1), trainer_fixtures.tiny_trainer(None)):
    reader = checkpoints.Checkpointer(str(tmp_path))
    assert reader.latest_step() == 0
    restored, restored_position = reader.restore(0, target.abstract_state)
    reader.close()
    assert restored_position == position
    _assert_trees_equal(restored, host_state)
    # Every array landed in the target mesh's shards, not the source's.
    jax.tree.map(
        lambda array, sharding: (
            array.sharding.is_equivalent_to(sharding, array.ndim) or pytest.fail(
                f"{array.sharding} != {sharding}")
        ),
        restored,
        target.state_sharding,
    )
  kernel = restored.params["logits_dense"]["kernel"]
  assert len(kernel.sharding.device_set) == 1  # the one-device target


def test_keeps_the_latest_and_the_best(tmp_path):
  checkpointer = checkpoints.Checkpointer(
      str(tmp_path), keep=2, keep_best=1, best_metric="eval/score", best_mode="max"
  )
  scores = {2: 0.9, 4: 0.5}
  for step in range(1, 6):
    metrics = {"eval/score": scores[step]} if step in scores else None
    checkpointer.save(_small_state(step), {"batches_consumed": step}, metrics=metrics)
  assert not checkpointer.save(_small_state(5), {"batches_consumed": 5})  # already saved
  checkpointer.close()
  # Latest two (4, 5) plus the best-scoring one (2); 1 and 3 are gone.
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint_")) == [
      "checkpoint_2", "checkpoint_4", "checkpoint_5"
  ]
  reader = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=1,
                                    best_metric="eval/score", best_mode="max")
  assert reader.best_step() == 2
  reader.close()


def test_half_written_checkpoints_are_ignored_on_resume(tmp_path):
  checkpointer = checkpoints.Checkpointer(str(tmp_path))
  checkpointer.save(_small_state(2), {"batches_consumed": 2})
  checkpointer.close()
  # A save killed before orbax's final rename: a temporary directory with partial data.
  partial = tmp_path / "checkpoint_3.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_text("half a tensor")
  # A step directory copied by hand and cut short: no data item, no commit marker.
  shutil.copytree(tmp_path / "checkpoint_2", tmp_path / "checkpoint_4")
  shutil.rmtree(tmp_path / "checkpoint_4" / "data")
  for marker in ("commit_success.txt", "_CHECKPOINT_METADATA"):
    if (tmp_path / "checkpoint_4" / marker).exists():
      (tmp_path / "checkpoint_4" / marker).unlink()

  resumed = checkpoints.Checkpointer(str(tmp_path))
  assert resumed.latest_step() == 2
  state, position = resumed.restore(2, _small_target())
  resumed.close()
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.full(4, 2.0))
  assert position == {"batches_consumed": 2}
  assert not partial.exists()  # orbax removes abandoned temporary directories


def test_restore_params_from_runs_and_plain_checkpoints(tmp_path):
  run_dir = tmp_path / "run"
  checkpointer = checkpoints.Checkpointer(str(run_dir))
  for step in (3, 6):
    checkpointer.save(_small_state(step), {"batches_consumed": step})
  checkpointer.close()
  target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}

  # A step directory, and a MODEL_DIR (its latest step).
  np.testing.assert_array_equal(
      checkpoints.restore_params(str(run_dir / "checkpoint_3"), target)["w"], np.full(4, 3.0))
  np.testing.assert_array_equal(
      checkpoints.restore_params(str(run_dir), target)["w"], np.full(4, 6.0))
  assert checkpoints.resolve_checkpoint(str(run_dir)) == (run_dir / "checkpoint_6", 6)

  # Plain orbax PyTree checkpoints (e.g. converted weights): {'params': ...} or the tree.
  wrapped, bare = tmp_path / "wrapped", tmp_path / "bare"
  ocp.PyTreeCheckpointer().save(wrapped, {"params": {"w": np.full(4, 8.0, np.float32)}})
  ocp.PyTreeCheckpointer().save(bare, {"w": np.full(4, 9.0, np.float32)})
  np.testing.assert_array_equal(checkpoints.restore_params(str(wrapped), target)["w"],
                                np.full(4, 8.0))
  np.testing.assert_array_equal(checkpoints.restore_params(str(bare), target)["w"],
                                np.full(4, 9.0))

  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.restore_params(str(tmp_path / "nowhere"), target)
  with pytest.raises(ValueError, match="Cannot restore the model's parameters"):
    checkpoints.restore_params(str(bare), {"v": jax.ShapeDtypeStruct((4,), jnp.float32)})


def test_checkpointer_argument_errors(tmp_path):
  with pytest.raises(ValueError, match="needs a best_metric"):
    checkpoints.Checkpointer(str(tmp_path), keep_best=2)
  with pytest.raises(ValueError, match="best_mode"):
    checkpoints.Checkpointer(str(tmp_path), best_mode="highest")


def _strip_markers(step_dir):
  for marker in ("commit_success.txt", "_CHECKPOINT_METADATA"):
    if (step_dir / marker).exists():
      (step_dir / marker).unlink()


def test_a_step_folder_without_markers_is_replaced_not_kept(tmp_path, caplog):
  """Issue 15 §6.2: a leftover `checkpoint_4` neither blocks step 4 nor pushes out a good one."""
  checkpointer = checkpoints.Checkpointer(str(tmp_path), keep=2)
  for step in (2, 4):
    checkpointer.save(_small_state(step), {"batches_consumed": step})
  checkpointer.close()
  _strip_markers(tmp_path / "checkpoint_4")
  # Readers (evaluate, infer) skip it, as the trainer does.
  assert checkpoints.resolve_checkpoint(str(tmp_path)) == (tmp_path / "checkpoint_2", 2)
  with pytest.raises(FileNotFoundError, match="checkpoint_4.*incomplete"):
    checkpoints.resolve_checkpoint(str(tmp_path / "checkpoint_4"))

  resumed = checkpoints.Checkpointer(str(tmp_path), keep=2)
  assert resumed.remove_incomplete() == [4]
  assert "Removing incomplete checkpoint" in caplog.text and "checkpoint_4" in caplog.text
  step, state, position = resumed.restore_latest(_small_target())
  assert (step, position) == (2, {"batches_consumed": 2})
  assert resumed.save(_small_state(3), {"batches_consumed": 3})
  assert resumed.save(_small_state(4), {"batches_consumed": 4})  # saved, not skipped
  resumed.close()
  # keep=2 counts complete checkpoints only: 3 and 4 (2 went as the oldest of three).
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint_")) == [
      "checkpoint_3", "checkpoint_4"
  ]
  assert checkpoints.is_complete(tmp_path / "checkpoint_4")
  restored, _ = checkpoints.Checkpointer(str(tmp_path)).restore(4, _small_target())
  np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.full(4, 4.0))


def test_save_replaces_an_incomplete_folder_of_its_own_step(tmp_path, caplog):
  checkpointer = checkpoints.Checkpointer(str(tmp_path))
  checkpointer.save(_small_state(4), {"batches_consumed": 4})
  checkpointer.close()
  _strip_markers(tmp_path / "checkpoint_4")
  writer = checkpoints.Checkpointer(str(tmp_path))
  assert writer.save(_small_state(4), {"batches_consumed": 5})
  writer.close()
  assert "Replacing incomplete checkpoint" in caplog.text
  assert checkpoints.is_complete(tmp_path / "checkpoint_4")


def _truncate_array_files(step_dir):
  """Cuts every data file of the state to a third, as a copy or a disk cut short would."""
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 3)


def test_an_unreadable_latest_checkpoint_falls_back_and_is_kept_aside(tmp_path, caplog):
  """Issue 15 §6.3: a truncated array file: resume from the previous, say so, keep the bad one."""
  checkpointer = checkpoints.Checkpointer(str(tmp_path))
  for step in (2, 4):
    checkpointer.save(_small_state(step), {"batches_consumed": step})
  checkpointer.close()
  _truncate_array_files(tmp_path / "checkpoint_4")

  resumed = checkpoints.Checkpointer(str(tmp_path))
  step, state, position = resumed.restore_latest(_small_target())
  assert (step, position) == (2, {"batches_consumed": 2})
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.full(4, 2.0))
  assert (tmp_path / "checkpoint_4.unreadable").is_dir()  # moved aside, never deleted
  assert not (tmp_path / "checkpoint_4").exists()
  messages = [record.getMessage() for record in caplog.records]
  skipped = [m for m in messages if m.startswith("Skipped unreadable")]
  assert len(skipped) == 1 and "checkpoint_4" in skipped[0] and "Error" in skipped[0]
  assert "TensorStore details" not in skipped[0]  # no 60-line storage dump
  assert resumed.save(_small_state(4), {"batches_consumed": 4})  # step 4 can be saved again
  resumed.close()
  assert resumed.all_steps() == [2, 4]


def test_no_readable_checkpoint_is_an_error_naming_each(tmp_path):
  checkpointer = checkpoints.Checkpointer(str(tmp_path))
  for step in (2, 4):
    checkpointer.save(_small_state(step), {"batches_consumed": step})
  checkpointer.close()
  for step in (2, 4):
    _truncate_array_files(tmp_path / f"checkpoint_{step}")
  reader = checkpoints.Checkpointer(str(tmp_path))
  with pytest.raises(ValueError, match=r"No checkpoint in .* restores.*checkpoint_4.*checkpoint_2"):
    reader.restore_latest(_small_target())
  reader.close()
  assert (tmp_path / "checkpoint_2").is_dir() and (tmp_path / "checkpoint_4").is_dir()
