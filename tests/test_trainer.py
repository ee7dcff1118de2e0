"""Optimizers, schedules and the train/eval/predict steps, against hand-written references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from colt5_flax import optimizers
from colt5_flax import trainer as trainer_lib
from tests import tolerances, trainer_fixtures

# -- Schedules --------------------------------------------------------------------------


def test_rsqrt_schedule_is_t5_inverse_square_root():
  schedule = optimizers.rsqrt_schedule()
  # 0.01 for the first 10k steps, then 1/sqrt(step) (T5.1.1, CoLT5 §4 pretraining).
  for step, expected in [(0, 0.01), (1, 0.01), (9_999, 0.01), (10_000, 0.01),
                         (40_000, 0.005), (1_000_000, 0.001)]:
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)


def test_constant_and_warmup_cosine_schedules():
  assert float(optimizers.constant_schedule(0.001)(12345)) == pytest.approx(0.001)
  schedule = optimizers.warmup_cosine_schedule(1.0, warmup_steps=10, decay_steps=110,
                                               end_learning_rate=0.1)
  for step in [0, 5, 10, 35, 60, 110, 500]:
    if step < 10:
      expected = step / 10
    else:
      progress = min(step - 10, 100) / 100
      expected = 0.1 + (1.0 - 0.1) * 0.5 * (1 + math.cos(math.pi * progress))
    # float32 cosine of a float64 value: a few roundings (tests/tolerances.py, n = 1).
    tolerances.assert_close(float(schedule(step)), expected, num_terms=1, depth=4, scale=1.0)
  with pytest.raises(ValueError, match="warmup_steps"):
    optimizers.warmup_cosine_schedule(1.0, warmup_steps=20, decay_steps=10)


# -- Optimizers against numpy --------------------------------------------------------------


def _rms(x):
  return np.sqrt(np.mean(np.square(x)))


def numpy_adafactor(params, gradient_steps, learning_rate):
  """T5's Adafactor (Shazeer & Stern 2018, Alg. 4/5; mesh-tf defaults), in float64."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  state = {}
  for t, grads in enumerate(gradient_steps):
    decay = 1.0 - (t + 1.0) ** -0.8
    for name, grad in grads.items():
      grad = grad.astype(np.float64)
      grad_sq = grad * grad + 1e-30
      factored = grad.ndim == 2 and sorted(grad.shape)[-2] >= 128
      if factored:
        rows, cols = state.get(name, (np.zeros(grad.shape[0]), np.zeros(grad.shape[1])))
        rows = decay * rows + (1 - decay) * grad_sq.mean(axis=1)
        cols = decay * cols + (1 - decay) * grad_sq.mean(axis=0)
        state[name] = (rows, cols)
        second_moment = np.outer(rows, cols) / rows.mean()
      else:
        v = decay * state.get(name, np.zeros_like(grad)) + (1 - decay) * grad_sq
        state[name] = v
        second_moment = v
      update = grad / np.sqrt(second_moment)
      update = update / max(1.0, _rms(update) / 1.0)  # update clipping at RMS 1
      scale = max(_rms(params[name]), 1e-3)  # relative step size
      params[name] = params[name] - learning_rate * scale * update
  return params


def _apply_optax(optimizer, params, gradient_steps):
  params = {k: jnp.asarray(v) for k, v in params.items()}
  state = optimizer.init(params)
  for grads in gradient_steps:
    updates, state = optimizer.update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
    params = optax.apply_updates(params, updates)
  return {k: np.asarray(v) for k, v in params.items()}


def test_adafactor_matches_t5_adafactor_in_numpy():
  rng = np.random.default_rng(0)
  params = {
      "factored": rng.normal(size=(128, 256)).astype(np.float32),
      "small": rng.normal(size=(16, 64)).astype(np.float32) * 1e-4,  # below the 1e-3 floor
      "vector": rng.normal(size=(256,)).astype(np.float32),
  }
  gradient_steps = [
      {k: (rng.normal(size=v.shape) * (1 + 10 * step)).astype(np.float32)
       for k, v in params.items()}
      for step in range(3)
  ]
  got = _apply_optax(optimizers.adafactor(0.01), params, gradient_steps)
  expected = numpy_adafactor(params, gradient_steps, 0.01)
  for name in params:
    # Against float64 (tests/tolerances.py), relative to each tensor's size: three steps,
    # each a mean over up to 256 squared gradients (the factored moments), the update and
    # the subtraction. A wrong decay, clipping or step-size floor moves them by 1e-4 or more.
    tolerances.assert_close(got[name], expected[name], num_terms=256, depth=3, what=name)
    assert not np.allclose(got[name], params[name])


