"""Training dynamics against transformers: 20 AdamW steps, same batches, same losses.

The reference is transformers' PyTorch T5 / LongT5 (TGlobal), randomly initialised here (no
downloads) and trained the way its users train it: `model(input_ids, attention_mask,
labels=...)` (HF shifts the labels right itself and averages the cross-entropy over the
non-padding labels), `clip_grad_norm_` and `torch.optim.AdamW` (decoupled weight decay on
every parameter) at a constant rate. Our side is what a user of this repository runs to
fine-tune a converted checkpoint: `convert.hf.from_hf`, `seqio.EncDecFeatureConverter`
for the label shift and padding, `EncoderDecoderModel.loss_fn` (z-loss 0, normalised by
the number of target tokens), `optimizers.adamw` and `Trainer.train_step`.

Both sides see the same ragged batches (inputs of 19 and fewer tokens, targets of 7 and
fewer), so padding, the label shift, the loss normalisation, the gradients, the clipping
and the optimizer all have to agree for the losses to stay within 1e-3 over 20 steps.
"""

import functools

import jax
import numpy as np
import pytest
import seqio

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tf = pytest.importorskip("tensorflow")

from colt5_flax import model as model_lib  # noqa: E402
from colt5_flax import optimizers, partitioning  # noqa: E402
from colt5_flax import trainer as trainer_lib  # noqa: E402
from colt5_flax.convert import hf  # noqa: E402
from tests import hf_fixtures  # noqa: E402

VOCAB = 48
INPUT_LENGTH, TARGET_LENGTH = 19, 7
BATCH_SIZE = 4
NUM_STEPS = 20
# A rate high enough that the loss moves well away from its start within 20 steps, so a
# mismatch anywhere in the update shows up in the losses.
LEARNING_RATE = 1e-2
BETAS = (0.9, 0.98)
EPSILON = 1e-6
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0
_COMMON = dict(
    hf_fixtures.SIZES,
    vocab_size=VOCAB,
    num_decoder_layers=2,
    # As T5's released configs: HF's label shift starts the decoder with the padding id 0.
    pad_token_id=0,
    decoder_start_token_id=0,
)


def _hf_model(kind: str):
  """A random transformers model with the output layer of its released checkpoints.

  "t5": tied and rescaled by d_model^-0.5 (T5 v1.0's output, `logits_via_embedding`).
  "transient-global": LongT5 as released, an untied `lm_head` without rescale (transformers
  ties `lm_head` to `shared` in memory when it is built from a config; released LongT5
  checkpoints carry their own `lm_head.weight`, so we give it its own weights here).
  """
  torch.manual_seed(0)
  if kind == "t5":
    model = transformers.T5ForConditionalGeneration(
        hf_fixtures.config("t5", **_COMMON, tie_word_embeddings=True)
    )
  else:
    config = hf_fixtures.config(kind, **_COMMON, tie_word_embeddings=False)
    model = transformers.LongT5ForConditionalGeneration(config)
    with torch.no_grad():
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
  return model.float()


def _examples(seed: int) -> list[dict[str, np.ndarray]]:
  """NUM_STEPS * BATCH_SIZE examples of ragged length, up to the full feature lengths."""
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(NUM_STEPS * BATCH_SIZE):
    inputs = rng.integers(2, VOCAB, rng.integers(3, INPUT_LENGTH + 1))
    # A learnable target: the first input tokens, shifted in value (so the loss falls).
    targets = (inputs[: rng.integers(2, TARGET_LENGTH + 1)] % 20) + 2
    examples.append({"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)})
  return examples


def _feature_converted_batches(examples) -> list[dict[str, np.ndarray]]:
  """Our batches: seqio's EncDecFeatureConverter trims, pads and shifts the targets."""
  dataset = tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={
          "inputs": tf.TensorSpec([None], tf.int32),
          "targets": tf.TensorSpec([None], tf.int32),
      },
  )
  converted = seqio.EncDecFeatureConverter(pack=False)(
      dataset, {"inputs": INPUT_LENGTH, "targets": TARGET_LENGTH}
  )
  return list(converted.batch(BATCH_SIZE).as_numpy_iterator())


def _hf_batches(examples) -> list[dict[str, "torch.Tensor"]]:
  """transformers' batches, built independently: right-padded ids, labels -100 on padding."""
  batches = []
  for start in range(0, len(examples), BATCH_SIZE):
    rows = examples[start : start + BATCH_SIZE]
    input_ids = np.zeros((BATCH_SIZE, INPUT_LENGTH), np.int64)
    labels = np.full((BATCH_SIZE, TARGET_LENGTH), -100, np.int64)
    for i, row in enumerate(rows):
      inputs, targets = row["inputs"], row["targets"]
      input_ids[i, : len(inputs)] = inputs
      labels[i, : len(targets)] = targets
    batches.append({
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy((input_ids > 0).astype(np.int64)),
        "labels": torch.from_numpy(labels),
    })
  return batches


def _train_hf(model, batches) -> tuple[np.ndarray, np.ndarray]:
  """Per-step (loss, pre-clipping gradient norm) of HF's usual fine-tuning loop."""
  model.train()  # dropout_rate is 0: train mode changes nothing but is what users run
  optimizer = torch.optim.AdamW(
      model.parameters(), lr=LEARNING_RATE, betas=BETAS, eps=EPSILON, weight_decay=WEIGHT_DECAY
  )
  losses, grad_norms = [], []
  for batch in batches:
    optimizer.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)))
    optimizer.step()
    losses.append(loss.item())
  return np.array(losses), np.array(grad_norms)


