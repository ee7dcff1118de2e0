"""Our models under t5x's own trainer (configs/t5x/), where t5x is installed from source.

t5x is not on PyPI, so this module is skipped unless `import t5x` works (README, "Running
under t5x", says how to install it). Where it does:

- every configs/t5x/ file is parsed with the configurations it is meant for;
- on CoLT5-tiny (configs/t5x/test_tiny.gin) and a batch from t5x's own input pipeline,
  t5x's `loss_fn` through the adapter equals our `model.EncoderDecoderModel.loss_fn` and
  a float64 numpy cross-entropy, and t5x's greedy `predict_batch` equals ours and a greedy
  decode that reruns the whole decoder at each step (no cache);
- `python -m t5x.train` trains CoLT5-tiny one step, and the loss it writes to TensorBoard
  for that step is the loss of its step-0 checkpoint's parameters on its first batch,
  recomputed here by our model.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("t5x")

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# configs/t5x file -> the files it is combined with (before it, after it) and bindings.
COMBINATIONS = {
    "t5x/model.gin": (["models/colt5_tiny.gin"], [], []),
    "t5x/pretrain_ul2.gin": (
        ["models/colt5_base.gin", "t5x/model.gin"], [], ["MODEL_DIR = '/tmp/unused'"]
    ),
    "t5x/finetune_scrolls.gin": (
        ["models/colt5_base.gin", "t5x/model.gin"],
        ["tasks/scrolls_qasper.gin"],
        ["MODEL_DIR = '/tmp/unused'", "INITIAL_CHECKPOINT_PATH = '/tmp/unused'"],
    ),
    "t5x/test_tiny.gin": (
        ["models/colt5_tiny.gin", "t5x/model.gin"], [], ["MODEL_DIR = '/tmp/unused'"]
    ),
}
TINY_FILES = ["models/colt5_tiny.gin", "t5x/model.gin", "t5x/test_tiny.gin"]
# Same float32 computation on both sides; the slack covers XLA's reassociations.
RTOL = 1e-5


def _t5x_search_path() -> str:
  import t5x

  # t5x's own files are included as 't5x/configs/runs/...': the directory above the package.
  return str(Path(t5x.__file__).resolve().parents[1])


@contextlib.contextmanager
def _parsed(files, bindings, monkeypatch):
  """The gin configuration of `files` + `bindings`, as `python -m t5x.train` parses it."""
  from t5x import train as t5x_train

  # t5x's run files bind `import __main__ as train_script`: t5x.train when it runs.
  monkeypatch.setitem(sys.modules, "__main__", t5x_train)
  gin.clear_config()
  try:
    for path in (str(CONFIGS), _t5x_search_path()):
      gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=True,
                                        skip_unknown=False)
    yield
  finally:
    gin.clear_config()


@pytest.fixture
def tiny(monkeypatch):
  """CoLT5-tiny under t5x (test_tiny.gin): (t5x model, our model, first train batch).

  The batch is the first of t5x's own training pipeline (`utils.get_dataset` on the
  gin-configured `train/utils.DatasetConfig`), as `t5x.train` draws it.
  """
  import seqio
  from t5x import utils as t5x_utils

  from colt5_flax import count_params
  from colt5_flax import model as our_model

  with _parsed(TINY_FILES, ["MODEL_DIR = '/tmp/unused'"], monkeypatch):
    t5x_model = count_params.model_from_gin()
    with gin.config_scope("train"):
      dataset_cfg = gin.get_configurable(t5x_utils.DatasetConfig)()
    assert dataset_cfg.seed is not None, "the first batch must be reproducible"
    dataset = t5x_utils.get_dataset(dataset_cfg, 0, 1, seqio.EncDecFeatureConverter)
    batch = next(dataset.as_numpy_iterator())
    ours = our_model.EncoderDecoderModel(
        t5x_model.module,
        t5x_model.input_vocabulary,
        t5x_model.output_vocabulary,
        z_loss=t5x_model._z_loss,
        label_smoothing=t5x_model._label_smoothing,
        # t5x's None sums the token losses (ours would average them).
        loss_normalizing_factor=1.0,
    )
    yield t5x_model, ours, batch


def _numpy_loss(logits, targets, z_loss):
  """Summed cross-entropy + z-loss over the non-padding targets, in float64."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  weights = targets > 0
  return float(np.sum(((log_z - target_logit) + z_loss * log_z**2) * weights))


def _params_from_checkpoint(path: Path):
  """A t5x checkpoint's parameters (`target`), read with orbax alone."""
  import orbax.checkpoint as ocp

  return ocp.PyTreeCheckpointer().restore(str(path / "state"))["target"]