def test_adamw_clips_the_global_norm_first():
  rng = np.random.default_rng(1)
  params = {"a": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=(5,)).astype(np.float32)}
  # Step 1 has global norm >> 1 (clipped to 1), step 2 < 1 (untouched): Adam is not
  # invariant to a per-step rescaling, so clipping shows in the result.
  gradient_steps = []
  for scale in (30.0, 0.3):
    g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
    gradient_steps.append({k: x * scale / norm for k, x in g.items()})
  lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.01
  expected = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: 0.0 for k in params}
  v = {k: 0.0 for k in params}
  for t, grads in enumerate(gradient_steps, start=1):
    norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in grads.values()))
    factor = min(1.0, 1.0 / norm)
    for k, g in grads.items():
      g = g.astype(np.float64) * factor
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      expected[k] = expected[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * expected[k])
  got = _apply_optax(
      optimizers.adamw(lr, weight_decay=wd, max_grad_norm=1.0), params, gradient_steps
  )
  for k in params:
    # Against float64: two steps, each the global norm over 17 gradients, the moments and
    # the update (tests/tolerances.py, depth 2 × 2). Adam's bias correction 1 − b2**2 =
    # 0.002 cancels: float32's rounding of b2**2 reaches the second step magnified
    # 1/(1 − b2**2), halved by the square root, so errors are relative to the parameters
    # plus the step that much magnified. Without clipping or weight decay they move by
    # 0.08 and 0.002.
    step = np.abs(got[k] - params[k]).max()
    tolerances.assert_close(
        got[k], expected[k], num_terms=17, depth=4,
        scale=np.abs(expected[k]).max() + step / (2 * (1 - b2**2)), what=k,
    )


# -- Metric combination and microbatches -------------------------------------------------


def test_combine_metrics_weights_by_tokens():
  stacked = {
      "loss": np.array([2.0, 4.0, 0.0]),
      "z_loss": np.array([0.1, 0.3, 0.0]),
      "accuracy": np.array([0.5, 1.0, 0.0]),
      "num_tokens": np.array([2.0, 6.0, 0.0]),  # an all-padding batch contributes nothing
      "routing/fraction": np.array([0.2, 0.4, 0.6]),
  }
  combined = trainer_lib.combine_metrics(stacked)
  # Summed losses 2*2 + 4*6 = 28 over 8 tokens; the empty batch's normaliser was 1.
  assert float(combined["loss"]) == pytest.approx(28 / 8)
  assert float(combined["z_loss"]) == pytest.approx((0.2 + 1.8) / 8)
  assert float(combined["accuracy"]) == pytest.approx((1 + 6) / 8)
  assert float(combined["num_tokens"]) == 8
  assert float(combined["routing/fraction"]) == pytest.approx(0.4)
  fixed = trainer_lib.combine_metrics(stacked, loss_normalizing_factor=10.0)
  assert float(fixed["loss"]) == pytest.approx(6.0)  # (20 + 40 + 0) / 10: sums add up
  per_token = trainer_lib.combine_metrics(stacked, loss_normalizing_factor=10.0, per_token=True)
  assert float(per_token["loss"]) == pytest.approx(60 / 8)


def test_split_microbatches_is_strided():
  batch = {"x": np.arange(12).reshape(6, 2)}
  split = np.asarray(trainer_lib.split_microbatches(batch, 3)["x"])
  assert split.shape == (3, 2, 2)
  for microbatch in range(3):
    np.testing.assert_array_equal(split[microbatch], batch["x"][microbatch::3])


def test_trainer_rejects_bad_microbatching():
  with pytest.raises(ValueError, match="num_microbatches=3 does not divide BATCH_SIZE=8"):
    trainer_fixtures.tiny_trainer(None, num_microbatches=3)
  with pytest.raises(ValueError, match="microbatch size=2 is not divisible by the data-parallel"):
    trainer_fixtures.tiny_trainer(1, num_microbatches=4)


# -- Steps ----------------------------------------------------------------------------------


def test_initial_state_keys_and_step():
  state = trainer_fixtures.initial_host_state()
  assert int(state.step) == 0
  _, dropout_key = jax.random.split(jax.random.key(0))
  np.testing.assert_array_equal(state.rng, jax.random.key_data(dropout_key))


