"""Decoding (decoding.py, beam_search.py) against brute force over a toy Markov chain.

The toy "decoder" is a second-order, position-dependent Markov chain: the logits for the next
token are table[position, previous token, current token] + row_bias[example]. Position comes
from a scalar `cache_index`, the previous token from a per-row cache array, and row_bias from
another per-row cache array that stands in for the encoded inputs. So decoding is correct only
if the cache is expanded per decode (repeat, not tile), reordered with the beams, and its
scalar kept shared; and every sequence's exact probability is a short product that numpy
computes independently, by walking the chain or by enumerating every sequence.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax import beam_search, decoding
from tests import tolerances

PAD, EOS = 0, 1
FORBIDDEN = -1e9  # logit of the pad token: like a real model, the chain never generates it
NUM_LAYERS = 2  # for the nn.scan-style cache layout (cache_offset=1)


class MarkovChain:
  """Toy `tokens_to_logits` with its numpy twin.

  Args:
    table: [max_len, vocab, vocab, vocab] logits of the next token given (position, previous
      token, current token).
    row_bias: [batch, vocab] logits added per example.
  """

  def __init__(self, table, row_bias):
    # The jax side computes in float32; the numpy side in float64 from the same float32 values.
    self.table = np.asarray(table, np.float32)
    self.row_bias = np.asarray(row_bias, np.float32)
    self.vocab_size = self.table.shape[-1]
    self.calls = []

  # --- the jax side -------------------------------------------------------------------------
  def cache(self, cache_offset=0):
    batch_size = self.row_bias.shape[0]
    decoder = {
        "cache_index": jnp.array(0, jnp.int32),
        "prev_token": jnp.zeros((batch_size,), jnp.int32),
        "row_bias": jnp.asarray(self.row_bias),
    }
    if cache_offset == 1:  # [layers, batch, ...] as nn.scan lays it out; index per layer
      decoder = {
          "cache_index": jnp.zeros((NUM_LAYERS,), jnp.int32),
          "prev_token": jnp.stack([decoder["prev_token"]] * NUM_LAYERS),
          "row_bias": jnp.stack([decoder["row_bias"]] * NUM_LAYERS),
      }
    return {"decoder": decoder}

  def tokens_to_logits(self, state: decoding.DecodingState):
    jax.debug.callback(lambda: self.calls.append(1))
    decoder = state.cache["decoder"]
    layered = decoder["prev_token"].ndim == 2
    position = decoder["cache_index"][0] if layered else decoder["cache_index"]
    prev_token = decoder["prev_token"][-1] if layered else decoder["prev_token"]
    row_bias = decoder["row_bias"][-1] if layered else decoder["row_bias"]
    cur_token = state.cur_token[:, 0]
    logits = jnp.asarray(self.table)[position, prev_token, cur_token] + row_bias
    new_prev = jnp.broadcast_to(cur_token, decoder["prev_token"].shape)
    new_cache = {
        "decoder": {
            "cache_index": decoder["cache_index"] + 1,
            "prev_token": new_prev,
            "row_bias": decoder["row_bias"],
        }
    }
    return logits, new_cache

  def count_calls(self, fn):
    """Runs fn() and returns (its result, how many times tokens_to_logits ran)."""
    self.calls.clear()
    result = jax.block_until_ready(fn())
    jax.effects_barrier()
    return result, len(self.calls)

  # --- the numpy side -----------------------------------------------------------------------
  def log_probs(self, example, position, prev_token, cur_token):
    logits = self.table[position, prev_token, cur_token].astype(np.float64)
    logits = logits + self.row_bias[example]
    return logits - np.logaddexp.reduce(logits)


def assert_log_probs_close(chain, got, expected, *, length=None):
  """float32 sums of per-token log-probs against numpy's float64 ones (tests/tolerances.py).

  Each token's log-prob is a log-softmax over the vocabulary (max, sum of exps, log,
  subtract: depth 3) of logits up to max|logit|, which sets the size of its error even when
  the log-prob itself is near 0; `length` (the array's, by default) tokens add up.
  """
  length = SAMPLE_LENGTH if length is None else length
  real = chain.table[chain.table > FORBIDDEN / 2]
  max_logit = np.abs(real).max() + np.abs(chain.row_bias).max()
  tolerances.assert_close(
      got, expected, num_terms=max(chain.vocab_size, length), depth=3,
      scale=length * max_logit,
  )


def random_chain(seed, vocab_size, max_len, batch_size, *, logit_scale=1.0, eos_bias=0.0):
  """A random chain; larger logit_scale = more peaked, eos_bias > 0 = shorter sequences."""
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(max_len, vocab_size, vocab_size, vocab_size)) * logit_scale
  table[..., PAD] = FORBIDDEN
  row_bias = rng.normal(size=(batch_size, vocab_size))
  row_bias[:, EOS] += eos_bias
  row_bias[:, PAD] = 0.0
  return MarkovChain(table, row_bias)


def np_greedy(chain, example, prompt, *, max_decode_steps=None):
  """Step-by-step argmax. Returns (tokens [length], log_prob, decoder calls, smallest gap).

  The gap is the smallest margin between the best and second-best log-prob along the path, so
  a test can check that low-temperature sampling has no near-tie to stumble on.
  """
  length = len(prompt)
  num_prompt_tokens = int(np.count_nonzero(prompt[1:]))
  last_position = length
  if max_decode_steps is not None:
    last_position = min(num_prompt_tokens + max_decode_steps, length)
  tokens = np.zeros(length, np.int64)
  log_prob, gaps = 0.0, [np.inf]
  prev_token, cur_token = PAD, int(prompt[0])
  position = 0
  for position in range(1, last_position + 1):
    log_probs = chain.log_probs(example, position - 1, prev_token, cur_token)
    forced = int(prompt[position]) if position < length else 0
    if forced:
      token = forced
    else:
      token = int(np.argmax(log_probs))
      log_prob += log_probs[token]
      second, first = np.sort(log_probs)[-2:]
      gaps.append(first - second)
    tokens[position - 1] = token
    if not forced and token == EOS:
      break
    prev_token, cur_token = cur_token, token
  return tokens, log_prob, position, min(gaps)


def np_filtered(log_probs, *, topk=0, topp=0.0):
  """Renormalised log-probs after a top-k or top-p (nucleus) cut, in float64."""
  keep = np.ones(log_probs.shape, bool)
  if topk:
    keep = log_probs >= np.sort(log_probs)[-topk]
  elif topp:
    order = np.argsort(-log_probs)
    probs = np.exp(log_probs[order])
    mass_before = np.cumsum(probs) - probs
    keep = np.zeros(log_probs.shape, bool)
    keep[order[mass_before < topp]] = True
  kept = np.where(keep, log_probs, -np.inf)
  return kept - np.logaddexp.reduce(kept)


def np_sequence_log_prob(chain, example, prompt, tokens, *, topk=0, topp=0.0):
  """Log-prob of a decoded sequence (prompt forced, unscored); -inf if a token was filtered.

  Returns (log_prob, the position of its last token). Raises if a prompt token was not kept.
  """
  length = len(prompt)
  log_prob = 0.0
  prev_token, cur_token = PAD, int(prompt[0])
  for position in range(1, len(tokens) + 1):
    token = int(tokens[position - 1])
    forced = int(prompt[position]) if position < length else 0
    if forced:
      assert token == forced, (position, token, forced)
    else:
      log_probs = chain.log_probs(example, position - 1, prev_token, cur_token)
      log_prob += np_filtered(log_probs, topk=topk, topp=topp)[token]
      if token == EOS:
        return log_prob, position
    prev_token, cur_token = cur_token, token
  return log_prob, len(tokens)


def np_beam_hypotheses(chain, example, prompt, *, max_len, alpha):
  """Every complete sequence and its score, best first, by enumeration.

  Complete: ends in a generated EOS at a position <= max_len, or reaches max_len. Score:
  log_prob / ((5 + length) / 6) ** alpha, length = position of the last token.
  """
  hypotheses = []

  def extend(position, prev_token, cur_token, tokens, log_prob):
    forced = int(prompt[position]) if position < len(prompt) else 0
    if forced:
      choices = [(forced, 0.0)]
    else:
      log_probs = chain.log_probs(example, position - 1, prev_token, cur_token)
      choices = [(token, log_probs[token]) for token in range(1, chain.vocab_size)]
    for token, token_log_prob in choices:
      new_tokens = tokens + [token]
      new_log_prob = log_prob + token_log_prob
      if (not forced and token == EOS) or position == max_len:
        padded = np.array(new_tokens + [PAD] * (max_len - position))
        hypotheses.append((padded, new_log_prob / ((5.0 + position) / 6.0) ** alpha))
      else:
        extend(position + 1, cur_token, token, new_tokens, new_log_prob)

  extend(1, PAD, int(prompt[0]), [], 0.0)
  return sorted(hypotheses, key=lambda hypothesis: -hypothesis[1])


def assert_pads_after_eos(sequences, prompts=None):
  """After the first generated EOS (prompt tokens excluded) every token is pad.

  sequences: [batch, decodes, length]; prompts: [batch, prompt_length] or None (no prompts).
  """
  sequences = np.asarray(sequences)
  for example, decodes in enumerate(sequences):
    prompt_length = 0 if prompts is None else np.count_nonzero(prompts[example][1:])
    for sequence in decodes:
      eos_positions = prompt_length + np.flatnonzero(sequence[prompt_length:] == EOS)
      if eos_positions.size:
        np.testing.assert_array_equal(sequence[eos_positions[0] + 1 :], 0)


# ---------------------------------------------------------------------------------------------
# Fixtures: chains and jitted decoders shared across tests (compilation is the cost).
# ---------------------------------------------------------------------------------------------

SAMPLE_LENGTH = 6
# Row 1 forces a two-token prompt; row 2 a one-token prompt.
SAMPLE_PROMPTS = np.array(
    [[0, 0, 0, 0, 0, 0], [0, 3, 4, 0, 0, 0], [0, 2, 0, 0, 0, 0]], np.int32
)


@pytest.fixture(scope="module")
def chain():
  # Peaked enough that greedy paths have clear margins and EOS shows up before the end.
  return random_chain(0, vocab_size=6, max_len=SAMPLE_LENGTH, batch_size=3, logit_scale=2.0)


@pytest.fixture(scope="module")
def sampler(chain):
  """Jitted temperature_sample over `chain` for a given static configuration."""
  compiled = {}

  def run(inputs, *, rng=None, cache_offset=0, temperature=1.0, **static):
    key = (cache_offset, tuple(sorted(static.items())), isinstance(temperature, float))
    if key not in compiled:

      def fn(inputs, cache, rng, temperature):
        return decoding.temperature_sample(
            inputs,
            cache,
            chain.tokens_to_logits,
            eos_id=EOS,
            decode_rng=rng,
            cache_offset=cache_offset,
            temperature=temperature,
            **static,
        )

      # A Python float temperature is part of the configuration; an array is traced.
      static_argnums = (3,) if isinstance(temperature, float) else ()
      compiled[key] = jax.jit(fn, static_argnums=static_argnums)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return chain.count_calls(
        lambda: compiled[key](jnp.asarray(inputs), chain.cache(cache_offset), rng, temperature)
    )

  return run


def np_greedy_batch(chain, prompts, **kwargs):
  results = [np_greedy(chain, example, prompt, **kwargs) for example, prompt in enumerate(prompts)]
  tokens, log_probs, calls, gaps = zip(*results, strict=True)
  return np.stack(tokens), np.array(log_probs), max(calls), min(gaps)


# ---------------------------------------------------------------------------------------------
# Greedy.
# ---------------------------------------------------------------------------------------------


def test_greedy_matches_numpy_argmax_loop(chain, sampler):
  expected, expected_log_probs, expected_calls, _ = np_greedy_batch(chain, SAMPLE_PROMPTS)
  (sequences, log_probs), calls = sampler(
      SAMPLE_PROMPTS, temperature=0.0, rescale_log_probs=False
  )
  assert sequences.shape == (3, 1, SAMPLE_LENGTH)
  np.testing.assert_array_equal(sequences[:, 0], expected)
  # Not rescaled: the model's own log-probability of the greedy sequence.
  assert_log_probs_close(chain, log_probs[:, 0], expected_log_probs)
  # The loop stops when the last row ends, not at the full length.
  assert calls == expected_calls
  # Rescaled (t5x's default): greedy is a point mass, every token scores 0.
  (sequences, log_probs), _ = sampler(SAMPLE_PROMPTS, temperature=0.0)
  np.testing.assert_array_equal(sequences[:, 0], expected)
  np.testing.assert_array_equal(log_probs, 0.0)


def test_eos_inside_the_prompt_does_not_end_decoding(chain, sampler):
  prompts = SAMPLE_PROMPTS.copy()
  prompts[2, 1:3] = [2, EOS]  # a prompt that itself ends in EOS: the decode goes on after it
  expected, expected_log_probs, _, _ = np_greedy_batch(chain, prompts)
  assert np.count_nonzero(expected[2, 2:]), "the test needs tokens after the prompt's EOS"
  (sequences, log_probs), _ = sampler(prompts, temperature=0.0, rescale_log_probs=False)
  np.testing.assert_array_equal(sequences[:, 0], expected)
  assert_log_probs_close(chain, log_probs[:, 0], expected_log_probs)


def test_decoding_stops_when_all_rows_end_with_eos(sampler):
  # A chain that says EOS soon: the loop must run exactly as long as the slowest row.
  eos_chain = random_chain(3, vocab_size=6, max_len=SAMPLE_LENGTH, batch_size=3, eos_bias=3.0)
  expected, _, expected_calls, _ = np_greedy_batch(eos_chain, SAMPLE_PROMPTS)
  assert expected_calls < SAMPLE_LENGTH, "the test chain should end early"
  (sequences, _), calls = eos_chain.count_calls(
      lambda: decoding.temperature_sample(
          SAMPLE_PROMPTS,
          eos_chain.cache(),
          eos_chain.tokens_to_logits,
          eos_id=EOS,
          temperature=0.0,
      )
  )
  np.testing.assert_array_equal(sequences[:, 0], expected)
  assert calls == expected_calls
  assert_pads_after_eos(sequences, SAMPLE_PROMPTS)


def test_max_decode_steps_is_respected(chain, sampler):
  expected, _, expected_calls, _ = np_greedy_batch(chain, SAMPLE_PROMPTS, max_decode_steps=2)
  (sequences, _), calls = sampler(SAMPLE_PROMPTS, temperature=0.0, max_decode_steps=2)
  np.testing.assert_array_equal(sequences[:, 0], expected)
  num_prompt_tokens = np.count_nonzero(SAMPLE_PROMPTS[:, 1:], axis=1)
  for row, limit in zip(np.asarray(sequences[:, 0]), num_prompt_tokens + 2, strict=True):
    np.testing.assert_array_equal(row[limit:], 0)
  assert calls == expected_calls <= 4


def test_greedy_expands_the_cache_per_decode(chain, sampler):
  """Each example's decodes see its own cache rows (repeat, not tile), both cache layouts."""
  expected, _, _, _ = np_greedy_batch(chain, SAMPLE_PROMPTS)
  for cache_offset in (0, 1):
    (sequences, _), _ = sampler(
        SAMPLE_PROMPTS, temperature=0.0, num_decodes=3, cache_offset=cache_offset
    )
    assert sequences.shape == (3, 3, SAMPLE_LENGTH)
    np.testing.assert_array_equal(sequences, np.repeat(expected[:, None], 3, axis=1))


def test_expand_for_decodes_repeats_batch_axis_and_keeps_scalars():
  tree = {
      "index": jnp.array(7),
      "layer": {"key": jnp.arange(6).reshape(2, 3), "bias": jnp.arange(4.0).reshape(2, 2)},
  }
  expanded = decoding.expand_for_decodes(tree, 3)
  assert expanded["index"].shape == ()
  np.testing.assert_array_equal(
      expanded["layer"]["key"], [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3
  )
  np.testing.assert_array_equal(expanded["layer"]["bias"], [[0, 1]] * 3 + [[2, 3]] * 3)
  # nn.scan layout: [layers, batch, ...]; the per-layer [layers] index has no batch axis.
  scanned = {"index": jnp.arange(2), "key": jnp.arange(6).reshape(2, 3)}
  expanded = decoding.expand_for_decodes(scanned, 2, batch_axis=1)
  np.testing.assert_array_equal(expanded["index"], [0, 1])
  np.testing.assert_array_equal(expanded["key"], [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5]])


# ---------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------


def test_low_temperature_and_top1_sampling_equal_greedy(chain, sampler):
  expected, _, _, smallest_gap = np_greedy_batch(chain, SAMPLE_PROMPTS)
  temperature = 1e-3  # above MIN_TEMPERATURE, so this goes through the sampler
  # A near-tie would let the sampler legitimately differ; at this gap that has odds < e^-20.
  assert smallest_gap / temperature > 20
  (sequences, _), _ = sampler(SAMPLE_PROMPTS, temperature=temperature, num_decodes=4)
  np.testing.assert_array_equal(sequences, np.repeat(expected[:, None], 4, axis=1))
  (sequences, log_probs), _ = sampler(SAMPLE_PROMPTS, temperature=1.0, topk=1, num_decodes=4)
  np.testing.assert_array_equal(sequences, np.repeat(expected[:, None], 4, axis=1))
  np.testing.assert_allclose(log_probs, 0.0, atol=1e-6)


def test_per_example_temperature_array(chain, sampler):
  """A traced [batch] temperature: row 0 greedy, the others sampled."""
  expected, _, _, _ = np_greedy_batch(chain, SAMPLE_PROMPTS)
  temperature = jnp.array([0.0, 1.0, 1.0])
  (sequences, log_probs), _ = sampler(
      SAMPLE_PROMPTS, temperature=temperature, num_decodes=8, rescale_log_probs=False
  )
  np.testing.assert_array_equal(sequences[0], np.repeat(expected[:1], 8, axis=0))
  for example in (1, 2):
    for tokens, log_prob in zip(sequences[example], log_probs[example], strict=True):
      expected_log_prob, _ = np_sequence_log_prob(chain, example, SAMPLE_PROMPTS[example], tokens)
      assert_log_probs_close(chain, log_prob, expected_log_prob)


@pytest.mark.parametrize(
    "filters", [{}, {"topk": 2}, {"topp": 0.7}], ids=["full", "topk2", "topp0.7"]
)
def test_sampling_matches_the_chain(chain, sampler, filters):
  """Temperature 1: exact per-sequence log-probs, and the first-token distribution.

  Each returned log-prob must equal numpy's log-prob of that sequence under the (filtered,
  renormalised) chain, which also proves that no filtered-out token was ever sampled; the
  frequencies of the first token must match the chain's probabilities within 5 sigma.
  """
  num_decodes = 1000
  first_token_log_probs = [chain.log_probs(example, 0, PAD, 0) for example in range(3)]
  if "topp" in filters:
    # float32 and float64 cut the nucleus identically unless topp sits on a cumulative sum.
    for log_probs in first_token_log_probs:
      cumulative = np.cumsum(np.sort(np.exp(log_probs))[::-1])
      assert np.min(np.abs(cumulative - filters["topp"])) > 1e-3
  (sequences, log_probs), _ = sampler(
      SAMPLE_PROMPTS, temperature=1.0, num_decodes=num_decodes, rng=jax.random.PRNGKey(1),
      **filters,
  )
  sequences, log_probs = np.asarray(sequences), np.asarray(log_probs)
  assert sequences.shape == (3, num_decodes, SAMPLE_LENGTH)
  assert np.all(np.diff(log_probs, axis=1) >= 0), "decodes must be sorted, most likely last"
  assert_pads_after_eos(sequences, SAMPLE_PROMPTS)

  for example in range(3):
    for tokens, log_prob in zip(sequences[example, ::25], log_probs[example, ::25], strict=True):
      expected, _ = np_sequence_log_prob(chain, example, SAMPLE_PROMPTS[example], tokens, **filters)
      assert_log_probs_close(chain, log_prob, expected)
    assert np.all(np.isfinite(log_probs[example]))

  # Row 0 has no prompt: its first token is a sample of position 1.
  probs = np.exp(np_filtered(first_token_log_probs[0], **filters))
  frequencies = np.bincount(sequences[0, :, 0], minlength=chain.vocab_size) / num_decodes
  tolerance = 5 * np.sqrt(probs * (1 - probs) / num_decodes) + 1e-3
  assert np.all(np.abs(frequencies - probs) <= tolerance), (frequencies, probs)
  if filters:
    assert np.count_nonzero(probs) < chain.vocab_size - 1, "the filter should cut something"


# ---------------------------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------------------------

# Row 2 forces a prompt that ends in EOS: it must not finish the hypothesis.
BEAM_PROMPTS = np.array([[0, 0, 0, 0], [0, 3, 0, 0], [0, 2, EOS, 0]], np.int32)
BEAM_MAX_LEN = 4
# Tokens 1 (EOS), 2, 3 can be generated: at most 2**3 live prefixes and 3 * 2**3 = 24
# extensions per step, so 12 beams (24 candidates) keep every prefix alive and beam search is
# exhaustive; its top 12 must be exactly the brute-force top 12.
EXHAUSTIVE_BEAMS = 12


@pytest.fixture(scope="module")
def beam_chain():
  return random_chain(1, vocab_size=4, max_len=BEAM_MAX_LEN, batch_size=3)


@pytest.mark.parametrize("cache_offset", [0, 1])
def test_exhaustive_beam_search_equals_brute_force(beam_chain, cache_offset):
  alpha = 0.6
  search = jax.jit(
      functools.partial(
          beam_search.beam_search,
          tokens_to_logits=beam_chain.tokens_to_logits,
          eos_id=EOS,
          num_decodes=EXHAUSTIVE_BEAMS,
          alpha=alpha,
          cache_offset=cache_offset,
      )
  )
  sequences, scores = search(jnp.asarray(BEAM_PROMPTS), beam_chain.cache(cache_offset))
  assert sequences.shape == (3, EXHAUSTIVE_BEAMS, BEAM_MAX_LEN)
  for example, prompt in enumerate(BEAM_PROMPTS):
    hypotheses = np_beam_hypotheses(
        beam_chain, example, prompt, max_len=BEAM_MAX_LEN, alpha=alpha
    )[:EXHAUSTIVE_BEAMS]
    found = len(hypotheses)  # row 2's long prompt leaves fewer sequences than beams
    expected_sequences = np.stack([tokens for tokens, _ in hypotheses])[::-1]  # best last
    expected_scores = np.array([score for _, score in hypotheses])[::-1]
    np.testing.assert_array_equal(sequences[example, -found:], expected_sequences)
    assert_log_probs_close(
        beam_chain, scores[example, -found:], expected_scores, length=BEAM_MAX_LEN
    )
    # Slots no sequence could fill come first and say so with a NEG_INF score.
    assert np.all(scores[example, :-found] <= decoding.NEG_INF)
  assert found < EXHAUSTIVE_BEAMS
  assert_pads_after_eos(sequences, BEAM_PROMPTS)


def test_one_beam_without_length_penalty_equals_greedy():
  """With one beam and alpha=0, beam search returns greedy's sequence and log-prob.

  Not a theorem: beam search also keeps the EOS extensions greedy passed by, and returns one if
  it beats greedy's final log-prob. The check below makes sure none does here, so the two must
  agree.
  """
  # Rows 0 and 2 end with EOS, row 1 runs to the full length.
  peaked = random_chain(4, vocab_size=6, max_len=SAMPLE_LENGTH, batch_size=3, logit_scale=4.0)
  expected, expected_log_probs, _, _ = np_greedy_batch(peaked, SAMPLE_PROMPTS)
  assert list((expected == EOS).any(axis=1)) == [True, False, True]
  for example, prompt in enumerate(SAMPLE_PROMPTS):
    prev_token, cur_token, log_prob = PAD, int(prompt[0]), 0.0
    for position, token in enumerate(expected[example], start=1):
      if token == PAD:
        break
      log_probs = peaked.log_probs(example, position - 1, prev_token, cur_token)
      forced = position < len(prompt) and prompt[position] != 0
      if not forced and token != EOS:
        assert log_prob + log_probs[EOS] < expected_log_probs[example]
      log_prob += 0.0 if forced else log_probs[token]
      prev_token, cur_token = cur_token, int(token)
  sequences, scores = beam_search.beam_search(
      SAMPLE_PROMPTS, peaked.cache(), peaked.tokens_to_logits, eos_id=EOS, num_decodes=1, alpha=0.0
  )
  np.testing.assert_array_equal(sequences[:, 0], expected)
  assert_log_probs_close(peaked, scores[:, 0], expected_log_probs)


def test_beam_search_terminates_early_and_pads_after_eos():
  """EOS-heavy chain: the search stops once no live beam can catch up, well before the end."""
  max_len = 8
  eos_chain = random_chain(4, vocab_size=5, max_len=max_len, batch_size=2, eos_bias=4.0)
  prompts = np.zeros((2, max_len), np.int32)
  alpha = 0.6
  (sequences, scores), calls = eos_chain.count_calls(
      lambda: beam_search.beam_search(
          prompts, eos_chain.cache(), eos_chain.tokens_to_logits,
          eos_id=EOS, num_decodes=2, alpha=alpha,
      )
  )
  assert calls < max_len
  assert_pads_after_eos(sequences)
  for example in range(2):
    best_tokens, best_score = np_beam_hypotheses(
        eos_chain, example, prompts[example], max_len=max_len, alpha=alpha
    )[0]
    np.testing.assert_array_equal(sequences[example, -1], best_tokens)
    assert_log_probs_close(eos_chain, scores[example, -1], best_score, length=max_len)
    # Every returned score is its own sequence's length-normalised log-prob.
    for tokens, score in zip(sequences[example], scores[example], strict=True):
      log_prob, length = np_sequence_log_prob(eos_chain, example, prompts[example], tokens)
      assert_log_probs_close(
          eos_chain, score, log_prob / ((5.0 + length) / 6.0) ** alpha, length=max_len
      )


def test_beam_search_keeps_a_live_beam_the_length_penalty_can_still_lift():
  """Early termination must not fire while a live beam could still win.

  From the start token EOS is likeliest (log-prob -0.54), token 2 next (-0.94); after a 2 the
  chain repeats 2 almost surely. With alpha = 2 the full-length run of 2s scores
  -0.96 / ((5 + 6) / 6)**2 = -0.29 and beats the early EOS (-0.54 / 1), so one beam must
  carry the 2s to the end even though the EOS hypothesis is finished first.
  """
  max_len, vocab_size = 6, 4
  table = np.zeros((max_len, vocab_size, vocab_size, vocab_size))
  table[0, PAD, PAD] = [FORBIDDEN, 0.0, -0.4, -3.0]
  table[1:, :, 2] = [FORBIDDEN, -6.0, 0.0, -6.0]
  table[..., PAD] = FORBIDDEN
  lifted = MarkovChain(table, np.zeros((1, vocab_size)))
  prompts = np.zeros((1, max_len), np.int32)
  best_tokens, best_score = np_beam_hypotheses(
      lifted, 0, prompts[0], max_len=max_len, alpha=2.0
  )[0]
  np.testing.assert_array_equal(best_tokens, [2] * max_len)
  (sequences, scores), calls = lifted.count_calls(
      lambda: beam_search.beam_search(
          prompts, lifted.cache(), lifted.tokens_to_logits, eos_id=EOS, num_decodes=1, alpha=2.0
      )
  )
  np.testing.assert_array_equal(sequences[0, -1], best_tokens)
  assert_log_probs_close(lifted, scores[0, -1], best_score, length=max_len)
  assert calls == max_len


def test_beam_search_decodes_up_to_max_decode_len():
  """max_decode_len longer than the prompt array: output has that length, brute force agrees."""
  max_len = 5
  long_chain = random_chain(5, vocab_size=4, max_len=max_len, batch_size=3)
  sequences, scores = beam_search.beam_search(
      BEAM_PROMPTS, long_chain.cache(), long_chain.tokens_to_logits,
      eos_id=EOS, num_decodes=2 * EXHAUSTIVE_BEAMS, alpha=0.6, max_decode_len=max_len,
  )
  assert sequences.shape == (3, 2 * EXHAUSTIVE_BEAMS, max_len)
  for example, prompt in enumerate(BEAM_PROMPTS):
    best_tokens, best_score = np_beam_hypotheses(
        long_chain, example, prompt, max_len=max_len, alpha=0.6
    )[0]
    np.testing.assert_array_equal(sequences[example, -1], best_tokens)
    assert_log_probs_close(long_chain, scores[example, -1], best_score, length=max_len)


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises_value_error_naming_the_value(chain):
  cache = chain.cache()
  sample = functools.partial(
      decoding.temperature_sample, SAMPLE_PROMPTS, cache, chain.tokens_to_logits, eos_id=EOS
  )
  search = functools.partial(
      beam_search.beam_search, SAMPLE_PROMPTS, cache, chain.tokens_to_logits, eos_id=EOS
  )
  with pytest.raises(ValueError, match="num_decodes.*0"):
    sample(num_decodes=0)
  with pytest.raises(ValueError, match="num_decodes.*-2"):
    search(num_decodes=-2)
  with pytest.raises(ValueError, match="num_decodes.*0"):
    decoding.expand_for_decodes(cache, 0)
  with pytest.raises(ValueError, match="temperature.*-0.5"):
    sample(temperature=-0.5)
  with pytest.raises(ValueError, match="temperature"):
    sample(temperature=jnp.array([1.0, -1.0, 0.0]))
  with pytest.raises(ValueError, match="topk.*-1"):
    sample(topk=-1)
  with pytest.raises(ValueError, match="topp.*1.5"):
    sample(topp=1.5)
  with pytest.raises(ValueError, match="at most one of topk"):
    sample(topk=2, topp=0.5)
  with pytest.raises(ValueError, match="max_decode_steps.*7"):
    sample(max_decode_steps=SAMPLE_LENGTH + 1)
  with pytest.raises(ValueError, match="length 6.*max_decode_len 4"):
    search(max_decode_len=4)
  with pytest.raises(ValueError, match="inputs must be"):
    decoding.temperature_sample(
        SAMPLE_PROMPTS[0], cache, chain.tokens_to_logits, eos_id=EOS
    )
  with pytest.raises(ValueError, match=r"\['decoder'\]\['row_bias'\].*batch size 3"):
    bad_cache = {"decoder": {**cache["decoder"], "row_bias": jnp.zeros((1, 6))}}
    decoding.temperature_sample(SAMPLE_PROMPTS, bad_cache, chain.tokens_to_logits, eos_id=EOS)
  with pytest.raises(ValueError, match="eos_id 9"):
    decoding.temperature_sample(SAMPLE_PROMPTS, cache, chain.tokens_to_logits, eos_id=9)
