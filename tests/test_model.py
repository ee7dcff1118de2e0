"""EncoderDecoderModel: the loss against numpy, and a CoLT5 that learns a copy task.

The network is CoLT5's model file (configs/models/colt5_tiny.gin) at smaller sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio

from colt5_flax import model as model_lib
from colt5_flax import model_files
from tests import tolerances

VOCAB = 12


def _colt5():
  """The `EncoderDecoder` of configs/models/colt5_tiny.gin at the tests' sizes, as
  `model_files` builds it: one encoder layer of 1 light head and 2 heavy heads of 8 (local
  radius 3), light/heavy MLP 16/64, a quarter of the tokens routed (half the keys/values);
  one decoder layer of 2 heads of 8, MLP 32; embed 32."""
  bindings = {
      "VOCAB_SIZE": VOCAB, "EMBED_DIM": 32, "NUM_HEADS": 2, "HEAD_DIM": 8, "MLP_DIM": 32,
      "NUM_ENCODER_LAYERS": 1, "NUM_DECODER_LAYERS": 1, "NUM_LIGHT_HEADS": 1,
      "NUM_HEAVY_HEADS": 2, "LIGHT_MLP_DIM": 16, "HEAVY_MLP_DIM": 64, "LOCAL_RADIUS": 3,
      "ROUTED_FRACTION": 1 / 4,
  }
  model_file = model_files.model_file("colt5", "tiny")
  with model_files.parsed([model_file], [f"{k} = {v!r}" for k, v in bindings.items()]):
    return model_files.frozen("ARCHITECTURE")


@pytest.fixture(scope="module")
def model():
  vocab = seqio.PassThroughVocabulary(size=VOCAB, eos_id=1)
  # z_loss 1e-4: the references below.
  return model_lib.EncoderDecoderModel(_colt5(), vocab, vocab, z_loss=1e-4)


def _batch(rng, batch=4, input_length=16, target_length=6):
  inputs = rng.integers(2, VOCAB, size=(batch, input_length))
  inputs[1, 10:] = 0
  targets = rng.integers(2, VOCAB, size=(batch, target_length))
  targets[0, 4:] = 0
  decoder_inputs = np.concatenate([np.zeros((batch, 1), int), targets[:, :-1]], axis=1)
  decoder_inputs[targets == 0] = 0
  return {
      "encoder_input_tokens": inputs.astype(np.int32),
      "decoder_input_tokens": decoder_inputs.astype(np.int32),
      "decoder_target_tokens": targets.astype(np.int32),
  }


def test_loss_matches_numpy_cross_entropy_with_z_loss(model):
  batch = _batch(np.random.default_rng(0))
  variables = model.get_initial_variables(
      jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}
  )
  params = variables["params"]
  loss, metrics = model.loss_fn(params, batch, None)
  logits = np.asarray(
      model.module.apply(
          {"params": params},
          batch["encoder_input_tokens"],
          batch["decoder_input_tokens"],
          batch["decoder_target_tokens"],
          enable_dropout=False,
      ),
      np.float64,
  )
  targets = batch["decoder_target_tokens"]
  weights = targets > 0
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target_logits = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  cross_entropy = (log_z - target_logits)[weights].sum() / weights.sum()
  z_loss = 1e-4 * (log_z**2)[weights].sum() / weights.sum()
  # loss_fn computes its own logits: another float32 program than `logits` above, off by
  # up to `delta` (tests/tolerances.py: widest sum the heavy MLP's 64, depth 6 per encoder
  # layer + 10 per decoder layer + the logits, plus 3 for the loss's log-softmax and mean).
  # A token's cross-entropy moves by at most 2·delta (its gradient in the logits,
  # softmax − one-hot, has l1 norm ≤ 2), its z-loss term by 2e-4·|log_z|·delta.
  network_bound = dict(num_terms=64, depth=6 + 10 + 1 + 3, programs=2)
  max_logit = np.abs(logits).max()
  tolerances.assert_close(
      float(loss), cross_entropy + z_loss, scale=2 * max_logit, **network_bound, what="loss"
  )
  tolerances.assert_close(
      float(metrics["z_loss"]), z_loss, scale=2e-4 * np.abs(log_z).max() * max_logit,
      **network_bound, what="z_loss",
  )
  accuracy = (logits.argmax(-1) == targets)[weights].mean()
  np.testing.assert_allclose(float(metrics["accuracy"]), accuracy, rtol=1e-6)
  assert float(metrics["num_tokens"]) == weights.sum()
  # Routing statistics of every router are reported.
  assert {"routing/q_mean_weight", "routing/kv_mean_weight", "routing/mlp_mean_weight"} <= set(
      metrics
  )
  # |Σλ − k| / k of every router: the soft top-k meets its constraint (float32 rounding).
  for branch in ("q", "kv", "mlp"):
    assert 0.0 <= float(metrics[f"routing/{branch}_sum_error"]) < 1e-5
  # score_batch is the per-example sum of target log-likelihoods.
  scores = np.asarray(model.score_batch(params, batch))
  # A sum over the 6 target tokens of log-probs each within 2·delta.
  tolerances.assert_close(
      scores, np.where(weights, target_logits - log_z, 0.0).sum(-1),
      scale=2 * targets.shape[1] * max_logit, **network_bound, what="score_batch",
  )


def test_label_smoothing_reference():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 5)), jnp.float32)
  targets = jnp.asarray([[1, 3]])
  loss, _ = model_lib.cross_entropy_with_logits(logits, targets, z_loss=0.0, label_smoothing=0.1)
  logits64 = np.asarray(logits, np.float64)
  log_p = logits64 - np.log(np.exp(logits64).sum(-1, keepdims=True))
  soft = np.full((1, 2, 5), 0.1 / 4)
  soft[0, 0, 1] = soft[0, 1, 3] = 0.9
  entropy = -(0.9 * np.log(0.9) + 4 * (0.1 / 4) * np.log(0.1 / 4))
  # Against float64 (tests/tolerances.py): log-softmax over 5 logits, the weighted sum and
  # the entropy's subtraction; errors relative to the logits' size.
  tolerances.assert_close(
      loss, -(soft * log_p).sum(-1) - entropy, num_terms=5, depth=4,
      scale=np.abs(logits64).max(),
  )


def test_bad_batches_are_rejected_with_the_value(model):
  batch = _batch(np.random.default_rng(2))
  bad = dict(batch, encoder_input_tokens=batch["encoder_input_tokens"].copy())
  bad["encoder_input_tokens"][0, 0] = VOCAB + 5
  with pytest.raises(ValueError, match=f"token id {VOCAB + 5} outside the vocabulary"):
    model.validate_batch(bad)
  short = dict(batch, decoder_target_tokens=batch["decoder_target_tokens"][:, :3])
  with pytest.raises(ValueError, match="shapes differ"):
    model.validate_batch(short)
  with pytest.raises(ValueError, match="batch size"):
    model.validate_batch(dict(batch, encoder_input_tokens=batch["encoder_input_tokens"][:2]))


@pytest.mark.slow
def test_colt5_learns_a_copy_task(model):
  """Smoke test of the whole forward/backward path: the loss falls on a copy task.

  Copy the three tokens that follow a marker (token 2) placed at a random position:
  relative-position models find the span by content, as T5 copies.
  """
  rng = np.random.default_rng(3)
  input_length, span, batch_size = 16, 3, 16

  def copy_batch():
    inputs = rng.integers(3, VOCAB, size=(batch_size, input_length))
    starts = rng.integers(0, input_length - span, size=batch_size)
    inputs[np.arange(batch_size), starts] = 2
    targets = np.stack([inputs[b, s + 1 : s + 1 + span] for b, s in enumerate(starts)])
    decoder_inputs = np.concatenate([np.zeros((batch_size, 1), int), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": inputs.astype(np.int32),
        "decoder_input_tokens": decoder_inputs.astype(np.int32),
        "decoder_target_tokens": targets.astype(np.int32),
    }

  shapes = {k: v.shape for k, v in copy_batch().items()}
  params = model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, None)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  losses, accuracies = [], []
  for _ in range(300):
    params, opt_state, metrics = step(params, opt_state, copy_batch())
    losses.append(float(metrics["cross_ent_loss"]))
    accuracies.append(float(metrics["accuracy"]))
  # Chance over the 9 candidate tokens is ln(9) ≈ 2.2 nats and 11% accuracy.
  assert np.mean(losses[:10]) > 2.0
  assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:10])
  assert np.mean(accuracies[-20:]) > 0.4


def test_greedy_predict_batch_equals_step_by_step_argmax(model):
  """Cached greedy decoding against re-running the whole uncached network per token."""
  rng = np.random.default_rng(4)
  batch = _batch(rng, batch=3, target_length=5)
  params = model.get_initial_variables(
      jax.random.PRNGKey(1), {k: v.shape for k, v in batch.items()}
  )["params"]
  predicted = np.asarray(model.predict_batch(params, batch))

  forward = jax.jit(
      lambda tokens, decoder_inputs: model.module.apply(
          {"params": params}, tokens, decoder_inputs, jnp.ones_like(decoder_inputs),
          enable_dropout=False,
      )
  )
  length = batch["decoder_input_tokens"].shape[1]
  decoder_inputs = np.zeros((3, length), np.int32)
  expected = np.zeros((3, length), np.int32)
  done = np.zeros(3, bool)
  for i in range(length):
    logits = np.asarray(forward(batch["encoder_input_tokens"], decoder_inputs))
    token = np.where(done, 0, logits[:, i].argmax(-1))
    expected[:, i] = token
    done |= token == model.output_vocabulary.eos_id
    if i + 1 < length:
      decoder_inputs[:, i + 1] = token
  np.testing.assert_array_equal(predicted, expected)
