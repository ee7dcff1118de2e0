"""The encoder-decoder network against independent computations of the same thing.

- Cached one-token-at-a-time decoding against teacher-forced decoding (a different path:
  full-length causal masks instead of the cache), for multi-head and multi-query self-
  and cross-attention.
- A packed batch (seqio `EncDecFeatureConverter(pack=True)` layout) against the same
  examples run one per row.
- `nn.scan` / `nn.remat` stacks against the plain Python loop of layers, values and
  gradients, with the plain parameters stacked by hand onto the leading `layers` axis.
- Bad input raising ValueErrors that name the feature.

Every network is built from its model file (configs/models/<kind>_tiny.gin) with the
tests' smaller sizes bound on top, as `model_files` builds them for every other caller.

Logits of the full network against transformers' T5 / LongT5 are in
tests/convert/test_hf.py.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax import model_files
from tests import tolerances

VOCAB, EMBED, HEADS, HEAD_DIM, MLP = 37, 16, 4, 4, 24
# Few buckets and a short max distance: a 9-token target reaches the log buckets.
NUM_BUCKETS, MAX_DISTANCE = 8, 16
LOCAL_RADIUS, GLOBAL_BLOCK = 2, 4

# The encoder kinds here and their model files' names (configs/models/<name>_tiny.gin).
_KINDS = {"t5": "t5", "local": "longt5_local", "tglobal": "longt5_tglobal", "colt5": "colt5"}


def _network(
    kind="t5",
    *,
    self_kv_heads=None,
    cross_kv_heads=1,
    scan_layers=False,
    remat_policy="none",
    encoder_layers=2,
    decoder_layers=2,
    dtype="float32",
    tied=False,
):
  """The `EncoderDecoder` of configs/models/<kind>_tiny.gin at the tests' smaller sizes."""
  bindings = {
      "VOCAB_SIZE": VOCAB, "EMBED_DIM": EMBED, "NUM_HEADS": HEADS, "HEAD_DIM": HEAD_DIM,
      "MLP_DIM": MLP, "NUM_ENCODER_LAYERS": encoder_layers,
      "NUM_DECODER_LAYERS": decoder_layers, "NUM_CROSS_ATTENTION_KV_HEADS": cross_kv_heads,
      "SCAN_LAYERS": scan_layers, "REMAT_POLICY": remat_policy, "ACTIVATION_DTYPE": dtype,
      "network.Decoder.num_self_attention_kv_heads": self_kv_heads,
      "network.EncoderDecoder.logits_via_embedding": tied,
  }
  for stack in ("network.Encoder", "network.Decoder"):
    bindings[f"{stack}.num_buckets"] = NUM_BUCKETS
    bindings[f"{stack}.max_distance"] = MAX_DISTANCE
  if kind != "t5":
    bindings["LOCAL_RADIUS"] = LOCAL_RADIUS
  if kind == "tglobal":
    bindings["GLOBAL_BLOCK_SIZE"] = GLOBAL_BLOCK
  if kind == "colt5":
    bindings.update(
        NUM_LIGHT_HEADS=1, NUM_HEAVY_HEADS=3, LIGHT_MLP_DIM=MLP // 2, HEAVY_MLP_DIM=4 * MLP,
        ROUTED_FRACTION=1 / 4,
    )
  model_file = model_files.model_file(_KINDS[kind], "tiny")
  with model_files.parsed([model_file], [f"{k} = {v!r}" for k, v in bindings.items()]):
    return model_files.frozen("ARCHITECTURE")


def _random_params(net, seed=0):
  """Plain float32 parameters of `net`, all random (layer-norm scales around 1).

  Drawn with numpy from `eval_shape(init)`: compiling `init` costs more than the tests.
  """
  tokens = jnp.ones((1, 8), jnp.int32)
  shapes = jax.eval_shape(
      lambda: nn.unbox(net.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                enable_dropout=False))["params"]
  )
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if "scale" in jax.tree_util.keystr(path):
      return 1.0 + 0.3 * noise
    return 0.3 * noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _assert_close(got, expected, *, kind="t5", encoder_layers, decoder_layers, what=""):
  """Two float32 runs of the same network, summing in other orders (tests/tolerances.py).

  Width: the widest contraction (MLP hidden; CoLT5's heavy MLP). Depth: contractions in
  sequence, 4 per attention (in, q·k, weights·v, out) and 2 per MLP: an encoder layer is
  6, a decoder layer 10, and the logits 1.
  """
  width = 4 * MLP if kind == "colt5" else max(MLP, EMBED, 16)  # 16: the longest input
  tolerances.assert_close(
      got, expected, num_terms=width, depth=6 * encoder_layers + 10 * decoder_layers + 1,
      programs=2, what=what,
  )