def _logged_scalars(events_dir: Path, step: int) -> dict[str, float]:
  """The scalars t5x wrote to TensorBoard (via clu) for `step`."""
  import tensorflow as tf

  scalars = {}
  for path in sorted(events_dir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      if event.step != step:
        continue
      for value in event.summary.value:
        if value.HasField("tensor") and not value.tensor.string_val:
          scalars[value.tag] = float(tf.make_ndarray(value.tensor))
        elif value.HasField("simple_value"):
          scalars[value.tag] = float(value.simple_value)
  return scalars


def test_every_t5x_file_is_covered():
  files = {str(p.relative_to(CONFIGS)) for p in (CONFIGS / "t5x").glob("*.gin")}
  assert files == set(COMBINATIONS)


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_t5x_file_parses_and_builds_the_model(name, monkeypatch):
  from t5x import models

  from colt5_flax import count_params, network

  before, after, bindings = COMBINATIONS[name]
  with _parsed(before + [name] + after, bindings, monkeypatch):
    model = count_params.model_from_gin()
    assert isinstance(model, models.EncoderDecoderModel)
    assert isinstance(model.module, network.EncoderDecoder)


def test_initial_variables_name_every_parameter_for_t5x(tiny):
  from flax import traverse_util
  from flax.linen import partitioning as flax_partitioning

  t5x_model, _, batch = tiny
  shapes = {k: v.shape for k, v in batch.items()}
  variables = jax.eval_shape(
      lambda: t5x_model.get_initial_variables(jax.random.PRNGKey(0), shapes)
  )
  params = traverse_util.flatten_dict(variables["params"])
  axes = traverse_util.flatten_dict(variables["params_axes"])
  assert {p[:-1] + (p[-1] + "_axes",) for p in params} == set(axes)
  for path, leaf in params.items():
    names = axes[path[:-1] + (path[-1] + "_axes",)]
    assert isinstance(names, flax_partitioning.AxisMetadata)
    assert len(names.names) == leaf.ndim, path


def test_t5x_loss_equals_ours_and_numpy(tiny):
  t5x_model, ours, batch = tiny
  shapes = {k: v.shape for k, v in batch.items()}
  params = t5x_model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]

  t5x_loss, t5x_metrics = jax.jit(t5x_model.loss_fn)(params, batch, None)
  our_loss, our_metrics = jax.jit(ours.loss_fn)(params, batch, None)
  logits = t5x_model.module.apply(
      {"params": params},
      batch["encoder_input_tokens"],
      batch["decoder_input_tokens"],
      batch["decoder_target_tokens"],
      enable_dropout=False,
  )
  reference = _numpy_loss(logits, batch["decoder_target_tokens"], t5x_model._z_loss)

  # An untrained model over 384 ids: about log(384) = 5.95 per target token.
  num_tokens = float(np.sum(batch["decoder_target_tokens"] > 0))
  assert 4.0 < reference / num_tokens < 8.0
  np.testing.assert_allclose(float(t5x_loss), reference, rtol=RTOL)
  np.testing.assert_allclose(float(our_loss), reference, rtol=RTOL)
  np.testing.assert_allclose(
      float(t5x_metrics["z_loss"].compute()), float(our_metrics["z_loss"]), rtol=RTOL
  )
  np.testing.assert_allclose(
      float(t5x_metrics["accuracy"].compute()), float(our_metrics["accuracy"]), rtol=RTOL
  )


def test_t5x_greedy_predict_batch_equals_ours_and_uncached_decoding(tiny):
  t5x_model, ours, batch = tiny
  shapes = {k: v.shape for k, v in batch.items()}
  params = t5x_model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
  module = t5x_model.module

  t5x_tokens = np.asarray(jax.jit(t5x_model.predict_batch)(params, batch))
  our_tokens = np.asarray(jax.jit(ours.predict_batch)(params, batch))
  np.testing.assert_array_equal(t5x_tokens, our_tokens)

  # Greedy decoding without a cache: rerun the decoder over the prefix at every step.
  rows, length = batch["decoder_target_tokens"].shape
  eos = t5x_model.output_vocabulary.eos_id
  forward = jax.jit(
      lambda dec_in: module.apply(
          {"params": params},
          batch["encoder_input_tokens"],
          dec_in,
          jnp.ones_like(dec_in),
          enable_dropout=False,
      )
  )
  reference = np.zeros((rows, length), np.int32)
  for t in range(length):
    decoder_inputs = np.pad(reference[:, :-1], ((0, 0), (1, 0)))  # BOS = 0, shifted right
    reference[:, t] = np.argmax(np.asarray(forward(decoder_inputs))[:, t], -1)
  for row in range(rows):
    ended = np.flatnonzero(reference[row] == eos)
    stop = int(ended[0]) + 1 if ended.size else length
    np.testing.assert_array_equal(t5x_tokens[row, :stop], reference[row, :stop])
    assert not t5x_tokens[row, stop:].any(), "t5x pads after EOS"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_one_training_step_through_t5x_train(tmp_path, tiny):
  t5x_model, ours, first_batch = tiny
  model_dir = tmp_path / "run"
  # One CPU device: t5x's CPU mesh puts every local device on its 'model' axis, which
  # CoLT5-tiny's 1 light head cannot be split over (conftest.py simulates eight).
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
  )
  try:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "t5x.train",
            f"--gin_search_paths={CONFIGS}",
            *(f"--gin_file={name}" for name in TINY_FILES),
            f"--gin.MODEL_DIR='{model_dir}'",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        # About a minute on two CPU cores. t5x.train can hang after an exception.
        timeout=600,
        check=False,
    )
  except subprocess.TimeoutExpired as e:
    stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
    pytest.fail(f"t5x.train timed out; stderr ends:\n{stderr[-5000:]}")
  assert result.returncode == 0, result.stderr[-5000:]

  logged = _logged_scalars(model_dir / "train", step=1)
  initial = _params_from_checkpoint(model_dir / "checkpoint_0")
  trained = _params_from_checkpoint(model_dir / "checkpoint_1")
  # The loss logged for step 1 is that of the step-0 parameters on the first batch.
  our_loss, our_metrics = jax.jit(ours.loss_fn)(initial, first_batch, None)
  np.testing.assert_allclose(logged["loss"], float(our_loss), rtol=RTOL)
  np.testing.assert_allclose(logged["z_loss"], float(our_metrics["z_loss"]), rtol=RTOL)
  # ... and the step changed every parameter.
  for path, before in jax.tree_util.tree_leaves_with_path(initial):
    after = trained
    for key in path:
      after = after[key.key]
    assert not np.array_equal(np.asarray(before), np.asarray(after)), path
