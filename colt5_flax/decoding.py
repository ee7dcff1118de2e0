"""Autoregressive decoding over a KV cache: temperature sampling (greedy at 0) and beam search.

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
# Input checks and the batch expansion shared by both decoders.
# ---------------------------------------------------------------------------------------------


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_inputs(inputs) -> None:
  if inputs.ndim != 2:
    raise ValueError(f"inputs must be [batch, length], got shape {inputs.shape}")
  if not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError(f"inputs must hold integer token ids, got dtype {inputs.dtype}")
  if inputs.shape[1] < 1:
    raise ValueError(f"inputs need at least the start-token position, got shape {inputs.shape}")


def _check_cache_batch(cache: PyTree, batch_size: int, batch_axis: int) -> None:
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
  _check_positive_int("num_decodes", num_decodes)

  def expand(leaf):
    leaf = jnp.asarray(leaf)
    if leaf.ndim <= batch_axis:
      return leaf
    return jnp.repeat(leaf, num_decodes, axis=batch_axis)

  return jax.tree_util.tree_map(expand, tree)


def _check_logits(logits, rows: int, eos_id: int):
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
  _check_inputs(inputs)
  _check_positive_int("num_decodes", num_decodes)
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

  _check_cache_batch(cache, batch_size, cache_offset)
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
    logits = _check_logits(logits, rows, eos_id)
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


# ---------------------------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------------------------


def brevity_penalty(alpha: float, length):
  """GNMT's length normalisation ((5 + length) / 6) ** alpha (Wu et al. 2016, §7), as in t5x.

  A finished hypothesis scores log_prob / brevity_penalty(alpha, length); alpha = 0 scores by
  plain log-probability, larger alpha favours longer outputs.
  """
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def _gather_beams(tree: PyTree, beam_indices):
  """Per example, picks beams: [batch, old_beams, ...] -> [batch, new_beams, ...].

  beam_indices: [batch, new_beams] int32 into old_beams.
  """
  return jax.tree_util.tree_map(
      lambda x: jax.vmap(lambda per_example, idx: per_example[idx])(x, beam_indices), tree
  )


def _gather_cache_beams(cache: PyTree, beam_indices, batch_axis: int) -> PyTree:
  """Reorders a flat cache (batch * beams on `batch_axis`) by parent beam; scalars are kept."""
  batch_size, num_beams = beam_indices.shape

  def gather(leaf):
    if leaf.ndim <= batch_axis:
      return leaf
    moved = jnp.moveaxis(leaf, batch_axis, 0)
    per_beam = moved.reshape(batch_size, num_beams, *moved.shape[1:])
    gathered = _gather_beams(per_beam, beam_indices).reshape(moved.shape)
    return jnp.moveaxis(gathered, 0, batch_axis)

  return jax.tree_util.tree_map(gather, cache)


@flax.struct.dataclass
class _BeamState:
  cur_index: jax.Array  # scalar int32: position of the token fed this step
  live_seqs: jax.Array  # [batch, beams, max_decode_len + 1] int32
  live_log_probs: jax.Array  # [batch, beams] float32
  finished_seqs: jax.Array  # [batch, beams, max_decode_len + 1] int32
  finished_scores: jax.Array  # [batch, beams] float32, sorted decreasing
  finished_flags: jax.Array  # [batch, beams] bool: slot holds a real hypothesis
  cache: PyTree  # arrays [batch * beams, ...] on the batch axis


def beam_search(
    inputs,
    cache: PyTree,
    tokens_to_logits: TokensToLogits,
    *,
    eos_id: int,
    num_decodes: int = 4,
    alpha: float = 0.6,
    max_decode_len: int | None = None,
    decode_rng=None,
    cache_offset: int = 0,
):
  """Beam search with GNMT length normalisation, keeping `num_decodes` beams per example.

  Each step extends every live beam by every token and keeps the 2 * beams best extensions, so
  that even if `beams` of them end in EOS, `beams` live ones remain. Extensions ending in EOS
  (or reaching `max_decode_len`, counted as complete with their truncated length) move to a
  finished set scored log_prob / brevity_penalty(alpha, length), where length counts the tokens
  after the start token, prompt and EOS included; their log-probability stops accumulating.
  Prompt tokens are forced and not scored. The search stops at `max_decode_len`, or once each
  example has `beams` finished hypotheses and no live beam can still beat the worst of them
  (its log-probability can only fall; the largest penalty it could still get bounds its score).

  Args:
    inputs: [batch, length] int32 decoder prompt, position 0 the start token, 0 = to generate.
    cache: pytree of the decoder's cache, arrays [batch, ...] on axis `cache_offset`
      (repeated per beam); scalars (a shared `cache_index`) are kept.
    tokens_to_logits: (DecodingState) -> (logits [batch * beams, vocab], new cache). The
      vocabulary must hold at least 2 tokens.
    eos_id: end-of-sequence token id.
    num_decodes: number of beams (and of returned hypotheses), >= 1.
    alpha: length-penalty exponent; 0.6 is t5x's default, 0 ranks by log-probability.
    max_decode_len: tokens to decode after the start token; None = length. Must be >= length.
    decode_rng: unused (beam search is deterministic); accepted for t5x's calling convention.
    cache_offset: the cache's batch axis (1 for `nn.scan`-ned layers).

  Returns:
    sequences [batch, beams, max_decode_len] int32 (start token dropped, 0 after EOS) and
    scores [batch, beams] float32 (length-normalised log-probabilities), sorted in increasing
    order of score: the best hypothesis is last, `sequences[:, -1]`. A slot that holds no
    hypothesis (only when fewer than `beams` sequences exist) scores NEG_INF or below.

  Raises:
    ValueError: on a non-positive `num_decodes` or `max_decode_len`, a prompt (`inputs`)
      longer than `max_decode_len`, malformed inputs, or cache arrays whose batch axis is not
      batch.
  """
  del decode_rng
  inputs = jnp.asarray(inputs)
  _check_inputs(inputs)
  _check_positive_int("num_decodes", num_decodes)
  batch_size, length = inputs.shape
  if max_decode_len is None:
    max_decode_len = length
  _check_positive_int("max_decode_len", max_decode_len)
  if length > max_decode_len:
    raise ValueError(
        f"the decoder prompt (inputs) has length {length}, longer than max_decode_len "
        f"{max_decode_len}"
    )
  _check_cache_batch(cache, batch_size, cache_offset)
  num_beams = num_decodes
  rows = batch_size * num_beams
  width = max_decode_len + 1  # the start token, then max_decode_len tokens
  padded_inputs = jnp.pad(inputs.astype(jnp.int32), ((0, 0), (0, width - length)))

  start_seqs = jnp.zeros((batch_size, num_beams, width), jnp.int32)
  start_seqs = start_seqs.at[:, :, 0].set(padded_inputs[:, :1])
  # All beams start identical; only the first is live, or the first step would pick the same
  # extension once per beam.
  start_log_probs = jnp.where(jnp.arange(num_beams) == 0, 0.0, NEG_INF)
  init_state = _BeamState(
      cur_index=jnp.array(0, jnp.int32),
      live_seqs=start_seqs,
      live_log_probs=jnp.broadcast_to(start_log_probs, (batch_size, num_beams)),
      finished_seqs=start_seqs,
      finished_scores=jnp.full((batch_size, num_beams), NEG_INF, jnp.float32),
      finished_flags=jnp.zeros((batch_size, num_beams), bool),
      cache=expand_for_decodes(cache, num_beams, batch_axis=cache_offset),
  )

  def search_continues(state: _BeamState):
    # Lengths still open to a live beam: cur_index + 1 .. max_decode_len. The penalty is
    # monotonic in length, so its largest value is at one end.
    largest_penalty = jnp.maximum(
        brevity_penalty(alpha, state.cur_index + 1), brevity_penalty(alpha, max_decode_len)
    )
    best_live_bound = jnp.max(state.live_log_probs, axis=1) / largest_penalty
    worst_finished = jnp.min(state.finished_scores, axis=1)
    example_done = jnp.all(state.finished_flags, axis=1) & (best_live_bound <= worst_finished)
    return (state.cur_index < max_decode_len) & ~jnp.all(example_done)

  def step(state: _BeamState) -> _BeamState:
    position = state.cur_index + 1  # the position written this step
    flat_seqs = state.live_seqs.reshape(rows, width)
    logits, new_cache = tokens_to_logits(
        DecodingState(
            cur_index=state.cur_index,
            sequences=flat_seqs[:, :max_decode_len],
            cur_token=jax.lax.dynamic_slice_in_dim(flat_seqs, state.cur_index, 1, axis=1),
            cache=state.cache,
        )
    )
    logits = _check_logits(logits, rows, eos_id)
    vocab_size = logits.shape[1]
    if vocab_size < 2:
      raise ValueError(f"beam search needs a vocabulary of at least 2 tokens, got {vocab_size}")
    log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch_size, num_beams, vocab_size)

    prompt_token = jax.lax.dynamic_index_in_dim(padded_inputs, position, axis=1, keepdims=False)
    in_prompt = (prompt_token != 0)[:, None, None]
    is_prompt_token = jnp.arange(vocab_size)[None, None, :] == prompt_token[:, None, None]
    prompt_log_probs = jnp.where(is_prompt_token, 0.0, NEG_INF)
    extension_log_probs = state.live_log_probs[:, :, None] + jnp.where(
        in_prompt, prompt_log_probs, log_probs
    )

    # [batch, 2 * beams] best extensions over all (beam, token) pairs.
    num_candidates = 2 * num_beams
    candidate_log_probs, flat_index = jax.lax.top_k(
        extension_log_probs.reshape(batch_size, num_beams * vocab_size), num_candidates
    )
    parent_beam = flat_index // vocab_size
    candidate_token = (flat_index % vocab_size).astype(jnp.int32)
    candidate_seqs = _gather_beams(state.live_seqs, parent_beam)
    candidate_seqs = jnp.where(
        (jnp.arange(width) == position)[None, None, :], candidate_token[:, :, None], candidate_seqs
    )
    ends_with_eos = (candidate_token == eos_id) & ~in_prompt[:, :, 0]
    # Extensions of beams that were never live (or of impossible tokens) are not hypotheses.
    is_real = candidate_log_probs > 0.5 * NEG_INF
    completes = is_real & (ends_with_eos | (position == max_decode_len))

    # Live set: the best `beams` candidates that have not ended.
    live_candidate_log_probs = jnp.where(ends_with_eos, NEG_INF, candidate_log_probs)
    live_log_probs, live_pick = jax.lax.top_k(live_candidate_log_probs, num_beams)
    live_seqs = _gather_beams(candidate_seqs, live_pick)
    live_parent = _gather_beams(parent_beam, live_pick)

    # Finished set: the best `beams` of the old finished and the newly completed hypotheses.
    candidate_scores = jnp.where(
        completes, candidate_log_probs / brevity_penalty(alpha, position), NEG_INF
    )
    pooled_scores = jnp.concatenate([state.finished_scores, candidate_scores], axis=1)
    finished_scores, finished_pick = jax.lax.top_k(pooled_scores, num_beams)
    finished_seqs, finished_flags = _gather_beams(
        (
            jnp.concatenate([state.finished_seqs, candidate_seqs], axis=1),
            jnp.concatenate([state.finished_flags, completes], axis=1),
        ),
        finished_pick,
    )

    return _BeamState(
        cur_index=position,
        live_seqs=live_seqs,
        live_log_probs=live_log_probs,
        finished_seqs=finished_seqs,
        finished_scores=finished_scores,
        finished_flags=finished_flags,
        cache=_gather_cache_beams(new_cache, live_parent, cache_offset),
    )

  final = jax.lax.while_loop(search_continues, step, init_state)
  # top_k keeps the finished set in decreasing order; t5x returns increasing (best last).
  sequences = jnp.flip(final.finished_seqs, axis=1)[:, :, 1:]
  scores = jnp.flip(final.finished_scores, axis=1)
  return sequences, scores
