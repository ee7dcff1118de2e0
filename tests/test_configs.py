"""Every gin file in configs/ parses, finalizes and builds its model; tiny variants train.

Each file is parsed the way the entry points parse it (`gin_utils.parse_gin_flags`, the
`configs/` search path), together with the files it is meant to be combined with (a model
file, a run file, a task file), then finalized; its `MODEL` is built and compared with the
paper's sizes (Table 7, written out here by hand), and the run files' entry-point
bindings are resolved and checked against the paper's setup in docs/paper.md (learning
rates at given steps, batch sizes, lengths, dropout, routed-token counts).

The tiny variant of every architecture and every ablation (one encoder and one decoder
layer, to compile faster) runs one training step on CPU through the project's `Trainer`
(runs/demo.gin's full path through `train.train` is tests/test_demo.py's); each
ablation's effect is checked on the built network (parameters present or absent,
routed-token counts, evenly spaced static routing).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from colt5_flax import count_params, gin_utils, inference, optimizers, partitioning
from colt5_flax import evaluate as evaluate_lib
from colt5_flax import infer as infer_lib
from colt5_flax import model as model_lib
from colt5_flax import train as train_lib
from colt5_flax import trainer as trainer_lib
from colt5_flax.data import scrolls_table
from colt5_flax.layers import attention, conditional, local_attention, mlp

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Files that need t5x installed (tests/test_t5x_dropin.py parses them).
T5X_DIR = "t5x"

# -- What the paper says (docs/paper.md), written out by hand -----------------------------

# Paper Table 7 and T5.1.1's sizes: d_model, layers, T5 heads, T5 d_ff.
T5_SIZES = {
    "base": dict(embed=768, layers=12, heads=12, mlp=2048),
    "large": dict(embed=1024, layers=24, heads=16, mlp=2816),
    "xl": dict(embed=2048, layers=24, heads=32, mlp=5120),
}
# CoLT5: light heads, heavy heads, light MLP, heavy MLP.
COLT5_SIZES = {
    "base": dict(light_heads=4, heavy_heads=8, light_mlp=1024, heavy_mlp=8192),
    "large": dict(light_heads=4, heavy_heads=12, light_mlp=1408, heavy_mlp=11264),
    "xl": dict(light_heads=8, heavy_heads=24, light_mlp=2560, heavy_mlp=20480),
}
ENCODER_KINDS = {
    "t5_1_1": attention.SelfAttention,
    "longt5_local": local_attention.LocalSelfAttention,
    "longt5_tglobal": local_attention.TransientGlobalSelfAttention,
    "colt5": conditional.ConditionalAttention,
}
TINY_MODELS = {kind: f"models/{kind}_tiny.gin" for kind in ENCODER_KINDS}

# Sizes the architecture files leave to a model file (tiny ones, to build them alone).
TINY_SIZE_BINDINGS = [
    "EMBED_DIM = 32",
    "NUM_HEADS = 4",
    "HEAD_DIM = 8",
    "MLP_DIM = 64",
    "NUM_ENCODER_LAYERS = 2",
    "NUM_DECODER_LAYERS = 1",
    "ACTIVATION_DTYPE = 'float32'",
]
TINY_COLT5_BINDINGS = [
    "NUM_LIGHT_HEADS = 1",
    "NUM_HEAVY_HEADS = 3",
    "LIGHT_MLP_DIM = 32",
    "HEAVY_MLP_DIM = 256",
]

# The training-step tests' batch: inputs long enough to route (256 tokens at n/16:
# 16 queries and feedforward tokens, 32 keys/values) and span 8 blocks of radius 31.
BATCH_SIZE = 2
INPUT_LENGTH = 256
TARGET_LENGTH = 8

ABLATIONS = sorted(p.stem for p in (CONFIGS / "ablations").glob("*.gin"))
# Ablations of the data, not the network.
DATA_ABLATIONS = ("pegasus_objective",)


def gin_files(directory: str) -> list[str]:
  return sorted(str(p.relative_to(CONFIGS)) for p in (CONFIGS / directory).glob("*.gin"))


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def parse(files, bindings=()):
  """Parses as `python -m colt5_flax.train --gin_file=... --gin.X=...` does, and finalizes."""
  gin.clear_config()
  gin_utils.parse_gin_flags([str(CONFIGS)], list(files), list(bindings))


def built_parts(model):
  """(network, encoder, encoder attention, encoder feedforward, decoder) as gin builds them."""
  net = model.module
  encoder = net.encoder_factory()
  return net, encoder, encoder.attention_factory(), encoder.feed_forward_factory(), (
      net.decoder_factory()
  )


def ablation_recipe(name: str) -> tuple[list[str], list[str]]:
  """An ablation on top of CoLT5-tiny, after the run file it modifies."""
  if name in DATA_ABLATIONS:
    return (
        ["models/colt5_tiny.gin", "runs/pretrain_ul2.gin", f"ablations/{name}.gin"],
        ["MODEL_DIR = '/tmp/unused'"],
    )
  return (
      [
          "models/colt5_tiny.gin",
          "runs/finetune_scrolls.gin",
          "tasks/scrolls_qasper.gin",
          f"ablations/{name}.gin",
      ],
      ["MODEL_DIR = '/tmp/unused'", "INITIAL_CHECKPOINT_PATH = None"],
  )


# -- Coverage --------------------------------------------------------------------------------


def test_every_gin_file_is_tested():
  """A new gin file must get a recipe here (so 'every file parses' stays true)."""
  tested = (
      set(gin_files("architectures"))
      | set(gin_files("models"))
      | set(gin_files("tasks"))
      | {f"ablations/{name}.gin" for name in ABLATIONS}
      | {f"runs/{name}.gin" for name in RUN_CHECKS}
  )
  everything = {
      str(p.relative_to(CONFIGS))
      for p in CONFIGS.rglob("*.gin")
      if p.relative_to(CONFIGS).parts[0] != T5X_DIR
  }
  assert everything - tested == set()
  # The paper's Table 6 rows and our two.
  assert set(ABLATIONS) == {
      "static_routing",
      "shared_qkv_routing",
      "kv_all_tokens",
      "kv_equals_queries",
      "routed_tokens_512",
      "routed_tokens_1536",
      "longt5_encoder",
      "multi_head_cross_attention",
      "pegasus_objective",
      "no_heavy_branch",
      "random_routing",
  }


def test_every_file_says_what_it_is_and_how_to_run_it():
  for path in CONFIGS.rglob("*.gin"):
    text = path.read_text()
    assert text.startswith("# "), path
    header = text.split("from __gin__")[0]
    if path.name != "test_tiny.gin":
      assert "python -m " in header or "scripts/" in header, path


# -- Architectures and models ----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ENCODER_KINDS))
def test_architecture_file_builds_its_encoder_kind(kind):
  bindings = TINY_SIZE_BINDINGS + (TINY_COLT5_BINDINGS if kind == "colt5" else [])
  parse([f"architectures/{kind}.gin"], bindings)
  model = count_params.model_from_gin()
  assert isinstance(model, model_lib.EncoderDecoderModel)
  net, encoder, attn, feed_forward, decoder = built_parts(model)
  assert type(attn) is ENCODER_KINDS[kind]
  # CoLT5 §3.3: multi-query cross-attention; T5 and LongT5 multi-head (Table 7's counts).
  assert decoder.num_cross_attention_kv_heads == (1 if kind == "colt5" else None)
  if kind == "colt5":
    assert type(feed_forward) is conditional.ConditionalFeedForward
  else:
    assert type(feed_forward) is mlp.GatedMlp and feed_forward.hidden_dim == 64
  # The architecture files' defaults: the real vocabulary, bfloat16 activations unless
  # the model says otherwise, no dropout unless the run says otherwise.
  assert net.vocab_size == 32128 and not net.logits_via_embedding
  assert encoder.dropout_rate == 0.0 and decoder.dropout_rate == 0.0
  assert isinstance(model.input_vocabulary, seqio.SentencePieceVocabulary)


def test_architecture_file_names_the_missing_size():
  with pytest.raises(ValueError, match="EMBED_DIM"):
    parse(["architectures/colt5.gin"], [])


@pytest.mark.parametrize("size", sorted(T5_SIZES))
@pytest.mark.parametrize("kind", sorted(ENCODER_KINDS))
def test_model_file_has_the_paper_sizes(kind, size):
  parse([f"models/{kind}_{size}.gin"])
  net, encoder, attn, feed_forward, decoder = built_parts(count_params.model_from_gin())
  t5 = T5_SIZES[size]
  assert net.embed_dim == t5["embed"] and net.vocab_size == 32128
  assert net.dtype == "bfloat16"
  assert encoder.num_layers == decoder.num_layers == t5["layers"]
  # The decoder is T5.1.1 of the size for every encoder kind (Table 7).
  assert (decoder.num_heads, decoder.head_dim, decoder.mlp_dim) == (t5["heads"], 64, t5["mlp"])
  assert decoder.num_self_attention_kv_heads is None
  assert encoder.scan_layers == (size != "base")
  assert type(attn) is ENCODER_KINDS[kind]
  if kind == "colt5":
    colt5 = COLT5_SIZES[size]
    assert colt5["light_heads"] + colt5["heavy_heads"] == t5["heads"]
    assert (attn.num_light_heads, attn.num_heavy_heads, attn.head_dim) == (
        colt5["light_heads"], colt5["heavy_heads"], 64,
    )
    assert (feed_forward.light_mlp_dim, feed_forward.heavy_mlp_dim) == (
        colt5["light_mlp"], colt5["heavy_mlp"],
    )
    assert attn.local_radius == 127 and decoder.num_cross_attention_kv_heads == 1
    # Fine-tuning capacity by default: m = n/16 and 2m, capped at the 32k values.
    assert attn.capacity == feed_forward.capacity
    assert (attn.capacity.count(16384), attn.capacity.count(16384, key_values=True)) == (
        1024, 2048,
    )
    assert (attn.capacity.count(65536), attn.capacity.count(65536, key_values=True)) == (
        2048, 4096,
    )
    assert attn.capacity.soft_top_k_factor == 9 / 8
    router = attn.router_factory(num_selected=4, soft_top_k_target=4.5)
    assert (router.routing, router.epsilon, router.num_iters) == ("learned", 1.0, 50)
  else:
    assert (attn.num_heads, attn.head_dim) == (t5["heads"], 64)
    assert feed_forward.hidden_dim == t5["mlp"]
    assert decoder.num_cross_attention_kv_heads is None
    if kind != "t5_1_1":
      assert attn.local_radius == 127
    if kind == "longt5_tglobal":
      assert attn.global_block_size == 16


@pytest.mark.parametrize("kind", sorted(ENCODER_KINDS))
def test_tiny_model_file(kind):
  parse([TINY_MODELS[kind]])
  model = count_params.model_from_gin()
  net, encoder, attn, _, decoder = built_parts(model)
  assert isinstance(model.input_vocabulary, seqio.ByteVocabulary)
  assert net.vocab_size >= model.input_vocabulary.vocab_size
  assert net.dtype == "float32" and net.embed_dim <= 64
  assert encoder.num_layers == 2 and type(attn) is ENCODER_KINDS[kind]


# -- Runs ------------------------------------------------------------------------------------


def _check_pretrain(kwargs, parts):
  _, encoder, attn, feed_forward, decoder = parts
  assert kwargs["mixture_or_task_name"] == "ul2_c4"
  assert kwargs["task_feature_lengths"] == {"inputs": 4096, "targets": 910}
  assert (kwargs["batch_size"], kwargs["train_steps"]) == (256, 1_000_000)
  assert inspect.unwrap(kwargs["optimizer"]) is inspect.unwrap(optimizers.adafactor)
  schedule = kwargs["learning_rate_schedule"]
  # T5.1.1: 0.01 for 10k steps, then 1/sqrt(step).
  for step, rate in [(0, 0.01), (9_999, 0.01), (40_000, 0.005), (1_000_000, 0.001)]:
    np.testing.assert_allclose(float(schedule(step)), rate, rtol=1e-6)
  assert encoder.dropout_rate == attn.dropout_rate == decoder.dropout_rate == 0.0
  # CoLT5 §4: m = 512 of 4096 queries and feedforward tokens, 1024 keys/values.
  assert attn.capacity == feed_forward.capacity
  assert (attn.capacity.count(4096), attn.capacity.count(4096, key_values=True)) == (512, 1024)


def _check_finetune(kwargs, parts):
  _, encoder, attn, feed_forward, decoder = parts
  assert kwargs["mixture_or_task_name"] == "scrolls_qasper"
  assert kwargs["task_feature_lengths"] == {"inputs": 16384, "targets": 128}
  assert kwargs["batch_size"] == 128
  assert inspect.unwrap(kwargs["optimizer"]) is inspect.unwrap(optimizers.adafactor)
  for step in (0, 5_000, 9_999):
    np.testing.assert_allclose(float(kwargs["learning_rate_schedule"](step)), 0.001)
  assert encoder.dropout_rate == attn.dropout_rate == feed_forward.dropout_rate == 0.1
  assert decoder.dropout_rate == 0.1
  assert kwargs["best_metric"] == "eval/scrolls_qasper/scrolls_score"
  assert kwargs["keep_best_checkpoints"] >= 1 and kwargs["best_metric_mode"] == "max"
  assert kwargs["eval_period"] > 0 and kwargs["eval_split"] == "validation"
  # CoLT5 §5: m = 1024 of 16384, 2m keys/values.
  assert attn.capacity == feed_forward.capacity
  assert (attn.capacity.count(16384), attn.capacity.count(16384, key_values=True)) == (
      1024, 2048,
  )


def _check_eval(kwargs, parts):
  del parts
  assert kwargs["split"] == "validation" and kwargs["checkpoint_path"] == "/tmp/ckpt"
  assert kwargs["task_feature_lengths"] == {"inputs": 16384, "targets": 128}


def _check_infer(kwargs, parts):
  del parts
  assert kwargs["split"] == "test" and kwargs["output_dir"] == "/tmp/predictions"
  assert kwargs["task_feature_lengths"] == {"inputs": 16384, "targets": 128}


def _check_demo(kwargs, parts):
  assert kwargs["mixture_or_task_name"] in seqio.TaskRegistry.names()
  task = seqio.get_mixture_or_task(kwargs["mixture_or_task_name"])
  assert isinstance(task.output_features["inputs"].vocabulary, seqio.ByteVocabulary)
  assert parts[0].vocab_size >= task.output_features["inputs"].vocabulary.vocab_size


def _check_demo_checkpoints(kwargs, parts):
  _check_demo(kwargs, parts)
  assert kwargs["train_steps"] == 10000  # the shipped checkpoints' run (docs/demo.md)


def _check_small_scale(kwargs, parts):
  _check_demo(kwargs, parts)
  # The study's budget (docs/small_scale.md): make demo's live steps, an evaluation per stage.
  assert kwargs["train_steps"] == 1600 and kwargs["eval_period"] == 800


def _check_test_tiny(kwargs, parts):
  del kwargs, parts


_TASK = "tasks/scrolls_qasper.gin"
# run file -> (files to parse, command-line bindings, {entry point: check of its kwargs}).
RUN_CHECKS = {
    "pretrain_ul2": (
        ["models/colt5_tiny.gin", "runs/pretrain_ul2.gin"],
        ["MODEL_DIR = '/tmp/run'"],
        {train_lib.train: _check_pretrain},
    ),
    "finetune_scrolls": (
        ["models/colt5_tiny.gin", "runs/finetune_scrolls.gin", _TASK],
        ["MODEL_DIR = '/tmp/run'", "INITIAL_CHECKPOINT_PATH = '/tmp/pretrained'"],
        {train_lib.train: _check_finetune},
    ),
    "eval": (
        ["models/colt5_tiny.gin", "runs/eval.gin", _TASK],
        ["CHECKPOINT_PATH = '/tmp/ckpt'"],
        {evaluate_lib.evaluate: _check_eval},
    ),
    "infer": (
        ["models/colt5_tiny.gin", "runs/infer.gin", _TASK],
        ["CHECKPOINT_PATH = '/tmp/ckpt'", "INFER_OUTPUT_DIR = '/tmp/predictions'"],
        {infer_lib.infer: _check_infer},
    ),
    "demo": (
        ["models/colt5_tiny.gin", "runs/demo.gin"],
        ["MODEL_DIR = '/tmp/run'"],
        {
            train_lib.train: _check_demo,
            evaluate_lib.evaluate: _check_demo,
            infer_lib.infer: _check_demo,
        },
    ),
    "demo_checkpoints": (
        ["models/colt5_tiny.gin", "runs/demo.gin", "runs/demo_checkpoints.gin"],
        ["MODEL_DIR = '/tmp/run'"],
        {train_lib.train: _check_demo_checkpoints},
    ),
    "small_scale": (
        ["models/colt5_tiny.gin", "runs/demo.gin", "runs/small_scale.gin"],
        ["MODEL_DIR = '/tmp/run'"],
        {train_lib.train: _check_small_scale},
    ),
    "test_tiny": (
        ["runs/test_tiny.gin"],
        ["MODEL_DIR = '/tmp/run'"],
        {train_lib.train: _check_test_tiny},
    ),
}


@pytest.mark.parametrize("run", sorted(RUN_CHECKS))
def test_run_file_binds_its_entry_points(run):
  files, bindings, checks = RUN_CHECKS[run]
  parse(files, bindings)
  for function, check in checks.items():
    kwargs = gin.get_bindings(function)  # references and macros evaluated
    # Every argument the entry point requires is bound (gin has already checked that
    # every bound name is a parameter).
    inspect.signature(function).bind(**kwargs)
    assert isinstance(kwargs["model"], model_lib.EncoderDecoderModel)
    assert isinstance(kwargs["partitioner"], partitioning.Partitioner)
    assert kwargs["mixture_or_task_name"] in set(seqio.TaskRegistry.names()) | set(
        seqio.MixtureRegistry.names()
    )
    check(kwargs, built_parts(kwargs["model"]))


@pytest.mark.parametrize(
    "files, bindings, missing",
    [
        (
            ["models/colt5_tiny.gin", "runs/finetune_scrolls.gin"],
            ["MODEL_DIR = '/tmp/run'", "INITIAL_CHECKPOINT_PATH = None"],
            "MIXTURE_OR_TASK_NAME",
        ),
        (
            ["models/colt5_tiny.gin", "runs/finetune_scrolls.gin", _TASK],
            ["MODEL_DIR = '/tmp/run'"],
            "INITIAL_CHECKPOINT_PATH",
        ),
        (["models/colt5_tiny.gin", "runs/pretrain_ul2.gin"], [], "MODEL_DIR"),
        (["runs/pretrain_ul2.gin"], ["MODEL_DIR = '/tmp/run'"], "MODEL\\b"),
    ],
)
def test_run_file_without_its_companions_names_what_is_missing(files, bindings, missing):
  with pytest.raises((ValueError, RuntimeError, NameError), match=missing):
    parse(files, bindings)
    gin.get_bindings(train_lib.train)


# -- SCROLLS task files ----------------------------------------------------------------------


# The lengths are the SCROLLS table's (checked against the paper in
# tests/data/test_scrolls_table.py): one task file per row, none other.
def test_one_scrolls_task_file_per_task():
  files = sorted(path.stem for path in (CONFIGS / "tasks").glob("scrolls_*.gin"))
  assert files == sorted(f"scrolls_{name}" for name in scrolls_table.NAMES)


@pytest.mark.parametrize("task", scrolls_table.NAMES)
def test_scrolls_task_file(task):
  parse(
      ["models/colt5_tiny.gin", "runs/finetune_scrolls.gin", f"tasks/scrolls_{task}.gin"],
      ["MODEL_DIR = '/tmp/run'", "INITIAL_CHECKPOINT_PATH = None"],
  )
  kwargs = gin.get_bindings(train_lib.train)
  assert kwargs["task_feature_lengths"] == scrolls_table.get(task).feature_lengths
  name = kwargs["mixture_or_task_name"]
  assert name == f"scrolls_{task}"
  seqio_task = seqio.get_mixture_or_task(name)
  # The best-checkpoint metric is a key the task's metric actually reports.
  (metric_fn,) = seqio_task.metric_fns
  results = metric_fn(["the answer"], ["the answer"])
  assert kwargs["best_metric"] == f"eval/{name}/scrolls_score"
  assert results["scrolls_score"] == 100.0
  # The same file with the official-files variant named in its comment.
  assert f"scrolls_{task}_local" in seqio.TaskRegistry.names()
  assert f"'scrolls_{task}_local'" in (CONFIGS / f"tasks/scrolls_{task}.gin").read_text()


# -- Ablations -------------------------------------------------------------------------------


def _abstract_apply(model):
  """(params, intermediates) shapes of one forward pass of `model` on the test batch."""
  tokens = jax.ShapeDtypeStruct((BATCH_SIZE, INPUT_LENGTH), np.int32)
  targets = jax.ShapeDtypeStruct((BATCH_SIZE, TARGET_LENGTH), np.int32)
  shapes = {"encoder_input_tokens": tokens.shape, "decoder_input_tokens": targets.shape,
            "decoder_target_tokens": targets.shape}

  def run(key):
    params = nn.meta.unbox(model.get_initial_variables(key, shapes)["params"])
    _, state = model.module.apply(
        {"params": params},
        jnp.ones(tokens.shape, jnp.int32),
        jnp.ones(targets.shape, jnp.int32),
        jnp.ones(targets.shape, jnp.int32),
        enable_dropout=False,
        mutable=["intermediates"],
    )
    return params, state.get("intermediates", {})

  return jax.eval_shape(run, jax.random.PRNGKey(0))


def _layer(tree, index=0):
  return tree["encoder"][f"layers_{index}"]


def _routed_counts(intermediates):
  """{'q'|'kv'|'mlp': tokens routed per row} in the first encoder layer."""
  layer = _layer(intermediates) if intermediates else {}
  counts = {}
  for prefix, module in (("q", "attention"), ("kv", "attention"), ("mlp", "mlp")):
    key = f"{prefix}_routed_indices"
    if key in layer.get(module, {}):
      (shape,) = [leaf.shape for leaf in jax.tree_util.tree_leaves(layer[module][key])]
      assert shape[0] == BATCH_SIZE
      counts[prefix] = shape[1]
  return counts


# Default CoLT5-tiny at 256 tokens: m = 256/16 = 16 queries and FF tokens, 2m = 32 kv.
DEFAULT_COUNTS = {"q": 16, "kv": 32, "mlp": 16}
EXPECTED_COUNTS = {
    "routed_tokens_512": {"q": 8, "kv": 16, "mlp": 8},  # n/32, n/16
    "routed_tokens_1536": {"q": 24, "kv": 48, "mlp": 24},  # 3n/32, 3n/16
    "kv_equals_queries": {"q": 16, "kv": 16, "mlp": 16},
    "kv_all_tokens": {"q": 16, "mlp": 16},  # no kv router
    "no_heavy_branch": {},
    "longt5_encoder": {},
    # In the pretraining run: m = n/8, 2m = n/4.
    "pegasus_objective": {"q": 32, "kv": 64, "mlp": 32},
}


@pytest.fixture(scope="module")
def baseline_shapes():
  """CoLT5-tiny in the fine-tuning run, without ablation."""
  files, bindings = ablation_recipe("static_routing")
  parse(files[:-1], bindings)
  return _abstract_apply(count_params.model_from_gin())


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_changes_what_it_says(name, baseline_shapes):
  files, bindings = ablation_recipe(name)
  parse(files, bindings)
  model = count_params.model_from_gin()
  _, encoder, attn, feed_forward, decoder = built_parts(model)
  params, intermediates = _abstract_apply(model)
  base_params, base_intermediates = baseline_shapes
  layer, base_layer = _layer(params), _layer(base_params)
  assert _routed_counts(base_intermediates) == DEFAULT_COUNTS
  assert _routed_counts(intermediates) == EXPECTED_COUNTS.get(name, DEFAULT_COUNTS)
  cross_key = params["decoder"]["layers_0"]["encoder_decoder_attention"]["key"]["kernel"]

  if name in ("static_routing", "random_routing"):
    kinds = {module.router_factory(num_selected=1, soft_top_k_target=1.0).routing
             for module in (attn, feed_forward)}
    assert kinds == {name.split("_")[0]}
    # Static and random routing have no learned router vector.
    assert "query_router" not in layer["attention"] and "router" not in layer["mlp"]
  elif name == "shared_qkv_routing":
    assert attn.share_router
    assert "router" in layer["attention"]
    assert "query_router" not in layer["attention"] and "kv_router" not in layer["attention"]
  elif name == "kv_all_tokens":
    assert not attn.route_key_values and "kv_router" not in layer["attention"]
  elif name == "no_heavy_branch":
    assert not attn.use_heavy_branch and not feed_forward.use_heavy_branch
    assert set(layer["attention"]) == {"light"} and set(layer["mlp"]) == {"light"}
  elif name == "longt5_encoder":
    assert type(attn) is local_attention.TransientGlobalSelfAttention
    assert type(feed_forward) is mlp.GatedMlp and feed_forward.hidden_dim == 64
    assert attn.num_heads == 4 and attn.local_radius == 31
    assert "global_input_layer_norm" in layer["attention"]
    # The decoder is CoLT5's: one shared key/value head in cross-attention.
    assert decoder.num_cross_attention_kv_heads == 1 and cross_key.shape == (32, 1, 8)
  elif name == "multi_head_cross_attention":
    assert decoder.num_cross_attention_kv_heads is None
    assert cross_key.shape == (32, 4, 8)
    base_key = base_params["decoder"]["layers_0"]["encoder_decoder_attention"]["key"]
    assert base_key["kernel"].shape == (32, 1, 8)
  elif name == "pegasus_objective":
    kwargs = gin.get_bindings(train_lib.train)
    assert kwargs["mixture_or_task_name"] == "pegasus_c4"
    assert "pegasus_c4" in seqio.TaskRegistry.names()
    # Everything else is the UL2 pretraining run's.
    assert kwargs["task_feature_lengths"] == {"inputs": 4096, "targets": 910}
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
        lambda x: x.shape, base_params
    )
  if name not in ("longt5_encoder", "multi_head_cross_attention"):
    assert cross_key.shape == (32, 1, 8)
  del base_layer


@pytest.mark.parametrize(
    "bindings,expected",
    [
        # One line moves every router by the paper's rule: m queries and feedforward
        # tokens, 2m keys/values (CoLT5 §3.3), at INPUT_LENGTH = 256.
        (["ROUTED_FRACTION = 0.125"], {"q": 32, "kv": 64, "mlp": 32}),
        (["ROUTED_KV_RATIO = 3.0"], {"q": 16, "kv": 48, "mlp": 16}),
        # Counts stop growing beyond ROUTED_MAX_LENGTH: at 128 tokens, m = 128/16 = 8.
        (["ROUTED_MAX_LENGTH = 128"], {"q": 8, "kv": 16, "mlp": 8}),
    ],
)
def test_one_binding_sets_every_routers_count(bindings, expected):
  files, run_bindings = ablation_recipe("static_routing")
  parse(files[:-1], run_bindings + bindings)  # after the run file's ROUTED_FRACTION
  _, intermediates = _abstract_apply(count_params.model_from_gin())
  assert _routed_counts(intermediates) == expected


class _Restoring(Exception):
  """The entry point got past its configuration to restoring the checkpoint."""


@pytest.mark.parametrize("run, entry_point", [("eval", evaluate_lib.evaluate),
                                              ("infer", infer_lib.infer)])
def test_only_training_refuses_an_ablation_that_changes_nothing(monkeypatch, run, entry_point):
  """Issue 15 §6.6: `train` refuses `ablations/static_routing.gin` on LongT5, which has no
  router (tests/test_gin_utils.py); `evaluate` and `infer` take the gin files a run was
  trained with and do not check them again."""
  def restoring(*args, **kwargs):
    raise _Restoring

  monkeypatch.setattr(inference, "restore_for_inference", restoring)
  monkeypatch.setattr(gin_utils, "_parsed_ablation_files", [])
  files, bindings, _ = RUN_CHECKS[run]
  parse(["models/longt5_tglobal_tiny.gin", *files[1:], "ablations/static_routing.gin"],
        bindings)
  assert gin_utils._parsed_ablation_files  # the file the check would refuse
  with pytest.raises(_Restoring):
    gin.get_configurable(entry_point)()


# -- One training step -----------------------------------------------------------------------


def _batch():
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, 259, (BATCH_SIZE, INPUT_LENGTH)).astype(np.int32)
  inputs[1, 200:] = 0  # a padded row: padding is never routed
  targets = rng.integers(3, 259, (BATCH_SIZE, TARGET_LENGTH)).astype(np.int32)
  targets[1, 6:] = 0
  decoder_inputs = np.zeros_like(targets)
  decoder_inputs[:, 1:] = targets[:, :-1]
  return {
      "encoder_input_tokens": inputs,
      "decoder_input_tokens": decoder_inputs,
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets > 0).astype(np.int32),
  }


TRAIN_CONFIGS = {f"{kind}_tiny": ([TINY_MODELS[kind]], []) for kind in ENCODER_KINDS}
TRAIN_CONFIGS.update(
    {name: ablation_recipe(name) for name in ABLATIONS if name not in DATA_ABLATIONS}
)
# One encoder and one decoder layer instead of the tiny files' 2 + 2: every kind of layer
# (and every ablation's change to it) still runs forward and backward, and XLA compiles a
# smaller program. XLA's compilation is most of a configuration's time (static_routing,
# measured on a loaded machine: 22 s of 25 CPU-seconds; 18.6 CPU-seconds with one layer).
ONE_LAYER_EACH = ["NUM_ENCODER_LAYERS = 1", "NUM_DECODER_LAYERS = 1"]
# The rest is LLVM optimising the kernels of a step that runs twice on a tiny batch: the
# step compiles without it (measured: colt5_tiny's compile 9.1 instead of 18.8 CPU-seconds,
# kv_all_tokens 10.5 instead of 22.9; the same losses to float32's last digit). XLA's
# graph optimisations and the arithmetic are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# Initial parameters by path, from the configurations initialised so far. An ablation
# whose parameters are all among them (same path and shape: the routing-capacity and
# routing-kind ablations) starts from those instead of compiling its own initialisation.
_PARAMETER_POOL: dict[tuple[str, ...], np.ndarray] = {}


def _path_key(path) -> tuple[str, ...]:
  return tuple(str(getattr(entry, "key", entry)) for entry in path)


def _initial_state(trainer):
  abstract = trainer.abstract_params
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  found = [_PARAMETER_POOL.get(_path_key(path)) for path, _ in flat]
  if all(v is not None and v.shape == leaf.shape for v, (_, leaf) in zip(found, flat, strict=True)):
    return trainer.state_from_params(jax.tree_util.tree_unflatten(treedef, found))
  state = trainer.create_state()
  params = jax.device_get(state.params)
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    _PARAMETER_POOL.setdefault(_path_key(path), value)
  return state


@functools.cache
def _two_steps(config: str):
  """Two training steps of `config` (one layer each side) on the same batch, through the
  project's Trainer, with the runs' optimizer (Adafactor, here at a constant 0.01).

  Returns (metrics of step 1, metrics of step 2, parameters before, parameters after the
  first step), as numpy.
  """
  # Gin builds the encoder and decoder when the model is traced: keep the configuration
  # until the steps are compiled.
  files, bindings = TRAIN_CONFIGS[config]
  parse(files, [*bindings, *ONE_LAYER_EACH])
  model = count_params.model_from_gin()
  partitioner = partitioning.Partitioner(num_partitions=1, devices=jax.devices()[:1])
  schedule = optimizers.constant_schedule(0.01)
  trainer = trainer_lib.Trainer(
      model,
      partitioner,
      optimizers.adafactor(schedule),
      schedule,
      trainer_lib.encdec_batch_shapes(
          BATCH_SIZE, {"inputs": INPUT_LENGTH, "targets": TARGET_LENGTH}
      ),
  )
  with partitioner.context():
    lowered = trainer._jitted_train_step.lower(trainer.abstract_state, trainer.abstract_batch())
  compiled = trainer._compiled_train_step = lowered.compile(FAST_COMPILE)
  assert trainer.compile_train_step() is compiled  # what train_step runs
  state = _initial_state(trainer)
  before = jax.device_get(state.params)
  batch = partitioner.shard_global_batch(_batch())
  state, first = trainer.train_step(state, batch)
  after = jax.device_get(state.params)
  state, second = trainer.train_step(state, batch)
  return jax.device_get(first), jax.device_get(second), before, after


# Architectures first: their parameters seed the pool.
@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(TRAIN_CONFIGS, key=lambda c: not c.endswith("_tiny")))
def test_one_training_step(config):
  first, second, before, after = _two_steps(config)
  assert np.isfinite(first["loss"]) and np.isfinite(first["grad_norm"])
  assert first["grad_norm"] > 0
  # Untrained on a byte vocabulary padded to 384: the loss starts near log(384) = 5.95.
  assert 4.0 < first["loss"] < 9.0
  assert first["num_tokens"] == TARGET_LENGTH + 6
  # Every parameter moved ...
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert all(jax.tree_util.tree_leaves(moved))
  # ... downhill, on the same batch (though dropout, 0.1 in the ablations' fine-tuning
  # run, and random routing draw anew each step).
  if config != "random_routing":
    assert second["loss"] < first["loss"]
  routing = {k for k in first if k.startswith("routing/")}
  if config in ("colt5_tiny", "routed_tokens_512", "kv_equals_queries"):
    # Learned routing reports the mass its selection keeps, per router kind.
    assert {"routing/q_selected_mass", "routing/kv_selected_mass",
            "routing/mlp_selected_mass"} <= routing
  if config in ("t5_1_1_tiny", "longt5_local_tiny", "longt5_tglobal_tiny",
                "no_heavy_branch", "longt5_encoder"):
    assert not routing


@pytest.mark.slow
def test_static_routing_selects_evenly_spaced_tokens():
  """The static ablation's heavy tokens are every (n_real/m)-th real token, by hand."""
  files, bindings = ablation_recipe("static_routing")
  parse(files, bindings)
  model = count_params.model_from_gin()
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  abstract = jax.eval_shape(
      lambda: model.get_initial_variables(
          jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}
      )
  )
  # Any parameter values do: static routing does not look at them.
  params = jax.tree.map(
      lambda leaf: jnp.full(leaf.shape, 0.01, leaf.dtype), nn.meta.unbox(abstract["params"])
  )
  _, state = jax.jit(
      lambda params, batch: model.module.apply(
          {"params": params},
          batch["encoder_input_tokens"],
          batch["decoder_input_tokens"],
          batch["decoder_target_tokens"],
          enable_dropout=False,
          mutable=["intermediates"],
      )
  )(params, batch)
  layer = state["intermediates"]["encoder"]["layers_1"]
  (query_indices,) = layer["attention"]["q_routed_indices"]
  (kv_indices,) = layer["attention"]["kv_routed_indices"]
  (mlp_indices,) = layer["mlp"]["mlp_routed_indices"]
  # Row 0: 256 real tokens; 16 queries -> every 16th, 32 keys/values -> every 8th.
  np.testing.assert_array_equal(query_indices[0], np.arange(0, 256, 16))
  np.testing.assert_array_equal(kv_indices[0], np.arange(0, 256, 8))
  np.testing.assert_array_equal(mlp_indices[0], np.arange(0, 256, 16))
  # Row 1: 200 real tokens -> floor(j * 200 / 16) and floor(j * 200 / 32).
  np.testing.assert_array_equal(query_indices[1], [j * 200 // 16 for j in range(16)])
  np.testing.assert_array_equal(kv_indices[1], [j * 200 // 32 for j in range(32)])
