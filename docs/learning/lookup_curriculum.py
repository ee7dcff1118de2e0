"""One-lookup associative recall (the hf_t5_mqar.py task) on our code: the runs of docs/learning.md.

Same generator, same seeds, same schedule (linear warmup then constant), same clip and AdamW as
docs/learning/hf_t5_mqar.py, so our runs and transformers' see the same batches.

  .venv/bin/python docs/learning/lookup_curriculum.py --model t5 --lr 1e-3 --steps 400 --out /tmp/x.json
  --model t5: models/t5_1_1_tiny.gin at the peer's size (d 64, 4x16 heads, ff 128, 2+1 layers)
  --model colt5: models/colt5_tiny.gin + runs/demo.gin (add --bind 'ROUTED_FRACTION = 1.0')
  --model hf_init: our network from_hf() of the peer's own random init (seed 0)
  --facts '1' or a curriculum '1:300,2:300,4' (num facts until step)
"""
import argparse
import json
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, ".")
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from colt5_flax import gin_utils  # noqa: E402
from colt5_flax.count_params import model_from_gin  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="t5")
p.add_argument("--length", type=int, default=512)
p.add_argument("--facts", default="1")
p.add_argument("--lengths", default=None, help="length curriculum '64:100,128:200' then --length")
p.add_argument("--eval_facts", type=int, default=None)
p.add_argument("--steps", type=int, default=400)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--warmup", type=int, default=50)
p.add_argument("--nkey", type=int, default=32)
p.add_argument("--nval", type=int, default=32)
p.add_argument("--nfill", type=int, default=100)
p.add_argument("--z_loss", type=float, default=0.0)
p.add_argument("--eval_every", type=int, default=50)
p.add_argument("--bind", action="append", default=[])
p.add_argument("--out", default=None)
args = p.parse_args()

FILL0 = 2
KEY0 = FILL0 + args.nfill
VAL0 = KEY0 + args.nkey
MARK, QMARK = VAL0 + args.nval, VAL0 + args.nval + 1
VOCAB = 256
assert QMARK < VOCAB
L = args.length

curriculum = []  # [(num_facts, until_step)]
for part in args.facts.split(","):
  nf, _, until = part.partition(":")
  curriculum.append((int(nf), int(until) if until else 10**9))
EVAL_NF = args.eval_facts or curriculum[-1][0]
length_curriculum = []
for part in (args.lengths or "").split(","):
  if part:
    n, _, until = part.partition(":")
    length_curriculum.append((int(n), int(until)))


def length_at(step):
  for n, until in length_curriculum:
    if step <= until:
      return n
  return L


def facts_at(step):
  for nf, until in curriculum:
    if step <= until:
      return nf
  return curriculum[-1][0]


def batch(rng, n, nf, L=L):
  """hf_t5_mqar.py's generator: facts (MARK key value) in the first half, question at the end."""
  enc = rng.integers(FILL0, FILL0 + args.nfill, size=(n, L))
  tgt = np.zeros((n, 2), np.int64)
  for b in range(n):
    keys = rng.choice(args.nkey, nf, replace=False) + KEY0
    vals = rng.integers(0, args.nval, nf) + VAL0
    slots = rng.choice((L // 2) // 3, nf, replace=False) * 3
    for s, k, v in zip(slots, keys, vals):
      enc[b, s:s + 3] = (MARK, k, v)
    q = rng.integers(nf)
    enc[b, L - 3:L] = (QMARK, keys[q], 1)
    tgt[b] = (vals[q], 1)
  dec = np.concatenate([np.zeros((n, 1), np.int64), tgt[:, :1]], 1)
  return {"encoder_input_tokens": enc.astype(np.int32), "decoder_input_tokens": dec.astype(np.int32),
          "decoder_target_tokens": tgt.astype(np.int32)}


PEER_SIZE = ["EMBED_DIM = 64", "NUM_HEADS = 4", "HEAD_DIM = 16", "MLP_DIM = 128",
             "NUM_ENCODER_LAYERS = 2", "NUM_DECODER_LAYERS = 1"]
if args.model == "hf_init":
  import seqio
  import torch
  from transformers import T5Config, T5ForConditionalGeneration

  from colt5_flax import model as model_lib
  from colt5_flax.convert import hf
  torch.manual_seed(0)
  cfg = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=1,
                 num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                 tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    net, variables = hf.from_hf(T5ForConditionalGeneration(cfg))
  vocab = seqio.PassThroughVocabulary(VOCAB)
  model = model_lib.EncoderDecoderModel(net, vocab, vocab)
  params = nn.unbox(variables["params"])
  binds = []
else:
  files = {"t5": ["models/t5_1_1_tiny.gin"],
           "colt5": ["models/colt5_tiny.gin", "runs/demo.gin"]}[args.model]
  binds = [f"VOCAB_SIZE = {VOCAB}", "DROPOUT_RATE = 0.0"]
  if args.model == "colt5":
    binds.append("MODEL_DIR = 'unused'")
  else:
    binds += PEER_SIZE
  binds += args.bind
  gin_utils.parse_gin_flags(["configs"], files, binds, finalize_config=False)
  model = model_from_gin()
  shapes = {"encoder_input_tokens": (1, L), "decoder_input_tokens": (1, 2),
            "decoder_target_tokens": (1, 2)}
  params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
model.z_loss = args.z_loss
nparams = sum(x.size for x in jax.tree_util.tree_leaves(params))

sched = lambda s: args.lr * jnp.minimum(1.0, (s + 1) / args.warmup)  # noqa: E731  peer's LambdaLR
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
opt_state = opt.init(params)


@jax.jit
def train_step(params, opt_state, b):
  (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, b, None)
  updates, opt_state = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, metrics["cross_ent_loss"]


@jax.jit
def predict(params, b):
  logits = model.module.apply({"params": params}, b["encoder_input_tokens"],
                              b["decoder_input_tokens"], b["decoder_target_tokens"],
                              enable_dropout=False)
  return jnp.argmax(logits, -1)


erng = np.random.default_rng(1)
evals = [batch(erng, 32, EVAL_NF) for _ in range(4)]


def exact_match(params):
  return float(np.mean([np.all(np.asarray(predict(params, b)) == b["decoder_target_tokens"], 1)
                        for b in evals]))


print(json.dumps({"args": vars(args), "params": int(nparams), "binds": binds}), flush=True)
rng = np.random.default_rng(0)
t0 = time.time()
losses, history, train_s = [], [], 0.0
for step in range(1, args.steps + 1):
  ts = time.time()
  params, opt_state, loss = train_step(params, opt_state, batch(rng, args.batch, facts_at(step), length_at(step)))
  losses.append(float(loss))
  train_s += time.time() - ts
  if step % args.eval_every == 0 or step == args.steps:
    r = {"step": step, "facts": facts_at(step), "length": length_at(step), "loss": float(np.mean(losses[-25:])),
         "exact_match": exact_match(params), "train_s": round(train_s, 1),
         "wall_s": round(time.time() - t0, 1)}
    history.append(r)
    print("EVAL", json.dumps(r), flush=True)
if args.out:
  json.dump({"args": vars(args), "params": int(nparams), "binds": binds, "history": history},
            open(args.out, "w"), indent=1)
