"""Every parameter's initial distribution against T5's scheme (t5x's T5.1.1, CoLT5 ours).

The model is built from configs/models/colt5_tiny.gin, widened so each weight has enough
draws for its statistics, with one encoder and one decoder layer: it holds every kind of
parameter the project creates (embedding, logits, gated MLPs, multi-head, multi-query and
routed attention, relative-position tables, routers, layer norms). Each parameter is
matched to its formula by its path; a parameter without a rule fails the test, so a new
kind of weight must say how it is initialised.

The checks for n draws of a rule with standard deviation σ:
- the sample std within 5 standard errors of σ (its relative standard error is
  sqrt((κ − 1) / 4n) for kurtosis κ: 3 normal, 1.8 uniform, ≈ 2.36 truncated at ±2);
- the mean within 5 standard errors of 0 (σ / sqrt(n));
- the shape of the distribution by its tails: a normal sample of this size exceeds 2.3σ
  (probability per draw 0.021), a truncated normal never exceeds its cut 2σ/0.8796 =
  2.27σ (flax rescales the truncated draw to keep variance σ²), a uniform never exceeds
  sqrt(3)σ and comes within 5% of it.
"""

import math
import re
from pathlib import Path

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from colt5_flax import count_params, gin_utils

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

EMBED, HEADS, HEAD_DIM, MLP, LIGHT_MLP, HEAVY_MLP, VOCAB = 256, 8, 32, 512, 256, 1024, 1024
LIGHT_HEADS, HEAVY_HEADS, BUCKETS = 2, 6, 32
KURTOSIS = {"normal": 3.0, "truncated_normal": 2.3637, "uniform": 1.8}
TRUNCATION = 2.0 / 0.87962566103423978  # flax's truncated_normal cut, in units of σ


def _rule(path: str, shape: tuple[int, ...]):
  """(distribution, σ, formula) of the parameter at `path`, or None if ones."""
  if path.endswith("/scale"):
    return None  # RMSNorm: ones
  if path == "token_embedder/embedding":
    return "normal", 1.0, "t5x: normal(1.0)"
  if path == "logits_dense/kernel":
    return "truncated_normal", shape[0] ** -0.5, "t5x DenseGeneral: fan_in truncated normal"
  if re.search(r"/wi_[01]$|/wo$", path):
    return "truncated_normal", shape[0] ** -0.5, "t5x MlpBlock: fan_in truncated normal"
  if path.endswith("/query/kernel"):
    # t5x folds 1/sqrt(head_dim) into the query: fan_in normal / sqrt(head_dim).
    return "normal", (shape[0] * shape[2]) ** -0.5, "t5x: fan_in normal / sqrt(head_dim)"
  if path.endswith(("/key/kernel", "/value/kernel")):
    return "normal", shape[0] ** -0.5, "t5x attention: fan_in normal"
  if path.endswith("/out/kernel"):
    return "normal", (shape[0] * shape[1]) ** -0.5, "t5x attention: fan_in (heads·kv) normal"
  if path.endswith("/rel_embedding"):
    fan_avg = (shape[0] + shape[1]) / 2
    return "uniform", fan_avg**-0.5, "t5x RelativePositionBiases: fan_avg uniform"
  if path.endswith("/router_weights"):
    return "normal", shape[0] ** -0.5, "ours: normal(init_scale / sqrt(embed)), scale 1"
  return "unknown", 0.0, ""


@pytest.fixture(scope="module")
def initial_params():
  gin.clear_config()
  sizes = dict(
      EMBED_DIM=EMBED, NUM_HEADS=HEADS, HEAD_DIM=HEAD_DIM, MLP_DIM=MLP,
      NUM_LIGHT_HEADS=LIGHT_HEADS, NUM_HEAVY_HEADS=HEAVY_HEADS, LIGHT_MLP_DIM=LIGHT_MLP,
      HEAVY_MLP_DIM=HEAVY_MLP, VOCAB_SIZE=VOCAB, NUM_ENCODER_LAYERS=1, NUM_DECODER_LAYERS=1,
  )
  gin_utils.parse_gin_flags(
      [str(CONFIGS)], ["models/colt5_tiny.gin"],
      [f"{name} = {value}" for name, value in sizes.items()], finalize_config=False,
  )
  model = count_params.model_from_gin()
  shapes = {"encoder_input_tokens": (1, 64), "decoder_input_tokens": (1, 8),
            "decoder_target_tokens": (1, 8)}
  variables = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(
      jax.random.PRNGKey(0)
  )
  gin.clear_config()  # the factories read their bindings while the model initialises
  params = nn.meta.unbox(variables["params"])
  return {
      "/".join(str(getattr(key, "key", key)) for key in path): np.asarray(value, np.float64)
      for path, value in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def test_every_parameter_follows_its_initialiser(initial_params):
  # Every kind of parameter is present, so no rule goes untested.
  kinds = {"router_weights", "rel_embedding", "wi_0", "wo", "embedding", "scale"}
  assert kinds <= {path.rsplit("/", 1)[-1] for path in initial_params}
  assert any("heavy/query" in path for path in initial_params)
  for path, values in initial_params.items():
    rule = _rule(path, values.shape)
    if rule is None:
      np.testing.assert_array_equal(values, 1.0, err_msg=path)
      continue
    distribution, sigma, formula = rule
    assert distribution != "unknown", f"{path}: no initialisation rule"
    draws = values.size
    what = f"{path} {values.shape} ({formula}, σ = {sigma:.4g})"
    std_error = math.sqrt((KURTOSIS[distribution] - 1) / (4 * draws))
    assert abs(values.std() / sigma - 1) < 5 * std_error, (what, values.std())
    assert abs(values.mean()) < 5 * sigma / math.sqrt(draws), (what, values.mean())
    peak = np.abs(values).max() / sigma
    if distribution == "normal":
      assert peak > 2.3, (what, "no draw beyond 2.3σ: not a normal", peak)
    elif distribution == "truncated_normal":
      assert 0.8 * TRUNCATION < peak <= TRUNCATION * (1 + 1e-6), (what, peak)
    else:
      assert 0.95 * math.sqrt(3) < peak <= math.sqrt(3) * (1 + 1e-6), (what, peak)
