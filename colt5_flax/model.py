"""EncoderDecoderModel: loss, scoring and prediction around the network (t5x's API).

Mirrors t5x's `models.EncoderDecoderModel` (`loss_fn`, `score_batch`, `predict_batch`,
`get_initial_variables`) so trainers and evaluation code written for t5x read the same.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from colt5_flax import decoding

Array = Any
PyTree = Any
Batch = Mapping[str, Array]

# Routing statistics that conditional layers sow into `intermediates` under this prefix
# are averaged over layers and reported by `loss_fn` as `routing/<name>`.
ROUTING_STAT_PREFIX = "routing_"

_ENCODER_FEATURES = ("encoder_input_tokens",)
_DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens")


def cross_entropy_with_logits(logits, targets, *, z_loss: float = 1e-4, label_smoothing=0.0):
  """Per-token cross-entropy with T5X's z-loss; logits [batch, length, vocab] float32.

  z-loss adds `z_loss * log(Z)²` so the softmax normaliser stays near 1 (T5X default 1e-4).

  Returns:
    (loss [batch, length], z_loss_term [batch, length]).
  """
  vocab_size = logits.shape[-1]
  logits = jnp.asarray(logits, jnp.float32)
  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab_size - 1) if vocab_size > 1 else 0.0
  one_hot = jax.nn.one_hot(targets, vocab_size)
  soft_targets = one_hot * (confidence - low_confidence) + low_confidence
  # Entropy of the smoothed targets, so that a perfect prediction has zero loss.
  normalizing_constant = -(
      confidence * np.log(confidence)
      + (vocab_size - 1) * low_confidence * np.log(low_confidence + 1e-20)
  ) if label_smoothing else 0.0
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_softmax = logits - log_z[..., None]
  loss = -jnp.sum(soft_targets * log_softmax, axis=-1) - normalizing_constant
  z_term = z_loss * jnp.square(log_z)
  return loss + z_term, z_term


class EncoderDecoderModel:
  """Training, scoring and decoding of an `EncoderDecoder` network.

  Attributes:
    module: the `network.EncoderDecoder`.
    input_vocabulary, output_vocabulary: seqio vocabularies (for `vocab_size` checks
      and the inference pipeline).
    z_loss: T5X's z-loss weight (1e-4).
    label_smoothing: label smoothing (0 in T5).
    loss_normalizing_factor: None normalises by the number of target tokens in the
      batch; a number divides the summed loss by it (t5x's fixed factor, which keeps the
      gradient scale independent of padding).
    decode_fn: `decoding.temperature_sample` (greedy at temperature 0, the paper's
      choice) or `beam_search.beam_search`, with its keyword arguments bound.
  """

  FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter

  def __init__(
      self,
      module: nn.Module,
      input_vocabulary: seqio.Vocabulary,
      output_vocabulary: seqio.Vocabulary,
      *,
      z_loss: float = 1e-4,
      label_smoothing: float = 0.0,
      loss_normalizing_factor: float | None = None,
      decode_fn: Callable[..., Any] | None = None,
  ):
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.loss_normalizing_factor = loss_normalizing_factor
    self.decode_fn = decode_fn or functools.partial(decoding.temperature_sample, temperature=0.0)

  # -- Set-up ---------------------------------------------------------------------------

  def get_initial_variables(self, rng, input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Mapping[str, Any] | None = None) -> PyTree:
    """Initial variables for batches of `input_shapes` (t5x's signature)."""
    input_types = input_types or {}

    def dummy(name):
      return jnp.ones(input_shapes[name], input_types.get(name, jnp.int32))

    rngs = {"params": rng, "dropout": rng, "routing": rng}
    return self.module.init(
        rngs,
        dummy("encoder_input_tokens"),
        dummy("decoder_input_tokens"),
        dummy("decoder_target_tokens"),
        enable_dropout=False,
    )

  def validate_batch(self, batch: Batch) -> None:
    """Raises ValueError for token ids outside the vocabulary or inconsistent shapes.

    Checks only concrete (host or device) arrays; under a trace it returns silently, so
    the trainer calls it on the host before the jitted step.
    """
    vocab_size = self.module.vocab_size
    for name in _ENCODER_FEATURES + _DECODER_FEATURES:
      if name not in batch:
        if name == "decoder_input_tokens" or name == "encoder_input_tokens":
          raise ValueError(f"batch has no {name!r}; it has {sorted(batch)}")
        continue
      value = batch[name]
      if isinstance(value, jax.core.Tracer):
        return
      value = np.asarray(value)
      if value.ndim != 2:
        raise ValueError(f"{name} must be [batch, length], got shape {value.shape}")
      if value.size and (value.min() < 0 or value.max() >= vocab_size):
        bad = value[(value < 0) | (value >= vocab_size)].ravel()[0]
        raise ValueError(
            f"{name} holds token id {int(bad)} outside the vocabulary [0, {vocab_size})"
        )
    for name, like in (
        ("encoder_segment_ids", "encoder_input_tokens"),
        ("encoder_positions", "encoder_input_tokens"),
        ("decoder_segment_ids", "decoder_input_tokens"),
        ("decoder_positions", "decoder_input_tokens"),
        ("decoder_loss_weights", "decoder_input_tokens"),
    ):
      if name in batch and np.shape(batch[name]) != np.shape(batch[like]):
        raise ValueError(
            f"{name} shape {np.shape(batch[name])} != {like} shape {np.shape(batch[like])}"
        )
    batch_sizes = {name: np.shape(batch[name])[0] for name in batch if np.ndim(batch[name])}
    if len(set(batch_sizes.values())) > 1:
      raise ValueError(f"features disagree on the batch size: {batch_sizes}")
    if "decoder_target_tokens" in batch and np.shape(batch["decoder_target_tokens"]) != np.shape(
        batch["decoder_input_tokens"]
    ):
      raise ValueError(
          "decoder_target_tokens and decoder_input_tokens shapes differ: "
          f"{np.shape(batch['decoder_target_tokens'])} vs "
          f"{np.shape(batch['decoder_input_tokens'])}"
      )

  # -- Training -------------------------------------------------------------------------

  def _compute_logits(self, params, batch: Batch, dropout_rng=None, *, mutable=("intermediates",)):
    rngs = None
    if dropout_rng is not None:
      dropout_rng, routing_rng = jax.random.split(dropout_rng)
      rngs = {"dropout": dropout_rng, "routing": routing_rng}
    return self.module.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        enable_dropout=dropout_rng is not None,
        rngs=rngs,
        mutable=list(mutable),
    )

  def loss_fn(self, params, batch: Batch, dropout_rng) -> tuple[Array, dict[str, Array]]:
    """Loss and metrics for one batch. `dropout_rng=None` disables dropout.

    Returns:
      (loss, metrics): metrics hold `loss`, `z_loss`, `cross_ent_loss`, `accuracy`,
      `num_tokens` and the routing statistics (`routing/<name>`), all scalars.
    """
    logits, state = self._compute_logits(params, batch, dropout_rng)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = targets > 0
    weights = jnp.asarray(weights, jnp.float32)
    token_loss, token_z = cross_entropy_with_logits(
        logits, targets, z_loss=self.z_loss, label_smoothing=self.label_smoothing
    )
    num_tokens = jnp.sum(weights)
    if self.loss_normalizing_factor is None:
      normalizer = jnp.maximum(num_tokens, 1.0)
    else:
      normalizer = jnp.asarray(self.loss_normalizing_factor, jnp.float32)
    loss = jnp.sum(token_loss * weights) / normalizer
    z_term = jnp.sum(token_z * weights) / normalizer
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
    metrics = {
        "loss": loss,
        "z_loss": z_term,
        "cross_ent_loss": loss - z_term,
        "accuracy": correct / jnp.maximum(num_tokens, 1.0),
        "num_tokens": num_tokens,
    }
    metrics.update(routing_statistics(state.get("intermediates", {})))
    return loss, metrics

  # -- Scoring and prediction -----------------------------------------------------------

  def score_batch(self, params, batch: Batch, return_intermediates: bool = False):
    """Sum of target-token log-likelihoods, [batch] (t5x's `score_batch`)."""
    logits, state = self._compute_logits(params, batch)
    targets = batch["decoder_target_tokens"]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    scores = jnp.sum(token_scores * (targets > 0), axis=-1)
    if return_intermediates:
      return scores, state.get("intermediates", {})
    return scores

  def predict_batch(
      self,
      params,
      batch: Batch,
      rng=None,
      decoder_params: Mapping[str, Any] | None = None,
      return_all_decodes: bool = False,
      num_decodes: int = 1,
  ):
    """Decoded token ids [batch, length] ([batch, num_decodes, length] with all decodes)."""
    tokens, _ = self.predict_batch_with_aux(
        params, batch, rng, decoder_params, return_all_decodes, num_decodes
    )  # t5x's predict_batch never prompts with the targets.
    return tokens

  def predict_batch_with_aux(
      self,
      params,
      batch: Batch,
      rng=None,
      decoder_params: Mapping[str, Any] | None = None,
      return_all_decodes: bool = False,
      num_decodes: int = 1,
      prompt_with_targets: bool = False,
  ):
    """Runs the encoder once, fills the decode cache, then decodes with `decode_fn`.

    The target length of `batch["decoder_input_tokens"]` is the maximum decode length.
    As in t5x, the decoder starts from nothing unless `prompt_with_targets`, which forces
    `decoder_input_tokens` as a prompt.
    Returns (tokens, {"scores": log-probabilities}).
    """
    encoder_tokens = batch["encoder_input_tokens"]
    decoder_prompt = jnp.asarray(batch["decoder_input_tokens"])
    if not prompt_with_targets:
      decoder_prompt = jnp.zeros_like(decoder_prompt)
    module = self.module
    encoded = module.apply(
        {"params": params}, encoder_tokens, enable_dropout=False, method=module.encode
    )
    cache = create_decode_cache(module, params, encoded, encoder_tokens, decoder_prompt)
    encoded = decoding.expand_for_decodes(encoded, num_decodes)
    encoder_tokens = decoding.expand_for_decodes(encoder_tokens, num_decodes)

    def tokens_to_logits(state):
      flat_ids = state.cur_token
      logits, new_vars = module.apply(
          {"params": params, "cache": state.cache},
          encoded,
          encoder_tokens,
          flat_ids,
          jnp.ones_like(flat_ids),
          enable_dropout=False,
          decode=True,
          mutable=["cache"],
          method=module.decode,
      )
      return logits[:, -1, :], new_vars["cache"]

    decoder_params = dict(decoder_params or {})
    if rng is not None:
      decoder_params.setdefault("decode_rng", rng)
    decodes, scores = self.decode_fn(
        inputs=decoder_prompt,
        cache=cache,
        tokens_to_logits=tokens_to_logits,
        eos_id=self.output_vocabulary.eos_id,
        num_decodes=num_decodes,
        **decoder_params,
    )
    if return_all_decodes:
      return decodes, {"scores": scores}
    # decode_fn sorts decodes by increasing score: the best is last.
    return decodes[:, -1, :], {"scores": scores[:, -1]}