@pytest.mark.slow
def test_train_step_is_gradient_then_adafactor_update():
  trainer = trainer_fixtures.tiny_trainer(None)
  host_state = trainer_fixtures.initial_host_state()
  batch = trainer_fixtures.random_batch(1, 8)

  # Reference: the model's loss gradient and Adafactor's update, outside the Trainer.
  step_key = jax.random.fold_in(jax.random.wrap_key_data(host_state.rng), 0)
  (loss, _), grads = jax.jit(jax.value_and_grad(trainer.model.loss_fn, has_aux=True))(
      host_state.params, batch, step_key
  )
  optimizer = optimizers.adafactor(optimizers.constant_schedule(0.01))
  updates, _ = optimizer.update(grads, host_state.opt_state, host_state.params)
  expected = optax.apply_updates(host_state.params, updates)

  state, metrics = trainer.train_step(
      jax.device_put(host_state, trainer.state_sharding), trainer.partitioner.shard_batch(batch)
  )
  np.testing.assert_allclose(float(metrics["learning_rate"]), 0.01, rtol=1e-6)
  grad_norm = np.sqrt(
      sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads))
  )
  trainer_fixtures.assert_same_step(
      metrics, {"loss": loss, "grad_norm": grad_norm}, state.params, expected
  )
  assert int(state.step) == 1


@pytest.mark.slow
def test_microbatched_step_equals_whole_batch_step():
  whole = trainer_fixtures.tiny_trainer(None)
  micro = trainer_fixtures.tiny_trainer(None, num_microbatches=2)
  host_state = trainer_fixtures.initial_host_state()
  batch = trainer_fixtures.random_batch(2, 8)
  tokens = (batch["decoder_target_tokens"] > 0).sum(axis=1)
  # Unequal token counts per microbatch (rows 0,2,4,6 vs 1,3,5,7): a plain mean of the
  # two microbatch losses would differ from the whole batch's loss.
  assert tokens[0::2].sum() != tokens[1::2].sum()

  state_w, metrics_w = whole.train_step(
      jax.device_put(host_state, whole.state_sharding), whole.partitioner.shard_batch(batch)
  )
  state_m, metrics_m = micro.train_step(
      jax.device_put(host_state, micro.state_sharding), micro.partitioner.shard_batch(batch)
  )
  # The microbatch scan sums gradients in another order.
  trainer_fixtures.assert_same_step(
      metrics_m, metrics_w, state_m.params, state_w.params,
      names=("loss", "accuracy", "num_tokens", "z_loss", "grad_norm"),
  )


@pytest.mark.slow
def test_memory_report_of_the_compiled_step():
  trainer = trainer_fixtures.tiny_trainer(None)
  report = trainer_lib.memory_report(trainer.compile_train_step())
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      trainer_fixtures.initial_host_state().params))
  # The step's arguments hold at least the parameters; the donated state aliases output.
  assert report["argument_size_in_bytes"] >= param_bytes
  assert report["alias_size_in_bytes"] >= param_bytes
  assert report["peak_bytes_estimate"] >= report["temp_size_in_bytes"] > 0


@pytest.mark.slow
def test_predict_step_is_greedy_decoding():
  trainer = trainer_fixtures.tiny_trainer(None)
  params = trainer_fixtures.initial_host_state().params
  batch = trainer_fixtures.random_batch(3, 8)
  encoder_tokens = batch["encoder_input_tokens"]
  target_length = batch["decoder_target_tokens"].shape[1]
  decoded = np.asarray(trainer.predict_step(
      params,
      trainer.partitioner.shard_global_batch({
          "encoder_input_tokens": encoder_tokens,
          "decoder_input_tokens": np.zeros_like(batch["decoder_input_tokens"]),
      }),
  ))

  # Reference: re-run the whole decoder on the growing prefix, no cache, argmax each step.
  module = trainer.model.module

  @jax.jit
  def logits_of(decoder_inputs):
    return module.apply({"params": params}, encoder_tokens, decoder_inputs,
                        jnp.ones_like(decoder_inputs), enable_dropout=False)

  decoder_inputs = np.zeros((8, target_length), np.int32)
  expected = np.zeros((8, target_length), np.int32)
  done = np.zeros(8, bool)
  for position in range(target_length):
    next_tokens = np.argmax(np.asarray(logits_of(decoder_inputs))[:, position], axis=-1)
    next_tokens = np.where(done, 0, next_tokens)
    expected[:, position] = next_tokens
    done |= next_tokens == 1  # EOS
    if position + 1 < target_length:
      decoder_inputs[:, position + 1] = next_tokens
  np.testing.assert_array_equal(decoded, expected)
