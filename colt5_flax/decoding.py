"""Autoregressive decoding over a KV cache: temperature sampling (greedy at 0), and the
conventions it shares with beam search (`beam_search.py`).

The calling convention is t5x's (`t5x/decoding.py`), so a t5x `predict_batch` reads the same:
the caller runs the encoder once and builds `tokens_to_logits`, a closure over the encoded
inputs that takes a `DecodingState` (the current token and the cache) and returns the
next-token logits and the updated cache. These functions see only tokens, the cache pytree and
that callback; what the cache holds (self-attention keys/values, cross-attention keys/values,
a scalar `cache_index`) is the network's business.

Conventions shared by both decoders:
- `inputs` [batch, length] int32 is the decoder prompt, already shifted right: position 0 is
  the start token (T5 uses the pad id 0), non-zero tokens at positions 1, 2, ... are a prompt
  that is forced (teacher-forced, not scored), and 0 marks positions to generate.
- The returned sequences drop the start token: entry j is the token at position j + 1.
  After a generated EOS every token is 0 (pad).
- Several decodes of one example are flattened into the leading dim as
  [b0 d0, b0 d1, ..., b1 d0, ...] (`expand_for_decodes`), so every cache array whose leading
  dim (`cache_offset`) is batch is repeated, and scalars such as `cache_index` are shared.
- Everything runs in one `jax.lax.while_loop` with static shapes and is jittable; the loop
  stops as soon as every sequence has finished.

The CoLT5 paper decodes greedily (CoLT5 §4, fine-tuning): `temperature_sample(...,
temperature=0.0)`.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# A finite "minus infinity" for beam scores: sums of two of them stay finite, where -inf would
# turn into NaN the first time it met +inf or was subtracted from itself.
NEG_INF = -1.0e7

# Temperatures at or below this decode greedily: dividing logits by anything smaller only
# risks overflow, and the distribution is already a point mass at float32 precision.
MIN_TEMPERATURE = 1e-4


@flax.struct.dataclass
class DecodingState:
  """What `tokens_to_logits` sees at each step (t5x's `DecodingState`).

  Attributes:
    cur_index: position of `cur_token` in the sequence: [rows] int32 in
      `temperature_sample` (rows may start at different `initial_index`), a scalar int32 in
      `beam_search`.
    sequences: [rows, length] int32, the tokens decoded so far (position 0 = start token,
      then the prompt and the generated tokens, 0 beyond).
    cur_token: [rows, 1] int32, the token to feed now.
    cache: the cache pytree, arrays with `rows` on their batch axis.

  `rows` is batch * num_decodes (or batch * beams), flattened as described in the module
  docstring.
  """

  cur_index: jax.Array
  sequences: jax.Array
  cur_token: jax.Array
  cache: PyTree


TokensToLogits = Callable[[DecodingState], tuple[jax.Array, PyTree]]


# ---------------------------------------------------------------------------------------------
# Input checks and the batch expansion shared by both decoders (beam_search.py imports them).
# ---------------------------------------------------------------------------------------------


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_positive_int(name: str, value) -> None:
  """ValueError naming `name` unless `value` is an int >= 1 (num_decodes, beam_size, ...)."""
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_inputs(inputs) -> None:
  """ValueError unless `inputs` is a decoder prompt: [batch, length >= 1] integer ids."""
  if inputs.ndim != 2:
    raise ValueError(f"inputs must be [batch, length], got shape {inputs.shape}")
  if not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError(f"inputs must hold integer token ids, got dtype {inputs.dtype}")
  if inputs.shape[1] < 1:
    raise ValueError(f"inputs need at least the start-token position, got shape {inputs.shape}")


def check_cache_batch(cache: PyTree, batch_size: int, batch_axis: int) -> None:
  """Every non-scalar cache array must carry the batch on `batch_axis`, or expansion is wrong."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
    shape = jnp.shape(leaf)
    if len(shape) > batch_axis and shape[batch_axis] != batch_size:
      raise ValueError(
          f"cache entry {jax.tree_util.keystr(path)} has shape {shape}, but axis {batch_axis} "
          f"(cache_offset) should be the batch size {batch_size} of inputs"
      )


def expand_for_decodes(tree: PyTree, num_decodes: int, *, batch_axis: int = 0) -> PyTree:
  """Repeats every array's batch axis `num_decodes` times, decodes of one example adjacent.

  [batch, ...] -> [batch * num_decodes, ...] ordered [b0 d0, b0 d1, ..., b1 d0, ...], the
  order `temperature_sample` and `beam_search` use for their flattened rows, so the model's
  `predict_batch` can expand what it closes over (the encoded inputs and their mask) the same
  way. Arrays with no `batch_axis` (scalars such as a shared `cache_index`) are kept as they are.

  Args:
    tree: pytree of arrays, [batch, ...] (or [..., batch, ...] with `batch_axis` > 0).
    num_decodes: copies of each example, >= 1.
    batch_axis: the axis holding batch; 1 for the cache of `nn.scan`-ned layers, whose leading
      axis is the layer.

  Returns:
    The same pytree with batch * num_decodes on `batch_axis`.
  """
  check_positive_int("num_decodes", num_decodes)

  def expand(leaf):
    leaf = jnp.asarray(leaf)
    if leaf.ndim <= batch_axis:
      return leaf
    return jnp.repeat(leaf, num_decodes, axis=batch_axis)

  return jax.tree_util.tree_map(expand, tree)


def check_logits(logits, rows: int, eos_id: int):
  """`tokens_to_logits`'s logits as float32 [rows, vocab]; ValueError if the shape is not
  that or `eos_id` is outside the vocabulary."""
  if logits.ndim != 2 or logits.shape[0] != rows:
    raise ValueError(f"tokens_to_logits must return logits [{rows}, vocab], got {logits.shape}")
  vocab_size = logits.shape[1]
  if not 0 <= eos_id < vocab_size:
    raise ValueError(f"eos_id {eos_id} is outside the vocabulary of {vocab_size} logits")
  return jnp.asarray(logits, jnp.float32)


def _positions_mask(positions, width: int):
  """[rows] -> [rows, width] bool, True at each row's position.

  Elementwise reads and writes instead of gathers and scatters, so the batch axis can be sharded.
  """
  return jnp.arange(width, dtype=positions.dtype)[None, :] == positions[:, None]


# ---------------------------------------------------------------------------------------------
# Temperature sampling.
# ---------------------------------------------------------------------------------------------


def _top_k_filter(logits, topk: int):
  """Keeps the `topk` largest logits of each row ([rows, vocab]); the rest become -inf."""
  if topk >= logits.shape[-1]:
    return logits
  kth_largest = jax.lax.top_k(logits, topk)[0][:, -1:]
  return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def _top_p_filter(logits, topp):
  """Nucleus filter: keeps the fewest most likely tokens whose probability sums to >= topp.

  Args:
    logits: [rows, vocab] float32.
    topp: scalar in [0, 1]; 0 and 1 keep everything. May be traced.

  Returns:
    [rows, vocab], filtered logits at -inf. The most likely token is always kept.
  """
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_before < topp
  num_kept = jnp.maximum(jnp.sum(keep_sorted, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
  filtered = jnp.where(logits >= threshold, logits, -jnp.inf)
  # topp = 1 must be a no-op even when float rounding pushes the cumulative mass to 1 early.
  return jnp.where((topp <= 0.0) | (topp >= 1.0), logits, filtered)


def _choose_tokens(logits, rng, *, temperature, topk: int, topp, rescale_log_probs: bool):
  """Picks one next token per row and its log-probability.

  Args:
    logits: [rows, vocab] float32.
    rng: PRNG key for this step.
    temperature: Python float (branch chosen at trace time) or [rows] float32 array.
    topk, topp: filters applied to the temperature-scaled logits (at most one is non-zero).
    rescale_log_probs: score the token under the distribution sampled from (temperature and
      filters applied; greedy tokens score 0) rather than under the model's own softmax.

  Returns:
    tokens [rows] int32, log_probs [rows] float32.
  """
  model_log_probs = jax.nn.log_softmax(logits, axis=-1)

  def log_prob_of(log_probs, tokens):
    return jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]

  greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if rescale_log_probs:
    greedy_log_probs = jnp.zeros(greedy_tokens.shape, jnp.float32)
  else:
    greedy_log_probs = log_prob_of(model_log_probs, greedy_tokens)
  static_temperature = isinstance(temperature, float)
  if static_temperature and temperature <= MIN_TEMPERATURE:
    return greedy_tokens, greedy_log_probs

  scale = temperature if static_temperature else jnp.maximum(temperature, MIN_TEMPERATURE)[:, None]
  scaled = logits / scale
  if topk:
    scaled = _top_k_filter(scaled, topk)
  if not _is_concrete(topp) or topp:
    scaled = _top_p_filter(scaled, topp)
  sampled_tokens = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
  sampled_log_probs = log_prob_of(
      jax.nn.log_softmax(scaled, axis=-1) if rescale_log_probs else model_log_probs,
      sampled_tokens,
  )
  if static_temperature:
    return sampled_tokens, sampled_log_probs
  use_sampling = temperature > MIN_TEMPERATURE
  return (
      jnp.where(use_sampling, sampled_tokens, greedy_tokens),
      jnp.where(use_sampling, sampled_log_probs, greedy_log_probs),
  )


@flax.struct.dataclass
class _SamplingState:
  cur_index: jax.Array  # [rows] int32: position of cur_token
  sequences: jax.Array  # [rows, length + 2] int32: positions 0..length, then a spill column
  cache: PyTree
  cur_token: jax.Array  # [rows, 1] int32
  ended: jax.Array  # [rows] bool
  rng: jax.Array
  log_prob: jax.Array  # [rows] float32


def temperature_sample(
    inputs,
    cache: PyTree,
    tokens_to_logits: TokensToLogits,
    *,
    eos_id: int,
    decode_rng=None,
    num_decodes: int = 1,
    temperature=1.0,
    topk: int = 0,
    topp=0.0,
    initial_index=None,
    max_decode_steps=None,
    cache_offset: int = 0,
    rescale_log_probs: bool = True,
):
  """Samples `num_decodes` continuations per example; temperature 0 decodes greedily.

  Each step feeds the current token to `tokens_to_logits`, then either forces the prompt's
  next token (a non-zero entry of `inputs`, not scored) or picks one from the logits:
  argmax when temperature <= MIN_TEMPERATURE, else a sample from
  softmax(logits / temperature) restricted by top-k or top-p. A sequence ends when it
  generates `eos_id` (an EOS inside the prompt does not end it) or reaches its last position;
  the loop stops when all have ended.

  Args:
    inputs: [batch, length] int32 decoder prompt, position 0 the start token, 0 = to generate.
      At most `length` tokens are produced (positions 1..length).
    cache: pytree of the decoder's cache, arrays [batch, ...] on axis `cache_offset`; scalars
      (a shared `cache_index`) are kept.
    tokens_to_logits: (DecodingState) -> (logits [rows, vocab], new cache), rows =
      batch * num_decodes.
    eos_id: end-of-sequence token id.
    decode_rng: PRNG key; None uses PRNGKey(0). Unused when greedy.
    num_decodes: samples per example, >= 1.
    temperature: >= 0; a Python float, or a [batch] array for one per example (may be traced;
      then it cannot be checked for sign). <= MIN_TEMPERATURE (e.g. 0.0) means greedy.
    topk: if > 0, sample among the `topk` most likely tokens only (ties at the cut are kept).
      Static int.
    topp: if in (0, 1), sample among the fewest most likely tokens whose probability reaches
      `topp` (nucleus sampling). Not together with `topk`.
    initial_index: optional [batch] int32, the position of each row's current token when the
      cache is already filled up to it (the cache's own index is then per row too).
    max_decode_steps: optional int or [batch] array: generate at most this many tokens after
      the prompt (prompt = the non-zero tokens of inputs[:, 1:]); never more than `length`.
    cache_offset: the cache's batch axis (1 for `nn.scan`-ned layers).
    rescale_log_probs: True (t5x's default) scores tokens under the distribution actually
      sampled from (so greedy scores 0); False under the model's plain softmax.

  Returns:
    sequences [batch, num_decodes, length] int32 (the start token dropped, 0 after EOS), and
    log_probs [batch, num_decodes] float32 (sum over generated tokens up to and including
    EOS), both sorted by increasing log-probability: the most likely decode is last.

  Raises:
    ValueError: on a non-positive `num_decodes`, a negative `temperature`, negative `topk`,
      `topp` outside [0, 1], both `topk` and `topp`, a `max_decode_steps` that is negative or
      longer than `length`, malformed inputs, or cache arrays whose batch axis is not batch.
  """
  inputs = jnp.asarray(inputs)
  check_inputs(inputs)
  check_positive_int("num_decodes", num_decodes)
  if isinstance(topk, bool) or not isinstance(topk, int | np.integer) or topk < 0:
    raise ValueError(f"topk must be a non-negative int (0 = off), got {topk!r}")
  if _is_concrete(topp) and not 0.0 <= float(topp) <= 1.0:
    raise ValueError(f"topp must be in [0, 1] (0 = off), got {topp!r}")
  if topk and (not _is_concrete(topp) or topp):
    raise ValueError(f"at most one of topk ({topk}) and topp ({topp}) may be non-zero")
  batch_size, length = inputs.shape

  if isinstance(temperature, int | float | np.floating) and not isinstance(temperature, bool):
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    temperature = float(temperature)
  else:
    temperature = jnp.asarray(temperature, jnp.float32)
    if _is_concrete(temperature) and bool(jnp.any(temperature < 0)):
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature.ndim == 0:
      temperature = jnp.full((batch_size,), temperature)
    if temperature.shape != (batch_size,):
      raise ValueError(
          f"temperature must be a scalar or [batch={batch_size}], got shape {temperature.shape}"
      )
    temperature = expand_for_decodes(temperature, num_decodes)

  if max_decode_steps is not None and _is_concrete(max_decode_steps):
    steps = np.asarray(max_decode_steps)
    if np.any(steps < 0) or np.any(steps > length):
      raise ValueError(
          f"max_decode_steps must be in [0, length={length}] (inputs.shape[1]), "
          f"got {max_decode_steps}"
      )

  check_cache_batch(cache, batch_size, cache_offset)
  if decode_rng is None:
    decode_rng = jax.random.PRNGKey(0)

  rows = batch_size * num_decodes
  flat_inputs = expand_for_decodes(inputs.astype(jnp.int32), num_decodes)
  flat_cache = expand_for_decodes(cache, num_decodes, batch_axis=cache_offset)

  # Row r may write positions cur_index + 1 .. last_position[r].
  num_prompt_tokens = jnp.sum(flat_inputs[:, 1:] != 0, axis=1).astype(jnp.int32)
  if max_decode_steps is None:
    last_position = jnp.full((rows,), length, jnp.int32)
  else:
    steps = jnp.broadcast_to(jnp.asarray(max_decode_steps, jnp.int32), (batch_size,))
    last_position = jnp.minimum(
        num_prompt_tokens + expand_for_decodes(steps, num_decodes), length
    )
  if initial_index is None:
    index0 = jnp.zeros((rows,), jnp.int32)
  else:
    initial_index = jnp.asarray(initial_index, jnp.int32)
    if initial_index.shape != (batch_size,):
      raise ValueError(
          f"initial_index must be [batch={batch_size}], got shape {initial_index.shape}"
      )
    index0 = expand_for_decodes(initial_index, num_decodes)

  # Positions 0..length, plus one spill column: with `initial_index`, a row that has ended
  # keeps stepping (shapes are static) and writes its pads there once past `length`.
  width = length + 2
  sequences0 = jnp.pad(flat_inputs, ((0, 0), (0, width - length)))
  token0 = jnp.sum(jnp.where(_positions_mask(index0, width), sequences0, 0), axis=1)
  init_state = _SamplingState(
      cur_index=index0,
      sequences=sequences0,
      cache=flat_cache,
      cur_token=token0[:, None],
      ended=index0 >= last_position,
      rng=decode_rng,
      log_prob=jnp.zeros((rows,), jnp.float32),
  )

  def not_all_ended(state: _SamplingState):
    return ~jnp.all(state.ended)

  def step(state: _SamplingState) -> _SamplingState:
    rng, step_rng = jax.random.split(state.rng)
    logits, new_cache = tokens_to_logits(
        DecodingState(
            cur_index=state.cur_index,
            sequences=state.sequences[:, :length],
            cur_token=state.cur_token,
            cache=state.cache,
        )
    )
    logits = check_logits(logits, rows, eos_id)
    chosen, chosen_log_prob = _choose_tokens(
        logits,
        step_rng,
        temperature=temperature,
        topk=int(topk),
        topp=topp,
        rescale_log_probs=rescale_log_probs,
    )

    write_position = jnp.minimum(state.cur_index + 1, length + 1)
    write_mask = _positions_mask(write_position, width)
    prompt_token = jnp.sum(jnp.where(write_mask, state.sequences, 0), axis=1)
    in_prompt = prompt_token != 0
    token = jnp.where(in_prompt, prompt_token, chosen)
    token = jnp.where(state.ended, 0, token)
    scored = ~in_prompt & ~state.ended
    generated_eos = scored & (token == eos_id)
    return _SamplingState(
        cur_index=jnp.minimum(state.cur_index + 1, length),
        sequences=jnp.where(write_mask, token[:, None], state.sequences),
        cache=new_cache,
        cur_token=token[:, None],
        ended=state.ended | generated_eos | (write_position >= last_position),
        rng=rng,
        log_prob=state.log_prob + jnp.where(scored, chosen_log_prob, 0.0),
    )

  final = jax.lax.while_loop(not_all_ended, step, init_state)

  sequences = final.sequences[:, 1 : length + 1].reshape(batch_size, num_decodes, length)
  log_probs = final.log_prob.reshape(batch_size, num_decodes)
  order = jnp.argsort(log_probs, axis=1)
  return (
      jnp.take_along_axis(sequences, order[:, :, None], axis=1),
      jnp.take_along_axis(log_probs, order, axis=1),
  )