# ----------------------------------------------------------------------------- decoding


def _decode_batch(seed=0):
  """Encoder [3, 12] and targets [3, 9], both with padded rows; decoder inputs shifted."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, VOCAB, (3, 12))
  inputs[1, 7:] = 0
  inputs[2, 2:] = 0
  targets = rng.integers(1, VOCAB, (3, 9))
  targets[1, 5:] = 0
  targets[2, 8:] = 0
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return inputs, decoder_inputs, targets


@pytest.mark.parametrize(
    "self_kv_heads,cross_kv_heads",
    # (multi-head, multi-query) is CoLT5's decoder (§3.3); then multi-query self-attention
    # with T5/LongT5's multi-head cross-attention.
    [(None, 1), (1, None)],
)
def test_cached_decoding_matches_teacher_forcing(self_kv_heads, cross_kv_heads):
  net = _network(self_kv_heads=self_kv_heads, cross_kv_heads=cross_kv_heads, encoder_layers=1)
  params = _random_params(net)
  inputs, decoder_inputs, targets = _decode_batch()

  @jax.jit
  def run(params, inputs, decoder_inputs, targets):
    teacher_forced = net.apply(
        {"params": params}, inputs, decoder_inputs, targets, enable_dropout=False
    )
    encoded = net.apply({"params": params}, inputs, enable_dropout=False, method=net.encode)
    # As model.predict_batch_with_aux: a full-length call of zeros creates the cache.
    _, variables = net.apply(
        {"params": params}, encoded, inputs, jnp.zeros_like(decoder_inputs),
        jnp.ones_like(decoder_inputs), enable_dropout=False, decode=True, mutable=["cache"],
        method=net.decode,
    )

    def step(cache, token):
      token = token[:, None]
      logits, variables = net.apply(
          {"params": params, "cache": cache}, encoded, inputs, token, jnp.ones_like(token),
          enable_dropout=False, decode=True, mutable=["cache"], method=net.decode,
      )
      return variables["cache"], logits[:, 0]

    _, stepped = jax.lax.scan(step, variables["cache"], decoder_inputs.T)
    return teacher_forced, jnp.swapaxes(stepped, 0, 1)

  teacher_forced, stepped = map(np.asarray, run(params, inputs, decoder_inputs, targets))
  real = targets > 0
  _assert_close(stepped[real], teacher_forced[real], encoder_layers=1, decoder_layers=2)


# ----------------------------------------------------------------------------- packing


def _packed_and_unpacked(seed=0):
  """Three examples, packed into two rows as seqio.EncDecFeatureConverter(pack=True) emits.

  Row 0 holds examples 0 and 1, row 1 example 2; positions restart per segment and
  `decoder_input_tokens` is the targets shifted right within each segment (0 first).
  The unpacked batch holds the same examples one per row, padded to the same lengths.
  """
  rng = np.random.default_rng(seed)
  input_lengths, target_lengths = (6, 9, 5), (4, 3, 6)
  input_length, target_length = 16, 9
  examples = [
      (rng.integers(1, VOCAB, n), rng.integers(1, VOCAB, m))
      for n, m in zip(input_lengths, target_lengths, strict=True)
  ]
  names = (
      "encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
      "decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
      "decoder_positions",
  )
  lengths = dict(zip(names, [input_length] * 3 + [target_length] * 4, strict=True))
  packed = {name: np.zeros((2, lengths[name]), np.int32) for name in names}
  unpacked = {name: np.zeros((3, lengths[name]), np.int32) for name in names}
  offsets = {0: (0, 0), 1: (input_lengths[0], target_lengths[0]), 2: (0, 0)}
  rows = {0: 0, 1: 0, 2: 1}
  segments = {0: 1, 1: 2, 2: 1}
  locations = []  # (example, packed row, input offset, target offset)
  for index, (inputs, targets) in enumerate(examples):
    row, segment = rows[index], segments[index]
    input_offset, target_offset = offsets[index]
    shifted = np.concatenate([[0], targets[:-1]])
    for batch, r, i0, t0 in ((packed, row, input_offset, target_offset), (unpacked, index, 0, 0)):
      batch["encoder_input_tokens"][r, i0 : i0 + len(inputs)] = inputs
      batch["encoder_segment_ids"][r, i0 : i0 + len(inputs)] = segment
      batch["encoder_positions"][r, i0 : i0 + len(inputs)] = np.arange(len(inputs))
      batch["decoder_target_tokens"][r, t0 : t0 + len(targets)] = targets
      batch["decoder_input_tokens"][r, t0 : t0 + len(targets)] = shifted
      batch["decoder_segment_ids"][r, t0 : t0 + len(targets)] = segment
      batch["decoder_positions"][r, t0 : t0 + len(targets)] = np.arange(len(targets))
    locations.append((index, row, target_offset, len(targets)))
  return packed, unpacked, locations


def _apply_batch(net, params, batch):
  return net.apply(
      {"params": params},
      batch["encoder_input_tokens"],
      batch["decoder_input_tokens"],
      batch["decoder_target_tokens"],
      encoder_segment_ids=batch.get("encoder_segment_ids"),
      decoder_segment_ids=batch.get("decoder_segment_ids"),
      encoder_positions=batch.get("encoder_positions"),
      decoder_positions=batch.get("decoder_positions"),
      enable_dropout=False,
  )


# CoLT5 is left out on purpose: its routers pick the top-k tokens of a whole row, so
# packing other examples beside one changes which of its tokens are routed.
@pytest.mark.parametrize("kind", ["t5", "local", "tglobal"])
def test_packed_batch_equals_examples_run_alone(kind):
  # One layer each: packing is a per-layer property, and compiling is the cost here.
  net = _network(kind, cross_kv_heads=None, encoder_layers=1, decoder_layers=1)
  params = _random_params(net)
  packed, unpacked, locations = _packed_and_unpacked()
  unpacked = {
      name: value
      for name, value in unpacked.items()
      if name in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
  }

  @jax.jit
  def run(params, packed, unpacked):
    return _apply_batch(net, params, packed), _apply_batch(net, params, unpacked)

  packed_logits, alone_logits = map(np.asarray, run(params, packed, unpacked))
  for index, row, target_offset, target_length in locations:
    _assert_close(
        packed_logits[row, target_offset : target_offset + target_length],
        alone_logits[index, :target_length],
        encoder_layers=1, decoder_layers=1, what=f"example {index}",
    )


# ----------------------------------------------------------------------------- scan, remat


def _stack_layers(params, layers):
  """Plain per-layer params `layers_<i>` -> scanned `layers/layer`, stacked on axis 0.

  layers: {"encoder": count, "decoder": count}.
  """
  stacked = dict(params)
  for stack, count in layers.items():
    tree = dict(params[stack])
    per_layer = [tree.pop(f"layers_{i}") for i in range(count)]
    tree["layers"] = {"layer": jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}
    stacked[stack] = tree
  return stacked


def _loss_and_grads(net, params, batch, weights, *, with_grads=True):
  """(loss, logits, grads or None) of a fixed random linear functional of the logits."""

  def loss(params):
    logits = net.apply({"params": params}, *batch, enable_dropout=False)
    return jnp.sum(logits * weights), logits

  if not with_grads:
    value, logits = jax.jit(loss)(params)
    return value, logits, None
  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, grads


# Two encoder layers everywhere (stacking needs several); CoLT5's decoder is the same
# T5 decoder, so one layer there keeps its compile short.
_SCAN_LAYERS = {"t5": {"encoder": 2, "decoder": 2}, "colt5": {"encoder": 2, "decoder": 1}}


@pytest.fixture(scope="module")
def plain_reference():
  """Plain-stack loss, logits and (optionally) gradients per encoder kind, computed once."""
  cache = {}

  def get(kind, with_grads):
    if (kind, with_grads) not in cache:
      layers = _SCAN_LAYERS[kind]
      net = _network(kind, encoder_layers=layers["encoder"], decoder_layers=layers["decoder"])
      params = _random_params(net)
      batch = tuple(jnp.asarray(x) for x in _decode_batch(seed=1))
      weights = jax.random.normal(jax.random.PRNGKey(3), (3, 9, VOCAB))
      result = _loss_and_grads(net, params, batch, weights, with_grads=with_grads)
      cache[kind, with_grads] = (params, batch, weights, result)
    return cache[kind, with_grads]

  return get


@pytest.mark.parametrize(
    "kind,scan_layers,remat_policy,with_grads",
    [
        ("t5", True, "dots_saveable", True),
        ("t5", False, "full", True),
        # Routers under scan: stacked router vectors, each layer routing its own tokens.
        # Values only: differentiating CoLT5's soft top-k twice more costs ~50 s to compile.
        ("colt5", True, "full", False),
    ],
)
def test_scan_and_remat_match_plain_stack(
    plain_reference, kind, scan_layers, remat_policy, with_grads
):
  params, batch, weights, (value, logits, grads) = plain_reference(kind, with_grads)
  layers = _SCAN_LAYERS[kind]
  net = _network(
      kind, scan_layers=scan_layers, remat_policy=remat_policy,
      encoder_layers=layers["encoder"], decoder_layers=layers["decoder"],
  )
  variant_params = _stack_layers(params, layers) if scan_layers else params
  # The hand-stacked tree is exactly what the variant creates (paths and shapes).
  expected_shapes = jax.eval_shape(
      lambda: nn.unbox(net.init(jax.random.PRNGKey(0), *batch, enable_dropout=False))["params"]
  )
  assert jax.tree.map(lambda x: x.shape, expected_shapes) == jax.tree.map(
      lambda x: x.shape, variant_params
  )

  variant_value, variant_logits, variant_grads = _loss_and_grads(
      net, variant_params, batch, weights, with_grads=with_grads
  )
  depth = dict(kind=kind, encoder_layers=layers["encoder"], decoder_layers=layers["decoder"])
  _assert_close(np.asarray(variant_logits), np.asarray(logits), **depth, what="logits")
  # The loss sums 999 weighted logits: one more contraction, of 999 terms that cancel, so
  # its error is relative to their sizes.
  tolerances.assert_close(
      float(variant_value), float(value), num_terms=logits.size,
      depth=6 * layers["encoder"] + 10 * layers["decoder"] + 2, programs=2,
      scale=float(np.abs(np.asarray(logits) * np.asarray(weights)).sum()), what="loss",
  )
  if not with_grads:
    return
  expected_grads = _stack_layers(grads, layers) if scan_layers else grads
  flat_expected = jax.tree_util.tree_flatten_with_path(expected_grads)[0]
  flat_got = jax.tree.leaves(variant_grads)
  for (path, expected), got in zip(flat_expected, flat_got, strict=True):
    # Back through the whole network and forward again (twice the depth); a parameter's
    # gradient sums over the batch's 3 × 12 positions. Relative to each tensor's scale:
    # a misplaced or shared layer is off by O(1) of it.
    tolerances.assert_close(
        np.asarray(got), np.asarray(expected), num_terms=max(MLP, 3 * 12),
        depth=2 * (6 * layers["encoder"] + 10 * layers["decoder"] + 2), programs=2,
        what=jax.tree_util.keystr(path),
    )


def test_scanned_params_carry_the_layers_axis():
  """Stacked params are partitioned with 'layers' first (t5x's scan convention)."""
  net = _network("t5", scan_layers=True)
  tokens = jnp.ones((1, 6), jnp.int32)
  boxed = jax.eval_shape(
      lambda: net.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False)
  )["params"]
  kernel = boxed["encoder"]["layers"]["layer"]["attention"]["query"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "kv")
  assert kernel.value.shape == (2, EMBED, HEADS, HEAD_DIM)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def model():
  seqio = pytest.importorskip("seqio")
  from colt5_flax import model as model_lib

  vocabulary = seqio.PassThroughVocabulary(size=VOCAB, eos_id=1)
  return model_lib.EncoderDecoderModel(_network(), vocabulary, vocabulary)