def _train_ours(model, batches) -> tuple[np.ndarray, np.ndarray]:
  """Per-step (loss, gradient norm) of our Trainer on a converted model."""
  net, variables = hf.from_hf(model)
  schedule = optimizers.constant_schedule(LEARNING_RATE)
  optimizer = optimizers.adamw(
      schedule,
      b1=BETAS[0],
      b2=BETAS[1],
      eps=EPSILON,
      weight_decay=WEIGHT_DECAY,
      max_grad_norm=MAX_GRAD_NORM,
  )
  vocabulary = seqio.PassThroughVocabulary(VOCAB)
  model = model_lib.EncoderDecoderModel(net, vocabulary, vocabulary, z_loss=0.0)
  partitioner = partitioning.Partitioner(num_partitions=1, devices=jax.devices()[:1])
  trainer = trainer_lib.Trainer(
      model,
      partitioner,
      optimizer,
      schedule,
      trainer_lib.encdec_batch_shapes(
          BATCH_SIZE, {"inputs": INPUT_LENGTH, "targets": TARGET_LENGTH}
      ),
  )
  state = trainer.state_from_params(jax.tree.map(np.asarray, _unbox(variables["params"])))
  losses, grad_norms = [], []
  for batch in batches:
    state, metrics = trainer.train_step(state, partitioner.shard_batch(batch))
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  return np.array(losses), np.array(grad_norms)


def _unbox(params):
  import flax.linen as nn

  return nn.unbox(params)


@functools.cache
def _runs(kind: str):
  model = _hf_model(kind)
  examples = _examples(seed=1)
  ours = _train_ours(model, _feature_converted_batches(examples))  # converts before HF trains
  theirs = _train_hf(model, _hf_batches(examples))
  return ours, theirs


@pytest.mark.parametrize("kind", ["t5", "transient-global"])
def test_losses_match_transformers_for_20_adamw_steps(kind):
  (our_losses, our_norms), (hf_losses, hf_norms) = _runs(kind)
  # The run must learn something, or agreement would say little about the updates.
  assert hf_losses[-5:].mean() < 0.9 * hf_losses[:5].mean(), hf_losses
  np.testing.assert_allclose(our_losses, hf_losses, rtol=1e-3, err_msg="per-step losses")
  np.testing.assert_allclose(our_norms, hf_norms, rtol=1e-3, err_msg="per-step gradient norms")


def test_tied_unscaled_head_warns_that_fine_tuning_differs():
  """transformers 5 builds T5.1.1 / LongT5 with `lm_head` tied to `shared` and no rescale.

  Our network ties only with T5 v1.0's rescale, so the converted head is an untied copy:
  the logits agree (tests/convert/test_hf.py) but 20 AdamW steps drift by 0.4-5%.
  """
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(
      hf_fixtures.config("t5", **_COMMON, tie_word_embeddings=False)
  )
  assert model.lm_head.weight is model.shared.weight  # tied in memory by transformers
  with pytest.warns(UserWarning, match="fine-tunes differently"):
    net, _ = hf.from_hf(model)
  assert not net.logits_via_embedding