def create_decode_cache(module, params, encoded, encoder_tokens, decoder_tokens) -> PyTree:
  """The decode cache of `module` (a `network.EncoderDecoder`) for these encoder outputs.

  Creating the cache runs the decoder once over the full target length: it sizes the
  self-attention caches and projects the encoder keys/values once (CrossAttention).

  Args:
    encoded: [batch, input_length, embed], the encoder's outputs.
    encoder_tokens: [batch, input_length], for the cross-attention mask.
    decoder_tokens: [batch, target_length]; only its shape counts (the decode length).

  Returns:
    the 'cache' collection.
  """
  _, variables = module.apply(
      {"params": params},
      encoded,
      encoder_tokens,
      jnp.zeros_like(decoder_tokens),
      jnp.ones_like(decoder_tokens),
      enable_dropout=False,
      decode=True,
      mutable=["cache"],
      method=module.decode,
  )
  return variables["cache"]


def routing_statistics(intermediates: PyTree) -> dict[str, Array]:
  """Averages every sown `routing_<name>` scalar over layers into `routing/<name>`."""
  found: dict[str, list[Array]] = {}
  flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  for path, value in flat:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    for name in names:
      if isinstance(name, str) and name.startswith(ROUTING_STAT_PREFIX):
        found.setdefault(name[len(ROUTING_STAT_PREFIX):], []).append(jnp.mean(value))
        break
  return {f"routing/{name}": jnp.mean(jnp.stack(values)) for name, values in found.items()}