def _good_batch():
  inputs, decoder_inputs, targets = _decode_batch()
  return {
      "encoder_input_tokens": inputs,
      "decoder_input_tokens": decoder_inputs,
      "decoder_target_tokens": targets,
  }


@pytest.mark.parametrize(
    "feature,value,message",
    [
        ("encoder_input_tokens", VOCAB, f"encoder_input_tokens holds token id {VOCAB} "),
        ("decoder_input_tokens", -1, "decoder_input_tokens holds token id -1 "),
        ("decoder_target_tokens", VOCAB + 5, f"token id {VOCAB + 5} outside the vocabulary"),
    ],
)
def test_validate_batch_names_tokens_outside_the_vocabulary(model, feature, value, message):
  batch = _good_batch()
  model.validate_batch(batch)  # the unmodified batch is fine
  batch[feature] = batch[feature].copy()
  batch[feature][0, 3] = value
  with pytest.raises(ValueError, match=message):
    model.validate_batch(batch)


def test_validate_batch_names_mismatched_shapes(model):
  batch = _good_batch()
  batch["decoder_target_tokens"] = batch["decoder_target_tokens"][:, :-1]
  with pytest.raises(ValueError, match="decoder_target_tokens and decoder_input_tokens"):
    model.validate_batch(batch)
  batch = _good_batch()
  batch["encoder_input_tokens"] = batch["encoder_input_tokens"][:2]
  with pytest.raises(ValueError, match="batch size"):
    model.validate_batch(batch)
  batch = _good_batch()
  batch["encoder_input_tokens"] = batch["encoder_input_tokens"][0]
  with pytest.raises(ValueError, match=r"encoder_input_tokens must be \[batch, length\]"):
    model.validate_batch(batch)


