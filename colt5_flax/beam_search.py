"""Beam search over a KV cache, with GNMT length normalisation, as t5x decodes.

It shares `decoding.py`'s calling convention (`DecodingState`, `tokens_to_logits`, the
prompt and cache layout, `expand_for_decodes`) and its argument checks; see that module's
docstring for the conventions both decoders follow.
"""

import flax
import jax
import jax.numpy as jnp

from colt5_flax.decoding import (
    NEG_INF,
    DecodingState,
    PyTree,
    TokensToLogits,
    check_cache_batch,
    check_inputs,
    check_logits,
    check_positive_int,
    expand_for_decodes,
)


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
  check_inputs(inputs)
  check_positive_int("num_decodes", num_decodes)
  batch_size, length = inputs.shape
  if max_decode_len is None:
    max_decode_len = length
  check_positive_int("max_decode_len", max_decode_len)
  if length > max_decode_len:
    raise ValueError(
        f"the decoder prompt (inputs) has length {length}, longer than max_decode_len "
        f"{max_decode_len}"
    )
  check_cache_batch(cache, batch_size, cache_offset)
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
    logits = check_logits(logits, rows, eos_id)
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