@pytest.mark.parametrize(
    "feature,like", [("encoder_segment_ids", "encoder_input_tokens"),
                     ("decoder_positions", "decoder_target_tokens")]
)
def test_validate_batch_names_mismatched_packing_features(model, feature, like):
  batch = _good_batch()
  batch[feature] = np.ones((3, batch[like].shape[1] + 1), np.int32)
  with pytest.raises(ValueError, match=feature):
    model.validate_batch(batch)


def test_network_names_mismatched_decoder_shapes():
  net = _network()
  inputs, decoder_inputs, targets = _decode_batch()
  with pytest.raises(ValueError, match="decoder_target_tokens"):
    jax.eval_shape(
        lambda: net.init(
            jax.random.PRNGKey(0), inputs, decoder_inputs, targets[:, :-1], enable_dropout=False
        )
    )


# Not "local": its window (radius 2) sees offsets ≤ 2, whose buckets do not depend on
# max_distance; the TGlobal side and CoLT5's heavy branch see far offsets.
@pytest.mark.parametrize("kind", ["t5", "tglobal", "colt5"])
def test_encoder_bucketing_reaches_every_table(kind):
  # The encoder owns the bucketing of all its tables: its max_distance must change what
  # the layers read (it once had no effect), and its num_buckets sizes every table.
  factory = _network(kind, encoder_layers=1).encoder_factory
  embedded = jax.random.normal(jax.random.PRNGKey(1), (1, 40, EMBED))
  mask = jnp.ones((1, 40), bool)
  encoder = factory()
  variables = encoder.init(jax.random.PRNGKey(0), embedded, mask)
  tables = {name: module["rel_embedding"] for name, module in variables["params"].items()
            if "rel_embedding" in module}
  assert tables and all(t.value.shape[-1] == NUM_BUCKETS for t in tables.values())
  assert set(tables) == set(encoder.attention_factory().relative_bias_spec())
  near = np.asarray(encoder.apply(variables, embedded, mask))
  far = np.asarray(factory(max_distance=4 * MAX_DISTANCE).apply(variables, embedded, mask))
  # Offsets between 4 and 40 fall in other log buckets: every layer sees other biases.
  assert np.abs(near - far).max() > 1e-3


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("tied", [False, True])
def test_bfloat16_network_projects_its_logits_in_float32(tied):
  # A bfloat16 network's decoder states [batch, length, embed] enter the output layer in
  # float32, as t5x's `logits_dense`: its logits must equal the float64 product of those
  # states and the float32 weights up to float32 rounding (EMBED-term dot products:
  # γ = EMBED·eps32 of Σ|s·w|), far below bfloat16's rounding of the logits themselves.
  net = _network("t5", decoder_layers=1, dtype="bfloat16", tied=tied)
  rng = np.random.default_rng(3)
  inputs = rng.integers(1, VOCAB, size=(2, 12))
  targets = rng.integers(1, VOCAB, size=(2, 7))
  variables = net.init(jax.random.PRNGKey(0), inputs, targets, targets, enable_dropout=False)
  logits, state = net.apply(
      variables, inputs, targets, targets, enable_dropout=False, capture_intermediates=True,
      mutable=["intermediates"],
  )
  assert logits.dtype == jnp.float32
  states = np.asarray(state["intermediates"]["decoder"]["__call__"][0], np.float64)
  params = nn.meta.unbox(variables["params"])
  if tied:
    weights = np.asarray(params["token_embedder"]["embedding"], np.float64).T * EMBED**-0.5
  else:
    weights = np.asarray(params["logits_dense"]["kernel"], np.float64)
  expected = states @ weights
  bound = EMBED * np.finfo(np.float32).eps * (np.abs(states) @ np.abs(weights))
  np.testing.assert_array_less(np.abs(np.asarray(logits, np.float64) - expected), bound + 1e-30)
  bfloat16_rounding = np.abs(np.asarray(jnp.asarray(expected, jnp.bfloat16), np.float64)
                             - expected)
  assert bfloat16_rounding.max() > 10 * bound.max(), "the case cannot tell the two apart"
